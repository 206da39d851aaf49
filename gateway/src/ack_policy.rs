//! What the provider's policy does about bytes its client has not acknowledged.
//!
//! The contract pays an order's bytes only up to the larger of what the client's tunnel has
//! acknowledged and the order's byte allowance. A client on plain `ssh` never acknowledges, so
//! past the allowance the provider moves bytes it will not be paid for. Per order, the
//! *unacknowledged bytes* are what the lease meter counted (both directions, the interval in
//! flight included) minus the newest acknowledgment's bytes (the ledger's, the chain's, or one
//! `shale-ack` has just stored). When they reach `notice_at` of the allowance, each live session
//! of the order is told once on its stderr; when they reach the allowance and the provider's
//! policy says so (`pause_transfers`), the order's transfers pause until an acknowledgment
//! arrives, which resumes them at once. Without the pause the bytes are the provider's risk.
//!
//! Pausing stops reading from the container's side of each of the order's channels (process
//! output, forwarded sockets) and stops writing the client's bytes into it ([`Gated`]). The SSH
//! window then holds the client's downloads, and its uploads wait in their connection, which
//! russh stops reading once the channel's queue is full. Nothing is refused and no channel is
//! closed, so a transfer goes on where it stopped, and nothing is lost. The `shale-ack` and
//! `shale-receipts` subsystems are never paused: they are how the client catches up. The
//! tunnel acknowledges over a connection of its own, which a held upload cannot block.
//!
//! An acknowledgment covers stored ticks only, so the bytes since the last tick (and the
//! exchange's own bytes) stay unacknowledged after it. A tiny allowance could then never be met
//! again: an acknowledgment therefore always resumes, and the order pauses again only once more
//! bytes than were left unacknowledged at that moment have moved.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use shale_contracts::Order;
use shale_meter::{LeaseMeter, Ledger};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::AcknowledgmentConfig;
use crate::leases::LeaseBoard;
use crate::login::OrderId;
use crate::metrics::OrderLabel;
use crate::tasks::Tasks;

/// How often an order's unacknowledged bytes are compared with its allowance. An acknowledgment
/// is acted on at once; between checks a transfer may run past the allowance by this long.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The ledger is read again every this many checks, for acknowledgments stored by another
/// gateway sharing it; this gateway's own are seen at once.
const LEDGER_EVERY_CHECKS: u64 = 10;

const MILLION: u64 = 1_000_000;

/// The provider's policy on unacknowledged bytes, from `[acknowledgments]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckPolicy {
    /// `notice_at` in millionths, so that thresholds are integer bytes.
    notice_ppm: u64,
    pause_transfers: bool,
}

impl AckPolicy {
    /// The policy `config` describes (its `notice_at` is taken within 0 ..= 1).
    pub fn new(config: &AcknowledgmentConfig) -> Self {
        Self {
            notice_ppm: (config.notice_at.clamp(0.0, 1.0) * MILLION as f64).round() as u64,
            pause_transfers: config.pause_transfers,
        }
    }

    /// Whether transfers pause at the allowance.
    pub fn pauses(&self) -> bool {
        self.pause_transfers
    }

    /// Unacknowledged bytes from which an order with `allowance` is told (rounded up).
    pub fn notice_threshold(&self, allowance: u64) -> u64 {
        let scaled = u128::from(allowance) * u128::from(self.notice_ppm);
        // notice_ppm <= MILLION, so the quotient is at most `allowance`.
        scaled.div_ceil(u128::from(MILLION)) as u64
    }
}

impl Default for AckPolicy {
    fn default() -> Self {
        Self::new(&AcknowledgmentConfig::default())
    }
}

/// One order's bytes as the policy sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exposure {
    /// Bytes metered, both directions, since the order began.
    pub metered: u64,
    /// Bytes (in + out) of the newest acknowledgment.
    pub acked: u64,
    /// The order's byte allowance.
    pub allowance: u64,
}

impl Exposure {
    /// Metered bytes no acknowledgment covers (none when an acknowledgment is ahead).
    pub fn unacknowledged(&self) -> u64 {
        self.metered.saturating_sub(self.acked)
    }

    fn near(&self, policy: &AckPolicy) -> bool {
        let unacked = self.unacknowledged();
        unacked > 0 && unacked >= policy.notice_threshold(self.allowance)
    }

    fn over(&self) -> bool {
        let unacked = self.unacknowledged();
        unacked > 0 && unacked >= self.allowance
    }
}

/// A change to an order's transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfers {
    /// Hold them until an acknowledgment arrives.
    Pause,
    /// Let them go on.
    Resume,
}

/// What to do after one look at an order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Steps {
    /// Tell the order's sessions that it nears its allowance.
    pub notice: bool,
    /// Pause or resume its transfers.
    pub change: Option<Transfers>,
    /// Tell the sessions why they pause (once per crossing, not at every pause).
    pub tell_pause: bool,
}

/// What the policy remembers of one order between looks.
#[derive(Debug, Default)]
pub struct AckState {
    /// Told since the unacknowledged bytes last were below the notice threshold.
    noticed: bool,
    /// Told of a pause since then.
    told_paused: bool,
    paused: bool,
    /// Unacknowledged bytes when the last acknowledgment arrived: no pause until more.
    floor: u64,
}

impl AckState {
    /// Whether the order's transfers are paused now.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// One periodic look at the order.
    pub fn step(&mut self, policy: &AckPolicy, now: Exposure) -> Steps {
        let mut steps = Steps::default();
        if now.near(policy) {
            steps.notice = !std::mem::replace(&mut self.noticed, true);
        } else {
            // Back below the threshold (an acknowledgment lowered it): the next crossing is told.
            self.noticed = false;
            self.told_paused = false;
        }
        let over = policy.pause_transfers && now.over();
        if self.paused && !over {
            self.paused = false;
            steps.change = Some(Transfers::Resume);
        } else if !self.paused && over && now.unacknowledged() > self.floor {
            self.paused = true;
            steps.change = Some(Transfers::Pause);
            steps.tell_pause = !std::mem::replace(&mut self.told_paused, true);
        }
        steps
    }

    /// A look right after a new acknowledgment (`now.acked` grew): it resumes a paused order.
    pub fn acknowledged(&mut self, policy: &AckPolicy, now: Exposure) -> Steps {
        self.floor = now.unacknowledged();
        let was_paused = std::mem::take(&mut self.paused);
        let mut steps = self.step(policy, now);
        if was_paused {
            steps.change = Some(Transfers::Resume);
        }
        steps
    }
}

/// `67108864` -> "67108864 bytes (64.0 MiB)", for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let (mut unit, mut scale) = (0, 1024u128);
    while unit + 1 < UNITS.len() && u128::from(n) >= scale * 1024 {
        scale *= 1024;
        unit += 1;
    }
    let tenths = u128::from(n) * 10 / scale;
    format!(
        "{n} bytes ({}.{} {})",
        tenths / 10,
        tenths % 10,
        UNITS[unit]
    )
}

/// What the order's sessions read when it nears its allowance.
pub fn notice_line(order: OrderId, now: Exposure, policy: &AckPolicy) -> String {
    let then = if policy.pauses() {
        "; at the allowance its transfers pause until they are acknowledged"
    } else {
        ""
    };
    format!(
        "order {order} has moved {} that its client has not acknowledged, of a byte allowance of {}; \
         connect through the payment tunnel with `ssh shale-{order}` to acknowledge them{then}",
        human_bytes(now.unacknowledged()),
        human_bytes(now.allowance),
    )
}

/// What the order's sessions read when its transfers pause.
pub fn pause_line(order: OrderId, now: Exposure) -> String {
    format!(
        "order {order}'s transfers are paused: {} unacknowledged reached its byte allowance of {}; \
         `ssh shale-{order}` (through the payment tunnel) acknowledges them and resumes the transfers at once",
        human_bytes(now.unacknowledged()),
        human_bytes(now.allowance),
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain values behind these locks stay consistent after a panic: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One order's switch, shared by every channel of the order.
#[derive(Debug, Default)]
struct OrderGate {
    paused: AtomicBool,
    resumed: Notify,
    /// Why, for channels opened while paused.
    reason: Mutex<Option<String>>,
}

impl OrderGate {
    fn pause(&self, reason: String) {
        *lock(&self.reason) = Some(reason);
        self.paused.store(true, Ordering::Release);
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        *lock(&self.reason) = None;
        self.resumed.notify_waiters();
    }
}

/// One session's view of its order's switch: passes while the order's transfers go on, and
/// gives up when the session is closing (so a cut session's pumps end even while paused).
#[derive(Debug, Clone)]
pub struct TransferGate {
    order: Arc<OrderGate>,
    closed: CancellationToken,
}

impl TransferGate {
    /// Whether the order's transfers are paused now.
    pub fn is_paused(&self) -> bool {
        // One load of a line written only at a pause or resume: nothing shared is contended.
        self.order.paused.load(Ordering::Acquire)
    }

    /// Why the order's transfers are paused, if they are.
    pub fn pause_reason(&self) -> Option<String> {
        if self.is_paused() {
            lock(&self.order.reason).clone()
        } else {
            None
        }
    }

    /// Waits until the order's transfers may go on: `true`, or `false` once the session closes.
    pub async fn pass(&self) -> bool {
        loop {
            let resumed = self.order.resumed.notified();
            tokio::pin!(resumed);
            // Registered before the check, so a resume between the two is not missed.
            resumed.as_mut().enable();
            if !self.is_paused() {
                return true;
            }
            tokio::select! {
                _ = &mut resumed => {}
                _ = self.closed.cancelled() => return false,
            }
        }
    }
}

/// A container-side stream (process output or input, a forwarded socket) that neither reads nor
/// writes while its order's transfers are paused. Flushes and shutdowns pass.
pub struct Gated<S> {
    inner: S,
    gate: TransferGate,
    waiting: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
}

impl<S> Gated<S> {
    /// `inner`, held by `gate`.
    pub fn new(inner: S, gate: TransferGate) -> Self {
        Self {
            inner,
            gate,
            waiting: None,
        }
    }

    fn poll_gate(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(waiting) = self.waiting.as_mut() {
                let open = ready!(waiting.as_mut().poll(cx));
                self.waiting = None;
                if !open {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the session is closing",
                    )));
                }
            }
            if !self.gate.is_paused() {
                return Poll::Ready(Ok(()));
            }
            // Allocated only while paused; the byte path itself allocates nothing.
            let gate = self.gate.clone();
            self.waiting = Some(Box::pin(async move { gate.pass().await }));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_gate(cx))?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_gate(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// `inner` held by `gate`; left alone where the policy never pauses.
pub fn gated<S>(inner: S, gate: &Option<TransferGate>) -> Either<Gated<S>, S> {
    match gate {
        Some(gate) => Either::Left(Gated::new(inner, gate.clone())),
        None => Either::Right(inner),
    }
}

/// One order's acknowledgment state, held by each of its sessions; its checking task ends once
/// the last session has gone.
pub struct OrderWatch {
    order: OrderId,
    allowance: u64,
    pauses: bool,
    gate: Arc<OrderGate>,
    lease: Mutex<Arc<LeaseMeter>>,
    acked: AtomicU64,
    wake: Arc<Notify>,
}

impl OrderWatch {
    /// The order.
    pub fn order(&self) -> OrderId {
        self.order
    }

    /// The switch a session's pumps pass through, given up when `closed` is cancelled; `None`
    /// where the policy never pauses.
    pub fn gate(&self, closed: CancellationToken) -> Option<TransferGate> {
        self.pauses.then(|| TransferGate {
            order: self.gate.clone(),
            closed,
        })
    }

    /// Whether the order's transfers are paused now.
    pub fn is_paused(&self) -> bool {
        self.gate.paused.load(Ordering::Acquire)
    }

    /// The client acknowledged `bytes` (in + out, cumulative): looked at at once, which resumes
    /// paused transfers.
    pub fn acknowledged(&self, bytes: u64) {
        self.acked.fetch_max(bytes, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn exposure(&self) -> Exposure {
        let totals = lock(&self.lease).totals();
        let (m, p) = (totals.metered, totals.pending);
        Exposure {
            metered: m
                .bytes_in
                .saturating_add(m.bytes_out)
                .saturating_add(p.bytes_in)
                .saturating_add(p.bytes_out),
            acked: self.acked.load(Ordering::Acquire),
            allowance: self.allowance,
        }
    }
}

/// Where an order's checking task reports.
#[derive(Clone)]
pub struct Reporting {
    /// The live sessions, told on their stderr.
    pub board: LeaseBoard,
    /// Where acknowledgments are stored.
    pub ledger: Ledger,
    /// `order_unacknowledged_bytes`.
    pub unacknowledged: Family<OrderLabel, Gauge>,
    /// `order_transfers_paused`.
    pub paused: Family<OrderLabel, Gauge>,
}

/// Every order with live sessions, watched under one policy.
pub struct AckWatches {
    policy: AckPolicy,
    orders: Mutex<HashMap<OrderId, Weak<OrderWatch>>>,
    /// Where each order's checking task runs, so that shutdown ends it.
    tasks: Tasks,
}

impl AckWatches {
    /// Watches orders under `policy`.
    pub fn new(policy: AckPolicy) -> Self {
        Self {
            policy,
            orders: Mutex::default(),
            tasks: Tasks::default(),
        }
    }

    /// Runs the orders' checking tasks under `tasks` (the gateway's), not on their own.
    pub(crate) fn set_tasks(&mut self, tasks: Tasks) {
        self.tasks = tasks;
    }

    /// The policy.
    pub fn policy(&self) -> AckPolicy {
        self.policy
    }

    /// The watch of `order` (metered by `lease`), started with its checking task if no session
    /// of the order holds one.
    pub fn join(&self, order: &Order, lease: Arc<LeaseMeter>, out: Reporting) -> Arc<OrderWatch> {
        let id = OrderId(order.id);
        let mut orders = lock(&self.orders);
        orders.retain(|_, w| w.strong_count() > 0);
        if let Some(watch) = orders.get(&id).and_then(Weak::upgrade) {
            let mut current = lock(&watch.lease);
            // A meter started again (a top-up after the escrow ran out) replaces the stopped one.
            if current.is_stopped() && !Arc::ptr_eq(&current, &lease) {
                *current = lease;
            }
            drop(current);
            return watch;
        }
        let watch = Arc::new(OrderWatch {
            order: id,
            allowance: order.byte_allowance,
            pauses: self.policy.pauses(),
            gate: Arc::default(),
            lease: Mutex::new(lease),
            acked: AtomicU64::new(u64::try_from(order.acked_bytes).unwrap_or(u64::MAX)),
            wake: Arc::default(),
        });
        orders.insert(id, Arc::downgrade(&watch));
        self.tasks.spawn_until_stopped(
            watch_order(Arc::downgrade(&watch), watch.wake.clone(), self.policy, out)
                .instrument(tracing::info_span!("acknowledgments", order = id.0)),
        );
        watch
    }
}

/// Looks at one order every [`CHECK_EVERY`] and at each acknowledgment, until no session holds
/// its watch.
async fn watch_order(
    watch: Weak<OrderWatch>,
    wake: Arc<Notify>,
    policy: AckPolicy,
    out: Reporting,
) {
    let mut state = AckState::default();
    let mut seen_acked = None;
    let mut label = None;
    for check in 0u64.. {
        let Some(w) = watch.upgrade() else { break };
        let id = w.order;
        let label = label.get_or_insert_with(|| OrderLabel {
            order: id.to_string(),
        });
        if check % LEDGER_EVERY_CHECKS == 0 {
            match out.ledger.latest_ack(id.0).await {
                Ok(Some(ack)) => {
                    w.acked
                        .fetch_max(ack.bytes_in.saturating_add(ack.bytes_out), Ordering::AcqRel);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the order's acknowledgments"),
            }
        }
        let now = w.exposure();
        let steps = match seen_acked {
            Some(seen) if now.acked > seen => state.acknowledged(&policy, now),
            _ => state.step(&policy, now),
        };
        seen_acked = Some(now.acked);
        apply(&w, &out, &policy, now, steps).await;
        out.unacknowledged
            .get_or_create(label)
            .set(i64::try_from(now.unacknowledged()).unwrap_or(i64::MAX));
        out.paused
            .get_or_create(label)
            .set(i64::from(state.paused()));
        // Not held while waiting: the last session leaving ends this task.
        drop(w);
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = wake.notified() => {}
        }
    }
    if let Some(label) = label {
        out.unacknowledged.remove(&label);
        out.paused.remove(&label);
    }
}

async fn apply(w: &OrderWatch, out: &Reporting, policy: &AckPolicy, now: Exposure, steps: Steps) {
    let (order, unacknowledged, allowance) = (w.order, now.unacknowledged(), now.allowance);
    if steps.change == Some(Transfers::Resume) {
        // First, and before any notice: a notice may wait on a connection the pause holds.
        w.gate.resume();
        tracing::info!(
            unacknowledged,
            allowance,
            "acknowledged: the order's transfers resume"
        );
    }
    if steps.notice {
        tracing::info!(
            unacknowledged,
            allowance,
            "telling the order's sessions it nears its byte allowance unacknowledged"
        );
        out.board
            .notify(order, &notice_line(order, now, policy))
            .await;
    }
    if steps.change == Some(Transfers::Pause) {
        let line = pause_line(order, now);
        tracing::warn!(
            unacknowledged,
            allowance,
            "pausing the order's transfers until its client acknowledges them"
        );
        // Told before the gate closes, while the sessions' connections still move.
        if steps.tell_pause {
            out.board.notify(order, &line).await;
        }
        w.gate.pause(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(notice_at: f64, pause_transfers: bool) -> AckPolicy {
        AckPolicy::new(&AcknowledgmentConfig {
            notice_at,
            pause_transfers,
        })
    }

    fn at(metered: u64, acked: u64, allowance: u64) -> Exposure {
        Exposure {
            metered,
            acked,
            allowance,
        }
    }

    #[test]
    fn thresholds_are_whole_bytes_rounded_up() {
        let p = policy(0.8, false);
        assert_eq!(p.notice_threshold(1000), 800);
        assert_eq!(p.notice_threshold(1001), 801);
        assert_eq!(p.notice_threshold(0), 0);
        assert_eq!(
            p.notice_threshold(u64::MAX),
            (u64::MAX as u128 * 4).div_ceil(5) as u64
        );
        assert_eq!(policy(1.0, false).notice_threshold(u64::MAX), u64::MAX);
        assert_eq!(policy(0.0, false).notice_threshold(1000), 0);
    }

    #[test]
    fn one_notice_per_crossing_of_the_threshold() {
        let p = policy(0.8, false);
        let mut s = AckState::default();
        assert_eq!(s.step(&p, at(799, 0, 1000)), Steps::default());
        assert!(s.step(&p, at(800, 0, 1000)).notice);
        assert!(!s.step(&p, at(900, 0, 1000)).notice);
        // Past the allowance without the pause: told once, nothing else happens.
        assert_eq!(s.step(&p, at(5000, 0, 1000)), Steps::default());
        assert!(!s.paused());
    }

    #[test]
    fn an_acknowledgment_that_lowers_them_rearms_the_notice() {
        let p = policy(0.8, false);
        let mut s = AckState::default();
        assert!(s.step(&p, at(850, 0, 1000)).notice);
        // Acknowledged up to 600: 250 left, below the threshold.
        assert!(!s.acknowledged(&p, at(850, 600, 1000)).notice);
        assert!(!s.step(&p, at(1399, 600, 1000)).notice);
        assert!(s.step(&p, at(1400, 600, 1000)).notice);
    }

    #[test]
    fn an_acknowledgment_that_leaves_them_high_does_not_notice_again() {
        let p = policy(0.5, false);
        let mut s = AckState::default();
        assert!(s.step(&p, at(600, 0, 1000)).notice);
        assert!(!s.acknowledged(&p, at(1200, 600, 1000)).notice);
    }

    #[test]
    fn at_the_allowance_transfers_pause_and_an_acknowledgment_resumes_them() {
        let p = policy(0.8, true);
        let mut s = AckState::default();
        let steps = s.step(&p, at(999, 0, 1000));
        assert_eq!((steps.notice, steps.change), (true, None));
        let steps = s.step(&p, at(1000, 0, 1000));
        assert_eq!(steps.change, Some(Transfers::Pause));
        assert!(steps.tell_pause && !steps.notice && s.paused());
        // Nothing changes while paused and unacknowledged.
        assert_eq!(s.step(&p, at(1064, 0, 1000)), Steps::default());
        let steps = s.acknowledged(&p, at(1064, 1000, 1000));
        assert_eq!(steps.change, Some(Transfers::Resume));
        assert!(!s.paused());
        // 64 left: below the threshold, so the next crossing is told again, pause included.
        assert!(s.step(&p, at(1800, 1000, 1000)).notice);
        let steps = s.step(&p, at(2000, 1000, 1000));
        assert_eq!(
            (steps.change, steps.tell_pause),
            (Some(Transfers::Pause), true)
        );
    }

    #[test]
    fn an_acknowledgment_always_resumes_and_the_next_pause_waits_for_more_bytes() {
        let p = policy(0.8, true);
        let mut s = AckState::default();
        s.step(&p, at(3000, 0, 1000));
        assert!(s.paused());
        // Acknowledged, but the interval in flight still holds 1500 bytes: resumed all the same.
        assert_eq!(
            s.acknowledged(&p, at(3000, 1500, 1000)).change,
            Some(Transfers::Resume)
        );
        assert_eq!(s.step(&p, at(3000, 1500, 1000)).change, None);
        let steps = s.step(&p, at(3001, 1500, 1000));
        assert_eq!(steps.change, Some(Transfers::Pause));
        // Still above the threshold since the last crossing: not told twice.
        assert!(!steps.tell_pause && !steps.notice);
    }

    #[test]
    fn a_pause_that_no_longer_holds_is_lifted_by_a_look_too() {
        // Another gateway's acknowledgment read from the shared ledger also counts as one; a
        // plain look lifts a pause whose bytes fell below the allowance.
        let p = policy(0.8, true);
        let mut s = AckState::default();
        s.step(&p, at(1000, 0, 1000));
        assert_eq!(
            s.step(&p, at(1000, 500, 1000)).change,
            Some(Transfers::Resume)
        );
    }

    #[test]
    fn a_zero_allowance_tells_and_pauses_at_the_first_unacknowledged_byte() {
        let p = policy(0.8, true);
        let mut s = AckState::default();
        assert_eq!(s.step(&p, at(0, 0, 0)), Steps::default());
        let steps = s.step(&p, at(1, 0, 0));
        assert!(steps.notice && steps.tell_pause);
        assert_eq!(steps.change, Some(Transfers::Pause));
        // The exchange's own bytes are never acknowledged: it still resumes.
        assert_eq!(
            s.acknowledged(&p, at(300, 1, 0)).change,
            Some(Transfers::Resume)
        );
        assert_eq!(s.step(&p, at(301, 1, 0)).change, Some(Transfers::Pause));
    }

    #[test]
    fn an_acknowledgment_ahead_of_the_meter_leaves_nothing_unacknowledged() {
        let p = policy(0.0, true);
        let mut s = AckState::default();
        let ahead = at(100, 5000, 0);
        assert_eq!(ahead.unacknowledged(), 0);
        assert_eq!(s.step(&p, ahead), Steps::default());
        assert_eq!(s.acknowledged(&p, ahead), Steps::default());
    }

    #[test]
    fn the_lines_say_how_much_of_what_and_how_to_acknowledge() {
        let now = at(60 << 20, 4 << 20, 64 << 20);
        let notice = notice_line(OrderId(7), now, &policy(0.8, false));
        assert!(notice.contains("58720256 bytes (56.0 MiB)"), "{notice}");
        assert!(
            notice.contains("allowance of 67108864 bytes (64.0 MiB)"),
            "{notice}"
        );
        assert!(notice.contains("`ssh shale-7`"), "{notice}");
        assert!(!notice.contains("pause"), "{notice}");
        assert!(notice_line(OrderId(7), now, &policy(0.8, true)).contains("pause"));
        let paused = pause_line(OrderId(7), now);
        assert!(
            paused.starts_with("order 7's transfers are paused"),
            "{paused}"
        );
        assert!(paused.contains("`ssh shale-7`"), "{paused}");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1536), "1536 bytes (1.5 KiB)");
        assert_eq!(human_bytes(3 << 30), "3221225472 bytes (3.0 GiB)");
    }

    #[tokio::test]
    async fn a_gated_stream_holds_while_paused_and_gives_up_when_the_session_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let order = Arc::new(OrderGate::default());
        let closed = CancellationToken::new();
        let gate = TransferGate {
            order: order.clone(),
            closed: closed.clone(),
        };
        let (a, mut b) = tokio::io::duplex(64);
        let mut gated = Gated::new(a, gate);
        b.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 3];
        gated.read_exact(&mut buf).await.unwrap();
        order.pause("paused".into());
        b.write_all(b"two").await.unwrap();
        let held = tokio::time::timeout(Duration::from_millis(50), gated.read(&mut buf)).await;
        assert!(held.is_err(), "read while paused");
        order.resume();
        gated.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"two");
        order.pause("paused".into());
        let writing = tokio::spawn(async move { gated.write_all(b"x").await });
        closed.cancel();
        let err = writing.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
