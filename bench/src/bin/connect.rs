//! Connection latency: `ssh HOST true` through the gateway (container warm) against OpenSSH's
//! own sshd running `true` on the host and sshd inside a container (the original design), in the
//! same run; plus the cold path (first connection of a new order: chain lookup and container
//! start). Prints a table and writes JSON.
//!
//! `cargo run -p shale-bench --features system --bin shale-bench-connect -- [ROUNDS] [COLD] [OUT.json]`

use std::time::{Duration, Instant};

use shale_bench::side_by_side::SideBySide;
use shale_bench::stats::{summarize, Summary};
use shale_tests::ssh::{run, Target};
use shale_tests::OrderOptions;

fn time_ssh(target: &Target, command: &str) -> anyhow::Result<Duration> {
    let mut cmd = target.ssh();
    cmd.arg(command);
    let start = Instant::now();
    let out = run(cmd)?;
    let took = start.elapsed();
    anyhow::ensure!(out.code == Some(0), "ssh failed: {out:?}");
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let cold: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let json_out = args.get(3).cloned();

    let sides = SideBySide::start().await?;
    let (contained_sshd, contained) = sides.container_reference().await?;
    let (stack, gateway, reference) = (&sides.stack, &sides.gateway, &sides.reference);
    // Warm all three (container started, caches filled), then interleave so load hits all alike.
    for target in [gateway, reference, &contained] {
        tokio::task::block_in_place(|| time_ssh(target, "true"))?;
    }
    let (mut g, mut r, mut k) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        g.push(tokio::task::block_in_place(|| time_ssh(gateway, "true"))?);
        r.push(tokio::task::block_in_place(|| time_ssh(reference, "true"))?);
        k.push(tokio::task::block_in_place(|| {
            time_ssh(&contained, "true")
        })?);
    }
    contained_sshd.stop().await?;
    let mut c = Vec::new();
    for i in 0..cold {
        let key = stack.key(&format!("cold{i}"), "ed25519")?;
        let order = stack.order(&key, OrderOptions::default()).await?;
        let target = stack.target(order.to_string(), &key);
        c.push(tokio::task::block_in_place(|| {
            time_ssh(&target, "echo first-output")
        })?);
    }
    let (g, r, k, c): (Summary, Summary, Summary, Summary) = (
        summarize(&mut g),
        summarize(&mut r),
        summarize(&mut k),
        summarize(&mut c),
    );

    let machine = shale_bench::machine::Machine::this();
    println!("machine: {machine}");
    println!(
        "{:<34} {:>5} {:>10} {:>10}",
        "ssh HOST true", "n", "p50 ms", "p99 ms"
    );
    println!(
        "{:<34} {:>5} {:>10.1} {:>10.1}",
        "OpenSSH sshd (host, reference)",
        r.n,
        ms(r.p50),
        ms(r.p99)
    );
    println!(
        "{:<34} {:>5} {:>10.1} {:>10.1}",
        "OpenSSH sshd in a container (ref.)",
        k.n,
        ms(k.p50),
        ms(k.p99)
    );
    println!(
        "{:<34} {:>5} {:>10.1} {:>10.1}",
        "Shale gateway (container warm)",
        g.n,
        ms(g.p50),
        ms(g.p99)
    );
    println!(
        "{:<34} {:>5} {:>10.1} {:>10.1}",
        "Shale gateway (cold: new order)",
        c.n,
        ms(c.p50),
        ms(c.p99)
    );
    println!(
        "ratio gateway/sshd: p50 {:.2}, p99 {:.2}; gateway/sshd-in-container: p50 {:.2}, p99 {:.2}",
        ms(g.p50) / ms(r.p50),
        ms(g.p99) / ms(r.p99),
        ms(g.p50) / ms(k.p50),
        ms(g.p99) / ms(k.p99)
    );
    if let Some(path) = json_out {
        let json = serde_json::json!({
            "machine": machine,
            "reference_sshd_ms": { "n": r.n, "p50": ms(r.p50), "p99": ms(r.p99) },
            "container_sshd_ms": { "n": k.n, "p50": ms(k.p50), "p99": ms(k.p99) },
            "gateway_warm_ms": { "n": g.n, "p50": ms(g.p50), "p99": ms(g.p99) },
            "gateway_cold_ms": { "n": c.n, "p50": ms(c.p50), "p99": ms(c.p99) },
            "ratio_p50": ms(g.p50) / ms(r.p50),
            "ratio_p99": ms(g.p99) / ms(r.p99),
            "ratio_container_p50": ms(g.p50) / ms(k.p50),
            "ratio_container_p99": ms(g.p99) / ms(k.p99),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    sides.stop().await
}
