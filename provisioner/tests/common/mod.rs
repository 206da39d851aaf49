//! The shared harness: a real containerd (the one in `SHALE_TEST_CONTAINERD` when it answers,
//! else a project-local one in a temp dir), an imported image, and a provisioner in a
//! namespace of its own. Everything is stopped and removed on drop.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use shale_provisioner::daemon::LocalContainerd;
use shale_provisioner::image_build;
use shale_provisioner::{
    ExecRequest, ExitStatus, ImageRef, LeaseSpec, Provisioner, ProvisionerConfig,
};
use tokio::io::{AsyncRead, AsyncReadExt};

pub struct Harness {
    pub prov: Provisioner,
    pub config: ProvisionerConfig,
    pub daemon: LocalContainerd,
    pub image: ImageRef,
    pub dir: tempfile::TempDir,
}

static NEXT_NS: AtomicU64 = AtomicU64::new(0);
static NEXT_SUBNET: AtomicU64 = AtomicU64::new(0);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub enum TestImage {
    Busybox,
    Default,
}

/// How a harness's processes start.
#[derive(Clone, Copy, Debug)]
pub enum ExecPath {
    /// Through the agent in the container (`scripts/build-agent.sh` builds it).
    Agent,
    /// Through containerd's exec.
    Containerd,
}

/// The static agent `scripts/build-agent.sh` built into this workspace's target directory;
/// `None` (the agent's tests skip) when it is not there, except under `CI=true`, where that
/// fails.
pub fn agent_binary() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let agent = target.join("agent").join("shale-agent");
    if agent.is_file() {
        return Some(agent);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "no agent at {}: scripts/build-agent.sh builds it",
        agent.display()
    );
    eprintln!(
        "SKIPPED: no agent at {} (scripts/build-agent.sh builds it)",
        agent.display()
    );
    None
}

impl Harness {
    pub async fn busybox() -> Harness {
        Self::start(TestImage::Busybox, |_| {}).await
    }

    /// A busybox harness whose processes start by `path`; `None` when that path cannot run here.
    pub async fn busybox_via(path: ExecPath) -> Option<Harness> {
        match path {
            ExecPath::Agent => {
                let agent = agent_binary()?;
                Some(Self::start(TestImage::Busybox, |c| c.agent = Some(agent)).await)
            }
            ExecPath::Containerd => {
                Some(Self::start(TestImage::Busybox, |c| c.exec_agent = false).await)
            }
        }
    }

    pub async fn start(image: TestImage, edit: impl FnOnce(&mut ProvisionerConfig)) -> Harness {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("shale-prov-")
            .tempdir()
            .expect("temp dir");
        let env_socket = std::env::var_os("SHALE_TEST_CONTAINERD").map(PathBuf::from);
        let daemon = LocalContainerd::connect_or_spawn(
            env_socket.as_deref(),
            &dir.path().join("containerd"),
        )
        .await
        .expect("containerd");
        let cache = image_build::default_cache_dir();
        let archive = match image {
            TestImage::Busybox => image_build::build_busybox_image(&cache).await,
            TestImage::Default => image_build::build_default_image(&cache).await,
        }
        .expect("image build");
        let namespace = format!(
            "shale-test-{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::Relaxed)
        );
        let mut config = ProvisionerConfig {
            socket: daemon.socket().to_path_buf(),
            namespace,
            state_dir: dir.path().join("state"),
            provider: "test-sp".into(),
            stop_grace: Duration::from_secs(2),
            cdi_dirs: vec![],
            ..Default::default()
        };
        // Each harness may run its own containerd, whose uid slots can coincide with another's:
        // a subnet of its own keeps two tests' order links apart.
        // Containers of earlier tests may still run (their shims outlive a test's containerd)
        // with addresses of their own: a subnet nothing on the host uses yet.
        let used = std::process::Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let subnet = (0..150)
            .map(|_| {
                let n =
                    NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) + u64::from(std::process::id()) * 7;
                100 + n % 150
            })
            .find(|x| !used.contains(&format!(" 10.{x}.")))
            .expect("a free 10.x.0.0/16 for the test's orders");
        config.network.subnet = format!("10.{subnet}.0.0/16").parse().unwrap();
        let probe = Provisioner::connect(config.clone()).await.expect("connect");
        let started = std::time::Instant::now();
        let image = probe.import_image(&archive).await.expect("import");
        eprintln!(
            "timing: import of {} took {:?}",
            archive.display(),
            started.elapsed()
        );
        config.image = image.clone();
        edit(&mut config);
        let prov = Provisioner::connect(config.clone()).await.expect("connect");
        Harness {
            prov,
            config,
            daemon,
            image,
            dir,
        }
    }

    /// A second provisioner on the same daemon and state, as after a gateway restart.
    pub async fn reconnect(&self) -> Provisioner {
        Provisioner::connect(self.config.clone())
            .await
            .expect("reconnect")
    }
}

impl Drop for Harness {
    /// A test that panicked before releasing its orders leaves their disks and root filesystems
    /// mounted under the temp dir: detach them, deepest first, so the dir can be removed.
    fn drop(&mut self) {
        unmount_under(self.dir.path());
    }
}

/// Detaches every mount under `dir` (what a failed test left), deepest first, so `dir` can be
/// removed.
pub fn unmount_under(dir: &std::path::Path) {
    let ours = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&ours))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn lease(order: u64) -> LeaseSpec {
    LeaseSpec {
        order,
        cpus: 1,
        memory_bytes: 256 << 20,
        gpus: 0,
        dataset: None,
        expires_at: SystemTime::now() + Duration::from_secs(3600),
        pids_limit: None,
        disk_bytes: 64 << 20,
        image: None,
        image_repository: None,
    }
}

pub fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn cmd(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv(args),
        ..Default::default()
    }
}

pub async fn read_all(mut r: impl AsyncRead + Unpin) -> String {
    let mut s = Vec::new();
    r.read_to_end(&mut s).await.expect("read output");
    String::from_utf8_lossy(&s).into_owned()
}

/// Runs a command to completion: (stdout, stderr, status). Bounded so a bug cannot hang CI.
pub async fn run(prov: &Provisioner, order: u64, args: &[&str]) -> (String, String, ExitStatus) {
    let fut = async {
        let p = prov.exec(order, cmd(args)).await.expect("exec");
        let handle = p.handle.clone();
        drop(p.stdin);
        let (out, err) = tokio::join!(read_all(p.stdout), read_all(p.stderr.expect("stderr")));
        let status = handle.wait().await.expect("wait");
        (out, err, status)
    };
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("command did not finish within 60 s")
}

/// Runs a shell command line in the order's container.
pub async fn sh(prov: &Provisioner, order: u64, line: &str) -> (String, String, ExitStatus) {
    run(prov, order, &["/bin/sh", "-c", line]).await
}
