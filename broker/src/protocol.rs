//! The broker's wire protocol: typed requests and replies, one JSON document per frame.
//!
//! Every connection carries one request. Most get one reply and end; an `Exec` reply comes with
//! the process's stdio descriptors, and the connection then stays open as the process's control
//! (resize, signal, end of input, and finally its exit). The version travels in every request,
//! so a broker and a gateway of different builds refuse each other in words.

use std::io::ErrorKind;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shale_provisioner::{
    DatasetStatus, ExecRequest, ExitStatus, Lease, LeaseSpec, ProvisionError, PtySize, PullStats,
    Reconciled, Traffic,
};

/// This build's protocol version; a request of another version is refused.
pub const VERSION: u32 = 1;

/// The largest frame either side accepts. Requests are small (an exec's argv and env are the
/// largest); anything bigger is hostile and ends the connection.
pub const MAX_FRAME: usize = 256 * 1024;

/// A request with the protocol version it speaks.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's [`VERSION`].
    pub version: u32,
    /// What it asks for.
    pub request: Request,
}

/// What the gateway may ask of the broker: exactly the operations of
/// [`shale_provisioner::Machines`], nothing else.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// The containers' scope (chain and marketplace).
    Scope,
    /// Create or find the order's container.
    Ensure(LeaseSpec),
    /// Start a process; the reply carries its stdio and the connection becomes its control.
    Exec { order: u64, request: ExecRequest },
    /// Dial from inside the order's network namespace; the reply carries the socket.
    Connect { order: u64, host: String, port: u16 },
    /// The orders that hold a container.
    Orders,
    /// The order's network byte counts.
    Traffic { order: u64 },
    /// Stop the order's container.
    Stop { order: u64 },
    /// End the order's lease.
    Release { order: u64 },
    /// Keep every container after a restart.
    AdoptAll,
    /// Repair the orders' network.
    ReconcileNetwork,
    /// The image pulls' counters.
    PullStats,
    /// The datasets and their last checks.
    Datasets,
    /// Pull a client's own image (`repository@digest`) ahead of its order's first login; the
    /// broker refuses a repository its config does not allow.
    PullImage { repository: String, digest: String },
}

/// The broker's answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The scope.
    Scope(String),
    /// The lease, from `Ensure`.
    Lease(Box<Lease>),
    /// The process started: its stdio follows as descriptors (stdin, stdout, and stderr unless
    /// it has a terminal), then the connection is the process's control.
    Started { exec_id: String, stderr: bool },
    /// The connection is made: its socket follows as a descriptor.
    Connected,
    /// Order ids, from `Orders` and `AdoptAll`.
    Orders(Vec<u64>),
    /// From `Traffic`.
    Traffic(Option<Traffic>),
    /// From `ReconcileNetwork`.
    Reconciled(Reconciled),
    /// From `PullStats`.
    PullStats(PullStats),
    /// From `Datasets`.
    Datasets(Vec<DatasetStatus>),
    /// Done, nothing to say (`Stop`, `Release`).
    Done,
    /// The operation failed.
    Failed(WireError),
}

/// What the gateway asks of a running process on its control connection.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// Change the terminal's size.
    Resize(PtySize),
    /// Deliver a signal.
    Signal(i32),
    /// Deliver end-of-file on stdin.
    CloseStdin,
}

/// What the broker says on a process's control connection: one `Answered` per [`Control`], in
/// order, and one `Ended` when the process ends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlEvent {
    /// The answer to the oldest unanswered control request.
    Answered(Result<(), WireError>),
    /// The process ended, or the runtime lost it.
    Ended(Result<ExitStatus, WireError>),
}

/// A [`ProvisionError`] as it crosses the socket: the variants the gateway acts on keep their
/// shape, the rest keep their words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    DaemonUnreachable {
        socket: PathBuf,
        reason: String,
    },
    ImageMissing {
        image: String,
    },
    DatasetMissing {
        dataset: String,
    },
    DatasetMismatch {
        dataset: String,
        expected: String,
        found: String,
    },
    DatasetUnavailable {
        dataset: String,
        reason: String,
    },
    GpusUnavailable {
        wanted: u32,
        available: u32,
    },
    ClientImageRefused {
        repository: String,
        reason: String,
    },
    AtCapacity {
        reason: String,
    },
    StartFailed {
        order: u64,
        reason: String,
    },
    NotProvisioned {
        order: u64,
    },
    ExecFailed {
        order: u64,
        reason: String,
    },
    Connect {
        order: u64,
        host: String,
        port: u16,
        io: String,
        message: String,
    },
    Network {
        reason: String,
    },
    Config {
        reason: String,
    },
    /// Any other failure, in the words of its message.
    Other {
        message: String,
    },
    /// The request itself was refused (wrong version, out of bounds).
    Refused {
        reason: String,
    },
    /// The chain does not allow this request for the order (see [`crate::Admission`]).
    NotAllowed {
        order: u64,
        reason: String,
    },
}

impl From<&ProvisionError> for WireError {
    fn from(e: &ProvisionError) -> Self {
        match e {
            ProvisionError::DaemonUnreachable { socket, reason } => WireError::DaemonUnreachable {
                socket: socket.clone(),
                reason: reason.clone(),
            },
            ProvisionError::ImageMissing { image } => WireError::ImageMissing {
                image: image.clone(),
            },
            ProvisionError::DatasetMissing { dataset } => WireError::DatasetMissing {
                dataset: dataset.clone(),
            },
            ProvisionError::DatasetMismatch {
                dataset,
                expected,
                found,
            } => WireError::DatasetMismatch {
                dataset: dataset.clone(),
                expected: expected.clone(),
                found: found.clone(),
            },
            ProvisionError::DatasetUnavailable { dataset, reason } => {
                WireError::DatasetUnavailable {
                    dataset: dataset.clone(),
                    reason: reason.clone(),
                }
            }
            ProvisionError::GpusUnavailable { wanted, available } => WireError::GpusUnavailable {
                wanted: *wanted,
                available: *available,
            },
            ProvisionError::ClientImageRefused { repository, reason } => {
                WireError::ClientImageRefused {
                    repository: repository.clone(),
                    reason: reason.clone(),
                }
            }
            ProvisionError::AtCapacity(reason) => WireError::AtCapacity {
                reason: reason.clone(),
            },
            ProvisionError::StartFailed { order, reason } => WireError::StartFailed {
                order: *order,
                reason: reason.clone(),
            },
            ProvisionError::NotProvisioned { order } => WireError::NotProvisioned { order: *order },
            ProvisionError::ExecFailed { order, reason } => WireError::ExecFailed {
                order: *order,
                reason: reason.clone(),
            },
            ProvisionError::Connect {
                order,
                host,
                port,
                source,
            } => WireError::Connect {
                order: *order,
                host: host.clone(),
                port: *port,
                io: io_kind_name(source.kind()).to_string(),
                message: source.to_string(),
            },
            ProvisionError::Network(reason) => WireError::Network {
                reason: reason.clone(),
            },
            ProvisionError::Config(reason) => WireError::Config {
                reason: reason.clone(),
            },
            ProvisionError::NotAllowed { order, reason } => WireError::NotAllowed {
                order: *order,
                reason: reason.clone(),
            },
            other => WireError::Other {
                message: other.to_string(),
            },
        }
    }
}

impl WireError {
    /// The error as the gateway handles it. `broker` names the socket for failures of the
    /// broker itself, which the gateway treats like an unreachable runtime.
    pub fn into_provision_error(self, broker: &std::path::Path) -> ProvisionError {
        match self {
            WireError::DaemonUnreachable { socket, reason } => {
                ProvisionError::DaemonUnreachable { socket, reason }
            }
            WireError::ImageMissing { image } => ProvisionError::ImageMissing { image },
            WireError::DatasetMissing { dataset } => ProvisionError::DatasetMissing { dataset },
            WireError::DatasetMismatch {
                dataset,
                expected,
                found,
            } => ProvisionError::DatasetMismatch {
                dataset,
                expected,
                found,
            },
            WireError::DatasetUnavailable { dataset, reason } => {
                ProvisionError::DatasetUnavailable { dataset, reason }
            }
            WireError::GpusUnavailable { wanted, available } => {
                ProvisionError::GpusUnavailable { wanted, available }
            }
            WireError::ClientImageRefused { repository, reason } => {
                ProvisionError::ClientImageRefused { repository, reason }
            }
            WireError::AtCapacity { reason } => ProvisionError::AtCapacity(reason),
            WireError::StartFailed { order, reason } => {
                ProvisionError::StartFailed { order, reason }
            }
            WireError::NotProvisioned { order } => ProvisionError::NotProvisioned { order },
            WireError::ExecFailed { order, reason } => ProvisionError::ExecFailed { order, reason },
            WireError::Connect {
                order,
                host,
                port,
                io,
                message,
            } => ProvisionError::Connect {
                order,
                host,
                port,
                source: std::io::Error::new(io_kind(&io), message),
            },
            WireError::Network { reason } => ProvisionError::Network(reason),
            WireError::Config { reason } => ProvisionError::Config(reason),
            WireError::Other { message } => ProvisionError::Runtime {
                action: "serve the request".into(),
                status: message,
            },
            WireError::NotAllowed { order, reason } => ProvisionError::NotAllowed { order, reason },
            WireError::Refused { reason } => ProvisionError::DaemonUnreachable {
                socket: broker.to_path_buf(),
                reason: format!("the broker refused the request: {reason}"),
            },
        }
    }
}

/// The I/O error kinds a dial's caller tells apart; every other kind travels as "other".
const IO_KINDS: [(ErrorKind, &str); 8] = [
    (ErrorKind::ConnectionRefused, "connection_refused"),
    (ErrorKind::HostUnreachable, "host_unreachable"),
    (ErrorKind::NetworkUnreachable, "network_unreachable"),
    (ErrorKind::TimedOut, "timed_out"),
    (ErrorKind::NotFound, "not_found"),
    (ErrorKind::PermissionDenied, "permission_denied"),
    (ErrorKind::AddrNotAvailable, "addr_not_available"),
    (ErrorKind::InvalidInput, "invalid_input"),
];

fn io_kind_name(kind: ErrorKind) -> &'static str {
    IO_KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("other", |(_, name)| name)
}

fn io_kind(name: &str) -> ErrorKind {
    IO_KINDS
        .iter()
        .find(|(_, n)| *n == name)
        .map_or(ErrorKind::Other, |(k, _)| *k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dial_failure_keeps_its_kind_across_the_socket() {
        let e = ProvisionError::Connect {
            order: 3,
            host: "203.0.113.9".into(),
            port: 80,
            source: std::io::Error::from(ErrorKind::ConnectionRefused),
        };
        let wire: WireError = (&e).into();
        let json = serde_json::to_string(&wire).unwrap();
        let back: WireError = serde_json::from_str(&json).unwrap();
        match back.into_provision_error(std::path::Path::new("/run/b.sock")) {
            ProvisionError::Connect {
                order,
                port,
                source,
                ..
            } => {
                assert_eq!((order, port), (3, 80));
                assert_eq!(source.kind(), ErrorKind::ConnectionRefused);
            }
            other => panic!("not a dial failure: {other:?}"),
        }
    }

    #[test]
    fn a_refusal_reads_as_an_unreachable_runtime_naming_the_broker() {
        let e = WireError::Refused {
            reason: "protocol 9, this broker speaks 1".into(),
        }
        .into_provision_error(std::path::Path::new("/run/b.sock"));
        assert!(e.is_daemon_unreachable());
        assert!(e.to_string().contains("/run/b.sock"), "{e}");
        assert!(e.to_string().contains("protocol 9"), "{e}");
    }

    #[test]
    fn requests_round_trip_as_json() {
        let sent = Envelope {
            version: VERSION,
            request: Request::Connect {
                order: 1,
                host: "localhost".into(),
                port: 8888,
            },
        };
        let text = serde_json::to_string(&sent).unwrap();
        let got: Envelope = serde_json::from_str(&text).unwrap();
        assert!(matches!(got.request, Request::Connect { port: 8888, .. }));
    }
}
