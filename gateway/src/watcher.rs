//! Ends sessions when their order ends: driven by marketplace events, with a periodic re-check of
//! every order that has live sessions, is billed, or has a container, as the fallback for a
//! missed event and for lease expiry. An order nobody is connected to is released on time too:
//! its container, GPUs, disk and uid range go back within one poll of its lease's end.
//!
//! Every few polls the orders' network is reconciled (links and rules deleted by hand restored,
//! an order that cannot be restored ended like any stopped order, leftovers removed) and each
//! order's interface counters are read into [`crate::traffic`].
//!
//! A claim paid on chain (`Claimed`) makes the order's lease meter re-read its unclaimed totals
//! from the ledger: the escrow read from chain already lost the claim's amount, so a meter still
//! counting those ticks as owed would understate the runway and could end a funded lease.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shale_contracts::MarketEvent;
use shale_meter::ledger::ClaimStatus;
use shale_meter::{LeaseMeter, Ledger, MeterError};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::admission::{admit_order, Refusal};
use crate::billing::EscrowVerdict;
use crate::login::OrderId;
use crate::metrics::{KindLabel, Metrics};
use crate::quality::PROBE_EVERY;
use crate::repeated::RepeatedFailure;
use crate::shared::Shared;

/// The orders' network is checked once every this many polls: its rules rarely change, and
/// reading every order's counters is not free.
const NETWORK_EVERY_POLLS: u32 = 5;

/// How often, and how many times, a claim seen on chain looks for its confirmation in the
/// ledger before the lease meter re-reads its totals anyway (about 30 s in all). The settler
/// marks a claim confirmed only once it holds the transaction's receipt, which can come after
/// the chain's event reaches the gateway.
const CLAIM_CONFIRM_POLL: Duration = Duration::from_millis(250);
const CLAIM_CONFIRM_TRIES: u32 = 120;

/// Runs until the gateway stops (under its `tasks`). With `market_events` (from a follower the process already runs), the
/// watcher reads the marketplace's events from there rather than following the chain itself.
/// Live sessions' bytes are checkpointed into the ledger every `checkpoint_every` (the meter's
/// tick interval), so a gateway that dies loses no more of a session's record than of its ticks.
pub async fn run(
    shared: Arc<Shared>,
    poll: Duration,
    checkpoint_every: Duration,
    market_events: Option<broadcast::Receiver<MarketEvent>>,
) {
    tokio::join!(
        follow_events(shared.clone(), market_events),
        recheck_live_orders(shared.clone(), poll),
        checkpoint_sessions(shared.clone(), checkpoint_every),
        watch_network(shared, poll * NETWORK_EVERY_POLLS)
    );
}

/// Writes every metered live session's bytes so far into the ledger, every `every`.
async fn checkpoint_sessions(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failure = RepeatedFailure::new("cannot checkpoint the live sessions");
    loop {
        tick.tick().await;
        let live = shared.board.checkpoints();
        match shared
            .billing
            .ledger()
            .checkpoint_sessions(shale_meter::ledger::now_ms(), &live)
            .await
        {
            Ok(()) => failure.succeeded(),
            Err(e) => {
                failure.failed(&e);
            }
        }
    }
}

async fn follow_events(
    shared: Arc<Shared>,
    market_events: Option<broadcast::Receiver<MarketEvent>>,
) {
    if let Some(mut events) = market_events {
        loop {
            match events.recv().await {
                Ok(event) => on_event(&shared, event).await,
                // What was missed is caught by the periodic re-check of every live order.
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "marketplace events missed; the periodic re-check catches up"
                    )
                }
                Err(RecvError::Closed) => break,
            }
        }
        tracing::warn!("the process's marketplace follower stopped; following the chain here");
    }
    let mut events = loop {
        match shared.orders.market().watch().await {
            Ok(events) => break events,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch marketplace events yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    // The stream polls forever; an outage shows up as an error item between good ones.
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => on_event(&shared, event).await,
            Err(e) => tracing::warn!(error = %e, "marketplace events unavailable"),
        }
    }
}

async fn on_event(shared: &Shared, event: MarketEvent) {
    let Some(id) = event.order_id() else {
        return;
    };
    let id = OrderId(id);
    shared.orders.invalidate(id).await;
    match event {
        MarketEvent::OrderTerminated { .. } => end_order(shared, id, &Refusal::Ended(id)).await,
        MarketEvent::Claimed { head, .. } => refresh_claims(shared, id, head),
        _ => {}
    }
}

/// Has `id`'s live lease meter (if this gateway has one) re-read its unclaimed totals once the
/// claim that paid up to `head` is confirmed in the ledger, in the background: the event loop
/// does not wait on the ledger.
fn refresh_claims(shared: &Shared, id: OrderId, head: [u8; 32]) {
    let Some(lease) = shared.billing.running(id) else {
        return;
    };
    let ledger = shared.billing.ledger().clone();
    shared.tasks.spawn_until_stopped(refresh_when_confirmed(
        ledger,
        lease,
        id.0,
        head,
        CLAIM_CONFIRM_POLL,
        CLAIM_CONFIRM_TRIES,
    ));
}

/// Waits (`tries` looks, `poll` apart) until `ledger` holds the claim of `order` that paid up
/// to `head` as confirmed, since the meter counts only confirmed claims, then has `lease`
/// re-read its unclaimed totals. It re-reads them anyway if the claim never shows up confirmed
/// (a claim from another ledger, a settler that crashed before recording it).
async fn refresh_when_confirmed(
    ledger: Ledger,
    lease: Arc<LeaseMeter>,
    order: u64,
    head: [u8; 32],
    poll: Duration,
    tries: u32,
) {
    for _ in 0..tries {
        match ledger.claims(order).await {
            Ok(claims)
                if claims
                    .iter()
                    .any(|c| c.head.0 == head && c.status == ClaimStatus::Confirmed) =>
            {
                break
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(order, error = %e, "cannot read the order's claims; refreshing the lease meter anyway");
                break;
            }
        }
        tokio::time::sleep(poll).await;
    }
    match lease.refresh_claims().await {
        // A stopped meter bills nothing more: its totals no longer matter.
        Ok(()) | Err(MeterError::LeaseStopped { .. }) => {}
        Err(e) => {
            tracing::warn!(order, error = %e, "lease meter did not re-read its claims after a claim was paid")
        }
    }
}

/// Re-reads every live order (sessions open or lease billed) and ends those that may no longer
/// be served.
async fn recheck_live_orders(shared: Arc<Shared>, poll: Duration) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listing = RepeatedFailure::new("cannot list the orders' containers");
    loop {
        tick.tick().await;
        // Orders with sessions, orders still billed with nobody connected, and orders that hold
        // a container (running or stopped) whatever the gateway remembers of them.
        let mut live: Vec<OrderId> = shared.board.orders();
        live.extend(shared.billing.metered_orders());
        match shared.provisioner.orders().await {
            Ok(held) => {
                listing.succeeded();
                live.extend(held.into_iter().map(OrderId));
            }
            Err(e) => {
                listing.failed(&e);
            }
        }
        live.sort_unstable();
        live.dedup();
        for id in live {
            // Read again, but keep the cached order: it is what serves logins in an outage.
            let order = match shared.orders.reread(id).await {
                Ok(order) => order,
                // An outage is not the client's fault: keep serving what was admitted.
                Err(Refusal::ChainUnavailable(_)) => continue,
                Err(refusal) => {
                    end_order(&shared, id, &refusal).await;
                    continue;
                }
            };
            if let Err(refusal) = admit_order(&order, shared.provider, crate::unix_now()) {
                end_order(&shared, id, &refusal).await;
                continue;
            }
            // What the client gets is checked again during the lease, not only at its start.
            if shared.billing.running(id).is_some() && shared.quality.due(id, PROBE_EVERY) {
                shared
                    .tasks
                    .spawn_until_stopped(shared.quality.clone().probe(
                        shared.provisioner.clone(),
                        shared.billing.ledger().clone(),
                        id,
                        "periodic".into(),
                    ));
            }
            match shared.billing.verdict(&order) {
                EscrowVerdict::Fine => {}
                EscrowVerdict::Warn(line) => shared.board.notify(id, &line).await,
                EscrowVerdict::Exhausted => {
                    shared.billing.mark_exhausted(&order);
                    end_order(&shared, id, &Refusal::EscrowExhausted(id)).await;
                }
            }
        }
    }
}

/// Cuts `id`'s sessions with `why`, stops billing, and stops or releases its container: an order
/// out of escrow keeps its volume (a top-up resumes it), an ended one is released.
async fn end_order(shared: &Shared, id: OrderId, why: &Refusal) {
    if shared.board.session_count(id) > 0 {
        shared.board.cut(id, why).await;
    }
    let running = shared.billing.running(id).is_some();
    shared.billing.end(id).await;
    shared.quality.forget(id);
    // The final tick is stored: whoever claims it may do so now.
    shared
        .lease_events
        .publish(crate::lease_events::LeaseEvent::Ended { order: id.0 });
    let finish_traffic = || {
        shared
            .traffic
            .finish(&shared.provisioner, shared.billing.ledger(), id)
    };
    let result = match why {
        Refusal::Ended(_) | Refusal::Cancelled(_) => {
            finish_traffic().await;
            shared.provisioner.release(id.0).await
        }
        Refusal::EscrowExhausted(_) if running => {
            finish_traffic().await;
            shared.provisioner.stop(id.0).await
        }
        // The provisioner stopped the container already.
        Refusal::NetworkLost { .. } => {
            finish_traffic().await;
            Ok(())
        }
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(order = id.0, error = %e, "stopping the order's container failed");
    }
}

/// Every `every`: reconciles the orders' network, then reads each held order's interface
/// counters (recorded in its session-quality readings once per [`PROBE_EVERY`]), and mirrors
/// the broker's image pulls and dataset checks onto `/metrics`.
async fn watch_network(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconciling = RepeatedFailure::new("cannot reconcile the orders' network");
    loop {
        // The first tick is at once: after a restart, leftovers go before anything is counted.
        tick.tick().await;
        repair_network(&shared, &mut reconciling).await;
        if let Ok(pulls) = shared.provisioner.pull_stats().await {
            shared.metrics.observe_pulls(pulls);
        }
        if let Ok(datasets) = shared.provisioner.datasets().await {
            shared.metrics.observe_datasets(&datasets);
        }
        let held: Vec<OrderId> = match shared.provisioner.orders().await {
            Ok(held) => held.into_iter().map(OrderId).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the orders' containers");
                continue;
            }
        };
        shared.traffic.retain(&held.iter().copied().collect());
        shared
            .traffic
            .sample(
                &shared.provisioner,
                shared.billing.ledger(),
                &held,
                PROBE_EVERY,
            )
            .await;
    }
}

/// One reconcile of the orders' network, logged and counted; an order the provisioner had to
/// stop is ended like any other stopped order, its users told why.
async fn repair_network(shared: &Shared, failure: &mut RepeatedFailure) {
    let repaired = match shared.provisioner.reconcile_network().await {
        Ok(repaired) => {
            failure.succeeded();
            repaired
        }
        Err(e) => {
            failure.failed(&e);
            return;
        }
    };
    for &order in &repaired.restored {
        tracing::warn!(
            order,
            "restored the order's network: its link or rules had gone"
        );
        Metrics::count(&shared.metrics.network_repairs, "restored");
    }
    if repaired.orphans_removed > 0 {
        tracing::info!(
            removed = repaired.orphans_removed,
            "removed network links left by orders that no longer run"
        );
        shared
            .metrics
            .network_repairs
            .get_or_create(&KindLabel {
                kind: "orphan_removed".into(),
            })
            .inc_by(repaired.orphans_removed as u64);
    }
    for (order, reason) in repaired.stopped {
        tracing::warn!(order, %reason, "stopped an order whose network could not be restored");
        shared.metrics.network_stopped_orders.inc();
        let id = OrderId(order);
        end_order(shared, id, &Refusal::NetworkLost { order: id, reason }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::U256;
    use shale_meter::ledger::NewClaim;
    use shale_meter::{Deployment, LeaseSpec, Meter, MeterConfig, Tariff, TickChain, Usage};

    /// The chain's `Claimed` event can reach the gateway before the settler, holding the
    /// receipt, marks the claim confirmed: the meter re-reads its totals only after that.
    #[tokio::test]
    async fn a_claim_seen_on_chain_refreshes_the_meter_once_the_ledger_confirms_it() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&format!("sqlite://{}", dir.path().join("l.db").display()))
            .await
            .unwrap();
        let deployment = Deployment::new(31337, [7; 20]);
        let tariff = Tariff::new(U256::from(1u64), U256::from(1u64)).unwrap();
        let order = 5;
        let mut chain = TickChain::genesis(deployment.order_key(order), tariff);
        let mut ticks = Vec::new();
        for _ in 0..3 {
            let tick = chain.prepare(
                shale_meter::ledger::now_ms(),
                Usage {
                    seconds: 5,
                    bytes_in: 10,
                    bytes_out: 20,
                },
            );
            ledger.append_tick(&deployment, &tick).await.unwrap();
            chain.commit(&tick).unwrap();
            ticks.push(tick);
        }
        let meter = Meter::new(
            ledger.clone(),
            deployment,
            &MeterConfig {
                tick_interval_secs: 3_600,
                ledger_url: None,
            },
        )
        .unwrap();
        let lease = meter
            .start_lease(LeaseSpec {
                order,
                tariff,
                max_seconds: None,
            })
            .await
            .unwrap();
        assert_eq!(lease.totals().unclaimed.seconds, 15);

        // The settler sent a claim of the first two ticks; the chain paid it.
        let claim = ledger
            .record_claim(&NewClaim {
                order,
                first_seq: 0,
                last_seq: 1,
                amount: U256::from(1u64),
                tx_hash: None,
                status: ClaimStatus::Submitted,
            })
            .await
            .unwrap();
        let head = ticks[1].head.0;
        let refresh = tokio::spawn(refresh_when_confirmed(
            ledger.clone(),
            lease.clone(),
            order,
            head,
            Duration::from_millis(20),
            500,
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !refresh.is_finished(),
            "waits for the ledger to confirm the claim"
        );
        assert_eq!(lease.totals().unclaimed.seconds, 15);

        ledger
            .set_claim_status(claim.claim_id, ClaimStatus::Confirmed, Some("0xabc"))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), refresh)
            .await
            .expect("refreshes once confirmed")
            .unwrap();
        assert_eq!(lease.totals().unclaimed.seconds, 5);
        lease.stop().await.unwrap();
    }
}
