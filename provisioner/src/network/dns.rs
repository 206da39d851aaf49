//! The resolvers an order uses: the SP's list, or the host's own upstream ones. A resolver on
//! the host's loopback (systemd-resolved's 127.0.0.53, a local dnsmasq) is never handed to a
//! container: from its own namespace that address is its own loopback, where nothing answers.

use std::net::Ipv4Addr;
use std::path::Path;

/// Where the host's resolvers are listed, best first: systemd-resolved's upstream list, then
/// the classic file.
const HOST_FILES: &[&str] = &["/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"];

/// The IPv4 nameservers in a resolv.conf, loopback ones left out.
pub fn nameservers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.parse::<Ipv4Addr>().ok())
                .flatten()
        })
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .collect()
}

/// The host's upstream IPv4 resolvers; empty when it has none a container could reach.
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    HOST_FILES
        .iter()
        .filter_map(|f| std::fs::read_to_string(Path::new(f)).ok())
        .map(|text| nameservers(&text))
        .find(|list| !list.is_empty())
        .unwrap_or_default()
}

/// The `/etc/resolv.conf` a container gets.
pub fn resolv_conf(servers: &[Ipv4Addr]) -> String {
    if servers.is_empty() {
        return "# This provider's orders have no resolver configured.\n".to_string();
    }
    let mut text =
        String::from("# Written by Shale for this order; changes last until it restarts.\n");
    for s in servers.iter().take(3) {
        text.push_str(&format!("nameserver {s}\n"));
    }
    text.push_str("options timeout:2 attempts:2\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_stubs_are_left_out_and_upstreams_kept() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\n\
                    nameserver 1.1.1.1\nsearch example\n";
        assert_eq!(
            nameservers(text),
            vec![
                "10.255.255.53".parse::<Ipv4Addr>().unwrap(),
                "1.1.1.1".parse().unwrap()
            ]
        );
        assert!(resolv_conf(&nameservers(text)).contains("nameserver 1.1.1.1\n"));
        assert!(!resolv_conf(&[]).contains("nameserver"));
    }
}
