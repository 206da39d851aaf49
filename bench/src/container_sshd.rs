//! The original Shale design, as a second reference: OpenSSH's `sshd` running inside the order's
//! container (the default image plus `openssh-server`), reached through a port on the host.
//!
//! The container has its own network namespace, as every order container does, so the host port
//! is a user-space relay into that namespace: what Docker's `docker-proxy` does for a published
//! port reached over loopback. sshd runs as the order's unprivileged user, with the same limits
//! and seccomp profile as any order.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use shale_provisioner::{image_build, ExecRequest, LeaseSpec, Process, Provisioner};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::reference::{generate_host_key, sshd_config, write_known_hosts};

/// The port sshd listens on inside the container.
const SSHD_PORT: u16 = 2222;
/// The image's unprivileged account (`user`), which sshd runs as and the bench logs in as.
const SSHD_UID: u32 = 1000;
/// The only order in the reference's own containerd namespace.
const ORDER: u64 = 1;
/// The image variant: the default image and the OpenSSH server.
const VARIANT: &str = "bench-sshd";

/// sshd in a container, stopped (container released) by [`ContainerSshd::stop`].
pub struct ContainerSshd {
    provisioner: Provisioner,
    sshd: Process,
    relay: JoinHandle<()>,
    /// The host port that reaches sshd.
    pub port: u16,
    /// A `known_hosts` file pinning sshd's host key.
    pub known_hosts: PathBuf,
    /// The user to log in as (the image's order user).
    pub user: String,
}

impl ContainerSshd {
    /// Starts sshd in a fresh container on `provisioner`'s daemon (in a namespace of its own), with
    /// `cpus` and `memory_bytes` like an order's, letting `client_public_key` log in.
    pub async fn start(
        provisioner: &Provisioner,
        cpus: u32,
        memory_bytes: u64,
        client_public_key: &str,
    ) -> anyhow::Result<Self> {
        let (archive, image) = image_build::build_default_variant(
            &image_build::default_cache_dir(),
            VARIANT,
            &["openssh-server"],
        )
        .await
        .context("building the sshd image")?;
        let mut config = provisioner.config().clone();
        config.namespace = format!("{}-sshd", config.namespace);
        config.state_dir = config.state_dir.join("sshd-reference");
        config.image = image;
        let provisioner = Provisioner::connect(config).await?;
        provisioner.import_image(&archive).await?;
        let lease = provisioner
            .ensure(&LeaseSpec {
                order: ORDER,
                cpus,
                memory_bytes,
                gpus: 0,
                dataset: None,
                expires_at: SystemTime::now() + Duration::from_secs(24 * 3600),
                pids_limit: None,
                // The disk the stack's orders get by default, like the gateway's side.
                disk_bytes: shale_tests::stack::STACK_DISK_MIB << 20,
                image: None,
                image_repository: None,
            })
            .await
            .context("starting the sshd container")?;

        // Host key, authorized key and config on the order's volume, owned by the user sshd runs
        // as: a non-root sshd lets that user, and only that user, log in.
        let dir = lease.volume.join(".sshd");
        std::fs::create_dir_all(&dir)?;
        let host_key = dir.join("host_ed25519");
        generate_host_key(&host_key)?;
        std::fs::write(
            dir.join("authorized_keys"),
            format!("{client_public_key}\n"),
        )?;
        let inside = Path::new(&provisioner.config().work_dir).join(".sshd");
        std::fs::write(
            dir.join("sshd_config"),
            sshd_config(
                SSHD_PORT,
                &inside.join("host_ed25519"),
                &inside.join("authorized_keys"),
            ),
        )?;
        // sshd runs as the image's user (uid 1000 in the order's user namespace): own the files
        // as the host id that maps to, so that they belong to that user inside.
        let ids = lease.ids.context("the sshd container has no uid range")?;
        let (uid, gid) = (ids.host_id(SSHD_UID), ids.host_id(SSHD_UID));
        for entry in std::fs::read_dir(&dir)? {
            std::os::unix::fs::chown(entry?.path(), Some(uid), Some(gid))?;
        }
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        // The order's home belongs to its root: let sshd's user through to its files.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&lease.volume, std::fs::Permissions::from_mode(0o755))?;

        let sshd = provisioner
            .exec(
                ORDER,
                ExecRequest {
                    // sshd runs as the image's unprivileged user, as a tenant's own sshd
                    // would without root: a root sshd's privilege separation chroots, which
                    // the order's seccomp profile refuses.
                    argv: [
                        "/usr/bin/setpriv",
                        "--reuid=1000",
                        "--regid=1000",
                        "--clear-groups",
                        "/usr/sbin/sshd",
                        "-D",
                        "-e",
                        "-f",
                    ]
                    .into_iter()
                    .map(String::from)
                    .chain([inside.join("sshd_config").display().to_string()])
                    .collect(),
                    env: Vec::new(),
                    tty: None,
                    cwd: None,
                },
            )
            .await
            .context("starting sshd in the container")?;

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let relay = tokio::spawn(relay(listener, provisioner.clone()));

        let known_hosts = dir.join("known_hosts");
        write_known_hosts(&known_hosts, port, &host_key)?;
        let reference = Self {
            provisioner,
            sshd,
            relay,
            port,
            known_hosts,
            user: "user".into(),
        };
        reference.wait_listening().await?;
        Ok(reference)
    }

    /// Waits until sshd accepts connections inside the container.
    async fn wait_listening(&self) -> anyhow::Result<()> {
        for _ in 0..100 {
            if self
                .provisioner
                .connect_tcp(ORDER, "127.0.0.1", SSHD_PORT)
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("sshd did not start listening in the container")
    }

    /// Stops sshd and releases the container.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.relay.abort();
        // Releasing the container stops sshd with it.
        drop(self.sshd);
        self.provisioner.release(ORDER).await?;
        Ok(())
    }
}

/// Relays each host connection into the container's network namespace.
async fn relay(listener: TcpListener, provisioner: Provisioner) {
    while let Ok((mut client, _)) = listener.accept().await {
        let provisioner = provisioner.clone();
        tokio::spawn(async move {
            match provisioner.connect_tcp(ORDER, "127.0.0.1", SSHD_PORT).await {
                Ok(mut inside) => {
                    let _ = client.set_nodelay(true);
                    let _ = inside.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut inside).await;
                }
                Err(e) => tracing::warn!(error = %e, "relay into the sshd container failed"),
            }
        });
    }
}
