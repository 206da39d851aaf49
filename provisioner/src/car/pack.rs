//! Packing a directory: UnixFS blocks written to a CAR as they are made, one chunk of one file
//! in memory at a time.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use prost::Message;

use super::format::{self, sha256_cid, DAG_PB, RAW};
use super::pb::{Kind, PbLink, PbNode, UnixfsData};
use super::{CarError, Cid, MAX_BLOCK_BYTES};

/// Files are cut into leaves of this size, as `ipfs-car` and kubo do.
const CHUNK_BYTES: usize = 1 << 20;
/// Links per file node. `ipfs-car` 3.1 uses 1024 (kubo 174): the same width gives the same
/// CIDs as `ipfs-car`.
const WIDTH: usize = 1024;

/// Writes `dir` as a UnixFS directory into a new CARv1 file at `out` and returns the root CID.
///
/// Entries are sorted by the bytes of their names, so one tree always gives one CAR. Only
/// regular files and directories are packed: a symlink, device, socket or FIFO is refused by
/// path, since a dataset must not point outside itself. The CAR is written beside `out` and
/// renamed into place when complete, so a failed pack leaves no partial file.
///
/// Files of one chunk are a single raw block; empty directories are kept (`ipfs-car` drops
/// them, and it also skips names starting with `.`, which are packed here).
pub fn pack_dir(dir: &Path, out: &Path) -> Result<Cid, CarError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| CarError::io("read", dir, e))?;
    if !meta.is_dir() {
        let kind = kind_of(&meta.file_type());
        let e = std::io::Error::other(format!("a {kind}, not a directory"));
        return Err(CarError::io("pack", dir, e));
    }
    let canonical_dir = std::fs::canonicalize(dir).map_err(|e| CarError::io("resolve", dir, e))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let canonical_parent =
        std::fs::canonicalize(parent).map_err(|e| CarError::io("resolve", parent, e))?;
    if canonical_parent.starts_with(&canonical_dir) {
        return Err(CarError::OutputInsideInput {
            out: out.to_path_buf(),
            dir: dir.to_path_buf(),
        });
    }
    let name = out.file_name().ok_or_else(|| {
        let e = std::io::Error::other("the output path has no file name");
        CarError::io("create", out, e)
    })?;
    let mut partial = name.to_os_string();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = parent.join(partial);
    let result = write_car(dir, &partial);
    match result {
        Ok(root) => {
            std::fs::rename(&partial, out).map_err(|e| CarError::io("rename", &partial, e))?;
            Ok(root)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn write_car(dir: &Path, path: &Path) -> Result<Cid, CarError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| CarError::io("create", path, e))?;
    let write_err = |e| CarError::io("write", path, e);
    let mut car = Car {
        out: BufWriter::new(file),
        path: path.to_path_buf(),
    };
    // The root is known only at the end; every root here is a 36-byte CIDv1, so a placeholder
    // header of the same length is overwritten in place, as `ipfs-car` does.
    let placeholder = sha256_cid(DAG_PB, b"");
    car.out
        .write_all(&format::header(&placeholder))
        .map_err(write_err)?;
    let root = pack_directory(dir, &mut car)?;
    let mut file = car
        .out
        .into_inner()
        .map_err(|e| CarError::io("write", path, e.into_error()))?;
    let header = format::header(&root.cid);
    debug_assert_eq!(header.len(), format::header(&placeholder).len());
    file.seek(SeekFrom::Start(0)).map_err(write_err)?;
    file.write_all(&header).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(root.cid)
}

struct Car {
    out: BufWriter<File>,
    path: PathBuf,
}

impl Car {
    fn block(&mut self, codec: u64, bytes: &[u8]) -> Result<Cid, CarError> {
        let cid = sha256_cid(codec, bytes);
        format::write_section(&mut self.out, &cid, bytes)
            .map_err(|e| CarError::io("write", &self.path, e))?;
        Ok(cid)
    }
}

/// What a parent needs of a child: its CID, the file bytes under it and the bytes of all the
/// blocks under it (dag-pb's `Tsize`).
struct Link {
    cid: Cid,
    content: u64,
    dag: u64,
}

fn pack_directory(dir: &Path, car: &mut Car) -> Result<Link, CarError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| CarError::io("list", dir, e))? {
        let entry = entry.map_err(|e| CarError::io("list", dir, e))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| CarError::NonUtf8Name { path: path.clone() })?;
        // `DirEntry::file_type` does not follow symlinks.
        let kind = entry
            .file_type()
            .map_err(|e| CarError::io("read", &path, e))?;
        entries.push((name, path, kind));
    }
    // dag-pb orders links by the bytes of their names.
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));

    let mut links = Vec::with_capacity(entries.len());
    let (mut content, mut dag) = (0u64, 0u64);
    for (name, path, kind) in entries {
        let link = if kind.is_dir() {
            pack_directory(&path, car)?
        } else if kind.is_file() {
            pack_file(&path, car)?
        } else {
            return Err(CarError::UnsupportedFile {
                path,
                kind: kind_of(&kind),
            });
        };
        content += link.content;
        dag += link.dag;
        links.push(PbLink {
            hash: Some(link.cid.to_bytes()),
            name: Some(name),
            tsize: Some(link.dag),
        });
    }
    let count = links.len();
    let node = PbNode {
        data: Some(
            UnixfsData {
                kind: Some(Kind::Directory.code()),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        links,
    };
    let bytes = node.encode_canonical();
    if bytes.len() > MAX_BLOCK_BYTES {
        return Err(CarError::DirectoryTooLarge {
            path: dir.to_path_buf(),
            entries: count,
            bytes: bytes.len(),
        });
    }
    let cid = car.block(DAG_PB, &bytes)?;
    Ok(Link {
        cid,
        content,
        dag: dag + bytes.len() as u64,
    })
}

fn pack_file(path: &Path, car: &mut Car) -> Result<Link, CarError> {
    // O_NOFOLLOW: the entry was a regular file when listed; if it has been swapped for a
    // symlink since, refuse rather than pack what it points to.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| CarError::io("open", path, e))?;
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut leaves = Vec::new();
    loop {
        let n = fill(&mut file, &mut chunk).map_err(|e| CarError::io("read", path, e))?;
        if n == 0 && !leaves.is_empty() {
            break;
        }
        // An empty file is one empty raw leaf, as `ipfs-car` writes it.
        let cid = car.block(RAW, &chunk[..n])?;
        leaves.push(Link {
            cid,
            content: n as u64,
            dag: n as u64,
        });
        if n < CHUNK_BYTES {
            break;
        }
    }
    balance(leaves, car)
}

/// Reads until `buf` is full or the file ends.
fn fill(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Builds the balanced layout over a file's leaves: each level groups the one below, left to
/// right, `WIDTH` at a time, until one node is left; a single leaf is the file itself.
fn balance(mut level: Vec<Link>, car: &mut Car) -> Result<Link, CarError> {
    while level.len() > 1 {
        let mut above = Vec::with_capacity(level.len().div_ceil(WIDTH));
        for group in level.chunks(WIDTH) {
            above.push(file_node(group, car)?);
        }
        level = above;
    }
    Ok(level.pop().expect("a file has at least one leaf"))
}

fn file_node(children: &[Link], car: &mut Car) -> Result<Link, CarError> {
    let content = children.iter().map(|c| c.content).sum();
    let data = UnixfsData {
        kind: Some(Kind::File.code()),
        filesize: Some(content),
        blocksizes: children.iter().map(|c| c.content).collect(),
        ..Default::default()
    };
    let node = PbNode {
        data: Some(data.encode_to_vec()),
        links: children
            .iter()
            .map(|c| PbLink {
                hash: Some(c.cid.to_bytes()),
                name: Some(String::new()),
                tsize: Some(c.dag),
            })
            .collect(),
    };
    let bytes = node.encode_canonical();
    let cid = car.block(DAG_PB, &bytes)?;
    Ok(Link {
        cid,
        content,
        dag: bytes.len() as u64 + children.iter().map(|c| c.dag).sum::<u64>(),
    })
}

fn kind_of(kind: &std::fs::FileType) -> &'static str {
    if kind.is_symlink() {
        "symlink"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_file() {
        "regular file"
    } else {
        "special file"
    }
}
