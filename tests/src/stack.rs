//! One complete local Shale: chain, marketplace, provider, containerd, image and gateway.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shale_broker::{Broker, BrokerClient};
use shale_contracts::devnet::Devnet;
use shale_contracts::{Address, Dataset, Marketplace, NewOrder, Offer, U256};
use shale_gateway::chain_standing::ChainStanding;
use shale_gateway::config::{AuthConfig, ChainConfig, SessionConfig};
use shale_gateway::{Gateway, GatewayConfig, LeaseEvent};
use shale_provisioner::daemon::LocalContainerd;
use shale_provisioner::{
    image_build, DatasetSource, ImageRef, Machines, NetworkConfig, PieceSource, Provisioner,
    ProvisionerConfig,
};
use shale_settler::{Settler, SettlerConfig, SettlerTask};
use tempfile::TempDir;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::outage::RpcRelay;
use crate::ssh::{ClientKey, Target};

/// The dataset every test stack serves, mounted at `/data/demo` in order containers: a
/// Filecoin piece whose payload is one file, `README`, checked against its piece CID before
/// any container sees it.
pub const DATASET: &str = "demo";
/// The payload of the demo dataset's piece (at least 65 bytes: the smallest piece).
pub const DATASET_TEXT: &str =
    "the demo dataset: one Filecoin piece, mounted once its CommP is its piece CID\n";

/// Account indexes of the dev chain.
const SP_ACCOUNT: usize = 1;
const CLIENT_ACCOUNT: usize = 2;

/// What an order asks for.
#[derive(Debug, Clone)]
pub struct OrderOptions {
    /// Whether the SP accepts it right away.
    pub accept: bool,
    /// Escrow paid in, in wei.
    pub escrow: U256,
    /// Longest lease, in seconds.
    pub max_duration_secs: u64,
    /// The dataset to mount.
    pub dataset: Option<String>,
    /// The order's disk in MiB; the offer's default ([`STACK_DISK_MIB`]) when `None`.
    pub disk_mib: Option<u64>,
    /// The client's acknowledgment key, when the test acknowledges usage itself.
    pub ack_signer: Option<shale_contracts::Address>,
    /// Bytes payable without an acknowledgment. Tests that drive stock `ssh` without the
    /// payment tunnel get a terabyte, so their claims are not held back; those about
    /// acknowledgments set it low.
    pub byte_allowance: u64,
    /// The client's own image, `(HOST/PATH, digest)`, instead of the SP's catalog image.
    pub own_image: Option<(String, [u8; 32])>,
}

impl Default for OrderOptions {
    fn default() -> Self {
        Self {
            accept: true,
            escrow: U256::from(10u64).pow(U256::from(18u64)),
            max_duration_secs: 3600,
            dataset: Some(DATASET.into()),
            disk_mib: None,
            ack_signer: None,
            byte_allowance: 1 << 40,
            own_image: None,
        }
    }
}

/// The disk the stack's SP offers per order by default, and the most an order may ask for (MiB).
pub const STACK_DISK_MIB: u64 = 512;
pub const STACK_MAX_DISK_MIB: u64 = 4096;

/// How the stack's gateway is set up, where a test or benchmark needs other than the defaults.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// The gateway's session policy (limits per order, byte counting).
    pub sessions: SessionConfig,
    /// The orders' network (`[containers.network]`); the provisioner's default when `None`.
    pub network: Option<NetworkConfig>,
    /// Run the settler beside the gateway, as `shale gateway` does with an `[sp.settler]`
    /// section: the marketplace then verifies claims with the real Groth16 verifier of
    /// [`crate::keys`], and the settler proves with its proving key (`key_dir` and
    /// `key_seed` are set by the stack). `None`: no settler, and no verifier on chain.
    pub settler: Option<SettlerConfig>,
    /// The gateway's authentication policy (order cache times, failure limits); `None`: the
    /// defaults with failure limits high enough for tests that provoke many failures on
    /// purpose.
    pub auth: Option<AuthConfig>,
    /// Put an [`RpcRelay`] between the gateway (and its watcher) and the chain, so a test can
    /// cut the gateway off the chain ([`Stack::rpc_relay`]) while its own clients still reach
    /// it.
    pub chain_relay: bool,
    /// Start a containerd of the stack's own even when `SHALE_CONTAINERD_SOCKET` names a shared
    /// one, for tests that kill and restart it ([`Stack::kill_containerd`]).
    pub own_containerd: bool,
    /// The chain's shape (chain id, block time); anvil's defaults (31337, a block per
    /// transaction) when `None`.
    pub devnet: Option<shale_contracts::devnet::DevnetOptions>,
    /// Registries clients may bring their own images from, with their credentials
    /// (`[containers] allow_client_images`, `allowed_registries` and `[[registries]]`); the SP
    /// publishes their hosts. Empty: catalog images only.
    pub client_image_registries: Vec<shale_provisioner::RegistryConfig>,
    /// Start processes through containerd's exec (the fallback) instead of the containers'
    /// agent. `SHALE_TEST_EXEC=containerd` turns it on for every stack.
    pub containerd_exec: bool,
}

/// Whether this stack's processes start through containerd's exec rather than the agent.
fn containerd_exec(options: &StackOptions) -> bool {
    options.containerd_exec || std::env::var("SHALE_TEST_EXEC").as_deref() == Ok("containerd")
}

/// A running stack. Dropping it stops the gateway, the chain and (if it started one) containerd.
pub struct Stack {
    /// Scratch space: keys, known_hosts, volumes, the dataset.
    pub dir: TempDir,
    /// The local chain.
    pub devnet: Devnet,
    /// The marketplace contract.
    pub marketplace: Address,
    /// The SP's signing client.
    pub sp: Marketplace,
    /// The client's signing client.
    pub client: Marketplace,
    /// The provisioner behind the gateway's broker (for checks from the SP's side).
    pub provisioner: Provisioner,
    /// Where the gateway listens.
    pub gateway: SocketAddr,
    /// The gateway's host key as registered on chain.
    pub host_key: String,
    /// Where the gateway serves `/metrics`.
    pub metrics: SocketAddr,
    known_hosts: PathBuf,
    /// The gateway's configuration with its real listen addresses, to start it again.
    config: GatewayConfig,
    shutdown: Option<oneshot::Sender<()>>,
    gateway_task: Option<JoinHandle<()>>,
    /// The broker serving the provisioner to the gateway, as `shale gateway`'s broker process.
    broker: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
    /// The settler's configuration, when the stack runs one.
    settler_config: Option<SettlerConfig>,
    settler: Option<(Settler, SettlerTask)>,
    /// Between the gateway and the chain, when the stack was started with `chain_relay`.
    relay: Option<RpcRelay>,
    // Dropped last: containers must outlive nothing that talks to them.
    containerd: LocalContainerd,
}

/// Runs `gateway` until the returned sender fires (or is dropped).
fn spawn_gateway(gateway: Gateway) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let (shutdown, stop) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(e) = gateway
            .run(async {
                let _ = stop.await;
            })
            .await
        {
            tracing::error!(error = %e, "gateway failed");
        }
    });
    (shutdown, task)
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHALE_TEST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Stack {
    /// Starts everything and registers the SP with one dataset.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(StackOptions::default()).await
    }

    /// Starts everything with `options` for the gateway.
    pub async fn start_with(options: StackOptions) -> anyhow::Result<Self> {
        let containerd_exec = containerd_exec(&options);
        init_tracing();
        let dir = tempfile::Builder::new().prefix("shale-e2e-").tempdir()?;

        let devnet = Devnet::start_with(options.devnet.clone().unwrap_or_default())
            .await
            .context("starting anvil")?;
        let relay = if options.chain_relay {
            Some(RpcRelay::start(devnet.rpc_url()).await?)
        } else {
            None
        };
        // What the gateway reads the chain through; the test's own clients use the devnet's.
        let gateway_rpc = relay
            .as_ref()
            .map_or_else(|| devnet.rpc_url().to_string(), RpcRelay::url);
        let mut settler_config = None;
        let (capacities, verifiers) = match options.settler {
            Some(c) => {
                let keys = crate::keys::claim_keys().await?;
                settler_config = Some(crate::keys::with_keys(c, keys));
                let verifier = shale_contracts::devnet::deploy_bytecode(
                    devnet.rpc_url(),
                    devnet.signer(0),
                    shale_contracts::Bytes::from(keys.verifier.clone()),
                )
                .await
                .context("deploying the Groth16 verifier")?;
                (vec![crate::keys::CAPACITY], vec![verifier])
            }
            None => (Vec::new(), Vec::new()),
        };
        let marketplace = devnet
            .deploy_marketplace(&capacities, &verifiers)
            .await
            .context("deploying the marketplace")?;
        let sp = devnet.marketplace_as(marketplace, SP_ACCOUNT).await?;
        let client = devnet.marketplace_as(marketplace, CLIENT_ACCOUNT).await?;

        let socket = std::env::var_os("SHALE_CONTAINERD_SOCKET").map(PathBuf::from);
        let containerd_dir = dir.path().join("containerd");
        let containerd = if options.own_containerd {
            LocalContainerd::spawn(&containerd_dir).await
        } else {
            LocalContainerd::connect_or_spawn(socket.as_deref(), &containerd_dir).await
        }
        .context("reaching containerd")?;
        let archive = image_build::build_default_image(&image_build::default_cache_dir())
            .await
            .context("building the default image")?;

        let dataset_dir = dir.path().join("dataset");
        std::fs::create_dir_all(&dataset_dir)?;
        let payload = dataset_dir.join("README");
        std::fs::write(&payload, DATASET_TEXT)?;
        let piece = shale_provisioner::piece::commp_file(&payload)?;
        // A namespace per stack: order ids restart at 1 on every fresh chain.
        let namespace = format!(
            "shale-test-{}",
            dir.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("shale-e2e-")
                .to_lowercase()
        );
        let containers = ProvisionerConfig {
            socket: containerd.socket().to_path_buf(),
            namespace,
            state_dir: dir.path().join("state"),
            image: ImageRef::default(),
            datasets: BTreeMap::from([(
                DATASET.to_string(),
                DatasetSource::Piece(PieceSource {
                    piece_cid: piece.cid(),
                    source: payload,
                    present: Default::default(),
                }),
            )]),
            provider: format!("{:#x}", devnet.signer(SP_ACCOUNT).address()),
            stop_grace: Duration::from_secs(2),
            scope: sp.scope().await?,
            network: with_own_subnet(options.network.unwrap_or_default()),
            allow_client_images: !options.client_image_registries.is_empty(),
            allowed_registries: options
                .client_image_registries
                .iter()
                .map(|r| r.host.clone())
                .collect(),
            registries: options.client_image_registries.clone(),
            exec_agent: !containerd_exec,
            agent: if containerd_exec {
                None
            } else {
                Some(crate::client::agent_exe()?)
            },
            ..ProvisionerConfig::default()
        };
        let allowed_registries = containers.allowed_registries.clone();
        let provisioner = Provisioner::connect(containers.clone())
            .await
            .context("connecting the provisioner")?;
        provisioner
            .import_image(&archive)
            .await
            .context("importing the default image")?;

        let config = GatewayConfig {
            listen: "127.0.0.1:0".parse()?,
            host_key: dir.path().join("host_ed25519"),
            chain: ChainConfig {
                rpc_url: gateway_rpc.clone(),
                marketplace,
                provider: devnet.signer(SP_ACCOUNT).address(),
                poll_interval: Duration::from_millis(500),
                fees: Default::default(),
            },
            containers,
            images: Default::default(),
            registries: Vec::new(),
            image_gc: Default::default(),
            sessions: options.sessions,
            state_dir: dir.path().join("gateway"),
            meter: shale_meter::MeterConfig {
                tick_interval_secs: 1,
                ledger_url: None,
            },
            payment: Default::default(),
            acknowledgments: Default::default(),
            metrics: shale_gateway::config::MetricsConfig {
                listen: Some("127.0.0.1:0".parse()?),
                settler_listen: None,
            },
            log: Default::default(),
            privsep: Default::default(),
            auth: options.auth.unwrap_or(AuthConfig {
                // Tests provoke many failures from 127.0.0.1 on purpose.
                max_failures: 10_000,
                ..AuthConfig::default()
            }),
        };
        let reader = Marketplace::connect(&gateway_rpc, marketplace, None).await?;
        let (machines, broker) =
            start_broker(provisioner.clone(), dir.path(), &config, reader.clone()).await?;
        let mut gateway = Gateway::bind(config.clone(), reader, machines.clone()).await?;
        let settler = match &settler_config {
            Some(c) => Some(start_settler(&mut gateway, c, &sp).await?),
            None => None,
        };
        let gateway_addr = gateway.local_addr();
        let host_key = gateway.host_public_key();
        let metrics = gateway
            .metrics_addr()
            .context("the test gateway serves metrics")?;
        let config = GatewayConfig {
            listen: gateway_addr,
            metrics: shale_gateway::config::MetricsConfig {
                listen: Some(metrics),
                settler_listen: None,
            },
            ..config
        };
        let (shutdown, gateway_task) = spawn_gateway(gateway);

        sp.register_provider(
            &gateway_addr.to_string(),
            &host_key,
            &Offer {
                cpus: 2,
                memory_mib: 1024,
                disk_mib: STACK_DISK_MIB,
                max_disk_mib: STACK_MAX_DISK_MIB,
                gpu_model: String::new(),
                gpu_count: 0,
                price_per_second: U256::from(1_000_000_000u64),
                price_per_gib: U256::from(10u64).pow(U256::from(15u64)),
            },
            &[Dataset {
                id: DATASET.into(),
                piece_cid: Some(piece.cid().to_string()),
                deal_id: None,
                size_bytes: piece.payload_size,
                description: "the demo dataset".into(),
                verified_at: None,
            }],
        )
        .await
        .context("registering the SP")?;
        if !allowed_registries.is_empty() {
            sp.set_client_image_registries(&allowed_registries)
                .await
                .context("publishing the registries clients may bring images from")?;
        }

        // The client pins the host key it read from the chain: no trust on first use.
        let registered = client.provider(devnet.signer(SP_ACCOUNT).address()).await?;
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!(
                "[{}]:{} {}\n",
                gateway_addr.ip(),
                gateway_addr.port(),
                registered.ssh_host_key
            ),
        )?;

        Ok(Self {
            dir,
            devnet,
            marketplace,
            sp,
            client,
            provisioner,
            gateway: gateway_addr,
            host_key,
            metrics,
            known_hosts,
            config,
            shutdown: Some(shutdown),
            gateway_task: Some(gateway_task),
            broker: Some(broker),
            settler_config,
            settler,
            relay,
            containerd,
        })
    }

    /// The relay between the gateway and the chain, when the stack was started with
    /// [`StackOptions::chain_relay`].
    pub fn rpc_relay(&self) -> Option<&RpcRelay> {
        self.relay.as_ref()
    }

    /// Kills the stack's containerd with SIGKILL, as a crash would (its shims and containers
    /// live on). Fails for a containerd the stack did not start: start the stack with
    /// [`StackOptions::own_containerd`].
    pub fn kill_containerd(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.containerd.is_owned(),
            "the stack's containerd is shared, not the stack's to kill"
        );
        self.containerd.kill();
        Ok(())
    }

    /// Starts the stack's containerd again on the same directories after
    /// [`Stack::kill_containerd`] (killing it first if it still runs), and waits until it
    /// answers. The gateway is not touched: it has to find the daemon again by itself.
    pub async fn restart_containerd(&mut self) -> anyhow::Result<()> {
        self.containerd
            .restart()
            .await
            .context("restarting the stack's containerd")
    }

    /// The SP's provider address.
    pub fn provider(&self) -> Address {
        self.devnet.signer(SP_ACCOUNT).address()
    }

    /// The dev-chain key of the client account, as `0x` hex (what `SHALE_PRIVATE_KEY` takes).
    pub fn client_private_key(&self) -> String {
        format!("{:#x}", self.devnet.signer(CLIENT_ACCOUNT).to_bytes())
    }

    /// The settler running beside the gateway, when the stack was started with one.
    pub fn settler(&self) -> Option<&Settler> {
        self.settler.as_ref().map(|(s, _)| s)
    }

    /// Where the gateway's SQLite ledger lives (the SP's database of ticks, acknowledgments
    /// and claims).
    pub fn ledger_path(&self) -> PathBuf {
        self.config.state_dir.join("ledger.db")
    }

    /// A connection of its own to the gateway's ledger, for checks from the SP's side.
    pub async fn ledger(&self) -> anyhow::Result<shale_meter::Ledger> {
        self.config
            .meter
            .open_ledger(&self.config.state_dir)
            .await
            .context("opening the gateway's ledger")
    }

    /// A new client key of `kind` (`ed25519`, `ecdsa`, `rsa`).
    pub fn key(&self, name: &str, kind: &str) -> anyhow::Result<ClientKey> {
        ClientKey::generate(self.dir.path(), name, kind)
    }

    /// Places an order for `key` with the SP (and accepts it, unless told not to).
    pub async fn order(&self, key: &ClientKey, options: OrderOptions) -> anyhow::Result<u64> {
        let provider = self
            .client
            .provider(self.devnet.signer(SP_ACCOUNT).address())
            .await?;
        let mut order = NewOrder::for_offer(
            &provider,
            key.fingerprint,
            options.escrow,
            options.max_duration_secs,
        );
        order.dataset = options.dataset;
        order.ack_signer = options.ack_signer;
        order.byte_allowance = options.byte_allowance;
        if let Some(disk) = options.disk_mib {
            order.disk_mib = disk;
        }
        if let Some((repository, digest)) = options.own_image {
            order.image_repository = Some(repository);
            order.image_digest = Some(digest);
        }
        let id = self.client.create_order(&order).await?;
        if options.accept {
            self.sp.accept(id).await?;
        }
        Ok(id)
    }

    /// How the stock clients reach order `user` with `key`.
    pub fn target(&self, user: impl Into<String>, key: &ClientKey) -> Target {
        Target {
            host: self.gateway.ip().to_string(),
            port: self.gateway.port(),
            known_hosts: self.known_hosts.clone(),
            key: key.path.clone(),
            user: user.into(),
            batch: true,
        }
    }

    /// The gateway's `/metrics` page.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(self.metrics).await?;
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = String::new();
        tcp.read_to_string(&mut body).await?;
        anyhow::ensure!(
            body.starts_with("HTTP/1.0 200"),
            "metrics answered {body:.80}"
        );
        Ok(body)
    }

    /// Stops the gateway (its orders' containers keep running) and starts a new one, as a fresh
    /// process would: a new provisioner on the same containerd and state, the same addresses,
    /// host key and ledger. [`Stack::provisioner`] is the new one afterwards.
    pub async fn restart_gateway(&mut self) -> anyhow::Result<()> {
        self.stop_gateway().await;
        self.start_gateway().await
    }

    /// Starts the gateway (and its settler) again after [`Stack::stop_gateway`], as a fresh
    /// process would; see [`Stack::restart_gateway`].
    pub async fn start_gateway(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.gateway_task.is_none(), "the gateway is running");
        let provisioner = Provisioner::connect(self.config.containers.clone())
            .await
            .context("connecting the new provisioner")?;
        let reader =
            Marketplace::connect(&self.config.chain.rpc_url, self.marketplace, None).await?;
        let (machines, broker) = start_broker(
            provisioner.clone(),
            self.dir.path(),
            &self.config,
            reader.clone(),
        )
        .await?;
        self.broker = Some(broker);
        // The old listeners are closed; their ports may take a moment to be free again.
        let mut tries = 0;
        let mut gateway = loop {
            match Gateway::bind(self.config.clone(), reader.clone(), machines.clone()).await {
                Ok(g) => break g,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "rebinding the gateway");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("starting the gateway again"),
            }
        };
        anyhow::ensure!(gateway.host_public_key() == self.host_key, "a new host key");
        if let Some(c) = &self.settler_config {
            self.settler = Some(start_settler(&mut gateway, c, &self.sp).await?);
        }
        let (shutdown, task) = spawn_gateway(gateway);
        self.shutdown = Some(shutdown);
        self.gateway_task = Some(task);
        self.provisioner = provisioner;
        Ok(())
    }

    /// Stops the gateway, releases every order's container, and waits for both.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_gateway().await;
        let count = self.sp.order_count().await.unwrap_or(0);
        for id in 1..=count {
            let _ = self.provisioner.release(id).await;
        }
        Ok(())
    }

    /// Stops the gateway and its settler, as the SP stopping its `shale gateway` process; the
    /// orders' containers and the ledger stay. [`Stack::start_gateway`] starts it again.
    pub async fn stop_gateway(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.gateway_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
        if let Some((_, task)) = self.settler.take() {
            // After the round in progress: a claim in flight is finished and recorded.
            let _ = tokio::time::timeout(Duration::from_secs(120), task.shutdown()).await;
        }
        if let Some((stop, task)) = self.broker.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }
}

/// Serves `provisioner` on a broker socket in `dir`, as `shale gateway`'s broker process does,
/// and returns the gateway's client of it: every test session's processes, forwards and
/// containers go through the broker's protocol and its descriptor passing.
async fn start_broker(
    provisioner: Provisioner,
    dir: &std::path::Path,
    config: &GatewayConfig,
    chain: Marketplace,
) -> anyhow::Result<(Arc<dyn Machines>, (oneshot::Sender<()>, JoinHandle<()>))> {
    let socket = dir.join("broker.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).context("binding the broker socket")?;
    let (stop, stopped) = oneshot::channel::<()>();
    // It reads the chain through the gateway's RPC, so an outage the tests provoke hits both.
    let chain = ChainStanding::new(chain, config.chain.provider);
    let broker = Broker::new(provisioner, chain, vec![nix::unistd::getuid().as_raw()])
        .with_stale_max(config.auth.stale_order_max);
    let task = tokio::spawn(broker.serve(listener, async {
        let _ = stopped.await;
    }));
    let client = BrokerClient::connect(&socket)
        .await
        .context("reaching the stack's broker")?;
    Ok((Arc::new(client), (stop, task)))
}

/// Starts a settler on the gateway's own ledger pool, signing with the SP's key, with its
/// metrics on the gateway's `/metrics`, and hands it the gateway's lease events (every metered
/// lease, every order whose billing ended), as `shale gateway` does.
async fn start_settler(
    gateway: &mut Gateway,
    settler: &SettlerConfig,
    sp: &Marketplace,
) -> anyhow::Result<(Settler, SettlerTask)> {
    let market = sp.clone().with_poll_interval(Duration::from_millis(200));
    let settler = Settler::new(settler, market, gateway.ledger().clone())
        .await
        .context("starting the settler")?;
    let registry = gateway
        .metrics_registry()
        .context("the gateway's metrics registry is shared already")?;
    settler.metrics().register(registry);
    // Ends when the gateway (the events' sender) is gone.
    tokio::spawn(feed_leases(settler.clone(), gateway.lease_events()));
    let task = settler.spawn();
    Ok((settler, task))
}

/// The settler tracks each metered lease, and claims at once when one stops.
async fn feed_leases(settler: Settler, mut leases: broadcast::Receiver<LeaseEvent>) {
    loop {
        match leases.recv().await {
            Ok(LeaseEvent::Started { order }) => settler.track(order),
            Ok(LeaseEvent::Ended { order }) => settler.lease_stopped(order),
            Err(broadcast::error::RecvError::Lagged(_)) => settler.wake(),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Each stack may run its own containerd, whose uid slots (and so order addresses) can
/// coincide with another stack's: unless a test chose one, a stack gets a subnet of its own.
fn with_own_subnet(mut network: NetworkConfig) -> NetworkConfig {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if network.subnet == NetworkConfig::default().subnet {
        // Containers of earlier tests may still run with addresses of their own: a subnet
        // nothing on the host uses yet.
        let used = std::process::Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let x = (0..150)
            .map(|_| {
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + u64::from(std::process::id()) * 7;
                100 + n % 150
            })
            .find(|x| !used.contains(&format!(" 10.{x}.")))
            .expect("a free 10.x.0.0/16 for the stack's orders");
        network.subnet = format!("10.{x}.0.0/16").parse().expect("a valid subnet");
    }
    network
}
