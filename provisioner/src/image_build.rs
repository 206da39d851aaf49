//! Building the image archives with the scripts under `provisioner/image/`.
//!
//! The scripts are compiled into the binary and written, for each build, into a fresh private
//! folder in the cache (not the system's temporary directory, which may be mounted `noexec`): a
//! `shale` binary runs wherever it was built or installed, with no path back into the source
//! tree. Both scripts cache their output under a key that hashes their inputs and their own
//! text, so the embedded copies find the archives that the checkout's copies built, and calling
//! these again is instant. The default image needs root, `mmdebstrap` and a Debian mirror; the
//! busybox test image needs `apt-get download`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ProvisionError;

/// The build scripts, by file name. They call each other through the folder they sit in
/// (`"$here/oci-pack.sh"`), so all of them are written together.
const SCRIPTS: [(&str, &str); 3] = [
    (
        "build-default.sh",
        include_str!("../image/build-default.sh"),
    ),
    (
        "build-busybox.sh",
        include_str!("../image/build-busybox.sh"),
    ),
    ("oci-pack.sh", include_str!("../image/oci-pack.sh")),
];

/// Shale's own state folder on this machine, where the local stack, the image cache and the
/// dataset cache live. One rule, first match wins:
///
/// 1. `SHALE_HOME`, when set;
/// 2. `<checkout>/.state`, when the running binary sits in a Shale checkout's `target/` (a
///    developer's `cargo run`, the workspace's tests);
/// 3. `/var/lib/shale` for root (a gateway's unprivileged SSH process must be able to reach its
///    state, which it cannot under `/root`);
/// 4. `$XDG_STATE_HOME/shale`, else `$HOME/.local/state/shale`.
pub fn shale_home() -> PathBuf {
    if let Some(home) = std::env::var_os("SHALE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    if let Some(checkout) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(checkout_of)
    {
        return checkout.join(".state");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/shale");
    }
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(state).join("shale");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/shale"),
        None => PathBuf::from("/var/lib/shale"),
    }
}

/// The Shale checkout whose `target/` folder holds `exe`, if it is one: the folder above the
/// nearest `target` ancestor, when that folder has the workspace's manifest and the `cli` crate.
fn checkout_of(exe: &Path) -> Option<PathBuf> {
    let target = exe
        .ancestors()
        .skip(1)
        .find(|d| d.file_name().is_some_and(|n| n == "target"))?;
    let repo = target.parent()?;
    (repo.join("Cargo.toml").is_file() && repo.join("cli/Cargo.toml").is_file())
        .then(|| repo.to_path_buf())
}

/// The image cache: `SHALE_IMAGE_CACHE`, else `images/` in [`shale_home`].
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("SHALE_IMAGE_CACHE").filter(|c| !c.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => shale_home().join("images"),
    }
}

/// Builds (or finds cached) the default order image: Debian 12 with apt (sources for the Debian
/// archive), python3 with pip, venv and numpy, build-essential, git, curl, wget, the SFTP server,
/// rsync, CA certificates, procps, iproute2, less, tmux, vim-tiny, a locale, and bash as root's
/// shell. Returns the archive path.
pub async fn build_default_image(cache_dir: &Path) -> Result<PathBuf, ProvisionError> {
    run_script("build-default.sh", cache_dir).await
}

/// Builds (or finds cached) a variant of the default image with `extra_packages` added, packed
/// as `shale/<variant>:latest` (the benchmarks' sshd-in-a-container reference adds
/// `openssh-server`). Returns the archive and the image's name.
pub async fn build_default_variant(
    cache_dir: &Path,
    variant: &str,
    extra_packages: &[&str],
) -> Result<(PathBuf, crate::ImageRef), ProvisionError> {
    let env = [
        ("SHALE_IMAGE_VARIANT", variant.to_string()),
        ("SHALE_IMAGE_EXTRA_PACKAGES", extra_packages.join(" ")),
    ];
    let archive = run_script_with("build-default.sh", cache_dir, &env).await?;
    Ok((archive, crate::ImageRef(format!("shale/{variant}:latest"))))
}

/// Builds (or finds cached) the small busybox image the fast tests use.
pub async fn build_busybox_image(cache_dir: &Path) -> Result<PathBuf, ProvisionError> {
    run_script("build-busybox.sh", cache_dir).await
}

async fn run_script(name: &str, cache_dir: &Path) -> Result<PathBuf, ProvisionError> {
    run_script_with(name, cache_dir, &[]).await
}

async fn run_script_with(
    name: &str,
    cache_dir: &Path,
    env: &[(&str, String)],
) -> Result<PathBuf, ProvisionError> {
    let scripts = Scripts::write(cache_dir)?;
    let script = scripts.dir.join(name);
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(cache_dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| ProvisionError::ImageBuild(format!("cannot run {}: {e}", script.display())))?;
    drop(scripts);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ProvisionError::ImageBuild(format!(
            "{} failed ({}):\n{}",
            name,
            out.status,
            tail.join("\n")
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| ProvisionError::ImageBuild(format!("{name} printed no archive path")))?;
    Ok(path)
}

/// The embedded scripts written into a folder of their own, removed on drop.
struct Scripts {
    dir: PathBuf,
}

impl Scripts {
    /// A fresh folder in `cache_dir` only this user can enter (created, never reused: nobody
    /// else can have planted a file or a link in it), with the scripts in it.
    fn write(cache_dir: &Path) -> Result<Scripts, ProvisionError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let failed = |what: &str, path: &Path, e: std::io::Error| {
            ProvisionError::ImageBuild(format!("cannot {what} {}: {e}", path.display()))
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::fs::create_dir_all(cache_dir).map_err(|e| failed("create", cache_dir, e))?;
        let dir = cache_dir.join(format!(
            ".scripts-{}-{nanos:08x}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| failed("create", &dir, e))?;
        let scripts = Scripts { dir };
        for (name, text) in SCRIPTS {
            let path = scripts.dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o700)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|e| failed("write", &path, e))?;
        }
        Ok(scripts)
    }
}

impl Drop for Scripts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_scripts_are_the_checkouts_own() {
        // The cache key hashes the scripts' text: the binary's copies must be byte for byte what
        // the checkout runs, or an installed binary would rebuild every cached archive.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("image");
        for (name, text) in SCRIPTS {
            assert_eq!(
                std::fs::read_to_string(dir.join(name)).unwrap(),
                text,
                "{name}"
            );
        }
    }

    #[test]
    fn written_scripts_are_private_and_removed_after_use() {
        use std::os::unix::fs::PermissionsExt;
        let cache = tempfile::tempdir().unwrap();
        let scripts = Scripts::write(cache.path()).unwrap();
        let dir = scripts.dir.clone();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        for (name, _) in SCRIPTS {
            assert!(dir.join(name).is_file(), "{name}");
        }
        drop(scripts);
        assert!(!dir.exists());
    }

    #[test]
    fn a_binary_in_a_checkouts_target_folder_keeps_its_state_in_the_checkout() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        assert_eq!(
            checkout_of(&repo.join("target/debug/shale")).as_deref(),
            Some(repo)
        );
        assert_eq!(
            checkout_of(&repo.join("target/x86_64-unknown-linux-gnu/release/deps/t-1")).as_deref(),
            Some(repo)
        );
        assert_eq!(checkout_of(Path::new("/usr/bin/shale")), None);
        // A `target` folder of something that is not a Shale checkout.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("target/debug")).unwrap();
        std::fs::write(other.path().join("Cargo.toml"), "").unwrap();
        assert_eq!(checkout_of(&other.path().join("target/debug/shale")), None);
    }
}
