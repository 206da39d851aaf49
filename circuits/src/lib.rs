//! Shale's tick-batch proofs.
//!
//! The meter turns a session into *ticks* (`order, seq, seconds, bytes_in, bytes_out`) and chains
//! them with `h_i = Poseidon(h_{i-1}, tick_i)` ([`next_head`]). The settler proves, for a batch of
//! up to `capacity` ticks, that applying the chain from the head the contract last paid for reaches a
//! new head, and that the claimed totals are the sums over those ticks. The contract verifies the
//! Groth16 proof with a verifier generated from the verifying key by this crate.
//!
//! The modules follow that path:
//! - [`poseidon`]: the hash parameters, the native tick hash and its in-circuit twin;
//! - [`circuit`]: the statement, the checked [`TickBatch`] and the raw [`TickBatchCircuit`];

pub mod circuit;
pub mod error;
pub mod poseidon;

pub use circuit::{
    constraint_count, inputs_from_words, Anchor, ClaimInputs, TickBatch, TickBatchCircuit,
    NUM_PUBLIC_INPUTS,
};
pub use error::CircuitError;
pub use poseidon::{chain_head, next_head, Head, HeadParseError, TickFields};
