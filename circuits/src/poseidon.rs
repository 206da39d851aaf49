//! The tick commitment hash: one Poseidon permutation over BN254's scalar field per tick.
//!
//! # Parameters (shared by the native hash and the gadget)
//!
//! Everything is fixed in [`config`], the single place both sides read:
//!
//! - field: BN254 scalar field `r` (the field Groth16 over BN254 proves statements in);
//! - width `t = 4`: rate 3, capacity 1 (the capacity element starts at zero);
//! - S-box `x^5` (`alpha = 5`, the smallest exponent coprime to `r - 1`);
//! - `R_F = 8` full rounds (4 before, 4 after the partial rounds) and `R_P = 56` partial rounds,
//!   the round numbers the Poseidon paper (Grassi et al., 2019, table 2 / its `calc_round_numbers`
//!   script) gives for a 254-bit field, `t = 4`, `alpha = 5` at 128-bit security, as also used by
//!   circomlib;
//! - round constants and MDS matrix from the Grain LFSR of the Poseidon reference, as implemented by
//!   `ark_crypto_primitives::sponge::poseidon::find_poseidon_ark_and_mds` with
//!   `prime_bits = 254, rate = 3, full_rounds = 8, partial_rounds = 56, skip_matrices = 0`.
//!   The MDS matrix is the first Cauchy matrix the LFSR yields (MDS by construction); the extra
//!   "no infinitely long subspace trail" tests of the reference sage script were not run on it.
//!
//! Changing any of these changes every head ever computed, so they are constants, not settings.
//!
//! # Encoding of one step
//!
//! A tick is hashed under its order's key `K` ([`crate::key::OrderKey`]), a full field element that
//! binds the order id, the chain id and the marketplace address. `K` takes the place of the
//! sponge's capacity element (the domain-separation slot, zero in a plain sponge); the tick's four
//! remaining `u64` fields are packed into two rate elements without loss (each field is below
//! `2^64`, so the packing is injective):
//!
//! ```text
//! a = seq · 2^64 + seconds                      (< 2^128)
//! b = bytes_in · 2^64 + bytes_out               (< 2^128)
//! h_i = Poseidon-permutation([K, h_{i-1}, a, b])[1]
//! ```
//!
//! which is one permutation of the width-4 state, exactly as many as before the key: the state is
//! fully determined by `(K, h_{i-1}, tick)`, so two ticks of different orders or deployments never
//! share an input. `TickFields::order` is not hashed itself; `K` stands for it. Element 1 of the
//! permuted state (the first squeezed element) is
//! the new head. The gadget in [`gadget`] computes the same from range-checked variables.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use ark_bn254::Fr;
use ark_crypto_primitives::sponge::poseidon::{
    find_poseidon_ark_and_mds, PoseidonConfig, PoseidonSponge,
};
use ark_crypto_primitives::sponge::CryptographicSponge;
use ark_ff::{BigInteger, PrimeField};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::key::OrderKey;

/// Poseidon rate: the field elements absorbed per permutation (`h_{i-1}`, `a`, `b`).
pub const RATE: usize = 3;
/// Poseidon capacity in field elements (it holds the order key, see the module docs).
pub const CAPACITY: usize = 1;
/// S-box exponent.
pub const ALPHA: u64 = 5;
/// Full rounds, split evenly before and after the partial rounds.
pub const FULL_ROUNDS: usize = 8;
/// Partial rounds (S-box on the first state element only).
pub const PARTIAL_ROUNDS: usize = 56;
/// Bit size handed to the Grain LFSR (`Fr::MODULUS_BIT_SIZE` for BN254).
const PRIME_BITS: u64 = 254;
/// How many LFSR candidate matrices are skipped before the MDS matrix is taken.
const SKIP_MATRICES: u64 = 0;

/// The Poseidon configuration of the tick chain, computed once per process.
///
/// Both [`next_head`] and the in-circuit [`gadget::next_head_var`] read this, so they cannot drift.
pub fn config() -> &'static PoseidonConfig<Fr> {
    static CONFIG: OnceLock<PoseidonConfig<Fr>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let (ark, mds) = find_poseidon_ark_and_mds::<Fr>(
            PRIME_BITS,
            RATE,
            FULL_ROUNDS as u64,
            PARTIAL_ROUNDS as u64,
            SKIP_MATRICES,
        );
        PoseidonConfig::new(FULL_ROUNDS, PARTIAL_ROUNDS, ALPHA, mds, ark, RATE, CAPACITY)
    })
}

/// One tick as the circuit sees it: one metering interval of one order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TickFields {
    /// The order (on-chain order id) the tick is charged to. Not hashed itself: the chain hashes
    /// the order's [`OrderKey`](crate::key::OrderKey), which binds it with its deployment.
    pub order: u64,
    /// Position of the tick in its order's chain; consecutive ticks have consecutive numbers.
    pub seq: u64,
    /// Lease seconds the tick covers.
    pub seconds: u64,
    /// Bytes from the client into the container.
    pub bytes_in: u64,
    /// Bytes from the container to the client.
    pub bytes_out: u64,
}

/// `2^64` as a field element: the shift that packs two `u64` side by side.
pub(crate) fn two_pow_64() -> Fr {
    Fr::from(u64::MAX) + Fr::from(1u64)
}

impl TickFields {
    /// The two field elements a tick is absorbed as, beside its order key (see the module docs).
    pub fn packed(&self) -> [Fr; 2] {
        let s = two_pow_64();
        let a = Fr::from(self.seq) * s + Fr::from(self.seconds);
        let b = Fr::from(self.bytes_in) * s + Fr::from(self.bytes_out);
        [a, b]
    }
}

/// A chain head: a BN254 scalar as 32 big-endian bytes (a `bytes32` on chain).
///
/// The genesis head, before an order's first tick, is all zeros ([`Head::GENESIS`], also the
/// `Default`). Heads print and (de)serialize as `0x`-prefixed lower-case hex.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Head(pub [u8; 32]);

/// Why a string or value is not a chain head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadParseError {
    /// Not `0x` followed by exactly 64 hex digits.
    #[error("a chain head is 0x followed by 64 hex digits, got {0:?}")]
    Format(String),
    /// The 32 bytes encode a number at or above the BN254 scalar field modulus, so no chain
    /// can ever produce it.
    #[error("chain head {0} is not below the BN254 scalar field modulus")]
    OutOfField(String),
}

impl Head {
    /// The head before an order's first tick.
    pub const GENESIS: Head = Head([0u8; 32]);

    /// The head of a field element (big-endian, canonical).
    pub fn from_field(f: Fr) -> Head {
        let bytes = f.into_bigint().to_bytes_be();
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Head(out)
    }

    /// The field element of a head, refusing encodings at or above the modulus.
    pub fn to_field(&self) -> Result<Fr, HeadParseError> {
        let f = Fr::from_be_bytes_mod_order(&self.0);
        if Head::from_field(f) == *self {
            Ok(f)
        } else {
            Err(HeadParseError::OutOfField(self.to_string()))
        }
    }

    /// The field element of a head, reducing an out-of-field encoding modulo `r`.
    ///
    /// Heads produced by [`next_head`] are always canonical, so the reduction only matters for a
    /// hand-made `Head`; [`Head::to_field`] is the checking variant.
    pub fn to_field_reduced(&self) -> Fr {
        Fr::from_be_bytes_mod_order(&self.0)
    }

    /// Whether this is the genesis head.
    pub fn is_genesis(&self) -> bool {
        *self == Head::GENESIS
    }
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Head({self})")
    }
}

impl FromStr for Head {
    type Err = HeadParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .ok_or_else(|| HeadParseError::Format(s.to_owned()))?;
        let mut out = [0u8; 32];
        if digits.len() != 64 || hex::decode_to_slice(digits, &mut out).is_err() {
            return Err(HeadParseError::Format(s.to_owned()));
        }
        let head = Head(out);
        head.to_field()?;
        Ok(head)
    }
}

impl Serialize for Head {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Head {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The field-level step of the chain: `Poseidon([key, prev, tick])` (see the module docs).
pub fn next_head_field(key: Fr, prev: Fr, tick: &TickFields) -> Fr {
    let [a, b] = tick.packed();
    let mut sponge = PoseidonSponge::new(config());
    sponge.state[0] = key;
    sponge.absorb(&vec![prev, a, b]);
    sponge.squeeze_field_elements::<Fr>(1)[0]
}

/// The next chain head of `key`'s order: `h_i = Poseidon(K, h_{i-1}, tick_i)`.
///
/// `tick.order` is not read: the key stands for the order (callers that hold both check that they
/// agree). `prev` is read modulo `r` (see [`Head::to_field_reduced`]); heads from this function are
/// always canonical.
pub fn next_head(key: &OrderKey, prev: &Head, tick: &TickFields) -> Head {
    Head::from_field(next_head_field(
        key.to_field(),
        prev.to_field_reduced(),
        tick,
    ))
}

/// The head of `key`'s order after applying `ticks` in order from `prev`.
pub fn chain_head<'a>(
    key: &OrderKey,
    prev: &Head,
    ticks: impl IntoIterator<Item = &'a TickFields>,
) -> Head {
    let mut h = prev.to_field_reduced();
    for t in ticks {
        h = next_head_field(key.to_field(), h, t);
    }
    Head::from_field(h)
}

/// The same hash as a constraint gadget.
pub mod gadget {
    use ark_bn254::Fr;
    use ark_crypto_primitives::sponge::constraints::CryptographicSpongeVar;
    use ark_crypto_primitives::sponge::poseidon::constraints::PoseidonSpongeVar;
    use ark_r1cs_std::fields::fp::FpVar;
    use ark_relations::gr1cs::{ConstraintSystemRef, SynthesisError};

    /// `Poseidon([key, prev, a, b])` in-circuit, where `a` and `b` are the packed tick elements
    /// (the caller is responsible for packing range-checked fields, see the module docs).
    pub fn next_head_var(
        cs: ConstraintSystemRef<Fr>,
        key: &FpVar<Fr>,
        prev: &FpVar<Fr>,
        a: &FpVar<Fr>,
        b: &FpVar<Fr>,
    ) -> Result<FpVar<Fr>, SynthesisError> {
        let mut sponge = PoseidonSpongeVar::new(cs, super::config());
        sponge.state[0] = key.clone();
        sponge.absorb(&vec![prev.clone(), a.clone(), b.clone()])?;
        Ok(sponge.squeeze_field_elements(1)?.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Order 7 of a marketplace at 0x0101…01 on chain 31337.
    fn key() -> OrderKey {
        OrderKey::new(31337, [1; 20], 7)
    }

    fn tick(seq: u64) -> TickFields {
        TickFields {
            order: 7,
            seq,
            seconds: 10,
            bytes_in: 1000,
            bytes_out: 2000,
        }
    }

    /// Pins the parameters: any change to rounds, constants, key or packing changes this head, and
    /// every head already stored on chain or in a ledger with it. Other crates may copy this vector.
    #[test]
    fn known_answer_vector_is_stable() {
        let key = OrderKey::new(31337, [1; 20], 1);
        let t = TickFields {
            order: 1,
            seq: 0,
            seconds: 60,
            bytes_in: 1 << 20,
            bytes_out: 1 << 30,
        };
        assert_eq!(
            next_head(&key, &Head::GENESIS, &t).to_string(),
            "0x1ccc36f48945b5cabaa8d5a4c718e62a780fa5e1016bf8fb2fec89146215d2fa"
        );
    }

    #[test]
    fn gadget_agrees_with_native_hash_on_random_ticks() {
        use ark_r1cs_std::alloc::AllocVar;
        use ark_r1cs_std::fields::fp::FpVar;
        use ark_r1cs_std::GR1CSVar;
        use ark_relations::gr1cs::ConstraintSystem;
        use ark_std::rand::{Rng, SeedableRng};

        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(6);
        let cs = ConstraintSystem::<Fr>::new_ref();
        let mut prev = Head::GENESIS;
        let key_var = FpVar::new_input(cs.clone(), || Ok(key().to_field())).unwrap();
        for i in 0..64 {
            // Mix extreme and random values so the packing is exercised at its edges.
            let pick = |rng: &mut rand_chacha::ChaCha20Rng| match rng.gen_range(0..4) {
                0 => 0,
                1 => u64::MAX,
                _ => rng.gen(),
            };
            let t = TickFields {
                order: pick(&mut rng),
                seq: pick(&mut rng),
                seconds: pick(&mut rng),
                bytes_in: pick(&mut rng),
                bytes_out: pick(&mut rng),
            };
            let [a, b] = t.packed();
            let prev_var = FpVar::new_witness(cs.clone(), || Ok(prev.to_field_reduced())).unwrap();
            let a_var = FpVar::new_witness(cs.clone(), || Ok(a)).unwrap();
            let b_var = FpVar::new_witness(cs.clone(), || Ok(b)).unwrap();
            let out =
                gadget::next_head_var(cs.clone(), &key_var, &prev_var, &a_var, &b_var).unwrap();
            let native = next_head(&key(), &prev, &t);
            assert_eq!(
                Head::from_field(out.value().unwrap()),
                native,
                "tick {i}: {t:?}"
            );
            prev = native;
        }
        assert!(cs.is_satisfied().unwrap());
    }

    #[test]
    fn genesis_is_zero_and_default() {
        assert_eq!(Head::default(), Head::GENESIS);
        assert_eq!(Head::GENESIS.to_field().unwrap(), Fr::from(0u64));
    }

    #[test]
    fn next_head_depends_on_every_field_the_key_and_the_previous_head() {
        let base = next_head(&key(), &Head::GENESIS, &tick(0));
        let variants = [
            TickFields { seq: 1, ..tick(0) },
            TickFields {
                seconds: 11,
                ..tick(0)
            },
            TickFields {
                bytes_in: 1001,
                ..tick(0)
            },
            TickFields {
                bytes_out: 2001,
                ..tick(0)
            },
        ];
        for v in variants {
            assert_ne!(next_head(&key(), &Head::GENESIS, &v), base, "{v:?}");
        }
        assert_ne!(next_head(&key(), &base, &tick(0)), base);
        // The same tick of the same order id on another order, chain or marketplace.
        for other in [
            OrderKey::new(31337, [1; 20], 8),
            OrderKey::new(31338, [1; 20], 7),
            OrderKey::new(31337, [2; 20], 7),
        ] {
            assert_ne!(next_head(&other, &Head::GENESIS, &tick(0)), base, "{other}");
        }
    }

    #[test]
    fn packing_does_not_confuse_neighbouring_fields() {
        // Without the 2^64 shifts these two would collide.
        let a = TickFields {
            order: 0,
            seq: 1,
            seconds: 0,
            bytes_in: 0,
            bytes_out: 0,
        };
        let b = TickFields {
            order: 0,
            seq: 0,
            seconds: 1,
            bytes_in: 0,
            bytes_out: 0,
        };
        assert_ne!(a.packed(), b.packed());
        let max = TickFields {
            order: u64::MAX,
            seq: u64::MAX,
            seconds: u64::MAX,
            bytes_in: u64::MAX,
            bytes_out: u64::MAX,
        };
        assert_ne!(max.packed(), TickFields::default().packed());
    }

    #[test]
    fn chain_head_folds_next_head() {
        let ticks: Vec<_> = (0..4).map(tick).collect();
        let mut h = Head::GENESIS;
        for t in &ticks {
            h = next_head(&key(), &h, t);
        }
        assert_eq!(chain_head(&key(), &Head::GENESIS, &ticks), h);
    }

    #[test]
    fn head_round_trips_through_hex_and_serde() {
        let h = next_head(&key(), &Head::GENESIS, &tick(3));
        let s = h.to_string();
        assert!(s.starts_with("0x") && s.len() == 66);
        assert_eq!(s.parse::<Head>().unwrap(), h);
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<Head>(&json).unwrap(), h);
        assert_eq!(format!("{h:?}"), format!("Head({s})"));
    }

    #[test]
    fn head_parsing_refuses_bad_text_and_out_of_field_values() {
        assert!(matches!(
            "12".parse::<Head>(),
            Err(HeadParseError::Format(_))
        ));
        assert!(matches!(
            format!("0x{}", "g".repeat(64)).parse::<Head>(),
            Err(HeadParseError::Format(_))
        ));
        let all_ones = format!("0x{}", "f".repeat(64));
        assert!(matches!(
            all_ones.parse::<Head>(),
            Err(HeadParseError::OutOfField(_))
        ));
        assert!(serde_json::from_str::<Head>(&format!("\"{all_ones}\"")).is_err());
    }
}
