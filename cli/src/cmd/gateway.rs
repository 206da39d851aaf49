//! `shale gateway`: runs the SP's SSH gateway, and its settler, until SIGINT or SIGTERM.
//!
//! The settler (claims with Groth16 proofs, then settlement) runs in the same process when the
//! config has an `[sp.settler]` section. It reads the ledger the gateway's meter writes, and
//! signs with the provider's key (`[sp] keystore`, SHALE_KEYSTORE or SHALE_PRIVATE_KEY). It
//! learns of new orders from the marketplace's events; the gateway does not hand it its lease
//! meters, so a lease's last ticks are claimed once the order has ended on chain.

use std::path::Path;

use anyhow::{bail, Context};
use futures::StreamExt;
use shale_contracts::{Address, MarketEvent, Marketplace};
use shale_gateway::settler::{Settler, SettlerConfig};
use shale_gateway::{Gateway, GatewayConfig};
use shale_provisioner::Provisioner;

use crate::spconfig::SpConfig;

/// Loads the config (its `[sp]` section is the CLI's, the rest the gateway's), connects to the
/// chain and containerd, and serves.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let sp = SpConfig::load(config_path)?;
    let config = sp.gateway.clone();
    let market = Marketplace::connect(&config.chain.rpc_url, config.chain.marketplace, None)
        .await
        .with_context(|| format!("connecting to the marketplace at {}", config.chain.rpc_url))?;
    let provisioner = Provisioner::connect(config.containers.clone())
        .await
        .context("connecting to containerd")?;
    let gateway = Gateway::bind(config.clone(), market, provisioner).await?;
    eprintln!(
        "shale gateway on {} with host key {}",
        gateway.local_addr(),
        gateway.host_public_key()
    );
    let settler = match &sp.sp.settler {
        Some(s) => Some(start_settler(&sp, &config, s).await?),
        None => None,
    };
    let result = gateway.run(shutdown_signal()).await;
    if let Some((task, follower)) = settler {
        follower.abort();
        task.shutdown().await;
    }
    result?;
    Ok(())
}

async fn start_settler(
    sp: &SpConfig,
    config: &GatewayConfig,
    settler_config: &SettlerConfig,
) -> anyhow::Result<(
    shale_gateway::settler::SettlerTask,
    tokio::task::JoinHandle<()>,
)> {
    let keystore = sp
        .sp
        .keystore
        .clone()
        .or_else(|| std::env::var_os("SHALE_KEYSTORE").map(Into::into));
    let key = crate::settings::load_signer(keystore.as_deref())
        .context("the settler signs claims with the provider's key")?;
    if key.address() != config.chain.provider {
        bail!(
            "the settler's key is {:#x}, but the provider is {:#x}",
            key.address(),
            config.chain.provider
        );
    }
    let market = Marketplace::connect(&config.chain.rpc_url, config.chain.marketplace, Some(key))
        .await?
        .with_poll_interval(config.chain.poll_interval);
    let ledger = config
        .meter
        .open_ledger(&config.state_dir)
        .await
        .context("opening the ledger for the settler")?;
    let settler = Settler::new(settler_config, market.clone(), ledger)
        .await
        .context("starting the settler")?;
    eprintln!(
        "settler proving claims for batch capacities {:?}",
        settler.capacities()
    );
    let task = settler.spawn();
    let follower = tokio::spawn(follow_orders(market, settler, config.chain.provider));
    Ok((task, follower))
}

/// Tracks this provider's orders as they are accepted, and wakes the settler when one ends.
async fn follow_orders(market: Marketplace, settler: Settler, provider: Address) {
    let mut events = match market.watch().await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the marketplace; the settler only sees orders found at start");
            return;
        }
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(MarketEvent::OrderAccepted {
                order_id,
                provider: p,
                ..
            }) if p == provider => settler.track(order_id, None),
            Ok(MarketEvent::OrderTerminated { .. }) => settler.wake(),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "marketplace events unavailable"),
        }
    }
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
