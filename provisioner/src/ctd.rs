//! A thin handle on containerd's gRPC services: namespace header, deadlines, error mapping.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, leases_client::LeasesClient, namespaces_client::NamespacesClient,
    snapshots::snapshots_client::SnapshotsClient, tasks_client::TasksClient,
    version_client::VersionClient, Container, ListContainersRequest, ListNamespacesRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::ProvisionError;

/// Deadline for calls that should answer at once; a wedged daemon becomes an error, not a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The snapshotter every image is unpacked with and every order's root filesystem comes from.
pub(crate) const SNAPSHOTTER: &str = "overlayfs";

#[derive(Clone)]
pub(crate) struct Ctd {
    channel: Channel,
    namespace: String,
    socket: PathBuf,
}

impl Ctd {
    /// Connects and checks that the daemon answers; a socket file without a daemon is an error.
    pub(crate) async fn connect(socket: &Path, namespace: &str) -> Result<Self, ProvisionError> {
        let unreachable = |reason: String| ProvisionError::DaemonUnreachable {
            socket: socket.to_path_buf(),
            reason,
        };
        let channel =
            tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(socket))
                .await
                .map_err(|_| unreachable("connecting timed out".into()))?
                .map_err(|e| unreachable(error_chain(&e)))?;
        let ctd = Ctd {
            channel,
            namespace: namespace.to_string(),
            socket: socket.to_path_buf(),
        };
        ctd.version().await?;
        Ok(ctd)
    }

    pub(crate) async fn version(&self) -> Result<String, ProvisionError> {
        let resp = VersionClient::new(self.channel.clone())
            .version(self.req(()))
            .await
            .map_err(|s| self.status("ask containerd for its version", s))?;
        Ok(resp.into_inner().version)
    }

    /// A request in our namespace with the default deadline.
    pub(crate) fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = self.req_long(msg);
        req.set_timeout(CALL_TIMEOUT);
        req
    }

    /// A request in our namespace without a deadline, for calls that wait (task and process exits).
    pub(crate) fn req_long<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert(
            "containerd-namespace",
            self.namespace
                .parse()
                .expect("namespace is a valid header value"),
        );
        req
    }

    /// A request that also holds a containerd lease, so the garbage collector keeps what it writes.
    pub(crate) fn req_leased<T>(&self, msg: T, lease: &str) -> Request<T> {
        let mut req = self.req(msg);
        req.metadata_mut().insert(
            "containerd-lease",
            lease.parse().expect("lease id is a valid header value"),
        );
        req
    }

    /// Maps a gRPC status to an error; transport failures become `DaemonUnreachable`.
    pub(crate) fn status(&self, action: &str, status: Status) -> ProvisionError {
        if is_transport_failure(&status) {
            ProvisionError::DaemonUnreachable {
                socket: self.socket.clone(),
                reason: format!("while trying to {action}: {}", status.message()),
            }
        } else {
            ProvisionError::Runtime {
                action: action.to_string(),
                status: status.message().to_string(),
            }
        }
    }

    pub(crate) fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub(crate) fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }
    pub(crate) fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub(crate) fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
    pub(crate) fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub(crate) fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub(crate) fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    /// The containers matching `filter` in every containerd namespace, not only ours: for what
    /// must be unique on the host whoever holds it (an order's host uid range).
    pub(crate) async fn containers_everywhere(
        &self,
        filter: &str,
    ) -> Result<Vec<Container>, ProvisionError> {
        let namespaces = NamespacesClient::new(self.channel.clone())
            .list(self.req(ListNamespacesRequest::default()))
            .await
            .map_err(|s| self.status("list containerd namespaces", s))?
            .into_inner()
            .namespaces;
        let mut found = Vec::new();
        for ns in namespaces {
            let Ok(header) = ns.name.parse() else {
                continue;
            };
            let mut req = Request::new(ListContainersRequest {
                filters: vec![filter.to_string()],
            });
            req.set_timeout(CALL_TIMEOUT);
            req.metadata_mut().insert("containerd-namespace", header);
            found.extend(
                self.containers()
                    .list(req)
                    .await
                    .map_err(|s| self.status("list containers", s))?
                    .into_inner()
                    .containers,
            );
        }
        Ok(found)
    }
}

/// Whether a status means the daemon could not be reached or the connection broke.
pub(crate) fn is_transport_failure(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Cancelled => true,
        Code::Unknown => {
            let m = status.message().to_ascii_lowercase();
            m.contains("transport")
                || m.contains("connection")
                || m.contains("broken pipe")
                || m.contains("h2")
        }
        _ => false,
    }
}

pub(crate) fn is_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound
}

pub(crate) fn is_already_exists(status: &Status) -> bool {
    status.code() == Code::AlreadyExists
}

/// An error with its sources, since tonic's transport errors hide the useful part in `source()`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
