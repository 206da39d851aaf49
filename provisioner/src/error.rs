//! The errors a provisioner caller can act on, each with a message a user can read.

use std::path::PathBuf;

/// Everything that can go wrong while provisioning or running an order's container.
///
/// The gateway turns these into words on the user's terminal, so every message says what
/// happened in plain terms; the variant says what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// containerd does not answer on its socket (not running, wrong path, or it went away).
    #[error("the container runtime (containerd at {socket}) is unreachable: {reason}")]
    DaemonUnreachable { socket: PathBuf, reason: String },

    /// The image is not in containerd's image store; import it first.
    #[error("image {image} is not installed on this provider; import it first")]
    ImageMissing { image: String },

    /// The order names its own image, from a repository this provider does not pull from.
    #[error("the order's image {repository} is refused: {reason}")]
    ClientImageRefused { repository: String, reason: String },

    /// An image archive could not be read or is not a valid OCI image.
    #[error("image archive {path} is not usable: {reason}")]
    ImageInvalid { path: PathBuf, reason: String },

    /// Building an image archive from Debian packages failed.
    #[error("building the image failed: {0}")]
    ImageBuild(String),

    /// The order asks for a dataset the provider does not hold locally.
    #[error("dataset {dataset} is not available on this provider")]
    DatasetMissing { dataset: String },

    /// A piece dataset's bytes are not the piece its CID names: it is never mounted.
    #[error(
        "dataset {dataset} failed its check: its bytes are piece {found}, not {expected}; the \
         provider has been alerted and no order gets it until they match"
    )]
    DatasetMismatch {
        dataset: String,
        expected: String,
        found: String,
    },

    /// A piece dataset's payload cannot be read or checked now.
    #[error("dataset {dataset} cannot be checked on this provider now: {reason}")]
    DatasetUnavailable { dataset: String, reason: String },

    /// The order asks for GPUs the provider cannot supply (no CDI devices, or too few).
    #[error("{wanted} GPU(s) requested but only {available} available on this provider")]
    GpusUnavailable { wanted: u32, available: u32 },

    /// A CDI spec file exists but cannot be used.
    #[error("CDI spec {path} is invalid: {reason}")]
    CdiInvalid { path: PathBuf, reason: String },

    /// The order's container could not be created or its task did not start.
    /// Every order slot of a kind (uid ranges, disk) is taken; the order can start when one frees.
    #[error("this provider is at capacity: {0}; try again when another lease ends")]
    AtCapacity(String),

    #[error("the container for order {order} failed to start: {reason}")]
    StartFailed { order: u64, reason: String },

    /// There is no container (or no running task) for this order.
    #[error("order {order} has no running container")]
    NotProvisioned { order: u64 },

    /// A process could not be started inside the order's container.
    #[error("could not run the command in the container of order {order}: {reason}")]
    ExecFailed { order: u64, reason: String },

    /// A TCP connection from inside the order's network namespace failed (nothing listens, the
    /// name does not resolve, the order's network refuses the destination).
    #[error(
        "could not connect to {host}:{port} from inside the container of order {order}: {source}"
    )]
    Connect {
        order: u64,
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },

    /// containerd refused or failed a request for another reason.
    #[error("the container runtime failed to {action}: {status}")]
    Runtime { action: String, status: String },

    /// An image reference that cannot be parsed (`REGISTRY/REPO:TAG` or `REGISTRY/REPO@DIGEST`).
    #[error("{reference:?} is not an image reference ({reason}); write REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:DIGEST")]
    ReferenceInvalid { reference: String, reason: String },

    /// The registry refused the credentials configured for it (HTTP 401); not retried.
    #[error("registry {registry} refused the credentials for {reference} (HTTP 401); check the registry's auth in the provider's config")]
    RegistryUnauthorized { registry: String, reference: String },

    /// The registry has no such repository, tag, manifest or blob (HTTP 404); not retried.
    #[error("no such image or tag {reference} on registry {registry} ({reason})")]
    ImageNotFound {
        registry: String,
        reference: String,
        reason: String,
    },

    /// The registry stayed unreachable or kept failing (connection refused or reset, timeouts,
    /// HTTP 429 or 5xx) for every try; the pull may succeed later.
    #[error("registry {registry} failed to serve {reference} after {tries} tries: {reason}; try again later")]
    RegistryUnavailable {
        registry: String,
        reference: String,
        tries: usize,
        reason: String,
    },

    /// The registry refused the pull for another reason (HTTP 403 or another 4xx).
    #[error("registry {registry} refused to serve {reference}: {reason}")]
    RegistryRefused {
        registry: String,
        reference: String,
        reason: String,
    },

    /// The registry served bytes that do not hash to the digest they were asked for. Nothing of
    /// the blob was committed.
    #[error("the registry served content for {reference} that does not match its digest {expected} (it hashes to {actual}); nothing of it was stored")]
    DigestMismatch {
        reference: String,
        expected: String,
        actual: String,
    },

    /// The image's manifest, index or config is malformed or describes something that cannot
    /// run here (no linux/amd64 image, foreign or unknown layer types, a non-image artifact).
    #[error("image {reference} cannot be used: {reason}")]
    ManifestInvalid { reference: String, reason: String },

    /// The disk under containerd's content store or snapshots filled up during a pull. What
    /// the pull had written of the blob in flight was removed.
    #[error("no space left for image {reference} in the container runtime's store ({reason}); free disk space or remove unused images, then pull again")]
    ImageStoreFull { reference: String, reason: String },

    /// A local file or directory operation failed (volumes, FIFOs, state directory).
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The configuration is unusable.
    #[error("the orders' network failed: {0}")]
    Network(String),

    #[error("invalid provisioner configuration: {0}")]
    Config(String),

    /// The privileged broker refused a request for this order: the chain does not allow it.
    #[error("order {order}: {reason}")]
    NotAllowed { order: u64, reason: String },
}

impl ProvisionError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ProvisionError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// True when the error means containerd itself is not answering; the caller may retry later.
    pub fn is_daemon_unreachable(&self) -> bool {
        matches!(self, ProvisionError::DaemonUnreachable { .. })
    }
}
