//! The settler: turns the ledger's ticks into paid claims.
//!
//! It knows nothing of SSH, nor of the gateway's lease meters: `shale gateway` runs it on the
//! gateway's own ledger, tells it of every order the gateway meters ([`Settler::track`]) and of
//! every lease whose billing stopped ([`Settler::lease_stopped`]), and serves its
//! [`SettlerMetrics`] on the gateway's `/metrics`. Those are plain facts about order ids, so the
//! settler (which holds the wallet key) can run in another process than the gateway; the gateway
//! refreshes its meters' unpaid totals itself when it sees a claim land on chain.
//!
//! For every tracked order, each round (every `poll_interval_ms`, or when woken):
//!
//! 1. **Reconcile** the ledger with the chain. The contract stores the head it last paid for;
//!    the settler finds the stored tick with that head. A claim that was mined but never marked
//!    confirmed (a crash between sending and recording, a lost receipt) is confirmed from that,
//!    or recorded afresh if the ledger never saw it; claims left pending that the chain never
//!    paid are marked failed. Every batch is proved from the chain's head, so nothing is ever
//!    claimed twice: a stale proof cannot verify against a head that moved on.
//! 2. **Decide**: claim when a full batch (the largest capacity) is waiting, when the order has
//!    ended on chain or the gateway said its lease stopped, or when the oldest unclaimed tick is older than
//!    `max_wait_secs`.
//! 3. **Fit** the batch: at most the largest capacity, no more seconds than the lease has run
//!    on chain (`claimableSeconds`), totals that fit `u64`, and a charge (the contract's own
//!    arithmetic) no larger than the escrow left. A claim the escrow cannot pay would be
//!    refused, and since every later batch continues from it, it would block the order. The
//!    contract pays a batch's bytes only up to `max(acknowledged, allowance)` and forfeits the
//!    rest, so a tick whose bytes pass that waits for the client's next acknowledgment, for
//!    `ack_wait_secs` after the tick (and after the settler saw the order end); then it is
//!    claimed anyway, paid its seconds in full and the bytes that fit, and the forfeited bytes
//!    are logged and counted (`forfeited_bytes`).
//! 4. **Prove** on the bounded pool (the `prover` module) with the smallest capacity that holds the batch,
//!    **claim** with retries and exponential backoff on outages, and record it in the ledger:
//!    pending → submitted → confirmed (with its transaction hash) or failed.
//! 5. Once an ended order has nothing left to claim (and `settle_delay_secs` have passed),
//!    **settle** it.
//!
//! A contract refusal (invalid proof, escrow or lease-time exceeded) is not retried: it is
//! recorded as failed with the contract's reason, counted in [`SettlerMetrics::failures`] and
//! published as a [`SettlerEvent::Refused`].
//!
//! ```no_run
//! # async fn wire(market: shale_contracts::Marketplace, ledger: shale_meter::Ledger,
//! #               registry: &mut prometheus_client::registry::Registry)
//! # -> Result<(), shale_settler::SettlerError> {
//! use shale_settler::{Settler, SettlerConfig};
//! let config = SettlerConfig { key_seed: Some(1), ..SettlerConfig::default() };
//! let settler = Settler::new(&config, market, ledger).await?;
//! settler.metrics().register(registry);
//! let task = settler.spawn();
//! // When the gateway starts metering an order's lease:
//! settler.track(42);
//! // When its billing ends (its final tick is in the ledger), to claim everything at once:
//! settler.lease_stopped(42);
//! // For every marketplace event (tracks accepted orders, wakes on terminations):
//! # let event = shale_contracts::MarketEvent::OrderTerminated {
//! #     order_id: 42, by: shale_contracts::Address::ZERO, ended_at: 0 };
//! settler.on_market_event(&event);
//! // On shutdown:
//! task.shutdown().await;
//! # Ok(()) }
//! ```

mod config;
mod fit;
mod metrics;
mod prover;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shale_circuits::{Anchor, CircuitError, Deployment, Head, TickBatch};
use shale_contracts::{
    Address, Bytes, ChainError, ClaimReceipt, ClaimRequest, MarketEvent, Marketplace, Order,
    OrderState, B256, U256,
};
use shale_meter::ledger::{now_ms, ClaimRecord, ClaimStatus, NewClaim};
use shale_meter::{Ledger, MeterError, Tick};
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use config::SettlerConfig;
pub use metrics::{FailureLabel, OrderLabel, SettlerMetrics};
use prover::Prover;

/// The longest an order waits after failed rounds before it is tried again.
const ORDER_COOLDOWN_MAX: Duration = Duration::from_secs(600);

/// Why the settler could not start, or could not claim or settle an order.
#[derive(Debug, thiserror::Error)]
pub enum SettlerError {
    /// The `[sp.settler]` section is inconsistent.
    #[error("invalid settler configuration: {0}")]
    Config(String),
    /// No proving key matches a capacity the marketplace verifies.
    #[error("no proving key for any of the marketplace's batch capacities {capacities:?} (key dir: {key_dir:?}); fetch tick-N.pk from the marketplace deployer")]
    NoKeys {
        /// The capacities looked for.
        capacities: Vec<u32>,
        /// Where keys were looked for.
        key_dir: Option<PathBuf>,
    },
    /// A key file holds the key of another capacity than its name says.
    #[error("the proving key for capacity {wanted} is for capacity {found}")]
    KeyCapacity {
        /// The capacity asked for.
        wanted: u32,
        /// The key's capacity.
        found: usize,
    },
    /// The chain could not be read or a transaction not sent.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] MeterError),
    /// A batch could not be built or proved.
    #[error(transparent)]
    Circuit(#[from] CircuitError),
    /// The proving pool failed.
    #[error("proving worker: {0}")]
    Worker(String),
    /// The head the contract paid for is not in this ledger: another ledger's claims, or a
    /// ledger restored from an old backup. The order is left alone.
    #[error("order {order}: the chain's paid head {head} is not a tick head in the ledger")]
    ChainHeadUnknown {
        /// The order.
        order: u64,
        /// The head on chain.
        head: Head,
    },
    /// The contract refused the claim; it will not be retried.
    #[error("order {order}: claim {claim_id} refused: {reason}")]
    Refused {
        /// The order.
        order: u64,
        /// The ledger's claim id.
        claim_id: i64,
        /// The contract's reason, in words.
        reason: String,
    },
    /// Every attempt to send the claim hit an outage.
    #[error("order {order}: claim {claim_id} not sent after {attempts} attempts: {last}")]
    RetriesExhausted {
        /// The order.
        order: u64,
        /// The ledger's claim id.
        claim_id: i64,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
}

/// What the settler did, for logs, the CLI and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettlerEvent {
    /// A claim was paid.
    Claimed {
        /// The order.
        order: u64,
        /// The ledger's claim id.
        claim_id: i64,
        /// First and last tick of the batch.
        first_seq: u64,
        /// Last tick of the batch (inclusive).
        last_seq: u64,
        /// The capacity of the circuit that proved it.
        capacity: u32,
        /// Wei paid to the provider.
        amount: U256,
        /// Gas the claim used.
        gas_used: u64,
        /// What the transaction cost the provider, in wei.
        fee: U256,
        /// The transaction.
        tx_hash: B256,
        /// How long the proof took on the proving pool.
        proof_time: Duration,
    },
    /// A claim found paid on chain but not confirmed in the ledger, now confirmed.
    Recovered {
        /// The order.
        order: u64,
        /// The ledger's claim id (an existing record, or one made for it).
        claim_id: i64,
        /// The last tick the chain has paid for.
        last_seq: u64,
    },
    /// The contract refused a claim.
    Refused {
        /// The order.
        order: u64,
        /// The ledger's claim id.
        claim_id: i64,
        /// The contract's reason, in words.
        reason: String,
    },
    /// An ended order was settled.
    Settled {
        /// The order.
        order: u64,
        /// The transaction.
        tx_hash: B256,
        /// What the transaction cost the provider, in wei.
        fee: U256,
    },
}

/// The settler: shared state behind a cheap, cloneable handle.
#[derive(Clone, Debug)]
pub struct Settler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SettlerConfig,
    market: Marketplace,
    /// The marketplace's chain and address: the order keys every proof is bound to.
    deployment: Deployment,
    provider: Address,
    ledger: Ledger,
    prover: Prover,
    metrics: SettlerMetrics,
    /// Orders to look at, and what the gateway said of each one's lease.
    orders: Mutex<BTreeMap<u64, LeaseState>>,
    /// Orders whose last round failed: consecutive failures and when to try again. A refused
    /// claim would otherwise be proved again every poll, burning the pool for nothing.
    cooldown: Mutex<BTreeMap<u64, (u32, Instant)>>,
    /// When (wall clock, Unix ms) this settler first saw each order ended: ticks past the byte
    /// room wait `ack_wait_secs` from then for the tunnel's final acknowledgment. Wall clock, not
    /// the order's `endedAt`: chain time only moves with blocks (a quiet dev chain stands still),
    /// and after a restart the wait only starts again, which can delay a claim, never hasten it.
    ended_seen: Mutex<BTreeMap<u64, u64>>,
    /// One round at a time, whoever starts it: two rounds proving the same batch would send it
    /// twice (the second would be refused, but only after paying for a proof and gas).
    round: tokio::sync::Mutex<()>,
    wake: Notify,
    events: broadcast::Sender<SettlerEvent>,
}

/// What the settler knows of a tracked order's lease from the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum LeaseState {
    /// Running, or nothing said: claims wait for full batches, `max_wait_secs` or the order's end.
    #[default]
    Running,
    /// The gateway said the lease's billing stopped: its final tick is in the ledger, so
    /// everything is claimed now.
    Stopped,
}

/// The background task of [`Settler::spawn`].
#[derive(Debug)]
pub struct SettlerTask {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl SettlerTask {
    /// Stops the task after the round in progress (a claim in flight is finished and recorded).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.handle.await {
            tracing::error!(error = %e, "settler task failed");
        }
    }
}

/// What one round did for one order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderReport {
    /// Claims paid in this round.
    pub claimed: usize,
    /// Claims found paid on chain and confirmed from chain state.
    pub recovered: usize,
    /// Whether the order was settled in this round.
    pub settled: bool,
    /// Bytes of this round's claims that no acknowledgment or allowance covered once they had
    /// waited `ack_wait_secs`: proved and claimed, but not paid.
    pub forfeited_bytes: u128,
}

/// What the fit step decided for an order's next batch.
enum Fit {
    /// Claim the first `count` unclaimed ticks for `amount`; `forfeited` of their bytes are past
    /// what acknowledgments and the allowance cover, so the contract does not pay them.
    Claim {
        count: usize,
        amount: U256,
        forfeited: u128,
    },
    /// The next tick cannot be paid now, and waiting for the client will not change that
    /// (escrow or lease time used up).
    Blocked,
    /// The next tick's bytes pass what is payable and it has not waited `ack_wait_secs` for an
    /// acknowledgment yet.
    AwaitAck,
}

impl Settler {
    /// Checks the config, reads the marketplace's batch capacities, and loads (or derives) a
    /// proving key for each capacity that both the marketplace and the config allow. `market` must
    /// have the provider's signer.
    pub async fn new(
        config: &SettlerConfig,
        market: Marketplace,
        ledger: Ledger,
    ) -> Result<Settler, SettlerError> {
        config.validate()?;
        let provider = market.sender().ok_or(ChainError::ReadOnly)?;
        let deployment = Deployment::new(market.chain_id().await?, market.address().0 .0);
        let on_chain = market.batch_capacities().await?;
        let wanted: Vec<u32> = on_chain
            .iter()
            .copied()
            .filter(|c| config.capacities.is_empty() || config.capacities.contains(c))
            .collect();
        if wanted.is_empty() {
            return Err(SettlerError::NoKeys {
                capacities: config.capacities.clone(),
                key_dir: config.key_dir.clone(),
            });
        }
        let prover = Prover::load(config, &wanted).await?;
        let (events, _) = broadcast::channel(256);
        Ok(Settler {
            inner: Arc::new(Inner {
                config: config.clone(),
                market,
                deployment,
                provider,
                ledger,
                prover,
                metrics: SettlerMetrics::default(),
                orders: Mutex::new(BTreeMap::new()),
                cooldown: Mutex::new(BTreeMap::new()),
                ended_seen: Mutex::new(BTreeMap::new()),
                round: tokio::sync::Mutex::new(()),
                wake: Notify::new(),
                events,
            }),
        })
    }

    /// The metrics; register them with [`SettlerMetrics::register`].
    pub fn metrics(&self) -> &SettlerMetrics {
        &self.inner.metrics
    }

    /// The batch capacities this settler proves with, ascending.
    pub fn capacities(&self) -> Vec<u32> {
        self.inner.prover.capacities()
    }

    /// Events of every claim, recovery, refusal and settlement from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SettlerEvent> {
        self.inner.events.subscribe()
    }

    /// Looks after `order` from now on until it is settled: the gateway meters its lease. A
    /// lease said stopped before is running again (a top-up after the escrow ran out), so its
    /// ticks are claimed in batches again.
    pub fn track(&self, order: u64) {
        lock(&self.inner.orders).insert(order, LeaseState::Running);
    }

    /// Looks after `order` from now on, leaving what the gateway said of its lease as it is.
    fn watch_order(&self, order: u64) {
        lock(&self.inner.orders).entry(order).or_default();
    }

    /// The gateway stopped billing `order`'s lease (order ended or cancelled, escrow exhausted,
    /// network lost): tracks the order if it was not, marks its lease over so that its unclaimed
    /// ticks are claimed now rather than in full batches or after `max_wait_secs`, and starts a
    /// round.
    ///
    /// A hint from a less trusted process, and it can only make the settler claim sooner: what
    /// is claimed, how much, and whether the order is settled still follow the ledger's ticks
    /// and the chain's order (its escrow, lease time and state), as for any other order.
    pub fn lease_stopped(&self, order: u64) {
        lock(&self.inner.orders).insert(order, LeaseState::Stopped);
        self.wake();
    }

    /// The orders being looked after.
    pub fn tracked(&self) -> Vec<u64> {
        lock(&self.inner.orders).keys().copied().collect()
    }

    /// Starts a round now rather than at the next poll (e.g. when a lease ended).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Follows the marketplace: an order accepted by this provider is tracked from now on, and
    /// an order's termination starts a round at once (its last ticks can be claimed and, once
    /// claimed, the order settled). Every other event is none of the settler's business.
    pub fn on_market_event(&self, event: &MarketEvent) {
        match event {
            MarketEvent::OrderAccepted {
                order_id, provider, ..
            } if *provider == self.inner.provider => self.watch_order(*order_id),
            MarketEvent::OrderTerminated { .. } => self.wake(),
            _ => {}
        }
    }

    /// Tracks every unsettled order of this provider found on chain: how a restarted gateway
    /// resumes claiming orders that have no session yet. Returns how many it found.
    pub async fn discover(&self) -> Result<usize, SettlerError> {
        let count = self.inner.market.order_count().await?;
        let mut found = 0;
        // Ids start at 1. Orders are read one by one: a gateway restarts rarely, and the
        // marketplace has no per-provider index to read instead.
        for id in 1..=count {
            let order = match self.inner.market.order(id).await {
                Ok(order) => order,
                Err(ChainError::OrderNotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            if order.provider == self.inner.provider
                && !order.settled
                && matches!(order.state, OrderState::Active | OrderState::Ended)
            {
                self.watch_order(id);
                found += 1;
            }
        }
        tracing::info!(found, scanned = count, "unsettled orders found on chain");
        Ok(found)
    }

    /// Runs the settler in the background: discovery (if configured), then a round every
    /// `poll_interval_ms` or when woken, until [`SettlerTask::shutdown`].
    pub fn spawn(&self) -> SettlerTask {
        let (stop, mut stopped) = watch::channel(false);
        let settler = self.clone();
        let poll = Duration::from_millis(self.inner.config.poll_interval_ms);
        let handle = tokio::spawn(
            async move {
                if settler.inner.config.scan_chain_on_start {
                    if let Err(e) = settler.discover().await {
                        tracing::warn!(error = %e, "could not scan the chain for unsettled orders; only tracked orders are settled");
                    }
                }
                loop {
                    settler.round().await;
                    tokio::select! {
                        _ = stopped.changed() => break,
                        _ = settler.inner.wake.notified() => {}
                        _ = tokio::time::sleep(poll) => {}
                    }
                    if *stopped.borrow() {
                        break;
                    }
                }
                tracing::info!("settler stopped");
            }
            .instrument(tracing::info_span!("settler")),
        );
        SettlerTask { stop, handle }
    }

    /// One pass over every tracked order; returns what happened per order. An order whose round
    /// failed is logged and left alone for a while (`backoff_initial_ms`, doubling per
    /// consecutive failure, at most ten minutes); it has no entry in the result until then.
    pub async fn round(&self) -> BTreeMap<u64, Result<OrderReport, SettlerError>> {
        let _one_at_a_time = self.inner.round.lock().await;
        let mut reports = BTreeMap::new();
        for order in self.tracked() {
            let cooling = lock(&self.inner.cooldown).get(&order).copied();
            if cooling.is_some_and(|(_, until)| Instant::now() < until) {
                continue;
            }
            let result = self
                .settle_order(order)
                .instrument(tracing::info_span!("settle_order", order))
                .await;
            match &result {
                Ok(_) => {
                    lock(&self.inner.cooldown).remove(&order);
                }
                Err(e) => {
                    let failures = cooling.map_or(1, |(n, _)| n.saturating_add(1));
                    let wait = Duration::from_millis(
                        self.inner
                            .config
                            .backoff_initial_ms
                            .saturating_mul(1 << failures.saturating_sub(1).min(20)),
                    )
                    .min(ORDER_COOLDOWN_MAX);
                    tracing::warn!(order, error = %e, retry_in_ms = wait.as_millis() as u64, "order not settled this round");
                    lock(&self.inner.cooldown).insert(order, (failures, Instant::now() + wait));
                }
            }
            reports.insert(order, result);
        }
        reports
    }

    /// Everything one round does for one order.
    async fn settle_order(&self, id: u64) -> Result<OrderReport, SettlerError> {
        let inner = &self.inner;
        let mut report = OrderReport::default();
        let mut order = inner.market.order(id).await?;
        if order.provider != inner.provider {
            tracing::warn!("order belongs to another provider; not tracking it");
            inner.forget(id);
            return Ok(report);
        }
        match order.state {
            OrderState::Pending => return Ok(report),
            OrderState::Cancelled => {
                inner.forget(id);
                return Ok(report);
            }
            OrderState::Active | OrderState::Ended => {}
        }
        let (mut paid, recovered) = self.reconcile(&order).await?;
        report.recovered = recovered;
        if order.settled {
            tracing::info!("order settled; no longer tracked");
            inner.forget(id);
            return Ok(report);
        }
        let lease_over = lock(&inner.orders).get(&id) == Some(&LeaseState::Stopped);
        let max = inner.prover.max_capacity();
        // Set when the next unclaimed tick cannot be paid now (escrow or lease time used up).
        let mut blocked = false;
        loop {
            let ticks = inner
                .ledger
                .ticks_after(id, paid.as_ref().map(|t| t.seq), max as u32)
                .await?;
            let Some(oldest) = ticks.first() else {
                // Everything is claimed: nothing waits for an acknowledgment.
                inner
                    .metrics
                    .unacknowledged_bytes
                    .get_or_create(&OrderLabel { order: id })
                    .set(0);
                break;
            };
            let ended = order.state == OrderState::Ended || lease_over;
            let full = ticks.len() >= max;
            let waited = now_ms().saturating_sub(oldest.started_at_ms)
                >= inner.config.max_wait_secs.saturating_mul(1000);
            if !(full || ended || waited) {
                break;
            }
            let (count, amount, forfeited) = match self.fit(&order, &ticks, ended).await? {
                Fit::Claim {
                    count,
                    amount,
                    forfeited,
                } => (count, amount, forfeited),
                Fit::Blocked => {
                    blocked = true;
                    break;
                }
                // Not blocked for good: the order is not settled while an acknowledgment may
                // still come, and the tick is claimed once it has waited `ack_wait_secs`.
                Fit::AwaitAck => break,
            };
            let batch = &ticks[..count];
            let event = self.claim(&order, paid.as_ref(), batch, amount).await?;
            report.claimed += 1;
            if forfeited > 0 {
                tracing::warn!(
                    order = id,
                    forfeited_bytes = %forfeited,
                    ack_wait_secs = inner.config.ack_wait_secs,
                    "claimed bytes no acknowledgment covered after the wait: they are forfeited"
                );
                inner
                    .metrics
                    .forfeited_bytes
                    .inc_by(u64::try_from(forfeited).unwrap_or(u64::MAX));
                report.forfeited_bytes += forfeited;
            }
            paid = batch.last().cloned();
            // Published after the claim is confirmed in the ledger, so that whoever reacts to it
            // reads the ledger's new unclaimed totals.
            let _ = inner.events.send(event);
            // Escrow and claimed seconds changed; the next batch is fitted against the new ones.
            order = inner.market.order(id).await?;
        }
        if order.state == OrderState::Ended && inner.config.settle {
            let unclaimed = inner
                .ledger
                .ticks_after(id, paid.as_ref().map(|t| t.seq), 1)
                .await?;
            // Ticks left that no claim can ever pay (escrow or lease time used up) do not hold
            // the collateral hostage; ticks that could still be paid do.
            if unclaimed.is_empty() || blocked {
                report.settled = self.maybe_settle(&order).await?;
            }
        }
        Ok(report)
    }

    /// Brings the ledger in line with the chain; returns the last paid tick (`None` before the
    /// first claim) and how many claims were confirmed from chain state.
    async fn reconcile(&self, order: &Order) -> Result<(Option<Tick>, usize), SettlerError> {
        let inner = &self.inner;
        let id = order.id;
        let chain_head = Head(order.head);
        let claims = inner.ledger.claims(id).await?;
        let confirmed = inner.ledger.last_claimed_seq(id).await?;
        let paid = if chain_head.is_genesis() {
            None
        } else {
            Some(
                self.find_paid_tick(id, chain_head, confirmed, &claims)
                    .await?,
            )
        };
        let paid_seq = paid.as_ref().map(|t| t.seq);
        let mut recovered = 0;
        if paid_seq > confirmed {
            let last = paid_seq.expect("greater than something");
            let first = confirmed.map_or(0, |s| s + 1);
            // Prefer the record of the claim that was sent (it has the proof's range and maybe
            // the transaction hash); otherwise the chain paid a claim this ledger never saw.
            let existing = claims
                .iter()
                .rev()
                .find(|c| c.first_seq == first && c.last_seq == last);
            let claim_id = match existing {
                Some(c) => {
                    inner
                        .ledger
                        .set_claim_status(c.claim_id, ClaimStatus::Confirmed, None)
                        .await?;
                    c.claim_id
                }
                None => {
                    let already: U256 = claims
                        .iter()
                        .filter(|c| c.status == ClaimStatus::Confirmed)
                        .map(|c| c.amount)
                        .fold(U256::ZERO, |a, b| a + b);
                    // What the chain paid that the ledger's confirmed claims do not account for.
                    let amount = order.paid.saturating_sub(already);
                    inner
                        .ledger
                        .record_claim(&NewClaim {
                            order: id,
                            first_seq: first,
                            last_seq: last,
                            amount,
                            tx_hash: None,
                            status: ClaimStatus::Confirmed,
                        })
                        .await?
                        .claim_id
                }
            };
            tracing::warn!(
                claim_id,
                first,
                last,
                "claim was paid on chain but not confirmed in the ledger; confirmed from chain state"
            );
            inner.metrics.claims_paid.inc();
            let _ = inner.events.send(SettlerEvent::Recovered {
                order: id,
                claim_id,
                last_seq: last,
            });
            recovered += 1;
        }
        // Claims the ledger holds as confirmed beyond the chain's head were undone on chain
        // (a reorganisation, or a ledger from another chain): their ticks are unpaid again.
        for c in claims.iter().filter(|c| {
            c.status == ClaimStatus::Confirmed && paid_seq.is_none_or(|p| c.last_seq > p)
        }) {
            tracing::error!(
                claim_id = c.claim_id,
                last_seq = c.last_seq,
                "claim confirmed in the ledger is not paid on chain; its ticks will be claimed again"
            );
            inner.metrics.fail("unpaid_on_chain");
            inner
                .ledger
                .set_claim_status(c.claim_id, ClaimStatus::Failed, None)
                .await?;
        }
        // Claims left pending or submitted by a crash that the chain did not pay never will be:
        // the next proof starts from the chain's head.
        for c in claims.iter().filter(|c| {
            matches!(c.status, ClaimStatus::Pending | ClaimStatus::Submitted)
                && Some(c.last_seq) != paid_seq
        }) {
            tracing::info!(
                claim_id = c.claim_id,
                "claim left unsent or unpaid by an earlier run; marking it failed"
            );
            inner
                .ledger
                .set_claim_status(c.claim_id, ClaimStatus::Failed, None)
                .await?;
        }
        Ok((paid, recovered))
    }

    /// The stored tick whose head is `head`: the confirmed claims' last tick in the usual case,
    /// otherwise a recorded claim's, otherwise found by walking the unconfirmed ticks.
    async fn find_paid_tick(
        &self,
        id: u64,
        head: Head,
        confirmed: Option<u64>,
        claims: &[ClaimRecord],
    ) -> Result<Tick, SettlerError> {
        let ledger = &self.inner.ledger;
        let candidates = confirmed.into_iter().chain(
            claims
                .iter()
                .rev()
                .filter(|c| c.head == head)
                .map(|c| c.last_seq),
        );
        for seq in candidates {
            if let Some(tick) = ledger.tick(id, seq).await? {
                if tick.head == head {
                    return Ok(tick);
                }
            }
        }
        let mut after = confirmed;
        loop {
            let page = ledger.ticks_after(id, after, 1024).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            if let Some(tick) = page.into_iter().find(|t| t.head == head) {
                return Ok(tick);
            }
        }
        self.inner.metrics.fail("chain_head_unknown");
        Err(SettlerError::ChainHeadUnknown { order: id, head })
    }

    /// The longest prefix of `ticks` the contract would pay now, and its charge, or why there
    /// is none.
    async fn fit(&self, order: &Order, ticks: &[Tick], ended: bool) -> Result<Fit, SettlerError> {
        let inner = &self.inner;
        let market = &inner.market;
        let claimable = market.claimable_seconds(order.id).await?;
        // Bytes are paid only up to the client's acknowledgments (the newest rides along with
        // the claim) or the order's allowance, above the bytes already claimed.
        let acked = inner
            .ledger
            .latest_ack(order.id)
            .await?
            .map_or(0, |a| u128::from(a.bytes_in) + u128::from(a.bytes_out));
        let byte_room = acked
            .max(order.acked_bytes)
            .max(u128::from(order.byte_allowance))
            .saturating_sub(order.claimed_bytes);
        // Every unclaimed tick's bytes, not just this batch's.
        let after = ticks.first().and_then(|t| t.seq.checked_sub(1));
        let (unclaimed, _) = inner.ledger.usage_after(order.id, after).await?;
        let pending = u128::from(unclaimed.bytes_in) + u128::from(unclaimed.bytes_out);
        inner
            .metrics
            .unacknowledged_bytes
            .get_or_create(&OrderLabel { order: order.id })
            .set(i64::try_from(pending.saturating_sub(byte_room)).unwrap_or(i64::MAX));
        // Ticks past the room wait for an acknowledgment, for `ack_wait_secs` from their end and,
        // once the order ended, from when this settler first saw it ended.
        let now = now_ms();
        let ended_seen = ended.then(|| *lock(&inner.ended_seen).entry(order.id).or_insert(now));
        let wait_ms = inner.config.ack_wait_secs.saturating_mul(1000);
        let cut = fit::cut(ticks, claimable, byte_room, |t| {
            fit::waited_out(t, now, wait_ms, ended_seen)
        });
        let totals = cut.totals;
        // What the contract pays for the first `n` ticks: all their seconds, and their bytes up
        // to the room (the rest is forfeited).
        let quote = |n: usize| {
            let (s, i, o) = totals[n - 1];
            let bytes = u128::from(i) + u128::from(o);
            let paid = fit::payable_bytes(bytes, byte_room);
            let amount = fit::charge(order.price_per_second, order.price_per_gib, s, paid);
            (amount, bytes - paid)
        };
        let mut n = totals.len();
        if n == 0 {
            if cut.waits_for_ack {
                self.blocked(order, "awaiting_acknowledgment", claimable);
                return Ok(Fit::AwaitAck);
            }
            self.blocked(order, "lease_time", claimable);
            return Ok(Fit::Blocked);
        }
        let (mut amount, mut forfeited) = quote(n);
        if amount > order.escrow {
            // The charge grows with every tick: binary search the longest prefix that fits.
            let (mut lo, mut hi) = (0usize, n);
            let mut best = (U256::ZERO, 0);
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                let q = quote(mid);
                if q.0 <= order.escrow {
                    (lo, best) = (mid, q);
                } else {
                    hi = mid - 1;
                }
            }
            if lo == 0 {
                self.blocked(order, "escrow_exhausted", claimable);
                return Ok(Fit::Blocked);
            }
            (n, (amount, forfeited)) = (lo, best);
        }
        Ok(Fit::Claim {
            count: n,
            amount,
            forfeited,
        })
    }

    fn blocked(&self, order: &Order, reason: &str, claimable: u64) {
        tracing::warn!(
            reason,
            claimable_seconds = claimable,
            escrow = %order.escrow,
            "the next unclaimed tick cannot be paid now"
        );
        self.inner.metrics.fail(reason);
    }

    /// Records, proves and sends one claim of `batch`, which continues the chain after `paid`;
    /// returns the event to publish once the claim is paid.
    async fn claim(
        &self,
        order: &Order,
        paid: Option<&Tick>,
        batch: &[Tick],
        amount: U256,
    ) -> Result<SettlerEvent, SettlerError> {
        let inner = &self.inner;
        let id = order.id;
        let (first, last) = (batch[0].seq, batch[batch.len() - 1].seq);
        let capacity = inner
            .prover
            .capacity_for(batch.len())
            .expect("batches are cut to the largest capacity");
        let record = inner
            .ledger
            .record_claim(&NewClaim {
                order: id,
                first_seq: first,
                last_seq: last,
                amount,
                tx_hash: None,
                status: ClaimStatus::Pending,
            })
            .await?;
        let claim_id = record.claim_id;
        let span = tracing::info_span!("claim", claim_id, first, last, capacity);
        async {
            let prev = paid.map_or(Head::GENESIS, |t| t.head);
            let anchor = paid.map(|t| Anchor {
                before: t.prev_head,
                tick: t.fields(),
            });
            let fields = batch.iter().map(Tick::fields).collect();
            let key = inner.deployment.order_key(id);
            let proved = match TickBatch::new(key, prev, anchor, fields) {
                Ok(tick_batch) => {
                    let next = tick_batch.next();
                    let inputs = tick_batch.inputs();
                    inner
                        .prover
                        .prove(capacity, tick_batch)
                        .await
                        .map(|(proof, took)| (proof, took, next, inputs))
                }
                Err(e) => Err(e.into()),
            };
            let (proof, took, next, inputs) = match proved {
                Ok(done) => done,
                Err(e) => {
                    inner.metrics.fail("prove");
                    inner
                        .ledger
                        .set_claim_status(claim_id, ClaimStatus::Failed, None)
                        .await?;
                    return Err(e);
                }
            };
            inner.metrics.proof_seconds.observe(took.as_secs_f64());
            inner.metrics.batch_ticks.observe(batch.len() as f64);
            tracing::info!(ticks = batch.len(), proof_ms = took.as_millis() as u64, "batch proved");
            let narrow = |v: u128| u64::try_from(v).expect("fit() keeps totals within u64");
            let request = ClaimRequest {
                order_id: id,
                batch_capacity: capacity,
                next_head: next.0,
                seconds: narrow(inputs.seconds),
                bytes_in: narrow(inputs.bytes_in),
                bytes_out: narrow(inputs.bytes_out),
                proof: Bytes::from(proof.to_bytes().to_vec()),
                // The client's newest acknowledgment rides along: it is what lets bytes past
                // the order's allowance be paid.
                ack: inner.ledger.latest_ack(id).await?.and_then(|a| signed_ack(&a)),
            };
            inner
                .ledger
                .set_claim_status(claim_id, ClaimStatus::Submitted, None)
                .await?;
            let receipt = self.send(order, claim_id, prev, next, &request).await?;
            let tx_hash = receipt.map(|r| r.tx.tx_hash.to_string());
            inner
                .ledger
                .set_claim_status(claim_id, ClaimStatus::Confirmed, tx_hash.as_deref())
                .await?;
            inner.metrics.claims_paid.inc();
            Ok(match receipt {
                Some(r) => {
                    inner.metrics.claim_gas.observe(r.gas_used as f64);
                    tracing::info!(amount = %r.amount, gas = r.gas_used, tx = %r.tx.tx_hash, "claim paid");
                    SettlerEvent::Claimed {
                        order: id,
                        claim_id,
                        first_seq: first,
                        last_seq: last,
                        capacity,
                        amount: r.amount,
                        gas_used: r.gas_used,
                        fee: r.tx.fee,
                        tx_hash: r.tx.tx_hash,
                        proof_time: took,
                    }
                }
                None => SettlerEvent::Recovered {
                    order: id,
                    claim_id,
                    last_seq: last,
                },
            })
        }
        .instrument(span)
        .await
    }

    /// Sends the claim, retrying outages with backoff. Before every retry it reads the order:
    /// if the head already moved to `next`, an earlier attempt was mined (its receipt was lost)
    /// and the claim is paid (`Ok(None)`); if it moved elsewhere, the claim can never verify.
    async fn send(
        &self,
        order: &Order,
        claim_id: i64,
        prev: Head,
        next: Head,
        request: &ClaimRequest,
    ) -> Result<Option<ClaimReceipt>, SettlerError> {
        let inner = &self.inner;
        let id = order.id;
        let max = inner.config.max_attempts;
        let mut last_error = String::new();
        for attempt in 1..=max {
            if attempt > 1 {
                tokio::time::sleep(inner.config.backoff(attempt - 1)).await;
                match inner.market.order(id).await {
                    Ok(now) if Head(now.head) == next => return Ok(None),
                    Ok(now) if Head(now.head) != prev => {
                        return self
                            .refused(
                                id,
                                claim_id,
                                "chain_moved",
                                "the order's paid head moved on while the claim was retried".into(),
                            )
                            .await
                    }
                    Ok(_) => {}
                    Err(e) => {
                        last_error = e.to_string();
                        tracing::warn!(attempt, error = %e, "chain unreachable; claim not sent yet");
                        continue;
                    }
                }
            }
            match inner.market.claim(request).await {
                Ok(receipt) => return Ok(Some(receipt)),
                Err(e @ ChainError::Reverted { .. }) => {
                    // A refusal of a claim whose head was just paid is our own earlier attempt.
                    if let Ok(now) = inner.market.order(id).await {
                        if Head(now.head) == next {
                            return Ok(None);
                        }
                    }
                    let label = e
                        .contract_error()
                        .map(|c| {
                            let debug = format!("{c:?}");
                            debug.split('(').next().unwrap_or("reverted").to_owned()
                        })
                        .unwrap_or_else(|| "reverted".to_owned());
                    let reason = match &e {
                        ChainError::Reverted { reason, .. } => reason.clone(),
                        other => other.to_string(),
                    };
                    return self.refused(id, claim_id, &label, reason).await;
                }
                Err(e) => {
                    tracing::warn!(attempt, of = max, error = %e, "claim not sent; retrying");
                    inner
                        .metrics
                        .fail(if e.is_outage() { "outage" } else { "send" });
                    last_error = e.to_string();
                }
            }
        }
        // The last attempt may still have been mined.
        if let Ok(now) = inner.market.order(id).await {
            if Head(now.head) == next {
                return Ok(None);
            }
        }
        inner.metrics.fail("retries_exhausted");
        inner
            .ledger
            .set_claim_status(claim_id, ClaimStatus::Failed, None)
            .await?;
        Err(SettlerError::RetriesExhausted {
            order: id,
            claim_id,
            attempts: max,
            last: last_error,
        })
    }

    async fn refused<T>(
        &self,
        order: u64,
        claim_id: i64,
        label: &str,
        reason: String,
    ) -> Result<T, SettlerError> {
        let inner = &self.inner;
        tracing::error!(reason = %reason, label, "claim refused by the contract");
        inner.metrics.fail(label);
        inner
            .ledger
            .set_claim_status(claim_id, ClaimStatus::Failed, None)
            .await?;
        let _ = inner.events.send(SettlerEvent::Refused {
            order,
            claim_id,
            reason: reason.clone(),
        });
        Err(SettlerError::Refused {
            order,
            claim_id,
            reason,
        })
    }

    /// Settles an ended order once `settle_delay_secs` have passed since its end.
    async fn maybe_settle(&self, order: &Order) -> Result<bool, SettlerError> {
        let inner = &self.inner;
        let ended_at = order.ended_at.or(order.expires_at()).unwrap_or(0);
        let now = inner.market.chain_time().await?;
        if now < ended_at.saturating_add(inner.config.settle_delay_secs) {
            return Ok(false);
        }
        match inner.market.settle(order.id).await {
            Ok(tx) => {
                tracing::info!(tx = %tx.tx_hash, "order settled");
                inner.forget(order.id);
                let _ = inner.events.send(SettlerEvent::Settled {
                    order: order.id,
                    tx_hash: tx.tx_hash,
                    fee: tx.fee,
                });
                Ok(true)
            }
            Err(e) => {
                inner.metrics.fail("settle");
                Err(e.into())
            }
        }
    }
}

impl Inner {
    /// Stops tracking `order` (settled, cancelled or another provider's).
    fn forget(&self, order: u64) {
        lock(&self.orders).remove(&order);
        lock(&self.ended_seen).remove(&order);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this map cannot leave it inconsistent (single inserts/removes).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stored acknowledgment in the form the contract takes; `None` if its signature is not hex.
fn signed_ack(a: &shale_meter::ledger::AckRecord) -> Option<shale_contracts::SignedAck> {
    a.signature.strip_prefix("0x")?;
    let signature: Bytes = a.signature.parse().ok()?;
    Some(shale_contracts::SignedAck {
        ack: shale_contracts::ack::Acknowledgment::new(
            a.order,
            a.head.0.into(),
            a.seconds,
            a.bytes_in,
            a.bytes_out,
        ),
        signature,
    })
}
