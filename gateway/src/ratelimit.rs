//! Failed logins per client address, so that nobody can probe orders and keys at line rate.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

/// Counts failures per address over a sliding window (the entry's time to live).
#[derive(Clone)]
pub struct FailureLimiter {
    failures: Cache<IpAddr, Arc<AtomicU32>>,
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

    /// Whether `ip` has used up its failures.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        self.failures
            .get(&ip)
            .is_some_and(|n| n.load(Ordering::Relaxed) >= self.limit)
    }

    /// Records one failure from `ip`.
    pub fn record(&self, ip: IpAddr) {
        self.failures
            .get_with(ip, || Arc::new(AtomicU32::new(0)))
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
