//! OpenSSH's own `sshd` on a loopback port, the reference every comparison is made against.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// A private `sshd` (its own host key, config and authorized key), stopped on drop.
pub struct ReferenceSshd {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// A `known_hosts` file pinning its host key.
    pub known_hosts: PathBuf,
}

impl ReferenceSshd {
    /// Starts `sshd` in `dir`, letting `client_public_key` log in as the current user.
    pub fn start(dir: &Path, client_public_key: &str) -> anyhow::Result<Self> {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("sshd is not installed (apt-get install openssh-server)")?;
        let host_key = dir.join("ref_host_ed25519");
        generate_host_key(&host_key)?;
        let authorized = dir.join("ref_authorized_keys");
        std::fs::write(&authorized, format!("{client_public_key}\n"))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // sshd insists on this directory for privilege separation.
        std::fs::create_dir_all("/run/sshd")?;
        let config = dir.join("sshd_config");
        std::fs::write(&config, sshd_config(port, &host_key, &authorized))?;
        let child = Command::new(sshd)
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-e")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sshd")?;
        let known_hosts = dir.join("ref_known_hosts");
        write_known_hosts(&known_hosts, port, &host_key)?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self {
                    child,
                    port,
                    known_hosts,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("sshd did not start listening on port {port}")
    }

    /// The listening sshd's process id (its per-connection processes are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Writes a fresh ed25519 host key at `path` (the public half at `path.pub`).
pub(crate) fn generate_host_key(path: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The `sshd_config` of every reference sshd: public-key login only, on 127.0.0.1:`port`, SFTP
/// served in-process. Paths are as sshd sees them.
pub(crate) fn sshd_config(port: u16, host_key: &Path, authorized_keys: &Path) -> String {
    // MaxStartups: the load harness keeps many handshakes in flight; the default (10:30:100)
    // would drop some of them at random, which is not what it measures.
    format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
         PermitRootLogin prohibit-password\nStrictModes no\nPidFile none\n\
         Subsystem sftp internal-sftp\n\
         MaxStartups 1000\n",
        host_key.display(),
        authorized_keys.display()
    )
}

/// Writes a `known_hosts` file pinning the key at `host_key`.pub for `[127.0.0.1]:port`.
pub(crate) fn write_known_hosts(path: &Path, port: u16, host_key: &Path) -> anyhow::Result<()> {
    let public = std::fs::read_to_string(host_key.with_extension("pub"))?;
    std::fs::write(path, format!("[127.0.0.1]:{port} {public}"))?;
    Ok(())
}

impl Drop for ReferenceSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
