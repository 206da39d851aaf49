//! The acknowledgment policy with the gateway's real parts: a lease meter writing ticks to a
//! SQLite ledger, the order's watch and its checking task, a gated and metered pump as the
//! session channels and forwards use, the ledger's stored acknowledgment, and `/metrics`. Only
//! the SSH connection is left out (its notices are covered by the unit tests of the lines).

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, U256};
use shale_contracts::{Order, OrderState};
use shale_gateway::ack_policy::{gated, Reporting, CHECK_EVERY};
use shale_gateway::billing::Billing;
use shale_gateway::config::AcknowledgmentConfig;
use shale_gateway::leases::LeaseBoard;
use shale_gateway::metrics::Metrics;
use shale_meter::ledger::{now_ms, AckRecord};
use shale_meter::{Deployment, Head, Ledger, Meter, MeterConfig, Metered, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const ORDER: u64 = 7;
const ALLOWANCE: u64 = 256 * 1024;

fn order() -> Order {
    let now = shale_meter::ledger::now_ms() / 1000;
    Order {
        id: ORDER,
        client: Address::ZERO,
        provider: Address::ZERO,
        key_fingerprint: [0; 32],
        cpus: 1,
        memory_mib: 512,
        disk_mib: 1024,
        gpus: 0,
        dataset: None,
        image_digest: None,
        image_repository: None,
        price_per_second: U256::from(1),
        price_per_gib: U256::ZERO,
        max_duration_secs: 3600,
        escrow: U256::from(1_000_000),
        collateral: U256::ZERO,
        state: OrderState::Active,
        created_at: now - 5,
        accept_timeout_secs: 60,
        accepted_at: Some(now),
        ended_at: None,
        ended_by: None,
        claimed_seconds: 0,
        claimed_bytes: 0,
        ack_signer: None,
        byte_allowance: ALLOWANCE,
        acked_bytes: 0,
        acked_head: [0; 32],
        paid: U256::ZERO,
        head: [0; 32],
        settled: false,
        rated: false,
    }
}

struct Stand {
    _dir: tempfile::TempDir,
    billing: Billing,
    metrics: Metrics,
    ledger: Ledger,
}

async fn stand(pause_transfers: bool) -> Stand {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open_sqlite(&dir.path().join("ledger.db"))
        .await
        .unwrap();
    let config = MeterConfig {
        tick_interval_secs: 1,
        ledger_url: None,
    };
    // No chain here: any deployment's order keys will do.
    let meter = Meter::new(ledger.clone(), Deployment::new(31337, [0x5f; 20]), &config).unwrap();
    let billing =
        Billing::new(meter, ledger.clone(), Vec::new()).with_ack_policy(&AcknowledgmentConfig {
            notice_at: 0.5,
            pause_transfers,
        });
    Stand {
        _dir: dir,
        billing,
        metrics: Metrics::default(),
        ledger,
    }
}

/// A container that writes without end, read through `gate` and counted as a channel's bytes;
/// returns the bytes read so far.
fn endless_output(
    counter: Arc<shale_meter::ChannelCounter>,
    gate: Option<shale_gateway::ack_policy::TransferGate>,
) -> Arc<std::sync::atomic::AtomicU64> {
    let (mut container, output) = tokio::io::duplex(16 * 1024);
    tokio::spawn(async move {
        let chunk = vec![0u8; 8 * 1024];
        while container.write_all(&chunk).await.is_ok() {}
    });
    let moved = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = moved.clone();
    tokio::spawn(async move {
        let mut from = Metered::new(gated(output, &gate), counter, Side::Client);
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            seen.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            // A client reading at its own pace, so a check falls near the allowance.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    moved
}

fn gauge(metrics: &Metrics, name: &str) -> Option<u64> {
    let prefix = format!("shale_gateway_{name}{{order=\"{ORDER}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.parse().unwrap()))
}

/// Polls until `what` holds; fails after a minute (a generous bound, not a timing claim).
async fn until(what: &str, mut holds: impl FnMut() -> bool) {
    for _ in 0..600 {
        if holds() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within a minute");
}

fn reporting(stand: &Stand) -> Reporting {
    Reporting {
        board: LeaseBoard::new(4),
        ledger: stand.ledger.clone(),
        unacknowledged: stand.metrics.order_unacknowledged_bytes.clone(),
        paused: stand.metrics.order_transfers_paused.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_pause_at_the_allowance_and_a_stored_acknowledgment_resumes_them() {
    let stand = stand(true).await;
    let order = order();
    let lease = stand.billing.lease(&order, now_ms() / 1000).await.unwrap();
    let watch = stand
        .billing
        .acknowledgments()
        .join(&order, lease.clone(), reporting(&stand));
    let session = lease.open_session();
    let closed = CancellationToken::new();
    let moved = endless_output(session.open_channel(), watch.gate(closed.clone()));
    let read = || moved.load(std::sync::atomic::Ordering::Relaxed);

    until("the pause", || {
        gauge(&stand.metrics, "order_transfers_paused") == Some(1)
    })
    .await;
    assert!(watch.is_paused());
    let at_pause = read();
    assert!(at_pause >= ALLOWANCE, "paused after {at_pause} bytes");
    let unacked = gauge(&stand.metrics, "order_unacknowledged_bytes").unwrap();
    assert!(unacked >= ALLOWANCE, "{unacked}");
    // Held: several checks later, no byte more has moved.
    tokio::time::sleep(CHECK_EVERY * 3).await;
    assert_eq!(read(), at_pause, "bytes moved while paused");
    assert!(watch.is_paused());

    // The client's tunnel acknowledges everything metered so far (as `shale-ack` stores it).
    let bytes = session.bytes();
    stand
        .ledger
        .record_ack(&AckRecord {
            order: ORDER,
            head: Head::GENESIS,
            seconds: 1,
            bytes_in: bytes.bytes_in,
            bytes_out: bytes.bytes_out,
            signature: format!("0x{}", "11".repeat(65)),
            received_at_ms: now_ms(),
        })
        .await
        .unwrap();
    watch.acknowledged(bytes.bytes_in + bytes.bytes_out);
    until("the resume", || !watch.is_paused()).await;
    until("more bytes", || read() > at_pause).await;
    // And past the next allowance's worth it pauses again.
    until("the second pause", || {
        watch.is_paused() && read() >= at_pause + ALLOWANCE
    })
    .await;

    // A cut session's pumps give up while paused instead of waiting for an acknowledgment.
    let before = read();
    closed.cancel();
    tokio::time::sleep(CHECK_EVERY).await;
    assert_eq!(read(), before);
    drop(watch);
    until("the series to go with the last session", || {
        gauge(&stand.metrics, "order_transfers_paused").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pause_bytes_flow_past_the_allowance_and_are_reported() {
    let stand = stand(false).await;
    let order = order();
    let lease = stand.billing.lease(&order, now_ms() / 1000).await.unwrap();
    let watch = stand
        .billing
        .acknowledgments()
        .join(&order, lease.clone(), reporting(&stand));
    assert!(watch.gate(CancellationToken::new()).is_none());
    let session = lease.open_session();
    let moved = endless_output(session.open_channel(), None);
    until("twice the allowance unacknowledged on /metrics", || {
        gauge(&stand.metrics, "order_unacknowledged_bytes").is_some_and(|b| b >= 2 * ALLOWANCE)
    })
    .await;
    assert!(moved.load(std::sync::atomic::Ordering::Relaxed) >= 2 * ALLOWANCE);
    assert_eq!(gauge(&stand.metrics, "order_transfers_paused"), Some(0));
    assert!(!watch.is_paused());
}
