//! The client's own count of an order's bytes on the wire, kept on disk so that no crash or
//! reboot loses any.
//!
//! The tunnel reserves bytes in steps and makes each reservation durable (written and
//! fsynced) before it relays them, so the file is always at or above what really went
//! through; a clean exit hands back what it reserved and did not use. A crash therefore costs
//! the client at most one step per direction in the provider's favour, and never counts less
//! than was sent, so an honest provider's totals are always at or below the file's.
//! Several tunnels of one order (several `ssh` sessions) share the file under a lock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Bytes of one order on the wire, as the client's tunnel relayed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireTotals {
    /// Client to provider (what the provider meters as bytes in).
    pub up: u64,
    /// Provider to client (bytes out).
    pub down: u64,
}

/// Which way bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

/// The counts file of one order.
#[derive(Clone, Debug)]
pub struct WireCounts {
    path: PathBuf,
}

impl WireCounts {
    /// The counts kept at `path` (created on first use, mode 0600).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        WireCounts { path: path.into() }
    }

    /// Where they are kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The totals now; zero when nothing was counted yet.
    pub fn read(&self) -> anyhow::Result<WireTotals> {
        let _lock = self.lock()?;
        self.read_unlocked()
    }

    /// Starts the count again from zero, for a new order under this name.
    pub fn reset(&self) -> anyhow::Result<()> {
        self.update(|t| *t = WireTotals::default()).map(|_| ())
    }

    fn read_unlocked(&self) -> anyhow::Result<WireTotals> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a wire count", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(WireTotals::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    fn lock(&self) -> anyhow::Result<File> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock_path = self.path.with_extension("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        f.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
        Ok(f)
    }

    /// Applies `change` under the lock and makes the result durable before returning it.
    fn update(&self, change: impl FnOnce(&mut WireTotals)) -> anyhow::Result<WireTotals> {
        let _lock = self.lock()?;
        let mut totals = self.read_unlocked()?;
        change(&mut totals);
        let tmp = self.path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string(&totals)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        if let Some(dir) = self.path.parent() {
            // The rename itself must survive a power cut.
            File::open(dir).and_then(|d| d.sync_all()).ok();
        }
        Ok(totals)
    }
}

/// Bytes one tunnel has counted in the file ahead of relaying them.
#[derive(Debug)]
pub struct Reservation {
    counts: WireCounts,
    step: u64,
    up_left: u64,
    down_left: u64,
}

impl Reservation {
    /// Reserves in steps of `step` bytes from `counts`.
    pub fn new(counts: WireCounts, step: u64) -> Self {
        Reservation {
            counts,
            step: step.max(1),
            up_left: 0,
            down_left: 0,
        }
    }

    /// Counts `n` bytes about to be relayed `dir`; returns only once they are durable.
    pub fn charge(&mut self, dir: Direction, n: u64) -> anyhow::Result<()> {
        let step = self.step;
        let left = match dir {
            Direction::Up => &mut self.up_left,
            Direction::Down => &mut self.down_left,
        };
        if *left < n {
            let more = step.max(n - *left);
            self.counts.update(|t| match dir {
                Direction::Up => t.up = t.up.saturating_add(more),
                Direction::Down => t.down = t.down.saturating_add(more),
            })?;
            *left += more;
        }
        *left -= n;
        Ok(())
    }

    /// Hands back what was reserved and not relayed, leaving the exact count.
    pub fn release(&mut self) -> anyhow::Result<WireTotals> {
        let (up, down) = (self.up_left, self.down_left);
        self.up_left = 0;
        self.down_left = 0;
        self.counts.update(|t| {
            t.up = t.up.saturating_sub(up);
            t.down = t.down.saturating_sub(down);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_never_below_what_was_relayed_and_exact_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let counts = WireCounts::at(dir.path().join("o7.json"));
        let mut r = Reservation::new(counts.clone(), 1000);
        let mut sent = WireTotals::default();
        for n in [1u64, 999, 1, 5000, 17, 0, 4000] {
            r.charge(Direction::Up, n).unwrap();
            sent.up += n;
            r.charge(Direction::Down, n * 2).unwrap();
            sent.down += n * 2;
            let on_disk = counts.read().unwrap();
            assert!(on_disk.up >= sent.up && on_disk.down >= sent.down);
            assert!(on_disk.up - sent.up <= 5000 && on_disk.down - sent.down <= 10000);
        }
        assert_eq!(r.release().unwrap(), sent);
        assert_eq!(counts.read().unwrap(), sent);
    }

    #[test]
    fn two_tunnels_of_one_order_add_up_and_a_crash_only_over_counts() {
        let dir = tempfile::tempdir().unwrap();
        let counts = WireCounts::at(dir.path().join("o8.json"));
        let mut a = Reservation::new(counts.clone(), 64);
        let mut b = Reservation::new(counts.clone(), 64);
        a.charge(Direction::Up, 10).unwrap();
        b.charge(Direction::Up, 20).unwrap();
        a.release().unwrap();
        // b "crashes": its reservation stays counted.
        drop(b);
        let t = counts.read().unwrap();
        assert!(t.up >= 30 && t.up <= 10 + 64);
        counts.reset().unwrap();
        assert_eq!(counts.read().unwrap(), WireTotals::default());
    }
}
