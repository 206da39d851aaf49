//! The gateway's Prometheus metrics. They are a layer the gateway's parts report to, rendered in
//! the Prometheus text format by the `/metrics` endpoint. Per-order gauges are rebuilt from the
//! live leases at every scrape, so an ended order's series disappear with it; the per-order
//! network counters are kept by [`crate::traffic`] and removed when the order's container goes.
//! The network's series are named `shale_…`, not `shale_gateway_…`: they describe the order's
//! network, which the provisioner owns, whichever process exports them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label set with one `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why (a stable, short label).
    pub reason: String,
}

/// A label set with one `kind` (channel type, outcome, direction).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What kind.
    pub kind: String,
}

/// A label set naming one order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrderLabel {
    /// The order id.
    pub order: String,
}

/// A label set naming one dataset.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatasetLabel {
    /// The dataset id.
    pub dataset: String,
}

/// A label set naming one order and a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrderDirectionLabel {
    /// The order id.
    pub order: String,
    /// `in` (client to container) or `out`.
    pub direction: String,
}

fn latency() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// The order network's series, under `shale_`.
    network_registry: Registry,
    /// Authenticated SSH sessions open now.
    pub sessions_active: Gauge,
    /// Authenticated SSH sessions since start.
    pub sessions_total: Counter,
    /// Sessions ended, by outcome.
    pub sessions_ended: Family<KindLabel, Counter>,
    /// TCP connections open now (authenticated or not).
    pub connections_active: Gauge,
    /// Refused logins, by reason.
    pub auth_failures: Family<ReasonLabel, Counter>,
    /// Channels opened, by type (`session`, `direct-tcpip`).
    pub channels_opened: Family<KindLabel, Counter>,
    /// Channel opens and requests refused past a cap, by reason.
    pub channels_refused: Family<ReasonLabel, Counter>,
    /// Connections accepted and not yet authenticated, now.
    pub unauthenticated: Gauge,
    /// Connections refused or closed before authentication, by reason (`max_startups`,
    /// `per_source`, `max_connections`, `login_grace_time`).
    pub preauth_refused: Family<ReasonLabel, Counter>,
    /// Calls the order directory made to the chain, by kind (`order`, `order_count`).
    pub chain_lookups: Family<KindLabel, Counter>,
    /// Bytes moved by ended sessions, by direction.
    pub bytes: Family<KindLabel, Counter>,
    /// Time from login to the order's container running.
    pub provisioning_seconds: Histogram,
    /// Time to start one process in a container.
    pub exec_seconds: Histogram,
    /// Escrow left on chain minus what is owed and unclaimed, per live order, in wei (as f64).
    pub order_funds_wei: Family<OrderLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Seconds the funds last at the current rate, per live order.
    pub order_runway_seconds: Family<OrderLabel, Gauge>,
    /// Metered bytes per live order and direction.
    pub order_bytes: Family<OrderDirectionLabel, Gauge>,
    /// Ticks written by each live order's meter since it started.
    pub order_ticks: Family<OrderLabel, Gauge>,
    /// The last tick's ledger write, in seconds.
    pub order_tick_write_seconds: Family<OrderLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// How late the last tick was stored after its time, in seconds.
    pub order_tick_lag_seconds: Family<OrderLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Metered bytes (in + out, live) past the newest acknowledgment, per order with sessions:
    /// what the acknowledgment policy compares with the order's byte allowance.
    pub order_unacknowledged_bytes: Family<OrderLabel, Gauge>,
    /// 1 while the acknowledgment policy pauses the order's transfers, per order with sessions.
    pub order_transfers_paused: Family<OrderLabel, Gauge>,
    /// SSH round-trip time, measured with keepalives.
    pub session_rtt_seconds: Histogram,
    /// CPUs seen from inside each live order's container (thousandths, quota if set).
    pub order_probe_millicpus: Family<OrderLabel, Gauge>,
    /// The memory limit seen from inside each live order's container.
    pub order_probe_memory_bytes: Family<OrderLabel, Gauge>,
    /// Memory of each GPU seen from inside each live order's container.
    pub order_probe_gpu_memory_bytes: Family<OrderGpuLabel, Gauge>,
    /// Bytes each order sent out through its network interface (not SSH channel bytes).
    pub order_network_egress_bytes: Family<OrderLabel, Counter>,
    /// Bytes each order received through its network interface.
    pub order_network_ingress_bytes: Family<OrderLabel, Counter>,
    /// Repairs of the orders' network by reconcile, by kind (`restored`, `orphan_removed`).
    pub network_repairs: Family<KindLabel, Counter>,
    /// Orders stopped because their network could not be restored.
    pub network_stopped_orders: Counter,
    /// Image pulls from registries, by outcome (`ok`, `failed`), mirrored from the broker.
    pub image_pulls: Family<KindLabel, Counter>,
    /// Bytes received from registries.
    pub image_pull_bytes: Counter,
    /// Seconds spent in finished pulls.
    pub image_pull_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Pulls running now.
    pub image_pulls_in_flight: Gauge,
    /// 1 while a piece dataset's last hash found bytes that are not its piece (orders for it
    /// are refused): the alert.
    pub dataset_mismatch: Family<DatasetLabel, Gauge>,
    /// When each piece dataset was last hashed, in Unix seconds.
    pub dataset_verified_timestamp_seconds: Family<DatasetLabel, Gauge>,
    /// The broker's counters as last mirrored: its own restart resets them.
    pulls_seen: std::sync::Mutex<shale_provisioner::PullStats>,
}

/// A label set naming one order's GPU.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrderGpuLabel {
    /// The order id.
    pub order: String,
    /// The GPU's index inside the container.
    pub gpu: String,
    /// Its model.
    pub model: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("shale_gateway");
        let m = Self {
            sessions_active: Gauge::default(),
            sessions_total: Counter::default(),
            sessions_ended: Family::default(),
            connections_active: Gauge::default(),
            auth_failures: Family::default(),
            channels_opened: Family::default(),
            channels_refused: Family::default(),
            unauthenticated: Gauge::default(),
            preauth_refused: Family::default(),
            chain_lookups: Family::default(),
            bytes: Family::default(),
            provisioning_seconds: latency(),
            exec_seconds: latency(),
            order_funds_wei: Family::default(),
            order_runway_seconds: Family::default(),
            order_bytes: Family::default(),
            order_ticks: Family::default(),
            order_tick_write_seconds: Family::default(),
            order_tick_lag_seconds: Family::default(),
            order_unacknowledged_bytes: Family::default(),
            order_transfers_paused: Family::default(),
            session_rtt_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            order_probe_millicpus: Family::default(),
            order_probe_memory_bytes: Family::default(),
            order_probe_gpu_memory_bytes: Family::default(),
            order_network_egress_bytes: Family::default(),
            order_network_ingress_bytes: Family::default(),
            network_repairs: Family::default(),
            network_stopped_orders: Counter::default(),
            image_pulls: Family::default(),
            image_pull_bytes: Counter::default(),
            image_pull_seconds: Counter::default(),
            image_pulls_in_flight: Gauge::default(),
            dataset_mismatch: Family::default(),
            dataset_verified_timestamp_seconds: Family::default(),
            pulls_seen: Default::default(),
            registry: Registry::default(),
            network_registry: Registry::default(),
        };
        registry.register(
            "image_pulls",
            "Image pulls from registries, by outcome",
            m.image_pulls.clone(),
        );
        registry.register(
            "image_pull_bytes",
            "Bytes received from image registries",
            m.image_pull_bytes.clone(),
        );
        registry.register(
            "image_pull_seconds",
            "Seconds spent in finished image pulls",
            m.image_pull_seconds.clone(),
        );
        registry.register(
            "image_pulls_in_flight",
            "Image pulls running now",
            m.image_pulls_in_flight.clone(),
        );
        registry.register(
            "dataset_mismatch",
            "1 while a piece dataset's bytes are not its piece CID (orders for it are refused)",
            m.dataset_mismatch.clone(),
        );
        registry.register(
            "dataset_verified_timestamp_seconds",
            "When each piece dataset was last hashed against its piece CID (Unix seconds)",
            m.dataset_verified_timestamp_seconds.clone(),
        );
        let mut network = Registry::with_prefix("shale");
        registry.register(
            "sessions_active",
            "Authenticated SSH sessions open now",
            m.sessions_active.clone(),
        );
        registry.register(
            "sessions",
            "Authenticated SSH sessions since start",
            m.sessions_total.clone(),
        );
        registry.register(
            "sessions_ended",
            "Sessions ended, by outcome",
            m.sessions_ended.clone(),
        );
        registry.register(
            "connections_active",
            "TCP connections open now",
            m.connections_active.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused logins by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "channels_opened",
            "Channels opened, by type",
            m.channels_opened.clone(),
        );
        registry.register(
            "channels_refused",
            "Channel opens and requests refused past a cap, by reason",
            m.channels_refused.clone(),
        );
        registry.register(
            "unauthenticated_connections",
            "Connections accepted and not yet authenticated",
            m.unauthenticated.clone(),
        );
        registry.register(
            "preauth_refused",
            "Connections refused or closed before authentication, by reason",
            m.preauth_refused.clone(),
        );
        registry.register(
            "chain_lookups",
            "Chain calls made by the order directory, by kind",
            m.chain_lookups.clone(),
        );
        registry.register(
            "bytes",
            "Bytes moved by ended sessions, by direction",
            m.bytes.clone(),
        );
        registry.register(
            "provisioning_seconds",
            "Login to the order's container running",
            m.provisioning_seconds.clone(),
        );
        registry.register(
            "exec_seconds",
            "Starting one process in a container",
            m.exec_seconds.clone(),
        );
        registry.register(
            "order_funds_wei",
            "Escrow left minus owed, per live order",
            m.order_funds_wei.clone(),
        );
        registry.register(
            "order_runway_seconds",
            "Seconds the escrow lasts at the current rate",
            m.order_runway_seconds.clone(),
        );
        registry.register(
            "order_bytes",
            "Metered bytes per live order and direction",
            m.order_bytes.clone(),
        );
        registry.register(
            "order_ticks",
            "Ticks written by the order's meter since it started",
            m.order_ticks.clone(),
        );
        registry.register(
            "order_tick_write_seconds",
            "The last tick's ledger write",
            m.order_tick_write_seconds.clone(),
        );
        registry.register(
            "order_tick_lag_seconds",
            "How late the last tick was stored",
            m.order_tick_lag_seconds.clone(),
        );
        registry.register(
            "order_unacknowledged_bytes",
            "Metered bytes past the newest acknowledgment, per order with sessions",
            m.order_unacknowledged_bytes.clone(),
        );
        registry.register(
            "order_transfers_paused",
            "1 while the order's transfers wait for an acknowledgment",
            m.order_transfers_paused.clone(),
        );
        registry.register(
            "session_rtt_seconds",
            "SSH round-trip time measured with keepalives",
            m.session_rtt_seconds.clone(),
        );
        registry.register(
            "order_probe_millicpus",
            "CPUs seen inside the order's container, in thousandths",
            m.order_probe_millicpus.clone(),
        );
        registry.register(
            "order_probe_memory_bytes",
            "Memory limit seen inside the order's container",
            m.order_probe_memory_bytes.clone(),
        );
        registry.register(
            "order_probe_gpu_memory_bytes",
            "GPU memory seen inside the order's container",
            m.order_probe_gpu_memory_bytes.clone(),
        );
        network.register(
            "order_network_egress_bytes",
            "Bytes the order sent out through its network interface",
            m.order_network_egress_bytes.clone(),
        );
        network.register(
            "order_network_ingress_bytes",
            "Bytes the order received through its network interface",
            m.order_network_ingress_bytes.clone(),
        );
        network.register(
            "network_repairs",
            "Repairs of the orders' network by reconcile, by kind",
            m.network_repairs.clone(),
        );
        network.register(
            "network_stopped_orders",
            "Orders stopped because their network could not be restored",
            m.network_stopped_orders.clone(),
        );
        Self {
            registry,
            network_registry: network,
            ..m
        }
    }
}

impl Metrics {
    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.network_registry))
            .and_then(|()| encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }

    /// Registers more metrics (e.g. the settler's) under the gateway's prefix.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts one event of `kind` in `family`.
    pub fn count(family: &Family<KindLabel, Counter>, kind: &str) {
        family
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Mirrors the broker's pull counters: adds what they grew by since the last look (all of
    /// them after the broker restarted and its counters began again).
    pub fn observe_pulls(&self, now: shale_provisioner::PullStats) {
        let mut seen = self.pulls_seen.lock().expect("pull counters");
        let restarted = now.pulls_ok < seen.pulls_ok
            || now.pulls_failed < seen.pulls_failed
            || now.bytes < seen.bytes;
        let before = if restarted {
            shale_provisioner::PullStats::default()
        } else {
            *seen
        };
        let pulls = |kind: &str| {
            self.image_pulls.get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
        };
        pulls("ok").inc_by(now.pulls_ok - before.pulls_ok);
        pulls("failed").inc_by(now.pulls_failed - before.pulls_failed);
        self.image_pull_bytes.inc_by(now.bytes - before.bytes);
        self.image_pull_seconds
            .inc_by((now.seconds - before.seconds).max(0.0));
        self.image_pulls_in_flight.set(now.in_flight as i64);
        *seen = now;
    }

    /// Mirrors the broker's datasets: a series for every piece dataset hashed so far.
    pub fn observe_datasets(&self, datasets: &[shale_provisioner::DatasetStatus]) {
        for d in datasets {
            let Some(last) = &d.last else { continue };
            let label = DatasetLabel {
                dataset: d.id.clone(),
            };
            self.dataset_mismatch
                .get_or_create(&label)
                .set(i64::from(!last.matches()));
            self.dataset_verified_timestamp_seconds
                .get_or_create(&label)
                .set(last.checked_at as i64);
        }
    }

    /// Adds one to `family`'s series for `reason`.
    pub fn count_reason(family: &Family<ReasonLabel, Counter>, reason: &str) {
        family
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_counters_follow_the_broker_across_its_restart() {
        let metrics = Metrics::default();
        let stats = |ok, bytes| shale_provisioner::PullStats {
            pulls_ok: ok,
            bytes,
            seconds: ok as f64,
            ..Default::default()
        };
        metrics.observe_pulls(stats(2, 1000));
        metrics.observe_pulls(stats(3, 1500));
        // The broker restarted: its counters began again at 0 and it has pulled once since.
        metrics.observe_pulls(stats(1, 200));
        let page = metrics.render();
        for line in [
            "shale_gateway_image_pulls_total{kind=\"ok\"} 4",
            "shale_gateway_image_pull_bytes_total 1700",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} not in\n{page}");
        }
    }

    #[test]
    fn the_networks_series_are_named_shale_and_the_page_ends_once() {
        let metrics = Metrics::default();
        Metrics::count(&metrics.network_repairs, "restored");
        metrics.network_stopped_orders.inc();
        metrics
            .order_network_ingress_bytes
            .get_or_create(&OrderLabel { order: "9".into() })
            .inc_by(42);
        metrics.sessions_total.inc();
        let page = metrics.render();
        for line in [
            "shale_network_repairs_total{kind=\"restored\"} 1",
            "shale_network_stopped_orders_total 1",
            "shale_order_network_ingress_bytes_total{order=\"9\"} 42",
            "shale_gateway_sessions_total 1",
        ] {
            assert!(page.lines().any(|l| l == line), "{line} not in\n{page}");
        }
        assert_eq!(page.matches("# EOF").count(), 1, "{page}");
        assert!(page.ends_with("# EOF\n"), "{page}");
    }

    /// Every series the shipped Grafana dashboard queries is one the gateway exports, except
    /// the settler's (`shale_gateway_settler_*`, registered here by `shale gateway`), which the
    /// settler crate checks against the same dashboard.
    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        let metrics = Metrics::default();
        // Label families render only once they hold a series: give each one.
        let kind = KindLabel { kind: "x".into() };
        let order = OrderLabel { order: "1".into() };
        metrics.sessions_ended.get_or_create(&kind).inc();
        metrics.channels_opened.get_or_create(&kind).inc();
        metrics.bytes.get_or_create(&kind).inc();
        metrics
            .auth_failures
            .get_or_create(&ReasonLabel { reason: "x".into() })
            .inc();
        metrics.order_funds_wei.get_or_create(&order).set(1.0);
        metrics.order_runway_seconds.get_or_create(&order).set(1);
        metrics
            .order_bytes
            .get_or_create(&OrderDirectionLabel {
                order: "1".into(),
                direction: "in".into(),
            })
            .set(1);
        metrics.order_ticks.get_or_create(&order).set(1);
        metrics
            .order_tick_write_seconds
            .get_or_create(&order)
            .set(1.0);
        metrics
            .order_tick_lag_seconds
            .get_or_create(&order)
            .set(1.0);
        metrics.order_probe_millicpus.get_or_create(&order).set(1);
        metrics
            .order_probe_memory_bytes
            .get_or_create(&order)
            .set(1);
        metrics
            .order_probe_gpu_memory_bytes
            .get_or_create(&OrderGpuLabel {
                order: "1".into(),
                gpu: "0".into(),
                model: "x".into(),
            })
            .set(1);
        let rendered = metrics.render();
        let families: std::collections::BTreeSet<&str> = rendered
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let dashboard = include_str!("../grafana/shale-gateway.json");
        let mut checked = 0;
        for (i, _) in dashboard.match_indices("shale_gateway_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.starts_with("shale_gateway_settler_") {
                continue;
            }
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
        assert!(checked > 10);
    }
}
