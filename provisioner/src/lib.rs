//! Shale's provisioner: one containerd container per order, for the life of its lease.
//!
//! The gateway calls [`Provisioner::ensure`] when an order's first session arrives, then
//! [`Provisioner::exec`] for every SSH channel (shell, command, `sftp` subsystem) and
//! [`Provisioner::connect_tcp`] for `ssh -L` and `ssh -D`. [`Provisioner::release`] ends a lease and
//! [`Provisioner::adopt`] reconciles containers with the chain after a gateway restart.
//!
//! Every order's container has its own network namespace with one way out: a veth pair, NAT on
//! the host's uplink and host-side nftables rules that let through the internet and nothing
//! else (see [`NetworkConfig`]); [`Provisioner::reconcile_network`] restores what was deleted
//! and removes what a crash left, and [`Provisioner::traffic`] reads each order's byte counts.
//!
//! Images come from OCI registries ([`Provisioner::pull_image`], with [`RegistryConfig`] for
//! credentials) or from local OCI archives ([`Provisioner::import_image`]); both end the same
//! way, unpacked for the overlayfs snapshotter and recorded by name.
//! The default image is built from Debian packages by `provisioner/image/build-default.sh`
//! (see [`image_build`]). [`daemon::LocalContainerd`] starts a project-local containerd for tests
//! and `shale dev up`.

mod agent;
pub mod car;
mod catalog;
mod cdi;
mod config;
mod ctd;
pub mod daemon;
mod dataset;
mod disk;
mod error;
mod exec;
pub mod fds;
mod image;
pub mod image_build;
mod image_gc;
mod lease;
mod machines;
mod netns;
mod network;
pub mod piece;
mod registry;
mod rootfs;
mod seccomp;
mod spec;
mod store_room;
mod tty;
mod userns;

pub use catalog::{check_catalog, Catalog, CatalogImage, ImageSource, InstalledImage};
pub use cdi::{CdiRegistry, ContainerEdits, DeviceNode, HookEdit, MountEdit};
pub use config::{ImageRef, ProvisionerConfig};
pub use dataset::{
    DatasetSource, DatasetStatus, FileIdentity, PieceSource, Presentation, Verification, PIECE_FILE,
};
pub use disk::MIN_DISK_BYTES;
pub use error::ProvisionError;
pub use exec::{
    ExecRequest, ExitStatus, Process, ProcessControl, ProcessHandle, ProcessOutput, ProcessStdin,
    PtySize,
};
pub use image_gc::ImageGcPolicy;
pub use lease::{Lease, LeaseSpec};
pub use machines::Machines;
pub use network::{
    NetRule, NetworkConfig, OrderLink, Reconciled, Traffic, DENIED_RANGES, DENIED_TCP_PORTS,
};
pub use registry::{PullStats, PulledImage, RegistryAuth, RegistryConfig};
pub use userns::IdRange;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tracing::info;

use crate::ctd::Ctd;

/// Talks to containerd on behalf of the gateway; cheap to clone, shareable across tasks.
#[derive(Clone)]
pub struct Provisioner {
    inner: Arc<Inner>,
}

struct Inner {
    ctd: Ctd,
    config: ProvisionerConfig,
    /// One lock per order, so concurrent `ensure`/`stop`/`release` of one order serialize
    /// while different orders proceed in parallel.
    order_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// Serializes GPU allocation across orders.
    gpu_lock: tokio::sync::Mutex<()>,
    /// The environment of each order's processes, read once from its container spec.
    envs: Mutex<HashMap<u64, Arc<Vec<String>>>>,
    exec_seq: AtomicU64,
    /// Distinguishes this provisioner's cgroups from another instance's on the same host.
    instance: String,
    /// The prefix of every container id: the scope's hash, so that the same order number of
    /// another chain or marketplace names another container, disk and state.
    id_prefix: String,
    /// Serializes writes of the orders' nftables table.
    net_lock: tokio::sync::Mutex<()>,
    /// Registry pulls: one at a time per image, and their counters.
    puller: registry::Puller,
    /// How many catalog installations run now: a start of an order whose image is not there yet
    /// waits for them instead of failing.
    installs: tokio::sync::watch::Sender<usize>,
    /// The datasets and what their last hashes found.
    datasets: dataset::Datasets,
    /// The agents in the orders' containers: the fast path for their processes.
    agents: agent::Agents,
    /// Whether each order's container has the agent bound in, read with its environment.
    agent_mounted: Mutex<HashMap<u64, bool>>,
}

impl Provisioner {
    /// Connects to containerd and prepares the state directory. Fails with
    /// [`ProvisionError::DaemonUnreachable`] when containerd does not answer.
    pub async fn connect(config: ProvisionerConfig) -> Result<Self, ProvisionError> {
        if config.namespace.is_empty()
            || config
                .namespace
                .parse::<tonic::metadata::MetadataValue<_>>()
                .is_err()
        {
            return Err(ProvisionError::Config(format!(
                "namespace {:?} is not usable",
                config.namespace
            )));
        }
        userns::check_span(&config)?;
        Provisioner::check_network(&config)?;
        for sub in ["disks", "orders", "fifo", "runc", "idmap"] {
            let dir = config.state_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| ProvisionError::io("create", dir, e))?;
        }
        let state_dir = std::fs::canonicalize(&config.state_dir)
            .map_err(|e| ProvisionError::io("resolve", config.state_dir.clone(), e))?;
        let config = ProvisionerConfig {
            state_dir,
            ..config
        };
        let ctd = Ctd::connect(&config.socket, &config.namespace).await?;
        let instance = short_hash(
            format!("{}\0{}", config.state_dir.display(), config.namespace).as_bytes(),
            10,
        );
        let id_prefix = format!("o{}", short_hash(config.scope.as_bytes(), 8));
        info!(socket = %config.socket.display(), namespace = %config.namespace, "connected to containerd");
        let room = store_room::StoreRoom {
            path: config.image_store.clone(),
            reserve: config.image_store_reserve_bytes,
        };
        let agent = agent::binary(&config)?;
        match &agent {
            Some(path) => {
                info!(agent = %path.display(), "processes start through the containers' agent")
            }
            None => info!("no agent binary: processes start through containerd's exec"),
        }
        let datasets = dataset::Datasets::new(
            config.datasets.clone(),
            config.data_dir.clone(),
            &config.state_dir,
        );
        Ok(Provisioner {
            inner: Arc::new(Inner {
                datasets,
                ctd,
                config,
                order_locks: Mutex::new(HashMap::new()),
                gpu_lock: tokio::sync::Mutex::new(()),
                envs: Mutex::new(HashMap::new()),
                exec_seq: AtomicU64::new(0),
                instance,
                id_prefix,
                net_lock: tokio::sync::Mutex::new(()),
                puller: registry::Puller::new(room),
                installs: tokio::sync::watch::Sender::new(0),
                agents: agent::Agents::new(agent),
                agent_mounted: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The configuration in force (with `state_dir` made absolute).
    pub fn config(&self) -> &ProvisionerConfig {
        &self.inner.config
    }

    /// containerd's version string; also a cheap liveness check.
    pub async fn daemon_version(&self) -> Result<String, ProvisionError> {
        self.inner.ctd.version().await
    }

    /// Imports an OCI image archive (a tar of an OCI image layout, as the build scripts write)
    /// or an OCI layout directory into containerd, unpacked for the overlayfs snapshotter.
    /// Returns the name recorded in the archive's `index.json`. Importing the same archive
    /// again is cheap: blobs and snapshots already present are skipped.
    pub async fn import_image(&self, oci_archive: &Path) -> Result<ImageRef, ProvisionError> {
        self.inner.ctd.import(oci_archive).await
    }

    /// Pulls an image from an OCI registry by `REGISTRY/REPO:TAG` or `REGISTRY/REPO@sha256:…`
    /// and installs it like [`Provisioner::import_image`] does, under the full reference as its
    /// name. `registries` holds the credentials: the entry whose `host` is the reference's
    /// registry is used, anonymous HTTPS if none is.
    ///
    /// Every blob is verified against its digest before it is committed; layers already
    /// present are not fetched again, so pulling an installed image costs one manifest request
    /// (none for a digest reference). Concurrent pulls of one reference share one transfer.
    /// Transient registry failures (connection refused or reset, 429, 5xx) are retried with
    /// backoff, four tries in all; 401 and 404 are not.
    pub async fn pull_image(
        &self,
        reference: &str,
        registries: &[RegistryConfig],
    ) -> Result<PulledImage, ProvisionError> {
        self.inner
            .puller
            .pull(&self.inner.ctd, reference, registries)
            .await
    }

    /// Every dataset and what its last hash found.
    pub fn dataset_statuses(&self) -> Vec<DatasetStatus> {
        self.inner.datasets.statuses()
    }

    /// Hashes every piece dataset not hashed within `dataset_recheck`; run it at start and on
    /// a schedule. A dataset found changed is refused to new orders from then on.
    pub async fn recheck_datasets(&self) {
        let every = self.inner.config.dataset_recheck;
        self.inner.datasets.recheck(every).await
    }

    /// Counters of every registry pull since this provisioner connected.
    pub fn pull_stats(&self) -> PullStats {
        self.inner.puller.stats()
    }

    /// Whether an image is installed (and unpacked, unpacking it if the content is there).
    pub async fn has_image(&self, image: &ImageRef) -> Result<bool, ProvisionError> {
        match self.inner.ctd.resolve_image(image).await {
            Ok(_) => Ok(true),
            Err(ProvisionError::ImageMissing { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn order_lock(&self, order: u64) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .order_locks
            .lock()
            .expect("order lock map poisoned");
        locks.entry(order).or_default().clone()
    }

    /// containerd's id of the order's container: `o<scope hash>-<order>`.
    fn container_id(&self, order: u64) -> String {
        format!("{}-{order}", self.inner.id_prefix)
    }

    /// The order a container id of this scope names.
    fn order_of_container_id(&self, id: &str) -> Option<u64> {
        id.strip_prefix(self.inner.id_prefix.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    fn disk(&self, order: u64) -> disk::Disk {
        disk::Disk::at(
            &self.inner.config.state_dir.join("disks"),
            &self.container_id(order),
        )
    }

    /// Where the image's layers are idmapped for the moment a task is created.
    fn idmap_dir(&self, order: u64) -> PathBuf {
        self.inner
            .config
            .state_dir
            .join("idmap")
            .join(self.container_id(order))
    }

    fn etc_dir(&self, order: u64) -> PathBuf {
        self.inner
            .config
            .state_dir
            .join("orders")
            .join(self.container_id(order))
    }

    fn fifo_dir(&self, order: u64) -> PathBuf {
        self.inner
            .config
            .state_dir
            .join("fifo")
            .join(self.container_id(order))
    }
}

/// The first `hex_digits` hex digits of the SHA-256 of `bytes`: a short, stable name.
fn short_hash(bytes: &[u8], hex_digits: usize) -> String {
    use sha2::{Digest, Sha256};
    let mut hex = format!("{:x}", Sha256::digest(bytes));
    hex.truncate(hex_digits);
    hex
}
