//! The gateway as a whole: its shared state, the accept loop, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use alloy_primitives::Address;
use russh::keys::PrivateKey;
use russh::server::Config;
use shale_contracts::{MarketEvent, Marketplace};
use shale_provisioner::Provisioner;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinSet;
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
use crate::metrics::{
    KindLabel, Metrics, OrderDirectionLabel, OrderGpuLabel, OrderLabel, ReasonLabel,
};
use crate::orders::{DirectoryTimes, OrderDirectory};
use crate::policy::EnvPolicy;
use crate::preauth::{self, GraceStream, Overload, Startups};
use crate::ratelimit::FailureLimiter;
use crate::{metrics_http, watcher};
use shale_meter::probe::Reading;

/// What every connection of the gateway shares.
pub struct Shared {
    /// This SP's provider address.
    pub provider: Address,
    /// Cached order lookups.
    pub orders: OrderDirectory,
    /// Containers of orders.
    pub provisioner: Provisioner,
    /// Live sessions by order.
    pub board: LeaseBoard,
    /// Failed logins by address.
    pub limiter: FailureLimiter,
    /// Which environment variables clients may set.
    pub env_policy: Arc<EnvPolicy>,
    /// Session channels one connection may have open at once.
    pub max_channels: usize,
    /// Forwards open per order, against their cap.
    pub forwards: ForwardSlots,
    /// Whether channel bytes are counted (see `SessionConfig::count_bytes`).
    pub count_bytes: bool,
    /// Exported metrics.
    pub metrics: Metrics,
    /// Meters, ledger and the escrow policy.
    pub billing: Billing,
    /// The latest session-quality readings per order.
    pub quality: Arc<crate::quality::QualityBoard>,
    /// Bytes through each order's network interface.
    pub traffic: crate::traffic::TrafficBoard,
    /// Where the gateway publishes each lease it meters and each order whose billing ended
    /// (for the settler that `shale gateway` runs beside it).
    pub lease_events: LeaseEvents,
    /// What checks the clients' acknowledgments of usage (`shale-ack`).
    pub acks: crate::ack_channel::AckDesk,
}

impl Shared {
    pub(crate) fn metrics_auth_failure(&self, reason: &str) {
        self.metrics
            .auth_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn metrics_session_started(&self) {
        self.metrics.sessions_active.inc();
        self.metrics.sessions_total.inc();
    }

    pub(crate) fn metrics_session_ended(&self, bytes: shale_meter::ByteCount) {
        self.metrics.sessions_active.dec();
        Metrics::count(&self.metrics.sessions_ended, "closed");
        self.metrics
            .bytes
            .get_or_create(&KindLabel { kind: "in".into() })
            .inc_by(bytes.bytes_in);
        self.metrics
            .bytes
            .get_or_create(&KindLabel { kind: "out".into() })
            .inc_by(bytes.bytes_out);
    }

    /// Starts (or finds) `order`'s lease meter and publishes it as a [`LeaseEvent::Started`], so
    /// that whoever claims the lease's ticks can refresh its unpaid totals.
    pub async fn start_billing(
        &self,
        order: &shale_contracts::Order,
    ) -> Result<Arc<shale_meter::LeaseMeter>, shale_meter::MeterError> {
        let lease = self.billing.lease(order, crate::unix_now()).await?;
        self.lease_events.publish(LeaseEvent::Started {
            order: order.id,
            lease: lease.clone(),
        });
        Ok(lease)
    }

    /// Rebuilds the per-order series from the live leases (called at each scrape).
    pub async fn refresh_metrics(&self) {
        let m = &self.metrics;
        m.order_funds_wei.clear();
        m.order_runway_seconds.clear();
        m.order_bytes.clear();
        m.order_ticks.clear();
        m.order_tick_write_seconds.clear();
        m.order_tick_lag_seconds.clear();
        m.order_probe_millicpus.clear();
        m.order_probe_memory_bytes.clear();
        m.order_probe_gpu_memory_bytes.clear();
        for (id, readings) in self.quality.snapshot() {
            let label = OrderLabel {
                order: id.to_string(),
            };
            for reading in readings {
                match reading {
                    Reading::CpuCount {
                        online,
                        quota_millicpus,
                    } => {
                        let millis = quota_millicpus.unwrap_or(u64::from(online) * 1000);
                        m.order_probe_millicpus
                            .get_or_create(&label)
                            .set(i64::try_from(millis).unwrap_or(i64::MAX));
                    }
                    Reading::MemoryLimit {
                        limit_bytes,
                        total_bytes,
                    } => {
                        let bytes = limit_bytes.unwrap_or(total_bytes);
                        m.order_probe_memory_bytes
                            .get_or_create(&label)
                            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    }
                    Reading::Gpu {
                        index,
                        model,
                        memory_mib,
                    } => {
                        m.order_probe_gpu_memory_bytes
                            .get_or_create(&OrderGpuLabel {
                                order: id.to_string(),
                                gpu: index.to_string(),
                                model,
                            })
                            .set(i64::try_from(memory_mib << 20).unwrap_or(i64::MAX));
                    }
                    // Interface bytes are exported as counters by the traffic board.
                    Reading::RoundTrip { .. } | Reading::Network { .. } => {}
                }
            }
        }
        for id in self.billing.metered_orders() {
            let Some(lease) = self.billing.running(id) else {
                continue;
            };
            let totals = lease.totals();
            let label = OrderLabel {
                order: id.to_string(),
            };
            if let Ok(order) = self.orders.get(id).await {
                if let Some(runway) = self.billing.runway(&order) {
                    m.order_funds_wei
                        .get_or_create(&label)
                        .set(f64::from(runway.funds));
                    if let Some(secs) = runway.seconds {
                        m.order_runway_seconds
                            .get_or_create(&label)
                            .set(i64::try_from(secs).unwrap_or(i64::MAX));
                    }
                }
            }
            let bytes = lease.counter().bytes();
            for (direction, value) in [("in", bytes.bytes_in), ("out", bytes.bytes_out)] {
                m.order_bytes
                    .get_or_create(&OrderDirectionLabel {
                        order: id.to_string(),
                        direction: direction.into(),
                    })
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
            m.order_ticks
                .get_or_create(&label)
                .set(i64::try_from(totals.ticks_written).unwrap_or(i64::MAX));
            if let Some(us) = totals.last_write_micros {
                m.order_tick_write_seconds
                    .get_or_create(&label)
                    .set(us as f64 / 1e6);
            }
            if let Some(us) = totals.last_lag_micros {
                m.order_tick_lag_seconds
                    .get_or_create(&label)
                    .set(us as f64 / 1e6);
            }
        }
    }
}

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
        provisioner: Provisioner,
    ) -> Result<Self, GatewayError> {
        let scope = market.scope().await?;
        let acks = crate::ack_channel::AckDesk {
            chain_id: market.chain_id().await?,
            market: market.clone(),
        };
        if provisioner.config().scope != scope {
            return Err(GatewayError::ScopeMismatch {
                provisioner: provisioner.config().scope.clone(),
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
        let meter = shale_meter::Meter::new(ledger.clone(), &config.meter)?;
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
                .with_ack_policy(&config.acknowledgments),
            quality: Arc::default(),
            traffic,
            lease_events: LeaseEvents::default(),
            acks,
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

    /// Serves connections until `shutdown` resolves, then tells users, drains and returns.
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
        tracing::info!(addr = %listener.local_addr().map_err(GatewayError::Accept)?, "gateway listening");
        adopt_leases(&shared).await;
        let watcher = tokio::spawn(watcher::run(
            shared.clone(),
            config.chain.poll_interval,
            market_events,
        ));
        let metrics_server = metrics_listener.map(|listener| {
            tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics");
            tokio::spawn(metrics_http::serve(listener, shared.clone()))
        });
        let max_connections = config.sessions.max_connections;
        let slots = Arc::new(Semaphore::new(max_connections));
        let startups = Startups::new(
            config.sessions.max_startups,
            config.sessions.max_startups_per_source,
        );
        let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
        let grace_time = config.sessions.login_grace_time;
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
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
                    let shared = shared.clone();
                    let ssh = ssh.clone();
                    connections.spawn(async move {
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
                        // Counted from accept; nothing the client sends before logging in
                        // (keepalives, SSH_MSG_IGNORE, slow key exchange) extends it.
                        let grace = async {
                            tokio::select! {
                                _ = logged_in.cancelled() => std::future::pending::<()>().await,
                                _ = tokio::time::sleep(grace_time) => {}
                            }
                        };
                        tokio::select! {
                            _ = session => {}
                            _ = grace => {
                                Metrics::count_reason(&shared.metrics.preauth_refused, "login_grace_time");
                                tracing::info!(%peer, "login grace time ran out; closing");
                                if let Some(handle) = handle.get() {
                                    let text = format!("shale: no login within the login grace time ({}s)", grace_time.as_secs());
                                    let _ = tokio::time::timeout(
                                        Duration::from_millis(100),
                                        handle.disconnect(russh::Disconnect::ByApplication, text, "en".into()),
                                    )
                                    .await;
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                // Ends russh's session task too, whatever it waits for.
                                cut.cancel();
                            }
                        }
                        shared.metrics.connections_active.dec();
                    });
                }
            }
        }
        tracing::info!(
            connections = connections.len(),
            "shutting down: telling users and draining"
        );
        drop(listener);
        shared
            .board
            .close("the gateway is restarting; your container keeps running, reconnect in a moment")
            .await;
        let drained = tokio::time::timeout(config.sessions.drain, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = connections.len(),
                "drain timed out; closing the rest"
            );
            connections.shutdown().await;
        }
        watcher.abort();
        if let Some(server) = metrics_server {
            server.abort();
        }
        shared.billing.shutdown().await;
        Ok(())
    }
}

/// The version line the gateway sends (and the refusals before SSH begins).
const SERVER_ID: &str = concat!("SSH-2.0-Shale_", env!("CARGO_PKG_VERSION"));

/// Per-channel queue of client data between russh and the channel's reader (see `bind`).
const CHANNEL_BUFFER_MESSAGES: usize = 16;

/// Refused clients being told why at once; past this a refused socket is just closed, so a
/// flood of connections costs a descriptor for no longer than the accept.
const REFUSALS_IN_FLIGHT: usize = 64;

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
        tokio::spawn(async move {
            let _permit = permit;
            preauth::refuse_before_ssh(socket, SERVER_ID, &overload.to_string(), REFUSAL_LINGER)
                .await;
        });
    }
}

/// After a restart: keeps the containers of orders still leased on chain (and resumes billing
/// them, continuing their tick chains), and releases the rest. An order the chain cannot confirm
/// during an outage is kept, not released: losing a client's work is worse than a late cleanup.
async fn adopt_leases(shared: &Shared) {
    let found = match shared.provisioner.adopt(|_| true).await {
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
