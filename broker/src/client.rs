//! The unprivileged side: [`Machines`] over the broker's socket, for the SSH process.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use shale_provisioner::{
    DatasetStatus, ExecRequest, ExitStatus, Lease, LeaseSpec, Machines, Process, ProcessControl,
    ProvisionError, PtySize, PullStats, Reconciled, Traffic,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch, Mutex};

use crate::frame::{read_frame, recv_fds, write_frame};
use crate::protocol::{Control, ControlEvent, Envelope, Reply, Request, WireError, VERSION};

/// The machines of a gateway whose privileged work is done by a broker at `socket`. Each call
/// is one connection; a running process keeps its own until it ends.
#[derive(Clone, Debug)]
pub struct BrokerClient {
    socket: PathBuf,
    scope: String,
}

impl BrokerClient {
    /// Connects to the broker at `socket` and learns the containers' scope. Fails with
    /// [`ProvisionError::DaemonUnreachable`] (naming the socket) when no broker answers there.
    pub async fn connect(socket: impl Into<PathBuf>) -> Result<Self, ProvisionError> {
        let mut client = Self {
            socket: socket.into(),
            scope: String::new(),
        };
        client.scope = match client.call(Request::Scope).await?.1 {
            Reply::Scope(scope) => scope,
            other => return Err(client.unexpected(&other)),
        };
        Ok(client)
    }

    /// The broker's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call(&self, request: Request) -> Result<(UnixStream, Reply), ProvisionError> {
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.lost(format!("cannot connect: {e}")))?;
        write_frame(
            &mut stream,
            &Envelope {
                version: VERSION,
                request,
            },
        )
        .await
        .map_err(|e| self.lost(format!("sending the request: {e}")))?;
        match read_frame::<Reply>(&mut stream).await {
            Ok(Some(Reply::Failed(e))) => Err(e.into_provision_error(&self.socket)),
            Ok(Some(reply)) => Ok((stream, reply)),
            Ok(None) => Err(self.lost("the broker hung up without a reply".into())),
            Err(e) => Err(self.lost(format!("reading the reply: {e}"))),
        }
    }

    /// Has the broker pull a client's own image, `repository@digest` (`sha256:…`), ahead of its
    /// order's first login. Refused for a registry the broker's config does not allow.
    pub async fn pull_image(&self, repository: &str, digest: &str) -> Result<(), ProvisionError> {
        match self
            .simple(Request::PullImage {
                repository: repository.to_string(),
                digest: digest.to_string(),
            })
            .await?
        {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn simple(&self, request: Request) -> Result<Reply, ProvisionError> {
        Ok(self.call(request).await?.1)
    }

    fn lost(&self, reason: String) -> ProvisionError {
        ProvisionError::DaemonUnreachable {
            socket: self.socket.clone(),
            reason: format!("the broker: {reason}"),
        }
    }

    fn unexpected(&self, reply: &Reply) -> ProvisionError {
        self.lost(format!("an unexpected reply {reply:?}"))
    }

    async fn exec_remote(
        &self,
        order: u64,
        request: ExecRequest,
    ) -> Result<Process, ProvisionError> {
        let (stream, reply) = self.call(Request::Exec { order, request }).await?;
        let Reply::Started { exec_id, stderr } = reply else {
            return Err(self.unexpected(&reply));
        };
        let count = if stderr { 3 } else { 2 };
        let mut fds = recv_fds(&stream, count)
            .await
            .map_err(|e| self.lost(format!("receiving the process's stdio: {e}")))?
            .into_iter();
        let (stdin, stdout) = (fds.next().expect("counted"), fds.next().expect("counted"));
        let stderr: Option<OwnedFd> = fds.next();
        let control = RemoteProcess::start(stream, exec_id, self.socket.clone());
        Process::from_fds(stdin, stdout, stderr, control)
            .map_err(|e| self.lost(format!("the process's stdio is not a pipe: {e}")))
    }

    async fn connect_remote(
        &self,
        order: u64,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, ProvisionError> {
        let (stream, reply) = self
            .call(Request::Connect {
                order,
                host: host.to_string(),
                port,
            })
            .await?;
        if !matches!(reply, Reply::Connected) {
            return Err(self.unexpected(&reply));
        }
        let fd = recv_fds(&stream, 1)
            .await
            .map_err(|e| self.lost(format!("receiving the connection: {e}")))?
            .pop()
            .expect("counted");
        tcp_from(fd).map_err(|e| self.lost(format!("the connection is not a TCP socket: {e}")))
    }
}

/// A received descriptor as a TCP stream, once it is checked to be a stream socket.
fn tcp_from(fd: OwnedFd) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{getsockopt, sockopt::SockType, SockType as Kind};
    if getsockopt(&fd, SockType).map_err(std::io::Error::from)? != Kind::Stream {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a stream socket",
        ));
    }
    let std = std::net::TcpStream::from(fd);
    // A TCP socket has a TCP peer; anything else (a unix socket) has no IP address.
    std.peer_addr()?;
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

macro_rules! expect_reply {
    ($self:ident, $reply:expr, $pat:pat => $out:expr) => {
        match $reply {
            $pat => Ok($out),
            other => Err($self.unexpected(&other)),
        }
    };
}

impl Machines for BrokerClient {
    fn scope(&self) -> &str {
        &self.scope
    }

    fn ensure<'a>(&'a self, spec: &'a LeaseSpec) -> BoxFuture<'a, Result<Lease, ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::Ensure(spec.clone())).await?;
            expect_reply!(self, reply, Reply::Lease(lease) => *lease)
        })
    }

    fn exec(&self, order: u64, req: ExecRequest) -> BoxFuture<'_, Result<Process, ProvisionError>> {
        Box::pin(self.exec_remote(order, req))
    }

    fn connect_tcp<'a>(
        &'a self,
        order: u64,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<TcpStream, ProvisionError>> {
        Box::pin(self.connect_remote(order, host, port))
    }

    fn orders(&self) -> BoxFuture<'_, Result<Vec<u64>, ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::Orders).await?;
            expect_reply!(self, reply, Reply::Orders(o) => o)
        })
    }

    fn traffic(&self, order: u64) -> BoxFuture<'_, Result<Option<Traffic>, ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::Traffic { order }).await?;
            expect_reply!(self, reply, Reply::Traffic(t) => t)
        })
    }

    fn stop(&self, order: u64) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::Stop { order }).await?;
            expect_reply!(self, reply, Reply::Done => ())
        })
    }

    fn release(&self, order: u64) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::Release { order }).await?;
            expect_reply!(self, reply, Reply::Done => ())
        })
    }

    fn adopt_all(&self) -> BoxFuture<'_, Result<Vec<u64>, ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::AdoptAll).await?;
            expect_reply!(self, reply, Reply::Orders(o) => o)
        })
    }

    fn reconcile_network(&self) -> BoxFuture<'_, Result<Reconciled, ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::ReconcileNetwork).await?;
            expect_reply!(self, reply, Reply::Reconciled(r) => r)
        })
    }

    fn pull_stats(&self) -> BoxFuture<'_, Result<PullStats, ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::PullStats).await?;
            expect_reply!(self, reply, Reply::PullStats(s) => s)
        })
    }

    fn datasets(&self) -> BoxFuture<'_, Result<Vec<DatasetStatus>, ProvisionError>> {
        Box::pin(async move {
            let reply = self.simple(Request::Datasets).await?;
            expect_reply!(self, reply, Reply::Datasets(d) => d)
        })
    }
}

/// A process run by the broker, controlled over its connection.
struct RemoteProcess {
    exec_id: String,
    socket: PathBuf,
    /// Control requests go one at a time, so each answer is the one the sender waits for.
    control: Mutex<(OwnedWriteHalf, mpsc::Receiver<Result<(), WireError>>)>,
    exit: watch::Receiver<Option<Result<ExitStatus, WireError>>>,
}

impl RemoteProcess {
    fn start(stream: UnixStream, exec_id: String, socket: PathBuf) -> Arc<dyn ProcessControl> {
        let (reader, writer) = stream.into_split();
        let (answers_tx, answers_rx) = mpsc::channel(1);
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(read_events(reader, answers_tx, exit_tx, socket.clone()));
        Arc::new(RemoteProcess {
            exec_id,
            socket,
            control: Mutex::new((writer, answers_rx)),
            exit: exit_rx,
        })
    }

    async fn ask(&self, control: Control) -> Result<(), ProvisionError> {
        let mut guard = self.control.lock().await;
        let (writer, answers) = &mut *guard;
        write_frame(writer, &control)
            .await
            .map_err(|e| self.lost(format!("sending a process control: {e}")))?;
        match answers.recv().await {
            Some(answer) => answer.map_err(|e| e.into_provision_error(&self.socket)),
            None => Err(self.lost("the process's control connection ended".into())),
        }
    }

    fn lost(&self, reason: String) -> ProvisionError {
        ProvisionError::DaemonUnreachable {
            socket: self.socket.clone(),
            reason: format!("the broker: {reason}"),
        }
    }

    fn status(&self, ended: Result<ExitStatus, WireError>) -> Result<ExitStatus, ProvisionError> {
        ended.map_err(|e| e.into_provision_error(&self.socket))
    }
}

/// Routes the broker's events on a process's connection; a broken connection before the exit
/// reads as a lost process.
async fn read_events(
    mut reader: OwnedReadHalf,
    answers: mpsc::Sender<Result<(), WireError>>,
    exit: watch::Sender<Option<Result<ExitStatus, WireError>>>,
    socket: PathBuf,
) {
    let lost = |reason: String| {
        Some(Err(WireError::DaemonUnreachable {
            socket: socket.clone(),
            reason: format!("the broker lost the process: {reason}"),
        }))
    };
    loop {
        match read_frame::<ControlEvent>(&mut reader).await {
            Ok(Some(ControlEvent::Answered(answer))) => {
                if answers.send(answer).await.is_err() {
                    return;
                }
            }
            Ok(Some(ControlEvent::Ended(status))) => {
                let _ = exit.send(Some(status));
            }
            Ok(None) => {
                exit.send_if_modified(|e| {
                    e.is_none() && {
                        *e = lost("its connection ended".into());
                        true
                    }
                });
                return;
            }
            Err(e) => {
                exit.send_if_modified(|x| {
                    x.is_none() && {
                        *x = lost(e.to_string());
                        true
                    }
                });
                return;
            }
        }
    }
}

impl ProcessControl for RemoteProcess {
    fn exec_id(&self) -> &str {
        &self.exec_id
    }

    fn resize(&self, size: PtySize) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(self.ask(Control::Resize(size)))
    }

    fn signal(&self, signal: i32) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(self.ask(Control::Signal(signal)))
    }

    fn close_stdin(&self) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(self.ask(Control::CloseStdin))
    }

    fn wait(&self) -> BoxFuture<'_, Result<ExitStatus, ProvisionError>> {
        Box::pin(async move {
            let mut rx = self.exit.clone();
            let ended = match rx.wait_for(Option::is_some).await {
                Ok(e) => e.clone().expect("checked is_some"),
                Err(_) => return Err(self.lost("the process's events ended".into())),
            };
            self.status(ended)
        })
    }

    fn try_wait(&self) -> Option<Result<ExitStatus, ProvisionError>> {
        let ended = self.exit.borrow().clone()?;
        Some(self.status(ended))
    }
}
