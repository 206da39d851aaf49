//! An order's root filesystem: the image's layers, shown through idmapped mounts so that the
//! order's root owns what the image's root owns, under the order's own writable layer.
//!
//! Why idmapped mounts and not a remapped copy: the image's files stay where containerd
//! unpacked them, shared by every order, and giving an order its owners costs one
//! `open_tree` + `mount_setattr` + `move_mount` per layer (well under a millisecond) instead of a
//! `chown` of every file, which on overlayfs copies every file up. runc 1.1 cannot idmap mounts
//! itself, so the provisioner does it: it mounts each lower layer idmapped to the order's user
//! namespace, hands containerd an overlay of those layers with the upper layer on the order's
//! disk, and detaches the idmapped mounts once the shim has mounted the overlay (overlayfs
//! holds its layers by reference). Writes land in the upper layer with the order's host ids.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use containerd_client::types::Mount;
use nix::libc;

use crate::ProvisionError;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// The image's lower layers, lowest last (overlayfs order), from the mounts containerd gives for
/// a view of the image: a read-only bind of a single layer, or an overlay of several.
pub(crate) fn image_layers(mounts: &[Mount]) -> Result<Vec<PathBuf>, ProvisionError> {
    let unexpected = || ProvisionError::Runtime {
        action: "read the image's layers".into(),
        status: format!("containerd gave an unexpected view: {mounts:?}"),
    };
    let [m] = mounts else {
        return Err(unexpected());
    };
    match m.r#type.as_str() {
        "bind" => Ok(vec![PathBuf::from(&m.source)]),
        "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .map(|l| l.split(':').map(PathBuf::from).collect())
            .ok_or_else(unexpected),
        _ => Err(unexpected()),
    }
}

/// Mounts `layer` at `target`, read-only and idmapped through the user namespace `userns`.
fn idmapped_bind(layer: &Path, target: &Path, userns: &OwnedFd) -> std::io::Result<()> {
    let src = CString::new(layer.as_os_str().as_bytes())?;
    let dst = CString::new(target.as_os_str().as_bytes())?;
    let empty = CString::default();
    // SAFETY: plain syscalls with valid NUL-terminated paths and a correctly sized struct; the
    // returned descriptor is owned at once.
    unsafe {
        let fd = libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_RECURSIVE,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tree = OwnedFd::from_raw_fd(fd as i32);
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        if libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The idmapped layers of one task start; detached and removed on drop.
pub(crate) struct IdmappedLayers {
    dir: PathBuf,
    mounted: Vec<PathBuf>,
}

impl IdmappedLayers {
    /// Mounts every layer idmapped under `dir` (`dir/0`, `dir/1`, …).
    pub(crate) fn mount(
        dir: &Path,
        layers: &[PathBuf],
        userns: &OwnedFd,
    ) -> Result<Self, ProvisionError> {
        // Whatever an earlier, interrupted start left here goes first.
        let mut me = IdmappedLayers {
            dir: dir.to_path_buf(),
            mounted: Vec::new(),
        };
        me.clear_leftovers();
        std::fs::create_dir_all(dir).map_err(|e| ProvisionError::io("create", dir, e))?;
        for (i, layer) in layers.iter().enumerate() {
            let target = dir.join(i.to_string());
            std::fs::create_dir_all(&target)
                .map_err(|e| ProvisionError::io("create", &target, e))?;
            idmapped_bind(layer, &target, userns)
                .map_err(|e| ProvisionError::io("mount idmapped", layer, e))?;
            me.mounted.push(target);
        }
        Ok(me)
    }

    /// The overlay containerd's shim mounts as the container's root.
    pub(crate) fn overlay(&self, upper: &Path, work: &Path) -> Mount {
        let lower: Vec<String> = self
            .mounted
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                format!("lowerdir={}", lower.join(":")),
                format!("upperdir={}", upper.display()),
                format!("workdir={}", work.display()),
                // Tenants' device nodes never mean anything on the host.
                "nodev".into(),
            ],
        }
    }

    fn clear_leftovers(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            self.mounted.push(e.path());
        }
        self.detach();
    }

    fn detach(&mut self) {
        for target in self.mounted.drain(..) {
            let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&target);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for IdmappedLayers {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kind: &str, source: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.into(),
            source: source.into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn layers_come_from_a_bind_or_an_overlay_view() {
        assert_eq!(
            image_layers(&[m("bind", "/s/1/fs", &["ro", "rbind"])]).unwrap(),
            vec![PathBuf::from("/s/1/fs")]
        );
        assert_eq!(
            image_layers(&[m(
                "overlay",
                "overlay",
                &["index=off", "lowerdir=/s/2/fs:/s/1/fs"]
            )])
            .unwrap(),
            vec![PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
        );
        assert!(image_layers(&[]).is_err());
        assert!(image_layers(&[m("overlay", "overlay", &["upperdir=/x"])]).is_err());
        assert!(image_layers(&[m("tmpfs", "tmpfs", &[])]).is_err());
    }
}
