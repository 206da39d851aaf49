//! The client's side of OpenSSH: a `Host shale-ORDER` entry and a pinned `known_hosts` line
//! for the provider's gateway, taken from the host key registered on chain, so the first `ssh`
//! never asks to trust an unknown key.
//!
//! Entries live in `<ssh_dir>/shale/config` and `<ssh_dir>/shale/known_hosts`; `~/.ssh/config`
//! gets one `Include` line at its top (OpenSSH only honours `Include` before the first `Host`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Host and port of a gateway endpoint (`host:port`, `[v6]:port`, or `host` for port 22).
pub fn split_endpoint(endpoint: &str) -> anyhow::Result<(String, u16)> {
    let e = endpoint.trim();
    if let Some(rest) = e.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .with_context(|| format!("endpoint {endpoint:?} is not [address]:port"))?;
        return Ok((host.into(), port.parse().context("bad port in endpoint")?));
    }
    match e.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.into(),
            port.parse()
                .with_context(|| format!("bad port in endpoint {endpoint:?}"))?,
        )),
        None => Ok((e.into(), 22)),
    }
}

/// The `known_hosts` host pattern OpenSSH looks up for `host` and `port`.
pub fn known_hosts_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// How to reach one order.
#[derive(Debug, Clone)]
pub struct OrderHost {
    pub order: u64,
    pub host: String,
    pub port: u16,
    /// The gateway's host public key as registered on chain.
    pub host_key: String,
    /// The client's private key file (the public key's path without `.pub`).
    pub identity: PathBuf,
    /// The payment tunnel OpenSSH runs as `ProxyCommand`; none: ssh connects directly and
    /// bytes are paid only up to the order's allowance.
    pub tunnel: Option<Tunnel>,
}

/// How the Host entry runs `shale tunnel`.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// The `shale` binary.
    pub exe: PathBuf,
    /// Where and how it acknowledges; none: it only counts.
    pub acks: Option<TunnelAcks>,
}

/// What the tunnel needs to acknowledge an order's usage.
#[derive(Debug, Clone)]
pub struct TunnelAcks {
    pub rpc_url: String,
    pub marketplace: String,
    pub key: PathBuf,
}

impl OrderHost {
    /// The alias of the `Host` entry.
    pub fn alias(&self) -> String {
        format!("shale-{}", self.order)
    }
}

/// The files of the Shale part of an SSH directory.
#[derive(Debug, Clone)]
pub struct SshFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub known_hosts: PathBuf,
}

impl SshFiles {
    /// The files under `ssh_dir/shale/`.
    pub fn new(ssh_dir: &Path) -> Self {
        let dir = ssh_dir.join("shale");
        Self {
            config: dir.join("config"),
            known_hosts: dir.join("known_hosts"),
            dir,
        }
    }

    /// The acknowledgment key of order `order`.
    pub fn ack_key(&self, order: u64) -> PathBuf {
        self.dir.join("acks").join(format!("shale-{order}.key"))
    }

    /// The wire-count file of order `order`'s payment tunnel.
    pub fn wire_counts(&self, order: u64) -> PathBuf {
        self.dir.join("wire").join(format!("shale-{order}.json"))
    }

    /// Writes (or replaces) the entry and the pinned key of `host`; returns the alias.
    pub fn write(&self, host: &OrderHost, include_from: Option<&Path>) -> anyhow::Result<String> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let alias = host.alias();
        let entry = format!(
            "Host {alias}\n    HostName {}\n    Port {}\n    User {}\n    IdentityFile {}\n    \
             IdentitiesOnly yes\n    UserKnownHostsFile {}\n    StrictHostKeyChecking yes\n",
            host.host,
            host.port,
            host.order,
            host.identity.display(),
            self.known_hosts.display()
        );
        let entry = match &host.tunnel {
            Some(t) => {
                let mut proxy = format!(
                    "\"{}\" tunnel --counts \"{}\"",
                    t.exe.display(),
                    self.wire_counts(host.order).display()
                );
                if let Some(a) = &t.acks {
                    proxy.push_str(&format!(
                        " --ack-order {} --ack-key \"{}\" --ack-rpc-url \"{}\" \
                         --ack-marketplace {} --ssh-config \"{}\"",
                        host.order,
                        a.key.display(),
                        a.rpc_url,
                        a.marketplace,
                        self.config.display()
                    ));
                }
                format!("{entry}    ProxyCommand {proxy} %h %p\n")
            }
            None => entry,
        };
        replace_block(&self.config, &format!("Host {alias}\n"), &entry)?;
        let pattern = known_hosts_pattern(&host.host, host.port);
        let key = host
            .host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        replace_line(
            &self.known_hosts,
            &format!("{pattern} "),
            &format!("{pattern} {key}\n"),
        )?;
        if let Some(user_config) = include_from {
            ensure_include(user_config, &self.config)?;
        }
        Ok(alias)
    }
}

/// Replaces the block starting with `header` (up to the next `Host ` line) or appends it.
fn replace_block(path: &Path, header: &str, block: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = String::new();
    let mut skipping = false;
    for line in old.split_inclusive('\n') {
        if line == header {
            skipping = true;
            continue;
        }
        if skipping && line.starts_with("Host ") {
            skipping = false;
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out.push_str(block);
    write_private(path, &out)
}

/// Replaces the lines starting with `prefix` by `line`, or appends it.
fn replace_line(path: &Path, prefix: &str, line: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: String = old
        .split_inclusive('\n')
        .filter(|l| !l.starts_with(prefix))
        .collect();
    out.push_str(line);
    write_private(path, &out)
}

/// Puts `Include <ours>` at the top of the user's ssh config unless it is there.
fn ensure_include(user_config: &Path, ours: &Path) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(user_config).unwrap_or_default();
    let include = format!("Include {}\n", ours.display());
    if old.contains(include.trim_end()) {
        return Ok(());
    }
    write_private(user_config, &format!("{include}{old}"))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("shale-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split_into_host_and_port() {
        assert_eq!(
            split_endpoint("127.0.0.1:2222").unwrap(),
            ("127.0.0.1".into(), 2222)
        );
        assert_eq!(split_endpoint("[::1]:2200").unwrap(), ("::1".into(), 2200));
        assert_eq!(
            split_endpoint("sp.example").unwrap(),
            ("sp.example".into(), 22)
        );
        assert!(split_endpoint("sp:port").is_err());
        assert_eq!(known_hosts_pattern("h", 22), "h");
        assert_eq!(known_hosts_pattern("h", 2222), "[h]:2222");
    }

    #[test]
    fn entries_are_replaced_not_duplicated() {
        let dir = tempfile::tempdir().unwrap();
        let files = SshFiles::new(dir.path());
        let user = dir.path().join("config");
        std::fs::write(&user, "Host other\n    User me\n").unwrap();
        let mut host = OrderHost {
            order: 7,
            host: "127.0.0.1".into(),
            port: 2222,
            host_key: "ssh-ed25519 AAAAC3 comment".into(),
            identity: "/k/id".into(),
            tunnel: None,
        };
        assert_eq!(files.write(&host, Some(&user)).unwrap(), "shale-7");
        host.port = 2223;
        files.write(&host, Some(&user)).unwrap();
        let config = std::fs::read_to_string(&files.config).unwrap();
        assert_eq!(config.matches("Host shale-7").count(), 1);
        assert!(config.contains("Port 2223"));
        let known = std::fs::read_to_string(&files.known_hosts).unwrap();
        assert_eq!(
            known,
            "[127.0.0.1]:2222 ssh-ed25519 AAAAC3\n[127.0.0.1]:2223 ssh-ed25519 AAAAC3\n"
        );
        let user_text = std::fs::read_to_string(&user).unwrap();
        assert!(user_text.starts_with("Include "));
        assert_eq!(user_text.matches("Include").count(), 1);
        assert!(user_text.ends_with("Host other\n    User me\n"));
        assert!(!config.contains("ProxyCommand"));

        // With the tunnel, OpenSSH reaches the gateway through `shale tunnel`.
        host.tunnel = Some(Tunnel {
            exe: "/usr/bin/shale".into(),
            acks: None,
        });
        files.write(&host, None).unwrap();
        let config = std::fs::read_to_string(&files.config).unwrap();
        let counts = files.wire_counts(7);
        assert!(
            config.contains(&format!(
                "    ProxyCommand \"/usr/bin/shale\" tunnel --counts \"{}\" %h %p\n",
                counts.display()
            )),
            "{config}"
        );
        assert_eq!(config.matches("Host shale-7").count(), 1);
    }
}
