//! An order's life seen from its sessions: termination on chain, escrow running out and a top-up,
//! receipts, metrics, and many sessions at once.

use std::process::Stdio;
use std::time::Duration;

use shale_contracts::U256;
use shale_meter::ledger::Receipt;
use shale_tests::ssh::run;
use shale_tests::{OrderOptions, SshOutput, Stack};

/// Waits for a child ssh to end, with a generous bound so a broken gateway fails the test
/// instead of hanging it (no timing is asserted).
async fn wait_for(child: std::process::Child, bound: Duration) -> anyhow::Result<SshOutput> {
    let waited = tokio::time::timeout(
        bound,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match waited {
        Ok(out) => Ok(SshOutput::from(out??)),
        Err(_) => anyhow::bail!("the session was not cut within {bound:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn terminating_the_order_on_chain_cuts_its_sessions_with_the_reason() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("alice", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    let mut cmd = target.ssh();
    cmd.arg("echo ready; sleep 300")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    // Wait until the session really runs before ending the order.
    let mut stdout = child.stdout.take().unwrap();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = [0u8; 6];
        stdout.read_exact(&mut buf).map(|_| buf)
    })
    .await??;

    stack.client.terminate(order).await?;
    let out = wait_for(child, Duration::from_secs(60)).await?;
    assert!(
        out.stderr.contains(&format!("order {order} has ended")),
        "{out:?}"
    );
    // And the order is refused from now on.
    let mut cmd = target.ssh();
    cmd.arg("true");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.code, Some(255));
    assert!(out.stderr.contains("has ended"), "{out:?}");

    // Its receipts stay readable with the order's key, to check the final claims against.
    let mut cmd = target.ssh();
    cmd.args(["-s", "shale-receipts"]);
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.code, Some(0), "{out:?}");
    let receipts: Vec<Receipt> = out
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert!(
        receipts.iter().any(|r| matches!(r, Receipt::Tick(_))),
        "{receipts:?}"
    );
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_order_with_nobody_connected_is_released_on_time() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("erin", "ed25519")?;
    let order = stack
        .order(
            &key,
            OrderOptions {
                max_duration_secs: 25,
                ..OrderOptions::default()
            },
        )
        .await?;
    let target = stack.target(order.to_string(), &key);
    // Root inside; on the host, a uid of the order's own range.
    let mut cmd = target.ssh();
    cmd.arg("id -u; echo mine > /etc/note");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!((out.code, out.stdout.as_str()), (Some(0), "0\n"), "{out:?}");
    let lease = stack.provisioner.lease(order).await?.expect("a container");
    let ids = lease.ids.expect("a uid range");
    let status = std::fs::read_to_string(format!("/proc/{}/status", lease.pid))?;
    let host_uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .to_string();
    assert_eq!(host_uid, ids.host_base.to_string());
    assert!(ids.host_base > 65536);

    // Nobody is connected when the lease ends: the container goes within a poll or two.
    let expires = lease.expires_at.expect("expiry recorded");
    let mut released = false;
    for _ in 0..120 {
        if stack.provisioner.lease(order).await?.is_none() {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(released, "the expired order still has its container");
    let late = std::time::SystemTime::now()
        .duration_since(expires)
        .unwrap_or_default();
    assert!(
        std::time::SystemTime::now() >= expires,
        "released before the lease ended"
    );
    eprintln!("released {late:?} after the lease ended");
    assert!(!stack.provisioner.orders().await?.contains(&order));
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_escrow_warns_then_cuts_and_a_top_up_resumes() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("bob", "ed25519")?;
    // The test SP charges 1 gwei per second: this escrow pays for about 15 seconds.
    let per_second = U256::from(1_000_000_000u64);
    let order = stack
        .order(
            &key,
            OrderOptions {
                escrow: per_second * U256::from(15u64),
                ..OrderOptions::default()
            },
        )
        .await?;
    let target = stack.target(order.to_string(), &key);
    let mut cmd = target.ssh();
    cmd.arg("sleep 300").stderr(Stdio::piped());
    let child = cmd.spawn()?;
    let out = wait_for(child, Duration::from_secs(120)).await?;
    assert!(out.stderr.contains("pays for about"), "no warning: {out:?}");
    assert!(
        out.stderr
            .contains(&format!("order {order} is out of escrow")),
        "{out:?}"
    );
    // The task is stopped (right after the sessions are told), the volume kept.
    let mut stopped = false;
    for _ in 0..60 {
        let lease = stack.provisioner.lease(order).await?;
        if lease.is_some_and(|l| !l.running) {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(stopped, "the task still runs");

    let mut cmd = target.ssh();
    cmd.arg("true");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert!(out.stderr.contains("out of escrow"), "{out:?}");

    stack
        .client
        .top_up(order, per_second * U256::from(3600u64))
        .await?;
    let mut resumed = None;
    for _ in 0..30 {
        let mut cmd = target.ssh();
        cmd.arg("echo back");
        let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
        if out.code == Some(0) {
            resumed = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let out = resumed.expect("the order resumes after a top-up");
    assert_eq!(out.stdout, "back\n");
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn receipts_recompute_to_the_billed_chain_and_metrics_show_the_session() -> anyhow::Result<()>
{
    let stack = Stack::start().await?;
    let key = stack.key("carol", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    let mut cmd = target.ssh();
    cmd.arg("head -c 300000 /dev/zero; sleep 3");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.stdout.len(), 300_000);

    let metrics = stack.scrape().await?;
    assert!(
        metrics.contains("shale_gateway_sessions_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shale_gateway_channels_opened_total{kind=\"session\"} 1"),
        "{metrics}"
    );

    let mut cmd = target.ssh();
    cmd.args(["-s", "shale-receipts"]);
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.code, Some(0), "{out:?}");
    let receipts: Vec<Receipt> = out
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let ticks: Vec<_> = receipts
        .iter()
        .filter_map(|r| match r {
            Receipt::Tick(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert!(!ticks.is_empty(), "{receipts:?}");
    let deployment =
        shale_meter::Deployment::new(stack.sp.chain_id().await?, stack.sp.address().0 .0);
    let head = shale_meter::verify_receipts(&deployment, &ticks)?;
    assert_eq!(head, ticks.last().unwrap().head);
    let billed_out: u64 = ticks.iter().map(|t| t.bytes_out).sum();
    assert!(billed_out >= 300_000, "billed {billed_out} bytes out");
    assert!(receipts.iter().any(|r| matches!(r, Receipt::Session(_))));

    let metrics = stack.scrape().await?;
    assert!(
        metrics.contains(&format!("shale_gateway_order_ticks{{order=\"{order}\"}}")),
        "{metrics}"
    );
    // The probes saw, from inside the container, what the order pays for: 2 CPUs, 1 GiB.
    assert!(
        metrics.contains(&format!(
            "shale_gateway_order_probe_millicpus{{order=\"{order}\"}} 2000"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "shale_gateway_order_probe_memory_bytes{{order=\"{order}\"}} 1073741824"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("shale_gateway_session_rtt_seconds_count"),
        "{metrics}"
    );
    assert!(
        receipts.iter().any(|r| matches!(r, Receipt::Probe(_))),
        "no probe readings in the receipts"
    );
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_sessions_across_five_orders() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut targets = Vec::new();
    for i in 0..5 {
        let key = stack.key(&format!("user{i}"), "ed25519")?;
        let order = stack.order(&key, OrderOptions::default()).await?;
        targets.push((order, stack.target(order.to_string(), &key)));
    }
    let mut runs = Vec::new();
    for n in 0..50 {
        let (order, target) = targets[n % 5].clone();
        runs.push(tokio::task::spawn_blocking(move || {
            let mut cmd = target.ssh();
            cmd.arg(format!("sleep 2; echo {order}-{n}; hostname"));
            (order, n, run(cmd))
        }));
    }
    for r in runs {
        let (order, n, out) = r.await?;
        let out = out?;
        assert_eq!(out.code, Some(0), "{order}-{n}: {out:?}");
        assert!(out.stdout.starts_with(&format!("{order}-{n}\n")), "{out:?}");
    }
    stack.stop().await
}
