//! `shale gateway`: runs the SP's SSH gateway, and its settler, until SIGINT or SIGTERM.
//!
//! The settler (claims with Groth16 proofs, then settlement) runs in the same process when the
//! config has an `[sp.settler]` section, and the auto-accept policy when `[sp.accept] auto` is
//! set. Both sign with the provider's key (`[sp] keystore`, SHALE_KEYSTORE or
//! SHALE_PRIVATE_KEY). The settler reads the ledger the gateway's meter writes and learns of new
//! orders from the marketplace's events; the gateway does not hand it its lease meters, so a
//! lease's last ticks are claimed once the order has ended on chain.

use std::path::Path;

use anyhow::{bail, Context};
use futures::StreamExt;
use shale_contracts::{MarketEvent, Marketplace, OrderState};
use shale_gateway::{Gateway, GatewayConfig};
use shale_provisioner::{Provisioner, ProvisionerConfig};
use shale_settler::{Settler, SettlerConfig, SettlerTask};

use crate::spconfig::SpConfig;

/// Loads the config (its `[sp]` section is the CLI's, the rest the gateway's), connects to the
/// chain and containerd, and serves.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let sp = SpConfig::load(config_path)?;
    let config = sp.gateway.clone();
    let market = Marketplace::connect(&config.chain.rpc_url, config.chain.marketplace, None)
        .await
        .with_context(|| format!("connecting to the marketplace at {}", config.chain.rpc_url))?;
    // Containers and disks are keyed by chain and marketplace as well as by order id.
    let containers = ProvisionerConfig {
        scope: market
            .scope()
            .await
            .context("identifying the marketplace")?,
        ..config.containers.clone()
    };
    let provisioner = Provisioner::connect(containers)
        .await
        .context("connecting to containerd")?;
    let mut gateway = Gateway::bind(config.clone(), market, provisioner).await?;
    eprintln!(
        "shale gateway on {} with host key {}",
        gateway.local_addr(),
        gateway.host_public_key()
    );
    let auto_accept = sp.sp.accept.auto;
    let mut settler_task = None;
    let mut follower = None;
    if sp.sp.settler.is_some() || auto_accept {
        let market = provider_market(&sp, &config).await?;
        let settler = match &sp.sp.settler {
            Some(s) => {
                let (settler, task) = start_settler(market.clone(), &config, s).await?;
                settler_task = Some(task);
                // The gateway tells it of every metered lease (claims then refresh the lease's
                // unpaid totals) and serves its metrics.
                gateway.attach_settler(settler.clone());
                Some(settler)
            }
            None => None,
        };
        let policy = auto_accept.then(|| sp.clone());
        follower = Some(tokio::spawn(follow_orders(market, settler, policy)));
    }
    let result = gateway.run(shutdown_signal()).await;
    if let Some(f) = follower {
        f.abort();
    }
    if let Some(task) = settler_task {
        task.shutdown().await;
    }
    result?;
    Ok(())
}

/// The marketplace with the provider's signing key.
async fn provider_market(sp: &SpConfig, config: &GatewayConfig) -> anyhow::Result<Marketplace> {
    let keystore = sp
        .sp
        .keystore
        .clone()
        .or_else(|| std::env::var_os("SHALE_KEYSTORE").map(Into::into));
    let key = crate::settings::load_signer(keystore.as_deref())
        .context("the settler and the accept policy sign with the provider's key")?;
    if key.address() != config.chain.provider {
        bail!(
            "the signing key is {:#x}, but the provider is {:#x}",
            key.address(),
            config.chain.provider
        );
    }
    Ok(
        Marketplace::connect(&config.chain.rpc_url, config.chain.marketplace, Some(key))
            .await?
            .with_poll_interval(config.chain.poll_interval),
    )
}

async fn start_settler(
    market: Marketplace,
    config: &GatewayConfig,
    settler_config: &SettlerConfig,
) -> anyhow::Result<(Settler, SettlerTask)> {
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
    Ok((settler, task))
}

/// Follows the marketplace: applies the accept policy (when given) to new orders, tracks this
/// provider's accepted orders in the settler, and wakes it when one ends.
async fn follow_orders(market: Marketplace, settler: Option<Settler>, policy: Option<SpConfig>) {
    let Some(provider) = market.sender() else {
        return;
    };
    let mut events = match market.watch().await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the marketplace; the settler only sees orders found at start");
            return;
        }
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(MarketEvent::OrderCreated {
                order_id,
                provider: p,
                ..
            }) if p == provider => {
                if let Some(sp) = &policy {
                    if let Err(e) = apply_policy(&market, sp, order_id).await {
                        tracing::error!(order = order_id, error = %e, "the accept policy failed");
                    }
                }
            }
            Ok(MarketEvent::OrderAccepted {
                order_id,
                provider: p,
                ..
            }) if p == provider => {
                if let Some(s) = &settler {
                    s.track(order_id, None);
                }
            }
            Ok(MarketEvent::OrderTerminated { .. }) => {
                if let Some(s) = &settler {
                    s.wake();
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "marketplace events unavailable"),
        }
    }
}

/// Accepts order `id` when it fits, or declines it (a refund to the client) with the reason.
async fn apply_policy(market: &Marketplace, sp: &SpConfig, id: u64) -> anyhow::Result<()> {
    let order = market.order(id).await?;
    if order.state != OrderState::Pending {
        return Ok(());
    }
    let me = market.provider(sp.gateway.chain.provider).await?;
    let now = market.chain_time().await?;
    let live: Vec<_> = crate::cmd::order::orders_of(market, me.address)
        .await?
        .into_iter()
        .filter(|o| o.provider == me.address && o.is_live_at(now))
        .collect();
    // The provisioner keeps the orders' disk images under its state directory.
    let disks = sp.gateway.containers.state_dir.join("disks");
    let host_disk = match crate::policy::host_disk(&disks) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(order = id, path = %disks.display(), error = %e, "cannot measure the host's free disk; checking the order's disk against the offer only");
            None
        }
    };
    let free = crate::policy::free_capacity(&me, &live, host_disk);
    let datasets = &sp.gateway.containers.datasets;
    match crate::policy::decide(&order, &me, free, |d| datasets.contains_key(d)) {
        Ok(()) => {
            market.accept(id).await?;
            tracing::info!(order = id, "accepted by the auto-accept policy");
        }
        Err(reason) => {
            market.cancel(id).await?;
            tracing::warn!(order = id, %reason, "declined by the auto-accept policy; the client is refunded");
        }
    }
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
