//! A containerd for tests and `shale dev up`: use one that answers, or start a project-local
//! daemon (its own `--root`, `--state` and socket under a given directory) and stop it again.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_client::services::v1::{
    namespaces_client::NamespacesClient, version_client::VersionClient, DeleteTaskRequest,
    KillRequest, ListNamespacesRequest, ListTasksRequest, WaitRequest,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tonic::Request;
use tracing::{info, warn};

use crate::ProvisionError;

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A containerd daemon this process either found running or started itself.
///
/// A started daemon is stopped on [`LocalContainerd::shutdown`] or on drop: its tasks are
/// killed and deleted first, so no container, shim or mount outlives it.
pub struct LocalContainerd {
    socket: PathBuf,
    dir: Option<PathBuf>,
    child: Option<Child>,
}

impl std::fmt::Debug for LocalContainerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalContainerd")
            .field("socket", &self.socket)
            .field("pid", &self.pid())
            .finish()
    }
}

/// Whether a containerd answers its version call on `socket` within a second.
pub async fn answers(socket: &Path) -> bool {
    let attempt = async {
        let channel = containerd_client::connect(socket).await.ok()?;
        VersionClient::new(channel)
            .version(Request::new(()))
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(_))
    )
}

impl LocalContainerd {
    /// Uses the containerd at `socket` when one answers there; otherwise starts one under `dir`
    /// (or reuses one already serving `dir`).
    pub async fn connect_or_spawn(
        socket: Option<&Path>,
        dir: &Path,
    ) -> Result<Self, ProvisionError> {
        if let Some(s) = socket {
            if answers(s).await {
                return Ok(LocalContainerd {
                    socket: s.to_path_buf(),
                    dir: None,
                    child: None,
                });
            }
        }
        let own = dir.join("containerd.sock");
        if answers(&own).await {
            info!(socket = %own.display(), "reusing the containerd already serving this directory");
            return Ok(LocalContainerd {
                socket: own,
                dir: None,
                child: None,
            });
        }
        Self::spawn(dir).await
    }

    /// Uses an already running containerd; fails when nothing answers on `socket`.
    pub async fn connect(socket: &Path) -> Result<Self, ProvisionError> {
        if answers(socket).await {
            Ok(LocalContainerd {
                socket: socket.to_path_buf(),
                dir: None,
                child: None,
            })
        } else {
            Err(ProvisionError::DaemonUnreachable {
                socket: socket.to_path_buf(),
                reason: "nothing answers on this socket".into(),
            })
        }
    }

    /// Starts containerd with root, state and socket under `dir`, and waits until it answers.
    pub async fn spawn(dir: &Path) -> Result<Self, ProvisionError> {
        std::fs::create_dir_all(dir).map_err(|e| ProvisionError::io("create", dir, e))?;
        let dir = std::fs::canonicalize(dir).map_err(|e| ProvisionError::io("resolve", dir, e))?;
        let socket = dir.join("containerd.sock");
        if socket.as_os_str().len() > 100 {
            return Err(ProvisionError::Config(format!(
                "socket path {} is too long for a unix socket",
                socket.display()
            )));
        }
        let mut me = LocalContainerd {
            socket,
            dir: Some(dir),
            child: None,
        };
        me.start().await?;
        Ok(me)
    }

    async fn start(&mut self) -> Result<(), ProvisionError> {
        let dir = self.dir.clone().expect("only owned daemons start");
        let socket = self.socket.clone();
        if answers(&socket).await {
            return Err(ProvisionError::Config(format!(
                "a containerd already answers at {}",
                socket.display()
            )));
        }
        // A socket file left by a daemon that died would make the new one fail to listen,
        // and must not be mistaken for a live daemon.
        match std::fs::remove_file(&socket) {
            Ok(()) => warn!(socket = %socket.display(), "removed a stale containerd socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProvisionError::io("remove stale socket", socket, e)),
        }
        let _ = std::fs::remove_file(dir.join("containerd.sock.ttrpc"));
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(&dir))
            .map_err(|e| ProvisionError::io("write", &config, e))?;
        let log_path = dir.join("containerd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| ProvisionError::io("open", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ProvisionError::io("open", &log_path, e))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C meant for the test runner must not kill it first.
            .process_group(0)
            .spawn()
            .map_err(|e| ProvisionError::DaemonUnreachable {
                socket: socket.clone(),
                reason: format!("cannot start containerd (is it installed?): {e}"),
            })?;
        info!(pid = child.id(), socket = %socket.display(), "started containerd");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(ProvisionError::DaemonUnreachable {
                    socket,
                    reason: format!(
                        "containerd exited ({status}) at start:\n{}",
                        log_tail(&log_path)
                    ),
                });
            }
            if answers(&socket).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop_process();
                return Err(ProvisionError::DaemonUnreachable {
                    socket,
                    reason: format!(
                        "containerd did not answer within {START_TIMEOUT:?}:\n{}",
                        log_tail(&log_path)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The socket to give [`crate::ProvisionerConfig::socket`].
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's pid when this process started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether this process started the daemon (and will stop it).
    pub fn is_owned(&self) -> bool {
        self.dir.is_some()
    }

    /// Kills the daemon abruptly (SIGKILL), as a crash would; its shims and containers live on.
    /// Tests use this to check that callers get an error instead of a hang.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same directories after [`LocalContainerd::kill`]; it
    /// reconnects to the shims of the containers that kept running.
    pub async fn restart(&mut self) -> Result<(), ProvisionError> {
        if self.dir.is_none() {
            return Err(ProvisionError::Config(
                "cannot restart a containerd this process did not start".into(),
            ));
        }
        self.kill();
        self.start().await
    }

    /// Kills and deletes every task, then stops the daemon. Does nothing to a daemon this
    /// process did not start.
    pub async fn shutdown(mut self) -> Result<(), ProvisionError> {
        self.shutdown_inner().await
    }

    async fn shutdown_inner(&mut self) -> Result<(), ProvisionError> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        if self.child.is_some() {
            if let Err(e) = clear_tasks(&self.socket).await {
                warn!(error = %e, "could not clear tasks before stopping containerd");
            }
        }
        self.stop_process();
        kill_shims(&self.socket);
        unmount_under(&dir);
        Ok(())
    }

    fn stop_process(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for LocalContainerd {
    fn drop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        // Drop cannot await; a short-lived thread with its own runtime does the async cleanup
        // (works whether or not the caller is inside a Tokio runtime).
        let mut me = LocalContainerd {
            socket: self.socket.clone(),
            dir: self.dir.take(),
            child: self.child.take(),
        };
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => {
                    let _ = rt.block_on(me.shutdown_inner());
                }
                Err(_) => {
                    me.stop_process();
                    kill_shims(&me.socket);
                }
            }
        });
        let _ = cleanup.join();
    }
}

fn config_toml(dir: &Path) -> String {
    let q = |p: PathBuf| format!("{:?}", p.display().to_string());
    format!(
        r#"# Written by shale-provisioner's LocalContainerd; a project-local daemon.
version = 2
root = {root}
state = {state}
# Shale needs no Kubernetes CRI and only the overlayfs snapshotter.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}
"#,
        root = q(dir.join("root")),
        state = q(dir.join("state")),
        sock = q(dir.join("containerd.sock")),
        ttrpc = q(dir.join("containerd.sock.ttrpc")),
    )
}

fn log_tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

async fn clear_tasks(socket: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let channel =
        tokio::time::timeout(Duration::from_secs(5), containerd_client::connect(socket)).await??;
    let namespaces = NamespacesClient::new(channel.clone())
        .list(Request::new(ListNamespacesRequest {
            filter: String::new(),
        }))
        .await?
        .into_inner()
        .namespaces;
    let mut tasks_client = containerd_client::services::v1::tasks_client::TasksClient::new(channel);
    fn in_ns<T>(ns: &str, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "containerd-namespace",
            ns.parse().expect("namespace header"),
        );
        r.set_timeout(Duration::from_secs(20));
        r
    }
    for ns in namespaces {
        let ns = ns.name.as_str();
        let tasks = tasks_client
            .list(in_ns(
                ns,
                ListTasksRequest {
                    filter: String::new(),
                },
            ))
            .await?
            .into_inner()
            .tasks;
        for t in tasks {
            let _ = tasks_client
                .kill(in_ns(
                    ns,
                    KillRequest {
                        container_id: t.id.clone(),
                        exec_id: String::new(),
                        signal: Signal::SIGKILL as u32,
                        all: true,
                    },
                ))
                .await;
            let _ = tasks_client
                .wait(in_ns(
                    ns,
                    WaitRequest {
                        container_id: t.id.clone(),
                        exec_id: String::new(),
                    },
                ))
                .await;
            let _ = tasks_client
                .delete(in_ns(
                    ns,
                    DeleteTaskRequest {
                        container_id: t.id.clone(),
                    },
                ))
                .await;
        }
    }
    Ok(())
}

/// Kills shims still serving our socket (after a crash their containers would otherwise
/// outlive the daemon); killing a container's init ends its whole pid namespace.
fn kill_shims(socket: &Path) {
    let sock = socket.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-address" && w[1] == sock.as_bytes());
        if is_shim && ours {
            // The shim's children are the containers' inits; kill them first, then the shim.
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            {
                for c in children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok())
                {
                    let _ = kill(Pid::from_raw(c), Signal::SIGKILL);
                }
            }
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Detaches mounts left under `dir` (root filesystems of tasks that could not be deleted).
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}
