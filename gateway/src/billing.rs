//! Money on the gateway's side: one lease meter per order (billing follows the lease, connected
//! or not), per-session records in the ledger, the escrow policy that warns users and then
//! cuts an order that can no longer pay, and the policy on bytes the client has not
//! acknowledged ([`crate::ack_policy`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use alloy_primitives::U256;
use shale_contracts::Order;
use shale_meter::{LeaseMeter, LeaseSpec, Ledger, Meter, MeterError, Tariff};

use crate::ack_policy::{AckPolicy, AckWatches};
use crate::config::AcknowledgmentConfig;
use crate::login::OrderId;
use crate::tasks::Tasks;

/// What the escrow still pays for, as of the last chain read and the meter's running totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runway {
    /// Escrow left on chain minus what the order owes and has not been claimed yet, in wei.
    pub funds: U256,
    /// Seconds the funds last at the current rate; `None` when nothing is being charged.
    pub seconds: Option<u64>,
}

impl Runway {
    /// Whether the order can no longer pay for another second.
    pub fn exhausted(&self) -> bool {
        self.funds.is_zero() || self.seconds == Some(0)
    }
}

/// What the escrow policy says about an order now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EscrowVerdict {
    /// Enough left; nothing to say.
    Fine,
    /// Below a warning threshold for the first time: tell the user this line.
    Warn(String),
    /// Nothing left: cut the sessions and stop the task.
    Exhausted,
}

/// The gateway's meters and ledger.
pub struct Billing {
    meter: Meter,
    ledger: Ledger,
    /// Serialises lease starts, so two sessions arriving together start one meter.
    starting: tokio::sync::Mutex<()>,
    /// Warning thresholds in seconds of runway, highest first.
    warn_at: Vec<u64>,
    /// The lowest threshold each order has been warned at.
    warned: Mutex<HashMap<OrderId, u64>>,
    /// Orders cut for lack of escrow, with the escrow seen then: refused at login until a top-up
    /// raises it, before any key is checked (so the reason reaches every client).
    exhausted: Mutex<HashMap<OrderId, U256>>,
    /// What is done about each connected order's unacknowledged bytes.
    acknowledgments: AckWatches,
}

impl Billing {
    /// Meters orders into `ledger`, warning at each of `warn_at` seconds of runway.
    pub fn new(meter: Meter, ledger: Ledger, mut warn_at: Vec<u64>) -> Self {
        warn_at.sort_unstable_by(|a, b| b.cmp(a));
        Self {
            meter,
            ledger,
            starting: tokio::sync::Mutex::new(()),
            warn_at,
            warned: Mutex::default(),
            exhausted: Mutex::default(),
            acknowledgments: AckWatches::new(AckPolicy::default()),
        }
    }

    /// Applies `config`'s policy to unacknowledged bytes instead of the default (tell only).
    /// Call before [`Billing::with_tasks`].
    pub fn with_ack_policy(mut self, config: &AcknowledgmentConfig) -> Self {
        self.acknowledgments = AckWatches::new(AckPolicy::new(config));
        self
    }

    /// Runs the per-order acknowledgment checks under the gateway's `tasks`, so that its
    /// shutdown ends and waits for them too.
    pub fn with_tasks(mut self, tasks: Tasks) -> Self {
        self.acknowledgments.set_tasks(tasks);
        self
    }

    /// The watches of connected orders' unacknowledged bytes.
    pub fn acknowledgments(&self) -> &AckWatches {
        &self.acknowledgments
    }

    /// The ledger (receipts, session records).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The meter of `order`, started now if it is not running (continuing its stored chain).
    pub async fn lease(&self, order: &Order, now: u64) -> Result<Arc<LeaseMeter>, MeterError> {
        if let Some(lease) = self.meter.lease(order.id).filter(|l| !l.is_stopped()) {
            return Ok(lease);
        }
        let _one_at_a_time = self.starting.lock().await;
        if let Some(lease) = self.meter.lease(order.id).filter(|l| !l.is_stopped()) {
            return Ok(lease);
        }
        if self.meter.lease(order.id).is_some() {
            // A stopped meter (escrow ran out, then a top-up): close it before starting anew.
            self.meter.end_lease(order.id).await?;
        }
        let tariff = Tariff::new(order.price_per_second, order.price_per_gib)?;
        let max_seconds = order.expires_at().map(|end| end.saturating_sub(now));
        self.meter
            .start_lease(LeaseSpec {
                order: order.id,
                tariff,
                max_seconds,
            })
            .await
    }

    /// The running meter of `order`, if any.
    pub fn running(&self, order: OrderId) -> Option<Arc<LeaseMeter>> {
        self.meter.lease(order.0)
    }

    /// The orders being metered now (connected or not).
    pub fn metered_orders(&self) -> Vec<OrderId> {
        self.meter
            .leases()
            .iter()
            .filter(|l| !l.is_stopped())
            .map(|l| OrderId(l.order()))
            .collect()
    }

    /// How long `order`'s escrow lasts, given what its meter owes.
    pub fn runway(&self, order: &Order) -> Option<Runway> {
        let lease = self.meter.lease(order.id)?;
        let totals = lease.totals();
        let funds = order.escrow.saturating_sub(totals.owed());
        let seconds = lease
            .tariff()
            .seconds_covered(funds, totals.recent_bytes_per_second);
        Some(Runway { funds, seconds })
    }

    /// Applies the escrow policy to `order` (read from chain just now).
    pub fn verdict(&self, order: &Order) -> EscrowVerdict {
        let Some(runway) = self.runway(order) else {
            return EscrowVerdict::Fine;
        };
        if runway.exhausted() {
            return EscrowVerdict::Exhausted;
        }
        let Some(seconds) = runway.seconds else {
            return EscrowVerdict::Fine;
        };
        let id = OrderId(order.id);
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        let already = warned.get(&id).copied().unwrap_or(u64::MAX);
        match self.warn_at.iter().copied().filter(|t| seconds <= *t).min() {
            Some(threshold) if threshold < already => {
                warned.insert(id, threshold);
                EscrowVerdict::Warn(format!(
                    "the escrow of order {id} pays for about {} more at the current rate; top it up with `shale order top-up {id}`",
                    human_duration(seconds)
                ))
            }
            _ => EscrowVerdict::Fine,
        }
    }

    /// Remembers that `order` ran out of escrow at `escrow` left on chain.
    pub fn mark_exhausted(&self, order: &Order) {
        self.exhausted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(OrderId(order.id), order.escrow);
    }

    /// Whether `order` ran out of escrow and has not been topped up since.
    pub fn still_exhausted(&self, order: &Order) -> bool {
        let mut exhausted = self.exhausted.lock().unwrap_or_else(|p| p.into_inner());
        match exhausted.get(&OrderId(order.id)) {
            Some(at) if order.escrow <= *at => true,
            Some(_) => {
                exhausted.remove(&OrderId(order.id));
                false
            }
            None => false,
        }
    }

    /// Ends `order`'s metering with a final tick and forgets its warnings.
    pub async fn end(&self, order: OrderId) {
        self.warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&order);
        if let Err(e) = self.meter.end_lease(order.0).await {
            tracing::warn!(order = order.0, error = %e, "the final tick could not be stored");
        }
    }

    /// Stops every meter with a final tick (shutdown).
    pub async fn shutdown(&self) {
        if let Err(e) = self.meter.shutdown().await {
            tracing::warn!(error = %e, "stopping the meters");
        }
    }
}

/// `90` -> "1 min 30 s", for people.
pub fn human_duration(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(42), "42 s");
        assert_eq!(human_duration(90), "1 min 30 s");
        assert_eq!(human_duration(7260), "2 h 1 min");
    }
}
