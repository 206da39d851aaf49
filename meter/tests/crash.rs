//! Crash safety: a writer killed with SIGKILL at any moment leaves a ledger whose chain is
//! intact, holds every tick the writer saw acknowledged, and continues without skipping or
//! repeating a seq.

mod common;

use common::tariff;
use shale_meter::{verify_receipts, LeaseSpec, Ledger, Meter, MeterConfig, TickChain, Usage};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const CHILD_DB: &str = "SHALE_METER_CRASH_CHILD_DB";
const ORDER: u64 = 4242;

/// Usage of tick `seq`, so the parent can tell which ticks it is looking at.
fn usage_of(seq: u64) -> Usage {
    Usage {
        seconds: 5,
        bytes_in: seq * 3 + 1,
        bytes_out: seq * 7,
    }
}

/// Not a test on its own: the writer process the crash test starts and kills. It resumes the
/// chain from the ledger and appends ticks as fast as it can, printing each acknowledged seq.
#[test]
#[ignore = "child process of kill_9_while_appending_loses_no_acknowledged_tick_and_the_chain_continues"]
fn crash_child_appends_ticks_until_killed() {
    let db = std::env::var(CHILD_DB).expect("run by the crash test only");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ledger = Ledger::open_sqlite(Path::new(&db)).await.unwrap();
        let head = ledger.chain_head(ORDER).await.unwrap();
        let mut chain = TickChain::resume(ORDER, tariff(), head);
        loop {
            let tick = chain.prepare(0, usage_of(chain.next_seq()));
            ledger.append_tick(&tick).await.unwrap();
            chain.commit(&tick).unwrap();
            println!("stored {}", tick.seq);
        }
    });
}

/// Starts the writer, lets it acknowledge at least `at_least` more ticks, kills it with
/// SIGKILL, and returns the last seq it acknowledged.
fn run_and_kill(db: &Path, at_least: u64) -> Option<u64> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_appends_ticks_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut acknowledged = None;
    let mut seen = 0;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(seq) = line.strip_prefix("stored ") {
            acknowledged = Some(seq.parse::<u64>().unwrap());
            seen += 1;
            if seen >= at_least {
                break;
            }
        }
    }
    // Child::kill is SIGKILL: no destructors, no flush, mid-transaction.
    child.kill().unwrap();
    child.wait().unwrap();
    acknowledged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_appending_loses_no_acknowledged_tick_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    // Create the schema first so every child starts on equal terms.
    Ledger::open_sqlite(&db).await.unwrap().close().await;

    let mut last_acknowledged = None;
    for round in 0..4u64 {
        let acked = tokio::task::block_in_place(|| run_and_kill(&db, 20 + 13 * round))
            .expect("the writer acknowledged no tick");
        assert!(Some(acked) > last_acknowledged);
        last_acknowledged = Some(acked);

        let ledger = Ledger::open_sqlite(&db).await.unwrap();
        let head = ledger.chain_head(ORDER).await.unwrap().unwrap();
        // Every acknowledged tick is stored; at most the one in flight went in besides.
        assert!(
            head.seq >= acked,
            "round {round}: acked {acked}, stored {}",
            head.seq
        );
        assert!(
            head.seq <= acked + 1,
            "round {round}: acked {acked}, stored {}",
            head.seq
        );
        let ticks = ledger.ticks(ORDER, 0, u64::MAX).await.unwrap();
        assert_eq!(ticks.len() as u64, head.seq + 1, "no gaps, no repeats");
        for t in &ticks {
            assert_eq!(t.usage(), usage_of(t.seq), "tick {} altered", t.seq);
        }
        assert_eq!(verify_receipts(&ticks).unwrap(), head.head);
        ledger.close().await;
    }

    // A lease meter started on the crashed ledger continues from the stored head.
    let ledger = Ledger::open_sqlite(&db).await.unwrap();
    let head = ledger.chain_head(ORDER).await.unwrap().unwrap();
    let meter = Meter::new(ledger.clone(), &MeterConfig::default()).unwrap();
    let lease = meter
        .start_lease(LeaseSpec {
            order: ORDER,
            tariff: tariff(),
            max_seconds: None,
        })
        .await
        .unwrap();
    lease.open_session().open_channel().add_in(99);
    let next = meter.end_lease(ORDER).await.unwrap().unwrap();
    assert_eq!(next.seq, head.seq + 1);
    assert_eq!(next.prev_head, head.head);
    let ticks = ledger.ticks(ORDER, 0, u64::MAX).await.unwrap();
    assert_eq!(verify_receipts(&ticks).unwrap(), next.head);
}
