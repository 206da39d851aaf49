//! `shale gateway`: runs the SP's SSH gateway, and its settler, until SIGINT or SIGTERM.
//!
//! The settler (claims with Groth16 proofs, then settlement) runs in the same process when the
//! config has an `[sp.settler]` section, and the auto-accept policy when `[sp.accept] auto` is
//! set. Both sign with the provider's key (`[sp] keystore`, SHALE_KEYSTORE or
//! SHALE_PRIVATE_KEY). The process follows the marketplace's events once ([`follow_market`]) and
//! fans them out to the gateway's watcher, the settler and the accept policy. The settler claims
//! from the gateway's own ledger pool and learns of every lease the gateway meters, and of every
//! order whose billing ended, from the gateway's [`LeaseEvent`]s; its metrics are served on the
//! gateway's `/metrics`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use shale_contracts::{MarketEvent, Marketplace, OrderState};
use shale_gateway::{Gateway, GatewayConfig, LeaseEvent};
use shale_provisioner::{Provisioner, ProvisionerConfig};
use shale_settler::{Settler, SettlerConfig, SettlerTask};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::spconfig::SpConfig;

/// Marketplace events buffered for each of their consumers; one that falls further behind is
/// told how many it missed (and catches up its own way).
const MARKET_EVENTS: usize = 1024;

/// Loads the config (its `[sp]` section is the CLI's, the rest the gateway's), connects to the
/// chain and containerd, and serves.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let sp = SpConfig::load(config_path)?;
    let config = sp.gateway.clone();
    let market = Marketplace::connect(&config.chain.rpc_url, config.chain.marketplace, None)
        .await
        .with_context(|| {
            // The URL may carry the endpoint's API key: name its host only.
            let endpoint = Marketplace::redact_url(&config.chain.rpc_url);
            format!("connecting to the marketplace at {endpoint}")
        })?;
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
    let watched = market
        .clone()
        .with_poll_interval(config.chain.poll_interval);
    let mut gateway = Gateway::bind(config.clone(), market, provisioner).await?;
    eprintln!(
        "shale gateway on {} with host key {}",
        gateway.local_addr(),
        gateway.host_public_key()
    );
    // Every consumer subscribes before the follower starts, so none misses the first events.
    let (market_events, _) = broadcast::channel(MARKET_EVENTS);
    gateway.follow_market(market_events.subscribe());
    let mut tasks = Vec::new();
    let mut settler_task = None;
    if sp.sp.settler.is_some() || sp.sp.accept.auto {
        let market = provider_market(&sp, &config).await?;
        if let Some(s) = &sp.sp.settler {
            let (settler, task) = start_settler(market.clone(), &mut gateway, s).await?;
            settler_task = Some(task);
            tasks.push(tokio::spawn(feed_leases(
                settler.clone(),
                gateway.lease_events(),
            )));
            tasks.push(tokio::spawn(feed_market(
                settler,
                market_events.subscribe(),
            )));
        }
        if sp.sp.accept.auto {
            tasks.push(tokio::spawn(accept_orders(
                market,
                sp.clone(),
                market_events.subscribe(),
            )));
        }
    }
    tasks.push(tokio::spawn(follow_market(watched, market_events)));
    let result = gateway.run(shutdown_signal()).await;
    for task in tasks {
        task.abort();
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

/// Starts the settler on the gateway's own ledger pool, with its metrics on the gateway's
/// `/metrics`.
async fn start_settler(
    market: Marketplace,
    gateway: &mut Gateway,
    settler_config: &SettlerConfig,
) -> anyhow::Result<(Settler, SettlerTask)> {
    let settler = Settler::new(settler_config, market, gateway.ledger().clone())
        .await
        .context("starting the settler")?;
    match gateway.metrics_registry() {
        Some(registry) => settler.metrics().register(registry),
        None => tracing::warn!(
            "the gateway's metrics are shared already; the settler's are not on /metrics"
        ),
    }
    eprintln!(
        "settler proving claims for batch capacities {:?}",
        settler.capacities()
    );
    let task = settler.spawn();
    Ok((settler, task))
}

/// The process's one follower of the marketplace's events: each consumer (the gateway's
/// watcher, the settler, the accept policy) reads them from its own receiver of `events`.
async fn follow_market(market: Marketplace, events: broadcast::Sender<MarketEvent>) {
    let mut stream = loop {
        match market.watch().await {
            Ok(stream) => break stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch marketplace events yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    // The stream polls forever; an outage shows up as an error item between good ones.
    while let Some(event) = stream.next().await {
        match event {
            // No receiver left is no error: the gateway is shutting down.
            Ok(event) => drop(events.send(event)),
            Err(e) => tracing::warn!(error = %e, "marketplace events unavailable"),
        }
    }
}

/// Tells the settler of every lease the gateway meters, and that a lease stopped when an order's
/// billing ends (its final tick is stored, so everything is claimed now).
async fn feed_leases(settler: Settler, mut leases: broadcast::Receiver<LeaseEvent>) {
    loop {
        match leases.recv().await {
            Ok(LeaseEvent::Started { order }) => settler.track(order),
            Ok(LeaseEvent::Ended { order }) => settler.lease_stopped(order),
            Err(RecvError::Lagged(missed)) => {
                // The orders stay tracked from the chain; a missed end is claimed on the
                // settler's own schedule (the order's end on chain, or `max_wait_secs`).
                tracing::warn!(missed, "the settler missed lease events");
                settler.wake();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Hands the settler the marketplace's events: it tracks this provider's accepted orders and
/// claims at once when one ends.
async fn feed_market(settler: Settler, mut events: broadcast::Receiver<MarketEvent>) {
    loop {
        match events.recv().await {
            Ok(event) => settler.on_market_event(&event),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "the settler missed marketplace events; scanning the chain"
                );
                if let Err(e) = settler.discover().await {
                    tracing::warn!(error = %e, "cannot scan the chain for unsettled orders");
                }
                settler.wake();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Applies the accept policy to every new order for this provider, one at a time (each decision
/// counts the capacity the previous ones took).
async fn accept_orders(
    market: Marketplace,
    sp: SpConfig,
    mut events: broadcast::Receiver<MarketEvent>,
) {
    let Some(provider) = market.sender() else {
        return;
    };
    loop {
        match events.recv().await {
            Ok(MarketEvent::OrderCreated {
                order_id,
                provider: p,
                ..
            }) if p == provider => {
                if let Err(e) = apply_policy(&market, &sp, order_id).await {
                    tracing::error!(order = order_id, error = %e, "the accept policy failed");
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => tracing::error!(
                missed,
                "the accept policy missed marketplace events; accept any order left pending \
                 by hand with `shale sp accept`"
            ),
            Err(RecvError::Closed) => return,
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
    let limits = sp.sp.accept.limits()?;
    match crate::policy::decide(&order, &me, free, &limits, |d| datasets.contains_key(d)) {
        Ok(()) => {
            market.accept(id).await?;
            tracing::info!(order = id, "accepted by the auto-accept policy");
        }
        Err(reason) => {
            market.decline(id, &decline_text(&reason)).await?;
            tracing::warn!(order = id, %reason, "declined by the auto-accept policy; the client is refunded");
        }
    }
    Ok(())
}

/// The policy's reason as it goes on chain: at most the contract's cap, cut at a character.
fn decline_text(reason: &str) -> String {
    let max = Marketplace::MAX_DECLINE_REASON;
    if reason.len() <= max {
        return reason.to_string();
    }
    let mut end = max - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_is_cut_to_the_contracts_cap_at_a_character() {
        assert_eq!(decline_text("it asks for 9 GPUs"), "it asks for 9 GPUs");
        let long = "é".repeat(150);
        let cut = decline_text(&long);
        assert!(
            cut.len() <= Marketplace::MAX_DECLINE_REASON,
            "{}",
            cut.len()
        );
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with("éé"));
    }

    /// The policy against a real chain (anvil): an order that asks for more collateral than its
    /// escrow is declined on chain with the reason, the client reads that reason where
    /// `shale order create` waits, and an order that fits is accepted.
    #[tokio::test]
    async fn the_policy_declines_on_chain_and_the_client_is_told_why() {
        use shale_contracts::devnet::Devnet;
        use shale_contracts::{key_fingerprint, NewOrder, Offer, U256};

        let devnet = match Devnet::start().await {
            Ok(d) => d,
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true: anvil is required: {e}"
                );
                eprintln!("SKIPPED: {e} (scripts/setup.sh installs anvil)");
                return;
            }
        };
        let address = devnet
            .deploy_marketplace_with_test_verifier(&[16])
            .await
            .unwrap();
        let connect =
            |i: usize| Marketplace::connect(devnet.rpc_url(), address, Some(devnet.signer(i)));
        let sp_market = connect(1)
            .await
            .unwrap()
            .with_poll_interval(std::time::Duration::from_millis(50));
        let client = connect(2)
            .await
            .unwrap()
            .with_poll_interval(std::time::Duration::from_millis(50));
        let offer = Offer {
            cpus: 2,
            memory_mib: 1024,
            disk_mib: 1024,
            max_disk_mib: 8192,
            gpu_model: String::new(),
            gpu_count: 0,
            price_per_second: U256::from(1_000u32),
            price_per_gib: U256::from(1_000u32),
        };
        sp_market
            .register_provider("127.0.0.1:2222", "ssh-ed25519 AAAA", &offer, &[])
            .await
            .unwrap();
        let provider = sp_market
            .provider(sp_market.sender().unwrap())
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut text = crate::cmd::dev::gateway_toml(
            dir.path(),
            2222,
            9100,
            devnet.rpc_url(),
            address,
            provider.address,
            &dir.path().join("containerd.sock"),
            "shale-test",
            dir.path(),
        );
        text.push_str("\n[sp.accept]\nauto = true\nmax_hours = 2\nmin_escrow_hours = 1\n");
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, text).unwrap();
        let sp = SpConfig::load(&path).unwrap();

        // An hour at 1,000 wei a second is 3.6e6 wei of escrow.
        let order = |collateral: u64| {
            let mut o = NewOrder::for_offer(
                &provider,
                key_fingerprint(b"client key"),
                U256::from(4_000_000u64),
                3600,
            );
            o.collateral = U256::from(collateral);
            o
        };
        let greedy = client.create_order(&order(4_000_001)).await.unwrap();
        apply_policy(&sp_market, &sp, greedy).await.unwrap();
        let why = client.decline_reason(greedy).await.unwrap();
        assert_eq!(
            why.as_deref(),
            Some(
                "it asks for 0.000000000004000001 FIL of collateral, more than its escrow of \
                 0.000000000004 FIL"
            )
        );
        let err = crate::cmd::order::wait_for_acceptance(
            &client,
            greedy,
            std::time::Duration::from_secs(5),
            false,
        )
        .await
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("declined order")
                && format!("{err:#}").contains(why.as_deref().unwrap()),
            "{err:#}"
        );

        let fitting = client.create_order(&order(400_000)).await.unwrap();
        apply_policy(&sp_market, &sp, fitting).await.unwrap();
        assert_eq!(
            client.order(fitting).await.unwrap().state,
            OrderState::Active
        );
    }
}
