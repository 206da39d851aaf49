//! Outages on demand: a TCP relay between the gateway and the chain's RPC endpoint that a test
//! can cut and restore, so the chain "goes away" for the gateway while anvil keeps its state (and
//! the test's own client keeps reaching it directly).
//!
//! A cut is what a dead RPC provider looks like from the gateway: the connections it holds are
//! closed mid-stream and new ones are refused (the listening socket is closed, so `connect`
//! fails with "connection refused"). A restore listens again on the same port, so the URL the
//! gateway was configured with works again without restarting anything.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

/// A relay from a local port to an upstream TCP endpoint (here anvil's JSON-RPC), which
/// [`RpcRelay::cut`] takes down and [`RpcRelay::restore`] brings back on the same port.
pub struct RpcRelay {
    addr: SocketAddr,
    upstream: SocketAddr,
    /// `true` while the relay serves; every task watches it and stops when it turns `false`.
    open: watch::Sender<bool>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    live: AtomicUsize,
}

impl std::fmt::Debug for RpcRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcRelay")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("open", &*self.open.borrow())
            .finish()
    }
}

impl RpcRelay {
    /// Starts relaying from a free loopback port to `upstream`, an `http://HOST:PORT` URL (as
    /// [`shale_contracts::devnet::Devnet::rpc_url`] gives) or a `HOST:PORT`.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let hostport = upstream.trim_start_matches("http://").trim_end_matches('/');
        let upstream: SocketAddr = hostport
            .parse()
            .with_context(|| format!("the relay's upstream {upstream:?} is not http://IP:PORT"))?;
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let (open, _) = watch::channel(true);
        let relay = Self {
            addr,
            upstream,
            open,
            acceptor: Mutex::new(None),
            counts: Arc::default(),
        };
        *relay.acceptor.lock().await = Some(relay.spawn_acceptor(listener));
        Ok(relay)
    }

    /// The URL to give the gateway in place of the upstream's.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted since the start (across cuts).
    pub fn accepted(&self) -> u64 {
        self.counts.accepted.load(Ordering::Relaxed)
    }

    /// Whether the relay serves now.
    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Takes the relay down: closes every relayed connection and stops listening, so new
    /// connections are refused. Returns once nothing is relayed any more.
    pub async fn cut(&self) -> anyhow::Result<()> {
        self.open.send_replace(false);
        if let Some(acceptor) = self.acceptor.lock().await.take() {
            acceptor.await.context("the relay's acceptor panicked")?;
        }
        // Each connection's task drops both its sockets as soon as it sees the cut.
        for _ in 0..500 {
            if self.counts.live.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!(
            "{} relayed connections still open after the cut",
            self.counts.live.load(Ordering::Acquire)
        )
    }

    /// Serves again on the same port after [`RpcRelay::cut`].
    pub async fn restore(&self) -> anyhow::Result<()> {
        let mut acceptor = self.acceptor.lock().await;
        if acceptor.is_some() {
            return Ok(());
        }
        // The port was free while cut; something else could have taken it in the meantime (an
        // outgoing connection's ephemeral port, rarely), which a few tries wait out.
        let mut tries = 0;
        let listener = loop {
            match listen(self.addr) {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "listening again on the relay's port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("listening again on {}", self.addr))
                }
            }
        };
        self.open.send_replace(true);
        *acceptor = Some(self.spawn_acceptor(listener));
        Ok(())
    }

    fn spawn_acceptor(&self, listener: TcpListener) -> JoinHandle<()> {
        let mut open = self.open.subscribe();
        let stop = self.open.subscribe();
        let counts = self.counts.clone();
        let upstream = self.upstream;
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = open.wait_for(|open| !open) => break,
                };
                let Ok((client, _)) = accepted else {
                    continue;
                };
                counts.accepted.fetch_add(1, Ordering::Relaxed);
                counts.live.fetch_add(1, Ordering::AcqRel);
                let counts = counts.clone();
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = relay(client, upstream) => {}
                        _ = stop.wait_for(|open| !open) => {}
                    }
                    counts.live.fetch_sub(1, Ordering::AcqRel);
                });
            }
            // Dropping the listener here is what refuses new connections.
        })
    }
}

impl Drop for RpcRelay {
    fn drop(&mut self) {
        self.open.send_replace(false);
    }
}

/// A listening socket on `addr` that can be bound again at once after it is closed (the
/// accepted connections' TIME_WAIT entries keep the port otherwise).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that answers every connection with one line.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn a_cut_closes_live_connections_and_refuses_new_ones_until_restored() {
        let upstream = echo_server().await;
        let relay = RpcRelay::start(&format!("http://{upstream}"))
            .await
            .unwrap();
        let addr: SocketAddr = relay.url().trim_start_matches("http://").parse().unwrap();
        let mut live = TcpStream::connect(addr).await.unwrap();
        assert_eq!(round_trip(&mut live).await.unwrap(), b"ping");

        relay.cut().await.unwrap();
        assert!(!relay.is_open());
        // The live connection is closed: a read sees EOF or a reset.
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(10), live.read(&mut buf))
            .await
            .expect("the cut connection is closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let refused = TcpStream::connect(addr)
            .await
            .expect_err("refused while cut");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

        relay.restore().await.unwrap();
        let mut again = TcpStream::connect(addr).await.unwrap();
        assert_eq!(round_trip(&mut again).await.unwrap(), b"ping");
        assert_eq!(relay.accepted(), 2);
    }
}
