//! Building the image archives with the scripts under `provisioner/image/`.
//!
//! Both scripts cache their output under a key that hashes their inputs, so calling these
//! again is instant. The default image needs root, `mmdebstrap` and a Debian mirror; the
//! busybox test image needs `apt-get download`.

use std::path::{Path, PathBuf};

use crate::ProvisionError;

/// The directory holding the build scripts (in this crate's source tree).
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("image")
}

/// The default cache: `<repo>/.state/images`.
pub fn default_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".state")
        .join("images")
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
    let script = scripts_dir().join(name);
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(cache_dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| ProvisionError::ImageBuild(format!("cannot run {}: {e}", script.display())))?;
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
