//! The tick-batch circuit: one order, up to `capacity` ticks, one Groth16 statement.
//!
//! # Statement
//!
//! Public inputs, in this order (the contract's `uint256[6] input`):
//! `orderKey, prevHead, nextHead, seconds, bytesIn, bytesOut`.
//!
//! `orderKey` is `K = keccak256(abi.encode(chainId, marketplace, orderId)) mod r`
//! ([`OrderKey`]): the contract computes it from `block.chainid`, its own address and the claimed
//! order id, so a proof names one order of one deployment. It is a full field element (no range
//! check).
//!
//! The prover knows `capacity` slots, each enabled or disabled, such that
//!
//! 1. the enabled slots are a prefix (slot `i` enabled ⇒ slot `i-1` enabled);
//! 2. every tick field (`seconds`, `bytes_in`, `bytes_out`) is below `2^64`: it is built from 64
//!    boolean witnesses, so no value can wrap around the field;
//! 3. enabled slot `i` is the tick `(seqFirst + i, seconds_i, bytes_in_i, bytes_out_i)` hashed
//!    under the public `orderKey`: its sequence number *is* `seqFirst + i` and its key *is* the
//!    claimed order's, so a tick of another order or of another deployment, a skipped or a repeated
//!    tick yields a different chain and cannot reach `nextHead`;
//! 4. starting from `prevHead`, each enabled slot advances the head `h ← Poseidon(K, h, tick)` and
//!    each disabled slot leaves it unchanged, ending at `nextHead`; disabled slots hold zero seconds
//!    and bytes, so the public totals are exactly the sums over the enabled ticks;
//! 5. `seqFirst` (a private witness) continues the chain the contract has already paid for: at the
//!    genesis head (zero) it is 0, the meter's first sequence number; otherwise the prover also knows
//!    the *anchor*, the last paid tick `(seqFirst - 1, …)` of the same key and the head before it,
//!    which hash to `prevHead`. A batch can therefore neither skip nor re-claim ticks across batches, nor restart
//!    the numbering.
//! 6. all sequence numbers of the batch, and the anchor's, lie below `2^64`: the circuit range-checks
//!    the anchor's sequence number (or `seqFirst` at genesis) and `seqFirst + capacity - 1`, which
//!    bound every slot's number in between. A batch must start at most at `2^64 - capacity`.
//!
//! Genesis is the zero head for every order; the first tick already hashes `K`, so every head after
//! it belongs to one order of one deployment.
//!
//! [`TickBatch`] builds a correct assignment from ledger ticks and refuses inconsistent ones with a
//! typed error; [`TickBatchCircuit`] is the raw assignment the constraints check, public so that tests
//! can feed it wrong witnesses.

use ark_bn254::Fr;
use ark_ff::{BigInteger, One, PrimeField, Zero};
use ark_r1cs_std::alloc::AllocVar;
use ark_r1cs_std::boolean::Boolean;
use ark_r1cs_std::eq::EqGadget;
use ark_r1cs_std::fields::fp::FpVar;
use ark_r1cs_std::fields::FieldVar;
use ark_r1cs_std::select::CondSelectGadget;
use ark_relations::gr1cs::{
    ConstraintSynthesizer, ConstraintSystem, ConstraintSystemRef, SynthesisError,
};
use serde::{Deserialize, Serialize};

use crate::error::CircuitError;
use crate::key::OrderKey;
use crate::poseidon::{gadget::next_head_var, next_head, two_pow_64, Head, TickFields};

/// Number of public inputs of the circuit (and of `verifyClaim`'s `input`).
pub const NUM_PUBLIC_INPUTS: usize = 6;

/// Bits of every range-checked quantity (tick fields, sequence numbers).
const FIELD_BITS: usize = 64;

/// The public statement of one claim, as the contract sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClaimInputs {
    /// The order being paid, with its deployment (public input 0 is its key).
    pub key: OrderKey,
    /// The head the contract last paid for (genesis for the first claim).
    pub prev: Head,
    /// The head after the batch's last tick.
    pub next: Head,
    /// Sum of the batch's seconds.
    pub seconds: u128,
    /// Sum of the batch's bytes in.
    pub bytes_in: u128,
    /// Sum of the batch's bytes out.
    pub bytes_out: u128,
}

impl ClaimInputs {
    /// The on-chain id of the order being paid (the `orderId` argument of `claim`).
    pub fn order(&self) -> u64 {
        self.key.order()
    }

    /// The public inputs as field elements, in circuit order.
    ///
    /// Fails if a head is not a canonical field element (a `Head` made by hand).
    pub fn to_field_elements(&self) -> Result<[Fr; NUM_PUBLIC_INPUTS], CircuitError> {
        let head = |h: &Head, index| {
            h.to_field()
                .map_err(|_| CircuitError::InputOutOfField { index })
        };
        Ok([
            self.key.to_field(),
            head(&self.prev, 1)?,
            head(&self.next, 2)?,
            Fr::from(self.seconds),
            Fr::from(self.bytes_in),
            Fr::from(self.bytes_out),
        ])
    }

    /// The public inputs as the contract's `uint256[6]`: 32-byte big-endian words.
    pub fn to_words(&self) -> [[u8; 32]; NUM_PUBLIC_INPUTS] {
        let num = |v: u128| {
            let mut w = [0u8; 32];
            w[16..].copy_from_slice(&v.to_be_bytes());
            w
        };
        [
            self.key.to_word(),
            self.prev.0,
            self.next.0,
            num(self.seconds),
            num(self.bytes_in),
            num(self.bytes_out),
        ]
    }
}

/// Reads the contract's `uint256[6]` words as field elements, refusing any word `>= r` as the
/// on-chain verifier does.
pub fn inputs_from_words(
    words: &[[u8; 32]; NUM_PUBLIC_INPUTS],
) -> Result<[Fr; NUM_PUBLIC_INPUTS], CircuitError> {
    let mut out = [Fr::zero(); NUM_PUBLIC_INPUTS];
    for (index, (w, o)) in words.iter().zip(out.iter_mut()).enumerate() {
        *o = Head(*w)
            .to_field()
            .map_err(|_| CircuitError::InputOutOfField { index })?;
    }
    Ok(out)
}

/// One slot's private witness. Fields are field elements so that tests can try values that do
/// not fit in 64 bits; [`TickBatch`] only ever produces `u64` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotWitness {
    /// Whether the slot holds a tick.
    pub enabled: bool,
    /// The tick's seconds.
    pub seconds: Fr,
    /// The tick's bytes in.
    pub bytes_in: Fr,
    /// The tick's bytes out.
    pub bytes_out: Fr,
}

/// The anchor's private witness: the last paid tick (its order and sequence number are implied)
/// and the head before it. Ignored when `prevHead` is genesis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnchorWitness {
    /// The head before the last paid tick.
    pub before: Fr,
    /// The last paid tick's seconds.
    pub seconds: Fr,
    /// The last paid tick's bytes in.
    pub bytes_in: Fr,
    /// The last paid tick's bytes out.
    pub bytes_out: Fr,
}

/// The raw assignment of the tick-batch circuit; its capacity is `slots.len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickBatchCircuit {
    /// `orderKey, prevHead, nextHead, seconds, bytesIn, bytesOut`.
    pub public: [Fr; NUM_PUBLIC_INPUTS],
    /// Sequence number of slot 0.
    pub seq_first: Fr,
    /// The last paid tick, for non-genesis batches.
    pub anchor: AnchorWitness,
    /// One entry per slot.
    pub slots: Vec<SlotWitness>,
}

impl TickBatchCircuit {
    /// A satisfiable assignment with no ticks (genesis, order key 0): the shape key setup needs.
    pub fn blank(capacity: usize) -> Result<Self, CircuitError> {
        if capacity == 0 {
            return Err(CircuitError::ZeroCapacity);
        }
        Ok(TickBatchCircuit {
            public: [Fr::zero(); NUM_PUBLIC_INPUTS],
            seq_first: Fr::zero(),
            anchor: AnchorWitness::default(),
            slots: vec![SlotWitness::default(); capacity],
        })
    }

    /// Slots in this circuit.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

/// The number of R1CS constraints of the circuit of `capacity` slots (as Groth16 sees them).
pub fn constraint_count(capacity: usize) -> Result<usize, CircuitError> {
    let cs = ConstraintSystem::<Fr>::new_ref();
    cs.set_optimization_goal(ark_relations::gr1cs::OptimizationGoal::Constraints);
    cs.set_mode(ark_relations::gr1cs::SynthesisMode::Setup);
    TickBatchCircuit::blank(capacity)?.generate_constraints(cs.clone())?;
    cs.finalize();
    Ok(cs.num_constraints())
}

/// A value built from `FIELD_BITS` boolean witnesses: below `2^64` by construction.
///
/// Only the low 64 bits of `value` are used; a larger value therefore cannot be represented, and any
/// statement that relied on it (its hash, its contribution to a total) fails to hold.
fn alloc_u64(cs: &ConstraintSystemRef<Fr>, value: Fr) -> Result<FpVar<Fr>, SynthesisError> {
    let bits = value.into_bigint().to_bits_le();
    let vars = (0..FIELD_BITS)
        .map(|i| Boolean::new_witness(cs.clone(), || Ok(bits.get(i).copied().unwrap_or(false))))
        .collect::<Result<Vec<_>, _>>()?;
    Boolean::le_bits_to_fp(&vars)
}

/// Constrains an existing value to be below `2^64`.
fn enforce_u64(cs: &ConstraintSystemRef<Fr>, var: &FpVar<Fr>) -> Result<(), SynthesisError> {
    let value = ark_r1cs_std::GR1CSVar::value(var).unwrap_or_default();
    alloc_u64(cs, value)?.enforce_equal(var)
}

/// The range-checked fields of one tick: seconds, bytes in, bytes out.
struct TickVars {
    seconds: FpVar<Fr>,
    bytes_in: FpVar<Fr>,
    bytes_out: FpVar<Fr>,
}

impl TickVars {
    fn alloc(
        cs: &ConstraintSystemRef<Fr>,
        seconds: Fr,
        bytes_in: Fr,
        bytes_out: Fr,
    ) -> Result<Self, SynthesisError> {
        Ok(TickVars {
            seconds: alloc_u64(cs, seconds)?,
            bytes_in: alloc_u64(cs, bytes_in)?,
            bytes_out: alloc_u64(cs, bytes_out)?,
        })
    }

    /// The two packed elements of [`TickFields::packed`], as linear combinations (no constraints).
    fn packed(&self, seq: &FpVar<Fr>) -> (FpVar<Fr>, FpVar<Fr>) {
        let s = two_pow_64();
        let a = seq * s + &self.seconds;
        let b = &self.bytes_in * s + &self.bytes_out;
        (a, b)
    }
}

impl ConstraintSynthesizer<Fr> for TickBatchCircuit {
    fn generate_constraints(self, cs: ConstraintSystemRef<Fr>) -> Result<(), SynthesisError> {
        let capacity = self.slots.len();
        let _span = tracing::debug_span!("tick_batch_constraints", capacity).entered();
        let [key, prev, next, total_seconds, total_in, total_out] =
            self.public.map(|v| FpVar::new_input(cs.clone(), || Ok(v)));
        // The key is a whole field element (a reduced keccak): it enters the hash as one
        // element, so it needs no range check.
        let (key, prev, next) = (key?, prev?, next?);
        let (total_seconds, total_in, total_out) = (total_seconds?, total_in?, total_out?);

        let is_genesis = prev.is_zero()?;
        let seq_first = FpVar::new_witness(cs.clone(), || Ok(self.seq_first))?;
        // An order's chain starts at seq 0.
        FpVar::from(is_genesis.clone()).mul_equals(&seq_first, &FpVar::zero())?;
        // The lowest sequence number in play: the anchor's, or the first tick's at genesis.
        let not_genesis = FpVar::from(!&is_genesis);
        let lowest_seq = &seq_first - &not_genesis;
        enforce_u64(&cs, &lowest_seq)?;
        enforce_u64(&cs, &(&seq_first + Fr::from(capacity as u64 - 1)))?;

        // The anchor must hash to prevHead; this binds seqFirst to the chain already paid for.
        let anchor = TickVars::alloc(
            &cs,
            self.anchor.seconds,
            self.anchor.bytes_in,
            self.anchor.bytes_out,
        )?;
        let anchor_before = FpVar::new_witness(cs.clone(), || Ok(self.anchor.before))?;
        let (a, b) = anchor.packed(&(&seq_first - Fr::one()));
        let anchor_head = next_head_var(cs.clone(), &key, &anchor_before, &a, &b)?;
        anchor_head.conditional_enforce_equal(&prev, &!&is_genesis)?;

        let mut head = prev;
        let mut sums = (FpVar::zero(), FpVar::zero(), FpVar::zero());
        let mut previous_enabled: Option<Boolean<Fr>> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let enabled = Boolean::new_witness(cs.clone(), || Ok(slot.enabled))?;
            let disabled = FpVar::one() - FpVar::from(enabled.clone());
            if let Some(p) = &previous_enabled {
                // enabled ⇒ previous enabled: enabled · (1 - previous) = 0.
                FpVar::from(enabled.clone())
                    .mul_equals(&(FpVar::one() - FpVar::from(p.clone())), &FpVar::zero())?;
            }
            let tick = TickVars::alloc(&cs, slot.seconds, slot.bytes_in, slot.bytes_out)?;
            let seq = &seq_first + Fr::from(i as u64);
            let (a, b) = tick.packed(&seq);
            let hashed = next_head_var(cs.clone(), &key, &head, &a, &b)?;
            head = FpVar::conditionally_select(&enabled, &hashed, &head)?;
            // A disabled slot carries nothing: zero seconds and (since b packs both) zero bytes.
            disabled.mul_equals(&tick.seconds, &FpVar::zero())?;
            disabled.mul_equals(&b, &FpVar::zero())?;
            sums.0 += &tick.seconds;
            sums.1 += &tick.bytes_in;
            sums.2 += &tick.bytes_out;
            previous_enabled = Some(enabled);
        }
        head.enforce_equal(&next)?;
        sums.0.enforce_equal(&total_seconds)?;
        sums.1.enforce_equal(&total_in)?;
        sums.2.enforce_equal(&total_out)?;
        Ok(())
    }
}

/// The last tick the contract has paid for and the head before it: what a batch after the first
/// needs to prove that it continues the paid chain. The settler reads both from the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The head before the last paid tick.
    pub before: Head,
    /// The last paid tick.
    pub tick: TickFields,
}

/// A checked batch of consecutive ticks of one order, ready to be proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickBatch {
    key: OrderKey,
    prev: Head,
    next: Head,
    anchor: Option<Anchor>,
    ticks: Vec<TickFields>,
}

impl TickBatch {
    /// Checks that `ticks` continue the chain at `prev` of the order `key` names.
    ///
    /// `anchor` must be `None` exactly when `prev` is genesis, and otherwise be the last paid tick and
    /// the head before it. The ticks must all belong to `key`'s order and be consecutive, starting
    /// right after the anchor.
    pub fn new(
        key: OrderKey,
        prev: Head,
        anchor: Option<Anchor>,
        ticks: Vec<TickFields>,
    ) -> Result<Self, CircuitError> {
        let order = key.order();
        let first = ticks.first().ok_or(CircuitError::EmptyBatch)?;
        match (&anchor, prev.is_genesis()) {
            (None, false) => return Err(CircuitError::MissingAnchor { prev }),
            (Some(_), true) => return Err(CircuitError::UnexpectedAnchor),
            (None, true) => {
                if first.seq != 0 {
                    return Err(CircuitError::NotConsecutive {
                        expected: 0,
                        found: first.seq,
                    });
                }
            }
            (Some(anchor), false) => {
                if anchor.tick.order != order {
                    return Err(CircuitError::ForeignTick {
                        expected: order,
                        found: anchor.tick.order,
                        seq: anchor.tick.seq,
                    });
                }
                if next_head(&key, &anchor.before, &anchor.tick) != prev {
                    return Err(CircuitError::AnchorMismatch {
                        seq: anchor.tick.seq,
                        prev,
                    });
                }
                let expected =
                    anchor
                        .tick
                        .seq
                        .checked_add(1)
                        .ok_or(CircuitError::SeqOutOfRange {
                            first: first.seq,
                            capacity: ticks.len(),
                        })?;
                if first.seq != expected {
                    return Err(CircuitError::NotConsecutive {
                        expected,
                        found: first.seq,
                    });
                }
            }
        }
        let mut head = prev;
        for (i, t) in ticks.iter().enumerate() {
            if t.order != order {
                return Err(CircuitError::ForeignTick {
                    expected: order,
                    found: t.order,
                    seq: t.seq,
                });
            }
            let expected = first
                .seq
                .checked_add(i as u64)
                .ok_or(CircuitError::SeqOutOfRange {
                    first: first.seq,
                    capacity: ticks.len(),
                })?;
            if t.seq != expected {
                return Err(CircuitError::NotConsecutive {
                    expected,
                    found: t.seq,
                });
            }
            head = next_head(&key, &head, t);
        }
        Ok(TickBatch {
            key,
            prev,
            next: head,
            anchor,
            ticks,
        })
    }

    /// The order being claimed (its on-chain id).
    pub fn order(&self) -> u64 {
        self.key.order()
    }

    /// The order being claimed, with its deployment.
    pub fn key(&self) -> OrderKey {
        self.key
    }

    /// The ticks, in chain order.
    pub fn ticks(&self) -> &[TickFields] {
        &self.ticks
    }

    /// The head after the last tick.
    pub fn next(&self) -> Head {
        self.next
    }

    /// The last tick of this batch as the anchor of the next one.
    pub fn next_anchor(&self) -> Anchor {
        let tick = *self.ticks.last().expect("a TickBatch is never empty");
        let before = self.ticks.len().checked_sub(2).map_or(self.prev, |i| {
            crate::poseidon::chain_head(&self.key, &self.prev, &self.ticks[..=i])
        });
        Anchor { before, tick }
    }

    /// The public statement the proof of this batch proves.
    pub fn inputs(&self) -> ClaimInputs {
        let sum = |f: fn(&TickFields) -> u64| self.ticks.iter().map(|t| u128::from(f(t))).sum();
        ClaimInputs {
            key: self.key,
            prev: self.prev,
            next: self.next,
            seconds: sum(|t| t.seconds),
            bytes_in: sum(|t| t.bytes_in),
            bytes_out: sum(|t| t.bytes_out),
        }
    }

    /// The assignment of the circuit with `capacity` slots.
    pub fn circuit(&self, capacity: usize) -> Result<TickBatchCircuit, CircuitError> {
        if capacity == 0 {
            return Err(CircuitError::ZeroCapacity);
        }
        if self.ticks.len() > capacity {
            return Err(CircuitError::BatchTooLarge {
                ticks: self.ticks.len(),
                capacity,
            });
        }
        let first = self.ticks[0].seq;
        if first.checked_add(capacity as u64 - 1).is_none() {
            return Err(CircuitError::SeqOutOfRange { first, capacity });
        }
        let anchor = self
            .anchor
            .map_or(AnchorWitness::default(), |a| AnchorWitness {
                before: a.before.to_field_reduced(),
                seconds: a.tick.seconds.into(),
                bytes_in: a.tick.bytes_in.into(),
                bytes_out: a.tick.bytes_out.into(),
            });
        let mut slots: Vec<SlotWitness> = self
            .ticks
            .iter()
            .map(|t| SlotWitness {
                enabled: true,
                seconds: t.seconds.into(),
                bytes_in: t.bytes_in.into(),
                bytes_out: t.bytes_out.into(),
            })
            .collect();
        slots.resize(capacity, SlotWitness::default());
        Ok(TickBatchCircuit {
            public: self.inputs().to_field_elements()?,
            seq_first: first.into(),
            anchor,
            slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poseidon::{chain_head, next_head_field};
    use ark_crypto_primitives::sponge::poseidon::PoseidonSponge;
    use ark_crypto_primitives::sponge::CryptographicSponge;

    const ORDER: u64 = 42;
    const CAPACITY: usize = 4;

    /// Order 42 of a marketplace at 0x0909…09 on chain 31337.
    fn key() -> OrderKey {
        OrderKey::new(31337, [9; 20], ORDER)
    }

    /// The key field element, as the raw tick arrays of [`field_chain`] carry it.
    fn k() -> Fr {
        key().to_field()
    }

    fn tick(seq: u64) -> TickFields {
        TickFields {
            order: ORDER,
            seq,
            seconds: 30 + seq,
            bytes_in: 1_000 * seq + 7,
            bytes_out: u64::MAX - seq,
        }
    }

    fn ticks(seqs: impl IntoIterator<Item = u64>) -> Vec<TickFields> {
        seqs.into_iter().map(tick).collect()
    }

    fn satisfied(circuit: TickBatchCircuit) -> bool {
        let cs = ConstraintSystem::<Fr>::new_ref();
        circuit.generate_constraints(cs.clone()).expect("synthesis");
        cs.is_satisfied().expect("assignment present")
    }

    fn genesis_batch(n: u64) -> TickBatch {
        TickBatch::new(key(), Head::GENESIS, None, ticks(0..n)).unwrap()
    }

    /// A batch of ticks 3..3+n continuing a paid chain of ticks 0..3.
    fn later_batch(n: u64) -> TickBatch {
        let paid = genesis_batch(3);
        TickBatch::new(
            key(),
            paid.next(),
            Some(paid.next_anchor()),
            ticks(3..3 + n),
        )
        .unwrap()
    }

    /// The chain head over raw field-level ticks `(key, seq, seconds, in, out)`, hashing exactly
    /// what an unconstrained circuit would, so that wrong witnesses fail on the constraint under test
    /// and not on an unrelated hash mismatch.
    fn field_chain(prev: Fr, ticks: &[[Fr; 5]]) -> Fr {
        let s = two_pow_64();
        ticks.iter().fold(prev, |h, [key, q, sec, bi, bo]| {
            let a = *q * s + sec;
            let b = *bi * s + bo;
            let mut sponge = PoseidonSponge::new(crate::poseidon::config());
            sponge.state[0] = *key;
            sponge.absorb(&vec![h, a, b]);
            sponge.squeeze_field_elements::<Fr>(1)[0]
        })
    }

    #[test]
    fn field_chain_matches_native_hash() {
        let t = tick(5);
        let raw = [
            k(),
            t.seq.into(),
            t.seconds.into(),
            t.bytes_in.into(),
            t.bytes_out.into(),
        ];
        assert_eq!(
            field_chain(Fr::from(9u64), &[raw]),
            next_head_field(k(), Fr::from(9u64), &t)
        );
    }

    #[test]
    fn full_batch_is_satisfiable() {
        assert!(satisfied(
            genesis_batch(CAPACITY as u64).circuit(CAPACITY).unwrap()
        ));
    }

    #[test]
    fn partly_full_batch_is_satisfiable_and_disabled_slots_change_nothing() {
        let batch = genesis_batch(2);
        assert_eq!(
            batch.next(),
            chain_head(&key(), &Head::GENESIS, &ticks(0..2))
        );
        assert_eq!(batch.inputs().seconds, 30 + 31);
        assert!(satisfied(batch.circuit(CAPACITY).unwrap()));
        assert!(satisfied(genesis_batch(1).circuit(CAPACITY).unwrap()));
    }

    #[test]
    fn batch_after_a_paid_one_is_satisfiable() {
        assert!(satisfied(
            later_batch(CAPACITY as u64).circuit(CAPACITY).unwrap()
        ));
        assert!(satisfied(later_batch(2).circuit(CAPACITY).unwrap()));
    }

    #[test]
    fn blank_circuit_is_satisfiable() {
        assert!(satisfied(TickBatchCircuit::blank(CAPACITY).unwrap()));
    }

    #[test]
    fn changed_tick_is_unsatisfiable() {
        for slot in 0..3 {
            let mut c = later_batch(3).circuit(CAPACITY).unwrap();
            // Keep the totals consistent so that only the chain can catch the change.
            c.slots[slot].bytes_in += Fr::one();
            c.public[4] += Fr::one();
            assert!(!satisfied(c), "slot {slot}");
        }
    }

    #[test]
    fn wrong_total_is_unsatisfiable() {
        for index in 3..6 {
            let mut c = genesis_batch(3).circuit(CAPACITY).unwrap();
            c.public[index] += Fr::one();
            assert!(!satisfied(c.clone()), "input {index} + 1");
            c.public[index] -= Fr::from(2u64);
            assert!(!satisfied(c), "input {index} - 1");
        }
    }

    #[test]
    fn overflowing_field_is_unsatisfiable() {
        // 2^64 + 5 seconds in one tick, everything else consistent with it.
        let big = two_pow_64() + Fr::from(5u64);
        let mut c = genesis_batch(2).circuit(CAPACITY).unwrap();
        c.slots[1].seconds = big;
        c.public[3] = Fr::from(30u64) + big;
        let raw: Vec<[Fr; 5]> = (0..2)
            .map(|i| {
                let t = tick(i);
                let sec = if i == 1 { big } else { Fr::from(t.seconds) };
                [
                    k(),
                    t.seq.into(),
                    sec,
                    t.bytes_in.into(),
                    t.bytes_out.into(),
                ]
            })
            .collect();
        c.public[2] = field_chain(Fr::zero(), &raw);
        assert!(!satisfied(c));
    }

    #[test]
    fn wrapping_around_the_field_is_unsatisfiable() {
        // "-1" bytes out in one tick to cancel another tick's usage in the total.
        let minus_one = -Fr::one();
        let mut c = genesis_batch(2).circuit(CAPACITY).unwrap();
        c.slots[1].bytes_out = minus_one;
        c.public[5] = Fr::from(tick(0).bytes_out) + minus_one;
        let raw: Vec<[Fr; 5]> = (0..2)
            .map(|i| {
                let t = tick(i);
                let out = if i == 1 {
                    minus_one
                } else {
                    Fr::from(t.bytes_out)
                };
                [k(), t.seq.into(), t.seconds.into(), t.bytes_in.into(), out]
            })
            .collect();
        c.public[2] = field_chain(Fr::zero(), &raw);
        assert!(!satisfied(c));
    }

    #[test]
    fn full_width_order_key_is_satisfiable() {
        // The key is a reduced keccak, far above 2^64: it is not range-checked like the tick fields.
        assert!(k() > two_pow_64() * two_pow_64() * two_pow_64());
        assert!(satisfied(genesis_batch(2).circuit(CAPACITY).unwrap()));
    }

    #[test]
    fn proof_for_another_deployment_is_unsatisfiable() {
        // The same order id and ticks, claimed under the key of another chain or marketplace
        // (what the contract of that deployment puts in input 0).
        for other in [
            OrderKey::new(31338, [9; 20], ORDER),
            OrderKey::new(31337, [8; 20], ORDER),
        ] {
            let mut c = later_batch(2).circuit(CAPACITY).unwrap();
            c.public[0] = other.to_field();
            assert!(!satisfied(c), "{other}");
            // Nor can a chain built under the other key be claimed under this one.
            let theirs = genesis_batch(2);
            let mut c = theirs.circuit(CAPACITY).unwrap();
            c.public[2] = chain_head(&other, &Head::GENESIS, theirs.ticks())
                .to_field()
                .unwrap();
            assert!(!satisfied(c), "{other}'s chain");
        }
    }

    /// The circuit derived from a good batch, with nextHead replaced by the chain over `chained`
    /// (the witness slots keep the good ticks' amounts, which `chained` shares).
    fn with_chain_over(batch: &TickBatch, chained: &[TickFields]) -> TickBatchCircuit {
        let mut c = batch.circuit(CAPACITY).unwrap();
        c.public[2] = chain_head(&batch.key(), &batch.inputs().prev, chained)
            .to_field()
            .unwrap();
        c
    }

    #[test]
    fn skipped_tick_is_unsatisfiable() {
        let batch = later_batch(3);
        let skipped = [tick(3), tick(4), TickFields { seq: 6, ..tick(5) }];
        assert!(!satisfied(with_chain_over(&batch, &skipped)));
    }

    #[test]
    fn repeated_tick_is_unsatisfiable() {
        let batch = later_batch(3);
        let repeated = [tick(3), tick(4), TickFields { seq: 4, ..tick(5) }];
        assert!(!satisfied(with_chain_over(&batch, &repeated)));
    }

    #[test]
    fn reclaiming_the_last_paid_tick_is_unsatisfiable() {
        // A batch that starts again at the anchor's sequence number (paid tick 2 once more).
        let paid = genesis_batch(3);
        let again = TickFields { seq: 2, ..tick(3) };
        let mut c = later_batch(1).circuit(CAPACITY).unwrap();
        c.seq_first = Fr::from(2u64);
        c.public[2] = next_head(&key(), &paid.next(), &again).to_field().unwrap();
        assert!(!satisfied(c));
    }

    #[test]
    fn gap_between_enabled_slots_is_unsatisfiable() {
        // Slots 0 and 2 enabled, slot 1 disabled: that would skip seq 1.
        let mut c = genesis_batch(3).circuit(CAPACITY).unwrap();
        c.slots[1] = SlotWitness::default();
        let (t0, t2) = (tick(0), tick(2));
        c.public[2] = chain_head(&key(), &Head::GENESIS, &[t0, t2])
            .to_field()
            .unwrap();
        c.public[3] = Fr::from(t0.seconds + t2.seconds);
        c.public[4] = Fr::from(t0.bytes_in + t2.bytes_in);
        c.public[5] = Fr::from(u128::from(t0.bytes_out) + u128::from(t2.bytes_out));
        assert!(!satisfied(c));
    }

    #[test]
    fn disabled_slot_carrying_usage_is_unsatisfiable() {
        let mut c = genesis_batch(2).circuit(CAPACITY).unwrap();
        c.slots[3].seconds = Fr::from(100u64);
        c.public[3] += Fr::from(100u64);
        assert!(!satisfied(c));
        let mut c = genesis_batch(2).circuit(CAPACITY).unwrap();
        c.slots[2].bytes_out = Fr::from(100u64);
        c.public[5] += Fr::from(100u64);
        assert!(!satisfied(c));
    }

    #[test]
    fn another_orders_tick_is_unsatisfiable() {
        let batch = later_batch(3);
        // Tick 4 hashed under order 43's key: the tick of another order in the chain.
        let other = OrderKey::new(31337, [9; 20], ORDER + 1);
        let prev = batch.inputs().prev;
        let h = next_head(&key(), &prev, &tick(3));
        let h = next_head(&other, &h, &tick(4));
        let h = next_head(&key(), &h, &tick(5));
        let mut c = batch.circuit(CAPACITY).unwrap();
        c.public[2] = h.to_field().unwrap();
        assert!(!satisfied(c));
        // Claiming the whole batch for another order fails too.
        let mut c = batch.circuit(CAPACITY).unwrap();
        c.public[0] = other.to_field();
        assert!(!satisfied(c));
    }

    #[test]
    fn wrong_prev_head_is_unsatisfiable() {
        let batch = later_batch(2);
        let good = batch.circuit(CAPACITY).unwrap();
        // Another non-genesis head.
        let mut c = good.clone();
        c.public[1] += Fr::one();
        assert!(!satisfied(c));
        // Pretending the chain starts at genesis: the ticks were chained from the paid head.
        let mut c = good;
        c.public[1] = Fr::zero();
        assert!(!satisfied(c));
    }

    #[test]
    fn sequence_numbers_must_stay_below_2_pow_64() {
        let paid = TickFields {
            seq: u64::MAX - 2,
            ..tick(0)
        };
        let anchor = Anchor {
            before: Head::GENESIS,
            tick: paid,
        };
        let prev = next_head(&key(), &Head::GENESIS, &paid);
        let near_end = TickFields {
            seq: u64::MAX - 1,
            ..tick(0)
        };
        let batch = TickBatch::new(key(), prev, Some(anchor), vec![near_end]).unwrap();
        assert!(matches!(
            batch.circuit(CAPACITY),
            Err(CircuitError::SeqOutOfRange { .. })
        ));
        assert!(satisfied(batch.circuit(2).unwrap()));
        let mut c = batch.circuit(2).unwrap();
        c.slots.push(SlotWitness::default());
        assert!(!satisfied(c), "seq_first + capacity - 1 wraps past 2^64");
    }

    #[test]
    fn genesis_batch_must_start_at_seq_zero() {
        // Ticks 1 and 2 claimed from genesis, skipping tick 0.
        let mut c = genesis_batch(2).circuit(CAPACITY).unwrap();
        c.seq_first = Fr::one();
        let shifted = [
            TickFields { seq: 1, ..tick(0) },
            TickFields { seq: 2, ..tick(1) },
        ];
        c.public[2] = chain_head(&key(), &Head::GENESIS, &shifted)
            .to_field()
            .unwrap();
        assert!(!satisfied(c));
        assert!(matches!(
            TickBatch::new(key(), Head::GENESIS, None, shifted.to_vec()),
            Err(CircuitError::NotConsecutive {
                expected: 0,
                found: 1
            })
        ));
    }

    #[test]
    fn batch_builder_refuses_inconsistent_ticks() {
        let err = |r: Result<TickBatch, CircuitError>| r.unwrap_err();
        assert!(matches!(
            err(TickBatch::new(key(), Head::GENESIS, None, vec![])),
            CircuitError::EmptyBatch
        ));
        assert!(matches!(
            err(TickBatch::new(
                key(),
                Head::GENESIS,
                None,
                vec![tick(0), tick(2)]
            )),
            CircuitError::NotConsecutive {
                expected: 1,
                found: 2
            }
        ));
        assert!(matches!(
            err(TickBatch::new(
                key(),
                Head::GENESIS,
                None,
                vec![
                    tick(0),
                    TickFields {
                        order: 1,
                        ..tick(1)
                    }
                ]
            )),
            CircuitError::ForeignTick {
                expected: ORDER,
                found: 1,
                seq: 1
            }
        ));
        let paid = genesis_batch(3);
        assert!(matches!(
            err(TickBatch::new(key(), paid.next(), None, ticks(3..4))),
            CircuitError::MissingAnchor { .. }
        ));
        assert!(matches!(
            err(TickBatch::new(
                key(),
                Head::GENESIS,
                Some(paid.next_anchor()),
                ticks(3..4)
            )),
            CircuitError::UnexpectedAnchor
        ));
        let stale = Anchor {
            before: Head::GENESIS,
            tick: tick(2),
        };
        assert!(matches!(
            err(TickBatch::new(key(), paid.next(), Some(stale), ticks(3..4))),
            CircuitError::AnchorMismatch { .. }
        ));
        assert!(matches!(
            err(TickBatch::new(
                key(),
                paid.next(),
                Some(paid.next_anchor()),
                ticks(4..5)
            )),
            CircuitError::NotConsecutive {
                expected: 3,
                found: 4
            }
        ));
        assert!(matches!(
            genesis_batch(5).circuit(CAPACITY),
            Err(CircuitError::BatchTooLarge {
                ticks: 5,
                capacity: 4
            })
        ));
    }

    #[test]
    fn next_anchor_leads_to_next_head() {
        for n in 1..4 {
            let b = later_batch(n);
            let a = b.next_anchor();
            assert_eq!(next_head(&key(), &a.before, &a.tick), b.next());
        }
    }

    #[test]
    fn words_round_trip_and_refuse_out_of_field_values() {
        let inputs = later_batch(2).inputs();
        let words = inputs.to_words();
        assert_eq!(
            inputs_from_words(&words).unwrap(),
            inputs.to_field_elements().unwrap()
        );
        let mut bad = words;
        bad[4] = [0xff; 32];
        assert!(matches!(
            inputs_from_words(&bad),
            Err(CircuitError::InputOutOfField { index: 4 })
        ));
    }

    #[test]
    fn constraints_grow_linearly_with_capacity() {
        let one = constraint_count(1).unwrap();
        let two = constraint_count(2).unwrap();
        let three = constraint_count(3).unwrap();
        assert_eq!(three - two, two - one);
        // One Poseidon permutation (~264) plus 192 range-check bits and a few selections.
        assert!(two - one <= 500, "{} constraints per tick", two - one);
    }
}
