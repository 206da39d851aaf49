//! The whole lease cycle on a chain shaped like Filecoin's: chain id 314159 (Calibration) and a
//! block every 30 s (an epoch). Every transaction waits for its epoch; the gateway's cut-offs
//! still land within an epoch of their time, ticks shorter than an epoch are batched into few
//! claims, and the ended orders settle.
//!
//! The bounds below are "one epoch plus the gateway's polling", what the issue asks of a
//! Filecoin deployment; nothing else about timing is asserted.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure};
use shale_contracts::devnet::DevnetOptions;
use shale_settler::SettlerConfig;
use shale_tests::keys::settler_config;
use shale_tests::{OrderOptions, SshOutput, Stack, StackOptions};

/// Filecoin's block time.
const EPOCH: Duration = Duration::from_secs(30);
/// The gateway's own polling on top of an epoch: its chain poll (0.5 s in the stack), a re-read
/// of the order, and the session's close.
const SLACK: Duration = Duration::from_secs(10);

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A session that runs until the gateway cuts it; returns once it runs.
async fn running_session(
    stack: &Stack,
    order: u64,
    key: &shale_tests::ClientKey,
) -> anyhow::Result<std::process::Child> {
    let mut cmd = stack.target(order.to_string(), key).ssh();
    cmd.arg("echo ready; sleep 900")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let mut stdout = child.stdout.take().unwrap();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = [0u8; 6];
        stdout.read_exact(&mut buf)
    })
    .await??;
    Ok(child)
}

/// Waits (bounded) for the session to end; returns what it printed and when it ended.
async fn cut(child: std::process::Child) -> anyhow::Result<(SshOutput, f64)> {
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the session was never cut"))???;
    Ok((SshOutput::from(out), now_secs()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_on_30_second_epochs_is_cut_claimed_and_settled_on_time() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        devnet: Some(DevnetOptions {
            chain_id: 314_159,
            block_time_secs: Some(EPOCH.as_secs()),
            ..DevnetOptions::default()
        }),
        settler: Some(SettlerConfig {
            settle: true,
            // Past the final tick and its claim, which itself waits up to an epoch.
            settle_delay_secs: 2 * EPOCH.as_secs(),
            ..settler_config()
        }),
        ..StackOptions::default()
    })
    .await?;
    ensure!(stack.devnet.chain_id() == 314_159);
    let key = stack.key("frank", "ed25519")?;
    let lease_secs = 150;
    let expiring = stack
        .order(
            &key,
            OrderOptions {
                max_duration_secs: lease_secs,
                ..OrderOptions::default()
            },
        )
        .await?;
    let terminated = stack.order(&key, OrderOptions::default()).await?;

    // Termination: the client ends the order on chain; the session goes within an epoch of
    // the block that carries it (terminate returns once that block is mined).
    let session = running_session(&stack, terminated, &key).await?;
    let receipt = stack.client.terminate(terminated).await?;
    let mined = now_secs();
    let (out, at) = cut(session).await?;
    assert!(out.stderr.contains("has ended"), "{out:?}");
    let late = at - mined;
    eprintln!(
        "termination in block {}: session cut {late:.1} s later",
        receipt.block_number
    );
    assert!(
        late <= (EPOCH + SLACK).as_secs_f64(),
        "cut {late:.1} s after the termination's block"
    );

    // Expiry: the session runs to the paid end and is cut then, not before, not an epoch late.
    let session = running_session(&stack, expiring, &key).await?;
    let connected = now_secs();
    let order = stack.client.order(expiring).await?;
    let expires = order.expires_at().expect("an accepted order ends") as f64;
    let (out, at) = cut(session).await?;
    eprintln!(
        "expiry at {expires}: session cut {:.1} s after",
        at - expires
    );
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        at >= expires - 1.0,
        "cut {:.1} s before the lease ended: {out:?}",
        expires - at
    );
    assert!(
        at - expires <= (EPOCH + SLACK).as_secs_f64(),
        "cut {:.1} s after the lease ended",
        at - expires
    );

    // Claims: one-second ticks, claimed in batches, paid for no more than the lease, and the
    // ended orders settled by the settler.
    let ledger = stack.ledger().await?;
    let mut settled = false;
    for _ in 0..120 {
        let o = stack.client.order(expiring).await?;
        let t = stack.client.order(terminated).await?;
        if o.settled && t.settled {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if !settled {
        bail!("the ended orders were not settled");
    }
    let o = stack.client.order(expiring).await?;
    let claims = ledger.claims(expiring).await?;
    eprintln!(
        "order {expiring}: {} s claimed in {} claims, paid {} wei",
        o.claimed_seconds,
        claims.len(),
        o.paid
    );
    // The gateway's lease meter starts with the order's first login (its container's start),
    // here this session: what was claimed is the session's time to the tick, and never more
    // than the lease.
    let session_secs = expires - connected;
    assert!(o.claimed_seconds <= lease_secs, "{o:?}");
    assert!(
        (o.claimed_seconds as f64 - session_secs).abs() <= 3.0,
        "{} s claimed for a session of {session_secs:.1} s",
        o.claimed_seconds
    );
    assert!(
        !claims.is_empty() && claims.len() as u64 * 4 <= o.claimed_seconds,
        "ticks shorter than an epoch go in batches: {} claims for {} s",
        claims.len(),
        o.claimed_seconds
    );
    assert!(o.paid > shale_contracts::U256::ZERO);
    stack.stop().await
}
