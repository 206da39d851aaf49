//! The client's machine as a user has it: the real `shale` binary with settings of its own,
//! `shale order create` writing the `Host shale-N` entry whose `ProxyCommand` is the payment
//! tunnel (`shale tunnel`), and the stock `ssh` reaching the order through that entry.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::ssh::{ClientKey, SshOutput};
use crate::stack::Stack;

/// The `shale` binary: `SHALE_BIN` when set, otherwise built (or found up to date) by cargo in
/// the target directory this test binary was built in, with the same profile.
pub fn shale_exe() -> anyhow::Result<PathBuf> {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    if let Some(exe) = EXE.get() {
        return Ok(exe.clone());
    }
    let exe = match std::env::var_os("SHALE_BIN") {
        Some(p) => PathBuf::from(p),
        None => build_shale()?,
    };
    anyhow::ensure!(
        exe.is_file(),
        "the shale binary {} is missing",
        exe.display()
    );
    Ok(EXE.get_or_init(|| exe).clone())
}

/// `cargo build -p shale --bin shale` into this test binary's target directory: the tests
/// drive the same code as the workspace they were built from, never a stale binary.
fn build_shale() -> anyhow::Result<PathBuf> {
    let build = Build::here()?;
    build.cargo(
        "the shale binary (or set SHALE_BIN)",
        &[
            "build",
            "--quiet",
            "-p",
            "shale",
            "--bin",
            "shale",
            "--profile",
            &build.profile,
        ],
    )?;
    Ok(build.profile_dir.join("shale"))
}

/// The in-container agent, static, as `scripts/build-agent.sh` builds it: into this test
/// binary's target directory (`agent/shale-agent`), where a `shale` built beside the tests
/// finds it too.
pub fn agent_exe() -> anyhow::Result<PathBuf> {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    if let Some(exe) = EXE.get() {
        return Ok(exe.clone());
    }
    let build = Build::here()?;
    build.cargo(
        "the static agent",
        &[
            "rustc",
            "--quiet",
            "-p",
            "shale-agent",
            "--bin",
            "shale-agent",
            "--profile",
            "agent",
            "--",
            "-C",
            "target-feature=+crt-static",
        ],
    )?;
    let exe = build.target_dir.join("agent").join("shale-agent");
    anyhow::ensure!(exe.is_file(), "the agent {} is missing", exe.display());
    Ok(EXE.get_or_init(|| exe).clone())
}

/// Where this binary was built: target/<profile>/deps/<test binary> or target/<profile>/<bin>.
struct Build {
    profile_dir: PathBuf,
    target_dir: PathBuf,
    profile: String,
}

impl Build {
    fn here() -> anyhow::Result<Self> {
        let me = std::env::current_exe()?;
        // A test binary is in target/<profile>/deps, a harness binary in target/<profile>.
        let dir = me.parent().context("the binary has no directory")?;
        let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
            dir.parent().context("no profile directory")?
        } else {
            dir
        };
        let target_dir = profile_dir.parent().context("no target directory")?;
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(name) => name.to_string(),
            None => bail!("cannot tell the build profile of {}", me.display()),
        };
        Ok(Self {
            profile_dir: profile_dir.to_path_buf(),
            target_dir: target_dir.to_path_buf(),
            profile,
        })
    }

    /// Runs cargo in the workspace with `args` and this target directory.
    fn cargo(&self, what: &str, args: &[&str]) -> anyhow::Result<()> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the workspace root")?;
        let out = Command::new(cargo)
            .current_dir(workspace)
            .args(args)
            .env("CARGO_TARGET_DIR", &self.target_dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running cargo to build {what}"))?;
        if !out.status.success() {
            bail!(
                "building {what} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// A client with its own `shale` settings (chain, marketplace, signing key, ssh directory).
pub struct Client {
    exe: PathBuf,
    /// `shale`'s client config file.
    config: PathBuf,
    /// The ssh directory `order create` writes into (`<dir>/shale/config`, …).
    pub ssh_dir: PathBuf,
    private_key: String,
}

impl Client {
    /// The stack's client account, with its files under the stack's scratch directory.
    pub fn new(stack: &Stack) -> anyhow::Result<Client> {
        let home = stack.dir.path().join("client-home");
        let ssh_dir = home.join("ssh");
        std::fs::create_dir_all(&ssh_dir)?;
        let config = home.join("client.toml");
        // An explicit config: the developer's own (or the dev stack's) never leaks in.
        std::fs::write(
            &config,
            format!(
                "rpc_url = \"{}\"\nmarketplace = \"{:#x}\"\nssh_dir = \"{}\"\n",
                stack.devnet.rpc_url(),
                stack.marketplace,
                ssh_dir.display()
            ),
        )?;
        Ok(Client {
            exe: shale_exe()?,
            config,
            ssh_dir,
            private_key: stack.client_private_key(),
        })
    }

    /// `shale ARGS` as this client runs it.
    pub fn shale(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("SHALE_CONFIG", &self.config)
            .env("SHALE_PRIVATE_KEY", &self.private_key)
            .env_remove("SHALE_RPC_URL")
            .env_remove("SHALE_MARKETPLACE")
            .env_remove("SHALE_KEYSTORE")
            .env_remove("SHALE_SSH_DIR")
            .stdin(Stdio::null());
        cmd
    }

    /// `shale ARGS` to completion.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<SshOutput> {
        let mut cmd = tokio::process::Command::from(self.shale(args));
        let out = cmd
            .output()
            .await
            .with_context(|| format!("running shale {args:?}"))?;
        Ok(out.into())
    }

    /// `shale order create` for `key` with the stack's SP, as a user runs it: the SP accepts
    /// while the command waits. Returns the order id once the command has written the Host
    /// entry.
    pub async fn create_order(
        &self,
        stack: &Stack,
        key: &ClientKey,
        byte_allowance: &str,
    ) -> anyhow::Result<u64> {
        let before = stack.client.order_count().await?;
        let provider = format!("{:#x}", stack.provider());
        let public = key.path.with_extension("pub");
        let child = tokio::process::Command::from(self.shale(&[
            "--json",
            "order",
            "create",
            "--provider",
            &provider,
            "--key",
            public.to_str().context("a UTF-8 key path")?,
            "--hours",
            "1",
            "--deposit",
            "1FIL",
            "--wait",
            "120",
            "--byte-allowance",
            byte_allowance,
        ]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running shale order create")?;
        let id = before + 1;
        let mut placed = false;
        for _ in 0..600 {
            if stack.client.order_count().await? >= id {
                placed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::ensure!(placed, "shale order create placed no order in two minutes");
        stack.sp.accept(id).await.context("the SP accepts")?;
        let out = child.wait_with_output().await?;
        let out = SshOutput::from(out);
        anyhow::ensure!(out.code == Some(0), "shale order create: {out:?}");
        let created: serde_json::Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("order create printed {:?}", out.stdout))?;
        anyhow::ensure!(
            created["order"].as_u64() == Some(id),
            "order create made {created}, not order {id}"
        );
        Ok(id)
    }

    /// The ssh config `order create` wrote.
    pub fn ssh_config(&self) -> PathBuf {
        self.ssh_dir.join("shale").join("config")
    }

    /// The payment tunnel's wire-count file of `order`.
    pub fn wire_counts(&self, order: u64) -> PathBuf {
        self.ssh_dir
            .join("shale")
            .join("wire")
            .join(format!("shale-{order}.json"))
    }

    /// The tunnel's counts of `order`: bytes up (to the gateway) and down.
    pub fn wire_totals(&self, order: u64) -> anyhow::Result<(u64, u64)> {
        let path = self.wire_counts(order);
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is not a wire count", path.display()))?;
        Ok((
            v["up"].as_u64().context("no up count")?,
            v["down"].as_u64().context("no down count")?,
        ))
    }

    /// `ssh shale-N`, the command `order create` tells the user to run, with the config it
    /// wrote (and nothing of the user's own); append the remote command.
    pub fn ssh(&self, order: u64) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(self.ssh_config())
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
            .arg(format!("shale-{order}"))
            .stdin(Stdio::null());
        cmd
    }
}

/// The payment tunnel OpenSSH started for the `ssh` process `ssh_pid`: its `ProxyCommand`
/// child (OpenSSH runs it as `sh -c "exec …"`, so the shell becomes the tunnel).
pub fn tunnel_of(ssh_pid: u32) -> anyhow::Result<Option<u32>> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …: the name may hold spaces, the fields after `)` do not.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(ssh_pid) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.iter().any(|a| *a == b"tunnel") {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}
