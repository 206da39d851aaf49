//! Failed logins per client source (an IPv4 address or an IPv6 /64), so that nobody can make the
//! gateway probe the chain at line rate. A source past its limit is not locked out: it is only
//! kept from what costs (chain lookups); a login the cache can check, the order's own key on an
//! order the gateway knows, still gets in, so a customer behind the same NAT as a prober is
//! never refused for someone else's failures.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::preauth::SourceKey;

/// Counts failures per source over a sliding window (the entry's time to live).
#[derive(Clone)]
pub struct FailureLimiter {
    failures: Cache<SourceKey, Arc<AtomicU32>>,
    limit: u32,
}

impl FailureLimiter {
    /// Allows `limit` failures per address within `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            failures: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(window)
                .build(),
            limit,
        }
    }

    /// Whether `ip`'s source has used up its failures.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.failures
            .get(&SourceKey::of(ip))
            .is_some_and(|n| n.load(Ordering::Relaxed) >= self.limit)
    }

    /// Records one failure from `ip`'s source.
    pub fn record(&self, ip: IpAddr) {
        self.failures
            .get_with(SourceKey::of(ip), || Arc::new(AtomicU32::new(0)))
            .fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_after_the_limit_and_others_are_not() {
        let limiter = FailureLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            limiter.record(a);
        }
        assert!(!limiter.is_blocked(a));
        limiter.record(a);
        assert!(limiter.is_blocked(a));
        assert!(!limiter.is_blocked(b));
        // One IPv6 /64 is one source.
        limiter.record("2001:db8::1".parse().unwrap());
        assert!(!limiter.is_blocked("2001:db8::2".parse().unwrap()));
        for _ in 0..2 {
            limiter.record("2001:db8::3".parse().unwrap());
        }
        assert!(limiter.is_blocked("2001:db8::ffff".parse().unwrap()));
        assert!(!limiter.is_blocked("2001:db8:0:1::1".parse().unwrap()));
    }

    #[test]
    fn the_window_forgets_old_failures() {
        let limiter = FailureLimiter::new(1, Duration::from_millis(50));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        limiter.record(a);
        assert!(limiter.is_blocked(a));
        std::thread::sleep(Duration::from_millis(120));
        limiter.failures.run_pending_tasks();
        assert!(!limiter.is_blocked(a));
    }
}
