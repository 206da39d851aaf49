//! The ledger against real databases: every check runs on a SQLite file and on a throwaway
//! PostgreSQL cluster.

mod common;

use alloy_primitives::U256;
use common::{next_ticks, tariff, PgCluster, DEPLOYMENT};
use shale_meter::ledger::{ClaimStatus, NewClaim, Receipt, SessionCheckpoint};
use shale_meter::probe::Reading;
use shale_meter::{
    verify_receipts, ByteCount, ChainHead, Head, Ledger, MeterError, TickChain, Usage,
};
use std::sync::Arc;

async fn appends_continue_the_chain_and_reject_gaps_repeats_and_forks(ledger: Ledger) {
    let mut chain = TickChain::genesis(DEPLOYMENT.order_key(42), tariff());
    let ticks = next_ticks(&mut chain, 3);
    for t in &ticks {
        ledger.append_tick(&DEPLOYMENT, t).await.unwrap();
    }
    assert_eq!(
        ledger.chain_head(42).await.unwrap(),
        Some(ChainHead {
            seq: 2,
            head: ticks[2].head
        })
    );
    assert_eq!(ledger.chain_head(43).await.unwrap(), None);
    assert_eq!(ledger.ticks(42, 0, 2).await.unwrap(), ticks);
    assert_eq!(ledger.tick(42, 1).await.unwrap().as_ref(), Some(&ticks[1]));
    assert_eq!(ledger.tick(42, 3).await.unwrap(), None);

    // Re-storing a stored tick (a re-bill) is refused.
    let again = ledger
        .append_tick(&DEPLOYMENT, &ticks[1])
        .await
        .unwrap_err();
    assert!(
        matches!(
            again,
            MeterError::ChainConflict {
                order: 42,
                seq: 1,
                stored_last_seq: Some(2)
            }
        ),
        "{again}"
    );
    // A gap is refused.
    let mut ahead = chain.clone();
    next_ticks(&mut ahead, 1);
    let gap = next_ticks(&mut ahead, 1).remove(0);
    assert!(matches!(
        ledger.append_tick(&DEPLOYMENT, &gap).await,
        Err(MeterError::ChainConflict { seq: 4, .. })
    ));
    // A fork (right seq, other previous head) is refused.
    let mut fork = TickChain::resume(
        DEPLOYMENT.order_key(42),
        tariff(),
        Some(ChainHead {
            seq: 2,
            head: ticks[1].head,
        }),
    );
    let forked = next_ticks(&mut fork, 1).remove(0);
    assert!(matches!(
        ledger.append_tick(&DEPLOYMENT, &forked).await,
        Err(MeterError::ChainConflict { seq: 3, .. })
    ));
    // A head that is not the hash of the fields is refused before touching the database.
    let mut forged = chain.prepare(0, Usage::default());
    forged.head = Head([3; 32]);
    assert!(matches!(
        ledger.append_tick(&DEPLOYMENT, &forged).await,
        Err(MeterError::HeadMismatch { seq: 3, .. })
    ));
    // The right next tick of order 42, but chained on another marketplace: its head is not
    // this deployment's, so the ledger of this deployment refuses it.
    let elsewhere = shale_meter::Deployment::new(DEPLOYMENT.chain_id, [0x60; 20]);
    let foreign = TickChain::resume(elsewhere.order_key(42), tariff(), chain.last())
        .prepare(0, Usage::default());
    assert!(matches!(
        ledger.append_tick(&DEPLOYMENT, &foreign).await,
        Err(MeterError::HeadMismatch { seq: 3, .. })
    ));
    // A first tick must start from genesis.
    let mut not_genesis = TickChain::resume(
        DEPLOYMENT.order_key(7),
        tariff(),
        Some(ChainHead {
            seq: u64::MAX - 1,
            head: ticks[0].head,
        }),
    )
    .prepare(0, Usage::default());
    not_genesis.seq = 0;
    not_genesis.head = shale_meter::tick::next_head(
        &DEPLOYMENT.order_key(not_genesis.order),
        &not_genesis.prev_head,
        &not_genesis.fields(),
    );
    assert!(matches!(
        ledger.append_tick(&DEPLOYMENT, &not_genesis).await,
        Err(MeterError::ChainConflict { seq: 0, .. })
    ));

    // And the real next tick still goes in.
    let next = next_ticks(&mut chain, 1).remove(0);
    ledger.append_tick(&DEPLOYMENT, &next).await.unwrap();
    assert_eq!(ledger.chain_head(42).await.unwrap().unwrap().seq, 3);
}

async fn concurrent_writers_of_one_order_store_each_seq_once(ledger: Ledger) {
    let mut chain = TickChain::genesis(DEPLOYMENT.order_key(5), tariff());
    for t in next_ticks(&mut chain, 2) {
        ledger.append_tick(&DEPLOYMENT, &t).await.unwrap();
    }
    // Eight "gateways" each try to store their own version of tick 2.
    let ledger = Arc::new(ledger);
    let attempts: Vec<_> = (0..8u64)
        .map(|i| {
            let tick = chain.prepare(
                0,
                Usage {
                    seconds: 5,
                    bytes_in: i,
                    bytes_out: 0,
                },
            );
            let ledger = Arc::clone(&ledger);
            tokio::spawn(
                async move { (tick.clone(), ledger.append_tick(&DEPLOYMENT, &tick).await) },
            )
        })
        .collect();
    let mut winners = Vec::new();
    for a in attempts {
        let (tick, result) = a.await.unwrap();
        match result {
            Ok(()) => winners.push(tick),
            Err(MeterError::ChainConflict { seq: 2, .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer may store seq 2");
    assert_eq!(ledger.tick(5, 2).await.unwrap().unwrap(), winners[0]);
    assert_eq!(ledger.ticks(5, 0, 10).await.unwrap().len(), 3);
}

async fn unclaimed_ticks_and_usage_follow_confirmed_claims(ledger: Ledger) {
    let mut chain = TickChain::genesis(DEPLOYMENT.order_key(9), tariff());
    let ticks = next_ticks(&mut chain, 6);
    for t in &ticks {
        ledger.append_tick(&DEPLOYMENT, t).await.unwrap();
    }
    let usage_of = |ts: &[shale_meter::Tick]| Usage::sum(ts.iter().map(|t| t.usage())).unwrap();
    assert_eq!(ledger.unclaimed_usage(9).await.unwrap(), usage_of(&ticks));
    assert_eq!(
        ledger.usage_after(9, None).await.unwrap(),
        (usage_of(&ticks), 6)
    );

    let amount = tariff().charge(&usage_of(&ticks[..3]));
    let claim = ledger
        .record_claim(&NewClaim {
            order: 9,
            first_seq: 0,
            last_seq: 2,
            amount,
            tx_hash: None,
            status: ClaimStatus::Pending,
        })
        .await
        .unwrap();
    assert_eq!(claim.prev_head, Head::GENESIS);
    assert_eq!(claim.head, ticks[2].head);
    assert_eq!(claim.usage, usage_of(&ticks[..3]));
    assert_eq!(claim.amount, amount);
    // Pending claims are not paid: everything is still unclaimed.
    assert_eq!(ledger.unclaimed_ticks(9).await.unwrap(), ticks);

    ledger
        .set_claim_status(claim.claim_id, ClaimStatus::Confirmed, Some("0xabc"))
        .await
        .unwrap();
    assert_eq!(ledger.last_claimed_seq(9).await.unwrap(), Some(2));
    assert_eq!(ledger.unclaimed_ticks(9).await.unwrap(), ticks[3..]);
    assert_eq!(
        ledger.unclaimed_usage(9).await.unwrap(),
        usage_of(&ticks[3..])
    );

    // A failed claim of the rest leaves it unclaimed.
    let failed = ledger
        .record_claim(&NewClaim {
            order: 9,
            first_seq: 3,
            last_seq: 5,
            amount: U256::from(1u64),
            tx_hash: Some("0xdef".into()),
            status: ClaimStatus::Submitted,
        })
        .await
        .unwrap();
    assert_eq!(failed.prev_head, ticks[2].head);
    ledger
        .set_claim_status(failed.claim_id, ClaimStatus::Failed, None)
        .await
        .unwrap();
    assert_eq!(ledger.unclaimed_ticks(9).await.unwrap(), ticks[3..]);
    let claims = ledger.claims(9).await.unwrap();
    assert_eq!(claims.len(), 2);
    assert_eq!(claims[0].status, ClaimStatus::Confirmed);
    assert_eq!(claims[0].tx_hash.as_deref(), Some("0xabc"));
    assert_eq!(claims[1].status, ClaimStatus::Failed);
    assert_eq!(claims[1].tx_hash.as_deref(), Some("0xdef"));

    // Claims of ticks that are not stored are refused.
    let missing = ledger
        .record_claim(&NewClaim {
            order: 9,
            first_seq: 4,
            last_seq: 6,
            amount: U256::ZERO,
            tx_hash: None,
            status: ClaimStatus::Pending,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(missing, MeterError::ClaimMismatch { order: 9, .. }),
        "{missing}"
    );
    assert!(matches!(
        ledger
            .set_claim_status(987_654, ClaimStatus::Confirmed, None)
            .await,
        Err(MeterError::UnknownClaim(987_654))
    ));
}

async fn sessions_a_dead_gateway_left_open_end_at_their_last_checkpoint(ledger: Ledger) {
    for (id, start) in [
        ("live", 1_000),
        ("never-checkpointed", 2_000),
        ("closed", 3_000),
    ] {
        ledger
            .record_session_start(id, 21, "10.0.0.9:1", start)
            .await
            .unwrap();
    }
    let moved = |bytes_in, bytes_out| ByteCount {
        bytes_in,
        bytes_out,
    };
    ledger
        .record_session_end("closed", 4_000, moved(1, 2), 1, "closed")
        .await
        .unwrap();
    let checkpoint = |session_id: &str, bytes| SessionCheckpoint {
        session_id: session_id.into(),
        bytes,
        channels: 2,
    };
    ledger
        .checkpoint_sessions(5_000, &[checkpoint("live", moved(10, 20))])
        .await
        .unwrap();
    // A checkpoint never reopens or rewrites a session that ended.
    ledger
        .checkpoint_sessions(
            6_000,
            &[
                checkpoint("live", moved(30, 40)),
                checkpoint("closed", moved(9, 9)),
            ],
        )
        .await
        .unwrap();
    // The gateway dies here; the next one starts by closing what it left.
    assert_eq!(
        ledger
            .close_interrupted_sessions("gateway_lost")
            .await
            .unwrap(),
        2
    );
    let sessions = ledger.sessions(21).await.unwrap();
    let by_id = |id: &str| sessions.iter().find(|s| s.session_id == id).unwrap();
    let live = by_id("live");
    assert_eq!(live.ended_at_ms, Some(6_000));
    assert_eq!((live.bytes_in, live.bytes_out, live.channels), (30, 40, 2));
    assert_eq!(live.outcome.as_deref(), Some("gateway_lost"));
    let never = by_id("never-checkpointed");
    assert_eq!(never.ended_at_ms, Some(2_000), "ends where it started");
    assert_eq!(never.outcome.as_deref(), Some("gateway_lost"));
    let closed = by_id("closed");
    assert_eq!((closed.ended_at_ms, closed.bytes_in), (Some(4_000), 1));
    assert_eq!(closed.outcome.as_deref(), Some("closed"));
    assert_eq!(
        ledger
            .close_interrupted_sessions("gateway_lost")
            .await
            .unwrap(),
        0
    );
}

async fn sessions_are_recorded_with_their_usage(ledger: Ledger) {
    ledger
        .record_session_start("s-1", 11, "10.0.0.1:5000", 1_000)
        .await
        .unwrap();
    ledger
        .record_session_start("s-2", 11, "10.0.0.2:5001", 2_000)
        .await
        .unwrap();
    ledger
        .record_session_start("s-3", 12, "10.0.0.3:5002", 3_000)
        .await
        .unwrap();
    ledger
        .record_session_end(
            "s-1",
            9_000,
            ByteCount {
                bytes_in: 10,
                bytes_out: 20,
            },
            3,
            "closed",
        )
        .await
        .unwrap();
    let sessions = ledger.sessions(11).await.unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0].session_id, "s-1");
    assert_eq!(sessions[0].ended_at_ms, Some(9_000));
    assert_eq!((sessions[0].bytes_in, sessions[0].bytes_out), (10, 20));
    assert_eq!(sessions[0].channels, 3);
    assert_eq!(sessions[0].outcome.as_deref(), Some("closed"));
    assert_eq!(sessions[1].ended_at_ms, None);
    assert_eq!(sessions[1].peer, "10.0.0.2:5001");
    assert!(matches!(
        ledger
            .record_session_end("nope", 1, ByteCount::default(), 0, "closed")
            .await,
        Err(MeterError::UnknownSession(_))
    ));
    // A session id is recorded once.
    assert!(ledger
        .record_session_start("s-1", 11, "x", 1)
        .await
        .is_err());
}

async fn probe_readings_round_trip(ledger: Ledger) {
    let readings = vec![
        Reading::CpuCount {
            online: 8,
            quota_millicpus: Some(4000),
        },
        Reading::Gpu {
            index: 0,
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_mib: 81559,
        },
    ];
    ledger
        .record_probe(3, Some("s-9"), "cpu+gpu", 5_000, &readings)
        .await
        .unwrap();
    ledger
        .record_probe(3, None, "rtt", 6_000, &[Reading::RoundTrip { micros: 800 }])
        .await
        .unwrap();
    let stored = ledger.probe_readings(3).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].reading, readings[0]);
    assert_eq!(stored[1].reading, readings[1]);
    assert_eq!(stored[1].session_id.as_deref(), Some("s-9"));
    assert_eq!(stored[2].probe, "rtt");
    assert_eq!(stored[2].session_id, None);
    assert!(ledger.probe_readings(4).await.unwrap().is_empty());
}

async fn acknowledgments_only_grow_and_the_newest_is_served(ledger: Ledger) {
    use shale_meter::ledger::AckRecord;
    let sig = format!("0x{}", "ab".repeat(65));
    let ack = |seconds, bytes_in, bytes_out| AckRecord {
        order: 5,
        head: Head([seconds as u8; 32]),
        seconds,
        bytes_in,
        bytes_out,
        signature: sig.clone(),
        received_at_ms: 1_000 + seconds,
    };
    assert_eq!(ledger.latest_ack(5).await.unwrap(), None);
    ledger.record_ack(&ack(60, 100, 2_000)).await.unwrap();
    ledger.record_ack(&ack(120, 100, 9_000)).await.unwrap();
    assert_eq!(
        ledger.latest_ack(5).await.unwrap(),
        Some(ack(120, 100, 9_000))
    );
    // Older totals (any of the three lower) are refused and change nothing.
    for older in [
        ack(119, 100, 9_000),
        ack(120, 99, 9_000),
        ack(120, 100, 8_999),
    ] {
        assert!(matches!(
            ledger.record_ack(&older).await,
            Err(MeterError::StaleAck { order: 5, .. })
        ));
    }
    let short = AckRecord {
        signature: "0xabcd".into(),
        ..ack(200, 200, 20_000)
    };
    assert!(ledger.record_ack(&short).await.is_err());
    assert_eq!(
        ledger.latest_ack(5).await.unwrap(),
        Some(ack(120, 100, 9_000))
    );
    assert_eq!(ledger.latest_ack(6).await.unwrap(), None);
    let receipts = ledger.receipts(5).await.unwrap();
    assert_eq!(receipts, vec![Receipt::Ack(ack(120, 100, 9_000))]);
}

/// Acknowledgments read the newest one and then write: many at once, beside other writers (a
/// tunnel per order, the meter's ticks), must all land, never fail with "database is locked".
async fn concurrent_acknowledgments_beside_other_writers_all_land(ledger: Ledger) {
    use shale_meter::ledger::AckRecord;
    let sig = format!("0x{}", "cd".repeat(65));
    let mut tasks = Vec::new();
    for order in 100..116u64 {
        for round in 1..=4u64 {
            let (ledger, signature) = (ledger.clone(), sig.clone());
            tasks.push(tokio::spawn(async move {
                let ack = AckRecord {
                    order,
                    head: Head([round as u8; 32]),
                    seconds: round,
                    bytes_in: round,
                    bytes_out: round,
                    signature,
                    received_at_ms: round,
                };
                // Rounds of one order race each other: an older one may be refused as stale,
                // but only as stale.
                match ledger.record_ack(&ack).await {
                    Ok(()) | Err(shale_meter::MeterError::StaleAck { .. }) => {}
                    Err(e) => panic!("order {order} round {round}: {e}"),
                }
            }));
        }
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut chain = TickChain::genesis(DEPLOYMENT.order_key(order), tariff());
            for t in next_ticks(&mut chain, 3) {
                ledger.append_tick(&DEPLOYMENT, &t).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for order in 100..116u64 {
        let newest = ledger
            .latest_ack(order)
            .await
            .unwrap()
            .expect("an ack landed");
        assert!(newest.seconds >= 1, "order {order}");
    }
}

async fn receipts_stream_as_json_lines_that_verify_to_the_stored_head(ledger: Ledger) {
    // More ticks than one receipts page, so paging is exercised.
    let mut chain = TickChain::genesis(DEPLOYMENT.order_key(77), tariff());
    let ticks = next_ticks(&mut chain, 1_050);
    for t in &ticks {
        ledger.append_tick(&DEPLOYMENT, t).await.unwrap();
    }
    ledger
        .record_session_start("s-77", 77, "peer", 1)
        .await
        .unwrap();
    ledger
        .record_probe(77, None, "rtt", 2, &[Reading::RoundTrip { micros: 5 }])
        .await
        .unwrap();
    let mut out = Vec::new();
    let lines = ledger.write_receipts(77, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(lines, 1_052);
    assert_eq!(text.lines().count(), 1_052);

    // What a client does: parse the lines, keep the ticks, recompute the head.
    let parsed: Vec<Receipt> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(matches!(parsed[0], Receipt::Session(_)));
    assert!(matches!(parsed.last(), Some(Receipt::Probe(_))));
    let got_ticks: Vec<_> = parsed
        .iter()
        .filter_map(|r| match r {
            Receipt::Tick(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(got_ticks, ticks);
    let head = verify_receipts(&DEPLOYMENT, &got_ticks).unwrap();
    assert_eq!(head, ledger.chain_head(77).await.unwrap().unwrap().head);
    assert_eq!(ledger.receipts(77).await.unwrap(), parsed);
    assert!(text
        .lines()
        .nth(1)
        .unwrap()
        .starts_with(r#"{"kind":"tick""#));
}

async fn values_that_do_not_fit_bigint_are_refused_not_wrapped(ledger: Ledger) {
    let mut chain = TickChain::genesis(DEPLOYMENT.order_key(1), tariff());
    let huge = chain.prepare(
        0,
        Usage {
            seconds: 5,
            bytes_in: u64::MAX,
            bytes_out: 0,
        },
    );
    assert!(matches!(
        ledger.append_tick(&DEPLOYMENT, &huge).await,
        Err(MeterError::OutOfRange {
            field: "bytes_in",
            ..
        })
    ));
    assert_eq!(ledger.chain_head(1).await.unwrap(), None);
    // The largest storable order id works.
    let mut big_order = TickChain::genesis(DEPLOYMENT.order_key(i64::MAX as u64), tariff());
    let t = next_ticks(&mut big_order, 1).remove(0);
    ledger.append_tick(&DEPLOYMENT, &t).await.unwrap();
    assert_eq!(ledger.tick(i64::MAX as u64, 0).await.unwrap(), Some(t));
    let _ = &mut chain;
}

macro_rules! ledger_checks {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $check() {
                    let (_dir, ledger) = crate::common::sqlite_ledger().await;
                    super::$check(ledger).await;
                }
            )*
        }

        /// One cluster for all checks (starting PostgreSQL costs seconds), a fresh database each.
        #[tokio::test]
        async fn postgres_passes_every_ledger_check() {
            let Some(pg) = PgCluster::start() else { return };
            $(
                eprintln!("postgres: {}", stringify!($check));
                let ledger = pg.fresh_ledger(stringify!($check)).await;
                $check(ledger.clone()).await;
                ledger.close().await;
            )*
        }
    };
}

ledger_checks!(
    appends_continue_the_chain_and_reject_gaps_repeats_and_forks,
    concurrent_writers_of_one_order_store_each_seq_once,
    unclaimed_ticks_and_usage_follow_confirmed_claims,
    sessions_are_recorded_with_their_usage,
    sessions_a_dead_gateway_left_open_end_at_their_last_checkpoint,
    probe_readings_round_trip,
    acknowledgments_only_grow_and_the_newest_is_served,
    concurrent_acknowledgments_beside_other_writers_all_land,
    receipts_stream_as_json_lines_that_verify_to_the_stored_head,
    values_that_do_not_fit_bigint_are_refused_not_wrapped,
);

#[tokio::test]
async fn sqlite_ledger_is_in_wal_mode_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    // A path with characters a URL would misread.
    let path = dir.path().join("state dir?#%").join("ledger.db");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let ledger = Ledger::open_sqlite(&path).await.unwrap();
    let mut chain = TickChain::genesis(DEPLOYMENT.order_key(8), tariff());
    let ticks = next_ticks(&mut chain, 4);
    for t in &ticks {
        ledger.append_tick(&DEPLOYMENT, t).await.unwrap();
    }
    ledger.close().await;
    assert!(path.exists());
    let mode = std::process::Command::new("sqlite3")
        .arg(&path)
        .arg("PRAGMA journal_mode;")
        .output();
    if let Ok(out) = mode {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "wal");
    }
    // Reopening runs the migrations again (a no-op) and finds the chain.
    let reopened = Ledger::open_sqlite(&path).await.unwrap();
    assert_eq!(
        reopened.chain_head(8).await.unwrap(),
        Some(ChainHead {
            seq: 3,
            head: ticks[3].head
        })
    );
    assert_eq!(
        verify_receipts(&DEPLOYMENT, &reopened.ticks(8, 0, 100).await.unwrap()).unwrap(),
        ticks[3].head
    );
}

#[tokio::test]
async fn unsupported_urls_are_refused_with_a_reason() {
    let err = Ledger::open("mysql://localhost/x").await.unwrap_err();
    assert!(matches!(err, MeterError::UnsupportedUrl(_)));
    assert!(err.to_string().contains("sqlite://"), "{err}");
}

#[tokio::test]
async fn postgres_ledger_is_shared_by_two_gateways() {
    let Some(pg) = PgCluster::start() else { return };
    let a = pg.fresh_ledger("shared").await;
    // The second gateway opens the same database: migrations are already applied.
    let b = Ledger::open(&pg.url("shared")).await.unwrap();
    let mut chain = TickChain::genesis(DEPLOYMENT.order_key(31), tariff());
    let ticks = next_ticks(&mut chain, 4);
    a.append_tick(&DEPLOYMENT, &ticks[0]).await.unwrap();
    b.append_tick(&DEPLOYMENT, &ticks[1]).await.unwrap();
    // Gateway a, unaware of b's write, cannot re-store seq 1 or skip it.
    assert!(matches!(
        a.append_tick(&DEPLOYMENT, &ticks[1]).await,
        Err(MeterError::ChainConflict {
            stored_last_seq: Some(1),
            ..
        })
    ));
    a.append_tick(&DEPLOYMENT, &ticks[2]).await.unwrap();
    assert_eq!(
        verify_receipts(&DEPLOYMENT, &b.ticks(31, 0, 10).await.unwrap()).unwrap(),
        ticks[2].head
    );
    a.close().await;
    b.close().await;
}
