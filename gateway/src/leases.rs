//! The live sessions of each order, so that the gateway can tell them something (a payment warning,
//! the lease's end) and cut them when the order ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use russh::server::Handle;
use russh::{ChannelId, Disconnect};
use tokio_util::sync::CancellationToken;

use shale_meter::ledger::SessionCheckpoint;
use shale_meter::SessionCounter;

use crate::admission::Refusal;
use crate::login::OrderId;

/// A gateway-unique session (SSH connection) id, carried on tracing spans and in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl SessionId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 8];
        // Ids only need to be unique, not secret: fall back to the clock if the OS has no entropy.
        if getrandom::fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            bytes = nanos.to_le_bytes();
        }
        Self(u64::from_le_bytes(bytes))
    }
}

#[derive(Clone)]
struct LiveSession {
    handle: Handle,
    /// The session channels (shell, exec, subsystem) whose stderr reaches the user.
    channels: Arc<Mutex<Vec<ChannelId>>>,
    /// Cancelled when the session is cut or leaves.
    closed: CancellationToken,
    /// Why the gateway cut it (a [`Refusal::reason`]), for the session's end record.
    cut_for: Arc<OnceLock<&'static str>>,
    /// Its byte counters, once its lease is metered; checkpointed into the ledger.
    counter: Arc<OnceLock<Arc<SessionCounter>>>,
}

#[derive(Default)]
struct Inner {
    orders: HashMap<OrderId, HashMap<SessionId, LiveSession>>,
    closed: bool,
}

/// Every live session, by order.
#[derive(Clone)]
pub struct LeaseBoard {
    inner: Arc<Mutex<Inner>>,
    max_per_order: usize,
}

/// Membership of one session on the board; leaving is automatic on drop.
pub struct SessionSeat {
    board: LeaseBoard,
    order: OrderId,
    session: SessionId,
    channels: Arc<Mutex<Vec<ChannelId>>>,
    closed: CancellationToken,
    cut_for: Arc<OnceLock<&'static str>>,
    counter: Arc<OnceLock<Arc<SessionCounter>>>,
}

impl SessionSeat {
    /// Gives the board the session's byte counters, whose totals
    /// [`LeaseBoard::checkpoints`] reads; set once.
    pub fn meter(&self, counter: Arc<SessionCounter>) {
        let _ = self.counter.set(counter);
    }

    /// Why the gateway cut the session (a [`Refusal::reason`]), if it did.
    pub fn cut_for(&self) -> Option<&'static str> {
        self.cut_for.get().copied()
    }

    /// Cancelled when the session is cut or leaves the board, so that work held for it (pumps
    /// paused by the acknowledgment policy) gives up instead of holding its connection open.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// Marks `channel` as one whose stderr carries notices to the user.
    pub fn add_channel(&self, channel: ChannelId) {
        lock(&self.channels).push(channel);
    }

    /// Forgets `channel` once it is closed.
    pub fn remove_channel(&self, channel: ChannelId) {
        lock(&self.channels).retain(|c| *c != channel);
    }
}

impl Drop for SessionSeat {
    fn drop(&mut self) {
        self.closed.cancel();
        let mut inner = lock(&self.board.inner);
        if let Some(sessions) = inner.orders.get_mut(&self.order) {
            sessions.remove(&self.session);
            if sessions.is_empty() {
                inner.orders.remove(&self.order);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain collections, still consistent: keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LeaseBoard {
    /// A board that allows `max_per_order` sessions per order.
    pub fn new(max_per_order: usize) -> Self {
        Self {
            inner: Arc::default(),
            max_per_order,
        }
    }

    /// Seats a new session of `order`, unless the order is at its cap or the gateway is closing.
    pub fn join(
        &self,
        order: OrderId,
        session: SessionId,
        handle: Handle,
    ) -> Result<SessionSeat, Refusal> {
        let mut inner = lock(&self.inner);
        if inner.closed {
            return Err(Refusal::ShuttingDown);
        }
        let sessions = inner.orders.entry(order).or_default();
        if sessions.len() >= self.max_per_order {
            return Err(Refusal::SessionCap {
                order,
                limit: self.max_per_order,
            });
        }
        let channels = Arc::new(Mutex::new(Vec::new()));
        let closed = CancellationToken::new();
        let cut_for = Arc::new(OnceLock::new());
        let counter = Arc::new(OnceLock::new());
        sessions.insert(
            session,
            LiveSession {
                handle,
                channels: channels.clone(),
                closed: closed.clone(),
                cut_for: cut_for.clone(),
                counter: counter.clone(),
            },
        );
        Ok(SessionSeat {
            board: self.clone(),
            order,
            session,
            channels,
            closed,
            cut_for,
            counter,
        })
    }

    /// What every metered live session has moved so far, to checkpoint into the ledger.
    pub fn checkpoints(&self) -> Vec<SessionCheckpoint> {
        let inner = lock(&self.inner);
        inner
            .orders
            .values()
            .flat_map(|sessions| sessions.iter())
            .filter_map(|(id, live)| {
                let counter = live.counter.get()?;
                Some(SessionCheckpoint {
                    session_id: id.to_string(),
                    bytes: counter.bytes(),
                    channels: counter.channels_opened(),
                })
            })
            .collect()
    }

    /// The orders that have at least one live session.
    pub fn orders(&self) -> Vec<OrderId> {
        lock(&self.inner).orders.keys().copied().collect()
    }

    /// How many sessions `order` has open.
    pub fn session_count(&self, order: OrderId) -> usize {
        lock(&self.inner).orders.get(&order).map_or(0, |s| s.len())
    }

    fn sessions_of(&self, order: Option<OrderId>) -> Vec<LiveSession> {
        let inner = lock(&self.inner);
        match order {
            Some(order) => inner
                .orders
                .get(&order)
                .map(|s| s.values().cloned().collect())
                .unwrap_or_default(),
            None => inner
                .orders
                .values()
                .flat_map(|s| s.values().cloned())
                .collect(),
        }
    }

    /// Writes one line on the stderr of every session channel of `order`.
    pub async fn notify(&self, order: OrderId, line: &str) {
        notify_all(&self.sessions_of(Some(order)), line).await;
    }

    /// Tells every session of `order` why, then closes them.
    pub async fn cut(&self, order: OrderId, why: &Refusal) {
        let sessions = self.sessions_of(Some(order));
        let line = why.to_string();
        tracing::info!(
            order = order.0,
            sessions = sessions.len(),
            reason = why.reason(),
            "cutting sessions: {line}"
        );
        cut_all(&sessions, why.reason(), &line).await;
    }

    /// Refuses new sessions from now on and cuts every live one with `line` (graceful shutdown).
    pub async fn close(&self, line: &str) {
        lock(&self.inner).closed = true;
        let reason = Refusal::ShuttingDown.reason();
        cut_all(&self.sessions_of(None), reason, line).await;
    }
}

/// How long a notice may wait for a session's connection to take it. A connection that is not
/// being read (a client upload held by flow control) is skipped rather than holding up every
/// other session and the caller.
const NOTICE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One notice as the user reads it on stderr.
pub fn stderr_line(line: &str) -> Bytes {
    Bytes::from(format!("\r\nshale: {line}\r\n"))
}

async fn notify_all(sessions: &[LiveSession], line: &str) {
    for s in sessions {
        let channels = lock(&s.channels).clone();
        for c in channels {
            // A session that went away meanwhile has nobody left to tell.
            let sent =
                tokio::time::timeout(NOTICE_WAIT, s.handle.extended_data(c, 1, stderr_line(line)))
                    .await;
            if sent.is_err() {
                tracing::debug!(channel = %c, "a session's connection did not take a notice in time");
            }
        }
    }
}

async fn cut_all(sessions: &[LiveSession], reason: &'static str, line: &str) {
    // First: pumps held for these sessions give up, so their connections move again and take
    // the reason and the close.
    for s in sessions {
        // The first cut's reason is the one the session ended for.
        let _ = s.cut_for.set(reason);
        s.closed.cancel();
    }
    notify_all(sessions, line).await;
    for s in sessions {
        let channels = lock(&s.channels).clone();
        for c in channels {
            let _ = s.handle.eof(c).await;
            let _ = s.handle.close(c).await;
        }
        let _ = s
            .handle
            .disconnect(Disconnect::ByApplication, line.to_string(), "en".into())
            .await;
    }
}
