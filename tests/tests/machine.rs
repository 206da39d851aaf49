//! The order's container as a machine, seen through stock ssh: a full disk is the order's own
//! problem, never the gateway's.

use std::time::Duration;

use shale_meter::ledger::Receipt;
use shale_tests::ssh::{run, Target};
use shale_tests::{OrderOptions, Stack};

/// The order's tick receipts, read with its own key.
async fn ticks(target: &Target) -> anyhow::Result<usize> {
    let mut cmd = target.ssh();
    cmd.args(["-s", "shale-receipts"]);
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    anyhow::ensure!(out.code == Some(0), "receipts: {out:?}");
    let receipts: Vec<Receipt> = out
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    Ok(receipts
        .iter()
        .filter(|r| matches!(r, Receipt::Tick(_)))
        .count())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_enospc_inside_while_the_gateway_keeps_metering() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("dora", "ed25519")?;
    let order = stack
        .order(
            &key,
            OrderOptions {
                disk_mib: Some(64),
                ..OrderOptions::default()
            },
        )
        .await?;
    let target = stack.target(order.to_string(), &key);
    let mut cmd = target.ssh();
    cmd.arg("df -k --output=size /work / | tail -n 2; fallocate -l 100M /work/big; echo rc=$?");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    let mut lines = out.stdout.lines();
    for _ in 0..2 {
        let kib: u64 = lines.next().unwrap_or("").trim().parse()?;
        assert!((63 * 1024..=66 * 1024).contains(&kib), "df: {out:?}");
    }
    assert_eq!(lines.next(), Some("rc=1"), "{out:?}");
    assert!(out.stderr.contains("No space left on device"), "{out:?}");

    // The gateway's ledger is on the host's disk: ticks keep coming while the order is full.
    let mut cmd = target.ssh();
    cmd.arg("dd if=/dev/zero of=/work/fill bs=1M count=100 2>/dev/null; sleep 4; df -k --output=avail /work | tail -n 1");
    let before = ticks(&target).await?;
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    let avail: u64 = out.stdout.trim().parse()?;
    assert!(avail < 1024, "the disk is full: {out:?}");
    let mut after = ticks(&target).await?;
    for _ in 0..20 {
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = ticks(&target).await?;
    }
    assert!(
        after > before,
        "no tick was recorded while the order's disk was full"
    );
    stack.stop().await
}
