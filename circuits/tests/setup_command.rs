//! The setup command writes keys and a verifier that belong together.

use std::process::Command;

use shale_circuits::{setup_from_seed, Head, OrderKey, ProvingKey, VerifyingKey};

#[test]
fn setup_command_writes_matching_keys_and_verifier_for_each_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_shale-circuits-setup"))
        .args([
            "--out",
            dir.path().to_str().unwrap(),
            "--capacity",
            "1,2",
            "--seed",
            "5",
            "--fixtures",
            "3",
            "--chain-id",
            "5",
            "--marketplace",
            "0x0101010101010101010101010101010101010101",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    for capacity in [1, 2] {
        let pk = ProvingKey::read(&dir.path().join(format!("tick-{capacity}.pk"))).unwrap();
        let vk = VerifyingKey::read(&dir.path().join(format!("tick-{capacity}.vk"))).unwrap();
        assert_eq!((pk.capacity(), vk.capacity()), (capacity, capacity));
        assert_eq!(pk.verifying_key().inner(), vk.inner());
        // The same seed gives the same keys as the library call.
        assert_eq!(vk.inner(), setup_from_seed(capacity, 5).unwrap().1.inner());
        let sol = std::fs::read_to_string(dir.path().join(format!("TickVerifier{capacity}.sol")))
            .unwrap();
        assert_eq!(sol, vk.solidity());
        assert!(sol.contains(&format!("contract TickVerifier{capacity} ")));
        assert!(sol.contains("function verifyClaim(uint256[6] calldata input, bytes calldata proof) external view returns (bool)"));
        // The fixtures are real claims that the key verifies, the second continuing the first.
        let json =
            std::fs::read_to_string(dir.path().join(format!("claims-{capacity}.json"))).unwrap();
        let fixtures: serde_json::Value = serde_json::from_str(&json).unwrap();
        let claims = fixtures["claims"].as_array().unwrap();
        assert_eq!(claims.len(), 2);
        assert_eq!(claims[0]["prevHead"], serde_json::json!(Head::GENESIS));
        assert_eq!(claims[1]["prevHead"], claims[0]["nextHead"]);
        for claim in claims {
            assert_eq!(claim["orderId"], 3);
            assert_eq!(claim["chainId"], 5);
            let words: Vec<[u8; 32]> = claim["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| {
                    hex::decode(w.as_str().unwrap().trim_start_matches("0x"))
                        .unwrap()
                        .try_into()
                        .unwrap()
                })
                .collect();
            // Input 0 is the order key of that deployment, as the contract computes it.
            assert_eq!(words[0], OrderKey::new(5, [1; 20], 3).to_word());
            let proof =
                hex::decode(claim["proof"].as_str().unwrap().trim_start_matches("0x")).unwrap();
            assert!(vk.verify_claim(&words.try_into().unwrap(), &proof));
        }
    }
}

#[test]
fn setup_command_refuses_to_run_without_a_source_of_randomness() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shale-circuits-setup"))
        .args(["--out", dir.path().to_str().unwrap(), "--capacity", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--os-rng"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
