//! The set-up every whole-system comparison shares: the end-to-end stack with one accepted order,
//! and a private OpenSSH sshd that the same client key logs in to. Comparisons that need them add
//! the original design (sshd inside a container) and a gateway that does not count bytes.

use std::path::Path;

use shale_gateway::config::SessionConfig;
use shale_tests::ssh::{ClientKey, Target};
use shale_tests::{OrderOptions, Stack, StackOptions};

use crate::container_sshd::ContainerSshd;
use crate::reference::ReferenceSshd;

/// The gateway and the reference, reachable with the same key.
pub struct SideBySide {
    /// The stack (chain, containerd, gateway); more orders can be placed on it.
    pub stack: Stack,
    /// The order's container through the gateway.
    pub gateway: Target,
    /// The host through OpenSSH's sshd.
    pub reference: Target,
    /// The client key every side accepts.
    pub key: ClientKey,
    sshd: ReferenceSshd,
}

/// A second stack whose gateway does not count channel bytes: the "metering off" side.
pub struct Unmetered {
    /// The stack; stop it when done.
    pub stack: Stack,
    /// An order's container through that gateway.
    pub gateway: Target,
}

impl SideBySide {
    /// Starts the stack, places and accepts an order, and starts sshd.
    pub async fn start() -> anyhow::Result<Self> {
        let stack = Stack::start().await?;
        let key = stack.key("bench", "ed25519")?;
        let order = stack.order(&key, OrderOptions::default()).await?;
        let gateway = stack.target(order.to_string(), &key);
        let sshd = ReferenceSshd::start(stack.dir.path(), &key.public)?;
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let reference = loopback(sshd.port, &sshd.known_hosts, &key, user);
        Ok(Self {
            stack,
            gateway,
            reference,
            key,
            sshd,
        })
    }

    /// Starts sshd inside a container with an order's resources (the stack's offer: 2 CPUs,
    /// 1 GiB), the original design, on the same containerd, and how to reach it.
    pub async fn container_reference(&self) -> anyhow::Result<(ContainerSshd, Target)> {
        let sshd =
            ContainerSshd::start(&self.stack.provisioner, 2, 1 << 30, &self.key.public).await?;
        let target = loopback(sshd.port, &sshd.known_hosts, &self.key, sshd.user.clone());
        Ok((sshd, target))
    }

    /// Starts a second stack whose gateway does not count bytes, with an order for the same key.
    pub async fn unmetered(&self) -> anyhow::Result<Unmetered> {
        let stack = Stack::start_with(StackOptions {
            sessions: SessionConfig {
                count_bytes: false,
                ..SessionConfig::default()
            },
            ..StackOptions::default()
        })
        .await?;
        let order = stack.order(&self.key, OrderOptions::default()).await?;
        let gateway = stack.target(order.to_string(), &self.key);
        Ok(Unmetered { stack, gateway })
    }

    /// Stops sshd, then the stack.
    pub async fn stop(self) -> anyhow::Result<()> {
        drop(self.sshd);
        self.stack.stop().await
    }
}

/// How `key` reaches an sshd on 127.0.0.1:`port` as `user`.
fn loopback(port: u16, known_hosts: &Path, key: &ClientKey, user: String) -> Target {
    Target {
        host: "127.0.0.1".into(),
        port,
        known_hosts: known_hosts.to_path_buf(),
        key: key.path.clone(),
        user,
        batch: true,
    }
}
