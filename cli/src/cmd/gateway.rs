//! `shale gateway`: runs the SP's SSH gateway until SIGINT or SIGTERM.

use std::path::Path;

use anyhow::Context;
use shale_contracts::Marketplace;
use shale_gateway::Gateway;
use shale_provisioner::Provisioner;

use crate::spconfig::SpConfig;

/// Loads the config (its `[sp]` section is the CLI's, the rest the gateway's), connects to the
/// chain and containerd, and serves.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = SpConfig::load(config_path)?.gateway;
    let market = Marketplace::connect(&config.chain.rpc_url, config.chain.marketplace, None)
        .await
        .with_context(|| format!("connecting to the marketplace at {}", config.chain.rpc_url))?;
    let provisioner = Provisioner::connect(config.containers.clone())
        .await
        .context("connecting to containerd")?;
    let gateway = Gateway::bind(config, market, provisioner).await?;
    eprintln!(
        "shale gateway on {} with host key {}",
        gateway.local_addr(),
        gateway.host_public_key()
    );
    gateway.run(shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
