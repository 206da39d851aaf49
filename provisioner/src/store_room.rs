//! Room on the image store's disk, checked before a pull writes anything: a pull never fills the
//! disk it shares with the ledger and the orders' volumes without a clear error first.

use std::path::PathBuf;

/// What a pull must leave free on the filesystem holding containerd's content store.
#[derive(Clone, Debug)]
pub(crate) struct StoreRoom {
    /// A directory on that filesystem (containerd's root).
    pub(crate) path: PathBuf,
    /// Bytes kept free beyond what the image needs.
    pub(crate) reserve: u64,
}

/// What unpacking costs beyond the compressed layers, as a multiple of them: layers are kept
/// compressed in the content store and unpacked into snapshots, which are usually about twice
/// their size.
const UNPACKED_FACTOR: u64 = 2;

impl StoreRoom {
    /// Whether an image whose manifest states `size` compressed bytes fits, leaving the reserve;
    /// why not, in words, otherwise. A store path that cannot be measured is not checked
    /// (containerd's own ENOSPC still stops a pull cleanly).
    pub(crate) fn check(&self, size: u64) -> Result<(), String> {
        let Ok(stat) = nix::sys::statvfs::statvfs(&self.path) else {
            return Ok(());
        };
        let free = stat.blocks_available().saturating_mul(stat.fragment_size());
        let needed = size.saturating_mul(1 + UNPACKED_FACTOR);
        if free >= needed.saturating_add(self.reserve) {
            return Ok(());
        }
        Err(format!(
            "{} has {} MiB free; the image needs about {} MiB unpacked and {} MiB stay free",
            self.path.display(),
            free >> 20,
            needed >> 20,
            self.reserve >> 20
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_that_would_eat_the_reserve_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let room = StoreRoom {
            path: dir.path().to_path_buf(),
            reserve: 0,
        };
        assert_eq!(room.check(1), Ok(()));
        let why = room.check(u64::MAX / 4).unwrap_err();
        assert!(why.contains("MiB free"), "{why}");
        let unmeasurable = StoreRoom {
            path: "/nonexistent/containerd".into(),
            reserve: u64::MAX,
        };
        assert_eq!(unmeasurable.check(1), Ok(()));
    }
}
