//! The gateway through outages of what it stands on, with stock `ssh` on loopback: the chain's
//! RPC endpoint cut off mid-session (anvil keeps its state; only the gateway's way to it goes),
//! and containerd killed mid-session and started again.
//!
//! Times are the gateway's own bounds, set short here; every wait is bounded so a gateway that
//! hangs fails the test, and nothing asserts how long anything took.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use shale_gateway::config::AuthConfig;
use shale_tests::ssh::{run, Target};
use shale_tests::{OrderOptions, SshOutput, Stack, StackOptions};

/// An order read from chain is re-read after this long.
const ORDER_CACHE: Duration = Duration::from_secs(2);
/// The oldest read of an order the gateway serves while the chain is unreachable.
const STALE_MAX: Duration = Duration::from_secs(20);

/// A stack whose gateway reaches the chain through a relay the test cuts, with short cache
/// times.
async fn stack_behind_relay() -> anyhow::Result<Stack> {
    Stack::start_with(StackOptions {
        chain_relay: true,
        auth: Some(AuthConfig {
            order_cache: ORDER_CACHE,
            missing_cache: Duration::from_secs(1),
            stale_order_max: STALE_MAX,
            order_count_refresh: Duration::from_secs(1),
            // Refusals during the outage count as failures from 127.0.0.1; they must not
            // throttle the logins the test makes afterwards.
            max_failures: 10_000,
            ..AuthConfig::default()
        }),
        ..StackOptions::default()
    })
    .await
}

/// A value of a metric series on the `/metrics` page (0 when absent).
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The `/metrics` page once no session and no connection is live any more, polled for up to
/// 20 s: a client's exit can reach the test before the gateway has counted the session down.
async fn page_once_idle(stack: &Stack) -> anyhow::Result<String> {
    let mut page = String::new();
    for _ in 0..100 {
        page = stack.scrape().await?;
        if metric(&page, "shale_gateway_sessions_active") == 0.0
            && metric(&page, "shale_gateway_connections_active") == 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(page)
}

/// The order's session records once every one is closed, polled for up to 20 s (closing a
/// record follows the client's exit).
async fn sessions_once_closed(
    ledger: &shale_meter::Ledger,
    order: u64,
) -> anyhow::Result<Vec<shale_meter::ledger::SessionRecord>> {
    let mut records = Vec::new();
    for _ in 0..100 {
        records = ledger.sessions(order).await?;
        if records.iter().all(|r| r.ended_at_ms.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(records)
}

/// Runs `ssh … command` to completion.
async fn ssh(target: &Target, command: &str) -> anyhow::Result<SshOutput> {
    let mut cmd = target.ssh();
    cmd.arg(command);
    tokio::task::spawn_blocking(move || run(cmd)).await?
}

/// `ssh … echo ok` logged in, ran, and exited 0.
fn logged_in(out: &SshOutput) -> bool {
    out.code == Some(0) && out.stdout == "ok\n"
}

/// A long-running `ssh` whose stdout lines arrive on a channel as they are printed.
struct LiveSession {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LiveSession {
    /// Starts `command` in the order's container and waits for its first line.
    async fn start(target: &Target, command: &str) -> anyhow::Result<Self> {
        let mut cmd = target.ssh();
        cmd.arg(command)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting ssh")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut me = Self {
            child,
            lines,
            seen: Vec::new(),
        };
        me.wait_for_lines(1, Duration::from_secs(60)).await?;
        Ok(me)
    }

    /// Takes what has arrived so far.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Waits (up to `bound`) until `n` more lines than seen so far have arrived.
    async fn wait_for_lines(&mut self, n: usize, bound: Duration) -> anyhow::Result<()> {
        self.drain();
        let want = self.seen.len() + n;
        let deadline = Instant::now() + bound;
        while self.seen.len() < want {
            ensure!(
                Instant::now() < deadline,
                "the live session printed {} of {want} lines within {bound:?}; last: {:?}",
                self.seen.len(),
                self.seen.last()
            );
            ensure!(
                self.child.try_wait()?.is_none(),
                "the live session ended: {:?}",
                self.child.try_wait()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.drain();
        }
        Ok(())
    }

    /// Ends the client.
    fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }
}

/// Waits for a child `ssh` to end, bounded so a gateway that hangs fails the test.
async fn wait_for(child: Child, bound: Duration) -> anyhow::Result<SshOutput> {
    let waited = tokio::time::timeout(
        bound,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match waited {
        Ok(out) => Ok(SshOutput::from(out??)),
        Err(_) => anyhow::bail!("the session did not end within {bound:?}"),
    }
}

/// Tries `ssh … echo ok` up to `tries` times, a second apart, until it logs in; the outputs of
/// the failed tries for the report.
async fn logs_in_within(target: &Target, tries: usize) -> anyhow::Result<Vec<SshOutput>> {
    let mut failed = Vec::new();
    for _ in 0..tries {
        let out = ssh(target, "echo ok").await?;
        if logged_in(&out) {
            return Ok(failed);
        }
        failed.push(out);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    anyhow::bail!("no login in {tries} tries: {failed:?}")
}

/// What the gateway tells a login it cannot check while the chain is unreachable
/// (`Refusal::ChainUnavailable`).
fn unreachable_words(order: u64) -> String {
    format!("the marketplace cannot be reached right now, so order {order} cannot be checked")
}

#[tokio::test(flavor = "multi_thread")]
async fn through_a_chain_outage_live_sessions_and_cached_orders_are_served_and_service_recovers(
) -> anyhow::Result<()> {
    let stack = stack_behind_relay().await?;
    let relay = stack.rpc_relay().expect("a relay");
    let key = stack.key("alice", "ed25519")?;
    let live = stack.order(&key, OrderOptions::default()).await?;
    let cached = stack.order(&key, OrderOptions::default()).await?;
    // Placed before the outage, but nobody logs in to it before: the gateway never read it.
    let unseen = stack.order(&key, OrderOptions::default()).await?;
    let cached_target = stack.target(cached.to_string(), &key);
    let out = ssh(&cached_target, "echo ok").await?;
    ensure!(logged_in(&out), "before the outage: {out:?}");
    let mut session = LiveSession::start(
        &stack.target(live.to_string(), &key),
        "i=0; while :; do echo tick $i; i=$((i+1)); sleep 1; done",
    )
    .await?;

    // The orders' chain events (which drop their cache entries) and the watcher's re-reads
    // (every 500 ms) come in before the cut, so what the gateway holds is a fresh read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.cut().await?;
    let cut_at = Instant::now();
    let accepted_at_cut = relay.accepted();
    // Past the order cache: every login now needs the chain, and every watcher re-check fails.
    tokio::time::sleep(ORDER_CACHE * 3).await;
    session.wait_for_lines(3, Duration::from_secs(30)).await?;

    // A valid order the gateway read before the outage still logs in.
    let out = ssh(&cached_target, "echo ok").await?;
    assert!(logged_in(&out), "cached order during the outage: {out:?}");
    // One it never read is refused, in BatchMode, with why.
    let out = ssh(&stack.target(unseen.to_string(), &key), "echo ok").await?;
    assert_eq!(
        out.code,
        Some(255),
        "unseen order during the outage: {out:?}"
    );
    assert!(
        out.stderr.contains(&unreachable_words(unseen)),
        "unseen order during the outage: {out:?}"
    );
    assert!(
        !out.stderr.contains("does not exist"),
        "an order that exists is not called unknown: {out:?}"
    );

    // Past the stale bound the cached order is too old to serve to a new login (orders.rs:
    // "anything older ... is refused with a reason"), while the session admitted before the
    // outage goes on (watcher.rs: "An outage is not the client's fault: keep serving what was
    // admitted").
    let past_stale =
        (cut_at + STALE_MAX + Duration::from_secs(2)).saturating_duration_since(Instant::now());
    tokio::time::sleep(past_stale).await;
    let out = ssh(&cached_target, "echo ok").await?;
    assert_eq!(
        out.code,
        Some(255),
        "cached order past the stale bound: {out:?}"
    );
    assert!(
        out.stderr.contains(&unreachable_words(cached)),
        "cached order past the stale bound: {out:?}"
    );
    session.wait_for_lines(2, Duration::from_secs(30)).await?;
    assert_eq!(
        relay.accepted(),
        accepted_at_cut,
        "nothing got through the cut relay"
    );

    // The chain comes back; nothing is restarted.
    relay.restore().await?;
    let fresh = stack.order(&key, OrderOptions::default()).await?;
    logs_in_within(&stack.target(fresh.to_string(), &key), 30).await?;
    logs_in_within(&stack.target(unseen.to_string(), &key), 30).await?;
    logs_in_within(&cached_target, 30).await?;
    assert!(
        relay.accepted() > accepted_at_cut,
        "the gateway came back through the relay"
    );
    session.wait_for_lines(1, Duration::from_secs(30)).await?;
    session.stop()?;
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_placed_during_a_chain_outage_is_refused_as_unreachable_not_as_unknown(
) -> anyhow::Result<()> {
    let stack = stack_behind_relay().await?;
    let relay = stack.rpc_relay().expect("a relay");
    let key = stack.key("bob", "ed25519")?;
    let before = stack.order(&key, OrderOptions::default()).await?;
    // The gateway reads the order count with this login.
    let out = ssh(&stack.target(before.to_string(), &key), "echo ok").await?;
    ensure!(logged_in(&out), "before the outage: {out:?}");

    relay.cut().await?;
    // The client reaches the chain; only the gateway is cut off from it.
    let during = stack.order(&key, OrderOptions::default()).await?;
    ensure!(during > before, "a new id");
    // Past the count's refresh, so the gateway has to ask the chain for the count again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let target = stack.target(during.to_string(), &key);
    let out = ssh(&target, "echo ok").await?;
    assert_eq!(out.code, Some(255), "{out:?}");
    assert!(
        out.stderr.contains(&unreachable_words(during)),
        "an order placed during the outage: {out:?}"
    );
    assert!(
        !out.stderr.contains("does not exist"),
        "an order that exists is not called unknown: {out:?}"
    );

    relay.restore().await?;
    logs_in_within(&target, 30).await?;
    stack.stop().await
}

/// A stack with a containerd of its own, which the test may kill. Its processes start through
/// containerd's exec: these tests are about containerd in the byte path. Through the agent a
/// session outlives containerd (provisioner/tests/exec.rs, `containerd_going_away_mid_exec`).
async fn stack_with_own_containerd() -> anyhow::Result<Stack> {
    Stack::start_with(StackOptions {
        own_containerd: true,
        containerd_exec: true,
        ..StackOptions::default()
    })
    .await
}

/// What the gateway writes on the channel's stderr when containerd goes away under a running
/// process (`session_channel.rs`: "the session's process was lost: " and the provisioner's
/// `DaemonUnreachable`).
fn assert_told_the_process_was_lost(out: &SshOutput) {
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("shale: the session's process was lost")
            && out.stderr.contains("the container runtime"),
        "the affected channel says what happened: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_killed_under_a_session_is_a_clear_error_leaks_nothing_and_sessions_work_after_it_returns(
) -> anyhow::Result<()> {
    let mut stack = stack_with_own_containerd().await?;
    let key = stack.key("carol", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    // The process lets go of its output once it has said it runs, so the session waits on
    // the process alone (with its output held open it hangs: see the ignored test below).
    let session = LiveSession::start(
        &target,
        "echo ready; exec sleep 300 </dev/null >/dev/null 2>&1",
    )
    .await?;
    let LiveSession {
        child,
        lines: _lines,
        ..
    } = session;

    stack.kill_containerd()?;
    let out = wait_for(child, Duration::from_secs(60)).await?;
    assert_told_the_process_was_lost(&out);

    // Nothing of the failed session is left: no live session or connection on the gauges,
    // its ledger record closed with an outcome.
    let page = page_once_idle(&stack).await?;
    assert_eq!(
        metric(&page, "shale_gateway_sessions_active"),
        0.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "shale_gateway_connections_active"),
        0.0,
        "{page}"
    );
    let ledger = stack.ledger().await?;
    let records = sessions_once_closed(&ledger, order).await?;
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0].ended_at_ms.is_some() && records[0].outcome.is_some(),
        "the failed session's record is closed with an outcome: {records:?}"
    );

    // While containerd is down a new session is told why, not left hanging.
    let out = ssh(&target, "echo ok").await?;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("the container runtime"),
        "a session while containerd is down: {out:?}"
    );

    // Back again: the same gateway serves the same order, and a new one, without a restart.
    stack.restart_containerd().await?;
    let out = ssh(&target, "echo ok").await?;
    assert!(
        logged_in(&out),
        "the same order after containerd returned: {out:?}"
    );
    // A new order may be refused as unknown for up to `order_count_refresh` (the gateway's
    // cached order count), hence a few tries.
    let other = stack.order(&key, OrderOptions::default()).await?;
    logs_in_within(&stack.target(other.to_string(), &key), 10).await?;

    let page = page_once_idle(&stack).await?;
    assert_eq!(
        metric(&page, "shale_gateway_sessions_active"),
        0.0,
        "{page}"
    );
    let records = sessions_once_closed(&ledger, order).await?;
    assert!(
        records.iter().all(|r| r.ended_at_ms.is_some()),
        "{records:?}"
    );
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_killed_under_a_session_printing_output_ends_it_with_the_reason(
) -> anyhow::Result<()> {
    let mut stack = stack_with_own_containerd().await?;
    let key = stack.key("dave", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    let session = LiveSession::start(
        &target,
        "i=0; while :; do echo tick $i; i=$((i+1)); sleep 1; done",
    )
    .await?;
    let LiveSession {
        child,
        lines: _lines,
        ..
    } = session;

    stack.kill_containerd()?;
    let out = wait_for(child, Duration::from_secs(60)).await?;
    assert_told_the_process_was_lost(&out);

    stack.restart_containerd().await?;
    let out = ssh(&target, "echo ok").await?;
    assert!(
        logged_in(&out),
        "the same order after containerd returned: {out:?}"
    );
    stack.stop().await
}
