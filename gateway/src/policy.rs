//! What a client may ask for on a channel: environment variables, subsystems, forwarding targets.
//! Pure rules, applied both when answering a request and when acting on it.

/// Variables every session may set, as OpenSSH's default `AcceptEnv LANG LC_*` plus `TERM`.
const BASE_ENV: &[&str] = &["LANG", "LC_*", "TERM", "COLORTERM"];

/// The environment variables clients may set.
#[derive(Debug, Clone)]
pub struct EnvPolicy {
    patterns: Vec<String>,
}

impl EnvPolicy {
    /// The base set plus `extra` patterns (a trailing `*` matches any suffix).
    pub fn new(extra: &[String]) -> Self {
        let mut patterns: Vec<String> = BASE_ENV.iter().map(|s| s.to_string()).collect();
        patterns.extend(extra.iter().cloned());
        Self { patterns }
    }

    /// Whether `name=value` may be set in the container process.
    pub fn allows(&self, name: &str, value: &str) -> bool {
        let well_formed = !name.is_empty()
            && name.len() <= 256
            && value.len() <= 4096
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !value.contains('\0');
        well_formed
            && self.patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == p,
            })
    }
}

/// Most environment variables one channel may set, and the most bytes (names and values) they
/// may hold together: OpenSSH clients send a few (`LANG`, `LC_*`, `SendEnv`); a client that sends
/// more is refused the rest, so a channel's environment cannot grow the gateway's memory.
pub const MAX_ENV_VARS: usize = 64;
/// See [`MAX_ENV_VARS`].
pub const MAX_ENV_BYTES: usize = 32 * 1024;

/// What one channel's env requests have used of their allowance. The connection's handler (which
/// answers each request) and the channel's task (which keeps the values) each run one over the
/// same requests in the same order, so they agree on which were kept.
#[derive(Debug, Default, Clone)]
pub struct EnvBudget {
    vars: usize,
    bytes: usize,
}

impl EnvBudget {
    /// Whether `name=value` may be set on this channel now (by `policy`, and within the caps);
    /// counts it if so.
    pub fn admit(&mut self, policy: &EnvPolicy, name: &str, value: &str) -> bool {
        let size = name.len() + value.len();
        if !policy.allows(name, value)
            || self.vars >= MAX_ENV_VARS
            || self.bytes + size > MAX_ENV_BYTES
        {
            return false;
        }
        self.vars += 1;
        self.bytes += size;
        true
    }
}

/// A subsystem the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsystem {
    /// SFTP, served by the container's own `sftp-server` (also `scp` in its default SFTP mode).
    Sftp,
    /// The order's tick log and session records as JSON lines, answered by the gateway itself
    /// (no container needed), so the client can recompute the chain of what it is billed for.
    Receipts,
    /// The client's payment tunnel acknowledging the order's usage (EIP-712), answered by the
    /// gateway itself.
    Ack,
}

/// The path of OpenSSH's sftp-server in the default (Debian) image.
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

impl Subsystem {
    /// The subsystem called `name`, if served.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "sftp" => Some(Subsystem::Sftp),
            "shale-receipts" => Some(Subsystem::Receipts),
            "shale-ack" => Some(Subsystem::Ack),
            _ => None,
        }
    }

    /// The name clients ask for it by.
    pub fn name(self) -> &'static str {
        match self {
            Subsystem::Sftp => "sftp",
            Subsystem::Receipts => "shale-receipts",
            Subsystem::Ack => "shale-ack",
        }
    }
}

/// Why a `direct-tcpip` target is refused before anything is dialled. The `Display` text is what
/// the client's `ssh` prints after `open failed: administratively prohibited:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardRefusal {
    /// Port 0 or above 65535.
    #[error("port {0} is not a TCP port")]
    Port(u32),
    /// Not an address or a host name.
    #[error("{0:?} is not a host name or an IPv4 address")]
    Host(String),
    /// An IPv6 address other than `::1`.
    #[error("orders have IPv4 only; of IPv6 only ::1 is reachable")]
    Ipv6,
}

/// Checks a `direct-tcpip` target (`ssh -L`, `ssh -D`, `ssh -W`) and returns its port. Any
/// well-formed target is allowed here: it is dialled from inside the order's network namespace,
/// so the order's own network rules decide what it reaches (its loopback and the internet, never
/// the SP's host, private ranges or other orders), exactly as for the container's connections.
pub fn check_forward(host: &str, port: u32) -> Result<u16, ForwardRefusal> {
    let port = match u16::try_from(port) {
        Ok(p) if p != 0 => p,
        _ => return Err(ForwardRefusal::Port(port)),
    };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.contains(':') {
        return match bare.parse::<std::net::Ipv6Addr>() {
            Ok(v6) if v6.is_loopback() => Ok(port),
            Ok(_) => Err(ForwardRefusal::Ipv6),
            Err(_) => Err(ForwardRefusal::Host(host.to_string())),
        };
    }
    // A DNS name (or an IPv4 literal, which has the same characters): at most 253 bytes, labels
    // of letters, digits, `-` and `_` that neither start nor end with `-`, and an optional
    // trailing dot.
    let name = bare.strip_suffix('.').unwrap_or(bare);
    let well_formed = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if well_formed {
        Ok(port)
    } else {
        Err(ForwardRefusal::Host(host.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locale_and_term_pass_and_the_rest_does_not() {
        let policy = EnvPolicy::new(&[]);
        assert!(policy.allows("LANG", "C.UTF-8"));
        assert!(policy.allows("LC_ALL", "C"));
        assert!(policy.allows("TERM", "xterm-256color"));
        for name in [
            "LD_PRELOAD",
            "PATH",
            "HOME",
            "BASH_ENV",
            "LANGUAGE_X",
            "",
            "LC-ALL",
        ] {
            assert!(!policy.allows(name, "x"), "{name}");
        }
        assert!(!policy.allows("LANG", "a\0b"));
    }

    #[test]
    fn configured_patterns_extend_the_base_set() {
        let policy = EnvPolicy::new(&["JUPYTER_*".into(), "WANDB_API_KEY".into()]);
        assert!(policy.allows("JUPYTER_TOKEN", "t"));
        assert!(policy.allows("WANDB_API_KEY", "k"));
        assert!(!policy.allows("WANDB_MODE", "k"));
    }

    #[test]
    fn a_channel_sets_at_most_the_capped_count_and_bytes() {
        let policy = EnvPolicy::new(&["X_*".into()]);
        let mut budget = EnvBudget::default();
        let kept = (0..100_000)
            .filter(|i| budget.admit(&policy, &format!("X_{i}"), "v"))
            .count();
        assert_eq!(kept, MAX_ENV_VARS);
        let mut budget = EnvBudget::default();
        let big = "v".repeat(4000);
        let kept = (0..100)
            .filter(|i| budget.admit(&policy, &format!("X_{i}"), &big))
            .count();
        assert_eq!(kept, MAX_ENV_BYTES / 4004);
        // Refused names do not use the allowance.
        let mut budget = EnvBudget::default();
        for _ in 0..1000 {
            assert!(!budget.admit(&policy, "LD_PRELOAD", "x"));
        }
        assert!(budget.admit(&policy, "LANG", "C"));
    }

    #[test]
    fn only_sftp_receipts_and_acks_are_subsystems() {
        assert_eq!(Subsystem::named("sftp"), Some(Subsystem::Sftp));
        assert_eq!(
            Subsystem::named("shale-receipts"),
            Some(Subsystem::Receipts)
        );
        assert_eq!(Subsystem::named("shale-ack"), Some(Subsystem::Ack));
        assert_eq!(Subsystem::named("netconf"), None);
        for sub in [Subsystem::Sftp, Subsystem::Receipts, Subsystem::Ack] {
            assert_eq!(Subsystem::named(sub.name()), Some(sub));
        }
    }

    #[test]
    fn forwards_to_the_containers_loopback_and_the_internet_pass() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "::1",
            "[::1]",
            "203.0.113.7",
            "pypi.org",
            "files.pythonhosted.org.",
            "update.code.visualstudio.com",
            "my_host-1",
            // Denied ranges are well-formed targets: the order's network refuses them, not the
            // gateway, so a forward reaches exactly what the container itself reaches.
            "10.0.0.1",
            "169.254.169.254",
        ] {
            assert_eq!(check_forward(host, 8888), Ok(8888), "{host}");
        }
    }

    #[test]
    fn malformed_targets_ipv6_and_bad_ports_are_refused_with_a_reason() {
        assert_eq!(check_forward("localhost", 0), Err(ForwardRefusal::Port(0)));
        assert_eq!(
            check_forward("localhost", 70_000),
            Err(ForwardRefusal::Port(70_000))
        );
        for host in ["2001:db8::1", "[fe80::1]", "::ffff:10.0.0.1"] {
            assert_eq!(check_forward(host, 80), Err(ForwardRefusal::Ipv6), "{host}");
        }
        let long = "a".repeat(254);
        for host in [
            "",
            ".",
            "a..b",
            "-",
            "a b",
            "host/path",
            "a\0b",
            "exa\u{301}mple.com",
            "1:2:3",
            long.as_str(),
        ] {
            assert_eq!(
                check_forward(host, 80),
                Err(ForwardRefusal::Host(host.to_string())),
                "{host:?}"
            );
        }
        assert!(ForwardRefusal::Ipv6.to_string().contains("IPv4 only"));
    }
}
