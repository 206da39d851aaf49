//! Each order's user namespace: a host uid/gid range of its own, and a namespace file for it.
//!
//! Order processes are uid 0 inside and `host_base ..+ 65536` outside. Ranges are slots above
//! `ProvisionerConfig::uid_base`; the slot an order holds is a label on its container, so the
//! allocator has no state of its own to lose: a restarted gateway reads the labels, and deleting
//! the container frees the range. Allocation is serialized in-process and across processes (a
//! lock file under `/run/lock`) and looks at the containers of every containerd namespace, so
//! two provisioners on one daemon never share one.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::OwnedFd;

use nix::fcntl::{Flock, FlockArg};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;

use crate::{ProvisionError, ProvisionerConfig};

/// Host ids per order: a whole 16-bit id space, so every uid an image uses maps.
pub const RANGE_SIZE: u32 = 65536;

/// The host ids an order's namespace maps its ids `0 ..size` to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct IdRange {
    /// The host uid (and gid) of the order's root.
    pub host_base: u32,
    /// How many ids are mapped.
    pub size: u32,
}

impl IdRange {
    /// The range that starts at `host_base`, as read back from a container label.
    pub fn at(host_base: u32) -> Self {
        IdRange {
            host_base,
            size: RANGE_SIZE,
        }
    }

    /// The host id of id `inner` in the namespace.
    pub fn host_id(&self, inner: u32) -> u32 {
        self.host_base + inner
    }
}

/// Serializes allocations in this process: the label that marks a range as taken is written
/// only when the container is created, so allocation and creation happen under this lock.
static ALLOCATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The host-wide lock file that serializes allocations between processes (two gateways, or a
/// gateway and `shale dev`, on one containerd).
const HOST_LOCK: &str = "/run/lock/shale-uid-ranges.lock";

/// Held while a range is picked and the container that records it is created.
pub(crate) struct AllocationGuard {
    _process: tokio::sync::MutexGuard<'static, ()>,
    _host: Flock<File>,
}

/// Takes the in-process lock, then the host-wide one (waiting for another process if need be).
pub(crate) async fn lock_allocation() -> Result<AllocationGuard, ProvisionError> {
    let process = ALLOCATION.lock().await;
    let host = tokio::task::spawn_blocking(|| {
        let path = std::path::Path::new(HOST_LOCK);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ProvisionError::io("create", dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ProvisionError::io("open", path, e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| ProvisionError::io("lock", path, e.into()))
    })
    .await
    .map_err(|e| ProvisionError::Runtime {
        action: "lock the uid ranges".into(),
        status: e.to_string(),
    })??;
    Ok(AllocationGuard {
        _process: process,
        _host: host,
    })
}

/// Checks that the configured span is usable: above the ids of every system and human account,
/// inside `u32`, and free of every account in `/etc/passwd` and `/etc/group`.
pub(crate) fn check_span(config: &ProvisionerConfig) -> Result<(), ProvisionError> {
    let bad = |why: String| ProvisionError::Config(format!("uid_base/uid_ranges: {why}"));
    if config.uid_ranges == 0 {
        return Err(bad("uid_ranges must be at least 1".into()));
    }
    // 65536 and below hold every account a distribution creates, and the overflow ids.
    if config.uid_base <= 65536 {
        return Err(bad(format!(
            "uid_base {} is inside the range of host accounts; use at least 65537",
            config.uid_base
        )));
    }
    let end = u64::from(config.uid_base) + u64::from(config.uid_ranges) * u64::from(RANGE_SIZE);
    // u32::MAX itself is the invalid id (-1).
    if end > u64::from(u32::MAX) {
        return Err(bad(format!(
            "{} ranges from {} run past the last valid id",
            config.uid_ranges, config.uid_base
        )));
    }
    for file in ["/etc/passwd", "/etc/group"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines() {
            let id = line.split(':').nth(2).and_then(|f| f.parse::<u64>().ok());
            if let Some(id) = id.filter(|id| (u64::from(config.uid_base)..end).contains(id)) {
                let name = line.split(':').next().unwrap_or("");
                return Err(bad(format!(
                    "the host account {name:?} in {file} has id {id}, inside the span given to orders"
                )));
            }
        }
    }
    Ok(())
}

/// The lowest free range, given the bases already taken.
pub(crate) fn pick(config: &ProvisionerConfig, taken: &BTreeSet<u32>) -> Option<IdRange> {
    (0..config.uid_ranges)
        .map(|slot| config.uid_base + slot * RANGE_SIZE)
        .find(|base| !taken.contains(base))
        .map(IdRange::at)
}

/// A user namespace with `ids` as its uid and gid map, held open as a file.
///
/// A child is cloned into a new user namespace and parked; the maps are written from here (root
/// in the parent namespace may write any map), the namespace file is opened, and the child is
/// killed: the open file keeps the namespace alive for as long as it is needed.
pub(crate) fn namespace_for(ids: IdRange) -> Result<OwnedFd, ProvisionError> {
    let io =
        |what: &'static str, e: std::io::Error| ProvisionError::io(what, "a user namespace", e);
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: without CLONE_VM the child has its own copy of memory and only calls pause(2),
    // which touches no lock or allocator that another thread could have held at the clone.
    let child = unsafe {
        nix::sched::clone(
            Box::new(|| -> isize {
                loop {
                    nix::unistd::pause();
                }
            }),
            &mut stack,
            CloneFlags::CLONE_NEWUSER,
            Some(Signal::SIGCHLD as i32),
        )
    }
    .map_err(|e| io("create", e.into()))?;
    let result = (|| {
        let map = format!("0 {} {}\n", ids.host_base, ids.size);
        std::fs::write(format!("/proc/{child}/uid_map"), &map)
            .map_err(|e| io("write the uid map of", e))?;
        std::fs::write(format!("/proc/{child}/gid_map"), &map)
            .map_err(|e| io("write the gid map of", e))?;
        let ns = File::open(format!("/proc/{child}/ns/user")).map_err(|e| io("open", e))?;
        Ok(OwnedFd::from(ns))
    })();
    let _ = kill(child, Signal::SIGKILL);
    let _ = waitpid(child, None);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_the_lowest_free_slots_and_run_out() {
        let config = ProvisionerConfig {
            uid_base: 1 << 30,
            uid_ranges: 3,
            ..Default::default()
        };
        let mut taken = BTreeSet::new();
        let first = pick(&config, &taken).unwrap();
        assert_eq!(first, IdRange::at(1 << 30));
        taken.insert(first.host_base);
        taken.insert((1 << 30) + 2 * RANGE_SIZE);
        assert_eq!(
            pick(&config, &taken).unwrap().host_base,
            (1 << 30) + RANGE_SIZE
        );
        taken.insert((1 << 30) + RANGE_SIZE);
        assert_eq!(pick(&config, &taken), None);
    }

    #[test]
    fn a_span_over_host_accounts_or_past_u32_is_refused() {
        let low = ProvisionerConfig {
            uid_base: 1000,
            ..Default::default()
        };
        assert!(check_span(&low).is_err());
        let high = ProvisionerConfig {
            uid_base: u32::MAX - RANGE_SIZE,
            uid_ranges: 2,
            ..Default::default()
        };
        assert!(check_span(&high).is_err());
        assert!(check_span(&ProvisionerConfig::default()).is_ok());
    }

    #[tokio::test]
    async fn another_process_waits_for_the_host_lock() {
        let held = lock_allocation().await.expect("lock");
        // A second open file description is what another process would hold.
        let other = std::fs::OpenOptions::new()
            .write(true)
            .open(HOST_LOCK)
            .unwrap();
        let other = match Flock::lock(other, FlockArg::LockExclusiveNonblock) {
            Ok(_) => panic!("the lock was taken twice"),
            Err((file, e)) => {
                assert_eq!(e, nix::errno::Errno::EWOULDBLOCK);
                file
            }
        };
        drop(held);
        assert!(Flock::lock(other, FlockArg::LockExclusiveNonblock).is_ok());
    }

    #[test]
    fn the_namespace_maps_root_to_the_range() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: writing another namespace's id map needs root");
            assert!(std::env::var("CI").is_err(), "CI runs as root");
            return;
        }
        let ns = namespace_for(IdRange::at(3 << 30)).expect("user namespace");
        // The map is readable through any process in it; the fd itself proves the namespace lives.
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&ns)
        ))
        .unwrap();
        assert!(link.to_string_lossy().starts_with("user:["), "{link:?}");
    }
}
