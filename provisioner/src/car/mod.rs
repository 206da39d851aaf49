//! Content-addressed archives (CARv1) of UnixFS trees: how a directory becomes the payload of a
//! Filecoin deal, and how that payload becomes a directory again inside a container.
//!
//! [`pack_dir`] writes a directory as UnixFS (dag-pb directories, files cut into 1 MiB raw
//! leaves under a balanced tree of up to 1024 links, CIDv1, sha2-256) in a CARv1 file, the
//! settings `ipfs-car` 3.1 uses, so both tools give one tree the same root CID.
//! [`extract`] reads such a CAR back as a directory tree. The CAR is treated as hostile: every
//! block is checked against its CID, every name is checked before it becomes a path, nothing
//! is written outside the destination and a failed extract leaves nothing behind.

mod extract;
mod format;
mod pack;
mod pb;
#[cfg(test)]
mod tests;

pub use cid::Cid;
pub use extract::{extract, extract_with_limits, ExtractLimits, ExtractSummary};
pub use pack::pack_dir;

use std::path::PathBuf;

/// The largest block read or written. Bitswap and the IPFS gateways refuse larger ones, so a
/// CAR that holds one is not an IPFS DAG anyone else could fetch either.
pub const MAX_BLOCK_BYTES: usize = 2 << 20;

/// The largest identity-hash CID accepted: such a CID carries its block inline, and a large one
/// is only a way around [`MAX_BLOCK_BYTES`] and hashing. It is the digest capacity of
/// [`Cid`]: a longer CID does not parse and its section is refused as malformed.
pub const MAX_IDENTITY_BYTES: usize = 64;

/// Why a directory could not be packed or a CAR could not be extracted. CIDs are boxed to keep
/// the error small on the `Ok` path.
#[derive(Debug, thiserror::Error)]
pub enum CarError {
    /// Reading or writing a local file failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A dataset holds regular files and directories only: a symlink could point outside it
    /// and a device or socket has no bytes to pack.
    #[error("{path} is a {kind}; a packed dataset holds only regular files and directories")]
    UnsupportedFile { path: PathBuf, kind: &'static str },
    /// UnixFS names are UTF-8 strings.
    #[error("{path}: the name is not UTF-8; rename it to pack the directory")]
    NonUtf8Name { path: PathBuf },
    /// The CAR would be packed into itself.
    #[error("the output {out} is inside the packed directory {dir}; write it elsewhere")]
    OutputInsideInput { out: PathBuf, dir: PathBuf },
    /// A flat directory whose node would exceed [`MAX_BLOCK_BYTES`] (tens of thousands of
    /// entries); HAMT-sharded directories are not written.
    #[error("{path} has {entries} entries, a directory node of {bytes} bytes (at most {max}); split it into subdirectories", max = MAX_BLOCK_BYTES)]
    DirectoryTooLarge {
        path: PathBuf,
        entries: usize,
        bytes: usize,
    },
    /// The CAR's header is not a CARv1 header with one root.
    #[error("not a CARv1 file with one root: {reason}")]
    BadHeader { reason: String },
    /// A section of the CAR is malformed (at byte `offset`).
    #[error("malformed CAR section at byte {offset}: {reason}")]
    BadSection { offset: u64, reason: String },
    /// A block larger than [`MAX_BLOCK_BYTES`].
    #[error("the block at byte {offset} is {len} bytes, more than the {max} allowed", max = MAX_BLOCK_BYTES)]
    BlockTooLarge { offset: u64, len: u64 },
    /// A block's bytes do not hash to its CID: the CAR is corrupt or forged.
    #[error("block {cid}: its bytes do not match its CID")]
    HashMismatch { cid: Box<Cid> },
    /// Only sha2-256 (and small identity) multihashes are checked.
    #[error("block {cid}: multihash code {code:#x} is not supported (only sha2-256)")]
    UnsupportedHash { cid: Box<Cid>, code: u64 },
    /// The DAG links to a block the CAR does not hold.
    #[error("block {cid} is missing from the CAR")]
    MissingBlock { cid: Box<Cid> },
    /// A block of a codec that is neither dag-pb nor raw.
    #[error("block {cid}: codec {codec:#x} is not UnixFS (dag-pb or raw)")]
    UnsupportedCodec { cid: Box<Cid>, codec: u64 },
    /// A dag-pb block that is not a well-formed UnixFS node.
    #[error("block {cid} is not a well-formed UnixFS node: {reason}")]
    BadNode { cid: Box<Cid>, reason: String },
    /// A UnixFS node kind that a dataset cannot hold.
    #[error("{path}: UnixFS {kind} (block {cid}) is not supported; only files and directories")]
    UnsupportedNode {
        cid: Box<Cid>,
        path: PathBuf,
        kind: &'static str,
    },
    /// A directory entry whose name is not a single path component.
    #[error("directory {cid} has an entry named {name:?}, which is not a plain file name")]
    BadName { cid: Box<Cid>, name: String },
    /// Two entries of one directory with the same name.
    #[error("directory {cid} has two entries named {name:?}")]
    DuplicateName { cid: Box<Cid>, name: String },
    /// A file node whose declared size disagrees with the bytes under it.
    #[error("file block {cid} declares {declared} bytes but holds {actual}")]
    SizeMismatch {
        cid: Box<Cid>,
        declared: u64,
        actual: u64,
    },
    /// Deeper than any tree that [`pack_dir`] or `ipfs-car` writes.
    #[error("block {cid} is nested more than {max} levels deep")]
    TooDeep { cid: Box<Cid>, max: usize },
    /// A DAG can link one block many times, so its tree can be far larger than the CAR.
    #[error("the tree exceeds the limit of {limit} {what}")]
    LimitExceeded { what: &'static str, limit: u64 },
    /// The CAR's root is not a directory.
    #[error("the CAR's root {cid} is not a UnixFS directory")]
    RootNotDirectory { cid: Box<Cid> },
    /// Extraction never replaces an existing path.
    #[error("{path} exists already; extract into a new path")]
    DestinationExists { path: PathBuf },
}

impl CarError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CarError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
