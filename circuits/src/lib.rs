//! Shale's tick-batch proofs.
//!
//! The meter turns a session into *ticks* (`order, seq, seconds, bytes_in, bytes_out`) and chains
//! them with `h_i = Poseidon(K, h_{i-1}, tick_i)` ([`next_head`]), where `K` is the order's
//! [`OrderKey`]: the order id bound to one deployment (chain id and marketplace address). The
//! settler proves, for a batch of
//! up to `capacity` ticks, that applying the chain from the head the contract last paid for reaches a
//! new head, and that the claimed totals are the sums over those ticks. The contract verifies the
//! Groth16 proof with a verifier generated from the verifying key by this crate.
//!
//! The modules follow that path:
//! - [`key`]: the order key, which makes every head and proof valid on one deployment only;
//! - [`poseidon`]: the hash parameters, the native tick hash and its in-circuit twin;
//! - [`circuit`]: the statement, the checked [`TickBatch`] and the raw [`TickBatchCircuit`];
//! - [`keys`]: setup (who may run it), proving, native verification, key files;
//! - [`proof`]: the 256-byte proof layout the contract reads;
//! - [`solidity`]: the Solidity verifier generated from a verifying key;
//! - [`solc`]: compiling it to deployable bytecode with the pinned solc-js.
//!
//! ```no_run
//! use shale_circuits::{setup_from_seed, Deployment, TickBatch, TickFields, Head};
//! # fn main() -> Result<(), shale_circuits::CircuitError> {
//! let (pk, vk) = setup_from_seed(16, 1)?;
//! let deployment = Deployment::new(31337, [0x5f; 20]);
//! let tick = TickFields { order: 7, seq: 0, seconds: 60, bytes_in: 10, bytes_out: 20 };
//! let batch = TickBatch::new(deployment.order_key(7), Head::GENESIS, None, vec![tick])?;
//! let proof = pk.prove(&batch, &mut rand::rngs::OsRng)?;
//! assert!(vk.verify(&batch.inputs(), &proof)?);
//! let calldata: [u8; 256] = proof.to_bytes();
//! # let _ = calldata; Ok(()) }
//! ```

pub mod circuit;
pub mod error;
mod groth16;
pub mod key;
pub mod keys;
mod msm;
pub mod poseidon;
pub mod proof;
pub mod solc;
pub mod solidity;

pub use circuit::{
    constraint_count, inputs_from_words, Anchor, ClaimInputs, TickBatch, TickBatchCircuit,
    NUM_PUBLIC_INPUTS,
};
pub use error::CircuitError;
pub use key::{Deployment, OrderKey};
pub use keys::{setup, setup_from_seed, setup_with_os_rng, ProvingKey, VerifyingKey};
pub use poseidon::{chain_head, next_head, Head, HeadParseError, TickFields};
pub use proof::{ClaimProof, PROOF_LEN};
pub use solidity::{contract_name, solidity_verifier};
