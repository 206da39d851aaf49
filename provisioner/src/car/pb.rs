//! The dag-pb node (<https://ipld.io/specs/codecs/dag-pb/spec/>) and the UnixFS `Data` message
//! inside it (<https://specs.ipfs.tech/unixfs/>), as prost messages.
//!
//! Decoding uses prost as is. Encoding a node is written out because dag-pb's canonical form
//! puts the links (field 2) before the data (field 1), and prost writes fields in tag order:
//! the CID of a node depends on these exact bytes.

use prost::Message;

/// A link of a dag-pb node.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct PbLink {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub hash: Option<Vec<u8>>,
    #[prost(string, optional, tag = "2")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "3")]
    pub tsize: Option<u64>,
}

/// A dag-pb node: links, then the UnixFS `Data` bytes.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct PbNode {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub data: Option<Vec<u8>>,
    #[prost(message, repeated, tag = "2")]
    pub links: Vec<PbLink>,
}

impl PbNode {
    /// The canonical dag-pb bytes: every link, then the data.
    pub(crate) fn encode_canonical(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        for link in &self.links {
            prost::encoding::message::encode(2, link, &mut buf);
        }
        if let Some(data) = &self.data {
            prost::encoding::bytes::encode(1, data, &mut buf);
        }
        buf
    }
}

/// The kinds of UnixFS node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Raw,
    Directory,
    File,
    Metadata,
    Symlink,
    HamtShard,
}

impl Kind {
    pub(crate) fn from_i32(value: i32) -> Option<Kind> {
        Some(match value {
            0 => Kind::Raw,
            1 => Kind::Directory,
            2 => Kind::File,
            3 => Kind::Metadata,
            4 => Kind::Symlink,
            5 => Kind::HamtShard,
            _ => return None,
        })
    }

    pub(crate) fn code(self) -> i32 {
        self as i32
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw node",
            Kind::Directory => "directory",
            Kind::File => "file",
            Kind::Metadata => "metadata node",
            Kind::Symlink => "symlink",
            Kind::HamtShard => "HAMT-sharded directory",
        }
    }
}

/// UnixFS `Data` (proto2). `mode` and `mtime` are read past: an extracted dataset gets modes
/// of our choosing, never a setuid bit from a CAR.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct UnixfsData {
    #[prost(int32, optional, tag = "1")]
    pub kind: Option<i32>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub data: Option<Vec<u8>>,
    #[prost(uint64, optional, tag = "3")]
    pub filesize: Option<u64>,
    /// proto2 repeated fields are unpacked, and the CID depends on it.
    #[prost(uint64, repeated, packed = "false", tag = "4")]
    pub blocksizes: Vec<u64>,
    #[prost(uint64, optional, tag = "5")]
    pub hash_type: Option<u64>,
    #[prost(uint64, optional, tag = "6")]
    pub fanout: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_encoded_before_data() {
        let node = PbNode {
            data: Some(vec![8, 1]),
            links: vec![PbLink {
                hash: Some(vec![1, 2]),
                name: Some(String::new()),
                tsize: Some(3),
            }],
        };
        assert_eq!(
            node.encode_canonical(),
            [0x12, 8, 0x0a, 2, 1, 2, 0x12, 0, 0x18, 3, 0x0a, 2, 8, 1]
        );
        assert_eq!(PbNode::decode(&node.encode_canonical()[..]).unwrap(), node);
    }

    #[test]
    fn blocksizes_are_unpacked() {
        let data = UnixfsData {
            kind: Some(Kind::File.code()),
            filesize: Some(3),
            blocksizes: vec![1, 2],
            ..Default::default()
        };
        assert_eq!(data.encode_to_vec(), [8, 2, 0x18, 3, 0x20, 1, 0x20, 2]);
    }
}
