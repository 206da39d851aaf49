//! The claim circuit's keys for test stacks that settle: one Groth16 set-up per test binary
//! (the slow part of a debug build), its verifier compiled with the pinned solc-js, and the
//! proving key written where a settler loads it, as the marketplace's deployer ships it.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Context;
use shale_circuits::ProvingKey;
use shale_settler::SettlerConfig;

/// The batch capacity test stacks verify and prove: small, so a debug build proves in seconds.
pub const CAPACITY: u32 = 16;
/// The seed of the test set-up. Anyone who knows it can forge proofs: tests only.
const SEED: u64 = 0x7e57_5eed;

/// The keys of [`CAPACITY`]: what the SP proves with and what the chain verifies with.
pub struct ClaimKeys {
    /// The proving key (a dishonest SP's test code proves with it too).
    pub pk: ProvingKey,
    /// Creation code of the matching Solidity verifier.
    pub verifier: Vec<u8>,
    /// A directory holding `tick-16.pk`, as `settler.key_dir` expects.
    pub key_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// The keys, made on first use (blocking work runs off the async threads).
pub async fn claim_keys() -> anyhow::Result<&'static ClaimKeys> {
    static KEYS: OnceLock<ClaimKeys> = OnceLock::new();
    if let Some(k) = KEYS.get() {
        return Ok(k);
    }
    tokio::task::spawn_blocking(|| -> anyhow::Result<&'static ClaimKeys> {
        if let Some(k) = KEYS.get() {
            return Ok(k);
        }
        let (pk, vk) = shale_circuits::setup_from_seed(CAPACITY as usize, SEED)
            .context("the Groth16 set-up")?;
        let verifier = shale_circuits::solc::compile_verifier(&vk)
            .context("compiling the Solidity verifier with solc-js (run scripts/setup.sh)")?;
        let dir = tempfile::Builder::new().prefix("shale-keys-").tempdir()?;
        pk.write(&dir.path().join(format!("tick-{CAPACITY}.pk")))
            .context("writing the proving key")?;
        let keys = ClaimKeys {
            pk,
            verifier,
            key_dir: dir.path().to_path_buf(),
            _dir: dir,
        };
        // Two tests racing here both made keys from the same seed: either one will do.
        let _ = KEYS.set(keys);
        Ok(KEYS.get().expect("just set"))
    })
    .await
    .context("the key set-up thread")?
}

/// A settler configuration for tests: quick polls and retries, every claim proved with the
/// test keys, and no settlement (a settled order takes no later claim, so tests look at the
/// claims themselves).
pub fn settler_config() -> SettlerConfig {
    SettlerConfig {
        capacities: vec![CAPACITY],
        poll_interval_ms: 500,
        backoff_initial_ms: 200,
        backoff_max_ms: 2_000,
        settle: false,
        // Longer than the tunnel's 30 s acknowledgment round, so that live sessions' bytes are
        // acknowledged before the wait runs out, and short enough that a test sees a killed
        // tunnel's bytes forfeited and the lease's last seconds paid.
        ack_wait_secs: 45,
        ..SettlerConfig::default()
    }
}

/// `config` proving with `keys`, as the deployer's key directory gives them.
pub(crate) fn with_keys(config: SettlerConfig, keys: &ClaimKeys) -> SettlerConfig {
    SettlerConfig {
        key_dir: Some(keys.key_dir.clone()),
        key_seed: None,
        ..config
    }
}
