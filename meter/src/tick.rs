//! Ticks and the per-order tick chain `h_i = Poseidon(K, h_{i-1}, tick_i)`.
//!
//! The hash is `shale_circuits::next_head`, the same native Poseidon that the claim circuit
//! proves, so the head the meter stores is the head the contract will check. `K` is the order's
//! [`OrderKey`]: the order id bound to its [`Deployment`] (chain id and marketplace address), so
//! a chain, and every head of it, belongs to one order of one marketplace. Whoever builds or
//! checks a chain must therefore know the deployment; [`Tick::order`] stays the plain order id.

use crate::tariff::{Tariff, Usage};
use crate::MeterError;
use alloy_primitives::U256;
use serde::{Deserialize, Serialize};
pub use shale_circuits::{next_head, Deployment, Head, OrderKey, TickFields};

/// One closed interval of one order's lease, as stored in the ledger and shown on receipts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    /// The order the tick is charged to.
    pub order: u64,
    /// Position in the order's chain: 0, 1, 2, … with no gaps or repeats.
    pub seq: u64,
    /// Wall-clock start of the interval, Unix milliseconds (informational: the seconds are
    /// measured on a monotonic clock).
    pub started_at_ms: u64,
    /// Leased seconds the tick covers.
    pub seconds: u64,
    /// Bytes from the client into the container during the interval.
    pub bytes_in: u64,
    /// Bytes from the container to the client during the interval.
    pub bytes_out: u64,
    /// The tick's own charge under the order's tariff, in wei (see [`crate::tariff`] for how
    /// per-tick charges relate to what a claim of a batch is paid).
    #[serde(with = "crate::wei")]
    pub charge: U256,
    /// The chain head before this tick.
    pub prev_head: Head,
    /// `next_head(key, prev_head, fields)`: the chain head after this tick, under the order's key.
    pub head: Head,
}

impl Tick {
    /// The fields the chain hash covers.
    pub fn fields(&self) -> TickFields {
        TickFields {
            order: self.order,
            seq: self.seq,
            seconds: self.seconds,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        }
    }

    /// The usage the tick charges for.
    pub fn usage(&self) -> Usage {
        Usage {
            seconds: self.seconds,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        }
    }

    /// Whether `head` is really the hash of `prev_head` and the fields, for this order of
    /// `deployment`.
    pub fn head_is_valid(&self, deployment: &Deployment) -> bool {
        next_head(
            &deployment.order_key(self.order),
            &self.prev_head,
            &self.fields(),
        ) == self.head
    }
}

/// The chain position stored for an order: its last seq and head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// The seq of the last stored tick.
    pub seq: u64,
    /// The head after that tick.
    pub head: Head,
}

/// An order's tick chain as the meter extends it.
///
/// Building a tick ([`TickChain::prepare`]) does not advance the chain; only
/// [`TickChain::commit`], called after the tick is durably stored, does. A failed write
/// therefore leaves the chain where the ledger is, and the next tick reuses the same seq.
#[derive(Debug, Clone)]
pub struct TickChain {
    key: OrderKey,
    tariff: Tariff,
    next_seq: u64,
    head: Head,
}

impl TickChain {
    /// A new chain for `key`'s order, starting at seq 0 from the genesis head.
    pub fn genesis(key: OrderKey, tariff: Tariff) -> TickChain {
        TickChain::resume(key, tariff, None)
    }

    /// Continues `key`'s order's chain after the stored `last` tick (or from genesis if none).
    pub fn resume(key: OrderKey, tariff: Tariff, last: Option<ChainHead>) -> TickChain {
        let (next_seq, head) = match last {
            Some(last) => (last.seq + 1, last.head),
            None => (0, Head::GENESIS),
        };
        TickChain {
            key,
            tariff,
            next_seq,
            head,
        }
    }

    /// The order (its on-chain id).
    pub fn order(&self) -> u64 {
        self.key.order()
    }

    /// The order with its deployment: what every tick of the chain is hashed under.
    pub fn key(&self) -> &OrderKey {
        &self.key
    }

    /// The tariff charges are computed under.
    pub fn tariff(&self) -> &Tariff {
        &self.tariff
    }

    /// The seq the next tick will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The head after the last committed tick.
    pub fn head(&self) -> Head {
        self.head
    }

    /// The last committed position, if any tick was committed or resumed from.
    pub fn last(&self) -> Option<ChainHead> {
        self.next_seq.checked_sub(1).map(|seq| ChainHead {
            seq,
            head: self.head,
        })
    }

    /// Builds the next tick for `usage` starting at `started_at_ms`, without advancing.
    pub fn prepare(&self, started_at_ms: u64, usage: Usage) -> Tick {
        let fields = TickFields {
            order: self.key.order(),
            seq: self.next_seq,
            seconds: usage.seconds,
            bytes_in: usage.bytes_in,
            bytes_out: usage.bytes_out,
        };
        Tick {
            order: self.key.order(),
            seq: self.next_seq,
            started_at_ms,
            seconds: usage.seconds,
            bytes_in: usage.bytes_in,
            bytes_out: usage.bytes_out,
            charge: self.tariff.charge(&usage),
            prev_head: self.head,
            head: next_head(&self.key, &self.head, &fields),
        }
    }

    /// Advances past `tick`, which must be the one [`TickChain::prepare`] would build now.
    pub fn commit(&mut self, tick: &Tick) -> Result<(), MeterError> {
        if tick.order != self.key.order()
            || tick.seq != self.next_seq
            || tick.prev_head != self.head
        {
            return Err(MeterError::ChainConflict {
                order: tick.order,
                seq: tick.seq,
                stored_last_seq: self.last().map(|l| l.seq),
            });
        }
        if next_head(&self.key, &tick.prev_head, &tick.fields()) != tick.head {
            return Err(MeterError::HeadMismatch {
                order: tick.order,
                seq: tick.seq,
            });
        }
        self.next_seq += 1;
        self.head = tick.head;
        Ok(())
    }
}

/// Recomputes an order's chain of `deployment` from a full tick log (as fetched with receipts)
/// and returns its head, which the client compares with the head the contract stores.
///
/// The log must start at seq 0 from the genesis head, belong to one order, and have
/// consecutive seqs; every head is recomputed under the order's key, so a log with any tick
/// altered, dropped, repeated or reordered fails, and so does a log of another deployment. An
/// empty log verifies to the genesis head.
pub fn verify_receipts(deployment: &Deployment, ticks: &[Tick]) -> Result<Head, MeterError> {
    verify_chain_from(deployment, None, ticks)
}

/// Like [`verify_receipts`] for a log that continues after `start` (e.g. the ticks after the
/// last claim, from the head the contract stores).
pub fn verify_chain_from(
    deployment: &Deployment,
    start: Option<ChainHead>,
    ticks: &[Tick],
) -> Result<Head, MeterError> {
    let (mut expected_seq, mut head) = match start {
        Some(s) => (s.seq + 1, s.head),
        None => (0, Head::GENESIS),
    };
    let order = ticks.first().map(|t| t.order);
    let key = deployment.order_key(order.unwrap_or_default());
    for tick in ticks {
        let fail = |reason: String| MeterError::ReceiptsInvalid {
            seq: tick.seq,
            reason,
        };
        if Some(tick.order) != order {
            return Err(fail(format!(
                "tick belongs to order {} in a log of order {}",
                tick.order,
                order.unwrap_or_default()
            )));
        }
        if tick.seq != expected_seq {
            return Err(fail(format!("expected seq {expected_seq}")));
        }
        if tick.prev_head != head {
            return Err(fail(format!(
                "previous head {} differs from the recomputed {head}",
                tick.prev_head
            )));
        }
        let recomputed = next_head(&key, &head, &tick.fields());
        if recomputed != tick.head {
            return Err(fail(format!(
                "head {} differs from the recomputed {recomputed}",
                tick.head
            )));
        }
        head = recomputed;
        expected_seq += 1;
    }
    Ok(head)
}

/// Checks that every tick's `charge` is what `tariff` gives for its usage.
pub fn verify_charges(tariff: &Tariff, ticks: &[Tick]) -> Result<(), MeterError> {
    for tick in ticks {
        let expected = tariff.charge(&tick.usage());
        if tick.charge != expected {
            return Err(MeterError::ReceiptsInvalid {
                seq: tick.seq,
                reason: format!(
                    "charge {} wei, the tariff gives {expected} wei",
                    tick.charge
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEPLOYMENT: Deployment = Deployment::new(31337, [0x5f; 20]);

    fn tariff() -> Tariff {
        Tariff::new(U256::from(1_000u64), U256::from(1u64 << 31)).unwrap()
    }

    fn build(order: u64, usages: &[Usage]) -> Vec<Tick> {
        let mut chain = TickChain::genesis(DEPLOYMENT.order_key(order), tariff());
        usages
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let t = chain.prepare(1_700_000_000_000 + 5_000 * i as u64, *u);
                chain.commit(&t).unwrap();
                t
            })
            .collect()
    }

    fn usage(seconds: u64, bytes_in: u64, bytes_out: u64) -> Usage {
        Usage {
            seconds,
            bytes_in,
            bytes_out,
        }
    }

    #[test]
    fn prepare_does_not_advance_and_commit_does() {
        let mut chain = TickChain::genesis(DEPLOYMENT.order_key(42), tariff());
        let a = chain.prepare(0, usage(5, 1, 2));
        let again = chain.prepare(0, usage(5, 1, 2));
        assert_eq!(a, again);
        assert_eq!(chain.next_seq(), 0);
        chain.commit(&a).unwrap();
        assert_eq!(
            chain.last(),
            Some(ChainHead {
                seq: 0,
                head: a.head
            })
        );
        // Committing the same tick twice would repeat a seq.
        assert!(matches!(
            chain.commit(&a),
            Err(MeterError::ChainConflict { seq: 0, .. })
        ));
        let b = chain.prepare(5_000, usage(5, 0, 0));
        assert_eq!((b.seq, b.prev_head), (1, a.head));
        assert_eq!(b.charge, U256::from(5_000u64));
    }

    #[test]
    fn commit_refuses_a_forged_head() {
        let mut chain = TickChain::genesis(DEPLOYMENT.order_key(1), tariff());
        let mut t = chain.prepare(0, usage(5, 0, 0));
        t.head = Head([1; 32]);
        assert!(matches!(
            chain.commit(&t),
            Err(MeterError::HeadMismatch { seq: 0, .. })
        ));
        assert_eq!(chain.next_seq(), 0);
    }

    #[test]
    fn resumed_chain_continues_exactly_where_the_stored_head_is() {
        let ticks = build(7, &[usage(5, 10, 20), usage(5, 0, 0), usage(3, 1, 1)]);
        let stored = ChainHead {
            seq: 1,
            head: ticks[1].head,
        };
        let resumed = TickChain::resume(DEPLOYMENT.order_key(7), tariff(), Some(stored));
        assert_eq!(
            resumed.prepare(ticks[2].started_at_ms, ticks[2].usage()),
            ticks[2]
        );
    }

    #[test]
    fn verify_receipts_returns_the_head_and_rejects_every_kind_of_tampering() {
        let ticks = build(
            9,
            &[
                usage(5, 100, 200),
                usage(5, 0, 0),
                usage(5, 1, 0),
                usage(2, 0, 9),
            ],
        );
        let head = verify_receipts(&DEPLOYMENT, &ticks).unwrap();
        assert_eq!(head, ticks[3].head);
        assert_eq!(verify_receipts(&DEPLOYMENT, &[]).unwrap(), Head::GENESIS);
        verify_charges(&tariff(), &ticks).unwrap();

        let mut dropped = ticks.clone();
        dropped.remove(1);
        assert!(matches!(
            verify_receipts(&DEPLOYMENT, &dropped),
            Err(MeterError::ReceiptsInvalid { seq: 2, .. })
        ));

        let mut repeated = ticks.clone();
        repeated.insert(2, ticks[1].clone());
        assert!(verify_receipts(&DEPLOYMENT, &repeated).is_err());

        let mut swapped = ticks.clone();
        swapped.swap(1, 2);
        assert!(verify_receipts(&DEPLOYMENT, &swapped).is_err());

        let mut inflated = ticks.clone();
        inflated[2].bytes_out += 1;
        assert!(matches!(
            verify_receipts(&DEPLOYMENT, &inflated),
            Err(MeterError::ReceiptsInvalid { seq: 2, .. })
        ));

        let mut recharged = ticks.clone();
        recharged[0].charge += U256::from(1u64);
        assert!(verify_receipts(&DEPLOYMENT, &recharged).is_ok());
        assert!(matches!(
            verify_charges(&tariff(), &recharged),
            Err(MeterError::ReceiptsInvalid { seq: 0, .. })
        ));

        let mut foreign = ticks.clone();
        foreign.extend(build(10, &[usage(1, 1, 1)]).into_iter().map(|mut t| {
            t.seq = 4;
            t
        }));
        assert!(verify_receipts(&DEPLOYMENT, &foreign).is_err());

        // The same log checked against another marketplace, or another chain, fails at its
        // first tick: its heads were hashed under this deployment's order key.
        for other in [
            Deployment::new(31337, [0x60; 20]),
            Deployment::new(31338, [0x5f; 20]),
        ] {
            assert!(matches!(
                verify_receipts(&other, &ticks),
                Err(MeterError::ReceiptsInvalid { seq: 0, .. })
            ));
            assert!(!ticks[0].head_is_valid(&other));
        }
        assert!(ticks[0].head_is_valid(&DEPLOYMENT));

        // The tail after a claimed prefix verifies from the claimed head.
        let start = ChainHead {
            seq: 1,
            head: ticks[1].head,
        };
        assert_eq!(
            verify_chain_from(&DEPLOYMENT, Some(start), &ticks[2..]).unwrap(),
            head
        );
    }

    #[test]
    fn tick_json_carries_wei_as_decimal_and_heads_as_hex() {
        let t = &build(3, &[usage(5, 1 << 30, 0)])[0];
        let v: serde_json::Value = serde_json::to_value(t).unwrap();
        // 5 s at 1000 wei plus 1 GiB at 2^31 wei per GiB.
        assert_eq!(v["charge"], "2147488648");
        assert!(v["head"].as_str().unwrap().starts_with("0x"));
        assert_eq!(serde_json::from_value::<Tick>(v).unwrap(), *t);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn any_chain_verifies_and_any_single_field_change_breaks_it(
            usages in proptest::collection::vec(
                (0u64..10, any::<u32>(), any::<u32>())
                    .prop_map(|(s, i, o)| usage(s, i.into(), o.into())),
                1..12,
            ),
            victim in any::<prop::sample::Index>(),
            field in 0usize..4,
        ) {
            let ticks = build(5, &usages);
            prop_assert_eq!(verify_receipts(&DEPLOYMENT, &ticks).unwrap(), ticks.last().unwrap().head);
            let i = victim.index(ticks.len());
            let mut bad = ticks.clone();
            match field {
                0 => bad[i].seconds += 1,
                1 => bad[i].bytes_in ^= 1,
                2 => bad[i].bytes_out = bad[i].bytes_out.wrapping_add(1),
                _ => bad[i].order += 1,
            }
            prop_assert!(verify_receipts(&DEPLOYMENT, &bad).is_err());
        }
    }
}
