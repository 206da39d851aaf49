//! The two spellings of one FEVM account: Ethereum's `0x…` and Filecoin's delegated `f410f…`
//! (mainnet) or `t410f…` (testnets such as Calibration).
//!
//! A delegated address is protocol 4 with the Ethereum Address Manager's actor namespace, 10:
//! `<network>4<namespace>f<base32(payload ++ checksum)>`, lower-case base32 without padding,
//! where the payload is the 20 bytes of the EVM address and the checksum is the 4-byte
//! BLAKE2b of the address's binary form, `[4] ++ leb128(10) ++ payload`. The same 20 bytes are
//! the account on both sides, so converting never needs the chain.
//!
//! `0x` input follows EIP-55: all-lower or all-upper hex is taken as is; mixed case must be the
//! correct checksum, since a mistyped character in mixed case is what EIP-55 exists to catch.

use std::fmt;
use std::str::FromStr;

use alloy::primitives::Address;
use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use data_encoding::BASE32_NOPAD;

/// Filecoin's protocol number for delegated addresses (f4).
const DELEGATED_PROTOCOL: u8 = 4;
/// The actor id of the Ethereum Address Manager, whose namespace holds EVM accounts.
const EAM_NAMESPACE: u64 = 10;
/// Bytes of the BLAKE2b checksum Filecoin appends to an address's payload.
const CHECKSUM_LEN: usize = 4;

/// Which Filecoin network an `f4` address is spelt for: only its first letter differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Network {
    /// Filecoin mainnet: `f410f…`.
    Mainnet,
    /// Any test network (Calibration, a local devnet): `t410f…`.
    Testnet,
}

impl Network {
    /// The network of an EVM chain id: 314 is Filecoin mainnet, every other chain (Calibration
    /// 314159, anvil 31337) is shown with the testnet prefix so a test address is never
    /// mistaken for a mainnet one.
    pub fn of_chain(chain_id: u64) -> Self {
        if chain_id == 314 {
            Network::Mainnet
        } else {
            Network::Testnet
        }
    }

    /// The address prefix letter, `f` or `t`.
    pub fn prefix(self) -> char {
        match self {
            Network::Mainnet => 'f',
            Network::Testnet => 't',
        }
    }
}

/// The spelling an address was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressForm {
    /// `0x` and 40 hex digits.
    Hex,
    /// `f410f…` or `t410f…`, for the given network.
    Delegated(Network),
}

/// Why a text is not an address; the message names the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Neither `0x` nor a Filecoin network letter starts the text.
    #[error(
        "{0:?} is not an address: write 0x and 40 hex digits, or a Filecoin f410f…/t410f… address"
    )]
    UnknownPrefix(String),
    /// A `0x` address whose hex part is not 40 hex digits.
    #[error("{0:?} is not an EVM address: 0x must be followed by exactly 40 hex digits")]
    BadHex(String),
    /// Mixed-case hex that is not the EIP-55 checksum of the address.
    #[error(
        "{given:?} has a wrong EIP-55 checksum (mixed-case hex must be exactly {expected}); \
         check for a typo, or write it all in lower case"
    )]
    BadEip55 {
        /// The text as given.
        given: String,
        /// The correctly checksummed spelling of the same hex.
        expected: String,
    },
    /// A Filecoin address of another protocol (f0 id, f1 secp256k1, f2 actor, f3 BLS).
    #[error(
        "{given:?} is a Filecoin protocol-{protocol} address; only delegated (f4/t4) addresses \
         of EVM accounts name a marketplace account"
    )]
    NotDelegated {
        /// The text as given.
        given: String,
        /// The protocol character found after the network letter.
        protocol: char,
    },
    /// A delegated address outside the EVM's namespace 10.
    #[error(
        "{given:?} is a delegated address in namespace {namespace}; EVM accounts are in \
         namespace 10 (f410f…/t410f…)"
    )]
    WrongNamespace {
        /// The text as given.
        given: String,
        /// The namespace it names, as written.
        namespace: String,
    },
    /// The part after `f410f` is not lower-case base32 (RFC 4648, no padding).
    #[error("{0:?}: the part after 410f is not lower-case base32 (letters a-z and digits 2-7)")]
    BadBase32(String),
    /// The decoded payload is not the 20 bytes of an EVM address.
    #[error(
        "{given:?} carries {len} bytes; an EVM account's delegated address carries 20 and a \
         4-byte checksum"
    )]
    WrongPayloadLength {
        /// The text as given.
        given: String,
        /// The payload bytes it carried (without the checksum).
        len: usize,
    },
    /// The checksum does not match the payload: a typo, most likely.
    #[error("{0:?} has a wrong Filecoin checksum; check for a typo")]
    BadChecksum(String),
    /// A well-formed address for the other network than the one required.
    #[error("{given:?} is a {found:?} address; this chain needs the {expected}410f… spelling")]
    WrongNetwork {
        /// The text as given.
        given: String,
        /// The network it is spelt for.
        found: Network,
        /// The prefix letter the caller required.
        expected: char,
    },
}

/// The delegated (`f410f…`/`t410f…`) spelling of `address` on `network`.
pub fn to_f4(address: Address, network: Network) -> String {
    let mut body = address.0 .0.to_vec();
    body.extend_from_slice(&checksum(&address.0 .0));
    format!(
        "{}4{EAM_NAMESPACE}f{}",
        network.prefix(),
        BASE32_NOPAD.encode(&body).to_ascii_lowercase()
    )
}

/// Parses any of `0x…`, `f410f…` and `t410f…` into the account's address, with the form it
/// was written in. Surrounding whitespace is ignored.
pub fn parse_address(text: &str) -> Result<(Address, AddressForm), AddressError> {
    let t = text.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return parse_hex(t, hex).map(|a| (a, AddressForm::Hex));
    }
    let mut chars = t.chars();
    let network = match chars.next() {
        Some('f') => Network::Mainnet,
        Some('t') => Network::Testnet,
        _ => return Err(AddressError::UnknownPrefix(t.into())),
    };
    parse_delegated(t, chars.as_str()).map(|a| (a, AddressForm::Delegated(network)))
}

/// Like [`parse_address`], but a delegated address must be spelt for `network`: a mainnet
/// config naming a `t410f…` account is more likely a mistake than a choice.
pub fn parse_address_on(text: &str, network: Network) -> Result<Address, AddressError> {
    match parse_address(text)? {
        (_, AddressForm::Delegated(found)) if found != network => Err(AddressError::WrongNetwork {
            given: text.trim().into(),
            found,
            expected: network.prefix(),
        }),
        (address, _) => Ok(address),
    }
}

/// `0x` hex with the EIP-55 rule: one case throughout is unchecked, mixed case must match.
fn parse_hex(given: &str, hex: &str) -> Result<Address, AddressError> {
    if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AddressError::BadHex(given.into()));
    }
    let mut bytes = [0u8; 20];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        // Both digits were checked above, so the parse cannot fail.
        let s = std::str::from_utf8(pair).expect("ascii");
        bytes[i] = u8::from_str_radix(s, 16).expect("hex digits");
    }
    let address = Address::from(bytes);
    let has_lower = hex.bytes().any(|b| b.is_ascii_lowercase());
    let has_upper = hex.bytes().any(|b| b.is_ascii_uppercase());
    if has_lower && has_upper {
        let expected = address.to_checksum(None);
        if expected[2..] != *hex {
            return Err(AddressError::BadEip55 {
                given: given.into(),
                expected,
            });
        }
    }
    Ok(address)
}

/// The part of a Filecoin address after its network letter: `410f<base32>`.
fn parse_delegated(given: &str, rest: &str) -> Result<Address, AddressError> {
    let mut chars = rest.chars();
    match chars.next() {
        Some('4') => {}
        Some(protocol) => {
            return Err(AddressError::NotDelegated {
                given: given.into(),
                protocol,
            })
        }
        None => return Err(AddressError::UnknownPrefix(given.into())),
    }
    // The namespace is decimal up to the `f` that separates it from the payload.
    let rest = chars.as_str();
    let Some((namespace, encoded)) = rest.split_once('f') else {
        // `f410` alone has the right namespace and no payload at all.
        if rest == EAM_NAMESPACE.to_string() {
            return Err(AddressError::WrongPayloadLength {
                given: given.into(),
                len: 0,
            });
        }
        return Err(AddressError::WrongNamespace {
            given: given.into(),
            namespace: rest.into(),
        });
    };
    if namespace != EAM_NAMESPACE.to_string() {
        return Err(AddressError::WrongNamespace {
            given: given.into(),
            namespace: namespace.into(),
        });
    }
    // Filecoin spells base32 in lower case only; upper case is a different string to it.
    if encoded.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(AddressError::BadBase32(given.into()));
    }
    let body = BASE32_NOPAD
        .decode(encoded.to_ascii_uppercase().as_bytes())
        .map_err(|e| match e.kind {
            // Non-zero padding bits in the last character: a typo there, in the checksum's
            // characters, reads best as the checksum error it is to the user.
            data_encoding::DecodeKind::Trailing => AddressError::BadChecksum(given.into()),
            _ => AddressError::BadBase32(given.into()),
        })?;
    if body.len() != 20 + CHECKSUM_LEN {
        return Err(AddressError::WrongPayloadLength {
            given: given.into(),
            len: body.len().saturating_sub(CHECKSUM_LEN),
        });
    }
    let (payload, sum) = body.split_at(20);
    if checksum(payload) != sum {
        return Err(AddressError::BadChecksum(given.into()));
    }
    Ok(Address::from_slice(payload))
}

/// Filecoin's address checksum: BLAKE2b-32 of the binary address `[4] ++ leb128(10) ++ payload`.
fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut hasher = Blake2bVar::new(CHECKSUM_LEN).expect("4 is a valid BLAKE2b output size");
    hasher.update(&[DELEGATED_PROTOCOL]);
    hasher.update(&leb128(EAM_NAMESPACE));
    hasher.update(payload);
    let mut out = [0u8; CHECKSUM_LEN];
    hasher
        .finalize_variable(&mut out)
        .expect("the buffer has the output size");
    out
}

/// Unsigned LEB128, as Filecoin writes a delegated address's namespace.
fn leb128(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// An address written in any of its three spellings, for command-line arguments and config
/// files: `clap`'s `value_parser` and serde both go through [`FromStr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AnyAddress(pub Address);

impl FromStr for AnyAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_address(s).map(|(a, _)| AnyAddress(a))
    }
}

impl From<AnyAddress> for Address {
    fn from(a: AnyAddress) -> Self {
        a.0
    }
}

impl fmt::Display for AnyAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.to_checksum(None))
    }
}

impl serde::Serialize for AnyAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Lower-case hex, as the config files have always been written.
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> serde::Deserialize<'de> for AnyAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The id of an FEVM "masked id" address, `0xff` and 11 zero bytes then a big-endian actor id:
/// such an address names the actor `f0<id>`, and its `f410f` spelling would be another account.
pub fn masked_id(address: Address) -> Option<u64> {
    let (prefix, id) = address.0 .0.split_at(12);
    (prefix[0] == 0xff && prefix[1..].iter().all(|&b| b == 0))
        .then(|| u64::from_be_bytes(id.try_into().expect("8 bytes")))
}

/// The Filecoin spelling of the account `address` names: `f0<id>` for a masked id address,
/// else its delegated address ([`to_f4`]).
pub fn to_filecoin(address: Address, network: Network) -> String {
    match masked_id(address) {
        Some(id) => format!("{}0{id}", network.prefix()),
        None => to_f4(address, network),
    }
}

/// An address in both spellings, `0x… (t410f…)`: lower-case hex (valid under EIP-55's one-case
/// rule, and how JSON-RPC and the rest of Shale's output write it), then the Filecoin spelling
/// for `network` ([`to_filecoin`]) in parentheses.
pub fn display_both(address: Address, network: Network) -> String {
    format!("{address:#x} ({})", to_filecoin(address, network))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of addresses, so a failure names a reproducible input.
    fn addresses(n: usize, seed: u64) -> Vec<Address> {
        let mut state = seed;
        let mut next = move || {
            // splitmix64: good enough spread for test inputs.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        (0..n)
            .map(|_| {
                let mut b = [0u8; 20];
                for chunk in b.chunks_mut(8) {
                    chunk.copy_from_slice(&next().to_le_bytes()[..chunk.len()]);
                }
                Address::from(b)
            })
            .chain([Address::ZERO, Address::repeat_byte(0xff)])
            .collect()
    }

    /// A known pair, cross-checked with `@glif/filecoin-address` and Filecoin's docs' example.
    const KNOWN_HEX: &str = "0x52963EF50e27e06D72D59fcB4F3c2a687BE3cfEf";
    const KNOWN_F4: &str = "f410fkkld55ioe7qg24wvt7fu6pbknb56ht7pt4zamxa";
    const KNOWN_T4: &str = "t410fkkld55ioe7qg24wvt7fu6pbknb56ht7pt4zamxa";

    #[test]
    fn known_vectors_convert_both_ways() {
        let address: Address = KNOWN_HEX.parse().unwrap();
        assert_eq!(to_f4(address, Network::Mainnet), KNOWN_F4);
        assert_eq!(to_f4(address, Network::Testnet), KNOWN_T4);
        assert_eq!(
            parse_address(KNOWN_F4).unwrap(),
            (address, AddressForm::Delegated(Network::Mainnet))
        );
        assert_eq!(
            parse_address(KNOWN_T4).unwrap(),
            (address, AddressForm::Delegated(Network::Testnet))
        );
        assert_eq!(
            parse_address(KNOWN_HEX).unwrap(),
            (address, AddressForm::Hex)
        );
        // More pairs from glif: anvil's first deployment, and all ones.
        for (hex, t4) in [
            (
                "0x5fbdb2315678afecb367f032d93f642f64180aa3",
                "t410fl663emkwpcx6zm3h6aznsp3ef5sbqcvdf5mfrna",
            ),
            (
                "0xffffffffffffffffffffffffffffffffffffffff",
                "t410f77777777777777777777777777777777dligzoq",
            ),
        ] {
            let address: Address = hex.parse().unwrap();
            assert_eq!(to_f4(address, Network::Testnet), t4);
            assert_eq!(parse_address(t4).unwrap().0, address);
        }
    }

    #[test]
    fn a_masked_id_address_is_shown_as_its_actor_id() {
        let masked: Address = "0xff00000000000000000000000000000000000064"
            .parse()
            .unwrap();
        assert_eq!(masked_id(masked), Some(100));
        assert_eq!(to_filecoin(masked, Network::Mainnet), "f0100");
        let known: Address = KNOWN_HEX.parse().unwrap();
        assert_eq!(masked_id(known), None);
        assert_eq!(to_filecoin(known, Network::Testnet), KNOWN_T4);
        assert_eq!(
            display_both(masked, Network::Testnet),
            "0xff00000000000000000000000000000000000064 (t0100)"
        );
    }

    #[test]
    fn random_addresses_round_trip_in_every_form() {
        for address in addresses(500, 1) {
            for network in [Network::Mainnet, Network::Testnet] {
                let f4 = to_f4(address, network);
                assert_eq!(f4.len(), 44, "{f4}");
                assert_eq!(
                    parse_address(&f4).unwrap(),
                    (address, AddressForm::Delegated(network))
                );
                assert_eq!(parse_address_on(&f4, network).unwrap(), address);
            }
            for hex in [
                format!("{address:#x}"),
                address.to_checksum(None),
                format!("0x{}", format!("{address:x}").to_ascii_uppercase()),
            ] {
                assert_eq!(parse_address(&hex).unwrap(), (address, AddressForm::Hex));
            }
        }
    }

    #[test]
    fn the_chain_id_picks_the_prefix() {
        assert_eq!(Network::of_chain(314), Network::Mainnet);
        assert_eq!(Network::of_chain(314159), Network::Testnet);
        assert_eq!(Network::of_chain(31337), Network::Testnet);
    }

    #[test]
    fn any_address_parses_every_form_and_says_which_rule_failed() {
        let want: Address = KNOWN_HEX.parse().unwrap();
        for text in [
            KNOWN_HEX,
            KNOWN_F4,
            KNOWN_T4,
            &KNOWN_HEX.to_ascii_lowercase(),
        ] {
            assert_eq!(text.parse::<AnyAddress>().unwrap().0, want, "{text}");
        }
        let err = "f410fkkle55ioe7qg24wvt7fu6pbknb56ht7pt4zamxa"
            .parse::<AnyAddress>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrong Filecoin checksum"), "{err}");
        let toml: std::collections::BTreeMap<String, AnyAddress> =
            serde_json::from_str(&format!(r#"{{"m":"{KNOWN_T4}"}}"#)).unwrap();
        assert_eq!(toml["m"].0, want);
        assert_eq!(
            serde_json::to_string(&toml["m"]).unwrap(),
            format!("\"{}\"", KNOWN_HEX.to_ascii_lowercase())
        );
        assert_eq!(
            display_both(want, Network::Mainnet),
            format!("{} ({KNOWN_F4})", KNOWN_HEX.to_ascii_lowercase())
        );
    }

    #[test]
    fn a_wrong_network_letter_is_refused() {
        for text in ["x410fkkld55ioe7qg24wvt7fu6pbknb56ht7pt4zamxa", "", "52963e"] {
            assert!(
                matches!(parse_address(text), Err(AddressError::UnknownPrefix(_))),
                "{text}"
            );
        }
        assert!(matches!(
            parse_address_on(KNOWN_T4, Network::Mainnet),
            Err(AddressError::WrongNetwork {
                found: Network::Testnet,
                expected: 'f',
                ..
            })
        ));
        assert!(matches!(
            parse_address_on(KNOWN_F4, Network::Testnet),
            Err(AddressError::WrongNetwork { expected: 't', .. })
        ));
    }

    #[test]
    fn other_filecoin_protocols_are_refused() {
        for (text, protocol) in [
            ("f01234", '0'),
            ("f1abjxfbp274xpdqcpuaykwkfb43omjotacm2p3za", '1'),
            ("t3vvmn62lofvhjd2ugzca6sof2j2ubwok6cj4xxbfzz4yuxfkgobpihhd2thlanmsh3w2ptld2gqkn2jvlss4a", '3'),
        ] {
            assert_eq!(
                parse_address(text),
                Err(AddressError::NotDelegated {
                    given: text.into(),
                    protocol
                })
            );
        }
    }

    #[test]
    fn a_namespace_other_than_the_eams_is_refused() {
        for (text, namespace) in [
            ("f432fkkld55ioe7qg24wvt7fu6pbknb56ht7pt4zamxa", "32"),
            ("f41fkkld55ioe7qg24wvt7fu6pbknb56ht7pt4zamxa", "1"),
            ("f4", ""),
        ] {
            assert_eq!(
                parse_address(text),
                Err(AddressError::WrongNamespace {
                    given: text.into(),
                    namespace: namespace.into()
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_base32_is_refused() {
        for text in [
            // 0, 1, 8 and 9 are not in the base32 alphabet.
            "f410fkkld55ioe7qg24wvt7fu6pbknb56ht7pt4zam10",
            "f410fKKLD55IOE7QG24WVT7FU6PBKNB56HT7PT4ZAMXA",
            "f410fkkld55ioe7qg24wvt7fu6pbknb56ht7pt4zamx=",
            // 38 characters: a length no whole number of bytes encodes to.
            "f410fkkld55ioe7qg24wvt7fu6pbknb56ht7pt4zamx",
        ] {
            assert_eq!(
                parse_address(text),
                Err(AddressError::BadBase32(text.into())),
                "{text}"
            );
        }
    }

    #[test]
    fn a_payload_that_is_not_twenty_bytes_is_refused() {
        let short = format!(
            "f410f{}",
            BASE32_NOPAD.encode(&[1u8; 19 + 4]).to_ascii_lowercase()
        );
        let long = format!(
            "f410f{}",
            BASE32_NOPAD.encode(&[1u8; 32 + 4]).to_ascii_lowercase()
        );
        assert!(matches!(
            parse_address(&short),
            Err(AddressError::WrongPayloadLength { len: 19, .. })
        ));
        assert!(matches!(
            parse_address(&long),
            Err(AddressError::WrongPayloadLength { len: 32, .. })
        ));
        for text in ["f410f", "f410"] {
            assert!(matches!(
                parse_address(text),
                Err(AddressError::WrongPayloadLength { len: 0, .. })
            ));
        }
    }

    #[test]
    fn every_single_character_typo_breaks_the_checksum() {
        let alphabet = "abcdefghijklmnopqrstuvwxyz234567";
        for i in 5..KNOWN_F4.len() {
            let original = KNOWN_F4.as_bytes()[i] as char;
            for c in alphabet.chars().filter(|&c| c != original) {
                let mut typo = KNOWN_F4.to_string();
                typo.replace_range(i..=i, &c.to_string());
                assert_eq!(
                    parse_address(&typo),
                    Err(AddressError::BadChecksum(typo.clone()))
                );
            }
        }
    }

    #[test]
    fn hex_follows_eip55() {
        let good = KNOWN_HEX;
        let lower = good.to_ascii_lowercase();
        let upper = format!("0x{}", good[2..].to_ascii_uppercase());
        for text in [good, &lower, &upper, &format!("  {good}\n")] {
            assert!(parse_address(text).is_ok(), "{text}");
        }
        // Flip the case of one letter: still valid hex, wrong checksum.
        let i = good[2..].find(|c: char| c.is_ascii_lowercase()).unwrap() + 2;
        let mut bad = good.to_string();
        bad.replace_range(i..=i, &good[i..=i].to_ascii_uppercase());
        assert_eq!(
            parse_address(&bad),
            Err(AddressError::BadEip55 {
                given: bad.clone(),
                expected: good.into()
            })
        );
        for text in [
            "0x1234",
            "0x",
            &format!("{good}00"),
            "0x52963EF50e27e06D72D59fcB4F3c2a687BE3cfEg",
        ] {
            assert_eq!(parse_address(text), Err(AddressError::BadHex(text.into())));
        }
    }

    #[test]
    fn leb128_writes_the_namespace_in_seven_bit_groups() {
        assert_eq!(leb128(10), [10]);
        assert_eq!(leb128(127), [127]);
        assert_eq!(leb128(128), [0x80, 1]);
        assert_eq!(leb128(300), [0xac, 0x02]);
    }

    /// `false` (after saying why) when node or the reference package is missing; in CI that
    /// fails instead, since a skipped cross-check proves nothing.
    fn reference_present(package: &std::path::Path) -> bool {
        let node = std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let missing = match (node, package.join("package.json").is_file()) {
            (true, true) => return true,
            (false, _) => "node".to_string(),
            (true, false) => format!("{} (the tools' npm install)", package.display()),
        };
        eprintln!("SKIPPED: {missing} not found");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the reason above fails the test"
        );
        false
    }

    #[test]
    fn conversions_agree_with_glifs_filecoin_address() {
        let package = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.tools/node_modules/@glif/filecoin-address");
        if !reference_present(&package) {
            return;
        }
        // glif refuses the zero address (and masked ids), which have no delegated account.
        let sample: Vec<Address> = addresses(50, 314)
            .into_iter()
            .filter(|a| !a.is_zero())
            .collect();
        // One line per address: its f and t spellings from glif, then glif's hex back from ours.
        let script = r#"
            const a = require(process.argv[1]);
            const lines = require('fs').readFileSync(0, 'utf8').trim().split('\n');
            for (const line of lines) {
                const [hex, ourF, ourT] = line.split(' ');
                console.log([
                    a.delegatedFromEthAddress(hex, a.CoinType.MAIN),
                    a.delegatedFromEthAddress(hex, a.CoinType.TEST),
                    a.ethAddressFromDelegated(ourF),
                    a.ethAddressFromDelegated(ourT),
                ].join(' '));
            }
        "#;
        let input: String = sample
            .iter()
            .map(|a| {
                format!(
                    "{} {} {}\n",
                    a.to_checksum(None),
                    to_f4(*a, Network::Mainnet),
                    to_f4(*a, Network::Testnet)
                )
            })
            .collect();
        let mut child = std::process::Command::new("node")
            .args(["-e", script])
            .arg(&package)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "node failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), sample.len());
        for (address, line) in sample.iter().zip(lines) {
            let fields: Vec<&str> = line.split(' ').collect();
            let [glif_f, glif_t, back_f, back_t] = fields[..] else {
                panic!("unexpected line from node: {line}");
            };
            assert_eq!(to_f4(*address, Network::Mainnet), glif_f);
            assert_eq!(to_f4(*address, Network::Testnet), glif_t);
            assert_eq!(parse_address(glif_f).unwrap().0, *address);
            assert_eq!(parse_address(glif_t).unwrap().0, *address);
            // glif returns the EIP-55 spelling; ours must accept it and agree on the bytes.
            assert_eq!(parse_address(back_f).unwrap(), (*address, AddressForm::Hex));
            assert_eq!(parse_address(back_t).unwrap().0, *address);
        }
    }
}
