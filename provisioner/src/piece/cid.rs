//! The v1 piece CID: CIDv1, codec fil-commitment-unsealed, multihash sha2-256-trunc254-padded
//! over the 32-byte root; written in base32 as `baga6ea4seaq…`.

use std::fmt;
use std::str::FromStr;

use cid::Cid;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::PieceError;

/// Multicodec `fil-commitment-unsealed`.
const FIL_COMMITMENT_UNSEALED: u64 = 0xf101;
/// Multihash `sha2-256-trunc254-padded`.
const SHA2_256_TRUNC254_PADDED: u64 = 0x1012;

/// A piece's identity on Filecoin: its commitment, as a v1 piece CID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PieceCid {
    root: [u8; 32],
}

impl PieceCid {
    /// The CID of a piece tree root.
    pub fn from_root(root: [u8; 32]) -> Self {
        Self { root }
    }

    /// The piece tree root.
    pub fn root(&self) -> [u8; 32] {
        self.root
    }

    fn cid(&self) -> Cid {
        let hash = cid::multihash::Multihash::<64>::wrap(SHA2_256_TRUNC254_PADDED, &self.root)
            .expect("32 bytes fit a 64-byte multihash");
        Cid::new_v1(FIL_COMMITMENT_UNSEALED, hash)
    }
}

impl fmt::Display for PieceCid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A CIDv1's default text form is multibase base32, lower case.
        write!(f, "{}", self.cid())
    }
}

impl FromStr for PieceCid {
    type Err = PieceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| PieceError::BadCid {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let cid = Cid::from_str(text.trim()).map_err(|e| bad(&e.to_string()))?;
        if cid.version() != cid::Version::V1 {
            return Err(bad("it is a CIDv0"));
        }
        if cid.codec() != FIL_COMMITMENT_UNSEALED {
            return Err(bad(&format!(
                "its codec is {:#x}, not fil-commitment-unsealed (0xf101); a CAR's root CID \
                 is not its piece CID: compute it with `shale sp commp FILE`",
                cid.codec()
            )));
        }
        let hash = cid.hash();
        if hash.code() != SHA2_256_TRUNC254_PADDED {
            return Err(bad(&format!(
                "its hash is {:#x}, not sha2-256-trunc254-padded (0x1012)",
                hash.code()
            )));
        }
        let root: [u8; 32] = hash
            .digest()
            .try_into()
            .map_err(|_| bad("its digest is not 32 bytes"))?;
        if root[31] & 0xc0 != 0 {
            return Err(bad("its root is not a 254-bit tree node"));
        }
        Ok(Self { root })
    }
}

impl Serialize for PieceCid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PieceCid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The piece CID of 127 zero bytes, as Lotus and `data-segment` write it.
    const ZERO_127: &str = "baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy";

    #[test]
    fn the_smallest_zero_piece_has_the_known_cid() {
        let cid = super::super::tree::zero(2);
        assert_eq!(PieceCid::from_root(cid).to_string(), ZERO_127);
        assert_eq!(ZERO_127.parse::<PieceCid>().unwrap().root(), cid);
    }

    #[test]
    fn other_cids_are_refused_with_the_reason() {
        let raw = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
        let err = raw.parse::<PieceCid>().unwrap_err().to_string();
        assert!(err.contains("not fil-commitment-unsealed"), "{err}");
        let err = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
            .parse::<PieceCid>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("CIDv0"), "{err}");
        assert!("baga6ea4seaqdemo".parse::<PieceCid>().is_err());
        assert!("".parse::<PieceCid>().is_err());
    }
}
