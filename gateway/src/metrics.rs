//! The gateway's Prometheus metrics. They are a layer the gateway's parts report to, rendered in
//! the Prometheus text format by the `/metrics` endpoint.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A label set with one `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why (a stable, short label).
    pub reason: String,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Authenticated SSH sessions open now.
    pub sessions_active: Gauge,
    /// Authenticated SSH sessions since start.
    pub sessions_total: Counter,
    /// TCP connections open now (authenticated or not).
    pub connections_active: Gauge,
    /// Refused logins, by reason.
    pub auth_failures: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("shale_gateway");
        let sessions_active = Gauge::default();
        let sessions_total = Counter::default();
        let connections_active = Gauge::default();
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "sessions_active",
            "Authenticated SSH sessions open now",
            sessions_active.clone(),
        );
        registry.register(
            "sessions",
            "Authenticated SSH sessions since start",
            sessions_total.clone(),
        );
        registry.register(
            "connections_active",
            "TCP connections open now",
            connections_active.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused logins by reason",
            auth_failures.clone(),
        );
        Self {
            registry,
            sessions_active,
            sessions_total,
            connections_active,
            auth_failures,
        }
    }
}

impl Metrics {
    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
