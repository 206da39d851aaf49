//! The gateway's configuration: one TOML file, every field documented in `gateway.example.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use alloy_primitives::Address;
use serde::Deserialize;
use shale_provisioner::{Catalog, ImageGcPolicy, ProvisionerConfig, RegistryConfig};

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
    /// The SP's image catalog (`[images.NAME]`): what clients may choose to run, each pulled
    /// from a registry or imported from an archive when the gateway starts.
    #[serde(default)]
    pub images: Catalog,
    /// Registries the catalog pulls from, with their credentials (`[[registries]]`).
    #[serde(default)]
    pub registries: Vec<RegistryConfig>,
    /// Which images no order uses are removed after the catalog is installed.
    #[serde(default)]
    pub image_gc: ImageGcPolicy,
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
    /// What happens as an order's bytes run past what its client acknowledged.
    #[serde(default)]
    pub acknowledgments: AcknowledgmentConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// What the gateway's logs record of what clients do.
    #[serde(default)]
    pub log: LogConfig,
    /// How `shale gateway` separates privileges between its processes.
    #[serde(default)]
    pub privsep: PrivsepConfig,
}

/// Privilege separation: `shale gateway` runs the SSH-facing process as `user`, with no
/// capabilities, beside a root broker (containerd, namespaces, the orders' network) and the
/// settler (the wallet key).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivsepConfig {
    /// The unprivileged system user of the SSH process; created (no home, no login shell) when
    /// missing. Give it to nothing else: whatever runs as it can signal the SSH process.
    pub user: String,
}

impl Default for PrivsepConfig {
    fn default() -> Self {
        Self {
            user: "shale-gateway".into(),
        }
    }
}

/// What the gateway's logs record of what clients do.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Log every exec request's whole command line. Off by default: clients pass tokens and
    /// passwords in arguments, and the SP's logs are no place for them, so only the program
    /// (`argv[0]`, or a shell command line's first word) is logged.
    pub audit_commands: bool,
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

/// The policy on bytes the client's tunnel has not acknowledged (see `ack_policy`): the contract
/// pays an order's bytes only up to the larger of its acknowledged bytes and its byte allowance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcknowledgmentConfig {
    /// Tell every open session of an order, once, when its unacknowledged bytes reach this
    /// fraction (0 to 1) of its byte allowance.
    #[serde(deserialize_with = "fraction")]
    pub notice_at: f64,
    /// At the allowance, pause the order's transfers until an acknowledgment arrives; when off,
    /// the sessions are only told and the bytes past the allowance are the provider's risk.
    pub pause_transfers: bool,
}

impl Default for AcknowledgmentConfig {
    fn default() -> Self {
        Self {
            notice_at: 0.8,
            pause_transfers: false,
        }
    }
}

fn fraction<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(d)?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(serde::de::Error::custom(format!(
            "{value} is not a fraction of the allowance between 0 and 1 (e.g. 0.8)"
        )))
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` and `/healthz` are served; none when unset.
    pub listen: Option<SocketAddr>,
    /// Where the settler's `/metrics` are served: it runs in `shale gateway`'s supervisor, a
    /// process of its own; none when unset.
    pub settler_listen: Option<SocketAddr>,
}

/// An address in any spelling the CLI takes: `0x…` (EIP-55 checked when mixed-case) or
/// Filecoin's delegated `f410f…`/`t410f…`.
fn any_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Address, D::Error> {
    shale_contracts::AnyAddress::deserialize(d).map(|a| a.0)
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:2222".parse().expect("literal address")
}

/// Where the marketplace is and who this SP is on it.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// An Ethereum JSON-RPC endpoint (anvil locally, a Filecoin FEVM node in production).
    pub rpc_url: String,
    /// The marketplace contract, as `0x…` or Filecoin `f410f…`/`t410f…`.
    #[serde(deserialize_with = "any_address")]
    pub marketplace: Address,
    /// This SP's provider address (either spelling): orders placed with anyone else are refused.
    #[serde(deserialize_with = "any_address")]
    pub provider: Address,
    /// How often to poll for marketplace events (termination, top-ups, claims).
    #[serde(default = "default_poll", with = "secs")]
    pub poll_interval: Duration,
    /// Headroom on the node's gas and fee estimates for the SP's transactions (claims,
    /// accepts, registration): `[chain.fees]`.
    #[serde(default)]
    pub fees: shale_contracts::FeePolicy,
}

impl std::fmt::Debug for ChainConfig {
    /// The RPC URL shown as `scheme://host[:port]`: a hosted endpoint's API key rides in it, and
    /// a config printed in a log or an error must not give it away.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainConfig")
            .field(
                "rpc_url",
                &shale_contracts::Marketplace::redact_url(&self.rpc_url),
            )
            .field("marketplace", &self.marketplace)
            .field("provider", &self.provider)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
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
    /// How long a connection may take from TCP accept to a successful login, whatever it sends
    /// meanwhile (sshd's `LoginGraceTime`).
    #[serde(with = "secs")]
    pub login_grace_time: Duration,
    /// Unauthenticated connections at once, with random early drop (sshd's `MaxStartups`).
    pub max_startups: MaxStartups,
    /// Unauthenticated connections at once from one source: an IPv4 address or an IPv6 /64
    /// (sshd's `PerSourceMaxStartups`).
    pub max_startups_per_source: usize,
    /// Session channels (shell, exec, subsystem) open at once on one connection (sshd's
    /// `MaxSessions`).
    pub max_channels: usize,
    /// `ssh -L` / `ssh -D` forwards open (or being dialled) at once for one order.
    pub max_forwards_per_order: usize,
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
            // `parallel -j 50 ssh ...` holds 50 sessions of one order at once.
            max_per_order: 64,
            max_connections: 4096,
            login_grace_time: Duration::from_secs(60),
            max_startups: MaxStartups::default(),
            max_startups_per_source: 64,
            max_channels: 10,
            max_forwards_per_order: 128,
            idle_timeout: Duration::from_secs(3600),
            keepalive: Duration::from_secs(15),
            extra_env: Vec::new(),
            drain: Duration::from_secs(10),
            count_bytes: true,
        }
    }
}

/// sshd's `MaxStartups`, `start:rate:full`: below `start` unauthenticated connections every new
/// one is let in; from `start` on a new one is refused with probability `rate` percent, rising
/// linearly to 100 % at `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxStartups {
    /// Unauthenticated connections from which random early drop begins.
    pub start: usize,
    /// The drop probability at `start`, in percent.
    pub rate: u32,
    /// Unauthenticated connections at which every new one is refused.
    pub full: usize,
}

/// Higher than sshd's 10:30:100: an unauthenticated connection costs the gateway a task and a
/// socket, not a process, and `parallel -j 50 ssh ...` (or Ansible with 50 forks) has 50 logins
/// in flight from one address at once.
impl Default for MaxStartups {
    fn default() -> Self {
        Self {
            start: 64,
            rate: 30,
            full: 256,
        }
    }
}

impl std::str::FromStr for MaxStartups {
    type Err = String;

    /// `"10:30:100"`, or `"N"` for a hard limit of N (as sshd reads it).
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("max_startups {text:?} is not START:RATE:FULL (e.g. \"10:30:100\") or a number")
        };
        let parts: Vec<&str> = text.split(':').collect();
        let num = |s: &str| s.trim().parse::<usize>().map_err(|_| bad());
        let parsed = match parts.as_slice() {
            [n] => Self {
                start: num(n)?,
                rate: 100,
                full: num(n)?,
            },
            [start, rate, full] => Self {
                start: num(start)?,
                rate: u32::try_from(num(rate)?).map_err(|_| bad())?,
                full: num(full)?,
            },
            _ => return Err(bad()),
        };
        if parsed.full == 0 || parsed.start > parsed.full || parsed.rate > 100 {
            return Err(format!(
                "max_startups {text:?}: needs 0 < START <= FULL and RATE <= 100"
            ));
        }
        Ok(parsed)
    }
}

impl<'de> Deserialize<'de> for MaxStartups {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
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
    /// The oldest chain read of an order still served while the chain cannot be reached; older
    /// entries are refused as "cannot be checked" until the chain answers again.
    #[serde(with = "secs")]
    pub stale_order_max: Duration,
    /// How often, at most, the marketplace's order count is read again for a login that names
    /// an id above it (ids above the count are refused without a chain call).
    #[serde(with = "secs")]
    pub order_count_refresh: Duration,
    /// Failed logins allowed per client source (IPv4 address, IPv6 /64) within `failure_window`;
    /// past it the source's logins are served from the cache only: a known order with its own
    /// key still gets in, anything that needs a chain lookup is refused for the window.
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
            stale_order_max: Duration::from_secs(600),
            order_count_refresh: Duration::from_secs(2),
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
        let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            reason: e.to_string(),
        })?;
        shale_provisioner::check_catalog(&config.images).map_err(|e| ConfigError::Parse {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Ok(config)
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
        assert_eq!(config.sessions.max_per_order, 64);
        assert_eq!(config.sessions.max_startups, MaxStartups::default());
        // Uncommenting every commented line must still parse: the example documents real fields.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with('"') => rest,
                // The catalog's and registries' example tables.
                Some(rest) if rest.starts_with('[') => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let full: GatewayConfig = toml::from_str(&uncommented).unwrap();
        assert_eq!(full.auth.max_failures, 20);
        let defaults = SessionConfig::default();
        assert_eq!(full.sessions.max_startups, defaults.max_startups);
        assert_eq!(full.sessions.login_grace_time, defaults.login_grace_time);
        assert_eq!(full.sessions.max_channels, defaults.max_channels);
        assert_eq!(
            full.auth.stale_order_max,
            AuthConfig::default().stale_order_max
        );
        assert_eq!(full.containers.namespace, "shale");
        assert!(config.images.is_empty() && config.registries.is_empty());
        shale_provisioner::check_catalog(&full.images).unwrap();
        assert!(full.images["cuda"].gpu_ready && full.images["default"].default);
        assert_eq!(full.registries[0].host, "registry.example:5000");
        assert_eq!(full.image_gc, ImageGcPolicy::default());
        assert!(!config.log.audit_commands && !full.log.audit_commands);
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
    fn chain_addresses_take_the_filecoin_spelling_and_check_eip55() {
        use shale_contracts::filecoin_address::{to_f4, Network};
        let text = include_str!("../gateway.example.toml");
        let hex: GatewayConfig = toml::from_str(text).unwrap();
        let f4 = to_f4(hex.chain.marketplace, Network::Testnet);
        let config: GatewayConfig =
            toml::from_str(&text.replace("0x5FbDB2315678afecb367f032d93F642f64180aa3", &f4))
                .unwrap();
        assert_eq!(config.chain.marketplace, hex.chain.marketplace);
        // One case flipped breaks the EIP-55 checksum: a typo, not another account.
        let typo = text.replace(
            "0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "0x5fbDB2315678afecb367f032d93F642f64180aa3",
        );
        assert!(toml::from_str::<GatewayConfig>(&typo).is_err());
    }

    #[test]
    fn a_printed_config_does_not_show_the_rpc_key() {
        let text = include_str!("../gateway.example.toml").replace(
            "rpc_url = \"http://127.0.0.1:8545\"",
            "rpc_url = \"https://user:s3cret@rpc.example.io/v1/s3cret?token=s3cret\"",
        );
        let config: GatewayConfig = toml::from_str(&text).unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("https://rpc.example.io"), "{printed}");
    }

    #[test]
    fn the_acknowledgment_policy_defaults_to_telling_only_and_checks_its_fraction() {
        let text = include_str!("../gateway.example.toml");
        let config: GatewayConfig = toml::from_str(text).unwrap();
        assert_eq!(config.acknowledgments.notice_at, 0.8);
        assert!(!config.acknowledgments.pause_transfers);
        let pausing = text.replace(
            "[acknowledgments]",
            "[acknowledgments]\nnotice_at = 0.5\npause_transfers = true",
        );
        let config: GatewayConfig = toml::from_str(&pausing).unwrap();
        assert_eq!(config.acknowledgments.notice_at, 0.5);
        assert!(config.acknowledgments.pause_transfers);
        for bad in ["1.5", "-0.1"] {
            let text = text.replace(
                "[acknowledgments]",
                &format!("[acknowledgments]\nnotice_at = {bad}"),
            );
            let err = toml::from_str::<GatewayConfig>(&text).unwrap_err();
            assert!(err.to_string().contains("between 0 and 1"), "{err}");
        }
    }

    #[test]
    fn max_startups_reads_like_sshd() {
        assert_eq!(
            "10:30:100".parse::<MaxStartups>(),
            Ok(MaxStartups {
                start: 10,
                rate: 30,
                full: 100
            })
        );
        assert_eq!(
            "50".parse::<MaxStartups>(),
            Ok(MaxStartups {
                start: 50,
                rate: 100,
                full: 50
            })
        );
        for bad in [
            "",
            "10:30",
            "a:b:c",
            "100:30:10",
            "10:130:100",
            "0",
            "1:2:3:4",
        ] {
            assert!(bad.parse::<MaxStartups>().is_err(), "{bad}");
        }
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
