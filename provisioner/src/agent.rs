//! The fast path for processes: the agent in each order's container starts them on stdio we
//! made, so their bytes go straight between the process and the gateway, with no shim copying
//! them in between. containerd still makes the container, its cgroup and namespaces, and starts
//! the agent itself (with the container's process spec, which its children inherit).
//!
//! The agent is the tenant's to tamper with: it runs as the container's user. So it never hands
//! us a descriptor: we make the pipes (or open the terminal in the container's `devpts`), keep
//! our ends and send it the process's. What it reports is parsed under a small cap, and a
//! report that breaks the protocol, or a spawn it does not answer in time, ends the link. Its
//! processes then end their channels with a reason. An order whose agent cannot start is served
//! by containerd's exec, as before.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_client::services::v1::{
    DeleteProcessRequest, ExecProcessRequest, KillRequest, StartRequest, WaitRequest,
};
use futures::future::BoxFuture;
use shale_agent::{
    decode, encode, Command, Report, Status, CONTAINER_BINARY, CONTAINER_LINK_DIR, LINK_SOCKET,
    MAX_COMMAND, MAX_REPORT, VERSION,
};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn, Instrument};

use crate::exec::{signal_status, Reader, Writer, PROCESS_SPEC_TYPE_URL};
use crate::tty::{self, TtyMaster};
use crate::{
    spec, ExecRequest, ExitStatus, Process, ProcessControl, ProcessOutput, ProvisionError,
    Provisioner, ProvisionerConfig, PtySize,
};

/// How long a new agent gets to connect and say hello.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent gets to answer a spawn: a fork and an exec.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);
/// After an agent failed to start, the order's processes go through containerd this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// The pipes' buffer: bulk output wakes the gateway once per MiB, not once per 64 KiB.
const PIPE_BUFFER_BYTES: i32 = 1 << 20;

/// The agent binary the config asks for: `None` when the fast path is off, or when no binary
/// was named and none is found beside this program. A binary that was named must be there and
/// be static (it runs in any image, whatever its libc).
pub(crate) fn binary(config: &ProvisionerConfig) -> Result<Option<PathBuf>, ProvisionError> {
    if !config.exec_agent {
        return Ok(None);
    }
    if let Some(path) = &config.agent {
        let path = std::fs::canonicalize(path)
            .map_err(|e| ProvisionError::io("find the agent binary", path, e))?;
        return match is_static_executable(&path) {
            Ok(true) => Ok(Some(path)),
            Ok(false) => Err(ProvisionError::Config(format!(
                "the agent {} is not a static executable; build it with scripts/build-agent.sh",
                path.display()
            ))),
            Err(e) => Err(ProvisionError::io("read the agent binary", path, e)),
        };
    }
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return Ok(None);
    };
    let found = [dir.join("shale-agent"), dir.join("../agent/shale-agent")]
        .into_iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .find(|p| is_static_executable(p).unwrap_or(false));
    Ok(found)
}

/// Whether `path` is an ELF executable with no program interpreter (so no dynamic libc).
fn is_static_executable(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_INTERP: u32 = 3;
    let mut f = std::fs::File::open(path)?;
    let mut header = [0u8; 64];
    if f.read_exact(&mut header).is_err() || &header[..4] != b"\x7fELF" || header[4] != 2 {
        return Ok(false);
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().expect("8 bytes"));
    let (entry_size, count) = (
        u16_at(&header, 0x36) as usize,
        u16_at(&header, 0x38) as usize,
    );
    if entry_size < 4 || count > 256 {
        return Ok(false);
    }
    let mut table = vec![0u8; entry_size * count];
    f.seek(SeekFrom::Start(phoff))?;
    f.read_exact(&mut table)?;
    let interp = table
        .chunks(entry_size)
        .any(|ph| u32::from_le_bytes(ph[..4].try_into().expect("4 bytes")) == PT_INTERP);
    Ok(!interp)
}

/// The agents of every order, and how to start one.
pub(crate) struct Agents {
    /// The agent's (static) binary on the host, bound into every new container; `None` turns
    /// the fast path off.
    binary: Option<PathBuf>,
    links: Mutex<HashMap<u64, Arc<Link>>>,
    failed: Mutex<HashMap<u64, Instant>>,
    starting: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
}

impl Agents {
    pub(crate) fn new(binary: Option<PathBuf>) -> Self {
        Self {
            binary,
            links: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashMap::new()),
        }
    }

    /// The binary new containers get, when the fast path is on.
    pub(crate) fn binary(&self) -> Option<&Path> {
        self.binary.as_deref()
    }

    fn live(&self, order: u64) -> Option<Arc<Link>> {
        let links = self.links.lock().expect("agent links poisoned");
        links.get(&order).filter(|l| !l.is_closed()).cloned()
    }

    /// Forgets the order's agent (its container is stopping or gone).
    pub(crate) fn forget(&self, order: u64) {
        if let Some(link) = self
            .links
            .lock()
            .expect("agent links poisoned")
            .remove(&order)
        {
            link.close("the order's container stopped");
        }
        self.failed
            .lock()
            .expect("agent failures poisoned")
            .remove(&order);
        self.starting
            .lock()
            .expect("agent starts poisoned")
            .remove(&order);
    }
}

/// Exactly what the agent sees of a process's stdio, and what we keep.
struct Stdio {
    /// Sent to the agent: the slave, or the read end of stdin and the write ends of the outputs.
    theirs: Vec<OwnedFd>,
    stdin: Writer,
    stdout: ProcessOutput,
    stderr: Option<ProcessOutput>,
    /// A terminal's master, kept to resize it.
    master: Option<OwnedFd>,
}

fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // Best effort: the kernel caps it at /proc/sys/fs/pipe-max-size; smaller costs only speed.
    let _ = nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BUFFER_BYTES));
    Ok((r, w))
}

impl Stdio {
    fn pipes() -> std::io::Result<Self> {
        use tokio::net::unix::pipe;
        let (in_r, in_w) = pipe_pair()?;
        let (out_r, out_w) = pipe_pair()?;
        let (err_r, err_w) = pipe_pair()?;
        Ok(Self {
            theirs: vec![in_r, out_w, err_w],
            stdin: Writer::Pipe(pipe::Sender::from_owned_fd(in_w)?),
            stdout: ProcessOutput::new(Reader::Pipe(pipe::Receiver::from_owned_fd(out_r)?)),
            stderr: Some(ProcessOutput::new(Reader::Pipe(
                pipe::Receiver::from_owned_fd(err_r)?,
            ))),
            master: None,
        })
    }

    fn terminal(agent_pid: u32, size: PtySize, owner: (u32, u32)) -> std::io::Result<Self> {
        let pty = tty::open_in(agent_pid, size, owner)?;
        let reader = pty.master.try_clone()?;
        let keep = pty.master.try_clone()?;
        Ok(Self {
            theirs: vec![pty.slave],
            stdin: Writer::Tty(TtyMaster::new(pty.master)?),
            stdout: ProcessOutput::new(Reader::Tty(TtyMaster::new(reader)?)),
            stderr: None,
            master: Some(keep),
        })
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    Ended(Status),
    Lost(String),
}

#[derive(Default)]
struct Pending {
    /// Spawns not answered yet.
    spawns: HashMap<u64, oneshot::Sender<Result<i32, String>>>,
    /// Processes running.
    running: HashMap<u64, watch::Sender<Option<Outcome>>>,
}

/// One connected agent.
pub(crate) struct Link {
    order: u64,
    stream: UnixStream,
    /// A frame and its descriptors go out together.
    write: tokio::sync::Mutex<()>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// The agent's pid on the host, and its user and group there.
    pid: u32,
    owner: (u32, u32),
}

impl Link {
    fn new(order: u64, stream: UnixStream, pid: u32, owner: (u32, u32)) -> Arc<Self> {
        Arc::new(Link {
            order,
            stream,
            write: tokio::sync::Mutex::new(()),
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            pid,
            owner,
        })
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends the link: every spawn waiting and every process running learns why.
    fn close(&self, why: &str) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.stream),
            nix::sys::socket::Shutdown::Both,
        );
        let pending = std::mem::take(&mut *self.pending.lock().expect("agent link poisoned"));
        let reason = format!("the container's agent {why}");
        for (_, tx) in pending.spawns {
            let _ = tx.send(Err(reason.clone()));
        }
        for (_, tx) in pending.running {
            let _ = tx.send(Some(Outcome::Lost(reason.clone())));
        }
        info!(order = self.order, %why, "agent link closed");
    }

    async fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut sent = 0;
        while sent < bytes.len() {
            self.stream.writable().await?;
            match self.stream.try_write(&bytes[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn send(&self, cmd: &Command, fds: &[OwnedFd]) -> Result<(), String> {
        let frame = encode(cmd, MAX_COMMAND).map_err(|e| e.to_string())?;
        let _turn = self.write.lock().await;
        if self.is_closed() {
            return Err("the container's agent is gone".into());
        }
        let sent = async {
            self.write_all(&frame).await?;
            if !fds.is_empty() {
                let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                crate::fds::send_fds(&self.stream, &borrowed).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(SPAWN_TIMEOUT, sent).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.close(&format!("cannot be written to: {e}"));
                Err(format!("the container's agent cannot be reached: {e}"))
            }
            Err(_) => {
                self.close("does not read its link");
                Err("the container's agent does not answer".into())
            }
        }
    }

    /// Reads reports until the link ends or breaks the protocol.
    async fn serve(self: Arc<Self>) {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = vec![0u8; 4096];
        let why = loop {
            match decode::<Report>(&mut buf, MAX_REPORT) {
                Ok(Some(report)) => {
                    if let Err(why) = self.handle(report) {
                        break why;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => break format!("sent {e}"),
            }
            if let Err(e) = self.stream.readable().await {
                break format!("link failed: {e}");
            }
            // A plain read: descriptors an agent should not send are closed by the kernel.
            match self.stream.try_io(Interest::READABLE, || {
                nix::unistd::read(&self.stream, &mut chunk).map_err(std::io::Error::from)
            }) {
                Ok(0) => break "went away".to_string(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => break format!("link failed: {e}"),
            }
            if self.is_closed() {
                return;
            }
        };
        self.close(&why);
    }

    fn handle(&self, report: Report) -> Result<(), String> {
        let mut pending = self.pending.lock().expect("agent link poisoned");
        match report {
            Report::Spawned { id, pid } => {
                let tx = pending
                    .spawns
                    .remove(&id)
                    .ok_or_else(|| format!("reported process {id}, which it was not asked for"))?;
                let _ = tx.send(Ok(pid));
            }
            Report::Failed { id, reason } => {
                let tx = pending
                    .spawns
                    .remove(&id)
                    .ok_or_else(|| format!("reported process {id}, which it was not asked for"))?;
                pending.running.remove(&id);
                let _ = tx.send(Err(reason));
            }
            Report::Exited { id, status } => {
                if pending.spawns.contains_key(&id) {
                    return Err(format!("reported process {id} ended before it started"));
                }
                // An unknown id is a process whose spawn timed out: nothing waits for it.
                if let Some(tx) = pending.running.remove(&id) {
                    let _ = tx.send(Some(Outcome::Ended(status)));
                }
            }
            Report::Hello { .. } => return Err("said hello twice".into()),
        }
        Ok(())
    }

    /// Starts a process through the agent.
    async fn spawn(
        self: &Arc<Self>,
        argv: Vec<String>,
        env: Vec<String>,
        cwd: String,
        size: Option<PtySize>,
    ) -> Result<Process, ProvisionError> {
        let order = self.order;
        let failed = |reason: String| ProvisionError::ExecFailed { order, reason };
        let stdio = match size {
            Some(size) => Stdio::terminal(self.pid, size, self.owner),
            None => Stdio::pipes(),
        }
        .map_err(|e| failed(format!("cannot make the process's stdio: {e}")))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        {
            let mut pending = self.pending.lock().expect("agent link poisoned");
            pending.spawns.insert(id, reply_tx);
            pending.running.insert(id, exit_tx);
        }
        let cmd = Command::Spawn {
            id,
            argv,
            env,
            cwd,
            tty: size.is_some(),
        };
        let Stdio {
            theirs,
            stdin,
            stdout,
            stderr,
            master,
        } = stdio;
        if let Err(reason) = self.send(&cmd, &theirs).await {
            self.forget(id);
            return Err(failed(reason));
        }
        // The process has its own copies now (or never will).
        drop(theirs);
        let pid = match tokio::time::timeout(SPAWN_TIMEOUT, reply_rx).await {
            Ok(Ok(Ok(pid))) => pid,
            Ok(Ok(Err(reason))) => return Err(failed(reason)),
            Ok(Err(_)) => return Err(failed("the container's agent went away".into())),
            Err(_) => {
                self.forget(id);
                self.close("did not answer a start in time");
                return Err(failed(
                    "the container's agent did not answer in time".into(),
                ));
            }
        };
        debug!(order, id, pid, "process started by the agent");
        let control: Arc<dyn ProcessControl> = Arc::new(AgentProcess {
            link: self.clone(),
            id,
            exec_id: format!("agent-{}-{id}", self.pid),
            exit: exit_rx,
            master,
            signals_sent: Mutex::new(Vec::new()),
        });
        Ok(Process::assemble(stdin, stdout, stderr, control))
    }

    fn forget(&self, id: u64) {
        let mut pending = self.pending.lock().expect("agent link poisoned");
        pending.spawns.remove(&id);
        pending.running.remove(&id);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close("link was dropped");
    }
}

/// A process the agent started.
struct AgentProcess {
    link: Arc<Link>,
    id: u64,
    exec_id: String,
    exit: watch::Receiver<Option<Outcome>>,
    master: Option<OwnedFd>,
    /// Signals delivered through this handle (see [`signal_status`]).
    signals_sent: Mutex<Vec<i32>>,
}

impl AgentProcess {
    fn status(&self, outcome: Outcome) -> Result<ExitStatus, ProvisionError> {
        match outcome {
            Outcome::Ended(Status::Code(c)) => Ok(ExitStatus::Code(c)),
            Outcome::Ended(Status::Signal(s)) => Ok(signal_status(s, &self.signals_sent)),
            Outcome::Lost(reason) => Err(ProvisionError::ExecFailed {
                order: self.link.order,
                reason,
            }),
        }
    }
}

impl ProcessControl for AgentProcess {
    fn exec_id(&self) -> &str {
        &self.exec_id
    }

    fn resize(&self, size: PtySize) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async move {
            match &self.master {
                Some(m) => tty::resize(m, size).map_err(|e| ProvisionError::ExecFailed {
                    order: self.link.order,
                    reason: format!("resize the terminal: {e}"),
                }),
                None => Ok(()),
            }
        })
    }

    fn signal(&self, signal: i32) -> BoxFuture<'_, Result<(), ProvisionError>> {
        Box::pin(async move {
            if signal <= 0 || signal > 64 {
                return Err(ProvisionError::ExecFailed {
                    order: self.link.order,
                    reason: format!("{signal} is not a signal number"),
                });
            }
            if self.exit.borrow().is_some() {
                return Ok(());
            }
            self.signals_sent
                .lock()
                .expect("signal list poisoned")
                .push(signal);
            let cmd = Command::Signal {
                id: self.id,
                signal,
            };
            self.link
                .send(&cmd, &[])
                .await
                .map_err(|reason| ProvisionError::ExecFailed {
                    order: self.link.order,
                    reason,
                })
        })
    }

    fn close_stdin(&self) -> BoxFuture<'_, Result<(), ProvisionError>> {
        // Our writer was the only one left: the handle has dropped it. A terminal has no end
        // of input of its own (sshd does not close it either).
        Box::pin(async { Ok(()) })
    }

    fn wait(&self) -> BoxFuture<'_, Result<ExitStatus, ProvisionError>> {
        Box::pin(async move {
            let mut rx = self.exit.clone();
            let outcome = match rx.wait_for(|o| o.is_some()).await {
                Ok(o) => o.clone().expect("checked is_some"),
                Err(_) => Outcome::Lost("the container's agent forgot the process".into()),
            };
            self.status(outcome)
        })
    }

    fn try_wait(&self) -> Option<Result<ExitStatus, ProvisionError>> {
        let outcome = self.exit.borrow().clone()?;
        Some(self.status(outcome))
    }
}

/// Removes the agent's listening socket however its start ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Provisioner {
    /// Where the broker listens for an order's agent; bound read-only at
    /// [`CONTAINER_LINK_DIR`] in its container.
    pub(crate) fn agent_dir(&self, order: u64) -> PathBuf {
        self.etc_dir(order).join("agent")
    }

    /// Starts `req` through the order's agent, when the order's container has one that is
    /// running or can be started; `None` leaves it to containerd's exec.
    pub(crate) async fn exec_by_agent(
        &self,
        order: u64,
        req: &ExecRequest,
        env: &[String],
        cwd: &str,
    ) -> Option<Result<Process, ProvisionError>> {
        let link = self.agent_link(order).await?;
        Some(
            link.spawn(req.argv.clone(), env.to_vec(), cwd.to_string(), req.tty)
                .await,
        )
    }

    async fn agent_link(&self, order: u64) -> Option<Arc<Link>> {
        let agents = &self.inner.agents;
        agents.binary()?;
        if let Some(link) = agents.live(order) {
            return Some(link);
        }
        if !self.order_has_agent(order).await {
            return None;
        }
        let lock = {
            let mut starting = agents.starting.lock().expect("agent starts poisoned");
            starting.entry(order).or_default().clone()
        };
        let _turn = lock.lock().await;
        if let Some(link) = agents.live(order) {
            return Some(link);
        }
        let failed_at = agents
            .failed
            .lock()
            .expect("agent failures poisoned")
            .get(&order)
            .copied();
        if failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return None;
        }
        match self.start_agent(order).await {
            Ok(link) => {
                agents
                    .links
                    .lock()
                    .expect("agent links poisoned")
                    .insert(order, link.clone());
                Some(link)
            }
            Err(e) => {
                warn!(order, error = %e, "the container's agent did not start; its processes go through containerd's exec");
                agents
                    .failed
                    .lock()
                    .expect("agent failures poisoned")
                    .insert(order, Instant::now());
                None
            }
        }
    }

    /// Starts the agent in the order's container and takes its connection.
    async fn start_agent(&self, order: u64) -> Result<Arc<Link>, String> {
        let dir = self.agent_dir(order);
        let path = dir.join(LINK_SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(|e| format!("listen at {}: {e}", path.display()))?;
        let _socket = SocketFile(path.clone());
        // The container's user connects; it is told apart from anyone else by its pid.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("open {} to the container: {e}", path.display()))?;

        let ctd = self.inner.ctd.clone();
        let container_id = self.container_id(order);
        let env = self.order_env(order).await.map_err(|e| e.to_string())?;
        let socket = format!("{CONTAINER_LINK_DIR}/{LINK_SOCKET}");
        let process = spec::process(
            &self.inner.config,
            &[CONTAINER_BINARY.to_string(), socket],
            &env,
            "/",
            None,
        )
        .map_err(|e| e.to_string())?;
        let seq = self.inner.exec_seq.fetch_add(1, Ordering::Relaxed);
        let exec_id = format!("shale-agent-{seq}-{}", std::process::id());
        ctd.tasks()
            .exec(ctd.req(ExecProcessRequest {
                container_id: container_id.clone(),
                stdin: String::new(),
                stdout: String::new(),
                stderr: String::new(),
                terminal: false,
                spec: Some(prost_types::Any {
                    type_url: PROCESS_SPEC_TYPE_URL.into(),
                    value: serde_json::to_vec(&process).expect("process spec serializes"),
                }),
                exec_id: exec_id.clone(),
            }))
            .await
            .map_err(|s| format!("containerd refused the agent: {}", s.message()))?;
        let started = ctd
            .tasks()
            .start(ctd.req(StartRequest {
                container_id: container_id.clone(),
                exec_id: exec_id.clone(),
            }))
            .await;
        let pid = match started {
            Ok(r) => r.into_inner().pid,
            Err(s) => {
                delete_exec(&ctd, &container_id, &exec_id).await;
                return Err(format!("the agent did not start: {}", s.message()));
            }
        };
        // containerd keeps an exec's record until it is deleted: do that when it ends.
        let reaper = {
            let (ctd, cid, eid) = (ctd.clone(), container_id.clone(), exec_id.clone());
            async move {
                let _ = ctd
                    .tasks()
                    .wait(ctd.req_long(WaitRequest {
                        container_id: cid.clone(),
                        exec_id: eid.clone(),
                    }))
                    .await;
                delete_exec(&ctd, &cid, &eid).await;
            }
        };
        tokio::spawn(reaper.instrument(tracing::debug_span!("agent", order, pid)));

        let accepted = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                let (stream, _) = listener
                    .accept()
                    .await
                    .map_err(|e| format!("accept the agent: {e}"))?;
                match stream.peer_cred() {
                    Ok(cred) if cred.pid() == Some(pid as i32) => {
                        return Ok::<_, String>((stream, (cred.uid(), cred.gid())))
                    }
                    // Someone else in the container: not the process containerd started.
                    _ => continue,
                }
            }
        })
        .await;
        drop(listener);
        let (stream, owner) = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                kill_exec(&ctd, &container_id, &exec_id).await;
                return Err(e);
            }
            Err(_) => {
                kill_exec(&ctd, &container_id, &exec_id).await;
                return Err(format!(
                    "the agent did not connect within {} s",
                    START_TIMEOUT.as_secs()
                ));
            }
        };
        let link = Link::new(order, stream, pid, owner);
        match tokio::time::timeout(START_TIMEOUT, read_hello(&link.stream)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                link.close(&e);
                kill_exec(&ctd, &container_id, &exec_id).await;
                return Err(format!("the agent {e}"));
            }
            Err(_) => {
                link.close("did not say hello");
                kill_exec(&ctd, &container_id, &exec_id).await;
                return Err("the agent did not say hello".into());
            }
        }
        tokio::spawn(
            link.clone()
                .serve()
                .instrument(tracing::debug_span!("agent", order, pid)),
        );
        info!(order, pid, "agent started");
        Ok(link)
    }
}

/// The agent's first report, read byte by byte so nothing behind it is consumed here.
async fn read_hello(stream: &UnixStream) -> Result<(), String> {
    let mut buf = Vec::new();
    loop {
        match decode::<Report>(&mut buf, MAX_REPORT) {
            Ok(Some(Report::Hello { version })) if version == VERSION => return Ok(()),
            Ok(Some(Report::Hello { version })) => {
                return Err(format!(
                    "speaks protocol version {version}, this gateway {VERSION}"
                ))
            }
            Ok(Some(other)) => return Err(format!("began with {other:?} instead of hello")),
            Ok(None) => {}
            Err(e) => return Err(format!("sent {e}")),
        }
        stream
            .readable()
            .await
            .map_err(|e| format!("link failed: {e}"))?;
        let mut byte = [0u8; 1];
        match stream.try_read(&mut byte) {
            Ok(0) => return Err("went away before hello".into()),
            Ok(_) => buf.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("link failed: {e}")),
        }
    }
}

async fn delete_exec(ctd: &crate::ctd::Ctd, container_id: &str, exec_id: &str) {
    let _ = ctd
        .tasks()
        .delete_process(ctd.req(DeleteProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
        }))
        .await;
}

async fn kill_exec(ctd: &crate::ctd::Ctd, container_id: &str, exec_id: &str) {
    let _ = ctd
        .tasks()
        .kill(ctd.req(KillRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal: 9,
            all: false,
        }))
        .await;
}

#[cfg(test)]
mod tests {
    //! The broker's side against agents that misbehave, over a socket pair: what a tenant who
    //! runs its own program in the agent's place can send.
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A link to a peer the test plays, serving its reports.
    fn linked() -> (Arc<Link>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let link = Link::new(1, ours, std::process::id(), (0, 0));
        tokio::spawn(link.clone().serve());
        (link, theirs)
    }

    /// Reads one command from the broker (its descriptors, if any, are dropped by the read).
    async fn next_command(peer: &mut UnixStream, buf: &mut Vec<u8>) -> Command {
        loop {
            if let Some(cmd) = decode::<Command>(buf, MAX_COMMAND).unwrap() {
                if cmd.descriptors() > 0 {
                    // The carrier byte of its descriptors, if a read has not taken it already.
                    if buf.is_empty() {
                        let mut byte = [0u8; 1];
                        peer.read_exact(&mut byte).await.unwrap();
                    } else {
                        buf.remove(0);
                    }
                }
                return cmd;
            }
            let mut chunk = [0u8; 4096];
            let n = peer.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the broker closed the link");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn report(peer: &mut UnixStream, r: &Report) {
        peer.write_all(&encode(r, MAX_REPORT).unwrap())
            .await
            .unwrap();
    }

    fn spawn_true(link: &Arc<Link>) -> tokio::task::JoinHandle<Result<Process, ProvisionError>> {
        let link = link.clone();
        tokio::spawn(async move {
            link.spawn(vec!["true".into()], vec![], "/".into(), None)
                .await
        })
    }

    fn reason(e: ProvisionError) -> String {
        match e {
            ProvisionError::ExecFailed { reason, .. } => reason,
            other => panic!("not an exec failure: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_honest_exchange_reports_the_exit_status() {
        let (link, mut peer) = linked();
        let started = spawn_true(&link);
        let mut buf = Vec::new();
        let Command::Spawn { id, argv, tty, .. } = next_command(&mut peer, &mut buf).await else {
            panic!("not a spawn")
        };
        assert_eq!((argv, tty), (vec!["true".to_string()], false));
        report(&mut peer, &Report::Spawned { id, pid: 42 }).await;
        let p = started.await.unwrap().expect("started");
        p.handle.signal(15).await.unwrap();
        let Command::Signal {
            id: signalled,
            signal: 15,
        } = next_command(&mut peer, &mut buf).await
        else {
            panic!("not the signal")
        };
        assert_eq!(signalled, id);
        report(
            &mut peer,
            &Report::Exited {
                id,
                status: Status::Signal(15),
            },
        )
        .await;
        assert_eq!(p.handle.wait().await.unwrap(), ExitStatus::Signal(15));
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_never_answers_fails_the_start_and_loses_its_link() {
        let (link, mut peer) = linked();
        let started = spawn_true(&link);
        let mut buf = Vec::new();
        next_command(&mut peer, &mut buf).await;
        let e = reason(started.await.unwrap().err().expect("no answer, no process"));
        assert!(e.contains("did not answer in time"), "{e}");
        assert!(link.is_closed());
    }

    #[tokio::test]
    async fn an_oversized_report_ends_the_link_with_a_reason() {
        let (link, mut peer) = linked();
        let started = spawn_true(&link);
        let mut buf = Vec::new();
        next_command(&mut peer, &mut buf).await;
        peer.write_all(&(64u32 << 20).to_be_bytes()).await.unwrap();
        let e = reason(started.await.unwrap().err().expect("refused"));
        assert!(e.contains("frame is over the 4096-byte cap"), "{e}");
        assert!(link.is_closed());
    }

    #[tokio::test]
    async fn garbage_and_unasked_reports_end_the_link() {
        for bad in [
            b"\x00\x00\x00\x05hello".to_vec(),
            encode(&Report::Spawned { id: 999, pid: 1 }, MAX_REPORT).unwrap(),
            encode(&Report::Hello { version: VERSION }, MAX_REPORT).unwrap(),
        ] {
            let (link, mut peer) = linked();
            let started = spawn_true(&link);
            let mut buf = Vec::new();
            next_command(&mut peer, &mut buf).await;
            peer.write_all(&bad).await.unwrap();
            let e = reason(started.await.unwrap().err().expect("refused"));
            assert!(e.starts_with("the container's agent"), "{e}");
            assert!(link.is_closed(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn descriptors_an_agent_sends_are_closed_not_kept() {
        let (link, mut peer) = linked();
        let started = spawn_true(&link);
        let mut buf = Vec::new();
        let Command::Spawn { id, .. } = next_command(&mut peer, &mut buf).await else {
            panic!("not a spawn")
        };
        // The agent slips the write end of a pipe in with its answer, then drops its own copy:
        // the read end sees EOF only if the broker kept nothing of it.
        let (w, mut r) = tokio::net::unix::pipe::pipe().unwrap();
        let w = w.into_blocking_fd().unwrap();
        let frame = encode(&Report::Spawned { id, pid: 42 }, MAX_REPORT).unwrap();
        let raw = [std::os::fd::AsRawFd::as_raw_fd(&w)];
        nix::sys::socket::sendmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&peer),
            &[std::io::IoSlice::new(&frame)],
            &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(w);
        let p = started.await.unwrap().expect("the answer itself is read");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest))
            .await
            .expect("the smuggled descriptor was closed")
            .unwrap();
        drop(p);
    }

    #[tokio::test]
    async fn an_agent_that_goes_away_ends_its_processes_with_a_reason() {
        let (link, mut peer) = linked();
        let started = spawn_true(&link);
        let mut buf = Vec::new();
        let Command::Spawn { id, .. } = next_command(&mut peer, &mut buf).await else {
            panic!("not a spawn")
        };
        report(&mut peer, &Report::Spawned { id, pid: 42 }).await;
        let p = started.await.unwrap().expect("started");
        drop(peer);
        let e = reason(p.handle.wait().await.expect_err("lost"));
        assert_eq!(e, "the container's agent went away");
    }
}
