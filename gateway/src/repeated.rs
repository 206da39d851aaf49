//! Failures that repeat every poll (containerd down, the network unreadable), logged without
//! flooding: once when they start, then at most once per [`REMIND_EVERY`] with how often they
//! recurred, and once when they end.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often a failure that goes on is logged again.
pub const REMIND_EVERY: Duration = Duration::from_secs(60);

/// One kind of repeating failure of one poll loop.
#[derive(Debug)]
pub struct RepeatedFailure {
    what: &'static str,
    /// When it started, when it was last logged, and how often it failed since then.
    ongoing: Option<(Instant, Instant, u64)>,
}

impl RepeatedFailure {
    /// A failure described as `what` (e.g. "cannot list the orders' containers").
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            ongoing: None,
        }
    }

    /// This poll failed with `error`; returns whether it was logged.
    pub fn failed(&mut self, error: &dyn Display) -> bool {
        let now = Instant::now();
        match &mut self.ongoing {
            None => {
                tracing::warn!(error = %error, "{}", self.what);
                self.ongoing = Some((now, now, 0));
                true
            }
            Some((since, logged, count)) => {
                *count += 1;
                if now.duration_since(*logged) < REMIND_EVERY {
                    return false;
                }
                tracing::warn!(
                    error = %error,
                    failures = *count,
                    for_secs = now.duration_since(*since).as_secs(),
                    "{} (still)",
                    self.what
                );
                *logged = now;
                *count = 0;
                true
            }
        }
    }

    /// This poll succeeded: a failure that was going on is logged as over.
    pub fn succeeded(&mut self) {
        if let Some((since, _, _)) = self.ongoing.take() {
            tracing::info!(
                after_secs = since.elapsed().as_secs(),
                "recovered: no longer {}",
                self.what.trim_start_matches("cannot ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_logged_once_until_a_reminder_is_due_and_again_after_it_recovers() {
        let mut f = RepeatedFailure::new("cannot list the orders' containers");
        assert!(f.failed(&"refused"));
        for _ in 0..100 {
            assert!(!f.failed(&"refused"), "every 500 ms would flood the log");
        }
        f.succeeded();
        assert!(f.failed(&"refused"), "a new outage is logged at once");
    }
}
