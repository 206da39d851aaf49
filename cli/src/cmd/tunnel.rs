//! `shale tunnel HOST PORT --counts FILE`: the client's local payment tunnel, run by OpenSSH as
//! the `ProxyCommand` of the `Host shale-N` entry `shale order create` writes.
//!
//! It relays the TCP stream unchanged (OpenSSH still does all of SSH) and counts every byte
//! each way in the order's wire-count file before relaying it. SSH's framing, padding and MACs
//! make the wire bytes exceed the channel payload the gateway meters, so an honest provider's
//! byte totals never exceed these counts; `shale receipts --verify` holds them against it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::ack::{Exchange, Outcome};
use crate::wire::{Direction, Reservation, WireCounts};

/// When the tunnel acknowledges the order's usage: every `every`, or sooner once `bytes` more
/// went through.
#[derive(Debug, Clone)]
pub struct AckPlan {
    /// Everything one exchange needs except the chain's figures, fetched lazily.
    pub exchange: PendingExchange,
    pub every: Duration,
    pub bytes: u64,
}

/// The parts of an [`Exchange`] known before the chain is asked.
#[derive(Debug, Clone)]
pub struct PendingExchange {
    pub rpc_url: String,
    pub marketplace: shale_contracts::Address,
    pub order: u64,
    pub ssh_config: std::path::PathBuf,
    pub exe: std::path::PathBuf,
    pub counts: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl PendingExchange {
    /// Asks the chain for its id and the lease's start, once.
    fn resolve(&self) -> anyhow::Result<Exchange> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (chain_id, order) = rt.block_on(async {
            let market =
                shale_contracts::Marketplace::connect(&self.rpc_url, self.marketplace, None)
                    .await?;
            let chain_id = market.chain_id().await?;
            let order = market.order(self.order).await?;
            anyhow::Ok((chain_id, order))
        })?;
        Ok(Exchange {
            ssh_config: self.ssh_config.clone(),
            alias: format!("shale-{}", self.order),
            exe: self.exe.clone(),
            counts: self.counts.clone(),
            key: self.key.clone(),
            expected: crate::ack::Expected {
                chain_id,
                marketplace: self.marketplace,
                order: self.order,
                max_seconds: 0,
            },
            accepted_at: order.accepted_at.context("the order was never accepted")?,
        })
    }
}

/// Acknowledges in the background for as long as the tunnel relays; never stops the relay.
fn acknowledge_periodically(plan: AckPlan, relayed: Arc<AtomicU64>) {
    let mut exchange = None;
    let mut last = Instant::now();
    let mut bytes_at_last = 0;
    let mut last_refusal = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now_bytes = relayed.load(Ordering::Relaxed);
        if last.elapsed() < plan.every && now_bytes - bytes_at_last < plan.bytes {
            continue;
        }
        last = Instant::now();
        bytes_at_last = now_bytes;
        if exchange.is_none() {
            match plan.exchange.resolve() {
                Ok(e) => exchange = Some(e),
                Err(e) => {
                    eprintln!(
                        "shale: cannot acknowledge order {} yet: {e:#}",
                        plan.exchange.order
                    );
                    continue;
                }
            }
        }
        let Some(ex) = &exchange else { continue };
        match ex.run() {
            Ok(Outcome::Acknowledged(v)) => {
                tracing::debug!(seq = ?v.seq, seconds = v.seconds, bytes_in = v.bytes_in, bytes_out = v.bytes_out, "acknowledged");
            }
            Ok(Outcome::Refused(reason)) => {
                if reason != last_refusal {
                    eprintln!(
                        "shale: NOT acknowledging order {}'s usage: {reason}",
                        plan.exchange.order
                    );
                    last_refusal = reason;
                }
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "acknowledgment round failed"),
        }
    }
}

/// Bytes reserved ahead per durable write: bounds both the fsyncs per byte and what a crash
/// over-counts.
pub const DEFAULT_STEP: u64 = 4 << 20;

const BUFFER: usize = 64 << 10;

/// The reservation a tunnel counts into.
pub fn reservation(counts: &Path, step: u64) -> Arc<Mutex<Reservation>> {
    Arc::new(Mutex::new(Reservation::new(WireCounts::at(counts), step)))
}

/// Ends the tunnel at once when OpenSSH hangs up on it (it sends SIGHUP to its ProxyCommand
/// when the session is over): hands back the unused reservation, so the count is exact, and
/// exits while still holding the lock, so nothing is relayed uncounted afterwards.
pub fn finish(reservation: &Mutex<Reservation>) -> ! {
    let mut r = reservation.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = r.release() {
        eprintln!("shale tunnel: could not hand back the reserved count: {e:#}");
    }
    std::process::exit(0)
}

/// Relays stdin/stdout to `host:port` until either side ends; returns when the connection is
/// over, with the count exact in the file.
pub fn run(
    host: &str,
    port: u16,
    reservation: Arc<Mutex<Reservation>>,
    acks: Option<AckPlan>,
) -> anyhow::Result<()> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let socket = addrs
        .iter()
        .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(30)).ok())
        .with_context(|| format!("connecting to {host}:{port}"))?;
    socket.set_nodelay(true).ok();
    let relayed = Arc::new(AtomicU64::new(0));
    if let Some(plan) = acks {
        let relayed = relayed.clone();
        std::thread::Builder::new()
            .name("acknowledgments".into())
            .spawn(move || acknowledge_periodically(plan, relayed))?;
    }

    let up = {
        let mut to_server = socket.try_clone()?;
        let reservation = reservation.clone();
        let relayed = relayed.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut stdin = raw_stdio(0)?;
            let mut buf = vec![0u8; BUFFER];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                };
                charge(&reservation, Direction::Up, n)?;
                relayed.fetch_add(n as u64, Ordering::Relaxed);
                to_server.write_all(&buf[..n])?;
            }
            // ssh closed its side: pass the half-close on and keep reading the server.
            to_server.shutdown(Shutdown::Write).ok();
            Ok(())
        })
    };

    let mut from_server = socket;
    let mut stdout = raw_stdio(1)?;
    let mut buf = vec![0u8; BUFFER];
    let down: anyhow::Result<()> = (|| loop {
        let n = match from_server.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        charge(&reservation, Direction::Down, n)?;
        relayed.fetch_add(n as u64, Ordering::Relaxed);
        stdout.write_all(&buf[..n])?;
    })();
    // The server's side is over; the stdin thread may sit in a read that never returns, so it
    // is not joined unless it already finished.
    if up.is_finished() {
        if let Ok(Err(e)) = up.join() {
            tracing::debug!(error = %e, "client side of the tunnel ended with an error");
        }
    }
    let totals = reservation
        .lock()
        .expect("reservation lock poisoned")
        .release()?;
    tracing::debug!(up = totals.up, down = totals.down, "tunnel closed");
    down
}

/// Standard input or output as a plain file: Rust's `Stdout` is line-buffered, which splits an
/// SSH stream at every newline byte into extra copies and writes.
fn raw_stdio(fd: std::os::fd::RawFd) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsFd, BorrowedFd};
    // SAFETY: 0 and 1 stay open for the life of the process.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(std::fs::File::from(borrowed.as_fd().try_clone_to_owned()?))
}

fn charge(reservation: &Mutex<Reservation>, dir: Direction, n: usize) -> anyhow::Result<()> {
    reservation
        .lock()
        .expect("reservation lock poisoned")
        .charge(dir, n as u64)
        .context("counting bytes on the wire (nothing is relayed uncounted)")
}
