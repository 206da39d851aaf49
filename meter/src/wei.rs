//! Serde for wei amounts as decimal strings.
//!
//! JSON numbers lose precision above 2^53 in most clients, and hex is unreadable on a receipt,
//! so amounts travel as decimal strings. Deserializing also accepts `0x` hex strings and plain
//! integers, which is what hand-written config files tend to contain.

use alloy_primitives::U256;
use serde::{de, Deserializer, Serializer};
use std::fmt;

/// Serializes `value` as a decimal string.
pub fn serialize<S: Serializer>(value: &U256, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Deserializes a decimal string, a `0x` hex string or an unsigned integer.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<U256, D::Error> {
    deserializer.deserialize_any(WeiVisitor)
}

/// Parses a decimal or `0x`-prefixed hex amount of wei.
pub fn parse(text: &str) -> Result<U256, String> {
    let text = text.trim();
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => U256::from_str_radix(hex, 16),
        None => U256::from_str_radix(text, 10),
    };
    parsed.map_err(|e| format!("{text:?} is not an amount of wei: {e}"))
}

struct WeiVisitor;

impl de::Visitor<'_> for WeiVisitor {
    type Value = U256;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an amount of wei as a decimal string, 0x hex string or unsigned integer")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<U256, E> {
        Ok(U256::from(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<U256, E> {
        u64::try_from(v)
            .map(U256::from)
            .map_err(|_| E::custom("an amount of wei cannot be negative"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<U256, E> {
        parse(v).map_err(E::custom)
    }
}
