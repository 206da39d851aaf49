//! What the tests that check us against independent npm implementations share: where
//! `scripts/setup.sh` installs them, whether they are there (under `CI=true` their absence is
//! a failure), and reproducible payloads.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Where `scripts/setup.sh` installs the npm packages.
pub fn node_modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/node_modules")
}

/// Whether node and `package` (a path under `node_modules`) are installed. Missing, the test
/// skips on a laptop and fails in CI.
pub fn available(package: &str) -> bool {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if node && node_modules().join(package).exists() {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "CI needs node and {package} (scripts/setup.sh installs them)"
    );
    eprintln!("SKIPPED: needs node and {package} (scripts/setup.sh)");
    false
}

/// Deterministic bytes that look random: SHA-256 in counter mode.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest(
            [seed.to_le_bytes(), i.to_le_bytes()].concat(),
        ));
        i += 1;
    }
    out.truncate(len);
    out
}
