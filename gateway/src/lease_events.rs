//! What the gateway tells others about its leases, on a channel it owns.
//!
//! The settler that claims the leases' ticks holds the wallet key, so it may run in another
//! process than the gateway: it needs to know which orders are metered and when an order's
//! final tick is stored ("claim everything now"). The gateway publishes those facts here as
//! plain order ids, each [`LeaseEvent`] one JSON line when it crosses a process boundary, and
//! knows nothing of who listens: with no subscriber an event is simply dropped. No meter crosses:
//! the gateway refreshes its meters' unpaid totals itself when a claim lands on chain.

use tokio::sync::broadcast;

/// Events buffered for each subscriber; one that falls further behind loses the oldest and is
/// told so by [`broadcast::error::RecvError::Lagged`]. Subscribers only update a map per event,
/// so this is never reached in practice.
const CAPACITY: usize = 1024;

/// One change in the gateway's leases: a fact about an order, for a listener in this process
/// or another (`{"started":{"order":42}}`, `{"ended":{"order":42}}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseEvent {
    /// `order`'s lease is metered: published at every session's start (again while the lease
    /// runs) and when a restarted gateway adopts the order's container.
    Started {
        /// The order.
        order: u64,
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

    #[test]
    fn an_event_is_one_json_line_and_reads_back_the_same() {
        for (event, line) in [
            (
                LeaseEvent::Started { order: 42 },
                r#"{"started":{"order":42}}"#,
            ),
            (LeaseEvent::Ended { order: 7 }, r#"{"ended":{"order":7}}"#),
        ] {
            assert_eq!(serde_json::to_string(&event).unwrap(), line);
            assert_eq!(serde_json::from_str::<LeaseEvent>(line).unwrap(), event);
        }
    }
}
