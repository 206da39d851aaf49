//! What the SP configures about its orders' network: the subnet the per-order links come from,
//! the resolvers, extra allow and deny rules, and an optional egress rate limit.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The `[provisioner.network]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Whether orders get egress at all; off, a container has loopback only.
    pub enabled: bool,
    /// Where each order's point-to-point /31 comes from: the host end is the even address, the
    /// container the odd one. Needs room for `2 * uid_ranges` addresses and must not overlap
    /// anything on the SP's LAN.
    pub subnet: Ipv4Net,
    /// The resolvers written to every container's `/etc/resolv.conf`, and the only addresses
    /// that port 53 may reach past the deny rules. Empty: the host's own upstream resolvers
    /// (from `/etc/resolv.conf`, or systemd-resolved's upstream list when that names only a
    /// loopback stub).
    pub dns: Vec<Ipv4Addr>,
    /// Destinations let through even though a built-in rule denies them, e.g. a package
    /// mirror on the SP's LAN. Checked after `deny`.
    pub allow: Vec<NetRule>,
    /// Destinations refused on top of the built-in ones. Checked first.
    pub deny: Vec<NetRule>,
    /// Bytes per second each order may send out (bursts up to one second's worth); none: no
    /// limit beyond the uplink.
    pub egress_bytes_per_sec: Option<u64>,
}

/// One allow or deny entry: a destination range, and optionally only some ports of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRule {
    /// Destination addresses, e.g. `192.168.1.20/32`.
    pub cidr: Ipv4Net,
    /// TCP and UDP destination ports; empty: every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            enabled: true,
            subnet: "10.89.0.0/16".parse().expect("a valid default subnet"),
            dns: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            egress_bytes_per_sec: None,
        }
    }
}

/// Destinations no order reaches unless the SP allows them: "this network", RFC 1918, CGNAT,
/// loopback, link-local (cloud metadata at 169.254.169.254), IETF protocol assignments,
/// benchmarking, multicast, reserved and broadcast. The host's own addresses, whatever they
/// are, are refused separately (nothing from an order is delivered to the host), as are other
/// orders (nothing is forwarded into an order that it did not start).
pub const DENIED_RANGES: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local and cloud metadata"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
];

/// Outbound SMTP, refused so that orders cannot send spam from the SP's addresses.
pub const DENIED_TCP_PORTS: &[u16] = &[25];

impl NetworkConfig {
    /// Checks that the subnet holds a /31 for each of `orders` slots.
    pub fn check(&self, orders: u32) -> Result<(), String> {
        let room = 1u64 << (32 - u32::from(self.subnet.prefix_len()));
        if room < 2 * u64::from(orders) {
            return Err(format!(
                "network.subnet {} holds {} order links but uid_ranges allows {orders}",
                self.subnet,
                room / 2
            ));
        }
        if self.subnet.prefix_len() > 31 {
            return Err(format!(
                "network.subnet {} is smaller than a /31",
                self.subnet
            ));
        }
        Ok(())
    }

    /// The host and container ends of slot `slot`'s link.
    pub fn link_addresses(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.subnet.network()) + 2 * slot;
        (Ipv4Addr::from(base), Ipv4Addr::from(base + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_slot_gets_its_own_pair_inside_the_subnet() {
        let cfg = NetworkConfig::default();
        assert_eq!(
            cfg.link_addresses(0),
            ("10.89.0.0".parse().unwrap(), "10.89.0.1".parse().unwrap())
        );
        assert_eq!(
            cfg.link_addresses(4095),
            (
                "10.89.31.254".parse().unwrap(),
                "10.89.31.255".parse().unwrap()
            )
        );
        assert!(cfg.check(4096).is_ok());
        let small = NetworkConfig {
            subnet: "10.89.0.0/24".parse().unwrap(),
            ..cfg
        };
        assert!(small.check(4096).unwrap_err().contains("holds 128"));
    }

    #[test]
    fn rules_parse_from_toml_with_and_without_ports() {
        let cfg: NetworkConfig = toml::from_str(
            r#"
            dns = ["203.0.113.53"]
            allow = [{ cidr = "192.168.1.20/32", ports = [80, 443] }]
            deny = [{ cidr = "198.51.100.0/24" }]
            egress_bytes_per_sec = 12500000
            "#,
        )
        .unwrap();
        assert_eq!(cfg.allow[0].ports, vec![80, 443]);
        assert!(cfg.deny[0].ports.is_empty());
        assert_eq!(cfg.egress_bytes_per_sec, Some(12_500_000));
        assert!(toml::from_str::<NetworkConfig>("subnet = \"10.89.0.0/33\"").is_err());
    }
}
