//! Bulk throughput: N MiB client→container (`cat > /dev/null`) and container→client (`head -c`),
//! in the same run and with the same cipher everywhere (chacha20-poly1305, aes128-gcm and aes256-gcm),
//! through four paths: OpenSSH's sshd on the host running the same command (reference), sshd
//! inside a container (the original design, reference), the gateway, and a second gateway that
//! does not count bytes (metering off). Each figure is the median of ROUNDS interleaved
//! transfers. Prints MB/s and the ratios, and writes JSON.
//!
//! `cargo run --release -p shale-bench --features system --bin shale-bench-throughput -- [MiB] [ROUNDS] [OUT.json]`
//!
//! To profile one combination, `SHALE_BENCH_ONLY=gateway:aes256-gcm:download` (path, cipher prefix,
//! direction; any part may be empty) runs only the transfers that match, e.g. under `perf record`.

use std::io::Write;
use std::process::Stdio;
use std::time::Instant;

use shale_bench::machine::Machine;
use shale_bench::side_by_side::SideBySide;
use shale_tests::ssh::Target;

// The AEAD ciphers OpenSSH's sshd offers by default; the gateway offers all three.
const CIPHERS: [&str; 3] = [
    "chacha20-poly1305@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
];

/// Seconds to push `mib` MiB into `cat > /dev/null` on `target`.
fn upload(target: &Target, cipher: &str, mib: usize) -> anyhow::Result<f64> {
    let mut cmd = target.ssh();
    cmd.args(["-c", cipher, "cat > /dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        stdin.write_all(&chunk)?;
    }
    drop(stdin);
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "upload over {cipher} failed: {status}");
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds to pull `mib` MiB from `head -c` on `target`.
fn download(target: &Target, cipher: &str, mib: usize) -> anyhow::Result<f64> {
    let mut cmd = target.ssh();
    cmd.args(["-c", cipher, &format!("head -c {} /dev/zero", mib << 20)])
        .stdout(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let got = std::io::copy(&mut stdout, &mut std::io::sink())?;
    let status = child.wait()?;
    anyhow::ensure!(
        status.success() && got == (mib as u64) << 20,
        "download over {cipher}: {status}, {got} bytes"
    );
    Ok(start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let rounds: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let json_out = args.get(3).cloned();
    let only = std::env::var("SHALE_BENCH_ONLY")
        .ok()
        .map(|s| Only::parse(&s));

    let sides = SideBySide::start().await?;
    let (contained_sshd, contained) = sides.container_reference().await?;
    let unmetered = sides.unmetered().await?;
    let paths: [(&str, &Target); 4] = [
        ("sshd", &sides.reference),
        ("sshd_container", &contained),
        ("gateway", &sides.gateway),
        ("gateway_unmetered", &unmetered.gateway),
    ];
    // Warm every container and server.
    for (_, target) in paths {
        tokio::task::block_in_place(|| upload(target, CIPHERS[0], 8))?;
    }

    let machine = Machine::this();
    let mb = (mib << 20) as f64 / 1e6;
    let mut rows = Vec::new();
    println!("machine: {machine}");
    println!("{mib} MiB per transfer, median of {rounds}; MB/s (10^6 bytes per second)");
    println!(
        "{:<30} {:<9} {:>8} {:>9} {:>8} {:>10} {:>9} {:>10} {:>9}",
        "cipher",
        "direction",
        "sshd",
        "sshd-ctr",
        "gateway",
        "unmetered",
        "gw/sshd",
        "gw/sshd-ctr",
        "on/off"
    );
    for cipher in CIPHERS {
        for (direction, run) in [
            (
                "upload",
                upload as fn(&Target, &str, usize) -> anyhow::Result<f64>,
            ),
            ("download", download),
        ] {
            if let Some(only) = &only {
                if !only.selects_any(cipher, direction) {
                    continue;
                }
            }
            let mut seconds = vec![Vec::new(); paths.len()];
            for _ in 0..rounds {
                for (i, (name, target)) in paths.iter().enumerate() {
                    if only
                        .as_ref()
                        .is_some_and(|o| !o.selects(name, cipher, direction))
                    {
                        seconds[i].push(f64::NAN);
                        continue;
                    }
                    seconds[i].push(tokio::task::block_in_place(|| run(target, cipher, mib))?);
                }
            }
            let rate: Vec<f64> = seconds.iter_mut().map(|s| mb / median(s)).collect();
            let (sshd, ctr, gw, off) = (rate[0], rate[1], rate[2], rate[3]);
            println!(
                "{cipher:<30} {direction:<9} {sshd:>8.1} {ctr:>9.1} {gw:>8.1} {off:>10.1} {:>9.2} {:>10.2} {:>9.2}",
                gw / sshd,
                gw / ctr,
                gw / off
            );
            let mut row = serde_json::json!({
                "cipher": cipher,
                "direction": direction,
                "ratio_gateway_sshd": gw / sshd,
                "ratio_gateway_sshd_container": gw / ctr,
                "ratio_metering_on_off": gw / off,
            });
            for ((name, _), r) in paths.iter().zip(&rate) {
                row[format!("{name}_mb_s")] = serde_json::json!(r);
            }
            rows.push(row);
        }
    }
    if let Some(path) = json_out {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&serde_json::json!({
                "machine": machine, "mib": mib, "rounds": rounds, "rows": rows,
            }))?,
        )?;
    }
    contained_sshd.stop().await?;
    unmetered.stack.stop().await?;
    sides.stop().await
}

/// The median of `samples` (which it sorts).
fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// `SHALE_BENCH_ONLY`: which path, cipher and direction to run (an empty part matches all).
struct Only {
    path: String,
    cipher: String,
    direction: String,
}

impl Only {
    fn parse(spec: &str) -> Self {
        let mut parts = spec.splitn(3, ':').map(str::to_string);
        Self {
            path: parts.next().unwrap_or_default(),
            cipher: parts.next().unwrap_or_default(),
            direction: parts.next().unwrap_or_default(),
        }
    }

    fn selects_any(&self, cipher: &str, direction: &str) -> bool {
        cipher.starts_with(&self.cipher)
            && (self.direction.is_empty() || self.direction == direction)
    }

    fn selects(&self, path: &str, cipher: &str, direction: &str) -> bool {
        (self.path.is_empty() || self.path == path) && self.selects_any(cipher, direction)
    }
}
