//! The SSH username is the order id: `42`, `order-42` or `0x2a`.

use std::fmt;

/// An order id as it appears in `ssh ORDER@sp.example`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderId(pub u64);

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A username that names no order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{shown}' is not an order id: log in as ORDER-ID@host, e.g. `ssh 42@host`, `ssh order-42@host` or `ssh 0x2a@host`")]
pub struct MalformedLogin {
    shown: String,
}

/// Longest username we echo back; anything longer is truncated so a hostile name cannot flood a banner.
const SHOWN_MAX: usize = 40;

/// Reads the order id from an SSH username, before any chain call is made.
///
/// Order ids start at 1 on chain, so `0` is refused like any other non-order.
pub fn parse_login(user: &str) -> Result<OrderId, MalformedLogin> {
    let malformed = || MalformedLogin {
        shown: user
            .chars()
            .take(SHOWN_MAX)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
    };
    let body = user.strip_prefix("order-").unwrap_or(user);
    let parsed = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        u64::from_str_radix(hex, 16)
    } else {
        // `u64::from_str` accepts a leading '+', which no order id has.
        if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        body.parse::<u64>()
    };
    match parsed {
        Ok(0) | Err(_) => Err(malformed()),
        Ok(id) => Ok(OrderId(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_prefixed_and_hex_forms_name_the_same_order() {
        assert_eq!(parse_login("42"), Ok(OrderId(42)));
        assert_eq!(parse_login("order-42"), Ok(OrderId(42)));
        assert_eq!(parse_login("0x2a"), Ok(OrderId(42)));
        assert_eq!(parse_login("0X2A"), Ok(OrderId(42)));
        assert_eq!(parse_login("order-0x2a"), Ok(OrderId(42)));
        assert_eq!(parse_login("18446744073709551615"), Ok(OrderId(u64::MAX)));
    }

    #[test]
    fn anything_else_is_refused_with_a_hint() {
        for bad in [
            "",
            "root",
            "0",
            "0x",
            "0x0",
            "-1",
            "+42",
            "42 ",
            " 42",
            "4 2",
            "order-",
            "order42",
            "0xzz",
            "18446744073709551616",
            "४२",
        ] {
            let err = parse_login(bad).expect_err(bad);
            assert!(err.to_string().contains("ssh 42@host"), "{err}");
        }
    }

    #[test]
    fn hostile_names_are_truncated_and_defanged_in_the_message() {
        let hostile = format!("\x1b[31m{}", "a".repeat(500));
        let msg = parse_login(&hostile).unwrap_err().to_string();
        assert!(!msg.contains('\x1b'));
        assert!(msg.len() < 200);
    }
}
