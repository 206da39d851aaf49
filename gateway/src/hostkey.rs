//! The gateway's SSH host key: generated once, persisted, and registered on chain by the SP so that
//! clients pin it from the chain instead of trusting on first use.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey};

/// Why the host key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The key file exists but cannot be read.
    #[error("cannot read host key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The key file is not an unencrypted OpenSSH private key.
    #[error("host key {path} is not an unencrypted OpenSSH private key: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// The key file is readable by others: refuse it, as sshd does.
    #[error(
        "host key {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// A new key could not be written.
    #[error("cannot write host key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The operating system gave no randomness.
    #[error("no randomness for a new host key: {0}")]
    Entropy(String),
}

/// Loads the host key at `path`, or creates a new Ed25519 key there (mode 0600) if there is none.
pub fn load_or_generate(path: &Path) -> Result<PrivateKey, HostKeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .map_err(|source| HostKeyError::Read {
                    path: path.into(),
                    source,
                })?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(HostKeyError::Permissions {
                    path: path.into(),
                    mode,
                });
            }
            let key = PrivateKey::from_openssh(&text).map_err(|e| HostKeyError::Parse {
                path: path.into(),
                reason: e.to_string(),
            })?;
            if key.is_encrypted() {
                return Err(HostKeyError::Parse {
                    path: path.into(),
                    reason: "it is encrypted".into(),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => generate(path),
        Err(source) => Err(HostKeyError::Read {
            path: path.into(),
            source,
        }),
    }
}

fn generate(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| HostKeyError::Entropy(e.to_string()))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| HostKeyError::Entropy(e.to_string()))?;
    let write_err = |source| HostKeyError::Write {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    // Write to a temporary name and rename, so a crash never leaves half a key behind.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    file.write_all(text.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)?;
    tracing::info!(path = %path.display(), fingerprint = %fingerprint(&key), "generated a new host key");
    Ok(key)
}

/// The host key's SHA-256 fingerprint as `ssh-keygen -lf` prints it.
pub fn fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

/// The public half in OpenSSH format (`ssh-ed25519 AAAA...`), which the SP registers on chain.
pub fn public_openssh(key: &PrivateKey) -> String {
    key.public_key()
        .to_openssh()
        .expect("an in-memory public key always encodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_persisted_and_reloaded_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/host_ed25519");
        let first = load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let second = load_or_generate(&path).unwrap();
        assert_eq!(public_openssh(&first), public_openssh(&second));
        assert!(fingerprint(&first).starts_with("SHA256:"));
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host");
        load_or_generate(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_generate(&path),
            Err(HostKeyError::Permissions { .. })
        ));
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host");
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_generate(&path),
            Err(HostKeyError::Parse { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key");
    }
}
