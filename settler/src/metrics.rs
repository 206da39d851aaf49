//! The settler's Prometheus metrics: a small struct of handles, which `shale gateway` registers
//! in the gateway's registry under the `settler_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Why a claim (or settlement) failed: a stable, short label such as `InvalidProof`,
/// `ClaimExceedsEscrow`, `outage`, `retries_exhausted`, `prove`, `chain_head_unknown`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    /// Why.
    pub reason: String,
}

/// An order, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrderLabel {
    /// The order id.
    pub order: u64,
}

/// Every metric the settler reports. Cheap to clone: clones share the same series.
#[derive(Clone, Debug)]
pub struct SettlerMetrics {
    /// Seconds to prove one batch (witness, FFTs and MSMs on the proving pool).
    pub proof_seconds: Histogram,
    /// Ticks in each proved batch.
    pub batch_ticks: Histogram,
    /// Gas used by each paid claim transaction.
    pub claim_gas: Histogram,
    /// Claims paid on chain (including those found mined but unrecorded after a restart).
    pub claims_paid: Counter,
    /// Failed claims and settlements, by reason.
    pub failures: Family<FailureLabel, Counter>,
    /// Metered bytes of each order that no acknowledgment or allowance covers yet: they are
    /// not claimable until the client's tunnel acknowledges them.
    pub unacknowledged_bytes: Family<OrderLabel, Gauge>,
    /// Bytes claimed after waiting `ack_wait_secs` that no acknowledgment or allowance covered:
    /// proved, but not paid (exported as `settler_forfeited_bytes_total`).
    pub forfeited_bytes: Counter,
}

impl Default for SettlerMetrics {
    fn default() -> Self {
        SettlerMetrics {
            // 50 ms .. ~14 min: a debug build at capacity 16 to a release build at 1024.
            proof_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 15)),
            // 1 .. 4096 ticks.
            batch_ticks: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            // 100k .. 1.6M gas; a claim with the real verifier costs about 250k.
            claim_gas: Histogram::new(exponential_buckets(100_000.0, 1.25, 13)),
            claims_paid: Counter::default(),
            failures: Family::default(),
            unacknowledged_bytes: Family::default(),
            forfeited_bytes: Counter::default(),
        }
    }
}

impl SettlerMetrics {
    /// Registers every metric under `settler_` in `registry` (e.g. the gateway's
    /// `shale_gateway` registry, giving `shale_gateway_settler_proof_seconds`).
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("settler");
        registry.register(
            "proof_seconds",
            "Seconds to prove one claim batch",
            self.proof_seconds.clone(),
        );
        registry.register(
            "batch_ticks",
            "Ticks in each proved claim batch",
            self.batch_ticks.clone(),
        );
        registry.register(
            "claim_gas",
            "Gas used by each paid claim transaction",
            self.claim_gas.clone(),
        );
        registry.register(
            "claims_paid",
            "Claims paid on chain",
            self.claims_paid.clone(),
        );
        registry.register(
            "failures",
            "Failed claims and settlements by reason",
            self.failures.clone(),
        );
        registry.register(
            "unacknowledged_bytes",
            "Metered bytes past the client's acknowledgments and the order's allowance",
            self.unacknowledged_bytes.clone(),
        );
        registry.register(
            "forfeited_bytes",
            "Claimed bytes no acknowledgment covered after the wait, so not paid",
            self.forfeited_bytes.clone(),
        );
    }

    /// Counts one failure.
    pub(crate) fn fail(&self, reason: &str) {
        self.failures
            .get_or_create(&FailureLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Failures counted so far with `reason` (for tests and the status command).
    pub fn failures_with(&self, reason: &str) -> u64 {
        self.failures
            .get_or_create(&FailureLabel {
                reason: reason.to_owned(),
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every settler series the shipped Grafana dashboard queries is one the settler exports
    /// under the gateway's prefix (the gateway checks the rest of the dashboard).
    #[test]
    fn the_grafana_dashboard_queries_only_exported_settler_metrics() {
        let mut registry = Registry::with_prefix("shale_gateway");
        let metrics = SettlerMetrics::default();
        metrics.register(&mut registry);
        // Label families render only once they hold a series: give each one.
        metrics.fail("x");
        metrics
            .unacknowledged_bytes
            .get_or_create(&OrderLabel { order: 1 })
            .set(1);
        let mut rendered = String::new();
        prometheus_client::encoding::text::encode(&mut rendered, &registry).unwrap();
        let families: std::collections::BTreeSet<&str> = rendered
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let dashboard = include_str!("../../gateway/grafana/shale-gateway.json");
        let mut checked = 0;
        for (i, _) in dashboard.match_indices("shale_gateway_settler_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_total", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                families.contains(family),
                "{name} is not exported; exported: {families:?}"
            );
            checked += 1;
        }
        assert!(checked >= 4, "the dashboard shows the settler's claims");
    }
}
