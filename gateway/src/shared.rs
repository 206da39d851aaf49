//! What every part of the gateway shares: the order directory, the provisioner, the live
//! sessions, billing, metrics and the gateway's tasks.
//!
//! A leaf of the gateway's own modules: the accept loop ([`crate::gateway`]), the connections,
//! the watcher and `/metrics` all read it, and it reads none of them, so no module cycles
//! through another to reach the state they share.

use std::sync::Arc;

use alloy_primitives::Address;
use shale_meter::probe::Reading;
use shale_provisioner::Machines;

use crate::billing::Billing;
use crate::forward::ForwardSlots;
use crate::lease_events::{LeaseEvent, LeaseEvents};
use crate::leases::LeaseBoard;
use crate::metrics::{
    KindLabel, Metrics, OrderDirectionLabel, OrderGpuLabel, OrderLabel, ReasonLabel,
};
use crate::orders::OrderDirectory;
use crate::policy::EnvPolicy;
use crate::ratelimit::FailureLimiter;
use crate::tasks::Tasks;

/// What every connection of the gateway shares.
pub struct Shared {
    /// This SP's provider address.
    pub provider: Address,
    /// Cached order lookups.
    pub orders: OrderDirectory,
    /// Containers of orders.
    pub provisioner: Arc<dyn Machines>,
    /// Live sessions by order.
    pub board: LeaseBoard,
    /// Failed logins by address.
    pub limiter: FailureLimiter,
    /// Which environment variables clients may set.
    pub env_policy: Arc<EnvPolicy>,
    /// Session channels one connection may have open at once.
    pub max_channels: usize,
    /// Forwards open per order, against their cap.
    pub forwards: ForwardSlots,
    /// Whether channel bytes are counted (see `SessionConfig::count_bytes`).
    pub count_bytes: bool,
    /// Exported metrics.
    pub metrics: Metrics,
    /// Meters, ledger and the escrow policy.
    pub billing: Billing,
    /// The latest session-quality readings per order.
    pub quality: Arc<crate::quality::QualityBoard>,
    /// Bytes through each order's network interface.
    pub traffic: crate::traffic::TrafficBoard,
    /// Where the gateway publishes each lease it meters and each order whose billing ended
    /// (for the settler that `shale gateway` runs beside it).
    pub lease_events: LeaseEvents,
    /// What checks the clients' acknowledgments of usage (`shale-ack`).
    pub acks: crate::ack_channel::AckDesk,
    /// Whether exec command lines are logged whole (`[log] audit_commands`); otherwise only the
    /// program is, since clients pass secrets in arguments.
    pub audit_commands: bool,
    /// The gateway's cancellation token and task tracker: every task the gateway spawns is
    /// spawned here, so that shutdown can end and wait for all of them.
    pub tasks: Tasks,
}

impl Shared {
    pub(crate) fn metrics_auth_failure(&self, reason: &str) {
        self.metrics
            .auth_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn metrics_session_started(&self) {
        self.metrics.sessions_active.inc();
        self.metrics.sessions_total.inc();
    }

    pub(crate) fn metrics_session_ended(&self, bytes: shale_meter::ByteCount) {
        self.metrics.sessions_active.dec();
        Metrics::count(&self.metrics.sessions_ended, "closed");
        self.metrics
            .bytes
            .get_or_create(&KindLabel { kind: "in".into() })
            .inc_by(bytes.bytes_in);
        self.metrics
            .bytes
            .get_or_create(&KindLabel { kind: "out".into() })
            .inc_by(bytes.bytes_out);
    }

    /// Starts (or finds) `order`'s lease meter and publishes a [`LeaseEvent::Started`], so that
    /// whoever claims the lease's ticks looks after the order.
    pub async fn start_billing(
        &self,
        order: &shale_contracts::Order,
    ) -> Result<Arc<shale_meter::LeaseMeter>, shale_meter::MeterError> {
        let lease = self.billing.lease(order, crate::unix_now()).await?;
        self.lease_events
            .publish(LeaseEvent::Started { order: order.id });
        Ok(lease)
    }

    /// Rebuilds the per-order series from the live leases (called at each scrape).
    pub async fn refresh_metrics(&self) {
        let m = &self.metrics;
        m.order_funds_wei.clear();
        m.order_runway_seconds.clear();
        m.order_bytes.clear();
        m.order_ticks.clear();
        m.order_tick_write_seconds.clear();
        m.order_tick_lag_seconds.clear();
        m.order_probe_millicpus.clear();
        m.order_probe_memory_bytes.clear();
        m.order_probe_gpu_memory_bytes.clear();
        for (id, readings) in self.quality.snapshot() {
            let label = OrderLabel {
                order: id.to_string(),
            };
            for reading in readings {
                match reading {
                    Reading::CpuCount {
                        online,
                        quota_millicpus,
                    } => {
                        let millis = quota_millicpus.unwrap_or(u64::from(online) * 1000);
                        m.order_probe_millicpus
                            .get_or_create(&label)
                            .set(i64::try_from(millis).unwrap_or(i64::MAX));
                    }
                    Reading::MemoryLimit {
                        limit_bytes,
                        total_bytes,
                    } => {
                        let bytes = limit_bytes.unwrap_or(total_bytes);
                        m.order_probe_memory_bytes
                            .get_or_create(&label)
                            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    }
                    Reading::Gpu {
                        index,
                        model,
                        memory_mib,
                    } => {
                        m.order_probe_gpu_memory_bytes
                            .get_or_create(&OrderGpuLabel {
                                order: id.to_string(),
                                gpu: index.to_string(),
                                model,
                            })
                            .set(i64::try_from(memory_mib << 20).unwrap_or(i64::MAX));
                    }
                    // Interface bytes are exported as counters by the traffic board.
                    Reading::RoundTrip { .. } | Reading::Network { .. } => {}
                }
            }
        }
        for id in self.billing.metered_orders() {
            let Some(lease) = self.billing.running(id) else {
                continue;
            };
            let totals = lease.totals();
            let label = OrderLabel {
                order: id.to_string(),
            };
            if let Ok(order) = self.orders.get(id).await {
                if let Some(runway) = self.billing.runway(&order) {
                    m.order_funds_wei
                        .get_or_create(&label)
                        .set(f64::from(runway.funds));
                    if let Some(secs) = runway.seconds {
                        m.order_runway_seconds
                            .get_or_create(&label)
                            .set(i64::try_from(secs).unwrap_or(i64::MAX));
                    }
                }
            }
            let bytes = lease.counter().bytes();
            for (direction, value) in [("in", bytes.bytes_in), ("out", bytes.bytes_out)] {
                m.order_bytes
                    .get_or_create(&OrderDirectionLabel {
                        order: id.to_string(),
                        direction: direction.into(),
                    })
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
            m.order_ticks
                .get_or_create(&label)
                .set(i64::try_from(totals.ticks_written).unwrap_or(i64::MAX));
            if let Some(us) = totals.last_write_micros {
                m.order_tick_write_seconds
                    .get_or_create(&label)
                    .set(us as f64 / 1e6);
            }
            if let Some(us) = totals.last_lag_micros {
                m.order_tick_lag_seconds
                    .get_or_create(&label)
                    .set(us as f64 / 1e6);
            }
        }
    }
}
