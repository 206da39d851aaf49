//! The `shale-ack` exchange between the client's payment tunnel and the gateway, as JSON lines
//! over an SSH subsystem opened with the order's key:
//!
//! 1. client: [`AckRequest`], the last seq it verified (none the first time);
//! 2. gateway: every tick after it as [`AckLine::Tick`], then [`AckLine::Offer`], the head and
//!    cumulative totals it asks the client to acknowledge;
//! 3. client: [`AckAnswer`], a signature over the offer or the reason it refuses;
//! 4. gateway: [`AckLine::Stored`] or [`AckLine::Error`].
//!
//! Lines are bounded ([`MAX_LINE`]) on both sides: the far side is always untrusted.

use serde::{Deserialize, Serialize};

use crate::{Head, Tick};

/// The longest line either side accepts.
pub const MAX_LINE: usize = 64 << 10;

/// The client's opening line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRequest {
    /// The last tick the client has verified; the gateway sends the ticks after it.
    pub after_seq: Option<u64>,
}

/// What the gateway asks the client to acknowledge: the order's whole chain so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckOffer {
    /// The chain the marketplace is on.
    pub chain_id: u64,
    /// The marketplace, `0x`-hex.
    pub marketplace: String,
    /// The order.
    pub order: u64,
    /// The last tick's seq, or none before the first tick.
    pub seq: Option<u64>,
    /// The chain head after it.
    pub head: Head,
    /// Cumulative leased seconds.
    pub seconds: u64,
    /// Cumulative bytes into the container.
    pub bytes_in: u64,
    /// Cumulative bytes out of the container.
    pub bytes_out: u64,
}

/// A line from the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AckLine {
    /// A tick after the client's `after_seq`, in order.
    Tick(Tick),
    /// The totals to acknowledge.
    Offer(AckOffer),
    /// The acknowledgment was checked and stored.
    Stored,
    /// The gateway could not take it, and why.
    Error {
        /// What went wrong, in words.
        reason: String,
    },
}

/// The client's answer to an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AckAnswer {
    /// The EIP-712 signature (`0x`, 65 bytes) over the offer's acknowledgment.
    Signed {
        /// `r ‖ s ‖ v` as hex.
        signature: String,
    },
    /// The client does not acknowledge the offer, and why (shown in the gateway's log).
    Refused {
        /// What did not hold.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_with_their_kind() {
        let offer = AckLine::Offer(AckOffer {
            chain_id: 31337,
            marketplace: "0x5fbdb2315678afecb367f032d93f642f64180aa3".into(),
            order: 7,
            seq: Some(3),
            head: Head([7; 32]),
            seconds: 40,
            bytes_in: 10,
            bytes_out: 20,
        });
        let text = serde_json::to_string(&offer).unwrap();
        assert!(text.starts_with(r#"{"kind":"offer""#), "{text}");
        assert_eq!(serde_json::from_str::<AckLine>(&text).unwrap(), offer);
        let answer = AckAnswer::Refused {
            reason: "bytes out 20 exceed the 19 on the wire".into(),
        };
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(serde_json::from_str::<AckAnswer>(&text).unwrap(), answer);
        assert!(serde_json::from_str::<AckLine>(r#"{"kind":"bogus"}"#).is_err());
    }
}
