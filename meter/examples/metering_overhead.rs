//! Measures what metering costs: the counter add, a stream copy with and without [`Metered`],
//! and the ledger's tick write latency.
//!
//! ```text
//! cargo run -p shale-meter --example metering_overhead [-- postgres://…]
//! ```
//!
//! Figures from a debug build are pessimistic for this crate's own code (opt-level 0);
//! criterion benches in `bench/` hold the optimized numbers.

use alloy_primitives::U256;
use shale_meter::{ChannelCounter, Deployment, Ledger, Metered, Side, Tariff, TickChain, Usage};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const COPY_BYTES: u64 = 2 << 30;
/// Any deployment: the hash costs the same under every order key.
const DEPLOYMENT: Deployment = Deployment::new(31337, [0x5f; 20]);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    counter_add();
    stream_copy().await?;
    let dir = tempfile::tempdir()?;
    let sqlite = Ledger::open_sqlite(&dir.path().join("ledger.db")).await?;
    tick_writes("sqlite (WAL, synchronous=FULL)", &sqlite).await?;
    if let Some(url) = std::env::args().nth(1) {
        tick_writes("postgres", &Ledger::open(&url).await?).await?;
    }
    Ok(())
}

fn counter_add() {
    let counter = ChannelCounter::default();
    let n = 20_000_000u64;
    let start = Instant::now();
    for i in 0..n {
        counter.add_in(std::hint::black_box(i & 0xff));
    }
    let elapsed = start.elapsed();
    std::hint::black_box(counter.bytes());
    println!(
        "counter add: {:.2} ns per add ({n} adds)",
        elapsed.as_nanos() as f64 / n as f64
    );
}

async fn copy_through(metered: bool) -> anyhow::Result<Duration> {
    let source = tokio::io::repeat(0).take(COPY_BYTES);
    let mut sink = tokio::io::sink();
    let start = Instant::now();
    let copied = if metered {
        let counter = Arc::new(ChannelCounter::default());
        let mut source = Metered::new(source, Arc::clone(&counter), Side::Container);
        let n = tokio::io::copy(&mut source, &mut sink).await?;
        assert_eq!(counter.bytes().bytes_out, n);
        n
    } else {
        let mut source = source;
        tokio::io::copy(&mut source, &mut sink).await?
    };
    assert_eq!(copied, COPY_BYTES);
    Ok(start.elapsed())
}

async fn stream_copy() -> anyhow::Result<()> {
    // Alternate and keep the best of three, to damp noise from other work on the machine.
    let mut plain = Duration::MAX;
    let mut metered = Duration::MAX;
    for _ in 0..3 {
        plain = plain.min(copy_through(false).await?);
        metered = metered.min(copy_through(true).await?);
    }
    let gib = COPY_BYTES as f64 / (1u64 << 30) as f64;
    println!(
        "copy {gib} GiB in 8 KiB reads: plain {:.2} GiB/s, metered {:.2} GiB/s (time {:+.1}%)",
        gib / plain.as_secs_f64(),
        gib / metered.as_secs_f64(),
        (metered.as_secs_f64() / plain.as_secs_f64() - 1.0) * 100.0
    );
    Ok(())
}

async fn tick_writes(name: &str, ledger: &Ledger) -> anyhow::Result<()> {
    let tariff = Tariff::new(U256::from(1u64), U256::from(1u64))?;
    let order = std::process::id() as u64;
    let mut chain = TickChain::resume(
        DEPLOYMENT.order_key(order),
        tariff,
        ledger.chain_head(order).await?,
    );
    let mut latencies = Vec::new();
    for i in 0..200u64 {
        let tick = chain.prepare(
            0,
            Usage {
                seconds: 5,
                bytes_in: i,
                bytes_out: i,
            },
        );
        let start = Instant::now();
        ledger.append_tick(&DEPLOYMENT, &tick).await?;
        latencies.push(start.elapsed());
        chain.commit(&tick)?;
    }
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "{name}: tick write p50 {:?}, p99 {:?}, max {:?} ({} writes)",
        pct(50),
        pct(99),
        latencies.last().unwrap(),
        latencies.len()
    );
    Ok(())
}
