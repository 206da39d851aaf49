//! The piece tree: Fr32 padding of the payload and the binary SHA-256 tree over its 32-byte
//! nodes, truncated to 254 bits so every node is a BLS12-381 scalar.

use std::sync::OnceLock;

use sha2::digest::generic_array::GenericArray;

/// One node of the tree: 32 bytes whose top two bits are zero.
pub(crate) type Node = [u8; 32];

/// Payload bytes that Fr32 padding spreads over four nodes (4 × 254 bits).
pub(crate) const FR32_IN: usize = 127;
/// What those bytes become: four nodes.
pub(crate) const FR32_OUT: usize = 128;

/// SHA-256's initial state.
const IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The second block of SHA-256 over exactly 64 bytes: the 0x80 marker and the length (512
/// bits). Every node hashes two children, so this block never changes.
const LENGTH_BLOCK: [u8; 64] = {
    let mut b = [0u8; 64];
    b[0] = 0x80;
    b[62] = 0x02;
    b
};

/// The parent of two adjacent nodes given as their 64 bytes.
#[inline]
fn parent_of(children: &[u8]) -> Node {
    let mut state = IV;
    let blocks = [
        *GenericArray::from_slice(children),
        *GenericArray::from_slice(&LENGTH_BLOCK),
    ];
    // The bare compression function: no hasher state or buffering per node, which is most of
    // the cost at two compressions per node.
    sha2::compress256(&mut state, &blocks);
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out[31] &= 0x3f;
    out
}

/// The parent of `left` and `right`.
pub(crate) fn parent(left: &Node, right: &Node) -> Node {
    let mut children = [0u8; 64];
    children[..32].copy_from_slice(left);
    children[32..].copy_from_slice(right);
    parent_of(&children)
}

/// The root of a subtree of height `level` over nothing but zero payload.
pub(crate) fn zero(level: u32) -> Node {
    static ZEROS: OnceLock<Vec<Node>> = OnceLock::new();
    let zeros = ZEROS.get_or_init(|| {
        let mut z = vec![[0u8; 32]];
        for i in 0..63 {
            let next = parent(&z[i], &z[i]);
            z.push(next);
        }
        z
    });
    zeros[level as usize]
}

/// Fr32 padding of one 127-byte block: after every 254 bits of payload, two zero bits.
#[inline]
pub(crate) fn fr32_pad(input: &[u8], out: &mut [u8]) {
    debug_assert_eq!(input.len(), FR32_IN);
    debug_assert_eq!(out.len(), FR32_OUT);
    // Node k starts at payload bit 254·k, i.e. byte 31·k + (6·k)/8 at a shift of 6·k mod 8.
    out[..32].copy_from_slice(&input[..32]);
    out[31] &= 0x3f;
    for i in 0..32 {
        out[32 + i] = (input[31 + i] >> 6) | (input[32 + i] << 2);
    }
    out[63] &= 0x3f;
    for i in 0..32 {
        out[64 + i] = (input[63 + i] >> 4) | (input[64 + i] << 4);
    }
    out[95] &= 0x3f;
    for i in 0..31 {
        out[96 + i] = (input[95 + i] >> 2) | (input[96 + i] << 6);
    }
    out[127] = input[126] >> 2;
}

/// Folds the first `count` nodes of `nodes` (at level 0) into the root of a subtree of height
/// `height`, padding on the right with zero subtrees. `nodes` is overwritten.
pub(crate) fn subtree_root(nodes: &mut [Node], mut count: usize, height: u32) -> Node {
    debug_assert!(count >= 1 && count <= nodes.len() && (count as u64) <= 1u64 << height);
    for level in 0..height {
        let pairs = count / 2;
        for i in 0..pairs {
            let children = nodes[2 * i..2 * i + 2].as_flattened();
            nodes[i] = parent_of(children);
        }
        if count % 2 == 1 {
            nodes[pairs] = parent(&nodes[count - 1], &zero(level));
            count = pairs + 1;
        } else {
            count = pairs;
        }
    }
    nodes[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn a_parent_is_truncated_sha256_of_its_children() {
        let (l, r) = ([7u8; 32], [9u8; 32]);
        let mut want: Node = Sha256::new()
            .chain_update(l)
            .chain_update(r)
            .finalize()
            .into();
        want[31] &= 0x3f;
        assert_eq!(parent(&l, &r), want);
    }

    #[test]
    fn fr32_inserts_two_zero_bits_after_every_254() {
        // All ones in: every node is 254 ones then two zeros, i.e. 0xff… with 0x3f last.
        let mut out = [0u8; 128];
        fr32_pad(&[0xff; 127], &mut out);
        for node in out.chunks_exact(32) {
            assert!(node[..31].iter().all(|&b| b == 0xff), "{node:?}");
            assert_eq!(node[31], 0x3f);
        }
        // One set bit at payload bit 254 lands at the start of the second node.
        let mut input = [0u8; 127];
        input[31] = 0b0100_0000;
        fr32_pad(&input, &mut out);
        assert_eq!(out[32], 1);
        assert_eq!(out.iter().map(|b| b.count_ones()).sum::<u32>(), 1);
        // And payload bit 1015, the last, is bit 253 of the fourth node.
        let mut input = [0u8; 127];
        input[126] = 0x80;
        fr32_pad(&input, &mut out);
        assert_eq!(out[127], 0x20);
        assert_eq!(out.iter().map(|b| b.count_ones()).sum::<u32>(), 1);
    }

    #[test]
    fn zero_subtrees_match_their_full_trees() {
        let mut nodes = vec![[0u8; 32]; 16];
        assert_eq!(subtree_root(&mut nodes, 16, 4), zero(4));
        let mut one = vec![[0u8; 32]; 1];
        assert_eq!(subtree_root(&mut one, 1, 4), zero(4));
    }
}
