//! What the gateway needs of the machines it serves, wherever they are driven from.
//!
//! [`Provisioner`] drives containerd itself and needs root. The SSH-facing gateway runs without
//! privileges and reaches the same operations through a broker across a local socket; both
//! implement [`Machines`], so the gateway is written once against this trait.

use futures::future::BoxFuture;
use tokio::net::TcpStream;

use crate::{
    DatasetStatus, ExecRequest, Lease, LeaseSpec, Process, ProvisionError, Provisioner, PullStats,
    Reconciled, Traffic,
};

/// The operations on orders' containers that a gateway uses. Every method means what the
/// [`Provisioner`] method of the same name means.
pub trait Machines: Send + Sync + 'static {
    /// The chain and marketplace these containers belong to (`ProvisionerConfig::scope`).
    fn scope(&self) -> &str;
    /// Creates the order's container and starts it, or finds it running.
    fn ensure<'a>(&'a self, spec: &'a LeaseSpec) -> BoxFuture<'a, Result<Lease, ProvisionError>>;
    /// Starts a process in the order's running container.
    fn exec(&self, order: u64, req: ExecRequest) -> BoxFuture<'_, Result<Process, ProvisionError>>;
    /// A TCP connection from inside the order's network namespace.
    fn connect_tcp<'a>(
        &'a self,
        order: u64,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<TcpStream, ProvisionError>>;
    /// The orders that hold a container (running or stopped).
    fn orders(&self) -> BoxFuture<'_, Result<Vec<u64>, ProvisionError>>;
    /// The order's network byte counts, when it has a link.
    fn traffic(&self, order: u64) -> BoxFuture<'_, Result<Option<Traffic>, ProvisionError>>;
    /// Stops the order's container, keeping its disk.
    fn stop(&self, order: u64) -> BoxFuture<'_, Result<(), ProvisionError>>;
    /// Ends the order's lease: container, disk and network removed.
    fn release(&self, order: u64) -> BoxFuture<'_, Result<(), ProvisionError>>;
    /// After a restart: keeps every container of this provider (the gateway's watcher then
    /// releases those whose orders ended) and returns their orders, sorted.
    fn adopt_all(&self) -> BoxFuture<'_, Result<Vec<u64>, ProvisionError>>;
    /// Restores the orders' network where it was changed, and removes what a crash left.
    fn reconcile_network(&self) -> BoxFuture<'_, Result<Reconciled, ProvisionError>>;
    /// Counters of the image pulls since the provisioner connected.
    fn pull_stats(&self) -> BoxFuture<'_, Result<PullStats, ProvisionError>>;
    /// Every dataset and what its last hash found.
    fn datasets(&self) -> BoxFuture<'_, Result<Vec<DatasetStatus>, ProvisionError>>;
}

impl Machines for Provisioner {
    fn scope(&self) -> &str {
        &self.config().scope
    }

    fn ensure<'a>(&'a self, spec: &'a LeaseSpec) -> BoxFuture<'a, Result<Lease, ProvisionError>> {
        Box::pin(Provisioner::ensure(self, spec))
    }

    fn exec(&self, order: u64, req: ExecRequest) -> BoxFuture<'_, Result<Process, ProvisionError>> {
        Box::pin(Provisioner::exec(self, order, req))
    }

    fn connect_tcp<'a>(
        &'a self,
        order: u64,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<TcpStream, ProvisionError>> {
        Box::pin(Provisioner::connect_tcp(self, order, host, port))
    }

    fn orders(&self) -> BoxFuture<'_, Result<Vec<u64>, ProvisionError>> {
        Box::pin(Provisioner::orders(self))
    }

    fn traffic(&self, order: u64) -> BoxFuture<'_, Result<Option<Traffic>, ProvisionError>> {
        Box::pin(Provisioner::traffic(self, order))
    }

    fn stop(&self, order: u64) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(Provisioner::stop(self, order))
    }

    fn release(&self, order: u64) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(Provisioner::release(self, order))
    }

    fn adopt_all(&self) -> BoxFuture<'_, Result<Vec<u64>, ProvisionError>> {
        Box::pin(Provisioner::adopt(self, |_| true))
    }

    fn reconcile_network(&self) -> BoxFuture<'_, Result<Reconciled, ProvisionError>> {
        Box::pin(Provisioner::reconcile_network(self))
    }

    fn pull_stats(&self) -> BoxFuture<'_, Result<PullStats, ProvisionError>> {
        Box::pin(async move { Ok(Provisioner::pull_stats(self)) })
    }

    fn datasets(&self) -> BoxFuture<'_, Result<Vec<DatasetStatus>, ProvisionError>> {
        Box::pin(async move { Ok(Provisioner::dataset_statuses(self)) })
    }
}
