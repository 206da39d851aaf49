//! The `shale-receipts` subsystem's output as the client reads it: JSON lines of
//! [`Receipt`], parsed line by line as `shale receipts --verify` does, then the tick chain
//! recomputed with `verify_receipts` and the charges with `verify_charges`. (The subsystem takes
//! no request beyond its name, which the `login` target covers.) The gateway is the client's
//! adversary here: a hostile SP writes these lines.
//!
//! Invariants: no input panics; a parsed receipt round-trips; a log that verifies is exactly the
//! honest chain of its own usages (same heads), so no altered, dropped or reordered tick passes;
//! the honest chain of any usages verifies, and stops verifying when one tick is replaced by
//! anything that differs in what the chain hashes.

use shale_contracts::U256;
use shale_meter::ledger::Receipt;
use shale_meter::tick::verify_charges;
use shale_meter::{verify_receipts, Deployment, Tariff, Tick, TickChain};

/// The marketplace the log is checked against: heads are hashed under its order keys.
const DEPLOYMENT: Deployment = Deployment::new(31337, [0x5f; 20]);
/// Lines read per input: each tick costs two Poseidon hashes, and more lines find nothing new.
const MAX_LINES: usize = 64;

/// Runs the target on one input; panics where an invariant breaks.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut ticks: Vec<Tick> = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(MAX_LINES)
    {
        let Ok(receipt) = serde_json::from_str::<Receipt>(line) else {
            continue;
        };
        let again = serde_json::to_string(&receipt).expect("a receipt serializes");
        assert_eq!(
            serde_json::from_str::<Receipt>(&again).expect("a serialized receipt parses"),
            receipt
        );
        if let Receipt::Tick(t) = receipt {
            ticks.push(t);
        }
    }
    let verified = verify_receipts(&DEPLOYMENT, &ticks);

    // The honest chain of the same usages, as the gateway's meter builds it.
    let tariff = Tariff::new(U256::from(1_000u64), U256::from(1u64 << 31)).expect("a tariff");
    let order = ticks.first().map_or(1, |t| t.order);
    let mut chain = TickChain::genesis(DEPLOYMENT.order_key(order), tariff);
    let honest: Vec<Tick> = ticks
        .iter()
        .map(|t| {
            let h = chain.prepare(t.started_at_ms, t.usage());
            chain.commit(&h).expect("the honest tick commits");
            h
        })
        .collect();
    assert_eq!(
        verify_receipts(&DEPLOYMENT, &honest).ok(),
        Some(chain.head())
    );
    assert!(verify_charges(&tariff, &honest).is_ok());

    // Any one tick of the honest log replaced by the client's parsed one: caught unless it
    // is the honest tick in what the chain hashes.
    let hashed = |t: &Tick| (t.fields(), t.prev_head, t.head);
    if let Some((k, tick)) = ticks.iter().enumerate().next_back() {
        let mut tampered = honest.clone();
        tampered[k] = tick.clone();
        assert_eq!(
            verify_receipts(&DEPLOYMENT, &tampered).is_ok(),
            hashed(tick) == hashed(&honest[k]),
            "tick {k} replaced by {tick:?}"
        );
    }

    if let Ok(head) = verified {
        assert_eq!(
            head,
            chain.head(),
            "a log verified to a head its usages do not give"
        );
        for (got, want) in ticks.iter().zip(&honest) {
            assert_eq!(
                (got.seq, got.prev_head, got.head),
                (want.seq, want.prev_head, want.head)
            );
        }
        if verify_charges(&tariff, &ticks).is_ok() {
            assert_eq!(ticks, honest);
        }
    }
}
