//! The Groth16 prover's last step, from the QAP witness to the proof, with this crate's MSMs.
//!
//! The equations are ark-groth16 0.6's (`create_proof_with_assignment`), term for term, so a
//! proof made here is one arkworks could have made with the same `r` and `s`; only the MSMs are
//! computed differently ([`crate::msm`]). The A, B (G1 and G2) and L MSMs share one digit
//! recoding of the assignment, and all five run as one set of parallel window tasks.

use ark_bn254::{Bn254, Fr};
use ark_ec::CurveGroup;
use ark_ff::PrimeField;
use ark_groth16::{Proof, ProvingKey};
use rayon::prelude::*;

use crate::msm::{digits_for, msm_all, Msm};

/// The proof of `full_assignment` (the constant one, the public inputs, then the witness) whose
/// quotient polynomial has coefficients `h`, blinded by `r` and `s`.
pub(crate) fn create_proof(
    pk: &ProvingKey<Bn254>,
    r: Fr,
    s: Fr,
    h: &[Fr],
    full_assignment: &[Fr],
    num_inputs: usize,
) -> Proof<Bn254> {
    let _span = tracing::debug_span!("msms").entered();
    let bigints = |v: &[Fr]| v.par_iter().map(|f| f.into_bigint()).collect::<Vec<_>>();
    // Everything but the constant one, whose bases are added below; the witness is its suffix.
    let (assignment, h) = rayon::join(|| bigints(&full_assignment[1..]), || bigints(h));
    let (digits, h_digits) = rayon::join(
        || digits_for::<Fr>(&assignment, assignment.len()),
        || digits_for::<Fr>(&h, pk.h_query.len()),
    );
    drop(assignment);
    drop(h);
    let g1 = [
        Msm {
            bases: &pk.h_query,
            digits: &h_digits,
            offset: 0,
        },
        Msm {
            bases: &pk.l_query,
            digits: &digits,
            offset: num_inputs - 1,
        },
        Msm {
            bases: &pk.a_query[1..],
            digits: &digits,
            offset: 0,
        },
        Msm {
            bases: &pk.b_g1_query[1..],
            digits: &digits,
            offset: 0,
        },
    ];
    let g2 = [Msm {
        bases: &pk.b_g2_query[1..],
        digits: &digits,
        offset: 0,
    }];
    let (g1, g2) = rayon::join(|| msm_all(&g1), || msm_all(&g2));
    let [h_acc, l_acc, a_acc, b_g1_acc] = [g1[0], g1[1], g1[2], g1[3]];

    let g_a = pk.delta_g1 * r + pk.a_query[0] + a_acc + pk.vk.alpha_g1;
    let g1_b = pk.delta_g1 * s + pk.b_g1_query[0] + b_g1_acc + pk.beta_g1;
    let g2_b = pk.vk.delta_g2 * s + pk.b_g2_query[0] + g2[0] + pk.vk.beta_g2;
    let g_c = g_a * s + g1_b * r - pk.delta_g1 * (r * s) + l_acc + h_acc;
    Proof {
        a: g_a.into_affine(),
        b: g2_b.into_affine(),
        c: g_c.into_affine(),
    }
}
