//! Order lookups for authentication: a `moka` cache in front of the marketplace contract.
//!
//! Fresh entries answer without a chain call; chain events invalidate them, so a terminated order
//! is refused within seconds. When the chain cannot be reached, a cached order is still served (the
//! caller re-checks expiry against the clock), and an unknown one is refused with a reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use shale_contracts::{ChainError, Marketplace, Order};

use crate::admission::Refusal;
use crate::login::OrderId;

#[derive(Clone)]
enum Entry {
    Found { order: Arc<Order>, at: Instant },
    Missing { at: Instant },
}

/// Cached order lookups.
#[derive(Clone)]
pub struct OrderDirectory {
    market: Marketplace,
    cache: Cache<u64, Entry>,
    fresh_for: Duration,
    missing_for: Duration,
}

impl OrderDirectory {
    /// A directory over `market` that trusts an entry for `fresh_for` and a "no such order" answer
    /// for `missing_for`.
    pub fn new(market: Marketplace, fresh_for: Duration, missing_for: Duration) -> Self {
        Self {
            market,
            // Stale entries are kept (up to the capacity) as the fallback for a chain outage.
            cache: Cache::builder().max_capacity(100_000).build(),
            fresh_for,
            missing_for,
        }
    }

    /// The marketplace client this directory reads.
    pub fn market(&self) -> &Marketplace {
        &self.market
    }

    /// Reads order `id`, from the cache when fresh.
    pub async fn get(&self, id: OrderId) -> Result<Arc<Order>, Refusal> {
        let cached = self.cache.get(&id.0).await;
        match &cached {
            Some(Entry::Found { order, at }) if at.elapsed() < self.fresh_for => {
                return Ok(order.clone())
            }
            Some(Entry::Missing { at }) if at.elapsed() < self.missing_for => {
                return Err(Refusal::UnknownOrder(id))
            }
            _ => {}
        }
        match self.market.order(id.0).await {
            Ok(order) => {
                let order = Arc::new(order);
                self.cache
                    .insert(
                        id.0,
                        Entry::Found {
                            order: order.clone(),
                            at: Instant::now(),
                        },
                    )
                    .await;
                Ok(order)
            }
            Err(ChainError::OrderNotFound(_)) => {
                self.cache
                    .insert(id.0, Entry::Missing { at: Instant::now() })
                    .await;
                Err(Refusal::UnknownOrder(id))
            }
            Err(e) => match cached {
                Some(Entry::Found { order, .. }) => {
                    tracing::warn!(order = id.0, error = %e, "chain unreachable; serving the cached order");
                    Ok(order)
                }
                _ => {
                    tracing::warn!(order = id.0, error = %e, "chain unreachable and order not cached");
                    Err(Refusal::ChainUnavailable(id))
                }
            },
        }
    }

    /// Forgets what is cached for `id`, so the next lookup reads the chain.
    pub async fn invalidate(&self, id: OrderId) {
        self.cache.invalidate(&id.0).await;
    }
}
