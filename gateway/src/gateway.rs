//! The gateway as a whole: binding, the accept loop, and graceful shutdown. The state its parts
//! share is [`crate::shared`]; every task it spawns is tracked by [`crate::tasks`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::Config;
use shale_contracts::{MarketEvent, Marketplace};
use shale_provisioner::Machines;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::admission::{admit_order, Refusal};
use crate::billing::Billing;
use crate::config::GatewayConfig;
use crate::connection::{methods, Connection, PreAuth};
use crate::forward::ForwardSlots;
use crate::hostkey;
use crate::lease_events::{LeaseEvent, LeaseEvents};
use crate::leases::LeaseBoard;
use crate::login::OrderId;
use crate::metrics::Metrics;
use crate::orders::{DirectoryTimes, OrderDirectory};
use crate::policy::EnvPolicy;
use crate::preauth::{self, GraceStream, Overload, Startups};
use crate::ratelimit::FailureLimiter;
use crate::shared::Shared;
use crate::tasks::Tasks;
use crate::{metrics_http, watcher};

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The host key could not be loaded or made.
    #[error(transparent)]
    HostKey(#[from] hostkey::HostKeyError),
    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("accepting connections failed: {0}")]
    Accept(std::io::Error),
    /// The ledger cannot be opened or the meter configured.
    #[error("the ledger is not usable: {0}")]
    Ledger(#[from] shale_meter::MeterError),
    /// The metrics address is taken or not ours.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The provisioner keys containers by another chain or marketplace than the gateway serves:
    /// order ids would name another marketplace's containers and disks.
    #[error("the provisioner's scope is {provisioner:?} but the marketplace is {marketplace:?}; connect it with `scope = {marketplace:?}`")]
    ScopeMismatch {
        provisioner: String,
        marketplace: String,
    },
    /// The chain could not be asked which chain and marketplace it is.
    #[error("cannot identify the marketplace: {0}")]
    Chain(#[from] shale_contracts::ChainError),
}

/// A bound, not yet running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    ssh: Arc<Config>,
    host_key: PrivateKey,
    config: GatewayConfig,
    /// Marketplace events from the process's follower, when it has one (see
    /// [`Gateway::follow_market`]).
    market_events: Option<broadcast::Receiver<MarketEvent>>,
}

impl Gateway {
    /// Loads the host key and binds the listen address.
    pub async fn bind(
        config: GatewayConfig,
        market: Marketplace,
        provisioner: Arc<dyn Machines>,
    ) -> Result<Self, GatewayError> {
        let scope = market.scope().await?;
        let chain_id = market.chain_id().await?;
        let acks = crate::ack_channel::AckDesk {
            chain_id,
            market: market.clone(),
        };
        if provisioner.scope() != scope {
            return Err(GatewayError::ScopeMismatch {
                provisioner: provisioner.scope().to_string(),
                marketplace: scope,
            });
        }
        let host_key = hostkey::load_or_generate(&config.host_key)?;
        std::fs::create_dir_all(&config.state_dir).map_err(|e| {
            shale_meter::MeterError::InvalidConfig(format!(
                "cannot create the state directory {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let ledger = config.meter.open_ledger(&config.state_dir).await?;
        // Every order's tick chain is bound to this marketplace, as its proofs will be.
        let deployment = shale_meter::Deployment::new(chain_id, market.address().0 .0);
        let meter = shale_meter::Meter::new(ledger.clone(), deployment, &config.meter)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| GatewayError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| GatewayError::Metrics { addr, source })?,
            ),
            None => None,
        };
        match preauth::raise_nofile_limit() {
            Ok(limit) => tracing::info!(limit, "open-file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
        let ssh = Arc::new(Config {
            server_id: russh::SshId::Standard(SERVER_ID.into()),
            preferred: crate::algorithms::offered(),
            methods: methods(),
            // The order's key fingerprint is public on chain, so constant-time rejection hides
            // nothing; a short delay still slows guessing, and rate limiting does the rest.
            auth_rejection_time: Duration::from_millis(100),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key.clone()],
            inactivity_timeout: Some(config.sessions.idle_timeout),
            keepalive_interval: Some(config.sessions.keepalive),
            keepalive_max: 4,
            nodelay: true,
            window_size: 4 * 1024 * 1024,
            // Client data russh has taken from the socket but a channel's reader has not:
            // russh refills the window on receipt, so this queue (messages of up to 32 KiB from
            // OpenSSH, 256 KiB from a hostile client) is the bound, and when it is full russh
            // stops reading the connection, which stops the sender.
            channel_buffer_size: CHANNEL_BUFFER_MESSAGES,
            ..Default::default()
        });
        let metrics = Metrics::default();
        let tasks = Tasks::new();
        let traffic = crate::traffic::TrafficBoard::new(&metrics);
        let shared = Arc::new(Shared {
            provider: config.chain.provider,
            orders: OrderDirectory::new(
                market.with_poll_interval(config.chain.poll_interval),
                DirectoryTimes {
                    fresh_for: config.auth.order_cache,
                    missing_for: config.auth.missing_cache,
                    stale_max: config.auth.stale_order_max,
                    count_refresh: config.auth.order_count_refresh,
                },
                metrics.chain_lookups.clone(),
            ),
            provisioner,
            board: LeaseBoard::new(config.sessions.max_per_order),
            limiter: FailureLimiter::new(config.auth.max_failures, config.auth.failure_window),
            env_policy: Arc::new(EnvPolicy::new(&config.sessions.extra_env)),
            max_channels: config.sessions.max_channels,
            forwards: ForwardSlots::new(config.sessions.max_forwards_per_order),
            count_bytes: config.sessions.count_bytes,
            metrics,
            billing: Billing::new(meter, ledger, config.payment.warn_at.clone())
                .with_ack_policy(&config.acknowledgments)
                .with_tasks(tasks.clone()),
            quality: Arc::default(),
            traffic,
            lease_events: LeaseEvents::default(),
            acks,
            audit_commands: config.log.audit_commands,
            tasks,
        });
        Ok(Self {
            shared,
            listener,
            metrics_listener,
            ssh,
            host_key,
            config,
            market_events: None,
        })
    }

    /// Where clients connect (with the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Every lease the gateway meters and every order whose billing ends, from now on. Subscribe
    /// before [`Gateway::run`]: a restarted gateway publishes the leases it adopts at once.
    pub fn lease_events(&self) -> broadcast::Receiver<LeaseEvent> {
        self.shared.lease_events.subscribe()
    }

    /// The registry `/metrics` serves, for metrics of other parts of the process (such as the
    /// settler's) under the gateway's `shale_gateway` prefix. `None` once [`Gateway::shared`]
    /// has handed out the shared state: register before that.
    pub fn metrics_registry(&mut self) -> Option<&mut prometheus_client::registry::Registry> {
        Arc::get_mut(&mut self.shared).map(|shared| shared.metrics.registry_mut())
    }

    /// The gateway's ledger: one pool of connections that the rest of the process (the settler)
    /// shares rather than opening its own.
    pub fn ledger(&self) -> &shale_meter::Ledger {
        self.shared.billing.ledger()
    }

    /// Hands the watcher the marketplace's events from a follower the process already runs
    /// (`shale gateway` follows the chain once, for the watcher, the settler and the accept
    /// policy), instead of its following the chain itself. Call before [`Gateway::run`].
    pub fn follow_market(&mut self, events: broadcast::Receiver<MarketEvent>) {
        self.market_events = Some(events);
    }

    /// Where `/metrics` is served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The host key in OpenSSH format, as the SP registers it on chain.
    pub fn host_public_key(&self) -> String {
        hostkey::public_openssh(&self.host_key)
    }

    /// State shared by the gateway's parts (for metrics and tests).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The gateway's cancellation token and task tracker. Cancelling
    /// [`Tasks::stopping`] shuts the gateway down as `run`'s `shutdown` future does; once
    /// [`Gateway::run`] has returned, [`Tasks::finished`] says whether every task it spawned
    /// ended.
    pub fn tasks(&self) -> Tasks {
        self.shared.tasks.clone()
    }

    /// Serves connections until `shutdown` resolves (or [`Gateway::tasks`]' token is
    /// cancelled), then shuts down: stops accepting, tells users, drains, stores the final ticks
    /// and waits, within the drain time, for every task the gateway spawned.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), GatewayError> {
        let Gateway {
            shared,
            listener,
            metrics_listener,
            ssh,
            config,
            market_events,
            ..
        } = self;
        let tasks = shared.tasks.clone();
        tracing::info!(addr = %listener.local_addr().map_err(GatewayError::Accept)?, "gateway listening");
        close_interrupted_sessions(&shared).await;
        adopt_leases(&shared).await;
        tasks.spawn_until_stopped(watcher::run(
            shared.clone(),
            config.chain.poll_interval,
            Duration::from_secs(config.meter.tick_interval_secs),
            market_events,
        ));
        if let Some(listener) = metrics_listener {
            tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics");
            tasks.spawn_until_stopped(metrics_http::serve(listener, shared.clone()));
        }
        let max_connections = config.sessions.max_connections;
        let slots = Arc::new(Semaphore::new(max_connections));
        let startups = Startups::new(
            config.sessions.max_startups,
            config.sessions.max_startups_per_source,
        );
        let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
        let timers = ConnectionTimers {
            grace_time: config.sessions.login_grace_time,
            drain: config.sessions.drain,
        };
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                _ = tasks.stopping().cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admitted = match slots.clone().try_acquire_owned() {
                Ok(slot) => startups
                    .admit(peer.ip(), preauth::roll())
                    .map(|ticket| (slot, ticket)),
                Err(_) => Err(Overload::Capacity(max_connections)),
            };
            let (slot, ticket) = match admitted {
                Ok(admitted) => admitted,
                Err(overload) => {
                    refuse_early(&shared, &refusals, socket, peer, overload);
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            tasks.spawn(serve_connection(
                shared.clone(),
                ssh.clone(),
                socket,
                peer,
                ticket,
                slot,
                timers,
            ));
        }
        // No connection is accepted from here on; the port is free for a restarted gateway.
        drop(listener);
        tasks.stopping().cancel();
        tracing::info!(
            tasks = tasks.running(),
            "shutting down: telling users and draining"
        );
        shared
            .board
            .close("the gateway is restarting; your container keeps running, reconnect in a moment")
            .await;
        // Connections end within the drain time (each cuts itself when it runs out); the margin
        // lets them write their end records.
        if let Err(unfinished) = tasks.stop(config.sessions.drain + STOP_MARGIN).await {
            tracing::warn!(left = unfinished.left, "{unfinished}");
        }
        // Every session has ended, so nothing meters any more: the final ticks are stored.
        shared.billing.shutdown().await;
        Ok(())
    }
}

/// The timers of one connection.
#[derive(Clone, Copy)]
struct ConnectionTimers {
    /// From accept to login (sshd's `LoginGraceTime`).
    grace_time: Duration,
    /// From the shutdown signal to the connection's cut.
    drain: Duration,
}

/// How one connection's wait ended.
enum Wait {
    /// The session ended by itself.
    Ended,
    /// No login within the grace time.
    Grace,
    /// The gateway is shutting down.
    Stopping,
}

/// Serves one accepted connection until it ends, its login grace time runs out, or (after the
/// drain time) the gateway stops.
async fn serve_connection(
    shared: Arc<Shared>,
    ssh: Arc<Config>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    ticket: preauth::StartupTicket,
    slot: tokio::sync::OwnedSemaphorePermit,
    timers: ConnectionTimers,
) {
    let _slot = slot;
    shared.metrics.connections_active.inc();
    shared.metrics.unauthenticated.inc();
    let logged_in = CancellationToken::new();
    let cut = CancellationToken::new();
    let handle = Arc::new(OnceLock::new());
    let pre_auth = PreAuth {
        ticket: Some(ticket),
        logged_in: logged_in.clone(),
    };
    let conn = Connection::new(shared.clone(), Some(peer), handle.clone(), pre_auth);
    let stream = GraceStream::new(socket, cut.clone());
    let session = async {
        match russh::server::run_stream(ssh, stream, conn).await {
            Ok(session) => {
                let _ = handle.set(session.handle());
                if let Err(e) = session.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
            Err(e) => tracing::debug!(%peer, error = %e, "SSH handshake failed"),
        }
    };
    tokio::pin!(session);
    // Counted from accept; nothing the client sends before logging in (keepalives,
    // SSH_MSG_IGNORE, slow key exchange) extends it.
    let grace = async {
        tokio::select! {
            _ = logged_in.cancelled() => std::future::pending::<()>().await,
            _ = tokio::time::sleep(timers.grace_time) => {}
        }
    };
    let stopping = shared.tasks.stopping().clone();
    let wait = tokio::select! {
        _ = &mut session => Wait::Ended,
        _ = grace => Wait::Grace,
        _ = stopping.cancelled() => Wait::Stopping,
    };
    let farewell = match wait {
        Wait::Ended => None,
        Wait::Grace => {
            Metrics::count_reason(&shared.metrics.preauth_refused, "login_grace_time");
            tracing::info!(%peer, "login grace time ran out; closing");
            Some(format!(
                "shale: no login within the login grace time ({}s)",
                timers.grace_time.as_secs()
            ))
        }
        // A logged-in session is told and closed by the lease board; it gets the drain time to
        // go by itself. One still logging in has nothing to finish.
        Wait::Stopping if logged_in.is_cancelled() => {
            match tokio::time::timeout(timers.drain, &mut session).await {
                Ok(()) => None,
                Err(_) => {
                    tracing::info!(%peer, "the connection outlived the drain time; closing");
                    Some("shale: the gateway is restarting; reconnect in a moment".to_string())
                }
            }
        }
        Wait::Stopping => Some("shale: the gateway is restarting; reconnect in a moment".into()),
    };
    if let Some(text) = farewell {
        if let Some(handle) = handle.get() {
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                handle.disconnect(russh::Disconnect::ByApplication, text, "en".into()),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Ends russh's session task too, whatever it waits for: its socket fails from here on.
        cut.cancel();
        // Wait for it, so the connection's state (and its end record) is gone when this task is.
        if tokio::time::timeout(STOP_MARGIN, &mut session)
            .await
            .is_err()
        {
            tracing::warn!(%peer, "the SSH session did not end after its socket was cut");
        }
    }
    shared.metrics.connections_active.dec();
}

/// The version line the gateway sends (and the refusals before SSH begins).
const SERVER_ID: &str = concat!("SSH-2.0-Shale_", env!("CARGO_PKG_VERSION"));

/// Per-channel queue of client data between russh and the channel's reader (see `bind`).
const CHANNEL_BUFFER_MESSAGES: usize = 16;

/// Refused clients being told why at once; past this a refused socket is just closed, so a
/// flood of connections costs a descriptor for no longer than the accept.
const REFUSALS_IN_FLIGHT: usize = 64;

/// What shutdown waits beyond the drain time: for cut connections to end and write their
/// records.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// How long a refused client has to read its reason.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Turns a connection away before SSH begins and, while few are being turned away, tells it why.
fn refuse_early(
    shared: &Shared,
    refusals: &Arc<Semaphore>,
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    overload: Overload,
) {
    Metrics::count_reason(&shared.metrics.preauth_refused, overload.reason());
    tracing::info!(%peer, reason = overload.reason(), "refused before login: {overload}");
    if let Ok(permit) = refusals.clone().try_acquire_owned() {
        shared.tasks.spawn_until_stopped(async move {
            let _permit = permit;
            preauth::refuse_before_ssh(socket, SERVER_ID, &overload.to_string(), REFUSAL_LINGER)
                .await;
        });
    }
}

/// Before anyone is served: the sessions a previous gateway process left open (it was killed,
/// or crashed) are ended at their last checkpoint, with the bytes they had moved by then.
async fn close_interrupted_sessions(shared: &Shared) {
    match shared
        .billing
        .ledger()
        .close_interrupted_sessions(SESSION_LOST)
        .await
    {
        Ok(0) => {}
        Ok(closed) => tracing::warn!(
            closed,
            "ended the sessions a previous gateway process left open, at their last checkpoint"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot end the sessions a previous gateway process left open")
        }
    }
}

/// The outcome recorded for a session whose gateway process died under it.
pub const SESSION_LOST: &str = "gateway_lost";

/// After a restart: keeps the containers of orders still leased on chain (and resumes billing
/// them, continuing their tick chains), and releases the rest. An order the chain cannot confirm
/// during an outage is kept, not released: losing a client's work is worse than a late cleanup.
async fn adopt_leases(shared: &Shared) {
    let found = match shared.provisioner.adopt_all().await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "cannot adopt the containers of a previous run");
            return;
        }
    };
    for id in found.into_iter().map(OrderId) {
        let order = match shared.orders.get(id).await {
            Ok(order) => order,
            Err(Refusal::ChainUnavailable(_)) => continue,
            Err(refusal) => {
                tracing::info!(order = id.0, reason = %refusal, "releasing a container no order leases");
                let _ = shared.provisioner.release(id.0).await;
                continue;
            }
        };
        match admit_order(&order, shared.provider, crate::unix_now()) {
            Ok(()) => match shared.start_billing(&order).await {
                Ok(_) => tracing::info!(order = id.0, "adopted a leased container"),
                Err(e) => tracing::warn!(order = id.0, error = %e, "cannot resume billing"),
            },
            Err(refusal) => {
                tracing::info!(order = id.0, reason = %refusal, "releasing the container of an order that has ended");
                let _ = shared.provisioner.release(id.0).await;
            }
        }
    }
}
