//! The order key: what binds an order's tick chain, and every proof over it, to one deployment.
//!
//! An order id alone names an order on one marketplace; the same id exists on every other
//! marketplace contract and on every other chain. The tick chain therefore hashes, in place of
//! the order id, the *order key*
//!
//! ```text
//! K = uint256(keccak256(abi.encode(uint256 chainId, address marketplace, uint256 orderId))) mod r
//! ```
//!
//! (`r` the BN254 scalar field order), which the Marketplace contract recomputes from
//! `block.chainid`, its own address and the order id for public input 0 of every claim. A head,
//! a proof or a tick log made for one deployment is thus worthless on any other, and an
//! acknowledgment (whose EIP-712 domain already names chain and contract) signs heads that exist
//! on one deployment only.

use std::fmt;

use alloy_primitives::keccak256;
use ark_bn254::Fr;
use ark_ff::PrimeField;

use crate::poseidon::Head;

/// One marketplace deployment: the chain it runs on and the contract's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Deployment {
    /// The EIP-155 chain id (`block.chainid`).
    pub chain_id: u64,
    /// The Marketplace contract's address.
    pub marketplace: [u8; 20],
}

impl Deployment {
    /// The deployment of `marketplace` on chain `chain_id`.
    pub const fn new(chain_id: u64, marketplace: [u8; 20]) -> Self {
        Deployment {
            chain_id,
            marketplace,
        }
    }

    /// The key of order `order` on this deployment.
    pub fn order_key(&self, order: u64) -> OrderKey {
        OrderKey::new(self.chain_id, self.marketplace, order)
    }
}

impl fmt::Display for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "marketplace 0x{} on chain {}",
            hex::encode(self.marketplace),
            self.chain_id
        )
    }
}

/// An order of one deployment and its key `K`, the field element its tick chain hashes.
///
/// The key is computed once, at construction (one keccak), so hashing a tick costs nothing more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrderKey {
    deployment: Deployment,
    order: u64,
    key: Fr,
}

impl OrderKey {
    /// The key of order `order` of the marketplace at `marketplace` on chain `chain_id`.
    pub fn new(chain_id: u64, marketplace: [u8; 20], order: u64) -> Self {
        // abi.encode of (uint256, address, uint256): three 32-byte big-endian words, the address
        // left-padded with zeros.
        let mut encoded = [0u8; 96];
        encoded[24..32].copy_from_slice(&chain_id.to_be_bytes());
        encoded[44..64].copy_from_slice(&marketplace);
        encoded[88..96].copy_from_slice(&order.to_be_bytes());
        let key = Fr::from_be_bytes_mod_order(keccak256(encoded).as_slice());
        OrderKey {
            deployment: Deployment::new(chain_id, marketplace),
            order,
            key,
        }
    }

    /// The on-chain order id.
    pub fn order(&self) -> u64 {
        self.order
    }

    /// The deployment the order belongs to.
    pub fn deployment(&self) -> Deployment {
        self.deployment
    }

    /// `K` as a field element: public input 0 of a claim, the first element of every tick hash.
    pub fn to_field(&self) -> Fr {
        self.key
    }

    /// `K` as the contract's 32-byte big-endian word (always below `r`).
    pub fn to_word(&self) -> [u8; 32] {
        Head::from_field(self.key).0
    }
}

impl fmt::Display for OrderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "order {} of {}", self.order, self.deployment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first contract anvil's first account deploys (nonce 0).
    const ANVIL_FIRST_CONTRACT: [u8; 20] = [
        0x5f, 0xbd, 0xb2, 0x31, 0x56, 0x78, 0xaf, 0xec, 0xb3, 0x67, 0xf0, 0x32, 0xd9, 0x3f, 0x64,
        0x2f, 0x64, 0x18, 0x0a, 0xa3,
    ];

    /// Pins the encoding. `contracts/test/Claims.t.sol`'s `test_orderKeyMatchesTheRustVector`
    /// checks the contract's `orderKey` against the same constant, so the two sides agree.
    #[test]
    fn known_answer_vector_matches_the_contract() {
        let key = OrderKey::new(31337, ANVIL_FIRST_CONTRACT, 5);
        assert_eq!(
            hex::encode(key.to_word()),
            "095558abd95c7c26e1474e9bcbcf567febc7f4a4b8af60b16649357636b772f4"
        );
    }

    #[test]
    fn key_depends_on_chain_marketplace_and_order() {
        let base = OrderKey::new(31337, ANVIL_FIRST_CONTRACT, 5);
        let mut other_address = ANVIL_FIRST_CONTRACT;
        other_address[19] ^= 1;
        for other in [
            OrderKey::new(31338, ANVIL_FIRST_CONTRACT, 5),
            OrderKey::new(31337, other_address, 5),
            OrderKey::new(31337, ANVIL_FIRST_CONTRACT, 6),
        ] {
            assert_ne!(other.to_field(), base.to_field(), "{other}");
        }
        assert_eq!(
            Deployment::new(31337, ANVIL_FIRST_CONTRACT).order_key(5),
            base
        );
        assert_eq!(base.order(), 5);
    }

    #[test]
    fn word_is_the_reduced_keccak() {
        // Many keccak outputs are >= r; the word is always a canonical field element.
        for order in 0..64 {
            let key = OrderKey::new(1, [7; 20], order);
            assert_eq!(Head(key.to_word()).to_field().unwrap(), key.to_field());
        }
    }
}
