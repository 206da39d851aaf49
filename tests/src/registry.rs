//! A real OCI registry for the end-to-end tests: Debian's `docker-registry` on loopback, with a
//! config and storage of the test's own, filled with `skopeo`. No test reaches another registry.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// An anonymous registry on 127.0.0.1, speaking plain HTTP; killed on drop.
pub struct LocalRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl LocalRegistry {
    /// Whether `docker-registry` and `skopeo` are installed; under `CI=true` their absence is a
    /// failure, not a skip.
    pub fn available() -> anyhow::Result<bool> {
        let skopeo = Command::new("skopeo")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if Path::new(REGISTRY_BIN).exists() && skopeo {
            return Ok(true);
        }
        ensure!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI needs docker-registry and skopeo (scripts/setup.sh installs them)"
        );
        eprintln!("SKIPPED: needs docker-registry and skopeo (scripts/setup.sh installs them)");
        Ok(false)
    }

    /// Starts the registry and waits until it listens.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("shale-registry-")
            .tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        let registry = LocalRegistry { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "docker-registry did not listen on 127.0.0.1:{port}: {}",
                std::fs::read_to_string(registry.dir.path().join("registry.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// `host:port`, as references and the provider's `[[registries]]` name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes an OCI archive as `repo:tag`; returns the reference to pull it by.
    pub fn push_archive(&self, archive: &Path, repo_tag: &str) -> anyhow::Result<String> {
        let reference = format!("{}/{repo_tag}", self.host());
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .context("running skopeo")?;
        ensure!(
            out.status.success(),
            "skopeo copy into {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(reference)
    }

    /// The digest (`sha256:…`) the registry serves `reference`'s manifest or index under, as
    /// skopeo reads it: what a client names its own image by.
    pub fn digest(&self, reference: &str) -> anyhow::Result<String> {
        let out = Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
            .arg(format!("docker://{reference}"))
            .output()
            .context("running skopeo")?;
        ensure!(
            out.status.success(),
            "skopeo inspect {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
