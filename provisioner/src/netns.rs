//! TCP from inside an order's network namespace, for `ssh -L` and `ssh -D`: a dedicated thread
//! enters the namespace of the container's init, resolves the target there if it is a name, and
//! connects. The socket keeps its namespace after the thread ends, so the gateway uses it like
//! any other connection, and the host-side rules of the order's network apply to it exactly as
//! to the container's own connections: loopback is the container's, the internet is reachable,
//! the host, private ranges and other orders are not.

use std::io::{Error, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use tracing::instrument;

use crate::{ProvisionError, Provisioner};

/// How long one connection attempt may take; a name with several addresses shares it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long resolving and connecting may take together before the caller gives up (the
/// system resolver has its own timeouts, which this bounds for the caller).
const DIAL_TIMEOUT: Duration = Duration::from_secs(20);

/// What to dial for a target host, decided before entering the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dial {
    /// Addresses to try in turn.
    Addrs(Vec<IpAddr>),
    /// A name for the system resolver, asked from inside the namespace.
    Name(String),
}

/// Turns the host of a forward into what to dial: IPv4 literals as they are, `::1` (orders have
/// IPv4 only otherwise), `localhost` as the container's loopback, any other name for the
/// resolver. Names under `.invalid` never resolve and are refused without asking anyone.
fn dial_for(host: &str) -> Result<Dial, Error> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(v4) = bare.parse::<Ipv4Addr>() {
        return Ok(Dial::Addrs(vec![IpAddr::V4(v4)]));
    }
    if let Ok(v6) = bare.parse::<Ipv6Addr>() {
        return if v6.is_loopback() {
            Ok(Dial::Addrs(vec![IpAddr::V6(v6)]))
        } else {
            Err(Error::new(
                ErrorKind::Unsupported,
                "orders have IPv4 only; of IPv6 only ::1 is reachable",
            ))
        };
    }
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Err(Error::new(ErrorKind::InvalidInput, "no host given"));
    }
    match name.as_str() {
        "localhost" | "localhost.localdomain" => Ok(Dial::Addrs(vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ])),
        "ip6-localhost" | "ip6-loopback" => Ok(Dial::Addrs(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)])),
        n if n.ends_with(".localhost") => Ok(Dial::Addrs(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)])),
        n if n == "invalid" || n.ends_with(".invalid") => Err(Error::new(
            ErrorKind::NotFound,
            "names under .invalid do not exist",
        )),
        _ => Ok(Dial::Name(bare.to_string())),
    }
}

/// Resolves (when needed) and connects, in the calling thread's network namespace. Of a name's
/// addresses only IPv4 ones are tried, in the resolver's order, within one shared deadline.
fn dial(target: &Dial, port: u16) -> Result<TcpStream, Error> {
    let addrs: Vec<SocketAddr> = match target {
        Dial::Addrs(ips) => ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
        Dial::Name(name) => {
            let found: Vec<SocketAddr> = (name.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| {
                    Error::new(ErrorKind::NotFound, format!("cannot resolve {name}: {e}"))
                })?
                .filter(SocketAddr::is_ipv4)
                .collect();
            if found.is_empty() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("{name} has no IPv4 address, and orders have IPv4 only"),
                ));
            }
            found
        }
    };
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut first_error = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(stream) => {
                stream.set_nonblocking(true)?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            // The first failure says most: for `localhost` it is 127.0.0.1's, not that of a
            // ::1 the container may not have.
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| Error::from(ErrorKind::TimedOut)))
}

impl Provisioner {
    /// Opens a TCP connection to `host:port` as the order's container would: from inside its
    /// network namespace, so `localhost` is the container's loopback and everything else goes
    /// through the order's own network and its rules. `host` is an IPv4 address, `::1`,
    /// `localhost` or a name, resolved inside the namespace with the system resolver.
    #[instrument(skip(self))]
    pub async fn connect_tcp(
        &self,
        order: u64,
        host: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, ProvisionError> {
        let failed = |source: Error| ProvisionError::Connect {
            order,
            host: host.to_string(),
            port,
            source,
        };
        let target = dial_for(host).map_err(failed)?;
        let pid = self.task_pid(order).await?;
        let ns_path = format!("/proc/{pid}/ns/net");
        let ns = std::fs::File::open(&ns_path).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                ProvisionError::NotProvisioned { order }
            } else {
                ProvisionError::io("open the network namespace", ns_path.clone(), e)
            }
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A thread of its own: after setns it lives in the order's namespace, so it must never
        // go back to a pool that other work uses.
        std::thread::Builder::new()
            .name(format!("netns-order-{order}"))
            .spawn(move || {
                let result = setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(Error::from)
                    .and_then(|()| dial(&target, port));
                let _ = tx.send(result);
            })
            .map_err(|e| ProvisionError::io("start a thread for", "the network namespace", e))?;
        // A resolver that hangs keeps its thread, not the caller.
        let stream = match tokio::time::timeout(DIAL_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.map_err(failed)?,
            Ok(Err(_)) => return Err(failed(Error::other("connector thread died"))),
            Err(_) => {
                return Err(failed(Error::new(
                    ErrorKind::TimedOut,
                    format!("no connection within {}s", DIAL_TIMEOUT.as_secs()),
                )))
            }
        };
        tokio::net::TcpStream::from_std(stream).map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }

    #[test]
    fn literals_and_localhost_are_dialled_without_a_resolver() {
        assert_eq!(
            dial_for("203.0.113.7").unwrap(),
            Dial::Addrs(vec![v4("203.0.113.7")])
        );
        assert_eq!(
            dial_for("127.0.0.2").unwrap(),
            Dial::Addrs(vec![v4("127.0.0.2")])
        );
        let v6_loopback = Dial::Addrs(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        assert_eq!(dial_for("::1").unwrap(), v6_loopback);
        assert_eq!(dial_for("[::1]").unwrap(), v6_loopback);
        assert_eq!(dial_for("ip6-localhost").unwrap(), v6_loopback);
        for host in ["localhost", "LOCALHOST", "localhost."] {
            assert_eq!(
                dial_for(host).unwrap(),
                Dial::Addrs(vec![v4("127.0.0.1"), IpAddr::V6(Ipv6Addr::LOCALHOST)]),
                "{host}"
            );
        }
        assert_eq!(
            dial_for("jupyter.localhost").unwrap(),
            Dial::Addrs(vec![v4("127.0.0.1")])
        );
    }

    #[test]
    fn names_go_to_the_resolver_and_ipv6_beyond_loopback_is_refused() {
        assert_eq!(dial_for("pypi.org").unwrap(), Dial::Name("pypi.org".into()));
        for host in ["2001:db8::1", "[fe80::1]", "::ffff:10.0.0.1", "::"] {
            let err = dial_for(host).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{host}");
            assert!(err.to_string().contains("IPv4 only"), "{host}");
        }
        assert_eq!(
            dial_for("example.invalid").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(dial_for("").unwrap_err().kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn a_closed_port_fails_with_the_first_addresss_error() {
        // Port 1 on loopback: nothing listens there on a test machine.
        let err = dial(&Dial::Addrs(vec![v4("127.0.0.1")]), 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    }
}
