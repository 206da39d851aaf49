//! Bytes through each order's network interface: its own way to the internet (`pip install`,
//! `git clone`, VS Code's server download), not the SSH channels the meter bills. The
//! provisioner counts them per task, from zero at each start; this board turns those samples
//! into per-order totals that only grow, exports them as counters and records them in the
//! order's session-quality readings. Today's tariff does not bill them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use shale_meter::probe::Reading;
use shale_meter::Ledger;
use shale_provisioner::{Machines, Traffic};

use crate::login::OrderId;
use crate::metrics::{Metrics, OrderLabel};

/// The name of the session-quality readings this board records.
pub const PROBE_NAME: &str = "network";

/// How many orders' counters are read at once.
const SAMPLE_CONCURRENCY: usize = 8;

/// One order's running totals.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// The provisioner's last sample (bytes since the task started).
    last: Traffic,
    /// Everything seen since the board started watching the order.
    total: Traffic,
    /// When the totals last went to the ledger.
    recorded_at: Option<Instant>,
}

/// How much a counter that restarts from zero grew from `last` to `now`: the difference, or all
/// of `now` when it went down (the task restarted in between; whatever the old task moved after
/// the last sample is lost, so sampling before a stop keeps that small).
fn growth(last: u64, now: u64) -> u64 {
    now.checked_sub(last).unwrap_or(now)
}

/// The per-order interface byte totals, shared by the watcher and `/metrics`.
pub struct TrafficBoard {
    tallies: Mutex<HashMap<OrderId, Tally>>,
    egress: Family<OrderLabel, Counter>,
    ingress: Family<OrderLabel, Counter>,
}

impl TrafficBoard {
    /// A board that counts into `metrics`' network counters.
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            tallies: Mutex::default(),
            egress: metrics.order_network_egress_bytes.clone(),
            ingress: metrics.order_network_ingress_bytes.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<OrderId, Tally>> {
        // Plain numbers stay consistent even if a holder panicked: keep going.
        self.tallies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds what `sample` shows beyond the order's last one and returns its totals.
    pub fn observe(&self, order: OrderId, sample: Traffic) -> Traffic {
        let mut tallies = self.lock();
        let tally = tallies.entry(order).or_default();
        let egress = growth(tally.last.egress_bytes, sample.egress_bytes);
        let ingress = growth(tally.last.ingress_bytes, sample.ingress_bytes);
        tally.last = sample;
        tally.total.egress_bytes = tally.total.egress_bytes.saturating_add(egress);
        tally.total.ingress_bytes = tally.total.ingress_bytes.saturating_add(ingress);
        let label = OrderLabel {
            order: order.to_string(),
        };
        self.egress.get_or_create(&label).inc_by(egress);
        self.ingress.get_or_create(&label).inc_by(ingress);
        tally.total
    }

    /// The order's totals, if it was ever sampled.
    pub fn totals(&self, order: OrderId) -> Option<Traffic> {
        self.lock().get(&order).map(|t| t.total)
    }

    /// The totals to record now if none were recorded within `every`, marking them recorded.
    fn due(&self, order: OrderId, every: Duration) -> Option<Traffic> {
        let mut tallies = self.lock();
        let tally = tallies.get_mut(&order)?;
        if tally.recorded_at.is_some_and(|at| at.elapsed() < every) {
            return None;
        }
        tally.recorded_at = Some(Instant::now());
        Some(tally.total)
    }

    /// Forgets `order` and removes its series (its container is gone or stopped).
    pub fn forget(&self, order: OrderId) {
        self.lock().remove(&order);
        let label = OrderLabel {
            order: order.to_string(),
        };
        self.egress.remove(&label);
        self.ingress.remove(&label);
    }

    /// Forgets every order not in `held` (their containers went some other way).
    pub fn retain(&self, held: &HashSet<OrderId>) {
        let gone: Vec<OrderId> = self
            .lock()
            .keys()
            .filter(|id| !held.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.forget(id);
        }
    }

    /// Reads the counters of every order in `orders` and records each order's totals in its
    /// session-quality readings at most once per `record_every`.
    pub async fn sample(
        &self,
        provisioner: &Arc<dyn Machines>,
        ledger: &Ledger,
        orders: &[OrderId],
        record_every: Duration,
    ) {
        futures::stream::iter(orders)
            .for_each_concurrent(SAMPLE_CONCURRENCY, |&id| async move {
                match provisioner.traffic(id.0).await {
                    Ok(Some(sample)) => {
                        self.observe(id, sample);
                        if let Some(totals) = self.due(id, record_every) {
                            record(ledger, id, totals).await;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(order = id.0, error = %e, "cannot read the order's network counters")
                    }
                }
            })
            .await;
    }

    /// The last word on an order whose container is about to stop or go: one more sample while
    /// it still runs, its totals recorded, and the order forgotten.
    pub async fn finish(&self, provisioner: &Arc<dyn Machines>, ledger: &Ledger, order: OrderId) {
        if let Ok(Some(sample)) = provisioner.traffic(order.0).await {
            self.observe(order, sample);
        }
        if let Some(totals) = self.totals(order) {
            record(ledger, order, totals).await;
        }
        self.forget(order);
    }
}

/// Writes `totals` to the order's session-quality readings.
async fn record(ledger: &Ledger, order: OrderId, totals: Traffic) {
    let reading = Reading::Network {
        egress_bytes: totals.egress_bytes,
        ingress_bytes: totals.ingress_bytes,
    };
    if let Err(e) = ledger
        .record_probe(
            order.0,
            None,
            PROBE_NAME,
            shale_meter::ledger::now_ms(),
            &[reading],
        )
        .await
    {
        tracing::debug!(order = order.0, error = %e, "cannot record the order's network bytes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(egress_bytes: u64, ingress_bytes: u64) -> Traffic {
        Traffic {
            egress_bytes,
            ingress_bytes,
        }
    }

    fn counter(family: &Family<OrderLabel, Counter>, order: u64) -> u64 {
        family
            .get_or_create(&OrderLabel {
                order: order.to_string(),
            })
            .get()
    }

    #[test]
    fn growth_is_the_difference_or_everything_after_a_reset() {
        assert_eq!(growth(0, 0), 0);
        assert_eq!(growth(100, 150), 50);
        assert_eq!(growth(150, 40), 40);
        assert_eq!(growth(u64::MAX, 0), 0);
    }

    #[test]
    fn totals_only_grow_across_task_restarts() {
        let metrics = Metrics::default();
        let board = TrafficBoard::new(&metrics);
        let a = OrderId(7);
        assert_eq!(board.observe(a, traffic(100, 1_000)), traffic(100, 1_000));
        assert_eq!(board.observe(a, traffic(150, 1_000)), traffic(150, 1_000));
        // The task restarted: its counters began again at zero.
        assert_eq!(board.observe(a, traffic(30, 10)), traffic(180, 1_010));
        assert_eq!(board.observe(a, traffic(30, 20)), traffic(180, 1_020));
        assert_eq!(counter(&metrics.order_network_egress_bytes, 7), 180);
        assert_eq!(counter(&metrics.order_network_ingress_bytes, 7), 1_020);
        assert!(metrics
            .render()
            .contains("shale_order_network_egress_bytes_total{order=\"7\"} 180"));
    }

    #[test]
    fn orders_are_counted_apart_and_forgotten_with_their_series() {
        let metrics = Metrics::default();
        let board = TrafficBoard::new(&metrics);
        board.observe(OrderId(1), traffic(5, 6));
        board.observe(OrderId(2), traffic(7, 8));
        board.retain(&HashSet::from([OrderId(2)]));
        assert_eq!(board.totals(OrderId(1)), None);
        assert_eq!(board.totals(OrderId(2)), Some(traffic(7, 8)));
        let rendered = metrics.render();
        assert!(!rendered.contains("order=\"1\""), "{rendered}");
        assert!(rendered.contains("order=\"2\""), "{rendered}");
        // Seen again, an order starts from its new task's counters.
        assert_eq!(board.observe(OrderId(1), traffic(3, 4)), traffic(3, 4));
    }

    #[test]
    fn totals_are_due_for_the_ledger_once_per_interval() {
        let metrics = Metrics::default();
        let board = TrafficBoard::new(&metrics);
        let a = OrderId(3);
        assert_eq!(board.due(a, Duration::from_secs(600)), None);
        board.observe(a, traffic(1, 2));
        assert_eq!(board.due(a, Duration::from_secs(600)), Some(traffic(1, 2)));
        assert_eq!(board.due(a, Duration::from_secs(600)), None);
        assert_eq!(board.due(a, Duration::ZERO), Some(traffic(1, 2)));
    }
}
