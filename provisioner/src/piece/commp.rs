//! CommP, streaming: the payload is zero-padded to the piece's unpadded size, Fr32-padded and
//! hashed as one binary tree, without ever holding more than one chunk of it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use super::tree::{self, Node, FR32_IN, FR32_OUT};
use super::{PieceCid, PieceError};

/// Fr32 blocks per chunk: a chunk is 1 MiB of tree leaves, a subtree of height 15.
const CHUNK_BLOCKS: usize = 1 << 13;
/// Payload bytes per chunk.
const CHUNK_IN: usize = CHUNK_BLOCKS * FR32_IN;
/// Leaves per chunk.
const CHUNK_LEAVES: usize = CHUNK_BLOCKS * FR32_OUT / 32;
/// The height of a chunk's subtree.
const CHUNK_HEIGHT: u32 = CHUNK_LEAVES.trailing_zeros();

/// The smallest payload with a piece: Lotus and `go-fil-commp-hashhash` refuse fewer bytes.
pub const MIN_PAYLOAD: u64 = 65;
/// The largest padded piece: one 64 GiB sector.
pub const MAX_PIECE: u64 = 64 << 30;

/// A piece's commitment and its sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommP {
    /// The root of the piece tree.
    pub root: [u8; 32],
    /// The padded piece size (a power of two, at least 128): what a deal is made for.
    pub piece_size: u64,
    /// The payload bytes the piece was computed from.
    pub payload_size: u64,
}

impl CommP {
    /// The v1 piece CID of this commitment.
    pub fn cid(&self) -> PieceCid {
        PieceCid::from_root(self.root)
    }
}

/// Computes CommP over bytes written to it in any pieces.
pub struct PieceHasher {
    /// Payload of the chunk being filled.
    pending: Vec<u8>,
    /// Leaves of a chunk, reused for each.
    leaves: Vec<Node>,
    /// Roots of full chunks, as a binary counter: `done[l]` covers `2^l` chunks.
    done: Vec<Option<Node>>,
    payload: u64,
}

impl Default for PieceHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl PieceHasher {
    /// An empty hasher.
    pub fn new() -> Self {
        Self {
            pending: Vec::with_capacity(CHUNK_IN),
            leaves: vec![[0u8; 32]; CHUNK_LEAVES],
            done: Vec::new(),
            payload: 0,
        }
    }

    /// Adds payload bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.payload += data.len() as u64;
        while !data.is_empty() {
            let take = (CHUNK_IN - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == CHUNK_IN {
                let root = self.chunk_root(CHUNK_HEIGHT);
                self.pending.clear();
                self.push(root, 0);
            }
        }
    }

    /// The commitment of everything added.
    pub fn finish(mut self) -> Result<CommP, PieceError> {
        let payload = self.payload;
        if payload < MIN_PAYLOAD {
            return Err(PieceError::TooSmall {
                size: payload,
                min: MIN_PAYLOAD,
            });
        }
        let leaves = payload.div_ceil(FR32_IN as u64) * (FR32_OUT as u64 / 32);
        let piece_leaves = leaves.next_power_of_two();
        let piece_size = piece_leaves * 32;
        if piece_size > MAX_PIECE {
            return Err(PieceError::TooLarge {
                size: payload,
                max: MAX_PIECE / FR32_OUT as u64 * FR32_IN as u64,
            });
        }
        let height = piece_leaves.trailing_zeros();
        let root = if self.done.is_empty() {
            // The whole piece fits in one chunk.
            self.chunk_root(height)
        } else {
            if !self.pending.is_empty() {
                let root = self.chunk_root(CHUNK_HEIGHT);
                self.push(root, 0);
            }
            self.collapse(height - CHUNK_HEIGHT)
        };
        Ok(CommP {
            root,
            piece_size,
            payload_size: payload,
        })
    }

    /// The root at `height` of the pending payload, zero-padded.
    fn chunk_root(&mut self, height: u32) -> Node {
        let blocks = self.pending.len().div_ceil(FR32_IN);
        self.pending.resize(blocks * FR32_IN, 0);
        let out = self.leaves[..blocks * 4].as_flattened_mut();
        for (input, output) in self
            .pending
            .chunks_exact(FR32_IN)
            .zip(out.chunks_exact_mut(FR32_OUT))
        {
            tree::fr32_pad(input, output);
        }
        tree::subtree_root(&mut self.leaves, blocks * 4, height)
    }

    /// Adds a full chunk's root, carrying like a binary counter.
    fn push(&mut self, mut node: Node, mut level: usize) {
        loop {
            if level == self.done.len() {
                self.done.push(None);
            }
            match self.done[level].take() {
                Some(left) => {
                    node = tree::parent(&left, &node);
                    level += 1;
                }
                None => {
                    self.done[level] = Some(node);
                    return;
                }
            }
        }
    }

    /// Folds the chunk roots into the piece root `top` levels above them, padding on the right
    /// with zero subtrees.
    fn collapse(&mut self, top: u32) -> Node {
        self.done.resize(top as usize + 1, None);
        let mut carry: Option<Node> = None;
        for level in 0..top as usize {
            let zero = tree::zero(level as u32 + CHUNK_HEIGHT);
            carry = match (self.done[level].take(), carry) {
                (Some(left), Some(right)) => Some(tree::parent(&left, &right)),
                (Some(left), None) => Some(tree::parent(&left, &zero)),
                (None, Some(left)) => Some(tree::parent(&left, &zero)),
                (None, None) => None,
            };
        }
        match (self.done[top as usize], carry) {
            (Some(root), None) | (None, Some(root)) => root,
            // The piece height is the smallest that holds every chunk, so exactly one of the
            // two is there.
            _ => unreachable!("chunk roots do not fold into one piece root"),
        }
    }
}

impl Write for PieceHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The CommP of a file's bytes, read once from start to end.
pub fn commp_file(path: &Path) -> Result<CommP, PieceError> {
    let read = |source| PieceError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read)?;
    let mut hasher = PieceHasher::new();
    let mut buf = vec![0u8; CHUNK_IN];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read(e)),
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commp(data: &[u8]) -> CommP {
        let mut h = PieceHasher::new();
        h.update(data);
        h.finish().unwrap()
    }

    #[test]
    fn zero_payloads_commit_to_zero_subtrees() {
        // 127 zero bytes are the smallest zero piece (the first zero commitment).
        let c = commp(&[0; 127]);
        assert_eq!(c.root, tree::zero(2));
        assert_eq!((c.piece_size, c.payload_size), (128, 127));
        // One byte more needs the next piece size.
        let c = commp(&[0; 128]);
        assert_eq!((c.root, c.piece_size), (tree::zero(3), 256));
        // Across chunks: zero payload of 2.5 chunks is the zero tree of a 4-chunk piece.
        let c = commp(&vec![0; CHUNK_IN * 5 / 2]);
        assert_eq!(c.root, tree::zero(CHUNK_HEIGHT + 2));
        assert_eq!(c.piece_size, 4 << 20);
    }

    #[test]
    fn how_bytes_are_written_does_not_change_the_piece() {
        let data: Vec<u8> = (0..CHUNK_IN * 3 + 1000)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let whole = commp(&data);
        let mut h = PieceHasher::new();
        for part in data.chunks(9_999) {
            h.write_all(part).unwrap();
        }
        assert_eq!(h.finish().unwrap(), whole);
        assert_eq!(whole.piece_size, 4 << 20);
    }

    #[test]
    fn too_small_and_empty_payloads_are_refused() {
        let h = PieceHasher::new();
        assert!(matches!(
            h.finish(),
            Err(PieceError::TooSmall { size: 0, .. })
        ));
        let mut h = PieceHasher::new();
        h.update(&[1; 64]);
        assert!(matches!(
            h.finish(),
            Err(PieceError::TooSmall { size: 64, .. })
        ));
        assert_eq!(commp(&[1; 65]).piece_size, 128);
    }
}
