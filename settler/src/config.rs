//! The settler's section (`[sp.settler]`) of the config file `shale gateway` reads.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::SettlerError;

/// How the settler turns ledger ticks into paid claims. `shale gateway` runs a settler beside
/// the gateway when its config has an `[sp.settler]` section (which must name the keys).
///
/// ```toml
/// [sp.settler]
/// key_dir = "/var/lib/shale/keys"   # tick-16.pk, tick-256.pk, … from the marketplace deployer
/// capacities = [16, 256]
/// max_wait_secs = 900
/// ack_wait_secs = 600
/// worker_threads = 1
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SettlerConfig {
    /// Directory holding the proving keys, `tick-N.pk` per batch capacity N, as written by
    /// `shale-circuits-setup`. Production keys come from the marketplace deployer: an SP must
    /// never generate the keys its own claims are checked against. Takes precedence over
    /// `key_seed`.
    pub key_dir: Option<PathBuf>,
    /// Local stack and tests only: derive the keys with `setup_from_seed(N, key_seed)` at start
    /// (what `shale-circuits-setup --seed` does). Anyone who knows the seed can forge proofs.
    pub key_seed: Option<u64>,
    /// Batch capacities to prove with. Empty (the default): every capacity the marketplace has a
    /// verifier for and this settler has a key for. A batch is proved with the smallest capacity
    /// that holds it, since proving time grows with the capacity, not with the ticks in it.
    pub capacities: Vec<u32>,
    /// Prove a partly full batch once the oldest unclaimed tick is this old (seconds), so an
    /// order with little traffic is still paid regularly. Default 900.
    pub max_wait_secs: u64,
    /// How long a tick whose bytes pass what the client acknowledged (or the order's allowance)
    /// waits for an acknowledgment (seconds, from the tick's end and, once the order ended, from
    /// when the settler saw it end: the tunnel's final acknowledgment comes right after). Then it is claimed anyway: its seconds are paid in full, its bytes up to what is
    /// covered, and the rest is forfeited, so a client whose tunnel died cannot hold back the
    /// lease's later seconds. Default 600.
    pub ack_wait_secs: u64,
    /// How often the background task looks at every tracked order (milliseconds). Default 5000.
    pub poll_interval_ms: u64,
    /// Attempts to send one claim before it is recorded as failed (at least 1). Default 5.
    pub max_attempts: u32,
    /// Pause before the first retry of a claim that hit an outage (milliseconds); doubled after
    /// each attempt up to `backoff_max_ms`. Default 500.
    pub backoff_initial_ms: u64,
    /// Longest pause between two attempts (milliseconds). Default 30000.
    pub backoff_max_ms: u64,
    /// Threads of the proving pool (at least 1). Proving takes every thread it is given, so this
    /// bounds what it can take from the SSH path; the default, 1, leaves the other cores to
    /// the sessions.
    pub worker_threads: usize,
    /// Settle an ended order once its last claim is paid (returns the collateral). Default true.
    pub settle: bool,
    /// Wait this long after an order ended (chain time, seconds) before settling, so that the
    /// lease's final tick lands in the ledger and gets claimed first. Settling by the provider
    /// gives up any later claim. Default 120.
    pub settle_delay_secs: u64,
    /// At start, scan the marketplace for this provider's unsettled orders so that a restart
    /// resumes claiming them without waiting for a session. Default true.
    pub scan_chain_on_start: bool,
}

impl Default for SettlerConfig {
    fn default() -> Self {
        SettlerConfig {
            key_dir: None,
            key_seed: None,
            capacities: Vec::new(),
            max_wait_secs: 900,
            ack_wait_secs: 600,
            poll_interval_ms: 5_000,
            max_attempts: 5,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            worker_threads: 1,
            settle: true,
            settle_delay_secs: 120,
            scan_chain_on_start: true,
        }
    }
}

impl SettlerConfig {
    /// Checks the ranges the settler relies on.
    pub fn validate(&self) -> Result<(), SettlerError> {
        let bad = |m: &str| Err(SettlerError::Config(m.to_owned()));
        if self.key_dir.is_none() && self.key_seed.is_none() {
            return bad("set settler.key_dir (proving keys from the marketplace deployer) or, for a local stack, settler.key_seed");
        }
        if self.worker_threads == 0 {
            return bad("settler.worker_threads must be at least 1");
        }
        if self.max_attempts == 0 {
            return bad("settler.max_attempts must be at least 1");
        }
        if self.poll_interval_ms == 0 {
            return bad("settler.poll_interval_ms must be at least 1");
        }
        if self.capacities.contains(&0) {
            return bad("settler.capacities must not contain 0");
        }
        Ok(())
    }

    /// The pause before attempt `attempt` (1 for the first retry).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        Duration::from_millis(
            self.backoff_initial_ms
                .saturating_mul(factor)
                .min(self.backoff_max_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_from_an_empty_section_and_need_keys() {
        let config: SettlerConfig = toml::from_str("").unwrap();
        assert_eq!(config, SettlerConfig::default());
        assert!(matches!(config.validate(), Err(SettlerError::Config(_))));
        let config: SettlerConfig = toml::from_str("key_seed = 7\ncapacities = [16]").unwrap();
        config.validate().unwrap();
        assert!(toml::from_str::<SettlerConfig>("no_such_field = 1").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = SettlerConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 350,
            ..SettlerConfig::default()
        };
        let waits: Vec<u64> = (1..=4)
            .map(|a| config.backoff(a).as_millis() as u64)
            .collect();
        assert_eq!(waits, [100, 200, 350, 350]);
    }
}
