//! CARv1 framing: a varint-prefixed dag-cbor header `{roots: [CID], version: 1}`, then
//! varint-prefixed sections of `CID ‖ block bytes`. See <https://ipld.io/specs/transport/car/carv1/>.
//!
//! The header is so small and fixed that a minimal CBOR reader for exactly its shape is safer
//! than a general decoder fed hostile input.

use std::io::{BufRead, Read, Write};

use cid::multihash::Multihash;
use sha2::{Digest, Sha256};

use super::{CarError, Cid, MAX_BLOCK_BYTES, MAX_IDENTITY_BYTES};

/// Multicodec of dag-pb blocks (UnixFS nodes).
pub(crate) const DAG_PB: u64 = 0x70;
/// Multicodec of raw blocks (file leaves).
pub(crate) const RAW: u64 = 0x55;
const SHA2_256: u64 = 0x12;
const IDENTITY: u64 = 0x00;
/// CBOR tag 42 marks a CID in dag-cbor.
const CID_TAG: u64 = 42;
/// A header names one root; anything longer is not one we wrote or would read.
const MAX_HEADER_BYTES: u64 = 1024;
/// A CID is a few varints and a digest: generous for any sha2-256 or small identity CID.
const MAX_CID_BYTES: u64 = 16 + MAX_IDENTITY_BYTES as u64;

/// The CIDv1 with a sha2-256 multihash of `bytes`.
pub(crate) fn sha256_cid(codec: u64, bytes: &[u8]) -> Cid {
    let digest = Sha256::digest(bytes);
    let hash = Multihash::wrap(SHA2_256, &digest).expect("a 32-byte digest fits a multihash");
    Cid::new_v1(codec, hash)
}

/// Checks that `bytes` are the block `cid` names.
pub(crate) fn verify(cid: &Cid, bytes: &[u8]) -> Result<(), CarError> {
    let hash = cid.hash();
    match hash.code() {
        SHA2_256 if hash.digest() == Sha256::digest(bytes).as_slice() => Ok(()),
        SHA2_256 => Err(CarError::HashMismatch {
            cid: Box::new(*cid),
        }),
        IDENTITY if hash.digest() == bytes => Ok(()),
        IDENTITY => Err(CarError::HashMismatch {
            cid: Box::new(*cid),
        }),
        code => Err(CarError::UnsupportedHash {
            cid: Box::new(*cid),
            code,
        }),
    }
}

/// The header naming `root`, with its length prefix.
pub(crate) fn header(root: &Cid) -> Vec<u8> {
    let cid = root.to_bytes();
    let mut cbor = vec![0xa2];
    text(&mut cbor, "roots");
    cbor.push(0x81);
    head(&mut cbor, 6, CID_TAG);
    // dag-cbor's CID is a byte string of the binary CID behind a 0x00 multibase prefix.
    head(&mut cbor, 2, cid.len() as u64 + 1);
    cbor.push(0);
    cbor.extend_from_slice(&cid);
    text(&mut cbor, "version");
    head(&mut cbor, 0, 1);
    let mut out = Vec::with_capacity(cbor.len() + 2);
    out.extend_from_slice(unsigned_varint::encode::u64(
        cbor.len() as u64,
        &mut unsigned_varint::encode::u64_buffer(),
    ));
    out.extend_from_slice(&cbor);
    out
}

/// Writes one section: the block `bytes` under `cid`. Returns the bytes written.
pub(crate) fn write_section(w: &mut impl Write, cid: &Cid, bytes: &[u8]) -> std::io::Result<u64> {
    let cid = cid.to_bytes();
    let len = (cid.len() + bytes.len()) as u64;
    let mut buf = unsigned_varint::encode::u64_buffer();
    let prefix = unsigned_varint::encode::u64(len, &mut buf);
    w.write_all(prefix)?;
    w.write_all(&cid)?;
    w.write_all(bytes)?;
    Ok(prefix.len() as u64 + len)
}

fn head(out: &mut Vec<u8>, major: u8, value: u64) {
    let major = major << 5;
    match value {
        0..=23 => out.push(major | value as u8),
        24..=0xff => out.extend([major | 24, value as u8]),
        0x100..=0xffff => {
            out.push(major | 25);
            out.extend((value as u16).to_be_bytes());
        }
        _ => {
            out.push(major | 26);
            out.extend((value as u32).to_be_bytes());
        }
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Reads sections one after the other, keeping count of the byte offset.
pub(crate) struct SectionReader<R> {
    inner: R,
    offset: u64,
    buf: Vec<u8>,
}

/// One block as read: where its bytes start in the file and how many there are.
pub(crate) struct Section<'a> {
    pub cid: Cid,
    pub data_offset: u64,
    pub data: &'a [u8],
}

impl<R: BufRead> SectionReader<R> {
    /// Reads the header and returns its single root and a reader positioned at the first
    /// section.
    pub(crate) fn open(mut inner: R) -> Result<(Cid, Self), CarError> {
        let bad = |reason: &str| CarError::BadHeader {
            reason: reason.to_string(),
        };
        let (len, prefix) = read_varint(&mut inner).map_err(|_| bad("no length prefix"))?;
        if len > MAX_HEADER_BYTES {
            // A CARv2 starts with the 11-byte pragma whose length prefix is 0x0a; it is not
            // caught here but by its `version: 2` below.
            return Err(bad(&format!("a header of {len} bytes")));
        }
        let mut cbor = vec![0; len as usize];
        inner
            .read_exact(&mut cbor)
            .map_err(|_| bad("the header is cut short"))?;
        let root = parse_header(&cbor).map_err(|reason| CarError::BadHeader { reason })?;
        Ok((
            root,
            SectionReader {
                inner,
                offset: prefix + len,
                buf: Vec::new(),
            },
        ))
    }

    /// The next section, or `None` at the end of the file. The block is not verified here.
    pub(crate) fn next_section(&mut self) -> Result<Option<Section<'_>>, CarError> {
        let start = self.offset;
        let bad = |reason: String| CarError::BadSection {
            offset: start,
            reason,
        };
        match self.inner.fill_buf() {
            Ok([]) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(bad(e.to_string())),
        }
        let (len, prefix) =
            read_varint(&mut self.inner).map_err(|e| bad(format!("length prefix: {e}")))?;
        if len > MAX_BLOCK_BYTES as u64 + MAX_CID_BYTES {
            return Err(CarError::BlockTooLarge { offset: start, len });
        }
        self.buf.resize(len as usize, 0);
        self.inner
            .read_exact(&mut self.buf)
            .map_err(|_| bad(format!("{len} bytes announced, the file ends first")))?;
        let mut rest = &self.buf[..];
        let cid = Cid::read_bytes(&mut rest).map_err(|e| bad(format!("CID: {e}")))?;
        let cid_len = self.buf.len() - rest.len();
        if rest.len() > MAX_BLOCK_BYTES {
            return Err(CarError::BlockTooLarge {
                offset: start,
                len: rest.len() as u64,
            });
        }
        self.offset = start + prefix + len;
        Ok(Some(Section {
            cid,
            data_offset: start + prefix + cid_len as u64,
            data: &self.buf[cid_len..],
        }))
    }
}

/// Reads a varint, returning it and its length in bytes.
fn read_varint(r: &mut impl Read) -> Result<(u64, u64), unsigned_varint::io::ReadError> {
    let mut counted = Counted { inner: r, count: 0 };
    let value = unsigned_varint::io::read_u64(&mut counted)?;
    Ok((value, counted.count))
}

struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Parses `{roots: [CID], version: 1}` in either key order.
fn parse_header(cbor: &[u8]) -> Result<Cid, String> {
    let mut p = Cbor { bytes: cbor };
    let (major, entries) = p.head()?;
    if major != 5 {
        return Err("the header is not a map".into());
    }
    let (mut roots, mut version) = (None, None);
    for _ in 0..entries {
        let (major, len) = p.head()?;
        if major != 3 {
            return Err("a header key is not text".into());
        }
        match p.take(len)? {
            b"version" => match p.head()? {
                (0, v) => version = Some(v),
                _ => return Err("the version is not an integer".into()),
            },
            b"roots" => {
                let (major, count) = p.head()?;
                if major != 4 {
                    return Err("roots is not a list".into());
                }
                if count != 1 {
                    return Err(format!("{count} roots; a dataset has exactly one"));
                }
                if p.head()? != (6, CID_TAG) {
                    return Err("the root is not a CID".into());
                }
                let (major, len) = p.head()?;
                let bytes = p.take(len)?;
                if major != 2 || bytes.first() != Some(&0) {
                    return Err("the root is not a CID".into());
                }
                let cid = Cid::try_from(&bytes[1..]).map_err(|e| format!("the root CID: {e}"))?;
                roots = Some(cid);
            }
            _ => return Err("an unknown header key".into()),
        }
    }
    if !p.bytes.is_empty() {
        return Err("bytes after the header".into());
    }
    match (version, roots) {
        (Some(1), Some(root)) => Ok(root),
        (Some(1), None) => Err("no roots".into()),
        (Some(2), _) => Err("CARv2 is not supported; convert it to CARv1".into()),
        (Some(v), _) => Err(format!("version {v}")),
        (None, _) => Err("no version".into()),
    }
}

struct Cbor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cbor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        if n > self.bytes.len() as u64 {
            return Err("the header is cut short".into());
        }
        let (taken, rest) = self.bytes.split_at(n as usize);
        self.bytes = rest;
        Ok(taken)
    }

    /// A CBOR item head: major type and argument. Indefinite lengths are not dag-cbor.
    fn head(&mut self) -> Result<(u8, u64), String> {
        let first = self.take(1)?[0];
        let (major, info) = (first >> 5, first & 0x1f);
        let value = match info {
            0..=23 => info as u64,
            24..=27 => {
                let n = 1u64 << (info - 24);
                self.take(n)?
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | *b as u64)
            }
            _ => return Err("an indefinite or reserved CBOR length".into()),
        };
        Ok((major, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_its_root() {
        let root = sha256_cid(DAG_PB, b"root");
        let bytes = header(&root);
        let (read, mut sections) = SectionReader::open(&bytes[..]).unwrap();
        assert_eq!(read, root);
        assert!(sections.next_section().unwrap().is_none());
    }

    #[test]
    fn carv2_is_refused_by_name() {
        // The CARv2 pragma: a header {version: 2}.
        let pragma = [
            0x0a, 0xa1, 0x67, 0x76, 0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e, 0x02,
        ];
        let err = SectionReader::open(&pragma[..]).err().unwrap();
        assert!(err.to_string().contains("CARv2"), "{err}");
    }

    #[test]
    fn identity_and_foreign_hashes_are_checked_or_refused() {
        let small = Cid::new_v1(RAW, Multihash::wrap(IDENTITY, b"hi").unwrap());
        verify(&small, b"hi").unwrap();
        assert!(matches!(
            verify(&small, b"ho"),
            Err(CarError::HashMismatch { .. })
        ));
        // An identity CID of 100 bytes: version, codec, hash code, digest length, digest.
        let mut section = vec![0x01, 0x55, 0x00, 100];
        section.extend([7; 100]);
        section.extend([7; 100]);
        let mut car = header(&small);
        car.extend(unsigned_varint::encode::u64(
            section.len() as u64,
            &mut unsigned_varint::encode::u64_buffer(),
        ));
        car.extend(&section);
        let (_, mut sections) = SectionReader::open(&car[..]).unwrap();
        assert!(matches!(
            sections.next_section(),
            Err(CarError::BadSection { .. })
        ));
        let blake = Cid::new_v1(RAW, Multihash::wrap(0x1e, &[0; 32]).unwrap());
        assert!(matches!(
            verify(&blake, b""),
            Err(CarError::UnsupportedHash { code: 0x1e, .. })
        ));
    }
}
