//! The committed artifacts (and so the Rust bindings) must match the Solidity sources:
//! `scripts/build-contracts.sh` records the SHA-256 of every source it compiled, and this test
//! fails when a source changed (or was added) without a rebuild.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

fn digest(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn artifacts_are_built_from_the_current_sources() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let recorded: BTreeMap<String, String> =
        std::fs::read_to_string(root.join("artifacts/SOURCES.sha256"))
            .expect("artifacts/SOURCES.sha256 exists: run scripts/build-contracts.sh")
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (hash, file) = l.split_once("  ").expect("sha256sum format");
                (file.to_string(), hash.to_string())
            })
            .collect();

    let mut current = BTreeMap::new();
    for entry in std::fs::read_dir(root.join("src")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sol") {
            let name = format!("src/{}", path.file_name().unwrap().to_string_lossy());
            current.insert(name, digest(&path));
        }
    }
    let verifier = "test/TestTickVerifier.sol";
    current.insert(verifier.to_string(), digest(&root.join(verifier)));

    assert_eq!(
        recorded, current,
        "contracts/artifacts are stale: run scripts/build-contracts.sh and commit the result"
    );
}

#[test]
fn test_only_verifier_is_not_among_the_production_artifacts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(!root.join("artifacts/TestTickVerifier.json").exists());
    let artifact = std::fs::read_to_string(root.join("artifacts/test-only/TestTickVerifier.json"))
        .expect("test-only verifier artifact");
    assert!(artifact.contains("\"testOnly\": true"));
}

/// EIP-170: a contract's runtime code may be at most 24,576 bytes, or its deployment fails.
/// Marketplace sits close to it (`optimizer_runs` is kept low for room; see contracts/README.md).
#[test]
fn marketplace_runtime_code_fits_eip_170() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let artifact: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("artifacts/Marketplace.json")).expect("artifact"),
    )
    .expect("artifact is JSON");
    let code = artifact["deployedBytecode"]["object"]
        .as_str()
        .expect("deployed bytecode");
    let size = code.trim_start_matches("0x").len() / 2;
    assert!(
        size <= 24_576,
        "Marketplace runtime code is {size} bytes, over EIP-170's 24,576"
    );
}
