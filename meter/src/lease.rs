//! [`Meter`] and [`LeaseMeter`]: per order, a task that closes a tick every interval.
//!
//! Billing follows the lease: every leased second counts, connected or not, plus the bytes the
//! order's channels move. Each interval the order's task measures the lease time elapsed on a
//! monotonic clock and the bytes counted since the last tick, builds the next [`Tick`], writes
//! it to the [`Ledger`], and only when the write has committed advances the chain and the
//! totals. A failed write leaves everything as it was: the next tick reuses the seq and covers
//! the longer span.
//!
//! Seconds are whole: a tick claims `floor(elapsed since lease start) - seconds already
//! billed`, so the sum of claimed seconds never exceeds the elapsed time and the fraction is
//! carried to the next tick rather than lost. A lease resumed after a gateway restart continues
//! the stored chain (seq and head) but starts its clock at the resume: the downtime and the
//! interval in flight at the crash are not billed, in the client's favour.

use crate::counter::{ByteCount, OrderCounter, SessionCounter};
use crate::ledger::{now_ms, Ledger};
use crate::tariff::{Tariff, Usage};
use crate::tick::{ChainHead, Deployment, Tick, TickChain};
use crate::MeterError;
use alloy_primitives::U256;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// The meter's configuration, one section of the gateway's config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeterConfig {
    /// Seconds between ticks (at least 1). Shorter ticks bound the loss after a crash more
    /// tightly; each tick costs one ledger write and a share of a claim's proof. Default 5.
    pub tick_interval_secs: u64,
    /// Where the ledger lives: `sqlite://PATH` or `postgres://USER@HOST:PORT/DB` (several
    /// gateways sharing one ledger). Default: `ledger.db` in the gateway's state directory.
    pub ledger_url: Option<String>,
}

impl Default for MeterConfig {
    fn default() -> Self {
        MeterConfig {
            tick_interval_secs: 5,
            ledger_url: None,
        }
    }
}

impl MeterConfig {
    /// The tick interval, checked.
    pub fn tick_interval(&self) -> Result<Duration, MeterError> {
        if self.tick_interval_secs == 0 {
            return Err(MeterError::InvalidConfig(
                "tick_interval_secs must be at least 1".into(),
            ));
        }
        Ok(Duration::from_secs(self.tick_interval_secs))
    }

    /// Opens the configured ledger, or `ledger.db` under `state_dir` when none is configured.
    pub async fn open_ledger(&self, state_dir: &std::path::Path) -> Result<Ledger, MeterError> {
        match &self.ledger_url {
            Some(url) => Ledger::open(url).await,
            None => Ledger::open_sqlite(&state_dir.join("ledger.db")).await,
        }
    }
}

/// What the meter needs to know about a lease to meter it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSpec {
    /// The order.
    pub order: u64,
    /// Its prices.
    pub tariff: Tariff,
    /// Lease seconds left when metering starts (lease end minus now); the meter never bills
    /// beyond it and stops by itself, with a final tick, when it is reached. `None`: no cap.
    pub max_seconds: Option<u64>,
}

/// An order's running totals, for the gateway's payment policy and metrics.
///
/// Charges are [`Tariff::charge`] of the totals, i.e. exactly what a single claim of those
/// ticks is paid (see [`crate::tariff`] on per-tick versus per-batch rounding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterTotals {
    /// The order.
    pub order: u64,
    /// The last stored tick's seq and head.
    pub last: Option<ChainHead>,
    /// Ticks this meter wrote since it started (not counting earlier runs).
    pub ticks_written: u64,
    /// Usage of every stored tick of the order, earlier runs included.
    pub metered: Usage,
    /// Charge of `metered`, in wei.
    #[serde(with = "crate::wei")]
    pub metered_charge: U256,
    /// Usage of stored ticks not yet covered by a confirmed claim.
    pub unclaimed: Usage,
    /// Charge of `unclaimed`, in wei: what the escrow still owes the SP for stored ticks.
    #[serde(with = "crate::wei")]
    pub unclaimed_charge: U256,
    /// Usage since the last tick, not yet stored (at the time these totals were taken).
    pub pending: Usage,
    /// Charge of `pending`, in wei.
    #[serde(with = "crate::wei")]
    pub pending_charge: U256,
    /// Bytes per second (both directions) over the last stored tick: the traffic rate to
    /// project the escrow's burn with ([`Tariff::seconds_covered`]).
    pub recent_bytes_per_second: u64,
    /// How long the last tick's ledger write took, in microseconds (for a latency metric).
    pub last_write_micros: Option<u64>,
    /// How late the last periodic tick was stored after its scheduled time, in microseconds
    /// (scheduling delay plus the write; for a tick-lag metric).
    pub last_lag_micros: Option<u64>,
    /// Whether the meter has stopped (lease ended, cap reached, or a chain conflict).
    pub stopped: bool,
    /// The last error the meter hit, if it has not recovered since.
    pub last_error: Option<String>,
}

impl MeterTotals {
    /// Wei the order owes the SP and has not paid: stored unclaimed ticks plus usage since the
    /// last tick. Escrow left on chain minus this is what still funds the lease.
    pub fn owed(&self) -> U256 {
        self.unclaimed_charge + self.pending_charge
    }
}

/// The meters of all active leases in this gateway.
#[derive(Debug)]
pub struct Meter {
    ledger: Ledger,
    /// The marketplace whose orders this meter bills: every chain is hashed under its order keys.
    deployment: Deployment,
    interval: Duration,
    leases: Mutex<HashMap<u64, Arc<LeaseMeter>>>,
    /// Serializes starts so two connections cannot start the same order twice.
    starting: tokio::sync::Mutex<()>,
}

impl Meter {
    /// A meter writing to `ledger` the ticks of the orders of `deployment`.
    pub fn new(
        ledger: Ledger,
        deployment: Deployment,
        config: &MeterConfig,
    ) -> Result<Meter, MeterError> {
        Ok(Meter {
            ledger,
            deployment,
            interval: config.tick_interval()?,
            leases: Mutex::new(HashMap::new()),
            starting: tokio::sync::Mutex::new(()),
        })
    }

    /// The ledger the meter writes to.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Starts metering a lease, continuing its stored chain. Fails with
    /// [`MeterError::LeaseActive`] if the order is already metered here.
    pub async fn start_lease(&self, spec: LeaseSpec) -> Result<Arc<LeaseMeter>, MeterError> {
        let _serial = self.starting.lock().await;
        let order = spec.order;
        if let Some(existing) = lock(&self.leases).get(&order) {
            if !existing.is_stopped() {
                return Err(MeterError::LeaseActive { order });
            }
        }
        let lease = Arc::new(
            LeaseMeter::start(self.ledger.clone(), self.deployment, spec, self.interval).await?,
        );
        lock(&self.leases).insert(order, Arc::clone(&lease));
        Ok(lease)
    }

    /// The meter of `order`, if it is being metered.
    pub fn lease(&self, order: u64) -> Option<Arc<LeaseMeter>> {
        lock(&self.leases).get(&order).cloned()
    }

    /// All lease meters, running or stopped but not yet ended.
    pub fn leases(&self) -> Vec<Arc<LeaseMeter>> {
        lock(&self.leases).values().cloned().collect()
    }

    /// Ends metering of `order` with a final partial tick and forgets it. Returns that tick
    /// (`None` if nothing was left to bill or the order was not metered).
    pub async fn end_lease(&self, order: u64) -> Result<Option<Tick>, MeterError> {
        let lease = lock(&self.leases).remove(&order);
        match lease {
            Some(lease) => lease.stop().await,
            None => Ok(None),
        }
    }

    /// Ends every lease (gateway shutdown), writing their final ticks. Returns the first
    /// error after trying them all.
    pub async fn shutdown(&self) -> Result<(), MeterError> {
        let leases: Vec<_> = lock(&self.leases).drain().map(|(_, l)| l).collect();
        let mut first_err = None;
        for lease in leases {
            if let Err(e) = lease.stop().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

enum Command {
    Stop(oneshot::Sender<Result<Option<Tick>, MeterError>>),
    Refresh(oneshot::Sender<Result<(), MeterError>>),
}

/// The meter of one lease: its counters, its totals, and the task that ticks.
///
/// Dropping the last handle stops the task after a final tick, as [`LeaseMeter::stop`] does.
#[derive(Debug)]
pub struct LeaseMeter {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    order: u64,
    deployment: Deployment,
    tariff: Tariff,
    ledger: Ledger,
    counter: Arc<OrderCounter>,
    started: Instant,
    max_seconds: Option<u64>,
    state: Mutex<State>,
    totals: watch::Sender<MeterTotals>,
}

#[derive(Debug)]
struct State {
    chain: TickChain,
    billed_seconds: u64,
    billed_bytes: ByteCount,
    interval_started_ms: u64,
    metered: Usage,
    unclaimed: Usage,
    ticks_written: u64,
    recent_bytes_per_second: u64,
    last_write: Option<Duration>,
    last_lag: Option<Duration>,
    stopped: bool,
    last_error: Option<String>,
    /// A tick whose write returned an error: it may or may not have committed.
    in_doubt: Option<Tick>,
    /// The byte and second readings the in-doubt tick billed up to.
    in_doubt_marks: Option<(ByteCount, u64)>,
}

impl LeaseMeter {
    /// Starts metering `spec.order` of `deployment` from now, continuing its chain from the
    /// ledger.
    pub async fn start(
        ledger: Ledger,
        deployment: Deployment,
        spec: LeaseSpec,
        interval: Duration,
    ) -> Result<LeaseMeter, MeterError> {
        let shared = Arc::new(Shared::load(ledger, deployment, spec).await?);
        let (commands, rx) = mpsc::channel(4);
        let span = tracing::info_span!("lease_meter", order = shared.order);
        let task = tokio::spawn(run(Arc::clone(&shared), rx, interval).instrument(span));
        tracing::info!(
            order = shared.order,
            next_seq = lock(&shared.state).chain.next_seq(),
            "metering lease"
        );
        Ok(LeaseMeter {
            shared,
            commands,
            task: Mutex::new(Some(task)),
        })
    }

    /// The order.
    pub fn order(&self) -> u64 {
        self.shared.order
    }

    /// The order's tariff.
    pub fn tariff(&self) -> &Tariff {
        &self.shared.tariff
    }

    /// The order's byte counters.
    pub fn counter(&self) -> &Arc<OrderCounter> {
        &self.shared.counter
    }

    /// Counters for a new SSH session of this order (open channels on it).
    pub fn open_session(&self) -> Arc<SessionCounter> {
        self.shared.counter.open_session()
    }

    /// The totals now, including usage since the last tick.
    pub fn totals(&self) -> MeterTotals {
        self.shared.totals_now(Instant::now())
    }

    /// A receiver that sees new totals after every tick and when the meter stops.
    pub fn subscribe(&self) -> watch::Receiver<MeterTotals> {
        self.shared.totals.subscribe()
    }

    /// Whether the meter has stopped.
    pub fn is_stopped(&self) -> bool {
        lock(&self.shared.state).stopped
    }

    /// Re-reads the unclaimed totals from the ledger, after a claim was confirmed or failed.
    pub async fn refresh_claims(&self) -> Result<(), MeterError> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Refresh(reply)).await.is_err() {
            return Err(MeterError::LeaseStopped {
                order: self.shared.order,
            });
        }
        answer.await.map_err(|_| MeterError::LeaseStopped {
            order: self.shared.order,
        })?
    }

    /// Stops metering with a final partial tick (skipped if it would be empty) and returns it.
    /// Calling it again, or after the meter stopped by itself, returns `Ok(None)`.
    pub async fn stop(&self) -> Result<Option<Tick>, MeterError> {
        let (reply, answer) = oneshot::channel();
        let result = if self.commands.send(Command::Stop(reply)).await.is_ok() {
            answer.await.unwrap_or(Ok(None))
        } else {
            Ok(None)
        };
        let task = lock(&self.task).take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(order = self.shared.order, error = %e, "lease meter task failed");
            }
        }
        result
    }
}

/// The task: a tick per interval until stopped, the cap is reached, or all handles are gone.
async fn run(shared: Arc<Shared>, mut commands: mpsc::Receiver<Command>, interval: Duration) {
    let start = tokio::time::Instant::from_std(shared.started);
    let mut ticker = tokio::time::interval_at(start + interval, interval);
    // After a stall (e.g. a slow ledger), tick once and keep the cadence from then on rather
    // than firing a burst of near-empty ticks.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            scheduled = ticker.tick() => {
                let now = Instant::now();
                match shared.close_tick(now, false).await {
                    Ok(Some(_)) => shared.record_lag(scheduled.into_std().elapsed()),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "tick not written; its usage rolls into the next");
                    }
                }
                if shared.is_stopped() {
                    break;
                }
                if shared.cap_reached(now) {
                    tracing::info!("lease time used up; final tick");
                    if let Err(e) = shared.finish(now).await {
                        tracing::warn!(error = %e, "final tick at the lease cap not written");
                    }
                    break;
                }
            }
            command = commands.recv() => match command {
                Some(Command::Stop(reply)) => {
                    let _ = reply.send(shared.finish(Instant::now()).await);
                    break;
                }
                Some(Command::Refresh(reply)) => {
                    let _ = reply.send(shared.refresh_claims().await);
                }
                None => {
                    // Every handle was dropped without stop(): still bill what was used.
                    if let Err(e) = shared.finish(Instant::now()).await {
                        tracing::warn!(error = %e, "final tick of a dropped lease meter not written");
                    }
                    break;
                }
            }
        }
    }
    shared.mark_stopped(None);
}

impl Shared {
    async fn load(
        ledger: Ledger,
        deployment: Deployment,
        spec: LeaseSpec,
    ) -> Result<Shared, MeterError> {
        let order = spec.order;
        let last = ledger.chain_head(order).await?;
        let (metered, _) = ledger.usage_after(order, None).await?;
        let unclaimed = ledger.unclaimed_usage(order).await?;
        let chain = TickChain::resume(deployment.order_key(order), spec.tariff, last);
        let state = State {
            chain,
            billed_seconds: 0,
            billed_bytes: ByteCount::default(),
            interval_started_ms: now_ms(),
            metered,
            unclaimed,
            ticks_written: 0,
            recent_bytes_per_second: 0,
            last_write: None,
            last_lag: None,
            stopped: false,
            last_error: None,
            in_doubt: None,
            in_doubt_marks: None,
        };
        let started = Instant::now();
        let totals = watch::Sender::new(totals_of(order, &spec.tariff, &state, Usage::default()));
        Ok(Shared {
            order,
            deployment,
            tariff: spec.tariff,
            ledger,
            counter: Arc::new(OrderCounter::default()),
            started,
            max_seconds: spec.max_seconds,
            state: Mutex::new(state),
            totals,
        })
    }

    /// Lease seconds billable at `now`: whole seconds since start, capped by the lease.
    fn billable_seconds(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.started).as_secs();
        self.max_seconds.map_or(elapsed, |cap| elapsed.min(cap))
    }

    fn cap_reached(&self, now: Instant) -> bool {
        self.max_seconds
            .is_some_and(|cap| self.billable_seconds(now) >= cap)
    }

    fn is_stopped(&self) -> bool {
        lock(&self.state).stopped
    }

    /// Usage since the last stored tick, and the byte counter reading it is based on.
    fn pending(&self, state: &State, now: Instant) -> (Usage, ByteCount, u64) {
        let seconds_now = self.billable_seconds(now);
        let bytes_now = self.counter.bytes();
        let bytes = bytes_now.saturating_sub(state.billed_bytes);
        let usage = Usage {
            seconds: seconds_now.saturating_sub(state.billed_seconds),
            bytes_in: bytes.bytes_in,
            bytes_out: bytes.bytes_out,
        };
        (usage, bytes_now, seconds_now)
    }

    fn totals_now(&self, now: Instant) -> MeterTotals {
        let state = lock(&self.state);
        let pending = if state.stopped {
            Usage::default()
        } else {
            self.pending(&state, now).0
        };
        totals_of(self.order, &self.tariff, &state, pending)
    }

    fn publish(&self, state: &State) {
        self.totals
            .send_replace(totals_of(self.order, &self.tariff, state, Usage::default()));
    }

    fn record_lag(&self, lag: Duration) {
        let mut state = lock(&self.state);
        state.last_lag = Some(lag);
        self.publish(&state);
    }

    fn mark_stopped(&self, error: Option<String>) {
        let mut state = lock(&self.state);
        if !state.stopped || error.is_some() {
            state.stopped = true;
            if error.is_some() {
                state.last_error = error;
            }
            self.publish(&state);
        }
    }

    /// Closes the tick ending at `now` and stores it; only then counts it. Returns `None` when
    /// there was nothing to bill.
    async fn close_tick(&self, now: Instant, is_final: bool) -> Result<Option<Tick>, MeterError> {
        self.settle_in_doubt().await?;
        let (tick, bytes_now, seconds_now) = {
            let state = lock(&self.state);
            if state.stopped {
                return Err(MeterError::LeaseStopped { order: self.order });
            }
            let (usage, bytes_now, seconds_now) = self.pending(&state, now);
            if usage == Usage::default() {
                return Ok(None);
            }
            (
                state.chain.prepare(state.interval_started_ms, usage),
                bytes_now,
                seconds_now,
            )
        };
        let span = tracing::debug_span!("tick", seq = tick.seq, is_final);
        let write_started = Instant::now();
        match self
            .ledger
            .append_tick(&self.deployment, &tick)
            .instrument(span)
            .await
        {
            Ok(()) => {
                lock(&self.state).last_write = Some(write_started.elapsed());
                self.count(&tick, bytes_now, seconds_now);
                Ok(Some(tick))
            }
            Err(e @ (MeterError::ChainConflict { .. } | MeterError::HeadMismatch { .. })) => {
                // Someone else extended this order's chain: stop rather than bill twice.
                tracing::error!(error = %e, "order's chain moved under the meter; stopping");
                self.mark_stopped(Some(e.to_string()));
                Err(e)
            }
            Err(e) => {
                let mut state = lock(&self.state);
                state.last_error = Some(e.to_string());
                state.in_doubt = Some(tick);
                // Keep the in-doubt tick's readings: if it did commit, counting it must use
                // exactly what it billed.
                state.in_doubt_marks = Some((bytes_now, seconds_now));
                self.publish(&state);
                Err(e)
            }
        }
    }

    /// After a write that returned an error, finds out whether it committed after all.
    async fn settle_in_doubt(&self) -> Result<(), MeterError> {
        let doubt = {
            let state = lock(&self.state);
            state.in_doubt.clone().zip(state.in_doubt_marks)
        };
        let Some((tick, (bytes_now, seconds_now))) = doubt else {
            return Ok(());
        };
        let stored = self.ledger.tick(self.order, tick.seq).await?;
        if stored.as_ref() == Some(&tick) {
            tracing::info!(seq = tick.seq, "a tick reported as failed had been stored");
            self.count(&tick, bytes_now, seconds_now);
        } else {
            let mut state = lock(&self.state);
            state.in_doubt = None;
            state.in_doubt_marks = None;
        }
        Ok(())
    }

    /// Advances the chain and totals past a stored tick.
    fn count(&self, tick: &Tick, bytes_now: ByteCount, seconds_now: u64) {
        let mut state = lock(&self.state);
        if let Err(e) = state.chain.commit(tick) {
            // prepare() built it from this very state and nothing else advances the chain.
            tracing::error!(error = %e, "stored tick does not follow the meter's chain");
            return;
        }
        state.billed_bytes = bytes_now;
        state.billed_seconds = seconds_now;
        state.interval_started_ms = now_ms();
        let usage = tick.usage();
        state.metered = state.metered.checked_add(usage).unwrap_or(state.metered);
        state.unclaimed = state
            .unclaimed
            .checked_add(usage)
            .unwrap_or(state.unclaimed);
        state.ticks_written += 1;
        if tick.seconds > 0 {
            let bytes = usage.bytes_total() / u128::from(tick.seconds);
            state.recent_bytes_per_second = u64::try_from(bytes).unwrap_or(u64::MAX);
        }
        state.last_error = None;
        state.in_doubt = None;
        state.in_doubt_marks = None;
        self.publish(&state);
        tracing::debug!(
            seq = tick.seq,
            seconds = tick.seconds,
            bytes_in = tick.bytes_in,
            bytes_out = tick.bytes_out,
            charge = %tick.charge,
            "tick stored"
        );
    }

    /// The final tick, then stopped.
    async fn finish(&self, now: Instant) -> Result<Option<Tick>, MeterError> {
        if self.is_stopped() {
            return Ok(None);
        }
        let result = self.close_tick(now, true).await;
        self.mark_stopped(None);
        result
    }

    async fn refresh_claims(&self) -> Result<(), MeterError> {
        let unclaimed = self.ledger.unclaimed_usage(self.order).await?;
        let mut state = lock(&self.state);
        state.unclaimed = unclaimed;
        self.publish(&state);
        Ok(())
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn totals_of(order: u64, tariff: &Tariff, state: &State, pending: Usage) -> MeterTotals {
    MeterTotals {
        order,
        last: state.chain.last(),
        ticks_written: state.ticks_written,
        metered: state.metered,
        metered_charge: tariff.charge(&state.metered),
        unclaimed: state.unclaimed,
        unclaimed_charge: tariff.charge(&state.unclaimed),
        pending,
        pending_charge: tariff.charge(&pending),
        recent_bytes_per_second: state.recent_bytes_per_second,
        last_write_micros: state.last_write.map(micros),
        last_lag_micros: state.last_lag.map(micros),
        stopped: state.stopped,
        last_error: state.last_error.clone(),
    }
}

/// The meter's state holds plain numbers that stay consistent under every early return, so a
/// panic elsewhere while holding the lock does not make it unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tick::verify_receipts;
    use sqlx::Executor;

    const DEPLOYMENT: Deployment = Deployment::new(31337, [0x5f; 20]);

    /// The meter's state machine, driven with chosen instants instead of a running task.
    async fn lease(dir: &tempfile::TempDir, order: u64, max_seconds: Option<u64>) -> Shared {
        let ledger = Ledger::open_sqlite(&dir.path().join("ledger.db"))
            .await
            .unwrap();
        let tariff = Tariff::new(U256::from(10u64), U256::from(1u64 << 30)).unwrap();
        Shared::load(
            ledger,
            DEPLOYMENT,
            LeaseSpec {
                order,
                tariff,
                max_seconds,
            },
        )
        .await
        .unwrap()
    }

    fn at(s: &Shared, millis: u64) -> Instant {
        s.started + Duration::from_millis(millis)
    }

    #[tokio::test]
    async fn ticks_bill_whole_elapsed_seconds_and_carry_the_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let s = lease(&dir, 1, None).await;
        let session = s.counter.open_session();
        let channel = session.open_channel();
        channel.add_in(100);

        let t0 = s.close_tick(at(&s, 5_700), false).await.unwrap().unwrap();
        assert_eq!(
            (t0.seq, t0.seconds, t0.bytes_in, t0.bytes_out),
            (0, 5, 100, 0)
        );
        // 5 s at 10 wei + 100 bytes at 1 wei per byte.
        assert_eq!(t0.charge, U256::from(150u64));

        channel.add_out(50);
        let t1 = s.close_tick(at(&s, 10_200), false).await.unwrap().unwrap();
        assert_eq!(
            (t1.seq, t1.seconds, t1.bytes_in, t1.bytes_out),
            (1, 5, 0, 50)
        );

        // Nothing new to bill: no tick, no seq used.
        assert_eq!(s.close_tick(at(&s, 10_900), false).await.unwrap(), None);
        let t2 = s.close_tick(at(&s, 11_000), true).await.unwrap().unwrap();
        assert_eq!((t2.seq, t2.seconds), (2, 1));

        let stored = s.ledger.ticks(1, 0, 10).await.unwrap();
        assert_eq!(stored, vec![t0, t1, t2]);
        assert_eq!(
            verify_receipts(&DEPLOYMENT, &stored).unwrap(),
            stored[2].head
        );
        let totals = s.totals_now(at(&s, 11_000));
        assert_eq!(totals.ticks_written, 3);
        assert_eq!(
            totals.metered,
            Usage {
                seconds: 11,
                bytes_in: 100,
                bytes_out: 50
            }
        );
        assert_eq!(totals.unclaimed, totals.metered);
        assert_eq!(totals.unclaimed_charge, U256::from(260u64));
        assert_eq!(totals.pending, Usage::default());
        assert_eq!(totals.last.unwrap().seq, 2);

        // Usage since the last tick shows as pending, not yet metered.
        channel.add_in(7);
        let pending = s.totals_now(at(&s, 13_500));
        assert_eq!(
            pending.pending,
            Usage {
                seconds: 2,
                bytes_in: 7,
                bytes_out: 0
            }
        );
        assert_eq!(pending.pending_charge, U256::from(27u64));
        assert_eq!(pending.metered, totals.metered);
        assert_eq!(pending.owed(), U256::from(287u64));
        // The last tick moved nothing in its 1 s; the one before moved 50 bytes in 5 s.
        assert_eq!(pending.recent_bytes_per_second, 0);
    }

    #[tokio::test]
    async fn a_failed_write_counts_nothing_and_the_next_tick_covers_both_intervals() {
        let dir = tempfile::tempdir().unwrap();
        let s = lease(&dir, 2, None).await;
        // A real database failure: a trigger that aborts inserts while the switch is on.
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let admin = sqlx::AnyPool::connect(&url).await.unwrap();
        admin
            .execute(
                "CREATE TABLE fail_switch (fail INTEGER NOT NULL); \
                 INSERT INTO fail_switch VALUES (1); \
                 CREATE TRIGGER fail_ticks BEFORE INSERT ON ticks \
                 WHEN (SELECT fail FROM fail_switch) = 1 \
                 BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
            )
            .await
            .unwrap();
        let channel = s.counter.open_session().open_channel();
        channel.add_in(1_000);

        let err = s.close_tick(at(&s, 5_100), false).await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        let totals = s.totals_now(at(&s, 5_100));
        assert_eq!(totals.ticks_written, 0);
        assert_eq!(totals.last, None);
        assert_eq!(totals.metered, Usage::default());
        assert!(totals.last_error.unwrap().contains("disk on fire"));
        assert!(!totals.stopped);

        admin
            .execute("UPDATE fail_switch SET fail = 0")
            .await
            .unwrap();
        channel.add_out(9);
        let t = s.close_tick(at(&s, 10_300), false).await.unwrap().unwrap();
        assert_eq!(
            (t.seq, t.seconds, t.bytes_in, t.bytes_out),
            (0, 10, 1_000, 9)
        );
        let totals = s.totals_now(at(&s, 10_300));
        assert_eq!(totals.ticks_written, 1);
        assert_eq!(totals.last_error, None);
        admin.close().await;
    }

    #[tokio::test]
    async fn a_tick_that_committed_despite_an_error_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = lease(&dir, 3, None).await;
        s.counter.open_session().open_channel().add_in(5);
        // As if the commit reached the database but its acknowledgement was lost.
        let (usage, bytes_now, seconds_now) = {
            let state = lock(&s.state);
            s.pending(&state, at(&s, 5_000))
        };
        let tick = lock(&s.state).chain.prepare(0, usage);
        s.ledger.append_tick(&DEPLOYMENT, &tick).await.unwrap();
        {
            let mut state = lock(&s.state);
            state.in_doubt = Some(tick.clone());
            state.in_doubt_marks = Some((bytes_now, seconds_now));
        }
        let next = s.close_tick(at(&s, 10_000), false).await.unwrap().unwrap();
        assert_eq!((next.seq, next.seconds, next.bytes_in), (1, 5, 0));
        assert_eq!(next.prev_head, tick.head);
        let totals = s.totals_now(at(&s, 10_000));
        assert_eq!(totals.ticks_written, 2);
        assert_eq!(totals.metered.seconds, 10);
        assert_eq!(totals.metered.bytes_in, 5);
    }

    #[tokio::test]
    async fn billing_stops_at_the_lease_cap() {
        let dir = tempfile::tempdir().unwrap();
        let s = lease(&dir, 4, Some(7)).await;
        let t0 = s.close_tick(at(&s, 5_200), false).await.unwrap().unwrap();
        assert_eq!(t0.seconds, 5);
        assert!(!s.cap_reached(at(&s, 6_999)));
        assert!(s.cap_reached(at(&s, 7_000)));
        let last = s.finish(at(&s, 30_000)).await.unwrap().unwrap();
        assert_eq!(last.seconds, 2);
        assert!(s.is_stopped());
        assert!(matches!(
            s.close_tick(at(&s, 40_000), false).await,
            Err(MeterError::LeaseStopped { order: 4 })
        ));
        assert_eq!(s.totals_now(at(&s, 40_000)).metered.seconds, 7);
    }

    #[tokio::test]
    async fn another_writer_on_the_same_chain_stops_the_meter_without_double_billing() {
        let dir = tempfile::tempdir().unwrap();
        let s = lease(&dir, 5, None).await;
        let rival = TickChain::genesis(DEPLOYMENT.order_key(5), s.tariff);
        let theirs = rival.prepare(
            0,
            Usage {
                seconds: 5,
                ..Usage::default()
            },
        );
        s.ledger.append_tick(&DEPLOYMENT, &theirs).await.unwrap();

        let err = s.close_tick(at(&s, 5_000), false).await.unwrap_err();
        assert!(
            matches!(
                err,
                MeterError::ChainConflict {
                    order: 5,
                    seq: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(s.is_stopped());
        assert_eq!(s.ledger.ticks(5, 0, 10).await.unwrap(), vec![theirs]);
        assert!(s.totals_now(at(&s, 6_000)).last_error.is_some());
    }

    #[tokio::test]
    async fn a_resumed_lease_continues_the_stored_chain_and_totals() {
        let dir = tempfile::tempdir().unwrap();
        let first = lease(&dir, 6, None).await;
        first.counter.open_session().open_channel().add_out(3);
        let a = first
            .close_tick(at(&first, 5_000), false)
            .await
            .unwrap()
            .unwrap();
        let b = first.finish(at(&first, 6_500)).await.unwrap().unwrap();
        assert_eq!((a.seq, b.seq, b.seconds), (0, 1, 1));

        let resumed = lease(&dir, 6, None).await;
        let totals = resumed.totals_now(resumed.started);
        assert_eq!(totals.last.unwrap().head, b.head);
        assert_eq!(totals.ticks_written, 0);
        assert_eq!(
            totals.metered,
            Usage {
                seconds: 6,
                bytes_in: 0,
                bytes_out: 3
            }
        );
        let c = resumed
            .close_tick(at(&resumed, 5_000), false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((c.seq, c.prev_head, c.seconds), (2, b.head, 5));
        let all = resumed.ledger.ticks(6, 0, 10).await.unwrap();
        assert_eq!(verify_receipts(&DEPLOYMENT, &all).unwrap(), c.head);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(16))]

        /// Whatever the spacing of ticks (late tasks, slow ledger), the seconds billed after a
        /// tick are exactly the whole seconds elapsed (capped by the lease): never more, and no
        /// fraction lost for good.
        #[test]
        fn billed_seconds_are_exactly_the_whole_seconds_elapsed(
            steps in proptest::collection::vec(0u64..20_000, 1..15),
            cap in proptest::option::of(0u64..120),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let s = lease(&dir, 1, cap).await;
                let mut now = 0u64;
                let mut billed = 0u64;
                for step in steps {
                    now += step;
                    if let Some(t) = s.close_tick(at(&s, now), false).await.unwrap() {
                        billed += t.seconds;
                    }
                    let whole = now / 1000;
                    assert_eq!(billed, cap.map_or(whole, |c| whole.min(c)));
                }
                let stored = s.ledger.ticks(1, 0, u64::MAX).await.unwrap();
                assert_eq!(stored.iter().map(|t| t.seconds).sum::<u64>(), billed);
                verify_receipts(&DEPLOYMENT, &stored).unwrap();
            });
        }
    }

    #[tokio::test]
    async fn config_parses_with_defaults_and_opens_the_default_ledger_in_the_state_dir() {
        let config: MeterConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, MeterConfig::default());
        let config: MeterConfig = serde_json::from_str(r#"{"tick_interval_secs": 2}"#).unwrap();
        assert_eq!(config.tick_interval().unwrap(), Duration::from_secs(2));
        assert!(serde_json::from_str::<MeterConfig>(r#"{"interval": 2}"#).is_err());
        let dir = tempfile::tempdir().unwrap();
        let ledger = config.open_ledger(dir.path()).await.unwrap();
        assert_eq!(ledger.backend(), crate::ledger::Backend::Sqlite);
        assert!(dir.path().join("ledger.db").exists());
    }

    #[test]
    fn zero_interval_is_refused() {
        let err = MeterConfig {
            tick_interval_secs: 0,
            ..MeterConfig::default()
        }
        .tick_interval()
        .unwrap_err();
        assert!(matches!(err, MeterError::InvalidConfig(_)));
        assert_eq!(
            MeterConfig::default().tick_interval().unwrap(),
            Duration::from_secs(5)
        );
    }
}
