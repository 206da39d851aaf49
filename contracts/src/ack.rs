//! The client's acknowledgment of an order's usage: EIP-712 typed data that the marketplace
//! verifies, signed by the order's acknowledgment key.
//!
//! The domain binds the chain and the marketplace's address and the struct binds the order, so
//! an acknowledgment is good for one order of one deployment only; its totals are cumulative,
//! so the contract keeps the largest and refuses older ones. The key can only acknowledge
//! usage: it never controls funds.

use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol_types::{eip712_domain, Eip712Domain, SolStruct};
use serde::{Deserialize, Serialize};

alloy::sol! {
    /// The acknowledged cumulative usage of one order up to tick-chain head `head`.
    #[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
    struct Acknowledgment {
        uint256 orderId;
        bytes32 head;
        uint64 seconds;
        uint64 bytesIn;
        uint64 bytesOut;
    }
}

/// The marketplace's EIP-712 domain on chain `chain_id` at `marketplace`.
pub fn domain(chain_id: u64, marketplace: Address) -> Eip712Domain {
    eip712_domain! {
        name: "Shale Marketplace",
        version: "1",
        chain_id: chain_id,
        verifying_contract: marketplace,
    }
}

impl Acknowledgment {
    /// The acknowledgment of `order`'s usage up to `head`.
    pub fn new(order: u64, head: B256, seconds: u64, bytes_in: u64, bytes_out: u64) -> Self {
        Acknowledgment {
            orderId: U256::from(order),
            head,
            seconds,
            bytesIn: bytes_in,
            bytesOut: bytes_out,
        }
    }

    /// The digest the key signs and the contract recovers from.
    pub fn digest(&self, chain_id: u64, marketplace: Address) -> B256 {
        self.eip712_signing_hash(&domain(chain_id, marketplace))
    }

    /// Signs with the order's acknowledgment key: 65 bytes `r ‖ s ‖ v` (v = 27 or 28).
    pub fn sign(
        &self,
        key: &PrivateKeySigner,
        chain_id: u64,
        marketplace: Address,
    ) -> Result<[u8; 65], alloy::signers::Error> {
        let sig = key.sign_hash_sync(&self.digest(chain_id, marketplace))?;
        Ok(sig.as_bytes())
    }

    /// The address that signed `signature` over this acknowledgment, if it is a signature.
    pub fn signer(&self, signature: &[u8], chain_id: u64, marketplace: Address) -> Option<Address> {
        let sig = alloy::primitives::Signature::try_from(signature).ok()?;
        sig.recover_address_from_prehash(&self.digest(chain_id, marketplace))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_recovers_its_key_and_nothing_else_verifies() {
        let key = PrivateKeySigner::random();
        let market: Address = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
            .parse()
            .unwrap();
        let ack = Acknowledgment::new(7, B256::repeat_byte(1), 60, 1000, 2000);
        let sig = ack.sign(&key, 31337, market).unwrap();
        assert_eq!(ack.signer(&sig, 31337, market), Some(key.address()));
        // Another chain, marketplace, order or total: another digest, another "signer".
        assert_ne!(ack.signer(&sig, 314159, market), Some(key.address()));
        assert_ne!(ack.signer(&sig, 31337, Address::ZERO), Some(key.address()));
        let other = Acknowledgment::new(8, B256::repeat_byte(1), 60, 1000, 2000);
        assert_ne!(other.signer(&sig, 31337, market), Some(key.address()));
        let more = Acknowledgment::new(7, B256::repeat_byte(1), 60, 1000, 2001);
        assert_ne!(more.signer(&sig, 31337, market), Some(key.address()));
        assert_eq!(ack.signer(&sig[..64], 31337, market), None);
    }
}
