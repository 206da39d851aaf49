//! The privileged side: serves one [`Provisioner`] to the gateway's unprivileged SSH process.
//!
//! The SSH process may be compromised, so every connection is treated as hostile: its peer's
//! uid must be one the broker was told to serve, its first frame must arrive in time and within
//! the size cap, it must speak this protocol version, and its request must be within bounds
//! before the provisioner sees it. A connection that breaks a rule is closed with a reason in
//! the log and, where it can still be read, in a reply.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use shale_provisioner::{ExecRequest, LeaseSpec, ProcessHandle, ProvisionError, Provisioner};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, Semaphore};
use tracing::{debug, info, warn, Instrument};

use crate::admission::{Admission, Admissions};
use crate::frame::{read_frame, send_fds, write_frame};
use crate::protocol::{Control, ControlEvent, Envelope, Reply, Request, WireError, VERSION};

/// How long a new connection has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; one per running process and one per call in flight.
const MAX_CONNECTIONS: usize = 4096;
/// Bounds on an exec request, far above what a real session sends.
const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 1024;
/// DNS's limit on a name.
const MAX_HOST: usize = 253;
/// The longest image repository a pull may name (the contract's `MAX_TEXT`).
const MAX_REPOSITORY: usize = 1024;

/// How long a live order the chain last confirmed keeps being served while the chain cannot be
/// reached, unless the broker is told otherwise: the gateway's own default bound.
pub const DEFAULT_STALE_MAX: Duration = Duration::from_secs(600);

/// Serves a provisioner on a local socket to the uids it is told to trust.
pub struct Broker {
    provisioner: Provisioner,
    admissions: Admissions,
    peers: Vec<u32>,
    slots: Arc<Semaphore>,
}

impl Broker {
    /// A broker for `provisioner` that serves connections whose peer runs as one of `peers`,
    /// and only what `chain` allows for the orders they name.
    pub fn new(provisioner: Provisioner, chain: impl Admission, peers: Vec<u32>) -> Self {
        Self {
            provisioner,
            admissions: Admissions::new(Box::new(chain), DEFAULT_STALE_MAX),
            peers,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// Serves a live order the chain last confirmed for up to `stale_max` while the chain
    /// cannot be reached (keep it at the gateway's `auth.stale_order_max`).
    pub fn with_stale_max(mut self, stale_max: Duration) -> Self {
        self.admissions.stale_max = stale_max;
        self
    }

    /// Accepts and serves connections until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: UnixListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let broker = Arc::new(self);
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(error = %e, "broker accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let broker = broker.clone();
            tokio::spawn(async move { broker.connection(stream).await });
        }
    }

    async fn connection(self: Arc<Self>, mut stream: UnixStream) {
        let peer = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "broker: cannot read the peer's credentials; closed");
                return;
            }
        };
        if !self.peers.contains(&peer.uid()) {
            warn!(uid = peer.uid(), pid = ?peer.pid(), "broker: a process of an unknown uid connected; closed");
            return;
        }
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            let _ = write_frame(&mut stream, &refused("the broker is at its connection cap")).await;
            return;
        };
        let envelope = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_frame::<Envelope>(&mut stream),
        )
        .await
        {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                warn!(error = %e, "broker: unreadable request; closed");
                let _ =
                    write_frame(&mut stream, &refused(&format!("unreadable request: {e}"))).await;
                return;
            }
            Err(_) => {
                warn!("broker: no request in time; closed");
                return;
            }
        };
        if envelope.version != VERSION {
            let reason = format!(
                "the gateway speaks broker protocol {}, this broker {VERSION}: run one build of shale for both",
                envelope.version
            );
            warn!(%reason, "broker: version mismatch");
            let _ = write_frame(&mut stream, &refused(&reason)).await;
            return;
        }
        if let Err(reason) = check(&envelope.request) {
            warn!(%reason, "broker: request out of bounds; refused");
            let _ = write_frame(&mut stream, &refused(&reason)).await;
            return;
        }
        let span = tracing::info_span!("broker", order = order_of(&envelope.request));
        if let Err(e) = self
            .serve_request(stream, envelope.request)
            .instrument(span)
            .await
        {
            debug!(error = %e, "broker: connection ended early");
        }
    }

    /// Whether the chain allows `request`; orders are named by a process that may be lying.
    async fn admit(&self, request: &Request) -> Result<(), (u64, String)> {
        let a = &self.admissions;
        match request {
            Request::Ensure(spec) => a.ensure(spec).await.map_err(|e| (spec.order, e)),
            Request::Exec { order, .. } | Request::Connect { order, .. } => {
                a.enter(*order).await.map_err(|e| (*order, e))
            }
            Request::Release { order } => a.release(*order).await.map_err(|e| (*order, e)),
            // Stopping a container keeps its disk, and the rest only read or tidy the host.
            Request::Stop { .. }
            | Request::Traffic { .. }
            | Request::Scope
            | Request::Orders
            | Request::AdoptAll
            | Request::ReconcileNetwork
            | Request::PullStats
            | Request::Datasets
            // Only from a registry the broker's own config allows (checked by the provisioner).
            | Request::PullImage { .. } => Ok(()),
        }
    }

    async fn serve_request(&self, mut stream: UnixStream, request: Request) -> std::io::Result<()> {
        if let Err((order, reason)) = self.admit(&request).await {
            warn!(order, %reason, "broker: the chain does not allow this; refused");
            let refusal = Reply::Failed(WireError::NotAllowed { order, reason });
            return write_frame(&mut stream, &refusal).await;
        }
        let p = &self.provisioner;
        let reply = match request {
            Request::Scope => Reply::Scope(p.config().scope.clone()),
            Request::Ensure(spec) => p
                .ensure(&spec)
                .await
                .map_or_else(failed, |l| Reply::Lease(Box::new(l))),
            Request::PullStats => Reply::PullStats(p.pull_stats()),
            Request::Datasets => Reply::Datasets(p.dataset_statuses()),
            Request::PullImage { repository, digest } => p
                .client_image(&repository, &digest)
                .await
                .map_or_else(failed, |_| Reply::Done),
            Request::Orders => p.orders().await.map_or_else(failed, Reply::Orders),
            Request::AdoptAll => p.adopt(|_| true).await.map_or_else(failed, Reply::Orders),
            Request::Traffic { order } => {
                p.traffic(order).await.map_or_else(failed, Reply::Traffic)
            }
            Request::Stop { order } => p.stop(order).await.map_or_else(failed, |()| Reply::Done),
            Request::Release { order } => {
                p.release(order).await.map_or_else(failed, |()| Reply::Done)
            }
            Request::ReconcileNetwork => p
                .reconcile_network()
                .await
                .map_or_else(failed, Reply::Reconciled),
            Request::Connect { order, host, port } => {
                match p.connect_tcp(order, &host, port).await {
                    Ok(tcp) => {
                        info!(order, %host, port, "forward dialled for the gateway");
                        let tcp = tcp.into_std()?;
                        write_frame(&mut stream, &Reply::Connected).await?;
                        return send_fds(&stream, &[tcp.as_fd()]).await;
                    }
                    Err(e) => failed(e),
                }
            }
            Request::Exec { order, request } => match p.exec(order, request).await {
                Ok(process) => return serve_process(stream, process).await,
                Err(e) => failed(e),
            },
        };
        write_frame(&mut stream, &reply).await
    }
}

/// Hands the process's stdio over, then serves its control until the gateway hangs up or the
/// process has ended and its exit was told.
async fn serve_process(
    stream: UnixStream,
    process: shale_provisioner::Process,
) -> std::io::Result<()> {
    let (stdin, stdout, stderr, handle) = process.into_fds()?;
    let exec_id = handle.exec_id().to_string();
    let mut stream = stream;
    write_frame(
        &mut stream,
        &Reply::Started {
            exec_id,
            stderr: stderr.is_some(),
        },
    )
    .await?;
    let mut fds = vec![stdin.as_fd(), stdout.as_fd()];
    if let Some(e) = &stderr {
        fds.push(e.as_fd());
    }
    send_fds(&stream, &fds).await?;
    // Our copies go: the gateway's are the only reader of the output, so a gateway that dies
    // leaves the process writing to no one (EPIPE), as sshd's children see a dead sshd.
    drop((stdin, stdout, stderr));

    let (mut reader, writer) = stream.into_split();
    let writer = Arc::new(Mutex::new(writer));
    let ended = {
        let (handle, writer) = (handle.clone(), writer.clone());
        tokio::spawn(async move {
            let status = handle.wait().await.map_err(|e| WireError::from(&e));
            let _ = send(&writer, &ControlEvent::Ended(status)).await;
        })
    };
    loop {
        match read_frame::<Control>(&mut reader).await {
            Ok(Some(control)) => {
                let answer = match control {
                    Control::Resize(size) => handle.resize(size).await,
                    Control::Signal(sig) => handle.signal(sig).await,
                    Control::CloseStdin => handle.close_stdin().await,
                };
                send(
                    &writer,
                    &ControlEvent::Answered(answer.map_err(|e| WireError::from(&e))),
                )
                .await?;
            }
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "broker: unreadable process control; closed");
                break;
            }
        }
    }
    // The gateway hung up (its channel closed, or it died): the process gets end-of-input, as
    // with a client that goes away, and runs on to its own end.
    close_input(&handle).await;
    ended.abort();
    Ok(())
}

async fn close_input(handle: &ProcessHandle) {
    if handle.try_wait().is_none() {
        if let Err(e) = handle.close_stdin().await {
            debug!(error = %e, "broker: could not close a hung-up process's input");
        }
    }
}

async fn send(writer: &Mutex<OwnedWriteHalf>, event: &ControlEvent) -> std::io::Result<()> {
    write_frame(&mut *writer.lock().await, event).await
}

fn failed(e: ProvisionError) -> Reply {
    Reply::Failed(WireError::from(&e))
}

fn refused(reason: &str) -> Reply {
    Reply::Failed(WireError::Refused {
        reason: reason.to_string(),
    })
}

fn order_of(request: &Request) -> Option<u64> {
    match request {
        Request::Ensure(spec) => Some(spec.order),
        Request::Exec { order, .. }
        | Request::Connect { order, .. }
        | Request::Traffic { order }
        | Request::Stop { order }
        | Request::Release { order } => Some(*order),
        Request::Scope
        | Request::Orders
        | Request::AdoptAll
        | Request::ReconcileNetwork
        | Request::PullStats
        | Request::Datasets
        | Request::PullImage { .. } => None,
    }
}

/// What no honest gateway sends; the provisioner validates the rest.
fn check(request: &Request) -> Result<(), String> {
    match request {
        Request::Exec { request, .. } => check_exec(request),
        Request::Connect { host, port, .. } => {
            if host.is_empty() || host.len() > MAX_HOST || host.contains('\0') {
                return Err(format!("{} bytes is no host name", host.len()));
            }
            if *port == 0 {
                return Err("port 0 cannot be dialled".into());
            }
            Ok(())
        }
        Request::Ensure(spec) => check_lease(spec),
        Request::PullImage { repository, digest } => {
            if repository.is_empty() || repository.len() > MAX_REPOSITORY {
                return Err(format!("{} bytes is no image repository", repository.len()));
            }
            let hex = digest.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("an image is pulled by its sha256 digest only".into());
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_exec(request: &ExecRequest) -> Result<(), String> {
    if request.argv.is_empty() || request.argv.len() > MAX_ARGS {
        return Err(format!(
            "{} arguments (1 to {MAX_ARGS} allowed)",
            request.argv.len()
        ));
    }
    if request.env.len() > MAX_ENV {
        return Err(format!(
            "{} environment variables (at most {MAX_ENV})",
            request.env.len()
        ));
    }
    let nul = request.argv.iter().any(|a| a.contains('\0'))
        || request
            .cwd
            .as_ref()
            .is_some_and(|c| c.contains('\0') || !c.starts_with('/'))
        || request
            .env
            .iter()
            .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'));
    if nul {
        return Err("a NUL byte, a relative working directory or a malformed variable name".into());
    }
    Ok(())
}

fn check_lease(spec: &LeaseSpec) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    if spec.cpus == 0 || spec.cpus > cpus {
        return Err(format!(
            "{} CPUs for order {} (this host has {cpus})",
            spec.cpus, spec.order
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_exec_requests_are_refused_before_the_runtime_sees_them() {
        let ok = ExecRequest {
            argv: vec!["true".into()],
            ..ExecRequest::default()
        };
        assert!(check_exec(&ok).is_ok());
        for bad in [
            ExecRequest::default(),
            ExecRequest {
                argv: vec!["a\0b".into()],
                ..ExecRequest::default()
            },
            ExecRequest {
                argv: vec!["sh".into()],
                env: vec![("A=B".into(), "c".into())],
                ..ExecRequest::default()
            },
            ExecRequest {
                argv: vec!["sh".into()],
                cwd: Some("relative".into()),
                ..ExecRequest::default()
            },
            ExecRequest {
                argv: vec!["x".into(); MAX_ARGS + 1],
                ..ExecRequest::default()
            },
        ] {
            assert!(check_exec(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_dial_needs_a_host_and_a_port() {
        let dial = |host: &str, port| Request::Connect {
            order: 1,
            host: host.into(),
            port,
        };
        assert!(check(&dial("localhost", 22)).is_ok());
        assert!(check(&dial("", 22)).is_err());
        assert!(check(&dial("localhost", 0)).is_err());
        assert!(check(&dial(&"a".repeat(300), 22)).is_err());
    }

    #[test]
    fn a_pull_names_a_repository_and_a_sha256_digest() {
        let pull = |repository: &str, digest: &str| Request::PullImage {
            repository: repository.into(),
            digest: digest.into(),
        };
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert!(check(&pull("registry.example:5000/me/tools", &digest)).is_ok());
        assert!(check(&pull("", &digest)).is_err());
        assert!(check(&pull(&"a".repeat(2000), &digest)).is_err());
        for bad in [
            "latest",
            "sha256:ab",
            "sha512:00",
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert!(check(&pull("r.example/x", bad)).is_err(), "{bad}");
        }
    }
}
