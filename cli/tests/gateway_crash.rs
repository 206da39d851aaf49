//! A gateway killed with SIGKILL in the middle of a transfer loses at most the tick interval in
//! flight, never bills a stored tick twice, and continues the order's chain after a restart.
//!
//! Runs the real `shale gateway` process of `shale dev up` (tick interval 1 s), streams data into
//! an order's container with the stock `ssh`, kills the gateway, starts it again, and compares the
//! ledger's receipts with the bytes the client really sent. Needs root, anvil and solc-js
//! (`scripts/setup.sh`); without them it says SKIPPED and passes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use shale_contracts::{
    key_fingerprint_openssh, Address, Marketplace, NewOrder, PrivateKeySigner, U256,
};
use shale_meter::ledger::Receipt;

fn shale(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shale"))
        .args(args)
        .env("SHALE_DEV_DIR", dir)
        .env_remove("SHALE_RPC_URL")
        .env_remove("SHALE_MARKETPLACE")
        .env_remove("SHALE_PRIVATE_KEY")
        .output()
        .expect("the shale binary runs")
}

/// Stops the stack (and the restarted gateway) whatever happens to the test.
struct Cleanup<'a> {
    dir: &'a Path,
    gateway: Option<Child>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        if self.dir.join("started.json").exists() {
            let _ = shale(self.dir, &["dev", "down"]);
        }
    }
}

fn env_key(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("dev env file");
    text.lines()
        .find_map(|l| {
            l.trim_start_matches("export ")
                .strip_prefix("SHALE_PRIVATE_KEY=")
                .map(|v| v.trim_matches(['"', '\'']).to_string())
        })
        .expect("SHALE_PRIVATE_KEY in the dev env file")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn ssh(port: u16, key: &Path, known_hosts: &Path, user: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
    ])
    .args([
        "-o",
        "IdentityAgent=none",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "StrictHostKeyChecking=yes",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
    .arg("-i")
    .arg(key)
    .args(["-p", &port.to_string(), "-l", user, "127.0.0.1"]);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_killed_mid_transfer_loses_at_most_the_interval_in_flight() {
    if unsafe { libc::geteuid() } != 0 || shale_contracts::devnet::find_anvil().is_none() {
        eprintln!("SKIPPED: needs root (containerd) and anvil (scripts/setup.sh)");
        // In CI a missing component is a failure, never a skipped pass.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the reason above fails the test"
        );
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("shale-crash-")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = scratch.path().join("dev");
    let mut cleanup = Cleanup {
        dir: &dir,
        gateway: None,
    };

    let up = shale(&dir, &["dev", "up"]);
    assert!(
        up.status.success(),
        "dev up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let started: Value =
        serde_json::from_slice(&std::fs::read(dir.join("started.json")).unwrap()).unwrap();
    let rpc = started["rpc_url"].as_str().unwrap().to_string();
    let market = Address::from_str(started["marketplace"].as_str().unwrap()).unwrap();
    let gateway_pid = started["gateway_pid"].as_u64().unwrap() as i32;
    let config = PathBuf::from(started["gateway_config"].as_str().unwrap());
    let port: u16 = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
        .and_then(|p| p.trim_end_matches('"').parse().ok())
        .expect("the dev gateway's port");

    // A client with its own key orders, and the SP accepts.
    let key = scratch.path().join("id_ed25519");
    let kg = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(kg.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let client_key: PrivateKeySigner = env_key(&dir.join("client.env")).parse().unwrap();
    let sp_key: PrivateKeySigner = env_key(&dir.join("sp.env")).parse().unwrap();
    let sp_address = sp_key.address();
    let client = Marketplace::connect(&rpc, market, Some(client_key))
        .await
        .unwrap();
    let sp = Marketplace::connect(&rpc, market, Some(sp_key))
        .await
        .unwrap();
    let provider = client.provider(sp_address).await.unwrap();
    let escrow = U256::from(10u64).pow(U256::from(17u64));
    let order = NewOrder::for_offer(
        &provider,
        key_fingerprint_openssh(&public).unwrap(),
        escrow,
        3600,
    );
    let id = client.create_order(&order).await.unwrap();
    sp.accept(id).await.unwrap();
    let known_hosts = scratch.path().join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{port} {}\n", provider.ssh_host_key),
    )
    .unwrap();
    let user = id.to_string();

    // Stream into the container, noting how much the client had sent when.
    let mut child = ssh(port, &key, &known_hosts, &user)
        .arg("cat > /dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0u64;
        let mut timeline = vec![(now_ms(), 0u64)];
        let start = Instant::now();
        // Bounded: stops when the gateway dies (broken pipe) or after a minute at most.
        while start.elapsed() < Duration::from_secs(60) {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
            timeline.push((now_ms(), sent));
            // A steady, modest rate, so one interval is a clear amount of data.
            std::thread::sleep(Duration::from_millis(5));
        }
        (sent, timeline)
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let killed_at = now_ms();
    // SIGKILL: no shutdown path runs, exactly as a crash.
    assert_eq!(unsafe { libc::kill(gateway_pid, libc::SIGKILL) }, 0);
    let (sent, timeline) = writer.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(sent > 0);

    // The same gateway starts again on the same state and adopts the order's container.
    let restarted = Command::new(env!("CARGO_BIN_EXE_shale"))
        .args(["gateway", "--config"])
        .arg(&config)
        .env("SHALE_PRIVATE_KEY", env_key(&dir.join("sp.env")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.path().join("restarted.log")).unwrap())
        .spawn()
        .unwrap();
    cleanup.gateway = Some(restarted);
    let mut receipts = None;
    for _ in 0..120 {
        let out = ssh(port, &key, &known_hosts, &user)
            .args(["-s", "shale-receipts"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            receipts = Some(String::from_utf8(out.stdout).unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let receipts = receipts.expect("the restarted gateway answers");
    let ticks: Vec<_> = receipts
        .lines()
        .filter_map(|l| match serde_json::from_str::<Receipt>(l).unwrap() {
            Receipt::Tick(t) => Some(t),
            _ => None,
        })
        .collect();
    // One chain, no skipped or repeated seq across the crash, every head recomputes.
    let deployment = shale_meter::Deployment::new(sp.chain_id().await.unwrap(), market.0 .0);
    let head =
        shale_meter::verify_receipts(&deployment, &ticks).expect("the chain survives the crash");
    assert_eq!(head, ticks.last().unwrap().head);

    // Nothing is billed that was not sent; what is missing was sent after the last tick stored
    // before the kill, i.e. within the interval in flight (plus what SSH and the pipes buffered).
    let before_kill: Vec<_> = ticks
        .iter()
        .filter(|t| t.started_at_ms + t.seconds * 1000 <= killed_at)
        .collect();
    let billed_in: u64 = ticks.iter().map(|t| t.bytes_in).sum();
    assert!(
        billed_in <= sent,
        "billed {billed_in} bytes in, but the client sent only {sent}"
    );
    let last_stored_end = before_kill
        .last()
        .map(|t| t.started_at_ms + t.seconds * 1000)
        .expect("ticks were stored before the kill");
    let sent_by = |at: u64| {
        timeline
            .iter()
            .take_while(|(t, _)| *t <= at)
            .last()
            .map_or(0, |(_, s)| *s)
    };
    let interval_ms = 1000;
    let unbilled = sent - billed_in;
    // Slack: a tick closes up to an interval after its last counted byte, and up to a few MiB sit
    // in ssh, the socket and the SSH window when the gateway dies.
    let allowed = sent - sent_by(last_stored_end.saturating_sub(interval_ms)) + (8 << 20);
    assert!(
        unbilled <= allowed,
        "{unbilled} bytes unbilled, more than the interval in flight ({allowed})"
    );
    eprintln!(
        "sent {sent} bytes; billed {billed_in}; unbilled {unbilled} (allowed {allowed}); {} ticks",
        ticks.len()
    );
}
