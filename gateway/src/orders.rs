//! Order lookups for authentication: `moka` caches in front of the marketplace contract.
//!
//! Fresh entries answer without a chain call; chain events invalidate them, so a terminated order
//! is refused within seconds. When the chain cannot be reached, a cached order read at most
//! `stale_max` ago is still served (the caller re-checks expiry against the clock); anything
//! older, or unknown, is refused with a reason.
//!
//! What a stranger can make the gateway ask the chain is bounded: an id above the marketplace's
//! order count is refused from the cached count (read again at most once per `count_refresh`),
//! and "no such order" answers live in a cache of their own, so a flood of them never evicts the
//! orders that serve logins during an outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use shale_contracts::{ChainError, Marketplace, Order};
use tokio::sync::Mutex;

use crate::admission::Refusal;
use crate::login::OrderId;
use crate::metrics::{KindLabel, Metrics};

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
            times,
            lookups,
        }
    }

    /// The marketplace client this directory reads.
    pub fn market(&self) -> &Marketplace {
        &self.market
    }

    /// Whether `id` can be answered without a chain call: a fresh order, a remembered "no such
    /// order", or an id above the order count while the count is fresh.
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
        count.is_some_and(|c| id.0 > c.count && c.at.elapsed() < self.times.count_refresh)
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
    /// answer). While the count cannot be read it answers "no" (the order's own lookup decides,
    /// and during an outage refuses with the chain's unavailability, not as unknown), and asks
    /// again only once per `count_refresh`.
    async fn above_count(&self, id: OrderId) -> bool {
        let mut count = self.count.lock().await;
        if let Some(c) = *count {
            if id.0 <= c.count {
                return false;
            }
            if c.at.elapsed() < self.times.count_refresh {
                return c.fresh;
            }
        }
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
            c.count = c.count.max(id.0);
        }
    }
}
