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
    for test_only in ["test/TestTickVerifier.sol", "test/FilecoinActorsDouble.sol"] {
        current.insert(test_only.to_string(), digest(&root.join(test_only)));
    }

    assert_eq!(
        recorded, current,
        "contracts/artifacts are stale: run scripts/build-contracts.sh and commit the result"
    );
}

#[test]
fn test_only_verifier_is_not_among_the_production_artifacts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in [
        "TestTickVerifier",
        "CallActorByIdDouble",
        "FilecoinActorDouble",
    ] {
        assert!(
            !root.join(format!("artifacts/{name}.json")).exists(),
            "{name}"
        );
    }
    let artifact = std::fs::read_to_string(root.join("artifacts/test-only/TestTickVerifier.json"))
        .expect("test-only verifier artifact");
    assert!(artifact.contains("\"testOnly\": true"));
}

/// EIP-170: a contract's runtime code may be at most 24,576 bytes, or its deployment fails;
/// EIP-3860: creation code at most 49,152 (the marketplace's includes the registry's).
#[test]
fn contracts_fit_eip_170_and_eip_3860() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["Marketplace", "ProviderRegistry"] {
        let artifact: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join(format!("artifacts/{name}.json")))
                .expect("artifact"),
        )
        .expect("artifact is JSON");
        let size = |key: &str| {
            artifact[key]["object"]
                .as_str()
                .expect("bytecode")
                .trim_start_matches("0x")
                .len()
                / 2
        };
        let runtime = size("deployedBytecode");
        assert!(
            runtime <= 24_576,
            "{name} runtime code is {runtime} bytes, over EIP-170's 24,576"
        );
        let creation = size("bytecode");
        assert!(
            creation <= 49_152,
            "{name} creation code is {creation} bytes, over EIP-3860's 49,152"
        );
    }
}
