//! The payment tunnel end to end (issue 15), as a client uses it: `shale order create` writes
//! the `Host shale-N` entry whose `ProxyCommand` is `shale tunnel`, and the stock `ssh shale-N`
//! goes through it to the real gateway, containerd and anvil; the settler beside the gateway
//! proves claims that the marketplace checks with the real Groth16 verifier.
//!
//! - The tunnel's acknowledgments land on chain with the claims and pay bytes past the order's
//!   allowance.
//! - A tunnel killed with SIGKILL mid-session acknowledges nothing more: the bytes past the
//!   allowance wait for an acknowledgment that never comes, and once the settler's
//!   `ack_wait_secs` have passed the SP is paid every second of the lease plus at most the
//!   allowance's bytes (the rest forfeited).
//! - An SP that inflates the bytes of its own ledger's ticks (heads recomputed, so the log
//!   still verifies) is held back by its settler, paid no byte past the allowance on chain when
//!   it claims anyway, not acknowledged by the tunnel, and caught by `shale receipts --verify`
//!   (exit 7).
//!
//! Needs root, containerd, anvil and solc-js (`scripts/setup.sh`), like every stack test: a
//! missing one fails the test.

use std::future::Future;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use shale_contracts::{OrderState, U256};
use shale_meter::{Ledger, Tick};
use shale_tests::client::{tunnel_of, Client};
use shale_tests::keys::settler_config;
use shale_tests::{dishonest, ClientKey, Stack, StackOptions};

const MIB: u64 = 1 << 20;
/// Polls before a wait gives up: generous, for a loaded 2-core machine proving in debug.
const POLLS: u32 = 1_200;
const POLL: Duration = Duration::from_millis(250);

/// Polls `check` until it gives a value.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    for _ in 0..POLLS {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("gave up waiting for {what}")
}

/// A stack whose SP runs the settler, the client's `shale` and a key.
async fn paying_stack() -> anyhow::Result<(Stack, Client, ClientKey)> {
    let stack = Stack::start_with(StackOptions {
        settler: Some(settler_config()),
        ..StackOptions::default()
    })
    .await?;
    let client = Client::new(&stack)?;
    let key = stack.key("client", "ed25519")?;
    Ok((stack, client, key))
}

/// `ssh shale-N 'cat > /dev/null'` fed from a pipe the test holds.
fn upload_session(client: &Client, order: u64) -> anyhow::Result<std::process::Child> {
    client
        .ssh(order)
        .arg("cat > /dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ssh")
}

/// Writes `bytes` into `stdin` off the async threads; hands the pipe back, still open.
async fn send(
    mut stdin: std::process::ChildStdin,
    bytes: u64,
) -> anyhow::Result<std::process::ChildStdin> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let chunk: Vec<u8> = (0..MIB).map(|i| (i * 31 % 251) as u8).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(MIB);
            stdin.write_all(&chunk[..n as usize])?;
            left -= n;
        }
        stdin.flush()?;
        Ok(stdin)
    })
    .await?
}

/// Waits until the ledger's ticks of `order` hold at least `bytes_in` bytes into the container.
async fn metered_in(ledger: &Ledger, order: u64, bytes_in: u64) -> anyhow::Result<()> {
    eventually("the upload to be metered", || async {
        let (usage, _) = ledger.usage_after(order, None).await?;
        Ok((usage.bytes_in >= bytes_in).then_some(()))
    })
    .await
}

/// The longest prefix of `ticks` whose cumulative bytes stay within `room`: what the contract
/// can pay without a later acknowledgment. Returns its seconds and bytes.
fn payable_prefix(ticks: &[Tick], room: u128) -> (u64, u128) {
    let (mut seconds, mut bytes) = (0u64, 0u128);
    for t in ticks {
        let next = bytes + u128::from(t.bytes_in) + u128::from(t.bytes_out);
        if next > room {
            break;
        }
        seconds += t.seconds;
        bytes = next;
    }
    (seconds, bytes)
}

/// The value of the settler's gauge of bytes waiting for an acknowledgment, from `/metrics`.
async fn unacknowledged_bytes(stack: &Stack, order: u64) -> anyhow::Result<Option<i64>> {
    let page = stack.scrape().await?;
    let label = format!("settler_unacknowledged_bytes{{order=\"{order}\"}} ");
    Ok(page
        .lines()
        .find_map(|l| l.split_once(&label).map(|(_, v)| v.trim().parse().ok()))
        .flatten())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tunnels_acknowledgments_land_on_chain_and_pay_bytes_past_the_allowance(
) -> anyhow::Result<()> {
    let (stack, client, key) = paying_stack().await?;
    let id = client.create_order(&stack, &key, "1MiB").await?;
    let config = std::fs::read_to_string(client.ssh_config())?;
    assert!(
        config.contains("ProxyCommand")
            && config.contains(" tunnel ")
            && config.contains("--ack-order"),
        "order create wrote no acknowledging tunnel: {config}"
    );
    let allowance = stack.client.order(id).await?.byte_allowance;
    assert_eq!(allowance, MIB);
    let ledger = stack.ledger().await?;

    // 72 MiB: past the 64 MiB after which the tunnel acknowledges by itself; the session
    // stays open until the tunnel (at its next round, 30 s on) has acknowledged all of it.
    let mut ssh = upload_session(&client, id)?;
    let stdin = send(ssh.stdin.take().context("stdin")?, 72 * MIB).await?;
    let ack = eventually(
        "the tunnel's acknowledgment of the whole upload",
        || async {
            Ok(ledger
                .latest_ack(id)
                .await?
                .filter(|a| a.bytes_in >= 72 * MIB))
        },
    )
    .await?;
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || ssh.wait_with_output()).await??;
    assert!(out.status.success(), "ssh: {out:?}");
    let acked = u128::from(ack.bytes_in) + u128::from(ack.bytes_out);

    stack.client.terminate(id).await?;
    // The claims carry the newest acknowledgment; everything it covers is paid.
    let order = eventually("claims through the acknowledged bytes", || async {
        let o = stack.client.order(id).await?;
        Ok((o.claimed_bytes >= acked).then_some(o))
    })
    .await?;
    assert_eq!(order.acked_bytes, acked, "the acknowledgment on chain");
    assert_eq!(order.acked_head, ack.head.0);
    assert_eq!(
        order.claimed_bytes, acked,
        "bytes past the acknowledgment (the ack exchange's own) wait for the next one"
    );
    assert!(
        order.claimed_seconds > 0 && !order.paid.is_zero(),
        "{order:?}"
    );
    let (up, down) = client.wire_totals(id)?;
    assert!(
        ack.bytes_in <= up && ack.bytes_out <= down,
        "acknowledged {ack:?}, the tunnel counted {up} up and {down} down"
    );

    let (metered, _) = ledger.usage_after(id, None).await?;
    eprintln!(
        "acknowledged {acked} bytes (allowance {allowance}); claimed {} s and {} bytes of {} s \
         and {} bytes metered, paid {} wei",
        order.claimed_seconds,
        order.claimed_bytes,
        metered.seconds,
        metered.bytes_total(),
        order.paid
    );

    let out = client
        .run(&["receipts", &id.to_string(), "--verify"])
        .await?;
    assert_eq!(out.code, Some(0), "receipts --verify: {out:?}");
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_tunnel_leaves_the_sp_paid_every_second_and_at_most_the_allowance(
) -> anyhow::Result<()> {
    let (stack, client, key) = paying_stack().await?;
    let id = client.create_order(&stack, &key, "4MiB").await?;
    let ledger = stack.ledger().await?;

    let mut ssh = upload_session(&client, id)?;
    // A few ticks of lease time first: seconds the SP is paid for whatever happens next.
    eventually("three ticks of lease time", || async {
        let (_, ticks) = ledger.usage_after(id, None).await?;
        Ok((ticks >= 3).then_some(()))
    })
    .await?;
    let stdin = send(ssh.stdin.take().context("stdin")?, 12 * MIB).await?;
    metered_in(&ledger, id, 12 * MIB).await?;
    let tunnel = tunnel_of(ssh.id())?.context("ssh runs no payment tunnel")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(tunnel)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let out = tokio::task::spawn_blocking(move || ssh.wait_with_output()).await??;
    drop(stdin);
    assert!(!out.status.success(), "ssh outlived its tunnel: {out:?}");

    stack.client.terminate(id).await?;
    let ticks = ledger.ticks_after(id, None, u32::MAX).await?;
    let room = u128::from(stack.client.order(id).await?.byte_allowance).max(
        ledger
            .latest_ack(id)
            .await?
            .map_or(0, |a| u128::from(a.bytes_in) + u128::from(a.bytes_out)),
    );
    let (seconds, bytes) = payable_prefix(&ticks, room);
    let metered: u128 = ticks
        .iter()
        .map(|t| u128::from(t.bytes_in) + u128::from(t.bytes_out))
        .sum();
    assert!(
        metered > room,
        "the tunnel acknowledged everything before it was killed ({metered} bytes, room {room})"
    );
    let order = eventually("the claims of the payable ticks", || async {
        let o = stack.client.order(id).await?;
        Ok((o.claimed_seconds >= seconds && o.state == OrderState::Ended).then_some(o))
    })
    .await?;
    assert!(seconds >= 2, "the ticks before the upload: {seconds} s");
    assert!(order.acked_bytes == 0, "nothing acknowledged on chain");
    // First the rest waits for an acknowledgment, and the SP's own metrics say so.
    let settler = stack.settler().context("the stack runs a settler")?;
    eventually("the settler to hold the rest back", || async {
        Ok((settler.metrics().failures_with("awaiting_acknowledgment") > 0).then_some(()))
    })
    .await?;
    let waiting = unacknowledged_bytes(&stack, id).await?.unwrap_or(0);
    assert!(
        waiting > 0,
        "no bytes wait for an acknowledgment on /metrics"
    );
    assert_eq!(
        stack.client.order(id).await?.claimed_bytes,
        bytes,
        "within the wait, nothing past the first tick that passes the allowance is claimed"
    );

    // Once `ack_wait_secs` have passed since the end, every tick is claimed: every second of
    // the lease is paid, and of the bytes at most the allowance.
    let (order, metered_seconds, metered) =
        eventually("every tick claimed after the wait", || async {
            let o = stack.client.order(id).await?;
            let (usage, _) = ledger.usage_after(id, None).await?;
            Ok((o.claimed_bytes == usage.bytes_total()
                && settler.metrics().forfeited_bytes.get() > 0)
                .then_some((o, usage.seconds, usage.bytes_total())))
        })
        .await?;
    let (accepted, ended) = (
        order.accepted_at.context("accepted")?,
        order.ended_at.context("ended")?,
    );
    assert_eq!(
        order.claimed_seconds,
        metered_seconds.min(ended - accepted),
        "every lease second paid"
    );
    let price = |seconds: u64, bytes: u128| {
        U256::from(seconds) * order.price_per_second
            + ((U256::from(bytes) * order.price_per_gib) >> 30)
    };
    assert!(
        order.paid >= price(order.claimed_seconds, 0)
            && order.paid <= price(order.claimed_seconds, room),
        "paid {} wei: the seconds plus at most the allowance",
        order.paid
    );
    eprintln!(
        "killed tunnel: metered {metered} bytes, allowance {room}; before the wait paid {seconds} s \
         and {bytes} bytes, {waiting} bytes waited; after it {} s and {} wei ({} bytes forfeited)",
        order.claimed_seconds,
        order.paid,
        settler.metrics().forfeited_bytes.get()
    );

    // An honest SP: the receipts agree with the claims and stay under the tunnel's counts.
    let out = client
        .run(&["receipts", &id.to_string(), "--verify"])
        .await?;
    assert_eq!(out.code, Some(0), "receipts --verify: {out:?}");
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sp_that_inflates_its_ledger_is_paid_no_forged_byte_and_caught_by_the_receipts(
) -> anyhow::Result<()> {
    let (mut stack, client, key) = paying_stack().await?;
    let id = client.create_order(&stack, &key, "1MiB").await?;
    let ledger = stack.ledger().await?;

    let mut ssh = upload_session(&client, id)?;
    // Half the allowance: an honest SP would be paid for all of it without an acknowledgment.
    let stdin = send(ssh.stdin.take().context("stdin")?, MIB / 2).await?;
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || ssh.wait_with_output()).await??;
    assert!(out.status.success(), "ssh: {out:?}");
    metered_in(&ledger, id, MIB / 2).await?;
    ledger.close().await;

    // The SP stops its gateway, multiplies the bytes of every unpaid tick by 64 in its SQL
    // database with the heads recomputed, and starts it again on the forged chain.
    stack.stop_gateway().await;
    let forged = dishonest::inflate_unpaid_ticks(&stack.ledger_path(), &stack.sp, id, 64).await?;
    let forged_bytes: u128 = forged
        .iter()
        .map(|t| u128::from(t.bytes_in) + u128::from(t.bytes_out))
        .sum();
    assert!(forged_bytes >= 32 * u128::from(MIB), "{forged_bytes}");
    stack.start_gateway().await?;
    let ledger = stack.ledger().await?;
    let settler = stack.settler().context("the stack runs a settler")?.clone();
    let mut events = settler.subscribe();

    // The client's check catches it: the receipts' bytes pass the tunnel's counts by more than
    // the allowance.
    let out = client
        .run(&["receipts", &id.to_string(), "--verify"])
        .await?;
    assert_eq!(out.code, Some(7), "receipts --verify: {out:?}");
    assert!(out.stderr.contains("over-claim"), "{out:?}");
    assert!(
        !out.stderr.contains("does not verify"),
        "the forged chain verifies: only the bytes give it away: {out:?}"
    );
    // And the tunnel's key signs none of it.
    let out = client.run(&["ack", &id.to_string()]).await?;
    assert_eq!(out.code, Some(7), "shale ack: {out:?}");
    assert!(out.stderr.contains("over-claim"), "{out:?}");
    assert!(ledger.latest_ack(id).await?.is_none());

    stack.client.terminate(id).await?;
    let before = settler.metrics().failures_with("awaiting_acknowledgment");
    eventually("the settler to hold the forged bytes back", || async {
        let held = settler.metrics().failures_with("awaiting_acknowledgment") > before;
        let ended = stack.client.order(id).await?.state == OrderState::Ended;
        Ok((held && ended).then_some(()))
    })
    .await?;
    let order = stack.client.order(id).await?;
    assert!(
        order.claimed_bytes <= u128::from(order.byte_allowance),
        "the settler claimed {} bytes past the allowance",
        order.claimed_bytes
    );
    // Held back before the contract, not sent and refused.
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, shale_settler::SettlerEvent::Refused { .. }),
            "{event:?}"
        );
    }

    // The SP sends the next batch itself, proved with the real key: the contract pays its
    // seconds and no forged byte past the allowance.
    stack.stop_gateway().await;
    let receipt = dishonest::claim_next_batch(&ledger, &stack.sp, id)
        .await?
        .map_err(|e| anyhow::anyhow!("a batch is never refused for its bytes: {e}"))?;
    let after = stack.client.order(id).await?;
    assert!(
        after.claimed_bytes > order.claimed_bytes,
        "the forged batch landed"
    );
    let price = |seconds: u64, bytes: u128| {
        U256::from(seconds) * after.price_per_second
            + ((U256::from(bytes) * after.price_per_gib) >> 30)
    };
    assert!(
        after.paid <= price(after.claimed_seconds, u128::from(after.byte_allowance)),
        "paid {} wei for {} s: more than the seconds and the allowance",
        after.paid,
        after.claimed_seconds
    );
    eprintln!(
        "forged {forged_bytes} bytes; the settler claimed {} bytes (allowance {}); the SP's own \
         claim of {} bytes was paid {} wei (its seconds; the forged bytes forfeited)",
        order.claimed_bytes,
        order.byte_allowance,
        after.claimed_bytes - order.claimed_bytes,
        receipt.amount
    );
    stack.stop().await
}
