//! Before a connection has logged in it costs the gateway a socket and a task and has given
//! nothing: these are the limits that keep silent or slow clients from crowding out customers,
//! as sshd's `LoginGraceTime`, `MaxStartups` and `PerSourceMaxStartups` do.
//!
//! - [`Startups`] counts unauthenticated connections in all and per source (an IPv4 address or an
//!   IPv6 /64) and admits a new one or says why not. Past `start` it drops at random, like sshd,
//!   but only connections from sources that already have one waiting: a source's first
//!   connection is refused only at `full`, so one busy address cannot push everyone else out.
//! - [`refuse_before_ssh`] tells a refused client why in a form OpenSSH prints: our version line
//!   and a plaintext `SSH_MSG_DISCONNECT` (allowed before key exchange), shown even at
//!   `LogLevel=ERROR` as `Received disconnect from …: <reason>`.
//! - [`GraceStream`] wraps the socket so the accept loop can cut it when the login grace time
//!   runs out, whatever russh is waiting for; time counts from accept and no traffic extends it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::config::MaxStartups;

/// Where unauthenticated connections are counted together: an IPv4 address, or the /64 of an
/// IPv6 address (one customer's LAN; a host can pick any address in it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    /// The source `ip` counts under.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Self(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why a connection was not let in before SSH began. The `Display` text is what the client reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overload {
    /// The gateway holds `max_connections` connections already.
    #[error("the provider's gateway is at capacity ({0} connections); try again in a minute")]
    Capacity(usize),
    /// Too many unauthenticated connections from the client's source.
    #[error("too many connections from your address are still logging in ({0} at once); wait for them to finish and try again")]
    PerSource(usize),
    /// Too many unauthenticated connections in all (random early drop or full).
    #[error("the provider's gateway is busy with other logins; try again in a moment")]
    Startups,
}

impl Overload {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Overload::Capacity(_) => "max_connections",
            Overload::PerSource(_) => "per_source",
            Overload::Startups => "max_startups",
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<SourceKey, usize>,
}

/// Unauthenticated connections now, in all and per source.
#[derive(Clone)]
pub struct Startups {
    limits: MaxStartups,
    per_source: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One admitted, still unauthenticated connection; dropping it (at login or close) frees its place.
pub struct StartupTicket {
    counts: Arc<Mutex<Counts>>,
    source: SourceKey,
}

impl Drop for StartupTicket {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain counters, consistent at every step: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Startups {
    /// Limits as `MaxStartups` says, and at most `per_source` from one source.
    pub fn new(limits: MaxStartups, per_source: usize) -> Self {
        Self {
            limits,
            per_source: per_source.max(1),
            counts: Arc::default(),
        }
    }

    /// Unauthenticated connections now.
    pub fn total(&self) -> usize {
        lock(&self.counts).total
    }

    /// Admits a new connection from `ip`, or says why not. `roll` is a uniform random number in
    /// 0..100 (the caller's, so tests can choose it).
    pub fn admit(&self, ip: IpAddr, roll: u32) -> Result<StartupTicket, Overload> {
        let source = SourceKey::of(ip);
        let mut counts = lock(&self.counts);
        let from_source = counts.by_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.per_source {
            return Err(Overload::PerSource(self.per_source));
        }
        let MaxStartups { start, rate, full } = self.limits;
        let total = counts.total;
        if total >= full {
            return Err(Overload::Startups);
        }
        if total >= start && from_source > 0 {
            // sshd's line: `rate` percent at `start`, rising to 100 at `full`.
            let span = (full - start).max(1) as u64;
            let p = u64::from(rate) + u64::from(100 - rate) * (total - start) as u64 / span;
            if u64::from(roll) < p {
                return Err(Overload::Startups);
            }
        }
        counts.total += 1;
        *counts.by_source.entry(source).or_insert(0) += 1;
        Ok(StartupTicket {
            counts: self.counts.clone(),
            source,
        })
    }
}

/// A uniform random number in 0..100 for [`Startups::admit`].
pub fn roll() -> u32 {
    let mut b = [0u8; 4];
    // Without entropy, never drop at random: the hard limits still hold.
    if getrandom::fill(&mut b).is_err() {
        return 100;
    }
    u32::from_le_bytes(b) % 100
}

/// The bytes a refused client reads: our version line, then a plaintext disconnect with `text`.
pub fn refusal_bytes(server_id: &str, text: &str) -> Vec<u8> {
    const DISCONNECT: u8 = 1;
    /// RFC 4253 §11.1 `SSH_DISCONNECT_TOO_MANY_CONNECTIONS`.
    const TOO_MANY_CONNECTIONS: u32 = 12;
    let line = format!("shale: {text}");
    let mut payload = vec![DISCONNECT];
    payload.extend_from_slice(&TOO_MANY_CONNECTIONS.to_be_bytes());
    payload.extend_from_slice(&(line.len() as u32).to_be_bytes());
    payload.extend_from_slice(line.as_bytes());
    payload.extend_from_slice(&0u32.to_be_bytes());
    // RFC 4253 §6: padding of at least 4 bytes, the whole packet a multiple of 8.
    let mut padding = 8 - (5 + payload.len()) % 8;
    if padding < 4 {
        padding += 8;
    }
    let mut out = format!("{server_id}\r\n").into_bytes();
    out.extend_from_slice(&((1 + payload.len() + padding) as u32).to_be_bytes());
    out.push(padding as u8);
    out.extend_from_slice(&payload);
    out.extend(std::iter::repeat_n(0u8, padding));
    out
}

/// Tells a client refused before SSH began why, then closes. The client's own bytes are read
/// (and dropped) for up to `linger` so that closing does not reset the connection before it has
/// read the reason.
pub async fn refuse_before_ssh<S>(mut socket: S, server_id: &str, text: &str, linger: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let bytes = refusal_bytes(server_id, text);
    let sent = tokio::time::timeout(linger, async {
        socket.write_all(&bytes).await?;
        socket.shutdown().await?;
        let mut sink = [0u8; 1024];
        while socket.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!("the refused client did not read its reason in time");
    }
}

/// A socket the gateway can cut: once `cut` is cancelled every read and write fails, so
/// whatever russh is waiting for (the version line, a key exchange that never comes) ends.
pub struct GraceStream<S> {
    inner: S,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> GraceStream<S> {
    /// `inner`, cut when `cut` is cancelled.
    pub fn new(inner: S, cut: CancellationToken) -> Self {
        Self {
            inner,
            cut: Box::pin(cut.cancelled_owned()),
        }
    }

    fn is_cut(&mut self, cx: &mut Context<'_>) -> bool {
        self.cut.as_mut().poll(cx).is_ready()
    }
}

fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the login grace time ran out before authentication",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for GraceStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GraceStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises this process's open-file limit to its hard limit: every connection is a descriptor,
/// and the usual soft limit of 1024 would let a thousand idle sockets stop `accept`. Returns the
/// limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            SourceKey::of(ip("2001:db8:1:2:aaaa::1")),
            SourceKey::of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            SourceKey::of(ip("2001:db8:1:2::1")),
            SourceKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            SourceKey::of(ip("::ffff:192.0.2.7")),
            SourceKey::of(ip("192.0.2.7"))
        );
        assert_ne!(
            SourceKey::of(ip("192.0.2.7")),
            SourceKey::of(ip("192.0.2.8"))
        );
        assert_eq!(
            SourceKey::of(ip("2001:db8::5")).to_string(),
            "2001:db8::/64"
        );
    }

    #[test]
    fn one_source_is_capped_and_others_still_get_in() {
        let startups = Startups::new(MaxStartups::default(), 3);
        let held: Vec<_> = (0..3)
            .map(|_| startups.admit(ip("192.0.2.1"), 0).unwrap())
            .collect();
        assert_eq!(
            startups.admit(ip("192.0.2.1"), 99).err(),
            Some(Overload::PerSource(3))
        );
        assert!(startups.admit(ip("192.0.2.2"), 0).is_ok());
        drop(held);
        assert_eq!(startups.total(), 0);
        assert!(startups.admit(ip("192.0.2.1"), 0).is_ok());
    }

    #[test]
    fn random_early_drop_follows_sshds_line_for_sources_already_waiting() {
        let limits = MaxStartups {
            start: 10,
            rate: 30,
            full: 100,
        };
        let startups = Startups::new(limits, 1000);
        let mut held: Vec<_> = (0..10)
            .map(|_| startups.admit(ip("192.0.2.1"), 0).unwrap())
            .collect();
        // At start the drop probability is 30 %: a roll of 29 drops, 30 passes.
        assert_eq!(
            startups.admit(ip("192.0.2.1"), 29).err(),
            Some(Overload::Startups)
        );
        held.push(startups.admit(ip("192.0.2.1"), 30).unwrap());
        // A source with nothing waiting is not dropped at random, only at full.
        held.push(startups.admit(ip("198.51.100.1"), 0).unwrap());
        while startups.total() < 100 {
            held.push(
                startups
                    .admit(ip("192.0.2.1"), 99)
                    .unwrap_or_else(|_| startups.admit(ip("203.0.113.1"), 0).unwrap()),
            );
        }
        assert_eq!(
            startups.admit(ip("198.51.100.2"), 99).err(),
            Some(Overload::Startups)
        );
    }

    #[test]
    fn the_refusal_is_a_version_line_and_a_well_formed_disconnect() {
        let bytes = refusal_bytes("SSH-2.0-Shale_test", "busy");
        let line_end = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
        assert_eq!(&bytes[..line_end], b"SSH-2.0-Shale_test");
        let packet = &bytes[line_end + 2..];
        let len = u32::from_be_bytes(packet[..4].try_into().unwrap()) as usize;
        assert_eq!(packet.len(), 4 + len);
        assert_eq!(packet.len() % 8, 0);
        let padding = packet[4] as usize;
        assert!(padding >= 4);
        assert_eq!(packet[5], 1, "SSH_MSG_DISCONNECT");
        let text_len = u32::from_be_bytes(packet[10..14].try_into().unwrap()) as usize;
        assert_eq!(&packet[14..14 + text_len], b"shale: busy");
    }

    #[tokio::test]
    async fn a_cut_stream_fails_its_pending_read() {
        let (a, _b) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let mut stream = GraceStream::new(a, cut.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            stream.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        cut.cancel();
        let err = reader.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let now = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(now, lim.rlim_cur);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
    }
}
