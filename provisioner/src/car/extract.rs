//! Extracting a CAR into a directory tree, treating the CAR as hostile.
//!
//! Two passes over the file: the first checks every block against its CID and notes where it
//! lies, the second walks the DAG from the root and writes the tree, reading each block again
//! (and checking it again, since the file could change between the passes). Only the index of
//! block positions is held in memory, never the blocks.

use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use prost::Message;

use super::format::{self, SectionReader, DAG_PB, RAW};
use super::pb::{Kind, PbNode, UnixfsData};
use super::{CarError, Cid};

/// Bounds on what one extract may write. A DAG may link one block from many places, so the
/// tree it describes can be vastly larger than the CAR; these bound that expansion.
#[derive(Clone, Debug)]
pub struct ExtractLimits {
    /// Total bytes of all files written.
    pub max_bytes: u64,
    /// Files and directories created.
    pub max_entries: u64,
    /// Blocks indexed from the CAR (each costs some memory in the index).
    pub max_blocks: u64,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        ExtractLimits {
            // Four times the largest sector: room for a dataset that repeats files.
            max_bytes: 256 << 30,
            max_entries: 4 << 20,
            max_blocks: 8 << 20,
        }
    }
}

/// What an extract wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtractSummary {
    /// The CAR's root: the directory now at the destination.
    pub root: Cid,
    /// Regular files written.
    pub files: u64,
    /// Directories created, the destination included.
    pub directories: u64,
    /// Bytes of all files written.
    pub bytes: u64,
    /// Blocks in the CAR, all checked against their CIDs.
    pub blocks: u64,
}

/// Files nest no deeper in [`super::pack_dir`]'s or `ipfs-car`'s layouts (1024⁴ MiB is a
/// yebibyte); directories no deeper than a Linux path allows.
const MAX_FILE_DEPTH: usize = 16;
const MAX_DIR_DEPTH: usize = 2048;

/// Extracts the UnixFS directory at the root of the CARv1 file `car` to `dest`, with the
/// default [`ExtractLimits`].
///
/// `dest` must not exist. The tree is written into a fresh directory beside it and renamed to
/// `dest` only when complete, so a failed extract leaves nothing. Every block is checked
/// against its sha2-256 CID; names that are not a single path component, files whose bytes
/// disagree with their declared size, symlinks and other UnixFS kinds are refused. Files get
/// mode 0644 and directories 0755 whatever the CAR says.
pub fn extract(car: &Path, dest: &Path) -> Result<ExtractSummary, CarError> {
    extract_with_limits(car, dest, &ExtractLimits::default())
}

/// [`extract`] with explicit limits.
pub fn extract_with_limits(
    car: &Path,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<ExtractSummary, CarError> {
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(CarError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let file = File::open(car).map_err(|e| CarError::io("open", car, e))?;
    let (root, index) = index(&file, limits)?;
    let blocks = index.len() as u64;

    let staging = Staging::create(dest)?;
    let mut walker = Walker {
        car: &file,
        car_path: car,
        index,
        limits,
        files: 0,
        directories: 0,
        bytes: 0,
    };
    let node = walker.node(&root)?;
    match &node {
        Node::Pb {
            kind: Kind::Directory | Kind::HamtShard,
            ..
        } => {}
        _ => {
            return Err(CarError::RootNotDirectory {
                cid: Box::new(root),
            })
        }
    }
    walker.directories += 1;
    walker.directory_entries(&root, node, &staging.path, 0)?;
    staging.commit(dest)?;
    Ok(ExtractSummary {
        root,
        files: walker.files,
        directories: walker.directories,
        bytes: walker.bytes,
        blocks,
    })
}

/// Where a block's bytes lie in the CAR.
#[derive(Clone, Copy)]
struct Place {
    offset: u64,
    len: u32,
}

/// The first pass: every block checked, and where each lies.
fn index(file: &File, limits: &ExtractLimits) -> Result<(Cid, HashMap<Cid, Place>), CarError> {
    let (root, mut sections) = SectionReader::open(BufReader::with_capacity(1 << 20, file))?;
    let mut index = HashMap::new();
    while let Some(section) = sections.next_section()? {
        format::verify(&section.cid, section.data)?;
        // A CAR may repeat a block; any copy will do since all were checked.
        index.entry(section.cid).or_insert(Place {
            offset: section.data_offset,
            len: section.data.len() as u32,
        });
        if index.len() as u64 > limits.max_blocks {
            return Err(CarError::LimitExceeded {
                what: "blocks",
                limit: limits.max_blocks,
            });
        }
    }
    Ok((root, index))
}

/// The fresh directory an extract writes into, removed unless committed.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(dest: &Path) -> Result<Staging, CarError> {
        let name = dest.file_name().ok_or_else(|| {
            let e = std::io::Error::other("the destination has no file name");
            CarError::io("create", dest, e)
        })?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut staged = std::ffi::OsString::from(".");
        staged.push(name);
        staged.push(format!(".extract-{}", std::process::id()));
        let path = parent.join(staged);
        // 0700 while it fills, so no other user can plant a symlink in it.
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| CarError::io("create", &path, e))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    fn commit(mut self, dest: &Path) -> Result<(), CarError> {
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| CarError::io("set the mode of", &self.path, e))?;
        // RENAME_NOREPLACE: a path that appeared at `dest` meanwhile is not replaced.
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.path,
            nix::fcntl::AT_FDCWD,
            dest,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| match e {
            nix::errno::Errno::EEXIST => CarError::DestinationExists {
                path: dest.to_path_buf(),
            },
            e => CarError::io("rename", &self.path, e.into()),
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A decoded block.
enum Node {
    /// A raw leaf: file bytes.
    Raw(Vec<u8>),
    /// A dag-pb UnixFS node.
    Pb {
        kind: Kind,
        pb: PbNode,
        data: UnixfsData,
    },
}

struct Walker<'a> {
    car: &'a File,
    car_path: &'a Path,
    index: HashMap<Cid, Place>,
    limits: &'a ExtractLimits,
    files: u64,
    directories: u64,
    bytes: u64,
}

impl Walker<'_> {
    /// A block's bytes, checked again against its CID.
    fn block(&self, cid: &Cid) -> Result<Vec<u8>, CarError> {
        if cid.hash().code() == 0x00 {
            // An identity CID holds its block.
            return Ok(cid.hash().digest().to_vec());
        }
        let place = self.index.get(cid).ok_or(CarError::MissingBlock {
            cid: Box::new(*cid),
        })?;
        let mut bytes = vec![0; place.len as usize];
        self.car
            .read_exact_at(&mut bytes, place.offset)
            .map_err(|e| CarError::io("read", self.car_path, e))?;
        format::verify(cid, &bytes)?;
        Ok(bytes)
    }

    fn node(&self, cid: &Cid) -> Result<Node, CarError> {
        let bytes = self.block(cid)?;
        match cid.codec() {
            RAW => Ok(Node::Raw(bytes)),
            DAG_PB => {
                let bad = |reason: String| CarError::BadNode {
                    cid: Box::new(*cid),
                    reason,
                };
                let pb = PbNode::decode(&bytes[..]).map_err(|e| bad(e.to_string()))?;
                let data = pb
                    .data
                    .as_deref()
                    .ok_or_else(|| bad("no UnixFS data".into()))?;
                let data = UnixfsData::decode(data).map_err(|e| bad(e.to_string()))?;
                let code = data.kind.ok_or_else(|| bad("no UnixFS type".into()))?;
                let kind =
                    Kind::from_i32(code).ok_or_else(|| bad(format!("UnixFS type {code}")))?;
                Ok(Node::Pb { kind, pb, data })
            }
            codec => Err(CarError::UnsupportedCodec {
                cid: Box::new(*cid),
                codec,
            }),
        }
    }

    fn count_entry(&mut self) -> Result<(), CarError> {
        if self.files + self.directories >= self.limits.max_entries {
            return Err(CarError::LimitExceeded {
                what: "files and directories",
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Writes the entries of the directory (or HAMT shard) `node` into `dir`, which exists.
    fn directory_entries(
        &mut self,
        cid: &Cid,
        node: Node,
        dir: &Path,
        depth: usize,
    ) -> Result<(), CarError> {
        if depth > MAX_DIR_DEPTH {
            return Err(CarError::TooDeep {
                cid: Box::new(*cid),
                max: MAX_DIR_DEPTH,
            });
        }
        let Node::Pb { kind, pb, data } = node else {
            return Err(CarError::RootNotDirectory {
                cid: Box::new(*cid),
            });
        };
        // A HAMT shard prefixes each name with its bucket in hex; a link that is only a
        // prefix is a sub-shard of the same directory. Bucket placement is not checked: it
        // only matters for lookups, never for what the tree holds.
        let prefix = match kind {
            Kind::Directory => 0,
            Kind::HamtShard => hamt_prefix(cid, &data)?,
            _ => unreachable!("callers pass directories"),
        };
        for link in pb.links {
            let child = link_cid(cid, link.hash.as_deref())?;
            let full = link.name.unwrap_or_default();
            if kind == Kind::HamtShard && full.len() == prefix {
                let shard = self.node(&child)?;
                if !matches!(
                    shard,
                    Node::Pb {
                        kind: Kind::HamtShard,
                        ..
                    }
                ) {
                    return Err(CarError::BadNode {
                        cid: Box::new(*cid),
                        reason: format!("the link {full:?} is not a HAMT shard"),
                    });
                }
                self.directory_entries(&child, shard, dir, depth + 1)?;
                continue;
            }
            let name = full.get(prefix..).unwrap_or("");
            check_name(cid, name)?;
            self.entry(cid, &child, &dir.join(name), name, depth + 1)?;
        }
        Ok(())
    }

    /// Writes the entry `child` of directory `parent` at `path`.
    fn entry(
        &mut self,
        parent: &Cid,
        child: &Cid,
        path: &Path,
        name: &str,
        depth: usize,
    ) -> Result<(), CarError> {
        self.count_entry()?;
        let duplicate = |e: std::io::Error, op| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CarError::DuplicateName {
                    cid: Box::new(*parent),
                    name: name.to_string(),
                }
            } else {
                CarError::io(op, path, e)
            }
        };
        let node = self.node(child)?;
        let kind = match &node {
            Node::Raw(_) => Kind::File,
            Node::Pb { kind, .. } => *kind,
        };
        match kind {
            Kind::Directory | Kind::HamtShard => {
                DirBuilder::new()
                    .mode(0o755)
                    .create(path)
                    .map_err(|e| duplicate(e, "create"))?;
                self.directories += 1;
                self.directory_entries(child, node, path, depth)
            }
            Kind::File | Kind::Raw => {
                // create_new and O_NOFOLLOW: never through a symlink, never over a file.
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|e| duplicate(e, "create"))?;
                self.files += 1;
                let mut out = BufWriter::with_capacity(1 << 20, file);
                self.file_content(child, node, &mut out, path, 0)?;
                let file = out
                    .into_inner()
                    .map_err(|e| CarError::io("write", path, e.into_error()))?;
                file.sync_all().map_err(|e| CarError::io("write", path, e))
            }
            Kind::Symlink | Kind::Metadata => Err(CarError::UnsupportedNode {
                cid: Box::new(*child),
                path: path.to_path_buf(),
                kind: kind.name(),
            }),
        }
    }

    /// Writes the bytes of the file (sub)tree `node` to `out` and returns how many there were.
    fn file_content(
        &mut self,
        cid: &Cid,
        node: Node,
        out: &mut impl Write,
        path: &Path,
        depth: usize,
    ) -> Result<u64, CarError> {
        if depth > MAX_FILE_DEPTH {
            return Err(CarError::TooDeep {
                cid: Box::new(*cid),
                max: MAX_FILE_DEPTH,
            });
        }
        let (pb, data) = match node {
            Node::Raw(bytes) => return self.write(&bytes, out, path),
            Node::Pb {
                kind: Kind::File | Kind::Raw,
                pb,
                data,
            } => (pb, data),
            Node::Pb { kind, .. } => {
                return Err(CarError::BadNode {
                    cid: Box::new(*cid),
                    reason: format!("a {} inside a file", kind.name()),
                })
            }
        };
        // A file node's bytes are its own data, then its children's in order.
        let mut written = match &data.data {
            Some(bytes) => self.write(bytes, out, path)?,
            None => 0,
        };
        let sizes_given = data.blocksizes.len() == pb.links.len();
        for (i, link) in pb.links.iter().enumerate() {
            let child = link_cid(cid, link.hash.as_deref())?;
            let node = self.node(&child)?;
            let n = self.file_content(&child, node, out, path, depth + 1)?;
            if sizes_given && data.blocksizes[i] != n {
                return Err(CarError::SizeMismatch {
                    cid: Box::new(child),
                    declared: data.blocksizes[i],
                    actual: n,
                });
            }
            written += n;
        }
        if let Some(declared) = data.filesize {
            if declared != written {
                return Err(CarError::SizeMismatch {
                    cid: Box::new(*cid),
                    declared,
                    actual: written,
                });
            }
        }
        Ok(written)
    }

    fn write(&mut self, bytes: &[u8], out: &mut impl Write, path: &Path) -> Result<u64, CarError> {
        let n = bytes.len() as u64;
        if self.bytes + n > self.limits.max_bytes {
            return Err(CarError::LimitExceeded {
                what: "bytes",
                limit: self.limits.max_bytes,
            });
        }
        out.write_all(bytes)
            .map_err(|e| CarError::io("write", path, e))?;
        self.bytes += n;
        Ok(n)
    }
}

fn link_cid(parent: &Cid, hash: Option<&[u8]>) -> Result<Cid, CarError> {
    let bad = |reason: String| CarError::BadNode {
        cid: Box::new(*parent),
        reason,
    };
    let bytes = hash.ok_or_else(|| bad("a link without a CID".into()))?;
    Cid::try_from(bytes).map_err(|e| bad(format!("a link's CID: {e}")))
}

/// The length of a HAMT shard's hex bucket prefix: the digits of `fanout - 1`.
fn hamt_prefix(cid: &Cid, data: &UnixfsData) -> Result<usize, CarError> {
    match data.fanout {
        Some(f) if f.is_power_of_two() && (2..=4096).contains(&f) => {
            Ok(format!("{:X}", f - 1).len())
        }
        f => Err(CarError::BadNode {
            cid: Box::new(*cid),
            reason: format!("a HAMT fanout of {f:?}"),
        }),
    }
}

/// A name must be one path component: it becomes a path under the destination.
fn check_name(dir: &Cid, name: &str) -> Result<(), CarError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(CarError::BadName {
            cid: Box::new(*dir),
            name: name.to_string(),
        });
    }
    Ok(())
}
