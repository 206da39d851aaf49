//! The claim proof in the contract's 256-byte layout.
//!
//! Eight 32-byte big-endian words, the order in which the BN254 precompiles take the points:
//!
//! ```text
//! A.x, A.y, B.x.c1, B.x.c0, B.y.c1, B.y.c0, C.x, C.y
//! ```
//!
//! G2 coordinates are elements `c0 + c1·u` of `Fq2`; EIP-197's pairing precompile expects the
//! imaginary part `c1` first, so the proof stores them that way. The point at infinity is `(0, 0)`
//! (all zero words), as in EIP-196/197.

use ark_bn254::{Bn254, Fq, Fq2, G1Affine, G2Affine};
use ark_ec::AffineRepr;
use ark_ff::{BigInteger, PrimeField, Zero};
use ark_groth16::Proof;

use crate::error::CircuitError;

/// Bytes of a claim proof.
pub const PROOF_LEN: usize = 256;

/// A Groth16 proof of one tick batch.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimProof(pub Proof<Bn254>);

fn write_fq(out: &mut [u8], f: &Fq) {
    out.copy_from_slice(&f.into_bigint().to_bytes_be());
}

fn read_fq(word: &[u8], what: &'static str) -> Result<Fq, CircuitError> {
    let f = Fq::from_be_bytes_mod_order(word);
    // Refuse non-canonical words (>= q): the precompiles do, and accepting them would make the
    // same proof have several encodings.
    if f.into_bigint().to_bytes_be() != word {
        return Err(CircuitError::ProofPoint(what));
    }
    Ok(f)
}

fn g1_words(p: &G1Affine, out: &mut [u8]) {
    if let Some((x, y)) = p.xy() {
        write_fq(&mut out[..32], &x);
        write_fq(&mut out[32..64], &y);
    }
}

fn g1_from_words(w: &[u8], what: &'static str) -> Result<G1Affine, CircuitError> {
    let (x, y) = (read_fq(&w[..32], what)?, read_fq(&w[32..64], what)?);
    if x.is_zero() && y.is_zero() {
        return Ok(G1Affine::identity());
    }
    let p = G1Affine::new_unchecked(x, y);
    // G1 of BN254 has cofactor 1: on the curve means in the group.
    if !p.is_on_curve() {
        return Err(CircuitError::ProofPoint(what));
    }
    Ok(p)
}

impl ClaimProof {
    /// The proof in the contract's layout (see the module docs).
    pub fn to_bytes(&self) -> [u8; PROOF_LEN] {
        let mut out = [0u8; PROOF_LEN];
        g1_words(&self.0.a, &mut out[..64]);
        if let Some((x, y)) = self.0.b.xy() {
            write_fq(&mut out[64..96], &x.c1);
            write_fq(&mut out[96..128], &x.c0);
            write_fq(&mut out[128..160], &y.c1);
            write_fq(&mut out[160..192], &y.c0);
        }
        g1_words(&self.0.c, &mut out[192..]);
        out
    }

    /// Reads a proof in the contract's layout, refusing anything that is not three valid points
    /// of the right groups.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CircuitError> {
        if bytes.len() != PROOF_LEN {
            return Err(CircuitError::ProofLength(bytes.len()));
        }
        let a = g1_from_words(&bytes[..64], "A")?;
        let c = g1_from_words(&bytes[192..], "C")?;
        let w = |i: usize| read_fq(&bytes[64 + 32 * i..96 + 32 * i], "B");
        let x = Fq2::new(w(1)?, w(0)?);
        let y = Fq2::new(w(3)?, w(2)?);
        let b = if x.is_zero() && y.is_zero() {
            G2Affine::identity()
        } else {
            let p = G2Affine::new_unchecked(x, y);
            if !p.is_on_curve() || !p.is_in_correct_subgroup_assuming_on_curve() {
                return Err(CircuitError::ProofPoint("B"));
            }
            p
        };
        Ok(ClaimProof(Proof { a, b, c }))
    }
}
