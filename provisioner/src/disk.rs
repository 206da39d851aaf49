//! An order's disk: an ext4 filesystem of the ordered size in a file of its own, loop-mounted
//! on the host, holding everything the order can write that lives on disk: the writable layer
//! of its root filesystem (`upper/`, with overlayfs's `work/`) and `/work` (`home/`).
//!
//! Why a filesystem image: it bounds every byte the order writes, whatever the host's
//! filesystem is (ext4 here, where neither project quotas on overlayfs nor a sized snapshotter
//! exist in containerd 1.6), it is a real filesystem, so `df` inside shows the order's size and
//! writing past it fails with ENOSPC inside while the host and other orders keep writing, and
//! release is one unmount and one unlink. The file is fully allocated (`fallocate`), so the SP's
//! disk can never be overcommitted by orders writing what they bought.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;
use tracing::{debug, info};

use crate::userns::IdRange;
use crate::ProvisionError;

/// Below this an ext4 with a journal and a Debian image's upper layer does not fit.
pub const MIN_DISK_BYTES: u64 = 32 << 20;

/// Where one order's disk lives on the host.
#[derive(Clone, Debug)]
pub(crate) struct Disk {
    /// The filesystem image.
    pub image: PathBuf,
    /// Its mount point.
    pub mount: PathBuf,
}

impl Disk {
    pub(crate) fn at(disks_dir: &Path, id: &str) -> Self {
        Disk {
            image: disks_dir.join(format!("{id}.ext4")),
            mount: disks_dir.join(id),
        }
    }

    /// The overlay's upper layer: the order's changes to the image.
    pub(crate) fn upper(&self) -> PathBuf {
        self.mount.join("upper")
    }

    /// overlayfs's work directory, on the same filesystem as the upper layer.
    pub(crate) fn overlay_work(&self) -> PathBuf {
        self.mount.join("work")
    }

    /// The order's home, mounted at `/work`.
    pub(crate) fn home(&self) -> PathBuf {
        self.mount.join("home")
    }

    /// Makes the filesystem (once), mounts it (after a reboot too), and gives the order's root
    /// its upper layer and home. Idempotent.
    pub(crate) async fn ensure(
        &self,
        bytes: u64,
        ids: IdRange,
        home_owner: (u32, u32),
    ) -> Result<(), ProvisionError> {
        if !self.image.exists() {
            self.create(bytes).await?;
        }
        if !is_mount_point(&self.mount)? {
            std::fs::create_dir_all(&self.mount)
                .map_err(|e| ProvisionError::io("create", &self.mount, e))?;
            run(
                Command::new("mount")
                    .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
                    .arg(&self.image)
                    .arg(&self.mount),
                "mount the order's disk",
            )
            .await?;
        }
        let root = (ids.host_id(0), ids.host_id(0));
        let home = (ids.host_id(home_owner.0), ids.host_id(home_owner.1));
        for (dir, (uid, gid), mode) in [
            // The upper layer's root is the container's `/`: owned by its root, like the image's.
            (self.upper(), root, 0o755),
            (self.overlay_work(), (0, 0), 0o700),
            (self.home(), home, 0o700),
        ] {
            if !dir.exists() {
                std::fs::create_dir(&dir).map_err(|e| ProvisionError::io("create", &dir, e))?;
                nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into()))
                    .map_err(|e| ProvisionError::io("give the order", &dir, e.into()))?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| ProvisionError::io("set permissions on", &dir, e))?;
            }
        }
        Ok(())
    }

    async fn create(&self, bytes: u64) -> Result<(), ProvisionError> {
        let started = std::time::Instant::now();
        let layout = Layout::for_ordered(bytes);
        let partial = self.image.with_extension("partial");
        let file = std::fs::File::create(&partial)
            .map_err(|e| ProvisionError::io("create", &partial, e))?;
        let len = i64::try_from(layout.image_bytes).unwrap_or(i64::MAX);
        // Reserved, not sparse: the host's free space cannot be promised twice.
        nix::fcntl::fallocate(&file, nix::fcntl::FallocateFlags::empty(), 0, len).map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            if e == nix::errno::Errno::ENOSPC {
                ProvisionError::AtCapacity(format!(
                    "the host has no room for a {} MiB disk",
                    bytes >> 20
                ))
            } else {
                ProvisionError::io("reserve space for", &partial, e.into())
            }
        })?;
        drop(file);
        // No reserved blocks (the order is the only user), one inode per 16 KiB as ext4's
        // default, and nothing discarded: the blocks were just allocated.
        let made = run(
            Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-E",
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                ])
                .arg(&partial),
            "make the order's filesystem",
        )
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        // Renamed only when complete, so a crash never leaves a half-made disk that looks whole.
        std::fs::rename(&partial, &self.image)
            .map_err(|e| ProvisionError::io("rename", &partial, e))?;
        info!(
            mib = bytes >> 20,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "disk created"
        );
        Ok(())
    }

    /// Unmounts and deletes the disk; a disk that is not there is not an error.
    pub(crate) async fn remove(&self) -> Result<(), ProvisionError> {
        if is_mount_point(&self.mount).unwrap_or(false) {
            run(
                Command::new("umount").arg(&self.mount),
                "unmount the order's disk",
            )
            .await?;
        }
        for path in [&self.image, &self.image.with_extension("partial")] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ProvisionError::io("remove", path, e)),
            }
        }
        match std::fs::remove_dir(&self.mount) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ProvisionError::io("remove", &self.mount, e)),
        }
    }
}

/// The filesystem image for an ordered size: ext4's own bookkeeping (journal, inode tables,
/// bitmaps and group descriptors) comes on top, so that `df` inside shows what the order bought.
/// The SP's disk holds the image, so it reserves a little more than it sells (about 2.5% at
/// 20 GiB, 10% at 64 MiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    image_bytes: u64,
    journal_mib: u64,
}

impl Layout {
    fn for_ordered(bytes: u64) -> Self {
        let mib = bytes.div_ceil(1 << 20);
        // mke2fs's own rule of thumb, bounded: 4 MiB for small disks, at most 256 MiB.
        let journal_mib = (mib / 128).clamp(4, 256);
        // 256-byte inodes, one per 16 KiB: 1/64; bitmaps, descriptors, reserved GDT: under
        // 1/256; and a few MiB that small filesystems spend whatever their size.
        let overhead_mib = mib / 64 + mib / 256 + journal_mib + 5;
        Layout {
            image_bytes: (mib + overhead_mib) << 20,
            journal_mib,
        }
    }
}

/// Whether `path` is the root of a mount: it sits on another device than its parent.
fn is_mount_point(path: &Path) -> Result<bool, ProvisionError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata(path) else {
        return Ok(false);
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    let up = std::fs::metadata(parent).map_err(|e| ProvisionError::io("inspect", parent, e))?;
    Ok(me.dev() != up.dev())
}

async fn run(cmd: &mut Command, action: &str) -> Result<(), ProvisionError> {
    debug!(?cmd, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| ProvisionError::Runtime {
            action: action.into(),
            status: format!("cannot run {cmd:?}: {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ProvisionError::Runtime {
            action: action.into(),
            status: format!(
                "{:?} exited with {}: {}",
                cmd.as_std().get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_holds_the_ordered_size_plus_bounded_bookkeeping() {
        for (ordered, at_most) in [(64u64 << 20, 1.2), (20u64 << 30, 1.03), (2u64 << 40, 1.03)] {
            let layout = Layout::for_ordered(ordered);
            assert!(layout.image_bytes > ordered);
            let ratio = layout.image_bytes as f64 / ordered as f64;
            assert!(ratio <= at_most, "{ordered}: {ratio}");
            assert!((4..=256).contains(&layout.journal_mib));
        }
        assert_eq!(Layout::for_ordered(64 << 20).journal_mib, 4);
        assert_eq!(Layout::for_ordered(20 << 30).journal_mib, 160);
    }
}
