//! Driving the stock OpenSSH client binaries (`ssh`, `scp`, `sftp`, `rsync -e ssh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context};

/// A client key pair made by `ssh-keygen`.
#[derive(Debug, Clone)]
pub struct ClientKey {
    /// The private key file.
    pub path: PathBuf,
    /// The public key line (`ssh-ed25519 AAAA... comment`).
    pub public: String,
    /// SHA-256 of the key blob, as an order stores it.
    pub fingerprint: [u8; 32],
}

impl ClientKey {
    /// Generates a new key of `kind` (`ed25519`, `ecdsa`, `rsa`) named `name` in `dir`.
    pub fn generate(dir: &Path, name: &str, kind: &str) -> anyhow::Result<Self> {
        let path = dir.join(name);
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-t", kind, "-N", "", "-C", name, "-f"])
            .arg(&path);
        if kind == "rsa" {
            cmd.args(["-b", "3072"]);
        }
        let out = cmd.output().context("running ssh-keygen")?;
        if !out.status.success() {
            bail!(
                "ssh-keygen failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let public = std::fs::read_to_string(path.with_extension("pub"))?
            .trim()
            .to_string();
        let fingerprint = shale_contracts::key_fingerprint_openssh(&public)?;
        Ok(Self {
            path,
            public,
            fingerprint,
        })
    }
}

/// What a finished client command printed and how it ended.
#[derive(Debug)]
pub struct SshOutput {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl From<Output> for SshOutput {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// How to reach the gateway: address, pinned host key and the client's key.
#[derive(Debug, Clone)]
pub struct Target {
    /// Gateway host (an IP literal here).
    pub host: String,
    /// Gateway port.
    pub port: u16,
    /// A `known_hosts` file that pins the gateway's host key (taken from the chain).
    pub known_hosts: PathBuf,
    /// The key to log in with.
    pub key: PathBuf,
    /// The login, i.e. the order (`42`, `order-42`, ...).
    pub user: String,
    /// `BatchMode=yes`, as scripts run ssh; `false` behaves like a person at a terminal.
    pub batch: bool,
}

impl Target {
    /// Options every OpenSSH tool gets: no user config, no agent, the pinned host key only.
    pub fn options(&self) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "ConnectTimeout=20",
            "-o",
            if std::env::var_os("SHALE_TEST_SSH_VERBOSE").is_some() {
                "LogLevel=DEBUG"
            } else {
                "LogLevel=ERROR"
            },
        ]
        .into_iter()
        .map(String::from)
        .chain([
            "-o".into(),
            format!("BatchMode={}", if self.batch { "yes" } else { "no" }),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-i".into(),
            self.key.display().to_string(),
        ])
        .collect()
    }

    /// The same target, driven as a person at a terminal would (no `BatchMode`).
    pub fn interactive(mut self) -> Self {
        self.batch = false;
        self
    }

    /// The arguments of `ssh` up to the remote command: the options, port, login and host.
    fn ssh_args(&self) -> Vec<String> {
        let mut args = self.options();
        args.extend([
            "-p".into(),
            self.port.to_string(),
            "-l".into(),
            self.user.clone(),
            self.host.clone(),
        ]);
        args
    }

    /// `ssh` with the options, port and login set; append the remote command.
    pub fn ssh(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_args()).stdin(Stdio::null());
        cmd
    }

    /// `ssh` with `extra` options before the login and host (`-tt`, `-o …`); append the command.
    pub fn ssh_with(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(extra).args(self.ssh_args()).stdin(Stdio::null());
        cmd
    }

    /// `ssh ... command` run inside a fresh pseudo-terminal (util-linux `script`), as a person
    /// typing it would; its output, stdout and stderr mixed, comes on stdout.
    pub fn ssh_in_terminal(&self, command: &str) -> Command {
        let quoted: Vec<String> = std::iter::once("ssh".to_string())
            .chain(self.ssh_args())
            .chain(std::iter::once(command.to_string()))
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        let mut cmd = Command::new("script");
        cmd.args(["-qefc", &quoted.join(" "), "/dev/null"])
            .stdin(Stdio::null());
        cmd
    }

    /// `scp` with the options and port set; `remote(path)` names a file in the container.
    pub fn scp(&self) -> Command {
        let mut cmd = Command::new("scp");
        cmd.args(self.options())
            .args(["-P", &self.port.to_string(), "-q"])
            .stdin(Stdio::null());
        cmd
    }

    /// `sftp` in batch mode reading commands from `batch`.
    pub fn sftp(&self, batch: &Path) -> Command {
        let mut cmd = Command::new("sftp");
        cmd.args(self.options())
            .args(["-P", &self.port.to_string(), "-b"])
            .arg(batch)
            .arg(format!("{}@{}", self.user, self.host))
            .stdin(Stdio::null());
        cmd
    }

    /// The `user@host:path` form scp and rsync use.
    pub fn remote(&self, path: &str) -> String {
        format!("{}@{}:{}", self.user, self.host, path)
    }

    /// The `-e` argument for `rsync`: our ssh with all its options.
    pub fn rsync_shell(&self) -> String {
        let mut parts = vec!["ssh".to_string()];
        parts.extend(self.options());
        parts.extend(["-p".into(), self.port.to_string()]);
        parts.join(" ")
    }
}

/// Runs `cmd` to completion, capturing its output.
pub fn run(mut cmd: Command) -> anyhow::Result<SshOutput> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    Ok(out.into())
}

/// [`run`] on a blocking thread, failing after `limit`: for a session that must end by itself
/// (one that waited for a background job would hang the test).
pub async fn run_within(cmd: Command, limit: std::time::Duration) -> anyhow::Result<SshOutput> {
    tokio::time::timeout(limit, tokio::task::spawn_blocking(move || run(cmd)))
        .await
        .map_err(|_| anyhow::anyhow!("the session did not end within {limit:?}"))??
}
