//! `shale dev up|down|status`: the whole SP stack on one machine, as long-running processes.
//!
//! `up` does what the end-to-end harness (`tests/src/stack.rs`) does, but leaves it running:
//! anvil (detached, log in `DEV/anvil.log`), the marketplace deployed, containerd (the
//! system's when one answers, else a project-local daemon kept by a detached
//! `shale dev containerd`), the default image built or from cache and imported, a demo dataset
//! (the handwritten digits that Debian's `python3-sklearn` ships), the gateway as
//! `shale gateway --config DEV/gateway.toml` (log in `DEV/gateway.log`), and the demo SP
//! registered. Everything it started is recorded in `DEV/dev.json`; `down` stops exactly that, in
//! reverse order, and removes the folder. `DEV` is [`state_dir`]: nothing here is found through
//! the folder the binary was built in.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use shale_contracts::{devnet, Address, Marketplace, PrivateKeySigner};
use shale_provisioner::{daemon, image_build, PieceSource, Provisioner};

use crate::spconfig::SpConfig;
use crate::view::print_json;

/// Which dev account plays which part.
pub const DEPLOYER: usize = 0;
pub const SP: usize = 1;
pub const CLIENT: usize = 2;

/// The demo dataset's id on chain and its folder under /data in order containers.
pub const DATASET: &str = "digits";
/// The system containerd's socket, used when it answers.
const SYSTEM_CONTAINERD: &str = "/run/containerd/containerd.sock";

/// What `dev up` started, so that `dev down` stops exactly that.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevState {
    pub rpc_url: String,
    pub marketplace: Address,
    pub provider: Address,
    pub client: Address,
    pub gateway: SocketAddr,
    /// Where the gateway serves Prometheus `/metrics`.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    pub host_key: String,
    pub anvil_pid: u32,
    pub gateway_pid: u32,
    /// The `shale dev containerd` keeper, when the stack runs its own containerd.
    pub containerd_pid: Option<u32>,
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub dir: PathBuf,
    /// anvil's development keys (public test keys of its default mnemonic; local chain only).
    pub dev_keys: Vec<String>,
}

impl DevState {
    /// The dev key of account `index` ([`DEPLOYER`], [`SP`], [`CLIENT`]).
    pub fn key(&self, index: usize) -> anyhow::Result<PrivateKeySigner> {
        parse_key(&self.dev_keys, index)
    }

    /// Reads the state of a running stack.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("dev.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "the local stack is not up (no {}): run `shale dev up`",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))
    }
}

/// The local stack's folder: `SHALE_DEV_DIR`, else `dev/` in Shale's home
/// ([`image_build::shale_home`]: `SHALE_HOME`, `<checkout>/.state` for a binary in a checkout's
/// `target/`, `/var/lib/shale` for root, else `~/.local/state/shale`).
pub fn state_dir() -> PathBuf {
    match std::env::var_os("SHALE_DEV_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => image_build::shale_home().join("dev"),
    }
}

fn alive(pid: u32) -> bool {
    // Signal 0 checks existence and permission without signalling.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn parse_key(keys: &[String], index: usize) -> anyhow::Result<PrivateKeySigner> {
    keys.get(index)
        .with_context(|| format!("anvil printed no key for account {index}"))?
        .parse()
        .context("anvil printed an unusable key")
}

/// The private keys anvil prints in its banner, once it listens; `None` until then.
fn read_anvil_keys(log: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(log).ok()?;
    if !text.contains("Listening on") {
        return None;
    }
    let keys: Vec<String> = text
        .lines()
        .skip_while(|l| l.trim() != "Private Keys")
        .skip(1)
        .take_while(|l| l.trim() != "Wallet")
        .filter_map(|l| l.trim().strip_prefix('(')?.split_whitespace().nth(1))
        .map(str::to_string)
        .collect();
    (!keys.is_empty()).then_some(keys)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `program` detached from this terminal (its own process group, so Ctrl-C here does not
/// reach it), with stdout and stderr appended to `log`.
fn spawn_detached(
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> anyhow::Result<u32> {
    // Logs are the SP's: anvil's prints its keys, and none is for the gateway's SSH user.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let child = std::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(child.id())
}

fn step(msg: &str) -> ProgressBar {
    let s = ProgressBar::new_spinner();
    s.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
    s.set_message(msg.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    s
}

fn done(s: ProgressBar, msg: String) {
    s.finish_and_clear();
    eprintln!("✔ {msg}");
}

/// `shale dev up`: starts the stack (or reports the one already running).
pub async fn up() -> anyhow::Result<DevState> {
    let dir = state_dir();
    if let Ok(state) = DevState::load(&dir) {
        if alive(state.anvil_pid) && alive(state.gateway_pid) {
            eprintln!("The local stack is already up.");
            print_endpoints(&state);
            return Ok(state);
        }
        eprintln!("A previous local stack is partly down; cleaning it up first.");
        down().await?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(&dir)?;
    match start(&dir).await {
        Ok(state) => {
            print_endpoints(&state);
            Ok(state)
        }
        Err(e) => {
            eprintln!(
                "dev up failed; stopping what it started (logs stay in {}).",
                dir.display()
            );
            let _ = stop(&dir, true).await;
            Err(e)
        }
    }
}

/// Everything `start` has started so far, written as it goes so a failure can be undone.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Started {
    anvil_pid: Option<u32>,
    containerd_pid: Option<u32>,
    gateway_pid: Option<u32>,
    containerd_socket: Option<PathBuf>,
    namespace: Option<String>,
    rpc_url: Option<String>,
    marketplace: Option<Address>,
    gateway_config: Option<PathBuf>,
}

impl Started {
    fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("started.json"), serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}

async fn start(dir: &Path) -> anyhow::Result<DevState> {
    let mut started = Started::default();
    let me = std::env::current_exe().context("finding the shale binary")?;

    // The chain.
    let s = step("starting anvil");
    let anvil = devnet::find_anvil().with_context(|| {
        format!(
            "anvil was not found (looked in SHALE_ANVIL, on PATH, and in .tools/bin in the \
             folders above {} and above the working directory): run scripts/setup.sh (it \
             installs anvil into a checkout's .tools/bin), put Foundry's anvil (npm \
             @foundry-rs/anvil-linux-amd64) on PATH, or set SHALE_ANVIL to its path",
            me.display()
        )
    })?;
    let port = free_port()?;
    let pid = spawn_detached(
        &anvil,
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--accounts",
            "10",
            // A block every second, so the chain's clock runs: claims must fit inside the
            // lease's time as the chain measures it, and that time only moves with blocks.
            "--block-time",
            "1",
        ],
        &[],
        &dir.join("anvil.log"),
    )?;
    started.anvil_pid = Some(pid);
    started.save(dir)?;
    let rpc_url = format!("http://127.0.0.1:{port}");
    started.rpc_url = Some(rpc_url.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let dev_keys = loop {
        if let Some(keys) = read_anvil_keys(&dir.join("anvil.log")) {
            break keys;
        }
        if !alive(pid) || Instant::now() > deadline {
            bail!(
                "anvil did not come up; see {}",
                dir.join("anvil.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let s2 = step("Groth16 set-up of the claim circuit (dev seed) and its Solidity verifier");
    let keys_dir = dir.join("keys");
    let verifier_code = claim_keys(&keys_dir).await?;
    done(
        s2,
        format!(
            "claim keys for batches of {CAPACITY} ticks in {}",
            keys_dir.display()
        ),
    );
    let verifier = loop {
        // Deploying is also the readiness probe of the RPC endpoint.
        match devnet::deploy_bytecode(
            &rpc_url,
            parse_key(&dev_keys, DEPLOYER)?,
            verifier_code.clone().into(),
        )
        .await
        {
            Ok(addr) => break addr,
            Err(e) if Instant::now() < deadline && alive(pid) => {
                tracing::debug!(error = %e, "anvil not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "anvil did not come up; see {}",
                        dir.join("anvil.log").display()
                    )
                })
            }
        }
    };
    let marketplace = loop {
        match devnet::deploy(
            &rpc_url,
            parse_key(&dev_keys, DEPLOYER)?,
            &[CAPACITY],
            &[verifier],
        )
        .await
        {
            Ok(addr) => break addr,
            Err(e) if Instant::now() < deadline && alive(pid) => {
                tracing::debug!(error = %e, "anvil not ready yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "anvil did not come up; see {}",
                        dir.join("anvil.log").display()
                    )
                })
            }
        }
    };
    started.marketplace = Some(marketplace);
    started.save(dir)?;
    done(
        s,
        format!("anvil on {rpc_url}, marketplace at {marketplace:#x}"),
    );

    // containerd.
    let s = step("reaching containerd");
    let system = Path::new(SYSTEM_CONTAINERD);
    let (socket, keeper) = if daemon::answers(system).await {
        (system.to_path_buf(), None)
    } else {
        let cdir = dir.join("containerd");
        std::fs::create_dir_all(&cdir)?;
        let cdir_str = cdir.to_str().context("state path is not UTF-8")?;
        let pid = spawn_detached(
            &me,
            &["dev", "containerd", "--dir", cdir_str],
            &[],
            &dir.join("containerd.log"),
        )?;
        started.containerd_pid = Some(pid);
        started.save(dir)?;
        let socket = cdir.join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !daemon::answers(&socket).await {
            if !alive(pid) || Instant::now() > deadline {
                bail!(
                    "containerd did not start; see {}",
                    dir.join("containerd.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (socket, Some(pid))
    };
    started.containerd_socket = Some(socket.clone());
    done(
        s,
        format!(
            "containerd on {}{}",
            socket.display(),
            if keeper.is_some() {
                " (project-local)"
            } else {
                " (the system's)"
            }
        ),
    );

    // The demo dataset and the image.
    let s = step("fetching the demo dataset (digits, from Debian's python3-sklearn)");
    let dataset_dir = ensure_dataset(dir).await?;
    // What an SP does with `shale sp commp`: the piece CID its deal for the file names, which
    // the gateway checks the bytes against before any order's container sees them.
    let source = dataset_dir.join("digits.csv");
    let piece = shale_provisioner::piece::commp_file(&source)
        .with_context(|| format!("computing the piece CID of {}", source.display()))?;
    let dataset = PieceSource {
        piece_cid: piece.cid(),
        source,
        present: Default::default(),
    };
    done(
        s,
        format!(
            "dataset {DATASET}: piece {} in {}",
            dataset.piece_cid,
            dataset_dir.display()
        ),
    );
    let s = step("building the default image (first time: a few minutes; then cached)");
    let archive = image_build::build_default_image(&image_build::default_cache_dir())
        .await
        .context("building the default image")?;
    done(s, format!("image {}", archive.display()));

    // The gateway's config, then the image import through the same provisioner settings.
    let sp_key = parse_key(&dev_keys, SP)?;
    let gateway_port = free_port()?;
    let metrics_port = free_port()?;
    let settler_metrics_port = free_port()?;
    // One namespace per state folder, so a second stack (a test's) never touches this one's
    // containers when both use the system's containerd.
    let namespace = if dir == std::fs::canonicalize(state_dir()).unwrap_or_default() {
        "shale-dev".to_string()
    } else {
        let tag: String = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        format!("shale-dev-{tag}")
    };
    started.namespace = Some(namespace.clone());
    let config_path = dir.join("gateway.toml");
    std::fs::write(
        &config_path,
        gateway_toml(
            dir,
            gateway_port,
            metrics_port,
            settler_metrics_port,
            &rpc_url,
            marketplace,
            sp_key.address(),
            &socket,
            &namespace,
            &dataset,
        ),
    )?;
    started.gateway_config = Some(config_path.clone());
    started.save(dir)?;
    let config = SpConfig::load(&config_path)?;
    let s = step("importing the image into containerd");
    let provisioner = Provisioner::connect(config.gateway.containers.clone())
        .await
        .context("connecting the provisioner")?;
    provisioner
        .import_image(&archive)
        .await
        .context("importing the default image")?;
    done(s, format!("image imported into namespace {namespace}"));

    // The gateway.
    let s = step("starting the gateway");
    let cfg = config_path.to_str().context("state path is not UTF-8")?;
    // The settler in the gateway process signs claims with the SP's key (dev key, by env).
    let gpid = spawn_detached(
        &me,
        &["gateway", "--config", cfg],
        &[("SHALE_PRIVATE_KEY", dev_keys[SP].as_str())],
        &dir.join("gateway.log"),
    )?;
    started.gateway_pid = Some(gpid);
    started.save(dir)?;
    let addr: SocketAddr = ([127, 0, 0, 1], gateway_port).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if !alive(gpid) || Instant::now() > deadline {
            bail!(
                "the gateway did not start; see {}",
                dir.join("gateway.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done(s, format!("gateway on {addr}"));

    // The SP on chain.
    let s = step("registering the demo SP");
    let market = Marketplace::connect(&rpc_url, marketplace, Some(sp_key.clone())).await?;
    let host_key = crate::cmd::sp::host_key(&config)?;
    market
        .register_provider(
            &config.endpoint(),
            &host_key,
            &config.offer()?,
            &config.datasets()?,
        )
        .await
        .context("registering the demo SP")?;
    done(
        s,
        format!(
            "SP {:#x} registered with dataset {DATASET}",
            sp_key.address()
        ),
    );

    let state = DevState {
        rpc_url: rpc_url.clone(),
        marketplace,
        provider: sp_key.address(),
        client: parse_key(&dev_keys, CLIENT)?.address(),
        gateway: addr,
        metrics: Some(([127, 0, 0, 1], metrics_port).into()),
        host_key,
        anvil_pid: pid,
        gateway_pid: gpid,
        containerd_pid: keeper,
        containerd_socket: socket,
        namespace,
        dir: dir.to_path_buf(),
        dev_keys: dev_keys.clone(),
    };
    write_private(&dir.join("dev.json"), &serde_json::to_vec_pretty(&state)?)?;
    // Every command run inside the repository finds the dev chain through this file.
    std::fs::write(
        dir.join("client.toml"),
        format!(
            "# Written by `shale dev up`: the local chain.\nrpc_url = \"{rpc_url}\"\nmarketplace = \"{marketplace:#x}\"\nssh_dir = \"{}\"\n",
            dir.join("ssh").display()
        ),
    )?;
    for (name, index) in [("client.env", CLIENT), ("sp.env", SP)] {
        write_private(
            &dir.join(name),
            format!(
                "# Dev-chain key (public anvil test key; never use it elsewhere).\nexport SHALE_PRIVATE_KEY={}\nexport SHALE_GATEWAY_CONFIG={}\n",
                dev_keys[index],
                config_path.display()
            )
            .as_bytes(),
        )?;
    }
    Ok(state)
}

/// Writes a file only its owner can read: the stack's keys, even anvil's public test keys,
/// stay out of the gateway's unprivileged SSH process's reach, as an SP's real key must.
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents)?;
    Ok(())
}

/// Batch capacity of the dev stack's claims: small, so a debug build proves in seconds.
const CAPACITY: u32 = 16;
/// Seed of the dev stack's Groth16 set-up. Anyone who knows it can forge proofs: local only.
const KEY_SEED: u64 = 1;

/// Derives the claim circuit's keys from the dev seed, writes the proving key where the
/// settler loads it (`tick-16.pk`), and returns the verifier's creation code (compiled with the
/// project's solc-js).
async fn claim_keys(keys_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let keys_dir = keys_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let (pk, vk) = shale_circuits::setup_from_seed(CAPACITY as usize, KEY_SEED)
            .context("the Groth16 set-up")?;
        std::fs::create_dir_all(&keys_dir)?;
        pk.write(&keys_dir.join(format!("tick-{CAPACITY}.pk")))
            .context("writing the proving key")?;
        shale_circuits::solc::compile_verifier(&vk)
            .context("compiling the Solidity verifier with solc-js (run scripts/setup.sh)")
    })
    .await?
}

/// The orders' subnet of a new dev stack: the provisioner's default, 10.89.0.0/16, unless an
/// interface of this host is on it already (another stack's orders), then the next free 10.x.
fn free_subnet() -> String {
    let used = std::process::Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    (89..=250)
        .find(|x| !used.contains(&format!(" 10.{x}.")))
        .map_or_else(|| "10.89.0.0/16".into(), |x| format!("10.{x}.0.0/16"))
}

/// The dev stack's gateway config with its `[sp]` section.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gateway_toml(
    dir: &Path,
    port: u16,
    metrics_port: u16,
    settler_metrics_port: u16,
    rpc_url: &str,
    marketplace: Address,
    provider: Address,
    socket: &Path,
    namespace: &str,
    dataset: &PieceSource,
) -> String {
    let subnet = free_subnet();
    format!(
        r#"# Written by `shale dev up` for the local stack; see gateway/gateway.example.toml.
listen = "127.0.0.1:{port}"
host_key = "{dir}/host_ed25519"
# The ledger of metered ticks (SQLite) and the gateway's other state.
state_dir = "{dir}/gateway"

[chain]
rpc_url = "{rpc_url}"
marketplace = "{marketplace:#x}"
provider = "{provider:#x}"
poll_interval = 1

[containers]
socket = "{socket}"
namespace = "{namespace}"
state_dir = "{dir}/provisioner"
provider = "{provider:#x}"
stop_grace = 2

[containers.datasets]
# A Filecoin piece: mounted as /data/{DATASET}/digits.csv only once its CommP is this CID.
{DATASET} = {{ piece_cid = "{piece_cid}", source = "{source}" }}

[containers.network]
# A /16 no interface of this host uses yet (another stack's orders, a LAN).
subnet = "{subnet}"

[sp]
endpoint = "127.0.0.1:{port}"

[sp.offer]
cpus = 2
memory = "1GiB"
# Disk an order gets unless it asks (--disk), and the most one order may ask for.
disk = "1GiB"
max_disk = "8GiB"
gpu_model = ""
gpu_count = 0
# 0.36 FIL an hour is 10^14 wei a second.
price_per_hour = "0.36FIL"
price_per_gib = "0.01FIL"

[metrics]
listen = "127.0.0.1:{metrics_port}"
settler_listen = "127.0.0.1:{settler_metrics_port}"

[meter]
# One-second ticks: a batch of 16 ticks fills, and is claimed, 16 s into the demo's lease.
tick_interval_secs = 1

[sp.settler]
key_dir = "{dir}/keys"
capacities = [{CAPACITY}]
# Claim a partly full batch after 3 s (the lease's last ticks), look every second; the demo
# settles itself.
max_wait_secs = 3
poll_interval_ms = 1000
settle = false

[sp.datasets.{DATASET}]
description = "UCI optical handwritten digits: 1797 8x8 images with labels (scikit-learn's copy, from Debian's python3-sklearn)"
"#,
        dir = dir.display(),
        socket = socket.display(),
        piece_cid = dataset.piece_cid,
        source = dataset.source.display(),
    )
}

/// The digits dataset: fetched once with `apt-get download python3-sklearn` + `dpkg -x` into
/// `datasets/` in Shale's home, then copied into the stack's dataset folder.
async fn ensure_dataset(dir: &Path) -> anyhow::Result<PathBuf> {
    let cache = image_build::shale_home().join("datasets/digits");
    let csv = cache.join("digits.csv");
    if !csv.is_file() {
        let work = tempfile::Builder::new()
            .prefix("shale-dataset-")
            .tempdir()?;
        let run = |cmd: &str, args: &[&str]| {
            let out = std::process::Command::new(cmd)
                .args(args)
                .current_dir(work.path())
                .output()
                .with_context(|| format!("running {cmd}"))?;
            if !out.status.success() {
                bail!(
                    "{cmd} {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        run("apt-get", &["download", "python3-sklearn"])
            .context("downloading the digits dataset (Debian package python3-sklearn)")?;
        let deb = std::fs::read_dir(work.path())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        let deb = deb.to_str().context("path is not UTF-8")?.to_string();
        run("dpkg", &["-x", &deb, "x"])?;
        let gz = work
            .path()
            .join("x/usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz");
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&gz)
            .output()
            .context("running gzip")?;
        if !out.status.success() {
            bail!("{} is not a gzip file", gz.display());
        }
        std::fs::create_dir_all(&cache)?;
        std::fs::write(cache.join("digits.csv.tmp"), &out.stdout)?;
        std::fs::rename(cache.join("digits.csv.tmp"), &csv)?;
        std::fs::write(
            cache.join("README"),
            format!(
                "UCI ML hand-written digits (test set of the optical recognition dataset), as shipped by\n\
                 scikit-learn in Debian's {}.\n\
                 digits.csv: 1797 rows of 64 pixel values (0-16, 8x8 image) and the digit (0-9).\n",
                Path::new(&deb).file_name().unwrap_or_default().to_string_lossy()
            ),
        )?;
    }
    let target = dir.join("datasets").join(DATASET);
    std::fs::create_dir_all(&target)?;
    for f in ["digits.csv", "README"] {
        std::fs::copy(cache.join(f), target.join(f))?;
    }
    Ok(target)
}

/// `shale dev down`.
pub async fn down() -> anyhow::Result<()> {
    let dir = state_dir();
    if !dir.exists() {
        eprintln!("The local stack is not up.");
        return Ok(());
    }
    stop(&dir, false).await?;
    eprintln!("✔ local stack stopped; {} removed", dir.display());
    Ok(())
}

/// Stops what `started.json` records, in reverse order, and removes the folder (unless
/// `keep_logs`, after a failed `up`, when the logs explain the failure).
async fn stop(dir: &Path, keep_logs: bool) -> anyhow::Result<()> {
    let started: Started = std::fs::read(dir.join("started.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(pid) = started.gateway_pid {
        terminate(pid, "gateway", Duration::from_secs(20)).await;
    }
    // Release every order's container: with the system's containerd nothing else would.
    if let (Some(cfg), Some(rpc), Some(addr)) = (
        &started.gateway_config,
        &started.rpc_url,
        started.marketplace,
    ) {
        if let (Ok(config), Ok(market)) = (
            SpConfig::load(cfg),
            Marketplace::connect(rpc, addr, None).await,
        ) {
            let containers = shale_provisioner::ProvisionerConfig {
                scope: market.scope().await.unwrap_or_default(),
                ..config.gateway.containers.clone()
            };
            if let Ok(p) = Provisioner::connect(containers).await {
                let count = market.order_count().await.unwrap_or(0);
                for id in 1..=count {
                    let _ = p.release(id).await;
                }
            }
        }
    }
    if let Some(pid) = started.containerd_pid {
        terminate(pid, "containerd", Duration::from_secs(40)).await;
    }
    if let Some(pid) = started.anvil_pid {
        terminate(pid, "anvil", Duration::from_secs(10)).await;
    }
    if !keep_logs {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(pid: u32, what: &str, grace: Duration) {
    if !alive(pid) {
        return;
    }
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        // Our own children (spawned by this process) must be reaped to stop being "alive".
        unsafe {
            libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if alive(pid) {
        tracing::warn!(pid, what, "did not stop after SIGTERM; killing it");
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

fn print_endpoints(s: &DevState) {
    println!("Local stack is up:");
    println!("  chain RPC    {}", s.rpc_url);
    println!("  marketplace  {:#x}", s.marketplace);
    println!(
        "  gateway      ssh -p {} ORDER@{}",
        s.gateway.port(),
        s.gateway.ip()
    );
    if let Some(metrics) = s.metrics {
        println!("  metrics      http://{metrics}/metrics");
    }
    println!(
        "  SP           {:#x} (key: source {}/sp.env)",
        s.provider,
        s.dir.display()
    );
    println!(
        "  client       {:#x} (key: source {}/client.env)",
        s.client,
        s.dir.display()
    );
    println!("  containerd   {}", s.containerd_socket.display());
    println!(
        "  logs         {}/{{anvil,gateway,containerd}}.log",
        s.dir.display()
    );
    println!("Try: shale providers · shale demo · shale dev down");
}

/// `shale dev status`.
pub fn status(json: bool) -> anyhow::Result<()> {
    let s = DevState::load(&state_dir())?;
    if json {
        return print_json(&s);
    }
    print_endpoints(&s);
    for (what, pid) in [
        ("anvil", Some(s.anvil_pid)),
        ("gateway", Some(s.gateway_pid)),
        ("containerd keeper", s.containerd_pid),
    ] {
        if let Some(pid) = pid {
            println!(
                "  {what:<12} pid {pid} {}",
                if alive(pid) { "running" } else { "NOT RUNNING" }
            );
        }
    }
    Ok(())
}

/// `shale dev containerd --dir D` (hidden): runs a project-local containerd until SIGTERM, then
/// shuts it down the library's way (tasks killed and deleted, shims stopped, mounts undone).
pub async fn containerd(dir: &Path) -> anyhow::Result<()> {
    let local = daemon::LocalContainerd::spawn(dir)
        .await
        .context("starting containerd")?;
    eprintln!(
        "containerd on {} (pid {:?})",
        local.socket().display(),
        local.pid()
    );
    crate::cmd::gateway::shutdown_signal().await;
    local.shutdown().await.context("stopping containerd")?;
    Ok(())
}
