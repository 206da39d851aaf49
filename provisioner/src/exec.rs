//! Processes inside an order's container: stdio over containerd FIFOs, PTY, signals, exit.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::{
    CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, KillRequest, ResizePtyRequest,
    StartRequest, WaitRequest,
};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tracing::{debug, instrument, warn, Instrument};

use crate::ctd::{is_not_found, Ctd};
use crate::tty::{self, TtyMaster};
use crate::{spec, ProvisionError, Provisioner};

pub(crate) const PROCESS_SPEC_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// How long the shim gets to open its ends of the FIFOs after `Start`.
const FIFO_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Terminal size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// A command to run in an order's container.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the container's `PATH`.
    pub argv: Vec<String>,
    /// Added to (and overriding) the container's environment.
    pub env: Vec<(String, String)>,
    /// Allocate a pseudo-terminal of this size; stdout then carries both output streams.
    pub tty: Option<PtySize>,
    /// Working directory; the order's volume (`/work`) when `None`.
    pub cwd: Option<String>,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// A running process: its streams and a handle to control it.
pub struct Process {
    pub stdin: ProcessStdin,
    pub stdout: ProcessOutput,
    /// `None` with a TTY: the terminal merges both output streams into `stdout`.
    pub stderr: Option<ProcessOutput>,
    pub handle: ProcessHandle,
}

#[derive(Clone, Debug)]
enum Outcome {
    Exited(u32),
    Lost(String),
}

/// A process's control as containerd runs it (the runtime side of a [`ProcessHandle`]).
struct ContainerdProcess {
    ctd: Ctd,
    socket: PathBuf,
    order: u64,
    container_id: String,
    exec_id: String,
    exit: watch::Receiver<Option<Outcome>>,
    /// Signals delivered through this handle, to tell "killed by signal N" from "exit 128+N"
    /// (containerd reports both as 128+N).
    signals_sent: Mutex<Vec<i32>>,
}

/// What controls a running process, wherever it runs: containerd here, or a privileged broker
/// on the other side of a socket. A [`ProcessHandle`] is one of these behind an `Arc`.
pub trait ProcessControl: Send + Sync + 'static {
    /// The runtime's id of this process within the order's container.
    fn exec_id(&self) -> &str;
    /// Changes the PTY size (no effect without a TTY).
    fn resize(&self, size: PtySize) -> BoxFuture<'_, Result<(), ProvisionError>>;
    /// Delivers a signal to the process (not to its children).
    fn signal(&self, signal: i32) -> BoxFuture<'_, Result<(), ProvisionError>>;
    /// The far side's half of end-of-file on stdin (the handle drops its own writer first).
    fn close_stdin(&self) -> BoxFuture<'_, Result<(), ProvisionError>>;
    /// Waits for the process to end.
    fn wait(&self) -> BoxFuture<'_, Result<ExitStatus, ProvisionError>>;
    /// The exit status if the process has ended, without waiting.
    fn try_wait(&self) -> Option<Result<ExitStatus, ProvisionError>>;
}

/// Controls a running process; clone it freely, every clone may wait.
#[derive(Clone)]
pub struct ProcessHandle {
    control: Arc<dyn ProcessControl>,
    stdin: Arc<StdinShared>,
}

impl std::fmt::Debug for ProcessHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessHandle")
            .field("exec_id", &self.control.exec_id())
            .finish()
    }
}

impl ProcessHandle {
    /// The runtime's id of this process within the order's container.
    pub fn exec_id(&self) -> &str {
        self.control.exec_id()
    }

    /// Changes the PTY size (no effect without a TTY).
    pub async fn resize(&self, size: PtySize) -> Result<(), ProvisionError> {
        self.control.resize(size).await
    }

    /// Delivers a signal to the process (not to its children).
    pub async fn signal(&self, signal: i32) -> Result<(), ProvisionError> {
        self.control.signal(signal).await
    }

    /// Delivers end-of-file on the process's stdin: closes our writer and the runtime's.
    pub async fn close_stdin(&self) -> Result<(), ProvisionError> {
        self.stdin.close_local();
        self.control.close_stdin().await
    }

    /// Waits for the process to end. Fails with [`ProvisionError::DaemonUnreachable`] when the
    /// runtime goes away before it reports the exit.
    pub async fn wait(&self) -> Result<ExitStatus, ProvisionError> {
        self.control.wait().await
    }

    /// The exit status if the process has ended, without waiting.
    pub fn try_wait(&self) -> Option<Result<ExitStatus, ProvisionError>> {
        self.control.try_wait()
    }
}

impl ProcessControl for ContainerdProcess {
    fn exec_id(&self) -> &str {
        &self.exec_id
    }

    fn resize(&self, size: PtySize) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async move {
            self.ctd
                .tasks()
                .resize_pty(self.ctd.req(ResizePtyRequest {
                    container_id: self.container_id.clone(),
                    exec_id: self.exec_id.clone(),
                    width: u32::from(size.cols.max(1)),
                    height: u32::from(size.rows.max(1)),
                }))
                .await
                .map_err(|s| self.error("resize the terminal", s))?;
            Ok(())
        })
    }

    fn signal(&self, signal: i32) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async move {
            if signal <= 0 || signal > 64 {
                return Err(ProvisionError::ExecFailed {
                    order: self.order,
                    reason: format!("{signal} is not a signal number"),
                });
            }
            self.signals_sent
                .lock()
                .expect("signal list poisoned")
                .push(signal);
            match self
                .ctd
                .tasks()
                .kill(self.ctd.req(KillRequest {
                    container_id: self.container_id.clone(),
                    exec_id: self.exec_id.clone(),
                    signal: signal as u32,
                    all: false,
                }))
                .await
            {
                Ok(_) => Ok(()),
                // It already ended; the signal has nothing to reach.
                Err(s) if is_not_found(&s) => Ok(()),
                Err(s) if s.message().contains("process already finished") => Ok(()),
                Err(s) => Err(self.error("deliver the signal", s)),
            }
        })
    }

    fn close_stdin(&self) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async move {
            close_io(&self.ctd, &self.container_id, &self.exec_id)
                .await
                .map_err(|s| self.error("close stdin", s))
        })
    }

    fn wait(&self) -> BoxFuture<'_, Result<ExitStatus, ProvisionError>> {
        Box::pin(async move {
            let mut rx = self.exit.clone();
            let outcome = match rx.wait_for(|o| o.is_some()).await {
                Ok(o) => o.clone().expect("checked is_some"),
                Err(_) => Outcome::Lost("the process watcher ended".into()),
            };
            self.status(outcome)
        })
    }

    fn try_wait(&self) -> Option<Result<ExitStatus, ProvisionError>> {
        let outcome = self.exit.borrow().clone()?;
        Some(self.status(outcome))
    }
}

impl ContainerdProcess {
    fn status(&self, outcome: Outcome) -> Result<ExitStatus, ProvisionError> {
        match outcome {
            Outcome::Exited(code) => Ok(self.exit_status(code)),
            Outcome::Lost(reason) => Err(ProvisionError::DaemonUnreachable {
                socket: self.socket.clone(),
                reason,
            }),
        }
    }

    fn exit_status(&self, code: u32) -> ExitStatus {
        let code = code as i32;
        if code > 128 && code <= 128 + 64 {
            return signal_status(code - 128, &self.signals_sent);
        }
        ExitStatus::Code(code)
    }

    fn error(&self, action: &str, s: tonic::Status) -> ProvisionError {
        if is_not_found(&s) {
            return ProvisionError::NotProvisioned { order: self.order };
        }
        match self.ctd.status(action, s) {
            ProvisionError::Runtime { action, status } => ProvisionError::ExecFailed {
                order: self.order,
                reason: format!("{action}: {status}"),
            },
            other => other,
        }
    }
}

/// How a process that died of `sig` is reported, on either path: as the signal when its handle
/// sent it, or for SIGKILL (what the kernel's OOM killer and `kill -9` use); otherwise as the
/// shell's 128+N. containerd reports both as 128+N and cannot tell a signal from an exit code,
/// so the agent's path, which can, reports alike: a client sees the same status either way.
pub(crate) fn signal_status(sig: i32, sent: &Mutex<Vec<i32>>) -> ExitStatus {
    let sent = sent.lock().expect("signal list poisoned").contains(&sig);
    if sent || sig == nix::sys::signal::Signal::SIGKILL as i32 {
        ExitStatus::Signal(sig)
    } else {
        ExitStatus::Code(128 + sig)
    }
}

async fn close_io(ctd: &Ctd, container_id: &str, exec_id: &str) -> Result<(), tonic::Status> {
    match ctd
        .tasks()
        .close_io(ctd.req(CloseIoRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdin: true,
        }))
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if is_not_found(&s) => Ok(()),
        Err(s) => Err(s),
    }
}

/// Our writer on the process's stdin: a FIFO or pipe, or a terminal's master.
pub(crate) enum Writer {
    Pipe(pipe::Sender),
    Tty(TtyMaster),
}

impl Writer {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Writer::Pipe(p) => p.as_fd(),
            Writer::Tty(t) => t.as_fd(),
        }
    }
}

/// Our reader of one of the process's outputs: a FIFO or pipe, or a terminal's master.
pub(crate) enum Reader {
    Pipe(pipe::Receiver),
    Tty(TtyMaster),
}

/// Our writer on the stdin, shared with the handle so `close_stdin` can drop it.
struct StdinShared {
    sender: Mutex<Option<Writer>>,
}

impl StdinShared {
    fn close_local(&self) {
        self.sender.lock().expect("stdin lock poisoned").take();
    }
}

/// The process's stdin. Shutting it down (`AsyncWriteExt::shutdown`) delivers EOF, like
/// [`ProcessHandle::close_stdin`]. Merely dropping it does not: containerd's shim keeps a
/// writer of its own until told, so a dropped stdin looks like an idle one to the process.
pub struct ProcessStdin {
    shared: Arc<StdinShared>,
    control: Arc<dyn ProcessControl>,
    closing: Option<BoxFuture<'static, Result<(), ProvisionError>>>,
}

impl AsyncWrite for ProcessStdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut guard = self.shared.sender.lock().expect("stdin lock poisoned");
        match guard.as_mut() {
            Some(Writer::Pipe(s)) => Pin::new(s).poll_write(cx, buf),
            Some(Writer::Tty(t)) => Pin::new(t).poll_write(cx, buf),
            None => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin is closed",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut guard = self.shared.sender.lock().expect("stdin lock poisoned");
        match guard.as_mut() {
            Some(Writer::Pipe(s)) => Pin::new(s).poll_flush(cx),
            Some(Writer::Tty(t)) => Pin::new(t).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closing.is_none() {
            this.shared.close_local();
            let control = this.control.clone();
            this.closing = Some(Box::pin(async move { control.close_stdin().await }));
        }
        let closing = this.closing.as_mut().expect("set above");
        closing.as_mut().poll(cx).map_err(io::Error::other)
    }
}

/// One of the process's output streams; reads end (0 bytes) when the process has exited and
/// everything it wrote has been read.
pub struct ProcessOutput {
    receiver: Reader,
}

impl ProcessOutput {
    pub(crate) fn new(receiver: Reader) -> Self {
        Self { receiver }
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        match self.receiver {
            Reader::Pipe(p) => p.into_nonblocking_fd(),
            Reader::Tty(t) => Ok(t.into_fd()),
        }
    }

    /// A reader of a descriptor from a broker: a pipe or FIFO, or a terminal's master.
    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let receiver = if tty::is_terminal(&fd) {
            Reader::Tty(TtyMaster::new(fd)?)
        } else {
            Reader::Pipe(pipe::Receiver::from_owned_fd(fd)?)
        };
        Ok(Self { receiver })
    }
}

impl AsyncRead for ProcessOutput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.receiver {
            Reader::Pipe(p) => Pin::new(p).poll_read(cx, buf),
            Reader::Tty(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

/// The FIFOs' buffer: bulk output moves between the shim and the gateway in larger, fewer
/// chunks than with the kernel's 64 KiB default. Pages are allocated only as data waits in it.
const FIFO_BUFFER_BYTES: i32 = 1 << 20;

/// Widens a FIFO's buffer to `FIFO_BUFFER_BYTES`; best effort (the kernel caps it at
/// `/proc/sys/fs/pipe-max-size`, and a smaller buffer only costs speed).
fn widen_fifo(fifo: &impl std::os::fd::AsFd) {
    if let Err(e) = nix::fcntl::fcntl(fifo, nix::fcntl::FcntlArg::F_SETPIPE_SZ(FIFO_BUFFER_BYTES)) {
        tracing::debug!(error = %e, "could not widen a FIFO");
    }
}

/// Opens the read end of a FIFO; blocks (on a blocking thread) until the shim opens the writer.
fn open_reader(path: PathBuf) -> tokio::task::JoinHandle<io::Result<std::fs::File>> {
    tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().read(true).open(path))
}

/// Releases a reader still blocked in `open` (the shim never came) by opening the other end.
fn unblock_reader(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path);
}

/// Opens the writer end of the output FIFOs when dropped, unless disarmed: see
/// [`unblock_reader`].
struct ReleaseReaders {
    paths: Option<(PathBuf, PathBuf)>,
}

impl ReleaseReaders {
    fn disarm(mut self) {
        self.paths = None;
    }
}

impl Drop for ReleaseReaders {
    fn drop(&mut self) {
        if let Some((out, err)) = self.paths.take() {
            unblock_reader(&out);
            unblock_reader(&err);
        }
    }
}

impl ReleaseReaders {
    fn new(stdout: &Path, stderr: &Path) -> Self {
        Self {
            paths: Some((stdout.to_path_buf(), stderr.to_path_buf())),
        }
    }
}

fn mkfifo(path: &Path) -> Result<(), ProvisionError> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| ProvisionError::io("create FIFO", path, e.into()))
}

impl Provisioner {
    /// Starts a process in the order's running container, with its stdio wired to async streams.
    ///
    /// Fails with [`ProvisionError::NotProvisioned`] when the order has no running container and
    /// with [`ProvisionError::ExecFailed`] when the command cannot start (e.g. not found).
    #[instrument(skip(self, req), fields(order))]
    pub async fn exec(&self, order: u64, req: ExecRequest) -> Result<Process, ProvisionError> {
        if req.argv.is_empty() {
            return Err(ProvisionError::ExecFailed {
                order,
                reason: "no command given".into(),
            });
        }
        let ctd = self.inner.ctd.clone();
        let container_id = self.container_id(order);
        let mut env: Vec<String> = self.order_env(order).await?.as_ref().clone();
        for (k, v) in &req.env {
            let prefix = format!("{k}=");
            env.retain(|e| !e.starts_with(&prefix));
            env.push(format!("{k}={v}"));
        }
        let cwd = req
            .cwd
            .clone()
            .unwrap_or_else(|| self.inner.config.work_dir.clone());
        if let Some(started) = self.exec_by_agent(order, &req, &env, &cwd).await {
            return started;
        }
        let seq = self.inner.exec_seq.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let exec_id = format!("x{seq}-{}-{nanos}", std::process::id());
        let span = tracing::info_span!("exec", order, exec = %exec_id);
        debug!(parent: &span, argv = ?req.argv, tty = req.tty.is_some(), "exec");

        let dir = self.fifo_dir(order).join(&exec_id);
        std::fs::create_dir_all(&dir).map_err(|e| ProvisionError::io("create", &dir, e))?;
        let cleanup_dir = |d: &Path| {
            let _ = std::fs::remove_dir_all(d);
        };
        let (stdin_path, stdout_path, stderr_path) =
            (dir.join("stdin"), dir.join("stdout"), dir.join("stderr"));
        let tty = req.tty;
        let made = (|| {
            mkfifo(&stdin_path)?;
            mkfifo(&stdout_path)?;
            if tty.is_none() {
                mkfifo(&stderr_path)?;
            }
            Ok::<(), ProvisionError>(())
        })();
        if let Err(e) = made {
            cleanup_dir(&dir);
            return Err(e);
        }
        // Read-write keeps the open from blocking before the shim is there; EOF comes from
        // dropping this writer plus CloseIO (the shim holds a writer of its own).
        let sender = match pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&stdin_path)
        {
            Ok(s) => s,
            Err(e) => {
                cleanup_dir(&dir);
                return Err(ProvisionError::io("open stdin FIFO", &stdin_path, e));
            }
        };
        widen_fifo(&sender);

        let process_spec = spec::process(
            &self.inner.config,
            &req.argv,
            &env,
            &cwd,
            tty.map(|t| (t.cols, t.rows)),
        );
        let process_spec = match process_spec {
            Ok(p) => p,
            Err(e) => {
                cleanup_dir(&dir);
                return Err(e);
            }
        };
        let exec_req = ExecProcessRequest {
            container_id: container_id.clone(),
            stdin: stdin_path.display().to_string(),
            stdout: stdout_path.display().to_string(),
            stderr: if tty.is_some() {
                String::new()
            } else {
                stderr_path.display().to_string()
            },
            terminal: tty.is_some(),
            spec: Some(prost_types::Any {
                type_url: PROCESS_SPEC_TYPE_URL.into(),
                value: serde_json::to_vec(&process_spec).expect("process spec serializes"),
            }),
            exec_id: exec_id.clone(),
        };
        let exec_failed = |what: &str, s: tonic::Status| {
            // No task, or a task that has stopped (its init died, e.g. OOM): the caller can
            // `ensure` the order again and retry.
            // (containerd 1.6 reports the latter as Unknown, so the message decides.)
            if is_not_found(&s)
                || s.code() == tonic::Code::FailedPrecondition
                || s.message().contains("in a stopped state")
            {
                return ProvisionError::NotProvisioned { order };
            }
            match ctd.status(what, s) {
                ProvisionError::Runtime { status, .. } => ProvisionError::ExecFailed {
                    order,
                    reason: status,
                },
                other => other,
            }
        };
        if let Err(s) = ctd.tasks().exec(ctd.req(exec_req)).await {
            cleanup_dir(&dir);
            return Err(exec_failed("start the process", s));
        }

        let stdout_open = open_reader(stdout_path.clone());
        let stderr_open = tty.is_none().then(|| open_reader(stderr_path.clone()));
        // If this future is dropped (the session's task cancelled) or fails before both readers
        // are open, the blocking opens would wait forever for a shim that never comes, and hold
        // the runtime's shutdown with them: release them on every way out but success.
        let readers_pending = ReleaseReaders::new(&stdout_path, &stderr_path);
        let started = ctd
            .tasks()
            .start(ctd.req(StartRequest {
                container_id: container_id.clone(),
                exec_id: exec_id.clone(),
            }))
            .await;
        if let Err(s) = started {
            unblock_reader(&stdout_path);
            unblock_reader(&stderr_path);
            let _ = stdout_open.await;
            if let Some(h) = stderr_open {
                let _ = h.await;
            }
            let _ = ctd
                .tasks()
                .delete_process(ctd.req(DeleteProcessRequest {
                    container_id: container_id.clone(),
                    exec_id: exec_id.clone(),
                }))
                .await;
            cleanup_dir(&dir);
            return Err(exec_failed("start the process", s));
        }

        let open = async {
            let out = stdout_open.await.map_err(io::Error::other)??;
            let err = match stderr_open {
                Some(h) => Some(h.await.map_err(io::Error::other)??),
                None => None,
            };
            Ok::<_, io::Error>((out, err))
        };
        let (out_file, err_file) = match tokio::time::timeout(FIFO_OPEN_TIMEOUT, open).await {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => return Err(ProvisionError::io("open output FIFO", &stdout_path, e)),
            Err(_) => {
                unblock_reader(&stdout_path);
                unblock_reader(&stderr_path);
                return Err(ProvisionError::ExecFailed {
                    order,
                    reason: "the runtime never opened the process's output".into(),
                });
            }
        };
        readers_pending.disarm();
        widen_fifo(&out_file);
        if let Some(f) = &err_file {
            widen_fifo(f);
        }
        let stdout = ProcessOutput::new(Reader::Pipe(
            pipe::Receiver::from_file(out_file)
                .map_err(|e| ProvisionError::io("open output FIFO", &stdout_path, e))?,
        ));
        let stderr = match err_file {
            Some(f) => Some(ProcessOutput::new(Reader::Pipe(
                pipe::Receiver::from_file(f)
                    .map_err(|e| ProvisionError::io("open output FIFO", &stderr_path, e))?,
            ))),
            None => None,
        };

        let (exit_tx, exit_rx) = watch::channel(None);
        let watcher_ctd = ctd.clone();
        let (cid, eid) = (container_id.clone(), exec_id.clone());
        tokio::spawn(
            async move {
                let waited = watcher_ctd
                    .tasks()
                    .wait(watcher_ctd.req_long(WaitRequest {
                        container_id: cid.clone(),
                        exec_id: eid.clone(),
                    }))
                    .await;
                let outcome = match waited {
                    Ok(resp) => Outcome::Exited(resp.into_inner().exit_status),
                    Err(s) => {
                        warn!(error = %s.message(), "lost track of the process");
                        Outcome::Lost(format!("lost track of the process: {}", s.message()))
                    }
                };
                debug!(?outcome, "process ended");
                let _ = exit_tx.send(Some(outcome.clone()));
                if let Outcome::Exited(_) = outcome {
                    let _ = watcher_ctd
                        .tasks()
                        .delete_process(watcher_ctd.req(DeleteProcessRequest {
                            container_id: cid,
                            exec_id: eid,
                        }))
                        .await;
                }
                let _ = tokio::fs::remove_dir_all(&dir).await;
            }
            .instrument(span),
        );

        let control: Arc<dyn ProcessControl> = Arc::new(ContainerdProcess {
            ctd,
            socket: self.inner.config.socket.clone(),
            order,
            container_id,
            exec_id,
            exit: exit_rx,
            signals_sent: Mutex::new(Vec::new()),
        });
        Ok(Process::assemble(
            Writer::Pipe(sender),
            stdout,
            stderr,
            control,
        ))
    }
}

impl Process {
    pub(crate) fn assemble(
        stdin: Writer,
        stdout: ProcessOutput,
        stderr: Option<ProcessOutput>,
        control: Arc<dyn ProcessControl>,
    ) -> Process {
        let shared = Arc::new(StdinShared {
            sender: Mutex::new(Some(stdin)),
        });
        Process {
            stdin: ProcessStdin {
                shared: shared.clone(),
                control: control.clone(),
                closing: None,
            },
            stdout,
            stderr,
            handle: ProcessHandle {
                control,
                stdin: shared,
            },
        }
    }

    /// A process whose stdio arrived as file descriptors (from a privileged broker) and whose
    /// control is `control`. Each descriptor must be a pipe or FIFO end of the right direction,
    /// or a terminal's master (checked, and set non-blocking): anything else is refused.
    pub fn from_fds(
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: Option<OwnedFd>,
        control: Arc<dyn ProcessControl>,
    ) -> io::Result<Process> {
        let stdin = if tty::is_terminal(&stdin) {
            Writer::Tty(TtyMaster::new(stdin)?)
        } else {
            Writer::Pipe(pipe::Sender::from_owned_fd(stdin)?)
        };
        let stdout = ProcessOutput::from_fd(stdout)?;
        let stderr = match stderr {
            Some(fd) => Some(ProcessOutput::from_fd(fd)?),
            None => None,
        };
        Ok(Process::assemble(stdin, stdout, stderr, control))
    }

    /// Takes the process apart for a broker to hand on: duplicates of its stdio descriptors,
    /// and the handle, which keeps its own stdin writer until [`ProcessHandle::close_stdin`].
    pub fn into_fds(self) -> io::Result<(OwnedFd, OwnedFd, Option<OwnedFd>, ProcessHandle)> {
        let stdin = {
            let guard = self
                .stdin
                .shared
                .sender
                .lock()
                .expect("stdin lock poisoned");
            match guard.as_ref() {
                Some(sender) => sender.as_fd().try_clone_to_owned()?,
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stdin is closed")),
            }
        };
        let stdout = self.stdout.into_fd()?;
        let stderr = match self.stderr {
            Some(e) => Some(e.into_fd()?),
            None => None,
        };
        Ok((stdin, stdout, stderr, self.handle))
    }
}
