//! Byte counters on the data path: one per channel, summed per session and per order.
//!
//! A pump adds to its own [`ChannelCounter`] with one relaxed atomic add per read or write: no
//! lock, no allocation, no shared cache line with other channels. Aggregation happens on the
//! reader's side, when the meter closes a tick or a session ends: [`SessionCounter::bytes`] and
//! [`OrderCounter::bytes`] take a registry lock and sum the live counters. Counters whose last
//! user has dropped them are folded into a retired total and forgotten, so an order's registry
//! holds only its open channels.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes moved in each direction, as seen from the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteCount {
    /// Client to container (uploads, keystrokes, stdin).
    pub bytes_in: u64,
    /// Container to client (downloads, output).
    pub bytes_out: u64,
}

impl ByteCount {
    /// Component-wise sum; byte totals wrap only after 16 EiB, which the meter treats as
    /// impossible and saturates rather than panicking on the data path.
    pub fn saturating_add(self, other: ByteCount) -> ByteCount {
        ByteCount {
            bytes_in: self.bytes_in.saturating_add(other.bytes_in),
            bytes_out: self.bytes_out.saturating_add(other.bytes_out),
        }
    }

    /// Component-wise difference; counters only grow, so `self >= earlier` holds for a later
    /// reading of the same counter.
    pub fn saturating_sub(self, earlier: ByteCount) -> ByteCount {
        ByteCount {
            bytes_in: self.bytes_in.saturating_sub(earlier.bytes_in),
            bytes_out: self.bytes_out.saturating_sub(earlier.bytes_out),
        }
    }
}

/// The byte counter of one SSH channel (shell, exec, sftp, port forward).
///
/// Aligned to a cache line so that pumps of different channels on different cores never
/// contend for the same line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct ChannelCounter {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl ChannelCounter {
    /// Counts `n` bytes from the client into the container.
    #[inline]
    pub fn add_in(&self, n: u64) {
        // Relaxed: the totals are only read as sums, and the final reading after the channel
        // is dropped is ordered by Arc's own release/acquire on the reference count.
        self.bytes_in.fetch_add(n, Relaxed);
    }

    /// Counts `n` bytes from the container to the client.
    #[inline]
    pub fn add_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }

    /// The bytes counted so far.
    pub fn bytes(&self) -> ByteCount {
        ByteCount {
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
        }
    }
}

/// Something that can be registered under a parent counter and folded away once unused.
trait Member: Sized {
    /// The bytes counted so far (live view).
    fn live_bytes(&self) -> ByteCount;
    /// Called with sole ownership: `Ok(final bytes)` if nothing under it is still live,
    /// otherwise gives itself back to stay registered.
    fn retire(self) -> Result<ByteCount, Self>;
}

impl Member for ChannelCounter {
    fn live_bytes(&self) -> ByteCount {
        self.bytes()
    }

    fn retire(self) -> Result<ByteCount, Self> {
        Ok(self.bytes())
    }
}

/// Live members plus the bytes of members that are gone.
#[derive(Debug)]
struct Registry<T> {
    live: Vec<Arc<T>>,
    retired: ByteCount,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            live: Vec::new(),
            retired: ByteCount::default(),
        }
    }
}

impl<T: Member> Registry<T> {
    /// Sums every member, folding those nobody else holds into `retired`.
    fn collect(&mut self) -> ByteCount {
        let capacity = self.live.len();
        let members = std::mem::replace(&mut self.live, Vec::with_capacity(capacity));
        let mut live = ByteCount::default();
        for member in members {
            // strong_count is only a hint; try_unwrap decides, with acquire ordering that makes
            // the dropped pump's last additions visible.
            let member = if Arc::strong_count(&member) == 1 {
                match Arc::try_unwrap(member) {
                    Ok(owned) => match owned.retire() {
                        Ok(bytes) => {
                            self.retired = self.retired.saturating_add(bytes);
                            continue;
                        }
                        Err(still_live) => Arc::new(still_live),
                    },
                    Err(shared) => shared,
                }
            } else {
                member
            };
            live = live.saturating_add(member.live_bytes());
            self.live.push(member);
        }
        self.retired.saturating_add(live)
    }
}

/// The counters of one SSH session: its channels, and how many it opened.
#[derive(Debug, Default)]
pub struct SessionCounter {
    channels: Mutex<Registry<ChannelCounter>>,
    opened: AtomicU64,
}

impl SessionCounter {
    /// A counter for a new channel of this session. The pump keeps the returned `Arc` (clone it
    /// for the two directions); when every clone is dropped the channel's bytes are retired
    /// into the session's total.
    pub fn open_channel(&self) -> Arc<ChannelCounter> {
        let counter = Arc::new(ChannelCounter::default());
        lock(&self.channels).live.push(Arc::clone(&counter));
        self.opened.fetch_add(1, Relaxed);
        counter
    }

    /// Bytes moved by all channels of the session so far, open or closed.
    pub fn bytes(&self) -> ByteCount {
        lock(&self.channels).collect()
    }

    /// How many channels the session has opened in total.
    pub fn channels_opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// How many channels are still open (their counters still held by a pump).
    pub fn channels_open(&self) -> usize {
        let mut reg = lock(&self.channels);
        reg.collect();
        reg.live.len()
    }
}

impl Member for SessionCounter {
    fn live_bytes(&self) -> ByteCount {
        self.bytes()
    }

    fn retire(self) -> Result<ByteCount, Self> {
        let mut reg = self
            .channels
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        let bytes = reg.collect();
        if reg.live.is_empty() {
            Ok(bytes)
        } else {
            // A pump still holds a channel of a session the gateway already dropped: keep it.
            Err(SessionCounter {
                channels: Mutex::new(reg),
                opened: self.opened,
            })
        }
    }
}

/// The counters of one order: every session, every channel, since the lease meter started.
#[derive(Debug, Default)]
pub struct OrderCounter {
    sessions: Mutex<Registry<SessionCounter>>,
}

impl OrderCounter {
    /// A counter for a new session of this order.
    pub fn open_session(&self) -> Arc<SessionCounter> {
        let counter = Arc::new(SessionCounter::default());
        lock(&self.sessions).live.push(Arc::clone(&counter));
        counter
    }

    /// Bytes moved by all sessions of the order so far.
    pub fn bytes(&self) -> ByteCount {
        lock(&self.sessions).collect()
    }

    /// Sessions whose counters are still held (open sessions, or channels still pumping).
    pub fn sessions_open(&self) -> usize {
        let mut reg = lock(&self.sessions);
        reg.collect();
        reg.live.len()
    }
}

/// Locks a registry; a panic elsewhere while holding it leaves plain integers behind, which
/// are still valid, so poisoning is ignored rather than spreading the panic to the meter.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_bytes_add_up_per_session_and_order_including_closed_ones() {
        let order = OrderCounter::default();
        let s1 = order.open_session();
        let c1 = s1.open_channel();
        let c2 = s1.open_channel();
        c1.add_in(10);
        c1.add_out(100);
        c2.add_out(5);
        let s2 = order.open_session();
        let c3 = s2.open_channel();
        c3.add_in(1);
        assert_eq!(
            s1.bytes(),
            ByteCount {
                bytes_in: 10,
                bytes_out: 105
            }
        );
        assert_eq!(
            order.bytes(),
            ByteCount {
                bytes_in: 11,
                bytes_out: 105
            }
        );

        drop(c1);
        assert_eq!(s1.channels_open(), 1);
        assert_eq!(s1.channels_opened(), 2);
        assert_eq!(
            s1.bytes(),
            ByteCount {
                bytes_in: 10,
                bytes_out: 105
            }
        );

        // A session dropped by the gateway while a pump still holds one of its channels keeps
        // counting that channel.
        drop(s1);
        c2.add_out(1);
        assert_eq!(order.sessions_open(), 2);
        assert_eq!(
            order.bytes(),
            ByteCount {
                bytes_in: 11,
                bytes_out: 106
            }
        );
        drop(c2);
        assert_eq!(
            order.bytes(),
            ByteCount {
                bytes_in: 11,
                bytes_out: 106
            }
        );
        assert_eq!(order.sessions_open(), 1);
        drop((s2, c3));
        assert_eq!(order.sessions_open(), 0);
        assert_eq!(
            order.bytes(),
            ByteCount {
                bytes_in: 11,
                bytes_out: 106
            }
        );
    }

    #[test]
    fn many_closed_channels_are_folded_without_losing_bytes() {
        let order = OrderCounter::default();
        let session = order.open_session();
        let mut kept = Vec::new();
        for i in 0..100u64 {
            let c = session.open_channel();
            c.add_in(i);
            c.add_out(2 * i);
            if i % 3 == 0 {
                kept.push(c);
            }
        }
        let expected = ByteCount {
            bytes_in: 4950,
            bytes_out: 9900,
        };
        assert_eq!(order.bytes(), expected);
        assert_eq!(session.channels_open(), kept.len());
        assert_eq!(session.channels_opened(), 100);
        drop(kept);
        assert_eq!(order.bytes(), expected);
        assert_eq!(session.channels_open(), 0);
    }

    #[test]
    fn counts_from_many_threads_are_all_seen_after_the_channels_close() {
        let order = Arc::new(OrderCounter::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let session = order.open_session();
                std::thread::spawn(move || {
                    let c = session.open_channel();
                    for _ in 0..10_000 {
                        c.add_in(3);
                        c.add_out(1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            order.bytes(),
            ByteCount {
                bytes_in: 120_000,
                bytes_out: 40_000
            }
        );
        assert_eq!(order.sessions_open(), 0);
    }
}
