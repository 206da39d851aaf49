//! The set-up every whole-system comparison shares: the end-to-end stack with one accepted order,
//! and a private OpenSSH sshd that the same client key logs in to.

use shale_tests::ssh::Target;
use shale_tests::{OrderOptions, Stack};

use crate::reference::ReferenceSshd;

/// The gateway and the reference, reachable with the same key.
pub struct SideBySide {
    /// The stack (chain, containerd, gateway); more orders can be placed on it.
    pub stack: Stack,
    /// The order's container through the gateway.
    pub gateway: Target,
    /// The host through OpenSSH's sshd.
    pub reference: Target,
    sshd: ReferenceSshd,
}

impl SideBySide {
    /// Starts the stack, places and accepts an order, and starts sshd.
    pub async fn start() -> anyhow::Result<Self> {
        let stack = Stack::start().await?;
        let key = stack.key("bench", "ed25519")?;
        let order = stack.order(&key, OrderOptions::default()).await?;
        let gateway = stack.target(order.to_string(), &key);
        let sshd = ReferenceSshd::start(stack.dir.path(), &key.public)?;
        let reference = Target {
            host: "127.0.0.1".into(),
            port: sshd.port,
            known_hosts: sshd.known_hosts.clone(),
            key: key.path.clone(),
            user: std::env::var("USER").unwrap_or_else(|_| "root".into()),
            batch: true,
        };
        Ok(Self {
            stack,
            gateway,
            reference,
            sshd,
        })
    }

    /// Stops sshd, then the stack.
    pub async fn stop(self) -> anyhow::Result<()> {
        drop(self.sshd);
        self.stack.stop().await
    }
}
