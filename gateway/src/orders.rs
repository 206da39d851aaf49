//! Order lookups for authentication: `moka` caches in front of the marketplace contract.
//!
//! Fresh entries answer without a chain call; chain events invalidate them, so a terminated order
//! is refused within seconds. When the chain cannot be reached, a cached order read at most
//! `stale_max` ago is still served (the caller re-checks expiry against the clock); anything
//! older, or unknown, is refused with a reason.
//!
//! What a stranger can make the gateway ask the chain is bounded: an id above the marketplace's
//! order count is refused from the cached count (read again at most once per `count_refresh`;
//! an id just above it waits for that read, as it may be an order placed since),
//! and "no such order" answers live in a cache of their own, so a flood of them never evicts the
//! orders that serve logins during an outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use shale_contracts::{ChainError, Marketplace, Order};
use tokio::sync::{Mutex, Notify};

use crate::admission::Refusal;
use crate::login::OrderId;
use crate::metrics::{KindLabel, Metrics};

/// How far above the cached order count an id may be and still wait for the count's next read
/// rather than be refused from the cache: the orders placed within one `count_refresh`. Ids
/// further above (a stranger's guesses) are refused at once; the count is read no more often.
pub(crate) const JUST_PLACED: u64 = 64;

#[derive(Clone)]
struct Found {
    order: Arc<Order>,
    at: Instant,
}

/// The marketplace's order count as last read.
#[derive(Clone, Copy)]
struct Count {
    count: u64,
    at: Instant,
    /// False when the last read failed: then `count` is only what an earlier read said, and an
    /// id above it may be an order placed since, so it is not called unknown.
    fresh: bool,
}

/// How long an order is trusted, and how often what is bounded.
#[derive(Debug, Clone, Copy)]
pub struct DirectoryTimes {
    /// A chain read is trusted without re-reading for this long.
    pub fresh_for: Duration,
    /// "No such order" is remembered for this long.
    pub missing_for: Duration,
    /// The oldest read still served while the chain is unreachable.
    pub stale_max: Duration,
    /// The order count is read again at most this often.
    pub count_refresh: Duration,
}

/// Cached order lookups.
#[derive(Clone)]
pub struct OrderDirectory {
    market: Marketplace,
    found: Cache<u64, Found>,
    missing: Cache<u64, Instant>,
    count: Arc<Mutex<Option<Count>>>,
    /// Woken when an event raises the count, for lookups waiting on an id just above it.
    count_raised: Arc<Notify>,
    times: DirectoryTimes,
    lookups: Family<KindLabel, Counter>,
}

impl OrderDirectory {
    /// A directory over `market`; every chain call it makes is counted on `lookups` by kind.
    pub fn new(
        market: Marketplace,
        times: DirectoryTimes,
        lookups: Family<KindLabel, Counter>,
    ) -> Self {
        Self {
            market,
            // Stale entries are kept up to `stale_max` (and the capacity) as the fallback for a
            // chain outage.
            found: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(times.stale_max.max(times.fresh_for))
                .build(),
            missing: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(times.missing_for.max(Duration::from_millis(1)))
                .build(),
            count: Arc::default(),
            count_raised: Arc::default(),
            times,
            lookups,
        }
    }

    /// The marketplace client this directory reads.
    pub fn market(&self) -> &Marketplace {
        &self.market
    }

    /// Whether `id` can be answered without a chain call: a fresh order, a remembered "no such
    /// order", or an id far above the order count while the count is fresh.
    pub async fn answers_from_cache(&self, id: OrderId) -> bool {
        if let Some(found) = self.found.get(&id.0).await {
            if found.at.elapsed() < self.times.fresh_for {
                return true;
            }
        }
        if self.missing.get(&id.0).await.is_some() {
            return true;
        }
        let count = *self.count.lock().await;
        count.is_some_and(|c| {
            id.0 > c.count.saturating_add(JUST_PLACED) && c.at.elapsed() < self.times.count_refresh
        })
    }

    /// Reads order `id`, from the cache when fresh.
    pub async fn get(&self, id: OrderId) -> Result<Arc<Order>, Refusal> {
        self.lookup(id, false).await
    }

    /// Reads order `id` from the chain now, keeping what is cached as the fallback if the chain
    /// cannot be reached (unlike [`invalidate`](Self::invalidate), which forgets it).
    pub async fn reread(&self, id: OrderId) -> Result<Arc<Order>, Refusal> {
        self.lookup(id, true).await
    }

    async fn lookup(&self, id: OrderId, force: bool) -> Result<Arc<Order>, Refusal> {
        let cached = self.found.get(&id.0).await;
        if let Some(found) = &cached {
            if !force && found.at.elapsed() < self.times.fresh_for {
                return Ok(found.order.clone());
            }
        }
        if self.missing.get(&id.0).await.is_some() {
            return Err(Refusal::UnknownOrder(id));
        }
        if cached.is_none() && self.above_count(id).await {
            return Err(Refusal::UnknownOrder(id));
        }
        Metrics::count(&self.lookups, "order");
        match self.market.order(id.0).await {
            Ok(order) => {
                let order = Arc::new(order);
                self.found
                    .insert(
                        id.0,
                        Found {
                            order: order.clone(),
                            at: Instant::now(),
                        },
                    )
                    .await;
                Ok(order)
            }
            Err(ChainError::OrderNotFound(_)) => {
                self.missing.insert(id.0, Instant::now()).await;
                Err(Refusal::UnknownOrder(id))
            }
            Err(e) => match cached {
                Some(found) if found.at.elapsed() < self.times.stale_max => {
                    tracing::warn!(order = id.0, error = %e, age_secs = found.at.elapsed().as_secs(), "chain unreachable; serving the cached order");
                    Ok(found.order)
                }
                Some(_) => {
                    tracing::warn!(order = id.0, error = %e, "chain unreachable and the cached order is too old to serve");
                    Err(Refusal::ChainUnavailable(id))
                }
                None => {
                    tracing::warn!(order = id.0, error = %e, "chain unreachable and order not cached");
                    Err(Refusal::ChainUnavailable(id))
                }
            },
        }
    }

    /// Whether `id` is above the marketplace's order count, reading the count again when the
    /// cached one is older than `count_refresh` (one reader at a time; the others wait for its
    /// answer). An id just above a fresh count (within [`JUST_PLACED`]) may be an order placed
    /// since, whose event has not arrived: it waits for that event or the count's next read,
    /// whichever comes first, instead of being called unknown, so a client who logs in right
    /// after placing an order gets in. While the count cannot be read it answers "no" (the
    /// order's own lookup decides, and during an outage refuses with the chain's unavailability,
    /// not as unknown), and asks again only once per `count_refresh`.
    async fn above_count(&self, id: OrderId) -> bool {
        let mut waited = false;
        let mut count = loop {
            let count = self.count.lock().await;
            let Some(c) = *count else { break count };
            if id.0 <= c.count {
                return false;
            }
            let due = c.at + self.times.count_refresh;
            if Instant::now() >= due {
                break count;
            }
            if waited || !c.fresh || id.0 > c.count.saturating_add(JUST_PLACED) {
                return c.fresh;
            }
            // Not under the lock: lookups of other ids go on meanwhile. The order's own event
            // (see `invalidate`) usually comes before the next read is due.
            let raised = self.count_raised.notified();
            drop(count);
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => waited = true,
                () = raised => {}
            }
        };
        Metrics::count(&self.lookups, "order_count");
        match self.market.order_count().await {
            Ok(n) => {
                *count = Some(Count {
                    count: n,
                    at: Instant::now(),
                    fresh: true,
                });
                id.0 > n
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the order count");
                // Keep the last count, marked stale, for another period rather than ask again
                // at once.
                *count = Some(Count {
                    count: (*count).map_or(0, |c| c.count),
                    at: Instant::now(),
                    fresh: false,
                });
                false
            }
        }
    }

    /// Forgets what is cached for `id`, so the next lookup reads the chain. An event naming
    /// `id` also proves the order count reached it: a new order is not refused as above it.
    pub async fn invalidate(&self, id: OrderId) {
        self.found.invalidate(&id.0).await;
        self.missing.invalidate(&id.0).await;
        if let Some(c) = self.count.lock().await.as_mut() {
            if id.0 > c.count {
                c.count = id.0;
                self.count_raised.notify_waiters();
            }
        }
    }
}
