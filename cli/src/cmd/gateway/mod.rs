//! `shale gateway`: the SP's gateway as three processes from one config, until SIGINT or
//! SIGTERM.
//!
//! - **broker** (root, [`broker`]): containerd, namespace dials, the orders' network, on a local
//!   socket that only the SSH process's user may use.
//! - **SSH** (`[privsep] user`, no capabilities, [`ssh`]): the internet-facing russh server,
//!   metering into the ledger; it reaches containers only through the broker.
//! - **supervisor** (this process, root): holds the provider's wallet key and runs the settler
//!   (claims with Groth16 proofs) when the config has `[sp.settler]`, and the auto-accept policy
//!   when `[sp.accept] auto` is set; both sign with `[sp] keystore`, SHALE_KEYSTORE or
//!   SHALE_PRIVATE_KEY, which no child inherits. It starts the children, restarts one that
//!   dies (sessions of a dead SSH process end; what the ledger holds is kept, and the new one
//!   adopts the running containers), and stops them in order.
//!
//! The SSH process tells the supervisor of every lease it meters and every order whose billing
//! ended as JSON lines on its stdout; the settler takes them as hints only (they can make it
//! claim sooner, nothing else), and the SSH process refreshes its meters from the chain's
//! claim events itself.

pub mod broker;
pub mod ssh;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use shale_contracts::{MarketEvent, Marketplace, OrderState};
use shale_gateway::{GatewayConfig, LeaseEvent};
use shale_settler::{Settler, SettlerConfig, SettlerTask};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::installed::InstalledCatalog;
use crate::spconfig::SpConfig;

/// Marketplace events buffered for each of their consumers; one that falls further behind is
/// told how many it missed (and catches up its own way).
const MARKET_EVENTS: usize = 1024;

/// How long a child gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// The longest line the SSH process may write on its event channel; a longer one is hostile.
const MAX_EVENT_LINE: usize = 4096;

/// Which of `shale gateway`'s processes this one is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Start the whole set (the default).
    Supervisor,
    /// The privileged broker (started by the supervisor).
    Broker,
    /// The unprivileged SSH process (started by the supervisor).
    Ssh,
}

/// Runs `role` with the config at `config_path`.
pub async fn run(config_path: &Path, role: Role) -> anyhow::Result<()> {
    match role {
        Role::Supervisor => supervise(config_path).await,
        Role::Broker => broker::run(config_path).await,
        Role::Ssh => ssh::run(config_path).await,
    }
}

/// One child process of the set, started again when it dies.
struct Member {
    role: Role,
    child: Child,
    restarts: u32,
}

impl Member {
    fn spawn(role: Role, config_path: &Path) -> anyhow::Result<Member> {
        let me = std::env::current_exe().context("finding the shale binary")?;
        let name = match role {
            Role::Broker => "broker",
            Role::Ssh => "ssh",
            Role::Supervisor => unreachable!("the supervisor is not its own child"),
        };
        let mut cmd = Command::new(me);
        cmd.arg("gateway")
            .arg("--config")
            .arg(config_path)
            .args(["--role", name])
            .env_clear()
            .envs(crate::privsep::child_env())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .stdout(if role == Role::Ssh {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the gateway's {name} process"))?;
        tracing::info!(role = name, pid = child.id(), "gateway process started");
        Ok(Member {
            role,
            child,
            restarts: 0,
        })
    }

    /// Stops the child: SIGTERM, then SIGKILL after [`STOP_GRACE`].
    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(role = ?self.role, "did not stop after SIGTERM; killing it");
            let _ = self.child.kill().await;
        }
    }

    /// Starts the child again after it died, once its backoff has passed: doubling from 1 s
    /// with every restart, up to 30 s.
    async fn restart(&mut self, config_path: &Path) -> anyhow::Result<()> {
        let backoff =
            Duration::from_secs(1u64 << self.restarts.min(5)).min(Duration::from_secs(30));
        tokio::time::sleep(backoff).await;
        let restarts = self.restarts + 1;
        *self = Member::spawn(self.role, config_path)?;
        self.restarts = restarts;
        Ok(())
    }
}

/// Starts the broker, then the SSH process, then the settler and the accept policy here, and
/// keeps the set running until SIGINT or SIGTERM.
async fn supervise(config_path: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "shale gateway starts as root: its broker drives containerd and the orders' network, \
             and its SSH process drops to [privsep] user itself"
        );
    }
    let config_path = std::fs::canonicalize(config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let sp = SpConfig::load(&config_path)?;
    let config = sp.gateway.clone();
    let user = crate::privsep::ensure_user(&config.privsep.user)?;
    // The ledger is created here (the settler's pool) and then handed to the SSH process's user,
    // which writes ticks into it; SQLite run as root gives its journal files the same owner.
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating {}", config.state_dir.display()))?;
    let ledger = config
        .meter
        .open_ledger(&config.state_dir)
        .await
        .context("opening the ledger")?;
    crate::privsep::hand_over(&config.state_dir, &user)?;

    let mut broker = Member::spawn(Role::Broker, &config_path)?;
    let mut ssh = Member::spawn(Role::Ssh, &config_path)?;
    let (lease_events, _) = broadcast::channel(MARKET_EVENTS);
    let background = Background::default();
    // Ends by itself when the SSH process's stdout closes (it exited).
    background.spawn(read_lease_events(
        ssh.child.stdout.take().expect("piped"),
        lease_events.clone(),
    ));

    let (market_events, _) = broadcast::channel(MARKET_EVENTS);
    let mut settler_task = None;
    if sp.sp.settler.is_some() || sp.sp.accept.auto {
        let market = provider_market(&sp, &config).await?;
        if let Some(s) = &sp.sp.settler {
            let (settler, task) = start_settler(market.clone(), ledger, s).await?;
            settler_task = Some(task);
            if let Some(addr) = config.metrics.settler_listen {
                background.spawn(serve_settler_metrics(&settler, addr).await?);
            }
            background.spawn(feed_leases(settler.clone(), lease_events.subscribe()));
            background.spawn(feed_market(settler, market_events.subscribe()));
        }
        background.spawn(publish_verifications(market.clone(), sp.clone()));
        if sp.sp.accept.auto {
            background.spawn(accept_orders(market, sp.clone(), market_events.subscribe()));
        }
        let watched = read_market(&config)
            .await?
            .with_poll_interval(config.chain.poll_interval);
        background.spawn(follow_market(watched, market_events));
    }

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            exited = broker.child.wait() => {
                tracing::error!(status = ?exited, "the gateway's broker exited; starting it again");
                broker.restart(&config_path).await?;
            }
            exited = ssh.child.wait() => {
                tracing::error!(status = ?exited, "the gateway's SSH process exited; starting it again");
                ssh.restart(&config_path).await?;
                background.spawn(read_lease_events(
                    ssh.child.stdout.take().expect("piped"),
                    lease_events.clone(),
                ));
            }
        }
    }
    // The SSH process first (its sessions end and their last ticks are stored), then the broker.
    ssh.stop().await;
    broker.stop().await;
    background.shutdown().await;
    if let Some(task) = settler_task {
        task.shutdown().await;
    }
    Ok(())
}

/// The supervisor's and the SSH process's own tasks (followers, feeders, the accept policy),
/// stopped together by one token.
#[derive(Default)]
struct Background {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    /// Runs `task` until it ends or [`Background::shutdown`].
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tracker
            .spawn(self.stop.clone().run_until_cancelled_owned(task));
    }

    /// Stops every task and waits until each has.
    async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Serves the settler's metrics (`shale_gateway_settler_*`, the names they had when the
/// settler shared the SSH process's `/metrics`) on their own address.
async fn serve_settler_metrics(
    settler: &Settler,
    addr: std::net::SocketAddr,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut registry = prometheus_client::registry::Registry::with_prefix("shale_gateway");
    settler.metrics().register(&mut registry);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the settler's metrics address {addr}"))?;
    tracing::info!(%addr, "serving the settler's /metrics");
    Ok(shale_gateway::metrics_http::serve_registry(
        listener,
        std::sync::Arc::new(registry),
    ))
}

/// Reads the SSH process's lease events, one JSON line each; anything else is logged and
/// skipped, never trusted.
async fn read_lease_events(
    stdout: tokio::process::ChildStdout,
    events: broadcast::Sender<LeaseEvent>,
) {
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut lines)
            .take(MAX_EVENT_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await;
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_EVENT_LINE => {
                tracing::warn!(
                    "the SSH process sent an over-long event line; it is ignored from now on"
                );
                return;
            }
            Ok(_) => match serde_json::from_slice::<LeaseEvent>(&line) {
                Ok(event) => drop(events.send(event)),
                Err(e) => {
                    tracing::warn!(error = %e, "an unreadable lease event from the SSH process")
                }
            },
        }
    }
}

/// The marketplace without a key, as the broker and the SSH process read it.
async fn read_market(config: &GatewayConfig) -> anyhow::Result<Marketplace> {
    Marketplace::connect(&config.chain.rpc_url, config.chain.marketplace, None)
        .await
        .with_context(|| {
            // The URL may carry the endpoint's API key: name its host only.
            format!(
                "connecting to the marketplace at {}",
                Marketplace::redact_url(&config.chain.rpc_url)
            )
        })
}

/// The marketplace with the provider's signing key.
async fn provider_market(sp: &SpConfig, config: &GatewayConfig) -> anyhow::Result<Marketplace> {
    let keystore = sp
        .sp
        .keystore
        .clone()
        .or_else(|| std::env::var_os("SHALE_KEYSTORE").map(Into::into));
    let key = crate::settings::load_signer(keystore.as_deref())
        .context("the settler and the accept policy sign with the provider's key")?;
    if key.address() != config.chain.provider {
        bail!(
            "the signing key is {:#x}, but the provider is {:#x}",
            key.address(),
            config.chain.provider
        );
    }
    Ok(Marketplace::connect_with_fees(
        &config.chain.rpc_url,
        config.chain.marketplace,
        Some(key),
        config.chain.fees,
    )
    .await?
    .with_poll_interval(config.chain.poll_interval))
}

/// Starts the settler on the supervisor's own pool of the ledger.
async fn start_settler(
    market: Marketplace,
    ledger: shale_meter::Ledger,
    settler_config: &SettlerConfig,
) -> anyhow::Result<(Settler, SettlerTask)> {
    let settler = Settler::new(settler_config, market, ledger)
        .await
        .context("starting the settler")?;
    eprintln!(
        "settler proving claims for batch capacities {:?}",
        settler.capacities()
    );
    let task = settler.spawn();
    Ok((settler, task))
}

/// The process's one follower of the marketplace's events: each consumer (the gateway's
/// watcher, the settler, the accept policy) reads them from its own receiver of `events`.
pub(crate) async fn follow_market(market: Marketplace, events: broadcast::Sender<MarketEvent>) {
    let mut stream = loop {
        match market.watch().await {
            Ok(stream) => break stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch marketplace events yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    // The stream polls forever; an outage shows up as an error item between good ones.
    while let Some(event) = stream.next().await {
        match event {
            // No receiver left is no error: the gateway is shutting down.
            Ok(event) => drop(events.send(event)),
            Err(e) => tracing::warn!(error = %e, "marketplace events unavailable"),
        }
    }
}

/// Tells the settler of every lease the gateway meters, and that a lease stopped when an order's
/// billing ends (its final tick is stored, so everything is claimed now).
async fn feed_leases(settler: Settler, mut leases: broadcast::Receiver<LeaseEvent>) {
    loop {
        match leases.recv().await {
            Ok(LeaseEvent::Started { order }) => settler.track(order),
            Ok(LeaseEvent::Ended { order }) => settler.lease_stopped(order),
            Err(RecvError::Lagged(missed)) => {
                // The orders stay tracked from the chain; a missed end is claimed on the
                // settler's own schedule (the order's end on chain, or `max_wait_secs`).
                tracing::warn!(missed, "the settler missed lease events");
                settler.wake();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Hands the settler the marketplace's events: it tracks this provider's accepted orders and
/// claims at once when one ends.
async fn feed_market(settler: Settler, mut events: broadcast::Receiver<MarketEvent>) {
    loop {
        match events.recv().await {
            Ok(event) => settler.on_market_event(&event),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "the settler missed marketplace events; scanning the chain"
                );
                if let Err(e) = settler.discover().await {
                    tracing::warn!(error = %e, "cannot scan the chain for unsettled orders");
                }
                settler.wake();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Applies the accept policy to every new order for this provider, one at a time (each decision
/// counts the capacity the previous ones took).
async fn accept_orders(
    market: Marketplace,
    sp: SpConfig,
    mut events: broadcast::Receiver<MarketEvent>,
) {
    let Some(provider) = market.sender() else {
        return;
    };
    loop {
        match events.recv().await {
            Ok(MarketEvent::OrderCreated {
                order_id,
                provider: p,
                ..
            }) if p == provider => {
                if let Err(e) = apply_policy(&market, &sp, order_id).await {
                    tracing::error!(order = order_id, error = %e, "the accept policy failed");
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(missed)) => tracing::error!(
                missed,
                "the accept policy missed marketplace events; accept any order left pending \
                 by hand with `shale sp accept`"
            ),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Accepts order `id` when it fits, or declines it (a refund to the client) with the reason.
async fn apply_policy(market: &Marketplace, sp: &SpConfig, id: u64) -> anyhow::Result<()> {
    let order = market.order(id).await?;
    if order.state != OrderState::Pending {
        return Ok(());
    }
    let me = market.provider(sp.gateway.chain.provider).await?;
    let now = market.chain_time().await?;
    let live: Vec<_> = crate::cmd::order::orders_of(market, me.address)
        .await?
        .into_iter()
        .filter(|o| o.provider == me.address && o.is_live_at(now))
        .collect();
    // The provisioner keeps the orders' disk images under its state directory.
    let disks = sp.gateway.containers.state_dir.join("disks");
    let host_disk = match crate::policy::host_disk(&disks) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(order = id, path = %disks.display(), error = %e, "cannot measure the host's free disk; checking the order's disk against the offer only");
            None
        }
    };
    let free = crate::policy::free_capacity(&me, &live, host_disk);
    let datasets = &sp.gateway.containers.datasets;
    let limits = sp.sp.accept.limits()?;
    let decision = match image_ready(sp, &order).await {
        Ok(()) => crate::policy::decide(&order, &me, free, &limits, |d| datasets.contains_key(d)),
        Err(reason) => Err(reason),
    };
    match decision {
        Ok(()) => {
            market.accept(id).await?;
            tracing::info!(order = id, "accepted by the auto-accept policy");
        }
        Err(reason) => {
            market.decline(id, &decline_text(&reason)).await?;
            tracing::warn!(order = id, %reason, "declined by the auto-accept policy; the client is refunded");
        }
    }
    Ok(())
}

/// Whether the image the order names is installed here, as the broker recorded it: an order is
/// accepted only when its container can start at once. Right after the gateway starts, the
/// broker may still be installing the catalog; that is waited for, within a bound.
async fn image_ready(sp: &SpConfig, order: &shale_contracts::Order) -> Result<(), String> {
    let Some(digest) = order.image_digest.as_ref() else {
        return Ok(());
    };
    let digest = shale_contracts::format_image_digest(digest);
    // The client's own image: pulled now, so its first login does not wait for it (the broker
    // checks the registry against its config again).
    if let Some(repository) = &order.image_repository {
        if let Some(reason) = sp.gateway.containers.refuse_client_image(repository) {
            return Err(format!("image {repository}@{digest} refused: {reason}"));
        }
        let broker = shale_broker::BrokerClient::connect(broker::socket_path(sp))
            .await
            .map_err(|e| format!("the broker cannot pull the image now: {e}"))?;
        return broker
            .pull_image(repository, &digest)
            .await
            .map_err(|e| format!("image {repository}@{digest} cannot be pulled: {e}"));
    }
    let path = InstalledCatalog::path(sp);
    let deadline = std::time::Instant::now() + CATALOG_WAIT;
    while !sp.gateway.images.is_empty() && !path.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    let installed = InstalledCatalog::read(&path).map_err(|e| format!("{e:#}"))?;
    installed.serves(&digest)
}

/// How often the broker's dataset record is looked at for checks the chain has not heard of.
const VERIFICATION_POLL: Duration = Duration::from_secs(60);

/// Records on chain when the broker last verified each dataset against its piece CID, after
/// each of its checks that found a match (clients see it in `shale datasets`). A failed send is
/// tried again at the next poll.
async fn publish_verifications(market: Marketplace, sp: SpConfig) {
    let mut published_up_to = None;
    loop {
        let newest = crate::cmd::piece::dataset_rows(&sp)
            .map(|rows| rows.iter().filter_map(|r| r.checked_at).max())
            .unwrap_or(None);
        if newest.is_some() && newest != published_up_to {
            match crate::cmd::sp::unpublished_verifications(&sp, &market).await {
                Ok(ids) if ids.is_empty() => published_up_to = newest,
                Ok(ids) => match market.mark_verified(&ids).await {
                    Ok(tx) => {
                        tracing::info!(datasets = ?ids, tx = %tx.tx_hash, "published dataset verifications");
                        published_up_to = newest;
                    }
                    Err(e) => {
                        tracing::warn!(datasets = ?ids, error = %e, "could not publish dataset verifications; trying again")
                    }
                },
                // A gateway started before `shale sp register` has nothing to publish yet.
                Err(e)
                    if matches!(
                        e.downcast_ref::<shale_contracts::ChainError>(),
                        Some(shale_contracts::ChainError::ProviderNotFound(_))
                    ) =>
                {
                    tracing::debug!("not registered yet: no dataset verification to publish")
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not read the datasets' verifications")
                }
            }
        }
        tokio::time::sleep(VERIFICATION_POLL).await;
    }
}

/// How long the accept policy waits for the broker's first installation of the catalog.
const CATALOG_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The policy's reason as it goes on chain: at most the contract's cap, cut at a character.
fn decline_text(reason: &str) -> String {
    let max = Marketplace::MAX_DECLINE_REASON;
    if reason.len() <= max {
        return reason.to_string();
    }
    let mut end = max - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_is_cut_to_the_contracts_cap_at_a_character() {
        assert_eq!(decline_text("it asks for 9 GPUs"), "it asks for 9 GPUs");
        let long = "é".repeat(150);
        let cut = decline_text(&long);
        assert!(
            cut.len() <= Marketplace::MAX_DECLINE_REASON,
            "{}",
            cut.len()
        );
        assert!(cut.ends_with('…'));
        assert!(cut.starts_with("éé"));
    }

    /// The policy against a real chain (anvil): an order that asks for more collateral than its
    /// escrow is declined on chain with the reason, the client reads that reason where
    /// `shale order create` waits, and an order that fits is accepted.
    #[tokio::test]
    async fn the_policy_declines_on_chain_and_the_client_is_told_why() {
        use shale_contracts::devnet::Devnet;
        use shale_contracts::{key_fingerprint, NewOrder, Offer, U256};

        let devnet = match Devnet::start().await {
            Ok(d) => d,
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true: anvil is required: {e}"
                );
                eprintln!("SKIPPED: {e} (scripts/setup.sh installs anvil)");
                return;
            }
        };
        let address = devnet
            .deploy_marketplace_with_test_verifier(&[16])
            .await
            .unwrap();
        let connect =
            |i: usize| Marketplace::connect(devnet.rpc_url(), address, Some(devnet.signer(i)));
        let sp_market = connect(1)
            .await
            .unwrap()
            .with_poll_interval(std::time::Duration::from_millis(50));
        let client = connect(2)
            .await
            .unwrap()
            .with_poll_interval(std::time::Duration::from_millis(50));
        let offer = Offer {
            cpus: 2,
            memory_mib: 1024,
            disk_mib: 1024,
            max_disk_mib: 8192,
            gpu_model: String::new(),
            gpu_count: 0,
            price_per_second: U256::from(1_000u32),
            price_per_gib: U256::from(1_000u32),
        };
        sp_market
            .register_provider("127.0.0.1:2222", "ssh-ed25519 AAAA", &offer, &[])
            .await
            .unwrap();
        let provider = sp_market
            .provider(sp_market.sender().unwrap())
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut text = crate::cmd::dev::gateway_toml(
            dir.path(),
            2222,
            9100,
            9101,
            devnet.rpc_url(),
            address,
            provider.address,
            &dir.path().join("containerd.sock"),
            "shale-test",
            &shale_provisioner::PieceSource {
                piece_cid: "baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy"
                    .parse()
                    .unwrap(),
                source: dir.path().join("digits.csv"),
                present: Default::default(),
            },
        );
        text.push_str("\n[sp.accept]\nauto = true\nmax_hours = 2\nmin_escrow_hours = 1\n");
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, text).unwrap();
        let sp = SpConfig::load(&path).unwrap();

        // An hour at 1,000 wei a second is 3.6e6 wei of escrow.
        let order = |collateral: u64| {
            let mut o = NewOrder::for_offer(
                &provider,
                key_fingerprint(b"client key"),
                U256::from(4_000_000u64),
                3600,
            );
            o.collateral = U256::from(collateral);
            o
        };
        let greedy = client.create_order(&order(4_000_001)).await.unwrap();
        apply_policy(&sp_market, &sp, greedy).await.unwrap();
        let why = client.decline_reason(greedy).await.unwrap();
        assert_eq!(
            why.as_deref(),
            Some(
                "it asks for 0.000000000004000001 FIL of collateral, more than its escrow of \
                 0.000000000004 FIL"
            )
        );
        let err = crate::cmd::order::wait_for_acceptance(
            &client,
            greedy,
            std::time::Duration::from_secs(5),
            false,
        )
        .await
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("declined order")
                && format!("{err:#}").contains(why.as_deref().unwrap()),
            "{err:#}"
        );

        let fitting = client.create_order(&order(400_000)).await.unwrap();
        apply_policy(&sp_market, &sp, fitting).await.unwrap();
        assert_eq!(
            client.order(fitting).await.unwrap().state,
            OrderState::Active
        );
    }
}
