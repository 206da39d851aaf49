//! Ends sessions when their order ends: driven by marketplace events, with a periodic re-check of
//! every order that has live sessions as the fallback for a missed event and for lease expiry.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shale_contracts::MarketEvent;

use crate::admission::{admit_order, Refusal};
use crate::gateway::Shared;
use crate::login::OrderId;

/// Runs until aborted.
pub async fn run(shared: Arc<Shared>, poll: Duration) {
    tokio::join!(
        follow_events(shared.clone()),
        recheck_live_orders(shared, poll)
    );
}

async fn follow_events(shared: Arc<Shared>) {
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
    if let MarketEvent::OrderTerminated { .. } = event {
        end_order(shared, id, &Refusal::Ended(id)).await;
    }
}

/// Re-reads every order with live sessions and ends those that may no longer be served.
async fn recheck_live_orders(shared: Arc<Shared>, poll: Duration) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for id in shared.board.orders() {
            shared.orders.invalidate(id).await;
            let verdict = match shared.orders.get(id).await {
                Ok(order) => admit_order(&order, shared.provider, crate::unix_now()),
                // An outage is not the client's fault: keep serving what was admitted.
                Err(Refusal::ChainUnavailable(_)) => Ok(()),
                Err(refusal) => Err(refusal),
            };
            if let Err(refusal) = verdict {
                end_order(&shared, id, &refusal).await;
            }
        }
    }
}

async fn end_order(shared: &Shared, id: OrderId, why: &Refusal) {
    if shared.board.session_count(id) > 0 {
        shared.board.cut(id, &why.to_string()).await;
    }
    if matches!(why, Refusal::Ended(_) | Refusal::Cancelled(_)) {
        if let Err(e) = shared.provisioner.release(id.0).await {
            tracing::warn!(order = id.0, error = %e, "releasing the ended order's container failed");
        }
    }
}
