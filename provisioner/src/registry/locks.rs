//! Async locks by name: one pull per reference and one transfer per blob at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Async locks by name, created on first use and dropped when nobody holds or waits for one.
#[derive(Default)]
pub(super) struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

pub(super) struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub(super) async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let lock = self
            .0
            .lock()
            .expect("pull lock map poisoned")
            .entry(key.to_string())
            .or_default()
            .clone();
        KeyedGuard {
            locks: self,
            key: key.to_string(),
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.0.lock().expect("pull lock map poisoned");
        drop(self.guard.take());
        // The map's reference is the last one: nobody else waits, forget the key.
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn keyed_locks_serialize_one_key_and_forget_it_afterwards() {
        let locks = KeyedLocks::default();
        let a = locks.lock("k").await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), locks.lock("k")).await;
        assert!(waiting.is_err(), "a second holder of one key must wait");
        let other = tokio::time::timeout(Duration::from_millis(50), locks.lock("j")).await;
        assert!(other.is_ok(), "another key is free");
        drop(other);
        drop(a);
        assert!(locks.0.lock().unwrap().is_empty());
    }
}
