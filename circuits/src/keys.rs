//! Key setup, proving, native verification, and key files.
//!
//! # Where keys come from
//!
//! Groth16 needs a trusted setup per circuit, i.e. per batch capacity. Whoever knows the setup's
//! randomness ("toxic waste") can forge proofs for any totals, so:
//!
//! - **Production** keys are made by the marketplace deployer with [`setup`] and an OS random number
//!   generator ([`setup_with_os_rng`]), the randomness is dropped, and the verifying key goes on chain
//!   as the generated Solidity verifier. Storage providers only ever *download* the proving key; an SP
//!   must never run the setup for the keys its own claims are checked against.
//! - **Tests and the local stack** use [`setup_from_seed`]: the same seed gives the same keys, which is
//!   convenient and, for exactly that reason, worthless as a security boundary.
//!
//! # Key files
//!
//! A key file is an 8-byte magic (`SHALEPK1` or `SHALEVK1`), the capacity as a little-endian `u32`,
//! then the arkworks serialization of the key: uncompressed for the (large) proving key so that it
//! loads fast, compressed and validated for the (small) verifying key. The proving key's points are
//! not validated on load: a corrupted proving key can only produce proofs that fail verification,
//! while the verifying key, which decides what is accepted, is fully checked.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use ark_bn254::{Bn254, Fr};
use ark_ff::UniformRand;
use ark_groth16::r1cs_to_qap::{LibsnarkReduction, R1CSToQAP};
use ark_groth16::{prepare_verifying_key, Groth16, PreparedVerifyingKey};
use ark_poly::GeneralEvaluationDomain;
use ark_relations::gr1cs::{
    ConstraintSynthesizer, ConstraintSystem, Matrix, OptimizationGoal, SynthesisMode,
    R1CS_PREDICATE_LABEL,
};
use ark_serialize::{CanonicalDeserialize, CanonicalSerialize};
use ark_snark::SNARK;
use ark_std::rand::{CryptoRng, RngCore, SeedableRng};
use ark_std::{end_timer, start_timer};

use crate::circuit::{ClaimInputs, TickBatch, TickBatchCircuit, NUM_PUBLIC_INPUTS};
use crate::error::CircuitError;
use crate::proof::ClaimProof;

const PK_MAGIC: &[u8; 8] = b"SHALEPK1";
const VK_MAGIC: &[u8; 8] = b"SHALEVK1";

/// The proving key of the circuit with a given capacity (what the settler holds).
#[derive(Clone, Debug)]
pub struct ProvingKey {
    capacity: usize,
    /// Shared: a proving key is large (hundreds of MB at capacity 1024) and cloned into workers.
    key: Arc<ark_groth16::ProvingKey<Bn254>>,
    /// The circuit's constraint matrices, built on the first proof and reused: arkworks' default
    /// prover rebuilds (and inlines) them for every proof, about a fifth of the proving time.
    shape: Arc<OnceLock<CircuitShape>>,
}

/// The R1CS matrices of the circuit of one capacity; they do not depend on the witness.
#[derive(Debug)]
struct CircuitShape {
    matrices: Vec<Matrix<Fr>>,
    num_instance_variables: usize,
    num_constraints: usize,
}

impl CircuitShape {
    /// Synthesizes the blank circuit exactly as Groth16's setup does (same optimization goal), so
    /// that the matrices match the proving key.
    fn of(capacity: usize) -> Result<Self, CircuitError> {
        let _span = tracing::debug_span!("circuit_shape", capacity).entered();
        let cs = ConstraintSystem::<Fr>::new_ref();
        cs.set_optimization_goal(OptimizationGoal::Constraints);
        cs.set_mode(SynthesisMode::Setup);
        TickBatchCircuit::blank(capacity)?.generate_constraints(cs.clone())?;
        cs.finalize();
        let mut all = cs.to_matrices()?;
        let matrices = all
            .remove(R1CS_PREDICATE_LABEL)
            .ok_or(ark_relations::gr1cs::SynthesisError::Unsatisfiable)?;
        Ok(CircuitShape {
            matrices,
            num_instance_variables: cs.num_instance_variables(),
            num_constraints: cs.num_constraints(),
        })
    }
}

/// The verifying key of the circuit with a given capacity (what the contract's verifier embeds).
#[derive(Clone, Debug)]
pub struct VerifyingKey {
    capacity: usize,
    key: ark_groth16::VerifyingKey<Bn254>,
    prepared: PreparedVerifyingKey<Bn254>,
}

/// Runs the Groth16 setup for batches of `capacity` ticks with the given randomness.
///
/// See the module docs for who may run it; prefer [`setup_with_os_rng`] or [`setup_from_seed`].
pub fn setup<R: RngCore + CryptoRng>(
    capacity: usize,
    rng: &mut R,
) -> Result<(ProvingKey, VerifyingKey), CircuitError> {
    let _span = tracing::info_span!("circuit_setup", capacity).entered();
    let (pk, vk) =
        Groth16::<Bn254>::circuit_specific_setup(TickBatchCircuit::blank(capacity)?, rng)?;
    tracing::info!(capacity, "keys generated");
    Ok((
        ProvingKey::new(capacity, pk),
        VerifyingKey::new(capacity, vk),
    ))
}

/// Production setup: randomness from the operating system, dropped when this returns.
pub fn setup_with_os_rng(capacity: usize) -> Result<(ProvingKey, VerifyingKey), CircuitError> {
    setup(capacity, &mut rand::rngs::OsRng)
}

/// Deterministic setup for tests and the local stack: ChaCha20 seeded from `seed`.
///
/// Anyone who knows the seed can forge proofs against these keys; never deploy them for real money.
pub fn setup_from_seed(
    capacity: usize,
    seed: u64,
) -> Result<(ProvingKey, VerifyingKey), CircuitError> {
    setup(capacity, &mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
}

fn write_key(
    path: &Path,
    magic: &[u8; 8],
    capacity: usize,
    body: impl FnOnce(&mut BufWriter<File>) -> Result<(), ark_serialize::SerializationError>,
) -> Result<(), CircuitError> {
    let io = |source| CircuitError::Io {
        path: path.to_owned(),
        source,
    };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    w.write_all(magic).map_err(io)?;
    let capacity = u32::try_from(capacity).expect("capacities are small");
    w.write_all(&capacity.to_le_bytes()).map_err(io)?;
    body(&mut w).map_err(|e| match e {
        ark_serialize::SerializationError::IoError(source) => io(source),
        other => CircuitError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    w.flush().map_err(io)
}

fn read_key<T>(
    path: &Path,
    magic: &[u8; 8],
    kind: &'static str,
    body: impl FnOnce(&mut BufReader<File>) -> Result<T, ark_serialize::SerializationError>,
) -> Result<(usize, T), CircuitError> {
    let format = |reason: String| CircuitError::KeyFormat {
        path: path.to_owned(),
        kind,
        reason,
    };
    let mut r = BufReader::new(File::open(path).map_err(|source| CircuitError::Io {
        path: path.to_owned(),
        source,
    })?);
    let mut header = [0u8; 12];
    r.read_exact(&mut header)
        .map_err(|e| format(format!("no header ({e})")))?;
    if &header[..8] != magic {
        return Err(format(format!(
            "wrong magic, expected {}",
            String::from_utf8_lossy(magic)
        )));
    }
    let capacity = u32::from_le_bytes(header[8..].try_into().expect("4 bytes")) as usize;
    let key = body(&mut r).map_err(|e| format(e.to_string()))?;
    let mut rest = [0u8; 1];
    if r.read(&mut rest).map_err(|e| format(e.to_string()))? != 0 {
        return Err(format("trailing bytes after the key".into()));
    }
    Ok((capacity, key))
}

impl ProvingKey {
    fn new(capacity: usize, key: ark_groth16::ProvingKey<Bn254>) -> Self {
        ProvingKey {
            capacity,
            key: Arc::new(key),
            shape: Arc::default(),
        }
    }

    /// The batch capacity this key proves.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The matching verifying key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::new(self.capacity, self.key.vk.clone())
    }

    /// Proves `batch` with this key. `rng` blinds the proof (zero knowledge): use an OS or
    /// cryptographic RNG in production.
    pub fn prove<R: RngCore + CryptoRng>(
        &self,
        batch: &TickBatch,
        rng: &mut R,
    ) -> Result<ClaimProof, CircuitError> {
        let _span = tracing::info_span!(
            "prove_batch",
            order = batch.order(),
            ticks = batch.ticks().len(),
            capacity = self.capacity
        )
        .entered();
        let circuit = batch.circuit(self.capacity)?;
        let shape = match self.shape.get() {
            Some(shape) => shape,
            None => {
                let shape = CircuitShape::of(self.capacity)?;
                self.shape.get_or_init(|| shape)
            }
        };
        // Witness generation only: no matrices, no LC inlining (the matrices come from `shape`).
        let cs = ConstraintSystem::<Fr>::new_ref();
        cs.set_optimization_goal(OptimizationGoal::Constraints);
        cs.set_mode(SynthesisMode::Prove {
            construct_matrices: false,
            generate_lc_assignments: false,
        });
        {
            let _span = tracing::debug_span!("witness").entered();
            // Shows in the `print-trace` feature's timing tree next to arkworks' own steps.
            let timer = start_timer!(|| "Witness generation");
            circuit.generate_constraints(cs.clone())?;
            cs.finalize();
            end_timer!(timer);
        }
        let assignment = [cs.instance_assignment()?, cs.witness_assignment()?].concat();
        if assignment.len() != self.key.a_query.len() {
            // The key and the circuit disagree on the number of variables: not this circuit's key.
            return Err(CircuitError::KeyMismatch {
                capacity: self.capacity,
            });
        }
        let (r, s) = (Fr::rand(rng), Fr::rand(rng));
        let h = {
            let _span = tracing::debug_span!("witness_map").entered();
            LibsnarkReduction::witness_map_from_matrices::<Fr, GeneralEvaluationDomain<Fr>>(
                &shape.matrices,
                shape.num_instance_variables,
                shape.num_constraints,
                &assignment,
            )?
        };
        let proof = crate::groth16::create_proof(
            &self.key,
            r,
            s,
            &h,
            &assignment,
            shape.num_instance_variables,
        );
        Ok(ClaimProof(proof))
    }

    /// Proves `batch`, blinding the proof with the operating system's RNG (the production choice;
    /// callers need no `rand` of their own).
    pub fn prove_with_os_rng(&self, batch: &TickBatch) -> Result<ClaimProof, CircuitError> {
        self.prove(batch, &mut rand::rngs::OsRng)
    }

    /// Writes the key to `path` (see the module docs for the format).
    pub fn write(&self, path: &Path) -> Result<(), CircuitError> {
        write_key(path, PK_MAGIC, self.capacity, |w| {
            self.key.serialize_uncompressed(w)
        })
    }

    /// Reads a key written by [`ProvingKey::write`].
    pub fn read(path: &Path) -> Result<Self, CircuitError> {
        let (capacity, key) = read_key(path, PK_MAGIC, "proving key", |r| {
            ark_groth16::ProvingKey::<Bn254>::deserialize_uncompressed_unchecked(r)
        })?;
        let pk = ProvingKey::new(capacity, key);
        pk.check_shape(path)?;
        Ok(pk)
    }

    /// A key whose public-input part does not match the circuit is not ours.
    fn check_shape(&self, path: &Path) -> Result<(), CircuitError> {
        if self.key.vk.gamma_abc_g1.len() != NUM_PUBLIC_INPUTS + 1 {
            return Err(CircuitError::KeyFormat {
                path: path.to_owned(),
                kind: "proving key",
                reason: "not a tick-batch key".into(),
            });
        }
        Ok(())
    }

    /// The arkworks key, for callers that need it directly.
    pub fn inner(&self) -> &ark_groth16::ProvingKey<Bn254> {
        &self.key
    }
}

impl VerifyingKey {
    fn new(capacity: usize, key: ark_groth16::VerifyingKey<Bn254>) -> Self {
        let prepared = prepare_verifying_key(&key);
        VerifyingKey {
            capacity,
            key,
            prepared,
        }
    }

    /// The batch capacity this key verifies.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The arkworks key (what [`crate::solidity_verifier`] reads).
    pub fn inner(&self) -> &ark_groth16::VerifyingKey<Bn254> {
        &self.key
    }

    /// Verifies a proof of `inputs`; `Ok(false)` means the proof is wrong for these inputs.
    pub fn verify(&self, inputs: &ClaimInputs, proof: &ClaimProof) -> Result<bool, CircuitError> {
        self.verify_fields(&inputs.to_field_elements()?, proof)
    }

    /// Verifies against public inputs already in field form.
    pub fn verify_fields(
        &self,
        inputs: &[Fr; NUM_PUBLIC_INPUTS],
        proof: &ClaimProof,
    ) -> Result<bool, CircuitError> {
        Ok(Groth16::<Bn254>::verify_with_processed_vk(
            &self.prepared,
            inputs,
            &proof.0,
        )?)
    }

    /// Verifies exactly what the contract receives: the `uint256[6]` words and the 256 proof bytes.
    ///
    /// Like the Solidity verifier, returns `false` (not an error) for an input `>= r`, a proof of the
    /// wrong length, or proof bytes that are not valid points.
    pub fn verify_claim(&self, words: &[[u8; 32]; NUM_PUBLIC_INPUTS], proof: &[u8]) -> bool {
        let Ok(inputs) = crate::circuit::inputs_from_words(words) else {
            return false;
        };
        let Ok(proof) = ClaimProof::from_bytes(proof) else {
            return false;
        };
        self.verify_fields(&inputs, &proof).unwrap_or(false)
    }

    /// The Solidity verifier contract for this key ([`crate::solidity_verifier`]).
    pub fn solidity(&self) -> String {
        crate::solidity::solidity_verifier(&self.key, self.capacity)
    }

    /// Writes the key to `path` (see the module docs for the format).
    pub fn write(&self, path: &Path) -> Result<(), CircuitError> {
        write_key(path, VK_MAGIC, self.capacity, |w| {
            self.key.serialize_compressed(w)
        })
    }

    /// Reads and validates a key written by [`VerifyingKey::write`].
    pub fn read(path: &Path) -> Result<Self, CircuitError> {
        let (capacity, key) = read_key(path, VK_MAGIC, "verifying key", |r| {
            ark_groth16::VerifyingKey::<Bn254>::deserialize_compressed(r)
        })?;
        if key.gamma_abc_g1.len() != NUM_PUBLIC_INPUTS + 1 {
            return Err(CircuitError::KeyFormat {
                path: path.to_owned(),
                kind: "verifying key",
                reason: "not a tick-batch key".into(),
            });
        }
        Ok(VerifyingKey::new(capacity, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit::ClaimInputs;
    use crate::poseidon::{Head, TickFields};
    use crate::proof::PROOF_LEN;
    use std::sync::OnceLock;

    const CAPACITY: usize = 2;
    const ORDER: u64 = 9;

    fn key() -> crate::key::OrderKey {
        crate::key::OrderKey::new(31337, [3; 20], ORDER)
    }

    /// One setup shared by the tests of this module: setup is the slow part in debug builds.
    fn keys() -> &'static (ProvingKey, VerifyingKey) {
        static KEYS: OnceLock<(ProvingKey, VerifyingKey)> = OnceLock::new();
        KEYS.get_or_init(|| setup_from_seed(CAPACITY, 7).expect("setup"))
    }

    fn rng() -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(99)
    }

    fn tick(seq: u64) -> TickFields {
        TickFields {
            order: ORDER,
            seq,
            seconds: 15,
            bytes_in: 4096 * seq,
            bytes_out: 77,
        }
    }

    fn proved(batch: &TickBatch) -> (ClaimInputs, [u8; PROOF_LEN]) {
        let proof = keys().0.prove(batch, &mut rng()).expect("prove");
        (batch.inputs(), proof.to_bytes())
    }

    #[test]
    fn proofs_of_genesis_and_later_batches_verify() {
        let (pk, vk) = keys();
        let first = TickBatch::new(key(), Head::GENESIS, None, vec![tick(0), tick(1)]).unwrap();
        let proof = pk.prove(&first, &mut rng()).unwrap();
        assert!(vk.verify(&first.inputs(), &proof).unwrap());
        let second = TickBatch::new(
            key(),
            first.next(),
            Some(first.next_anchor()),
            vec![tick(2)],
        )
        .unwrap();
        let proof = pk.prove(&second, &mut rng()).unwrap();
        assert!(vk.verify(&second.inputs(), &proof).unwrap());
        assert!(
            !vk.verify(&first.inputs(), &proof).unwrap(),
            "a proof is bound to its own inputs"
        );
    }

    #[test]
    fn proof_bytes_round_trip_and_verify_as_the_contract_would() {
        let batch = TickBatch::new(key(), Head::GENESIS, None, vec![tick(0)]).unwrap();
        let (inputs, bytes) = proved(&batch);
        let decoded = ClaimProof::from_bytes(&bytes).unwrap();
        assert_eq!(decoded.to_bytes(), bytes);
        assert!(keys().1.verify_claim(&inputs.to_words(), &bytes));
        assert!(!keys().1.verify_claim(&inputs.to_words(), &bytes[..255]));
        assert!(matches!(
            ClaimProof::from_bytes(&bytes[..255]),
            Err(CircuitError::ProofLength(255))
        ));
    }

    #[test]
    fn every_flipped_bit_of_a_proof_is_rejected() {
        let batch = TickBatch::new(key(), Head::GENESIS, None, vec![tick(0), tick(1)]).unwrap();
        let (inputs, bytes) = proved(&batch);
        let words = inputs.to_words();
        for bit in 0..PROOF_LEN * 8 {
            let mut flipped = bytes;
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !keys().1.verify_claim(&words, &flipped),
                "bit {bit} of the proof"
            );
        }
    }

    #[test]
    fn flipped_bits_of_public_inputs_are_rejected() {
        let batch = TickBatch::new(key(), Head::GENESIS, None, vec![tick(0), tick(1)]).unwrap();
        let (inputs, bytes) = proved(&batch);
        let words = inputs.to_words();
        assert!(keys().1.verify_claim(&words, &bytes));
        // Low bits (which keep the input in the field) on every word, and a spread of the rest.
        for index in 0..words.len() {
            for bit in (0..256).filter(|b| *b < 8 || b % 23 == 0 || *b >= 250) {
                let mut flipped = words;
                flipped[index][31 - bit / 8] ^= 1 << (bit % 8);
                assert!(
                    !keys().1.verify_claim(&flipped, &bytes),
                    "bit {bit} of input {index}"
                );
            }
        }
    }

    #[test]
    fn batch_larger_than_the_key_is_refused() {
        let ticks = (0..3).map(tick).collect();
        let batch = TickBatch::new(key(), Head::GENESIS, None, ticks).unwrap();
        assert!(matches!(
            keys().0.prove(&batch, &mut rng()),
            Err(CircuitError::BatchTooLarge {
                ticks: 3,
                capacity: 2
            })
        ));
    }

    #[test]
    fn keys_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let (pk_path, vk_path) = (dir.path().join("pk"), dir.path().join("vk"));
        keys().0.write(&pk_path).unwrap();
        keys().1.write(&vk_path).unwrap();
        let pk = ProvingKey::read(&pk_path).unwrap();
        let vk = VerifyingKey::read(&vk_path).unwrap();
        assert_eq!((pk.capacity(), vk.capacity()), (CAPACITY, CAPACITY));
        assert_eq!(vk.inner(), keys().1.inner());
        let batch = TickBatch::new(key(), Head::GENESIS, None, vec![tick(0)]).unwrap();
        let proof = pk.prove_with_os_rng(&batch).unwrap();
        assert!(vk.verify(&batch.inputs(), &proof).unwrap());
        assert!(keys().1.verify(&batch.inputs(), &proof).unwrap());
    }

    #[test]
    fn wrong_or_damaged_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vk_path = dir.path().join("vk");
        keys().1.write(&vk_path).unwrap();
        assert!(matches!(
            ProvingKey::read(&vk_path),
            Err(CircuitError::KeyFormat {
                kind: "proving key",
                ..
            })
        ));
        let mut bytes = std::fs::read(&vk_path).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&vk_path, &bytes).unwrap();
        assert!(matches!(
            VerifyingKey::read(&vk_path),
            Err(CircuitError::KeyFormat { .. })
        ));
        assert!(matches!(
            VerifyingKey::read(&dir.path().join("missing")),
            Err(CircuitError::Io { .. })
        ));
    }

    #[test]
    fn setup_from_seed_is_deterministic() {
        let (_, again) = setup_from_seed(CAPACITY, 7).unwrap();
        assert_eq!(again.inner(), keys().1.inner());
        let (_, other) = setup_from_seed(CAPACITY, 8).unwrap();
        assert_ne!(other.inner(), keys().1.inner());
    }
}
