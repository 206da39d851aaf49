//! What a lease costs: integer prices in wei and the one rounding rule shared with the contract.
//!
//! # The rule
//!
//! For usage of `s` seconds and `b = bytes_in + bytes_out` bytes under prices `pps` (wei per
//! second) and `ppg` (wei per GiB, 2^30 bytes):
//!
//! ```text
//! charge = s * pps + floor(b * ppg / 2^30)
//! ```
//!
//! The byte part is rounded down, so a fraction of a wei always stays with the client. The
//! contract applies the same formula to the totals of each claimed batch of ticks
//! ([`Tariff::charge`] on [`Usage::sum`] of the batch).
//!
//! # Per tick versus per batch
//!
//! Each [`crate::Tick`] carries its own `charge` under the same formula. Because the floor of a
//! sum is at least the sum of the floors, for a batch of `n` ticks:
//!
//! ```text
//! sum(tick charges) <= charge(batch totals) <= sum(tick charges) + (n - 1)
//! ```
//!
//! and `charge(batch totals)` never exceeds the exact (rational) price of the batch's usage,
//! falling short of it by less than one wei. So what the SP is paid is at most n-1 wei above the
//! sum shown tick by tick on the receipts, and never above the exact price of the bytes and
//! seconds moved; over a lease claimed in `k` batches the SP forgoes less than `k` wei in total.
//! [`crate::LeaseMeter`] reports the unclaimed amount as the batch charge, which is exactly
//! what one claim of all unclaimed ticks will be paid.
//!
//! # No overflow
//!
//! Prices are limited to `MAX_PRICE = 2^128 - 1` wei (3.4e20 FIL per second, far beyond any
//! real price). With u64 seconds and bytes, `s * pps < 2^192` and `b * ppg < 2^193`, so the
//! charge of any [`Usage`] fits a U256 and [`Tariff::charge`] cannot fail.

use crate::MeterError;
use alloy_primitives::U256;
use serde::{Deserialize, Serialize};

/// Bytes per GiB, the unit of the per-byte price.
pub const GIB: u64 = 1 << 30;

/// The largest price (in wei) a tariff accepts, 2^128 - 1; see the module docs for why.
pub const MAX_PRICE: U256 = U256::from_limbs([u64::MAX, u64::MAX, 0, 0]);

/// An order's prices, in wei. Constructed through [`Tariff::new`], which enforces [`MAX_PRICE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TariffRepr", into = "TariffRepr")]
pub struct Tariff {
    price_per_second: U256,
    price_per_gib: U256,
}

/// Usage over some span of a lease: what a tick or a batch of ticks charges for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Leased seconds.
    pub seconds: u64,
    /// Bytes from the client into the container.
    pub bytes_in: u64,
    /// Bytes from the container to the client.
    pub bytes_out: u64,
}

impl Usage {
    /// Adds `other` to `self`, failing instead of wrapping.
    pub fn checked_add(self, other: Usage) -> Result<Usage, MeterError> {
        Ok(Usage {
            seconds: self
                .seconds
                .checked_add(other.seconds)
                .ok_or(MeterError::Overflow { what: "seconds" })?,
            bytes_in: self
                .bytes_in
                .checked_add(other.bytes_in)
                .ok_or(MeterError::Overflow { what: "bytes_in" })?,
            bytes_out: self
                .bytes_out
                .checked_add(other.bytes_out)
                .ok_or(MeterError::Overflow { what: "bytes_out" })?,
        })
    }

    /// The totals of many usages, e.g. of a batch of ticks.
    pub fn sum<I: IntoIterator<Item = Usage>>(items: I) -> Result<Usage, MeterError> {
        items
            .into_iter()
            .try_fold(Usage::default(), |acc, u| acc.checked_add(u))
    }

    /// Bytes moved in both directions, widened so the sum of two u64 cannot overflow.
    pub fn bytes_total(&self) -> u128 {
        u128::from(self.bytes_in) + u128::from(self.bytes_out)
    }
}

impl Tariff {
    /// A tariff of `price_per_second` wei per leased second and `price_per_gib` wei per GiB
    /// moved (both directions together). Fails if either exceeds [`MAX_PRICE`].
    pub fn new(price_per_second: U256, price_per_gib: U256) -> Result<Tariff, MeterError> {
        for (name, price) in [
            ("price per second", price_per_second),
            ("price per GiB", price_per_gib),
        ] {
            if price > MAX_PRICE {
                return Err(MeterError::InvalidTariff(format!(
                    "{name} of {price} wei is above the maximum of {MAX_PRICE} wei"
                )));
            }
        }
        Ok(Tariff {
            price_per_second,
            price_per_gib,
        })
    }

    /// Wei per leased second.
    pub fn price_per_second(&self) -> U256 {
        self.price_per_second
    }

    /// Wei per GiB (2^30 bytes) moved, counting both directions.
    pub fn price_per_gib(&self) -> U256 {
        self.price_per_gib
    }

    /// Wei per second of lease while bytes move at `bytes_per_second`, rounding the byte part
    /// up: used to tell the client how long its escrow lasts, where an early warning is
    /// better than a late one.
    pub fn burn_rate(&self, bytes_per_second: u64) -> U256 {
        let scaled = U256::from(bytes_per_second) * self.price_per_gib;
        let bytes = (scaled + U256::from(GIB - 1)) >> 30;
        self.price_per_second + bytes
    }

    /// Whole seconds that `funds` wei pay for at [`Tariff::burn_rate`]`(bytes_per_second)`,
    /// or `None` when nothing is being charged (a free tariff, or no price per second and no
    /// traffic), i.e. the funds never run out.
    pub fn seconds_covered(&self, funds: U256, bytes_per_second: u64) -> Option<u64> {
        let rate = self.burn_rate(bytes_per_second);
        if rate.is_zero() {
            return None;
        }
        Some(u64::try_from(funds / rate).unwrap_or(u64::MAX))
    }

    /// The charge for `usage`: `seconds * pps + floor((bytes_in + bytes_out) * ppg / 2^30)`.
    ///
    /// Used both per tick and per batch (on the batch's totals); see the module docs for how
    /// the two relate. Cannot overflow because of the [`MAX_PRICE`] bound.
    pub fn charge(&self, usage: &Usage) -> U256 {
        let time = U256::from(usage.seconds) * self.price_per_second;
        let bytes = (U256::from(usage.bytes_total()) * self.price_per_gib) >> 30;
        time + bytes
    }
}

/// The serialized form of a tariff: wei amounts as decimal strings, validated on the way in.
#[derive(Serialize, Deserialize)]
struct TariffRepr {
    #[serde(with = "crate::wei")]
    price_per_second: U256,
    #[serde(with = "crate::wei")]
    price_per_gib: U256,
}

impl TryFrom<TariffRepr> for Tariff {
    type Error = MeterError;

    fn try_from(repr: TariffRepr) -> Result<Tariff, MeterError> {
        Tariff::new(repr.price_per_second, repr.price_per_gib)
    }
}

impl From<Tariff> for TariffRepr {
    fn from(t: Tariff) -> TariffRepr {
        TariffRepr {
            price_per_second: t.price_per_second,
            price_per_gib: t.price_per_gib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tariff(pps: u128, ppg: u128) -> Tariff {
        Tariff::new(U256::from(pps), U256::from(ppg)).unwrap()
    }

    fn usage(seconds: u64, bytes_in: u64, bytes_out: u64) -> Usage {
        Usage {
            seconds,
            bytes_in,
            bytes_out,
        }
    }

    #[test]
    fn one_gib_costs_the_price_per_gib() {
        let t = tariff(7, 1_000_000_007);
        assert_eq!(t.charge(&usage(0, GIB, 0)), U256::from(1_000_000_007u64));
        assert_eq!(
            t.charge(&usage(0, GIB / 2, GIB / 2)),
            U256::from(1_000_000_007u64)
        );
        assert_eq!(t.charge(&usage(3, 0, 0)), U256::from(21u64));
    }

    #[test]
    fn byte_fraction_of_a_wei_is_rounded_down_for_the_client() {
        // One byte at 2^30 - 1 wei per GiB is just under one wei: the client pays nothing.
        let t = tariff(0, (1u128 << 30) - 1);
        assert_eq!(t.charge(&usage(0, 1, 0)), U256::ZERO);
        // Exactly 2^30 wei per GiB makes one byte cost exactly one wei.
        let t = tariff(0, 1u128 << 30);
        assert_eq!(t.charge(&usage(0, 0, 1)), U256::from(1u64));
    }

    #[test]
    fn prices_above_the_bound_are_refused_and_the_bound_is_accepted() {
        assert!(Tariff::new(MAX_PRICE, MAX_PRICE).is_ok());
        let err = Tariff::new(MAX_PRICE + U256::from(1u64), U256::ZERO).unwrap_err();
        assert!(matches!(err, MeterError::InvalidTariff(_)), "{err}");
        assert!(Tariff::new(U256::ZERO, U256::MAX).is_err());
    }

    #[test]
    fn largest_usage_at_largest_prices_does_not_overflow() {
        let t = Tariff::new(MAX_PRICE, MAX_PRICE).unwrap();
        let max = usage(u64::MAX, u64::MAX, u64::MAX);
        let expected = U256::from(u64::MAX) * MAX_PRICE
            + (((U256::from(u64::MAX) * U256::from(2u64)) * MAX_PRICE) >> 30);
        assert_eq!(t.charge(&max), expected);
    }

    #[test]
    fn tariff_json_round_trips_as_decimal_strings_and_validates() {
        let t = tariff(1_000_000_000_000, 5);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"price_per_second":"1000000000000","price_per_gib":"5"}"#
        );
        assert_eq!(serde_json::from_str::<Tariff>(&json).unwrap(), t);
        let hex: Tariff =
            serde_json::from_str(r#"{"price_per_second":"0x10","price_per_gib":3}"#).unwrap();
        assert_eq!(hex, tariff(16, 3));
        let too_big = format!(
            r#"{{"price_per_second":"{}","price_per_gib":"0"}}"#,
            U256::MAX
        );
        assert!(serde_json::from_str::<Tariff>(&too_big).is_err());
    }

    #[test]
    fn a_decade_of_five_second_ticks_at_100_gbit_each_way_fits_and_loses_under_a_wei_per_tick() {
        let ticks: u64 = 10 * 365 * 24 * 3600 / 5;
        let per_tick_bytes: u64 = 100_000_000_000 / 8 * 5;
        let tick = usage(5, per_tick_bytes, per_tick_bytes);
        let lease = usage(
            5 * ticks,
            per_tick_bytes.checked_mul(ticks).unwrap(),
            per_tick_bytes.checked_mul(ticks).unwrap(),
        );
        // Adding the ticks up one at a time must not overflow either; add in big steps.
        let mut total = Usage::default();
        for _ in 0..ticks / 1_000_000 {
            total = total
                .checked_add(usage(
                    5_000_000,
                    per_tick_bytes * 1_000_000,
                    per_tick_bytes * 1_000_000,
                ))
                .unwrap();
        }
        for _ in 0..ticks % 1_000_000 {
            total = total.checked_add(tick).unwrap();
        }
        assert_eq!(total, lease);
        for t in [
            tariff(1, 1),
            tariff(123_456_789, 987_654_321),
            Tariff::new(MAX_PRICE, MAX_PRICE).unwrap(),
        ] {
            let per_tick_sum = t.charge(&tick) * U256::from(ticks);
            let batch = t.charge(&lease);
            assert!(per_tick_sum <= batch);
            assert!(batch - per_tick_sum < U256::from(ticks));
        }
    }

    #[test]
    fn burn_rate_rounds_bytes_up_and_seconds_covered_rounds_down() {
        let t = tariff(100, 1u128 << 30);
        // 1 byte/s at 1 wei per byte: 101 wei/s.
        assert_eq!(t.burn_rate(1), U256::from(101u64));
        // Half a wei per byte still costs a whole wei per second of traffic.
        let t = tariff(100, 1u128 << 29);
        assert_eq!(t.burn_rate(1), U256::from(101u64));
        assert_eq!(t.burn_rate(0), U256::from(100u64));
        assert_eq!(t.seconds_covered(U256::from(1_009u64), 1), Some(9));
        assert_eq!(t.seconds_covered(U256::from(99u64), 0), Some(0));
        assert_eq!(tariff(0, 5).seconds_covered(U256::from(1u64), 0), None);
        assert_eq!(tariff(0, 5).seconds_covered(U256::from(1u64), 1), Some(1));
        assert_eq!(tariff(1, 0).seconds_covered(U256::MAX, 0), Some(u64::MAX));
    }

    #[test]
    fn usage_sum_refuses_to_wrap() {
        let a = usage(u64::MAX, 0, 0);
        assert!(matches!(
            Usage::sum([a, usage(1, 0, 0)]),
            Err(MeterError::Overflow { what: "seconds" })
        ));
    }

    fn any_price() -> impl Strategy<Value = U256> {
        prop_oneof![
            (0u64..1_000_000).prop_map(U256::from),
            any::<u64>().prop_map(U256::from),
            any::<u128>().prop_map(U256::from),
        ]
    }

    fn any_tick_usage() -> impl Strategy<Value = Usage> {
        // Ticks of up to an hour, moving up to 64 GiB each way: generous for 5 s ticks.
        (0u64..3600, 0u64..(64 * GIB), 0u64..(64 * GIB)).prop_map(|(s, i, o)| usage(s, i, o))
    }

    proptest! {
        #[test]
        fn charge_never_panics_for_any_valid_tariff_and_usage(
            pps in any_price(), ppg in any_price(),
            s in any::<u64>(), bi in any::<u64>(), bo in any::<u64>(),
        ) {
            let t = Tariff::new(pps, ppg).unwrap();
            let c = t.charge(&usage(s, bi, bo));
            // The time part alone is a lower bound.
            prop_assert!(c >= U256::from(s) * pps);
        }

        #[test]
        fn batch_charge_is_exact_price_rounded_down(
            pps in any_price(), ppg in any_price(),
            s in any::<u64>(), bi in any::<u64>(), bo in any::<u64>(),
        ) {
            let t = Tariff::new(pps, ppg).unwrap();
            let u = usage(s, bi, bo);
            let c = t.charge(&u);
            // charge * 2^30 <= exact * 2^30 < (charge + 1) * 2^30, all in integers.
            let exact_scaled = U256::from(s) * pps * U256::from(GIB)
                + U256::from(u.bytes_total()) * ppg;
            let scaled = c * U256::from(GIB);
            prop_assert!(scaled <= exact_scaled);
            prop_assert!(exact_scaled < scaled + U256::from(GIB));
        }

        #[test]
        fn sum_of_tick_charges_trails_batch_charge_by_less_than_one_wei_per_tick(
            pps in any_price(), ppg in any_price(),
            ticks in proptest::collection::vec(any_tick_usage(), 1..200),
        ) {
            let t = Tariff::new(pps, ppg).unwrap();
            let per_tick: U256 = ticks.iter().map(|u| t.charge(u)).fold(U256::ZERO, |a, c| a + c);
            let batch = t.charge(&Usage::sum(ticks.iter().copied()).unwrap());
            prop_assert!(per_tick <= batch);
            prop_assert!(batch - per_tick < U256::from(ticks.len() as u64));
        }

        #[test]
        fn splitting_a_long_lease_into_batches_loses_less_than_one_wei_per_batch(
            pps in any_price(), ppg in any_price(),
            ticks in proptest::collection::vec(any_tick_usage(), 1..400),
            batch_len in 1usize..50,
        ) {
            let t = Tariff::new(pps, ppg).unwrap();
            let whole = t.charge(&Usage::sum(ticks.iter().copied()).unwrap());
            let batches: Vec<&[Usage]> = ticks.chunks(batch_len).collect();
            let paid: U256 = batches
                .iter()
                .map(|b| t.charge(&Usage::sum(b.iter().copied()).unwrap()))
                .fold(U256::ZERO, |a, c| a + c);
            prop_assert!(paid <= whole);
            prop_assert!(whole - paid < U256::from(batches.len() as u64));
        }
    }
}
