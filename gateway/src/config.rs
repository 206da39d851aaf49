//! The gateway's configuration: one TOML file, every field documented in `gateway.example.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use alloy_primitives::Address;
use serde::Deserialize;
use shale_provisioner::ProvisionerConfig;

/// Everything the gateway needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where SSH clients connect.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The persisted SSH host key; generated on first start.
    pub host_key: PathBuf,
    /// Where the gateway keeps its state (the SQLite ledger unless `meter.ledger_url` is set).
    pub state_dir: PathBuf,
    /// The chain the marketplace lives on.
    pub chain: ChainConfig,
    /// The containerd side: socket, namespace, image, datasets, GPUs.
    pub containers: ProvisionerConfig,
    /// Session policy.
    #[serde(default)]
    pub sessions: SessionConfig,
    /// Authentication policy.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Metering: tick interval and ledger.
    #[serde(default)]
    pub meter: shale_meter::MeterConfig,
    /// What happens as an order's escrow runs out.
    #[serde(default)]
    pub payment: PaymentConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// The escrow policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentConfig {
    /// Tell every open session of an order when its escrow covers no more than this many
    /// seconds at the current rate (each threshold once).
    pub warn_at: Vec<u64>,
}

impl Default for PaymentConfig {
    fn default() -> Self {
        Self {
            warn_at: vec![600, 60],
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` and `/healthz` are served; none when unset.
    pub listen: Option<SocketAddr>,
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:2222".parse().expect("literal address")
}

/// Where the marketplace is and who this SP is on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// An Ethereum JSON-RPC endpoint (anvil locally, a Filecoin FEVM node in production).
    pub rpc_url: String,
    /// The marketplace contract.
    pub marketplace: Address,
    /// This SP's provider address: orders placed with anyone else are refused.
    pub provider: Address,
    /// How often to poll for marketplace events (termination, top-ups, claims).
    #[serde(default = "default_poll", with = "secs")]
    pub poll_interval: Duration,
}

fn default_poll() -> Duration {
    Duration::from_secs(2)
}

/// Limits and timers of SSH sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Most concurrent SSH connections for one order.
    pub max_per_order: usize,
    /// Most concurrent SSH connections in all.
    pub max_connections: usize,
    /// Close a connection after this long without traffic from the client.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Send an SSH keepalive after this long without traffic (also measures round-trip time).
    #[serde(with = "secs")]
    pub keepalive: Duration,
    /// Environment variables a client may set, besides `LANG`, `LC_*` and `TERM`. A trailing `*`
    /// matches any suffix.
    pub extra_env: Vec<String>,
    /// How long shutdown waits for sessions to end after telling users.
    #[serde(with = "secs")]
    pub drain: Duration,
    /// Whether channel bytes are counted for billing. Always on from a configuration file (it
    /// cannot be set there); only a benchmark that embeds the gateway turns it off, to measure
    /// what counting costs on the whole byte path.
    #[serde(skip, default = "counting_bytes")]
    pub count_bytes: bool,
}

fn counting_bytes() -> bool {
    true
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_per_order: 16,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(3600),
            keepalive: Duration::from_secs(15),
            extra_env: Vec::new(),
            drain: Duration::from_secs(10),
            count_bytes: true,
        }
    }
}

/// Authentication policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long an order read from chain is trusted without re-reading (events invalidate sooner).
    #[serde(with = "secs")]
    pub order_cache: Duration,
    /// How long "no such order" is remembered.
    #[serde(with = "secs")]
    pub missing_cache: Duration,
    /// Failed logins allowed per client address within `failure_window`.
    pub max_failures: u32,
    /// The window over which failures are counted.
    #[serde(with = "secs")]
    pub failure_window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            order_cache: Duration::from_secs(30),
            missing_cache: Duration::from_secs(5),
            max_failures: 20,
            failure_window: Duration::from_secs(60),
        }
    }
}

/// Durations in the file are whole seconds.
mod secs {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl GatewayConfig {
    /// Reads and checks a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            reason: e.to_string(),
        })
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("config {path} is invalid: {reason}")]
    Parse { path: PathBuf, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_with_every_documented_field() {
        let text = include_str!("../gateway.example.toml");
        let config: GatewayConfig = toml::from_str(text).unwrap();
        assert_eq!(config.listen.port(), 2222);
        assert_eq!(config.sessions.max_per_order, 16);
        // Uncommenting every commented line must still parse: the example documents real fields.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with('"') => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let full: GatewayConfig = toml::from_str(&uncommented).unwrap();
        assert_eq!(full.auth.max_failures, 20);
        assert_eq!(full.containers.namespace, "shale");
        // The network section's commented values are the defaults, and its examples are real.
        let defaults = shale_provisioner::NetworkConfig::default();
        assert_eq!(config.containers.network, defaults);
        let network = &full.containers.network;
        assert_eq!(
            (network.enabled, network.subnet, &network.dns),
            (defaults.enabled, defaults.subnet, &defaults.dns)
        );
        assert_eq!(network.allow[0].ports, vec![80, 443]);
        assert_eq!(network.deny.len(), 2);
        assert_eq!(network.egress_bytes_per_sec, Some(12_500_000));
    }

    #[test]
    fn unknown_fields_are_errors() {
        let text = include_str!("../gateway.example.toml")
            .replace("[sessions]", "[sessions]\nmax_per_oder = 3");
        assert!(toml::from_str::<GatewayConfig>(&text).is_err());
    }

    #[test]
    fn a_config_file_cannot_turn_byte_counting_off() {
        let text = include_str!("../gateway.example.toml");
        let config: GatewayConfig = toml::from_str(text).unwrap();
        assert!(config.sessions.count_bytes);
        let off = text.replace("[sessions]", "[sessions]\ncount_bytes = false");
        assert!(toml::from_str::<GatewayConfig>(&off).is_err());
    }
}
