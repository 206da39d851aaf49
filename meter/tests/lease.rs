//! The lease meter's own task against real ledgers: ticks happen by themselves, the final
//! tick bills everything counted, and a restarted lease continues the chain.

mod common;

use common::{tariff, PgCluster, DEPLOYMENT};
use shale_meter::{
    verify_receipts, ByteCount, LeaseSpec, Ledger, Meter, MeterConfig, MeterError, Metered, Side,
    Tick,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until the lease has written `n` ticks; the generous limit only keeps a broken meter
/// from hanging the suite.
async fn wait_for_ticks(lease: &shale_meter::LeaseMeter, n: u64) {
    let mut rx = lease.subscribe();
    tokio::time::timeout(Duration::from_secs(60), async {
        while rx.borrow_and_update().ticks_written < n {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the lease meter stopped ticking");
}

fn check_chain(ticks: &[Tick]) {
    for (i, t) in ticks.iter().enumerate() {
        assert_eq!(t.seq, i as u64, "seqs must be 0, 1, 2, … without gaps");
    }
    verify_receipts(&DEPLOYMENT, ticks).unwrap();
}

async fn lease_meter_ticks_by_itself_and_the_final_tick_bills_every_counted_byte(ledger: Ledger) {
    let meter = Meter::new(
        ledger.clone(),
        DEPLOYMENT,
        &MeterConfig {
            tick_interval_secs: 1,
            ..MeterConfig::default()
        },
    )
    .unwrap();
    let order = 100;
    let before = Instant::now();
    let lease = meter
        .start_lease(LeaseSpec {
            order,
            tariff: tariff(),
            max_seconds: None,
        })
        .await
        .unwrap();
    assert!(matches!(
        meter
            .start_lease(LeaseSpec {
                order,
                tariff: tariff(),
                max_seconds: None
            })
            .await,
        Err(MeterError::LeaseActive { order: 100 })
    ));

    // A real pump: client bytes through a Metered stream into a "container" and back.
    let session = lease.open_session();
    let channel = session.open_channel();
    let (client, client_end) = tokio::io::duplex(1 << 16);
    let (mut container_end, mut container) = tokio::io::duplex(1 << 16);
    let mut client_end = Metered::new(client_end, Arc::clone(&channel), Side::Client);
    let pump = tokio::spawn(async move {
        tokio::io::copy_bidirectional(&mut client_end, &mut container_end).await
    });
    let echo = tokio::spawn(async move {
        // The container echoes everything twice.
        let mut buf = vec![0u8; 8192];
        loop {
            let n = container.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            container.write_all(&buf[..n]).await.unwrap();
            container.write_all(&buf[..n]).await.unwrap();
        }
    });
    let (mut rd, mut wr) = tokio::io::split(client);
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        got.len()
    });
    wr.write_all(&vec![1u8; 300_000]).await.unwrap();
    wait_for_ticks(&lease, 2).await;
    wr.write_all(&vec![2u8; 12_345]).await.unwrap();
    wr.shutdown().await.unwrap();
    drop(wr);
    echo.await.unwrap();
    assert_eq!(reader.await.unwrap(), 2 * 312_345);
    pump.await.unwrap().unwrap();
    assert_eq!(
        session.bytes(),
        ByteCount {
            bytes_in: 312_345,
            bytes_out: 624_690
        }
    );

    let final_tick = meter.end_lease(order).await.unwrap();
    let elapsed = before.elapsed();
    assert!(meter.lease(order).is_none());
    assert!(lease.is_stopped());
    let ticks = ledger.ticks(order, 0, u64::MAX).await.unwrap();
    check_chain(&ticks);
    assert!(ticks.len() >= 2);
    if let Some(f) = final_tick {
        assert_eq!(&f, ticks.last().unwrap());
    }
    let seconds: u64 = ticks.iter().map(|t| t.seconds).sum();
    assert!(
        Duration::from_secs(seconds) <= elapsed,
        "billed {seconds} s in {elapsed:?}"
    );
    assert_eq!(ticks.iter().map(|t| t.bytes_in).sum::<u64>(), 312_345);
    assert_eq!(ticks.iter().map(|t| t.bytes_out).sum::<u64>(), 624_690);
    let totals = lease.totals();
    assert!(totals.stopped);
    assert_eq!(totals.metered.seconds, seconds);
    assert_eq!(totals.ticks_written, ticks.len() as u64);
    assert_eq!(totals.unclaimed_charge, totals.metered_charge);
    assert!(totals.last_write_micros.is_some());
    assert!(totals.last_lag_micros.is_some());

    // Restart: the chain continues from the stored head.
    let again = meter
        .start_lease(LeaseSpec {
            order,
            tariff: tariff(),
            max_seconds: None,
        })
        .await
        .unwrap();
    assert_eq!(again.totals().metered, totals.metered);
    again.open_session().open_channel().add_in(1);
    let resumed = again.stop().await.unwrap().unwrap();
    assert_eq!(resumed.seq, ticks.len() as u64);
    assert_eq!(resumed.prev_head, ticks.last().unwrap().head);
    assert_eq!(again.stop().await.unwrap(), None, "stop is idempotent");
    check_chain(&ledger.ticks(order, 0, u64::MAX).await.unwrap());
}

async fn lease_stops_by_itself_at_the_lease_cap(ledger: Ledger) {
    let meter = Meter::new(
        ledger.clone(),
        DEPLOYMENT,
        &MeterConfig {
            tick_interval_secs: 1,
            ..MeterConfig::default()
        },
    )
    .unwrap();
    let lease = meter
        .start_lease(LeaseSpec {
            order: 200,
            tariff: tariff(),
            max_seconds: Some(2),
        })
        .await
        .unwrap();
    let mut rx = lease.subscribe();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !rx.borrow_and_update().stopped {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the meter did not stop at the cap");
    let ticks = ledger.ticks(200, 0, u64::MAX).await.unwrap();
    check_chain(&ticks);
    assert_eq!(ticks.iter().map(|t| t.seconds).sum::<u64>(), 2);
    assert_eq!(lease.stop().await.unwrap(), None);
    assert!(matches!(
        lease.refresh_claims().await,
        Err(MeterError::LeaseStopped { order: 200 })
    ));
}

async fn dropping_a_lease_meter_still_writes_its_final_tick(ledger: Ledger) {
    let lease = shale_meter::LeaseMeter::start(
        ledger.clone(),
        DEPLOYMENT,
        LeaseSpec {
            order: 300,
            tariff: tariff(),
            max_seconds: None,
        },
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let channel = lease.open_session().open_channel();
    channel.add_out(4242);
    drop(lease);
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(t) = ledger.tick(300, 0).await.unwrap() {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map(|t| assert_eq!(t.bytes_out, 4242))
    .expect("no final tick after drop");
}

macro_rules! lease_checks {
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

        #[tokio::test]
        async fn postgres_passes_every_lease_check() {
            let Some(pg) = PgCluster::start() else { return };
            $(
                let ledger = pg.fresh_ledger(stringify!($check)).await;
                $check(ledger.clone()).await;
                ledger.close().await;
            )*
        }
    };
}

lease_checks!(
    lease_meter_ticks_by_itself_and_the_final_tick_bills_every_counted_byte,
    lease_stops_by_itself_at_the_lease_cap,
    dropping_a_lease_meter_still_writes_its_final_tick,
);
