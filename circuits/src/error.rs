//! The errors of this crate, one enum with variants a caller can act on.

use std::path::PathBuf;

use ark_relations::gr1cs::SynthesisError;

/// Why a batch could not be built, proved, verified, or a key read or written.
#[derive(Debug, thiserror::Error)]
pub enum CircuitError {
    /// A batch must claim at least one tick.
    #[error("the batch has no ticks: there is nothing to claim")]
    EmptyBatch,
    /// More ticks than the key's capacity; split the batch or use a larger key.
    #[error("a batch of {ticks} ticks does not fit a circuit of capacity {capacity}; split it or use a larger key")]
    BatchTooLarge {
        /// Ticks in the batch.
        ticks: usize,
        /// Slots in the circuit.
        capacity: usize,
    },
    /// Capacity 0 makes no circuit.
    #[error("a circuit needs a capacity of at least one tick")]
    ZeroCapacity,
    /// A tick of another order was put into this order's batch.
    #[error("tick {seq} belongs to order {found}, not to order {expected}")]
    ForeignTick {
        /// The batch's order.
        expected: u64,
        /// The tick's order.
        found: u64,
        /// The tick's sequence number.
        seq: u64,
    },
    /// The ticks do not follow each other (a tick is missing or repeated).
    #[error("ticks must be consecutive: expected seq {expected}, found {found}")]
    NotConsecutive {
        /// The sequence number the chain needs next.
        expected: u64,
        /// The sequence number found.
        found: u64,
    },
    /// Sequence numbers this close to `u64::MAX` cannot be proved (see the circuit docs).
    #[error(
        "sequence numbers from {first} do not fit a circuit of capacity {capacity} below 2^64"
    )]
    SeqOutOfRange {
        /// First sequence number of the batch.
        first: u64,
        /// Slots in the circuit.
        capacity: usize,
    },
    /// A batch after the order's first claim needs the last claimed tick and the head before it.
    #[error("head {prev} is not genesis, so the batch needs its anchor: the last claimed tick and the head before it")]
    MissingAnchor {
        /// The head the contract last paid for.
        prev: crate::Head,
    },
    /// A batch starting at genesis has no previous tick.
    #[error("the batch starts at the genesis head, so it cannot have an anchor tick")]
    UnexpectedAnchor,
    /// The anchor does not hash to the head the batch starts from.
    #[error("the anchor tick {seq} does not lead to head {prev}: it is not the last claimed tick")]
    AnchorMismatch {
        /// The anchor's sequence number.
        seq: u64,
        /// The head the batch starts from.
        prev: crate::Head,
    },
    /// The key was made for another capacity than the one asked for.
    #[error("the key is for batches of {key} ticks, not {wanted}")]
    CapacityMismatch {
        /// Capacity the key was made for.
        key: usize,
        /// Capacity asked for.
        wanted: usize,
    },
    /// The proving key does not fit the circuit it claims to be for (damaged, or another circuit's).
    #[error("the proving key does not belong to the tick-batch circuit of capacity {capacity}; regenerate or re-download it")]
    KeyMismatch {
        /// The capacity the key claims.
        capacity: usize,
    },
    /// A proof must be 256 bytes in the contract's layout.
    #[error("a claim proof is 256 bytes, got {0}")]
    ProofLength(usize),
    /// A proof's bytes are not points of the right groups.
    #[error("the proof's {0} is not a valid curve point")]
    ProofPoint(&'static str),
    /// A public input is not a canonical field element.
    #[error("public input {index} is not below the BN254 scalar field modulus")]
    InputOutOfField {
        /// Position in `[orderId, prevHead, nextHead, seconds, bytesIn, bytesOut]`.
        index: usize,
    },
    /// The constraint system refused the assignment or the keys (a bug, or a wrong key).
    #[error("constraint synthesis failed: {0}")]
    Synthesis(#[from] SynthesisError),
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key file is not a Shale key, is truncated, or holds invalid points.
    #[error("key file {path} is not a valid Shale {kind}: {reason}")]
    KeyFormat {
        /// The file.
        path: PathBuf,
        /// "proving key" or "verifying key".
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
}
