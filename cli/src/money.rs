//! Amounts of FIL, entered and shown exactly in wei (attoFIL) as [`U256`]; no floats anywhere.
//!
//! Input is a decimal number with an optional exponent and a unit: `0.5FIL`, `1.2e-3 FIL`,
//! `123wei`, `2attoFIL`, `10nanoFIL`. An amount that is not a whole number of wei is refused, not
//! rounded: money typed by a person must mean exactly what it says.

use std::fmt;

use shale_contracts::U256;

/// Wei per FIL.
pub const WEI_PER_FIL: u64 = 1_000_000_000_000_000_000;

/// Why a typed amount is not an amount of money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("no amount given: write it like 0.5FIL or 123wei")]
    Empty,
    #[error("{0:?} has no unit: write FIL, nanoFIL, attoFIL or wei after the number (0.5FIL)")]
    NoUnit(String),
    #[error("{0:?}: unknown unit {1:?}; use FIL, nanoFIL, attoFIL or wei")]
    UnknownUnit(String, String),
    #[error("{0:?} is not a number: write digits, an optional fraction and exponent (1.2e-3FIL)")]
    NotANumber(String),
    #[error("{0:?} is negative; amounts of money are never negative")]
    Negative(String),
    #[error("{0:?} is finer than 1 wei (10^-18 FIL); amounts are exact, nothing is rounded")]
    FinerThanWei(String),
    #[error("{0:?} is too large (more than 2^256 wei)")]
    TooLarge(String),
}

/// The units an amount may be written in, with their power of ten in wei.
const UNITS: &[(&str, u32)] = &[
    ("fil", 18),
    ("nanofil", 9),
    ("attofil", 0),
    ("afil", 0),
    ("wei", 0),
];

/// Exponents beyond this are refused outright (10^-400 is no amount, 10^400 overflows U256).
const MAX_EXPONENT: i64 = 400;

/// Parses an amount such as `0.5FIL`, `1.2e-3 FIL`, `123wei` or `2attoFIL` into wei.
///
/// Units are case-insensitive. The result is exact: `0.1FIL` is 10^17 wei, and an amount with
/// a fraction of a wei (`1.5wei`, `1e-19FIL`) is an error rather than rounded either way.
pub fn parse_amount(text: &str) -> Result<U256, MoneyError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(MoneyError::Empty);
    }
    if trimmed.starts_with('-') {
        return Err(MoneyError::Negative(text.into()));
    }
    // The unit is the trailing run of letters, except an `e` that belongs to an exponent: the
    // unit always ends in a letter other than a digit, so split at the last digit or dot.
    let split = trimmed
        .rfind(|c: char| c.is_ascii_digit() || c == '.')
        .map(|i| i + 1)
        .unwrap_or(0);
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim();
    if unit.is_empty() {
        return Err(MoneyError::NoUnit(text.into()));
    }
    let unit_exp = UNITS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(unit))
        .map(|(_, exp)| i64::from(*exp))
        .ok_or_else(|| MoneyError::UnknownUnit(text.into(), unit.into()))?;
    let number = number.trim();
    let nan = || MoneyError::NotANumber(text.into());

    let (mantissa, exponent) = match number.find(['e', 'E']) {
        Some(i) => {
            let exp_text = &number[i + 1..];
            let digits = exp_text.strip_prefix(['+', '-']).unwrap_or(exp_text);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(nan());
            }
            // Long exponents are either zero-padded or absurd; parse them without overflow.
            let magnitude: i64 = digits
                .trim_start_matches('0')
                .parse::<i64>()
                .ok()
                .or_else(|| digits.bytes().all(|b| b == b'0').then_some(0))
                .unwrap_or(i64::MAX);
            let exp = if exp_text.starts_with('-') {
                -magnitude.min(MAX_EXPONENT + 1)
            } else {
                magnitude.min(MAX_EXPONENT + 1)
            };
            (&number[..i], exp)
        }
        None => (number, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty())
        || !all_digits(int_part)
        || !all_digits(frac_part)
    {
        return Err(nan());
    }
    let mut digits: String = format!("{int_part}{frac_part}");
    // The value is digits * 10^scale wei.
    let mut scale = unit_exp + exponent - frac_part.len() as i64;
    // Trailing zeros carry no precision: move them into the scale first.
    while scale < 0 && digits.ends_with('0') {
        digits.pop();
        scale += 1;
    }
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Ok(U256::ZERO);
    }
    if scale < 0 {
        return Err(MoneyError::FinerThanWei(text.into()));
    }
    let too_large = || MoneyError::TooLarge(text.into());
    if scale > MAX_EXPONENT {
        return Err(too_large());
    }
    let mut value = U256::ZERO;
    for b in digits.bytes() {
        value = value
            .checked_mul(U256::from(10u8))
            .and_then(|v| v.checked_add(U256::from(b - b'0')))
            .ok_or_else(too_large)?;
    }
    let factor = U256::from(10u8)
        .checked_pow(U256::from(scale as u64))
        .ok_or_else(too_large)?;
    value.checked_mul(factor).ok_or_else(too_large)
}

/// An amount of wei that prints as exact FIL (`0.5 FIL`, `0.000000000000000123 FIL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fil(pub U256);

impl fmt::Display for Fil {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} FIL", format_fil(self.0))
    }
}

/// The exact decimal number of FIL in `wei`, without unit: `1`, `0.5`, `0.000000000000000001`.
pub fn format_fil(wei: U256) -> String {
    let per = U256::from(WEI_PER_FIL);
    let whole = wei / per;
    let frac = wei % per;
    if frac.is_zero() {
        return whole.to_string();
    }
    let frac = format!("{:0>18}", frac.to_string());
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// A signed difference of two amounts as exact FIL with its sign (`+0.5 FIL`, `-0.01 FIL`).
pub fn format_delta(before: U256, after: U256) -> String {
    if after >= before {
        format!("+{} FIL", format_fil(after - before))
    } else {
        format!("-{} FIL", format_fil(before - after))
    }
}

/// clap value parser for amount arguments.
pub fn amount_arg(text: &str) -> Result<U256, String> {
    parse_amount(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wei(s: &str) -> U256 {
        s.parse().unwrap()
    }

    #[test]
    fn fil_amounts_are_exact_in_wei() {
        assert_eq!(parse_amount("0.5FIL").unwrap(), wei("500000000000000000"));
        assert_eq!(parse_amount("1FIL").unwrap(), wei("1000000000000000000"));
        assert_eq!(parse_amount("1.2e-3FIL").unwrap(), wei("1200000000000000"));
        assert_eq!(parse_amount("1.2E-3 fil").unwrap(), wei("1200000000000000"));
        assert_eq!(parse_amount("0.1FIL").unwrap(), wei("100000000000000000"));
        assert_eq!(parse_amount(".5FIL").unwrap(), wei("500000000000000000"));
        assert_eq!(parse_amount("5.FIL").unwrap(), wei("5000000000000000000"));
        assert_eq!(
            parse_amount("1e2FIL").unwrap(),
            wei("100000000000000000000")
        );
        assert_eq!(
            parse_amount("1e+2FIL").unwrap(),
            wei("100000000000000000000")
        );
        assert_eq!(
            parse_amount("0.000000000000000001FIL").unwrap(),
            U256::from(1u8)
        );
        assert_eq!(parse_amount("1e-18FIL").unwrap(), U256::from(1u8));
    }

    #[test]
    fn wei_and_attofil_and_nanofil_units() {
        assert_eq!(parse_amount("123wei").unwrap(), U256::from(123u32));
        assert_eq!(parse_amount("2attoFIL").unwrap(), U256::from(2u32));
        assert_eq!(parse_amount("2aFIL").unwrap(), U256::from(2u32));
        assert_eq!(parse_amount("7 WEI").unwrap(), U256::from(7u32));
        assert_eq!(
            parse_amount("3nanoFIL").unwrap(),
            U256::from(3_000_000_000u64)
        );
        assert_eq!(parse_amount("1.5e3wei").unwrap(), U256::from(1500u32));
    }

    #[test]
    fn trailing_zeros_beyond_wei_precision_are_still_exact() {
        assert_eq!(
            parse_amount("1.0000000000000000000000FIL").unwrap(),
            wei("1000000000000000000")
        );
        assert_eq!(parse_amount("10e-1wei").unwrap(), U256::from(1u8));
        assert_eq!(
            parse_amount("1500e-3wei").unwrap_err(),
            MoneyError::FinerThanWei("1500e-3wei".into())
        );
        assert_eq!(parse_amount("0e-50FIL").unwrap(), U256::ZERO);
        assert_eq!(parse_amount("0wei").unwrap(), U256::ZERO);
        assert_eq!(parse_amount("000.000FIL").unwrap(), U256::ZERO);
    }

    #[test]
    fn fractions_of_a_wei_are_refused_not_rounded() {
        for text in [
            "1.5wei",
            "0.0000000000000000001FIL",
            "1e-19FIL",
            "0.5attoFIL",
            "1.0000000000000000001FIL",
            "1e-400FIL",
            "1e-99999999999999999999999FIL",
        ] {
            assert!(
                matches!(parse_amount(text), Err(MoneyError::FinerThanWei(_))),
                "{text}: {:?}",
                parse_amount(text)
            );
        }
    }

    #[test]
    fn invalid_inputs_say_why() {
        assert_eq!(parse_amount("").unwrap_err(), MoneyError::Empty);
        assert_eq!(parse_amount("  ").unwrap_err(), MoneyError::Empty);
        assert!(matches!(parse_amount("0.5"), Err(MoneyError::NoUnit(_))));
        assert!(matches!(parse_amount("12"), Err(MoneyError::NoUnit(_))));
        assert!(matches!(
            parse_amount("0.5ETH"),
            Err(MoneyError::UnknownUnit(..))
        ));
        assert!(matches!(
            parse_amount("-1FIL"),
            Err(MoneyError::Negative(_))
        ));
        for text in [
            "FIL", ".FIL", "1.2.3FIL", "1eFIL", "1e-FIL", "0x10wei", "1,5FIL", "+1FIL", "1e1.5FIL",
            "one FIL",
        ] {
            assert!(
                matches!(
                    parse_amount(text),
                    Err(MoneyError::NotANumber(_)) | Err(MoneyError::UnknownUnit(..))
                ),
                "{text}: {:?}",
                parse_amount(text)
            );
        }
    }

    #[test]
    fn amounts_beyond_u256_are_refused() {
        assert!(matches!(
            parse_amount("1e80FIL"),
            Err(MoneyError::TooLarge(_))
        ));
        assert!(matches!(
            parse_amount("1e999999FIL"),
            Err(MoneyError::TooLarge(_))
        ));
        let max = U256::MAX.to_string();
        assert_eq!(parse_amount(&format!("{max}wei")).unwrap(), U256::MAX);
        assert!(matches!(
            parse_amount(&format!("{max}0wei")),
            Err(MoneyError::TooLarge(_))
        ));
    }

    #[test]
    fn printing_is_exact_and_round_trips() {
        assert_eq!(format_fil(U256::ZERO), "0");
        assert_eq!(format_fil(U256::from(1u8)), "0.000000000000000001");
        assert_eq!(format_fil(wei("500000000000000000")), "0.5");
        assert_eq!(format_fil(wei("1200000000000000")), "0.0012");
        assert_eq!(format_fil(wei("12000000000000000000")), "12");
        assert_eq!(
            format_fil(wei("12345678901234567891")),
            "12.345678901234567891"
        );
        assert_eq!(Fil(wei("500000000000000000")).to_string(), "0.5 FIL");
        for v in [
            U256::ZERO,
            U256::from(1u8),
            U256::MAX,
            wei("123456789012345678901234"),
        ] {
            assert_eq!(parse_amount(&Fil(v).to_string()).unwrap(), v);
        }
        assert_eq!(
            format_delta(U256::from(5u8), U256::from(3u8)),
            "-0.000000000000000002 FIL"
        );
        assert_eq!(format_delta(U256::ZERO, U256::from(WEI_PER_FIL)), "+1 FIL");
    }
}
