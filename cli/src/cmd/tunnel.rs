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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use crate::wire::{Direction, Reservation, WireCounts};

/// Bytes reserved ahead per durable write: bounds both the fsyncs per byte and what a crash
/// over-counts.
pub const DEFAULT_STEP: u64 = 4 << 20;

const BUFFER: usize = 64 << 10;

/// Relays stdin/stdout to `host:port` until either side ends; returns when the connection is
/// over, with the count exact in the file.
pub fn run(host: &str, port: u16, counts: &Path, step: u64) -> anyhow::Result<()> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .collect();
    let socket = addrs
        .iter()
        .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(30)).ok())
        .with_context(|| format!("connecting to {host}:{port}"))?;
    socket.set_nodelay(true).ok();
    let reservation = Arc::new(Mutex::new(Reservation::new(WireCounts::at(counts), step)));

    let up = {
        let mut to_server = socket.try_clone()?;
        let reservation = reservation.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; BUFFER];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                };
                charge(&reservation, Direction::Up, n)?;
                to_server.write_all(&buf[..n])?;
            }
            // ssh closed its side: pass the half-close on and keep reading the server.
            to_server.shutdown(Shutdown::Write).ok();
            Ok(())
        })
    };

    let mut from_server = socket;
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; BUFFER];
    let down: anyhow::Result<()> = (|| loop {
        let n = match from_server.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        charge(&reservation, Direction::Down, n)?;
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
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

fn charge(reservation: &Mutex<Reservation>, dir: Direction, n: usize) -> anyhow::Result<()> {
    reservation
        .lock()
        .expect("reservation lock poisoned")
        .charge(dir, n as u64)
        .context("counting bytes on the wire (nothing is relayed uncounted)")
}
