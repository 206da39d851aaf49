//! The prover's multi-scalar multiplications: Pippenger's bucket method with signed digits and
//! batch-affine bucket additions, the five MSMs of one proof scheduled as one set of window tasks.
//!
//! # Why not arkworks' MSM
//!
//! `VariableBaseMSM::msm_bigint` (ark-ec 0.6) adds each point into its bucket in extended
//! Jacobian coordinates, 8 multiplications and 2 squarings per addition. Adding affine points
//! into *affine* buckets costs one inversion per addition instead; inverting a few hundred
//! denominators at once (Montgomery's trick) makes that 3 multiplications each, and the addition
//! itself 2 multiplications and 1 squaring, about 40 % fewer field operations on the additions
//! that are nearly all of an MSM. arkworks also runs each MSM on its own freshly built thread
//! pool, one after the other; here every window of every MSM is one rayon task, so both cores
//! stay busy until the last window.
//!
//! # Exceptional additions
//!
//! The affine formula needs `x_1 ≠ x_2`. A point whose `x` equals its bucket's (the same point
//! twice, or its negation, which a proving key can hold when two variables share a QAP
//! polynomial) is added in Jacobian coordinates instead, as is a point whose bucket already waits
//! in the current batch. The result is exactly the sum; only the cost differs.

use ark_ec::short_weierstrass::{Affine, Bucket, Projective, SWCurveConfig};
use ark_ec::AffineRepr;
use ark_ff::{BigInteger, Field, PrimeField};
use rayon::prelude::*;

/// Additions collected before their denominators are inverted together.
const BATCH: usize = 256;

/// Widest window: digits are `i16` and reach `±2^(c-1)`.
const MAX_WINDOW: usize = 15;

/// Window width for `n` scalars: the `c` that minimises additions (`n` per window) plus the
/// bucket sums (`2^c` per window), by the usual estimate.
pub(crate) fn window_bits(n: usize) -> usize {
    if n < 32 {
        return 3;
    }
    let log = usize::BITS as usize - n.leading_zeros() as usize;
    (log * 69 / 100 + 2).clamp(3, MAX_WINDOW)
}

/// The signed base-`2^c` digits of a list of scalars, shared by every MSM over those scalars.
pub(crate) struct Digits {
    bits: usize,
    windows: usize,
    /// Row `i` holds the `windows` digits of scalar `i`, lowest first.
    digits: Vec<i16>,
}

impl Digits {
    /// Recodes each scalar `s < 2^254` as `Σ d_k 2^(c k)` with `|d_k| ≤ 2^(c-1)`.
    pub(crate) fn new<B: BigInteger>(scalars: &[B], bits: usize, num_bits: usize) -> Self {
        assert!((2..=MAX_WINDOW).contains(&bits));
        // One more window than the scalar's bits need: the top one takes the last carry.
        let windows = num_bits / bits + 1;
        let mut digits = vec![0i16; scalars.len() * windows];
        digits
            .par_chunks_mut(windows)
            .zip(scalars.par_iter())
            .for_each(|(row, s)| recode(s, bits, row));
        Digits {
            bits,
            windows,
            digits,
        }
    }

    fn len(&self) -> usize {
        self.digits.len() / self.windows
    }
}

fn recode<B: BigInteger>(s: &B, c: usize, out: &mut [i16]) {
    let limbs = s.as_ref();
    let half = 1i64 << (c - 1);
    let mask = (1u64 << c) - 1;
    let mut carry = 0i64;
    for (k, d) in out.iter_mut().enumerate() {
        let offset = k * c;
        let (limb, shift) = (offset / 64, offset % 64);
        let mut chunk = limbs.get(limb).map_or(0, |l| l >> shift);
        if shift + c > 64 {
            chunk |= limbs.get(limb + 1).map_or(0, |l| l << (64 - shift));
        }
        let mut v = (chunk & mask) as i64 + carry;
        carry = 0;
        if v > half {
            v -= 1 << c;
            carry = 1;
        }
        *d = v as i16;
    }
    debug_assert_eq!(carry, 0, "the top window absorbs the last carry");
}

/// One MSM to compute: bases, and the digits of their scalars from row `offset` on. Scalars
/// beyond the bases are ignored, as arkworks does.
pub(crate) struct Msm<'a, P: SWCurveConfig> {
    pub bases: &'a [Affine<P>],
    pub digits: &'a Digits,
    pub offset: usize,
}

impl<P: SWCurveConfig> Msm<'_, P> {
    fn len(&self) -> usize {
        self.bases.len().min(self.digits.len() - self.offset)
    }

    /// `Σ_i d_{i,w} · bases_i` for window `w`.
    fn window(&self, w: usize) -> Bucket<P> {
        let c = self.digits.bits;
        let stride = self.digits.windows;
        let mut buckets = Buckets::<P>::new(1 << (c - 1));
        let digits = self.digits.digits[self.offset * stride..]
            .iter()
            .skip(w)
            .step_by(stride);
        for (base, &d) in self.bases[..self.len()].iter().zip(digits) {
            if d == 0 || base.is_zero() {
                continue;
            }
            let index = d.unsigned_abs() as usize - 1;
            buckets.add(index, if d > 0 { *base } else { -*base });
        }
        buckets.sum()
    }

    /// The MSM from its window sums, highest window first.
    fn combine(&self, windows: &[Bucket<P>]) -> Projective<P> {
        let mut total = Bucket::<P>::ZERO;
        for (k, w) in windows.iter().enumerate().rev() {
            total += w;
            if k > 0 {
                for _ in 0..self.digits.bits {
                    total.double_in_place();
                }
            }
        }
        total.into()
    }
}

/// The buckets of one window: affine sums, plus Jacobian ones for the exceptional additions.
struct Buckets<P: SWCurveConfig> {
    affine: Vec<Affine<P>>,
    state: Vec<u8>,
    jacobian: Vec<Bucket<P>>,
    pending: Vec<(u32, Affine<P>)>,
    scratch: Vec<P::BaseField>,
}

const EMPTY: u8 = 0;
const FILLED: u8 = 1;
const PENDING: u8 = 2;

impl<P: SWCurveConfig> Buckets<P> {
    fn new(n: usize) -> Self {
        Buckets {
            affine: vec![Affine::identity(); n],
            state: vec![EMPTY; n],
            jacobian: Vec::new(),
            pending: Vec::with_capacity(BATCH),
            scratch: Vec::with_capacity(BATCH),
        }
    }

    fn add(&mut self, index: usize, p: Affine<P>) {
        match self.state[index] {
            EMPTY => {
                self.affine[index] = p;
                self.state[index] = FILLED;
            }
            FILLED if self.affine[index].x != p.x => {
                self.state[index] = PENDING;
                self.pending.push((index as u32, p));
                if self.pending.len() == BATCH {
                    self.flush();
                }
            }
            _ => self.add_jacobian(index, p),
        }
    }

    fn add_jacobian(&mut self, index: usize, p: Affine<P>) {
        if self.jacobian.is_empty() {
            self.jacobian = vec![Bucket::ZERO; self.affine.len()];
        }
        self.jacobian[index] += p;
    }

    /// Adds the pending points into their buckets with one inversion for all of them.
    fn flush(&mut self) {
        self.scratch.clear();
        // Prefix products of the denominators x_p - x_q, then one inversion walked back down.
        let mut acc = P::BaseField::ONE;
        for (index, p) in &self.pending {
            self.scratch.push(acc);
            acc *= p.x - self.affine[*index as usize].x;
        }
        let mut inv = acc.inverse().expect("denominators are non-zero");
        for ((index, p), prefix) in self.pending.iter().zip(&self.scratch).rev() {
            let q = &mut self.affine[*index as usize];
            let dx = p.x - q.x;
            let lambda = (p.y - q.y) * (inv * prefix);
            inv *= dx;
            let x = lambda.square() - q.x - p.x;
            let y = lambda * (q.x - x) - q.y;
            *q = Affine::new_unchecked(x, y);
            self.state[*index as usize] = FILLED;
        }
        self.pending.clear();
    }

    /// `Σ_j (j + 1) · bucket_j`, by running sums from the top bucket down.
    fn sum(mut self) -> Bucket<P> {
        self.flush();
        let mut running = Bucket::<P>::ZERO;
        let mut total = Bucket::<P>::ZERO;
        for j in (0..self.affine.len()).rev() {
            if self.state[j] != EMPTY {
                running += &self.affine[j];
            }
            if let Some(b) = self.jacobian.get(j) {
                if !b.is_zero() {
                    running += b;
                }
            }
            total += &running;
        }
        total
    }
}

/// Computes every MSM of `msms`, all their windows as one parallel set of tasks.
pub(crate) fn msm_all<P: SWCurveConfig>(msms: &[Msm<'_, P>]) -> Vec<Projective<P>> {
    let tasks: Vec<(usize, usize)> = msms
        .iter()
        .enumerate()
        .flat_map(|(m, msm)| (0..msm.digits.windows).map(move |w| (m, w)))
        .collect();
    let sums: Vec<Bucket<P>> = tasks.par_iter().map(|&(m, w)| msms[m].window(w)).collect();
    let mut out = Vec::with_capacity(msms.len());
    let mut rest = &sums[..];
    for msm in msms {
        let (windows, tail) = rest.split_at(msm.digits.windows);
        out.push(msm.combine(windows));
        rest = tail;
    }
    out
}

/// Signed digits of field elements, with the window width chosen for `n` bases.
pub(crate) fn digits_for<F: PrimeField>(scalars: &[F::BigInt], n: usize) -> Digits {
    Digits::new(scalars, window_bits(n), F::MODULUS_BIT_SIZE as usize)
}

/// Whether every digit row reproduces its scalar (used by tests).
#[cfg(test)]
fn digits_reproduce<F: PrimeField>(scalars: &[F], digits: &Digits) -> bool {
    let radix = F::from(1u64 << digits.bits);
    scalars.iter().enumerate().all(|(i, s)| {
        let row = &digits.digits[i * digits.windows..(i + 1) * digits.windows];
        let v = row.iter().rev().fold(F::zero(), |acc, &d| {
            let d = if d >= 0 {
                F::from(d as u64)
            } else {
                -F::from(d.unsigned_abs() as u64)
            };
            acc * radix + d
        });
        v == *s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ark_bn254::{Fr, G1Affine, G1Projective, G2Affine};
    use ark_ec::{CurveGroup, VariableBaseMSM};
    use ark_ff::{UniformRand, Zero};
    use ark_std::rand::{Rng, SeedableRng};

    fn rng() -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(17)
    }

    /// Scalars the way a witness has them: zeros, ones, small values, values just below the
    /// modulus, and dense ones.
    fn witness_like(n: usize, rng: &mut impl Rng) -> Vec<Fr> {
        (0..n)
            .map(|_| match rng.gen_range(0..6) {
                0 => Fr::zero(),
                1 => Fr::from(1u64),
                2 => Fr::from(rng.gen::<u16>() as u64),
                3 => -Fr::from(rng.gen::<u32>() as u64),
                _ => Fr::rand(rng),
            })
            .collect()
    }

    #[test]
    fn digits_reproduce_their_scalars_at_every_width() {
        let mut rng = rng();
        let mut scalars = witness_like(200, &mut rng);
        scalars.push(-Fr::from(1u64));
        let bigints: Vec<_> = scalars.iter().map(|s| s.into_bigint()).collect();
        for bits in 2..=MAX_WINDOW {
            let digits = Digits::new(&bigints, bits, 254);
            assert!(digits_reproduce(&scalars, &digits), "width {bits}");
            let half = 1i32 << (bits - 1);
            assert!(digits.digits.iter().all(|d| i32::from(*d).abs() <= half));
        }
    }

    fn check<P: SWCurveConfig<ScalarField = Fr>>(bases: &[Affine<P>], scalars: &[Fr])
    where
        Projective<P>: VariableBaseMSM<MulBase = Affine<P>, ScalarField = Fr>,
    {
        let bigints: Vec<_> = scalars.iter().map(|s| s.into_bigint()).collect();
        let expected = Projective::<P>::msm_bigint(bases, &bigints);
        for bits in [3, 8, window_bits(bases.len())] {
            let digits = Digits::new(&bigints, bits, 254);
            let got = msm_all(&[Msm {
                bases,
                digits: &digits,
                offset: 0,
            }]);
            assert_eq!(got[0], expected, "width {bits}");
        }
    }

    #[test]
    fn g1_msm_matches_arkworks_on_witness_like_scalars() {
        let mut rng = rng();
        let n = 3000;
        let bases: Vec<G1Affine> = (0..n).map(|_| G1Affine::rand(&mut rng)).collect();
        check(&bases, &witness_like(n, &mut rng));
    }

    #[test]
    fn g2_msm_matches_arkworks_on_witness_like_scalars() {
        let mut rng = rng();
        let n = 1000;
        let bases: Vec<G2Affine> = (0..n).map(|_| G2Affine::rand(&mut rng)).collect();
        check(&bases, &witness_like(n, &mut rng));
    }

    /// Repeated and negated bases hit the exceptional additions (x equal); identity bases are
    /// skipped; more scalars than bases are ignored.
    #[test]
    fn repeated_negated_and_identity_bases_are_summed_exactly() {
        let mut rng = rng();
        let p = G1Affine::rand(&mut rng);
        let q = G1Affine::rand(&mut rng);
        let mut bases = vec![p; 300];
        bases.extend(vec![-p; 300]);
        bases.extend(vec![q; 100]);
        bases.extend(vec![G1Affine::identity(); 50]);
        let scalars: Vec<Fr> = (0..bases.len())
            .map(|i| Fr::from((i % 5) as u64 + 1))
            .collect();
        check(&bases, &scalars);
        let mut more = witness_like(bases.len() + 10, &mut rng);
        more[0] = Fr::from(7u64);
        let bigints: Vec<_> = more.iter().map(|s| s.into_bigint()).collect();
        let digits = digits_for::<Fr>(&bigints, bases.len());
        let got = msm_all(&[Msm {
            bases: &bases,
            digits: &digits,
            offset: 0,
        }]);
        assert_eq!(
            got[0].into_affine(),
            G1Projective::msm_bigint(&bases, &bigints).into_affine()
        );
    }

    #[test]
    fn several_msms_at_once_match_one_at_a_time() {
        let mut rng = rng();
        let g1: Vec<G1Affine> = (0..500).map(|_| G1Affine::rand(&mut rng)).collect();
        let a = witness_like(500, &mut rng);
        let b = witness_like(300, &mut rng);
        let (ab, bb): (Vec<_>, Vec<_>) = (
            a.iter().map(|s| s.into_bigint()).collect(),
            b.iter().map(|s| s.into_bigint()).collect(),
        );
        let (da, db) = (digits_for::<Fr>(&ab, 500), digits_for::<Fr>(&bb, 300));
        let got = msm_all(&[
            Msm {
                bases: &g1,
                digits: &da,
                offset: 0,
            },
            Msm {
                bases: &g1[..300],
                digits: &db,
                offset: 0,
            },
            Msm {
                bases: &g1[..200],
                digits: &da,
                offset: 250,
            },
        ]);
        assert_eq!(got[0], G1Projective::msm_bigint(&g1, &ab));
        assert_eq!(got[1], G1Projective::msm_bigint(&g1[..300], &bb));
        assert_eq!(got[2], G1Projective::msm_bigint(&g1[..200], &ab[250..450]));
    }
}
