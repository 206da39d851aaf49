//! What the gateway tells the rest of its process about its leases, on a channel it owns.
//!
//! The settler that `shale gateway` runs beside the gateway needs every metered lease's meter
//! (a claim refreshes the lease's unpaid totals, and a stopped meter means "claim everything
//! now") and a nudge when an order's final tick is stored. The gateway publishes those facts
//! here and knows nothing of who listens: with no subscriber an event is simply dropped.

use std::sync::Arc;

use shale_meter::LeaseMeter;
use tokio::sync::broadcast;

/// Events buffered for each subscriber; one that falls further behind loses the oldest and is
/// told so by [`broadcast::error::RecvError::Lagged`]. Subscribers only update a map per event,
/// so this is never reached in practice.
const CAPACITY: usize = 1024;

/// One change in the gateway's leases.
#[derive(Debug, Clone)]
pub enum LeaseEvent {
    /// `order`'s lease is metered: published at every session's start (the same meter again
    /// while the lease runs) and when a restarted gateway adopts the order's container. The
    /// channel drops its copy of the meter once every subscriber has received it; a subscriber
    /// that keeps it should hold a [`std::sync::Weak`], so as not to keep the lease ticking.
    Started {
        /// The order.
        order: u64,
        /// The lease's meter.
        lease: Arc<LeaseMeter>,
    },
    /// `order`'s billing ended (order ended or cancelled, escrow exhausted, network lost): its
    /// final tick is in the ledger, ready to claim.
    Ended {
        /// The order.
        order: u64,
    },
}

/// The sending half, which the gateway keeps; [`LeaseEvents::subscribe`] hands out receivers.
#[derive(Debug, Clone)]
pub struct LeaseEvents {
    sender: broadcast::Sender<LeaseEvent>,
}

impl Default for LeaseEvents {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }
}

impl LeaseEvents {
    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LeaseEvent> {
        self.sender.subscribe()
    }

    /// Publishes `event` to whoever subscribed.
    pub(crate) fn publish(&self, event: LeaseEvent) {
        // No subscriber is no error: a gateway runs without a settler too.
        let _ = self.sender.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_reach_every_subscriber_and_none_is_no_error() {
        let events = LeaseEvents::default();
        events.publish(LeaseEvent::Ended { order: 1 });
        let (mut a, mut b) = (events.subscribe(), events.subscribe());
        events.publish(LeaseEvent::Ended { order: 2 });
        for rx in [&mut a, &mut b] {
            assert!(matches!(rx.try_recv(), Ok(LeaseEvent::Ended { order: 2 })));
            assert!(
                rx.try_recv().is_err(),
                "the event before subscribing is not replayed"
            );
        }
    }
}
