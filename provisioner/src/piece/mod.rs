//! Filecoin pieces: the commitment (CommP) an SP's deal is made for, computed from the payload
//! bytes as Filecoin computes it, and its v1 piece CID (`baga6ea4seaq…`).
//!
//! A dataset that names a piece is served only once its local bytes hash to that piece, so a
//! client's job reads exactly the data of the SP's deal.

mod cid;
mod commp;
mod tree;

pub use cid::PieceCid;
pub use commp::{commp_file, CommP, PieceHasher};

/// Why a piece could not be computed or named.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    /// Filecoin's smallest piece commits to at least 65 payload bytes (two full nodes and one
    /// more byte), as Lotus and `go-fil-commp-hashhash` require.
    #[error("a piece payload is at least {min} bytes; this one has {size}")]
    TooSmall { size: u64, min: u64 },
    /// Larger than the largest sector Filecoin seals.
    #[error("a piece payload is at most {max} bytes (a 64 GiB sector); this one has {size}")]
    TooLarge { size: u64, max: u64 },
    /// Not a v1 piece CID (`baga6ea4seaq…`: fil-commitment-unsealed, sha2-256-trunc254-padded).
    #[error("{text:?} is not a v1 piece CID: {reason}")]
    BadCid { text: String, reason: String },
    /// Reading the payload failed.
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
