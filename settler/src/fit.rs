//! Which prefix of an order's unclaimed ticks one claim may carry, and what the contract pays
//! for it: the pure part of the settler's fit step, kept apart so it can be tested tick by tick.
//!
//! The contract pays a batch all its seconds (bounded by chain time) and, of its bytes, only what
//! still fits `max(acknowledged, allowance) - claimed`; the rest is forfeited for good. Ticks are
//! proved whole, so a tick whose bytes pass that room either waits for the client's next
//! acknowledgment or, once it has waited long enough, is claimed with the excess forfeited.

use shale_contracts::U256;
use shale_meter::Tick;

/// How a prefix of unclaimed ticks was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cut {
    /// Cumulative (seconds, bytes in, bytes out) after each tick of the prefix.
    pub totals: Vec<(u64, u64, u64)>,
    /// The prefix stopped at a tick whose bytes pass the room and that has not waited out
    /// `ack_wait_secs` yet: an acknowledgment may still come for it.
    pub waits_for_ack: bool,
}

/// The longest prefix of `ticks` that fits `claimable_seconds` and the claim's `u64` totals, in
/// which every tick that brings the bytes past `byte_room` is `released` (it has waited for an
/// acknowledgment long enough). Ticks come in chain order, so the first tick that must still
/// wait ends the prefix.
pub(crate) fn cut(
    ticks: &[Tick],
    claimable_seconds: u64,
    byte_room: u128,
    released: impl Fn(&Tick) -> bool,
) -> Cut {
    let mut totals = Vec::with_capacity(ticks.len());
    let mut waits_for_ack = false;
    let (mut s, mut i, mut o) = (0u64, 0u64, 0u64);
    for t in ticks {
        let (Some(ns), Some(ni), Some(no)) = (
            s.checked_add(t.seconds),
            i.checked_add(t.bytes_in),
            o.checked_add(t.bytes_out),
        ) else {
            break;
        };
        if ns > claimable_seconds {
            break;
        }
        if u128::from(ni) + u128::from(no) > byte_room && !released(t) {
            waits_for_ack = true;
            break;
        }
        (s, i, o) = (ns, ni, no);
        totals.push((s, i, o));
    }
    Cut {
        totals,
        waits_for_ack,
    }
}

/// Of `bytes` proved in a batch, what the contract pays when `byte_room` bytes are still
/// covered by acknowledgments or the allowance; the rest is forfeited.
pub(crate) fn payable_bytes(bytes: u128, byte_room: u128) -> u128 {
    bytes.min(byte_room)
}

/// The contract's charge for a batch of `seconds` of which `paid_bytes` bytes are paid:
/// `seconds * pricePerSecond + floor(paid_bytes * pricePerGiB / 2^30)`.
pub(crate) fn charge(
    price_per_second: U256,
    price_per_gib: U256,
    seconds: u64,
    paid_bytes: u128,
) -> U256 {
    U256::from(seconds) * price_per_second + ((U256::from(paid_bytes) * price_per_gib) >> 30)
}

/// Whether a tick past the byte room has waited out `wait_ms` for an acknowledgment: measured
/// from the tick's end (as the meter stamps ticks) and, once the order has ended, also from when
/// the settler first saw it ended (`ended_seen_ms`), because the tunnel sends its final
/// acknowledgment right after the end and it covers every tick before it. Both wall clock, Unix
/// milliseconds.
pub(crate) fn waited_out(
    tick: &Tick,
    now_ms: u64,
    wait_ms: u64,
    ended_seen_ms: Option<u64>,
) -> bool {
    let tick_end = tick
        .started_at_ms
        .saturating_add(tick.seconds.saturating_mul(1000));
    let tick_done = now_ms >= tick_end.saturating_add(wait_ms);
    let order_done = ended_seen_ms.is_none_or(|seen| now_ms >= seen.saturating_add(wait_ms));
    tick_done && order_done
}

#[cfg(test)]
mod tests {
    use super::*;
    use shale_circuits::Head;

    const GIB: u64 = 1 << 30;

    fn tick(seq: u64, started_at_ms: u64, seconds: u64, bytes: u64) -> Tick {
        Tick {
            order: 1,
            seq,
            started_at_ms,
            seconds,
            bytes_in: bytes / 2,
            bytes_out: bytes - bytes / 2,
            charge: U256::ZERO,
            prev_head: Head::GENESIS,
            head: Head::GENESIS,
        }
    }

    #[test]
    fn ticks_within_the_room_are_all_cut_in() {
        let ticks = [tick(0, 0, 5, 100), tick(1, 5_000, 5, 100)];
        let cut = cut(&ticks, 100, 200, |_| false);
        assert_eq!(cut.totals, [(5, 50, 50), (10, 100, 100)]);
        assert!(!cut.waits_for_ack);
    }

    #[test]
    fn a_tick_past_the_room_waits_for_an_acknowledgment_until_released() {
        let ticks = [
            tick(0, 0, 5, 100),
            tick(1, 5_000, 5, 1),
            tick(2, 10_000, 5, 0),
        ];
        // One byte too many: the second tick and everything after it waits.
        let waiting = cut(&ticks, 100, 100, |_| false);
        assert_eq!(waiting.totals, [(5, 50, 50)]);
        assert!(waiting.waits_for_ack);
        // Released: the whole batch, seconds in full, is claimed.
        let released = cut(&ticks, 100, 100, |_| true);
        assert_eq!(released.totals.len(), 3);
        assert_eq!(released.totals[2], (15, 50, 51));
        assert!(!released.waits_for_ack);
        // Only the older of two ticks past the room is released: the prefix ends at the younger.
        let partly = cut(&ticks, 100, 100, |t| t.seq < 2);
        assert_eq!(partly.totals.len(), 2);
        assert!(partly.waits_for_ack);
    }

    #[test]
    fn seconds_past_the_chain_time_end_the_prefix_whatever_the_bytes() {
        let ticks = [tick(0, 0, 5, 0), tick(1, 5_000, 5, GIB)];
        let cut = cut(&ticks, 9, 0, |_| true);
        assert_eq!(cut.totals, [(5, 0, 0)]);
        assert!(
            !cut.waits_for_ack,
            "lease time, not an acknowledgment, holds it"
        );
        let none = super::cut(&ticks[1..], 4, 0, |_| true);
        assert!(none.totals.is_empty() && !none.waits_for_ack);
    }

    #[test]
    fn totals_that_would_overflow_u64_end_the_prefix() {
        let ticks = [tick(0, 0, 1, u64::MAX), tick(1, 0, 1, u64::MAX)];
        let cut = cut(&ticks, 100, u128::MAX, |_| false);
        assert_eq!(cut.totals.len(), 1);
    }

    #[test]
    fn the_charge_pays_seconds_in_full_and_only_the_payable_bytes() {
        let (pps, ppg) = (U256::from(1_000_003u64), U256::from(7_000_000_001u64));
        let bytes = 3 * u128::from(GIB);
        let paid = payable_bytes(bytes, u128::from(GIB));
        assert_eq!(paid, u128::from(GIB));
        assert_eq!(charge(pps, ppg, 10, paid), U256::from(10_000_030u64) + ppg);
        assert_eq!(payable_bytes(bytes, 0), 0);
        assert_eq!(charge(pps, ppg, 10, 0), U256::from(10_000_030u64));
        assert_eq!(payable_bytes(5, 7), 5);
        // Floored like the contract: one byte at this price is 6 wei.
        assert_eq!(charge(pps, ppg, 0, 1), U256::from(6u64));
    }

    #[test]
    fn the_wait_runs_from_the_ticks_end_and_from_the_orders_end() {
        let t = tick(0, 10_000, 5, 1);
        let wait = 60_000;
        // The tick ended at 15 s: released at 75 s, not before.
        assert!(!waited_out(&t, 74_999, wait, None));
        assert!(waited_out(&t, 75_000, wait, None));
        // The order was seen ended at 1000 s: the tunnel's final acknowledgment may still come
        // until 1060 s, however old the tick is.
        assert!(!waited_out(&t, 1_059_999, wait, Some(1_000_000)));
        assert!(waited_out(&t, 1_060_000, wait, Some(1_000_000)));
        // Both must have passed.
        assert!(!waited_out(&t, 74_999, wait, Some(0)));
    }
}
