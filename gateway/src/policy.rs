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

/// A subsystem the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsystem {
    /// SFTP, served by the container's own `sftp-server` (also `scp` in its default SFTP mode).
    Sftp,
    /// The order's tick log and session records as JSON lines, answered by the gateway itself
    /// (no container needed), so the client can recompute the chain of what it is billed for.
    Receipts,
}

/// The path of OpenSSH's sftp-server in the default (Debian) image.
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

impl Subsystem {
    /// The subsystem called `name`, if served.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "sftp" => Some(Subsystem::Sftp),
            "shale-receipts" => Some(Subsystem::Receipts),
            _ => None,
        }
    }
}

/// Whether a `direct-tcpip` target names the container's own loopback. Only that is forwarded:
/// never the SP's host, its network, or another order.
pub fn is_container_loopback(host: &str) -> bool {
    matches!(
        host.to_ascii_lowercase().as_str(),
        "localhost" | "127.0.0.1" | "::1" | "[::1]" | "ip6-localhost"
    )
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
    fn only_sftp_and_receipts_are_subsystems() {
        assert_eq!(Subsystem::named("sftp"), Some(Subsystem::Sftp));
        assert_eq!(
            Subsystem::named("shale-receipts"),
            Some(Subsystem::Receipts)
        );
        assert_eq!(Subsystem::named("netconf"), None);
    }

    #[test]
    fn forwarding_reaches_only_the_containers_loopback() {
        for ok in ["localhost", "127.0.0.1", "::1", "LOCALHOST"] {
            assert!(is_container_loopback(ok), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            "169.254.169.254",
            "example.com",
            "127.0.0.2",
            "0.0.0.0",
            "",
        ] {
            assert!(!is_container_loopback(bad), "{bad}");
        }
    }
}
