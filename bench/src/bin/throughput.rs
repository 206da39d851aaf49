//! Bulk throughput: N MiB client→container (`cat > /dev/null`) and container→client (`head -c`),
//! through the gateway and through OpenSSH's own sshd on the host running the same command, in
//! the same run, with the same cipher on both sides (chacha20-poly1305 and aes256-gcm). Prints
//! MB/s and the ratio, and writes JSON.
//!
//! `cargo run --release -p shale-bench --features system --bin shale-bench-throughput -- [MiB] [OUT.json]`

use std::io::Write;
use std::process::Stdio;
use std::time::Instant;

use shale_bench::side_by_side::SideBySide;
use shale_tests::ssh::Target;

// The AEAD ciphers both sides offer by default (russh has no aes128-gcm in its default list).
const CIPHERS: [&str; 2] = ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com"];

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
    let json_out = args.get(2).cloned();

    let sides = SideBySide::start().await?;
    let (gateway, reference) = (&sides.gateway, &sides.reference);
    // Warm the container and both servers.
    tokio::task::block_in_place(|| upload(gateway, CIPHERS[0], 8))?;
    tokio::task::block_in_place(|| upload(reference, CIPHERS[0], 8))?;

    let mb = (mib << 20) as f64 / 1e6;
    let mut rows = Vec::new();
    println!("{mib} MiB per transfer; MB/s (10^6 bytes per second)");
    println!(
        "{:<32} {:<10} {:>10} {:>10} {:>7}",
        "cipher", "direction", "sshd", "gateway", "ratio"
    );
    for cipher in CIPHERS {
        for (direction, run) in [
            (
                "upload",
                upload as fn(&Target, &str, usize) -> anyhow::Result<f64>,
            ),
            ("download", download),
        ] {
            let r = tokio::task::block_in_place(|| run(reference, cipher, mib))?;
            let g = tokio::task::block_in_place(|| run(gateway, cipher, mib))?;
            let (r, g) = (mb / r, mb / g);
            println!(
                "{cipher:<32} {direction:<10} {r:>10.1} {g:>10.1} {:>7.2}",
                g / r
            );
            rows.push(serde_json::json!({"cipher": cipher, "direction": direction, "sshd_mb_s": r, "gateway_mb_s": g, "ratio": g / r}));
        }
    }
    if let Some(path) = json_out {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&serde_json::json!({"mib": mib, "rows": rows}))?,
        )?;
    }
    sides.stop().await
}
