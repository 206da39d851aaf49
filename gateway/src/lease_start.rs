//! The order's container is started once per connection, as soon as the client is authenticated,
//! and every channel waits on the same start.

use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use prometheus_client::metrics::histogram::Histogram;
use shale_contracts::Order;
use shale_provisioner::{LeaseSpec, Machines, ProvisionError};

use crate::tasks::Tasks;

/// A shared, cloneable wait for the order's container to be running.
#[derive(Clone)]
pub struct LeaseStart {
    started: Shared<BoxFuture<'static, Result<(), Arc<ProvisionError>>>>,
    spec: Arc<LeaseSpec>,
}

impl LeaseStart {
    /// Starts (or finds) `order`'s container in the background, as one of `tasks` (a start is
    /// let finish at shutdown rather than leave a container half made).
    pub fn begin(
        provisioner: Arc<dyn Machines>,
        order: &Order,
        latency: Histogram,
        tasks: &Tasks,
    ) -> Self {
        let spec = lease_spec(order);
        let order_id = spec.order;
        let shared_spec = Arc::new(spec.clone());
        let fut = async move {
            let started = std::time::Instant::now();
            let result = provisioner
                .ensure(&spec)
                .await
                .map(|_| ())
                .map_err(Arc::new);
            latency.observe(started.elapsed().as_secs_f64());
            match &result {
                Ok(()) => tracing::debug!(
                    order = spec.order,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "lease ready"
                ),
                Err(e) => tracing::warn!(order = spec.order, error = %e, "lease failed to start"),
            }
            result
        };
        // Spawned, so the container starts while the client is still opening its channel.
        let handle = tasks.spawn(fut);
        let started = async move {
            handle.await.unwrap_or_else(|e| {
                Err(Arc::new(ProvisionError::StartFailed {
                    order: order_id,
                    reason: format!("the start task failed: {e}"),
                }))
            })
        }
        .boxed()
        .shared();
        Self {
            started,
            spec: shared_spec,
        }
    }

    /// Waits until the container runs.
    pub async fn ready(&self) -> Result<(), Arc<ProvisionError>> {
        self.started.clone().await
    }

    /// What the container was started with, to start it again if it died under a session.
    pub fn spec(&self) -> &LeaseSpec {
        &self.spec
    }
}

/// What the provisioner needs to know of an order.
pub fn lease_spec(order: &Order) -> LeaseSpec {
    let expires_at = order
        .expires_at()
        .map(|t| std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .unwrap_or(std::time::UNIX_EPOCH);
    LeaseSpec {
        order: order.id,
        cpus: order.cpus,
        memory_bytes: order.memory_mib.saturating_mul(1024 * 1024),
        disk_bytes: order.disk_mib.saturating_mul(1 << 20),
        // The image the client paid for, by content; never the provider's current default.
        image: order
            .image_digest
            .as_ref()
            .map(shale_contracts::format_image_digest),
        image_repository: order.image_repository.clone(),
        gpus: order.gpus,
        dataset: order.dataset.clone(),
        expires_at,
        pids_limit: None,
    }
}
