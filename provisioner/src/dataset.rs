//! Datasets: what an order's container sees under `<data_dir>/<id>`, and the check that a
//! piece dataset's bytes are the piece its CID names before any container sees them.
//!
//! A piece is hashed once per file identity (device, inode, size, mtime): the result is kept in
//! `<state_dir>/datasets/verified.json`, so a restart or the next order does not hash terabytes
//! again, and a file that changed in any of those is hashed anew before it is served. A
//! schedule (`dataset_recheck`) re-hashes every piece, which catches bytes changed in place.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::ProvisionError;
use crate::piece::{self, PieceCid};

/// The name of the file beside a piece's payload that says which piece it is.
pub const PIECE_FILE: &str = ".piece";

/// Where a dataset's bytes come from, in `[containers.datasets]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DatasetSource {
    /// A local directory (`ID = "/srv/dir"`), mounted as it is. It is not a Filecoin piece, so
    /// nothing is verified and clients are told so.
    Directory(PathBuf),
    /// A Filecoin piece's payload as the SP's storage keeps it unsealed (`ID = { piece_cid =
    /// "baga…", source = "/srv/piece.car" }`), mounted as `<data_dir>/<id>/<file name>` only
    /// once its CommP is the piece CID.
    Piece(PieceSource),
}

/// A string is a directory, a table a piece; by hand rather than `untagged`, so a bad piece CID
/// or an unknown field is reported as itself, not as "did not match any variant".
impl<'de> Deserialize<'de> for DatasetSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Source;
        impl<'de> serde::de::Visitor<'de> for Source {
            type Value = DatasetSource;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a directory path, or { piece_cid, source, present }")
            }

            fn visit_str<E: serde::de::Error>(self, path: &str) -> Result<Self::Value, E> {
                Ok(DatasetSource::Directory(PathBuf::from(path)))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                PieceSource::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(DatasetSource::Piece)
            }
        }
        d.deserialize_any(Source)
    }
}

/// A piece dataset's local payload and the piece it must be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PieceSource {
    /// The piece the SP's deal is for.
    pub piece_cid: PieceCid,
    /// The unsealed payload: a CAR file or any file.
    pub source: PathBuf,
    /// How the container sees it.
    #[serde(default)]
    pub present: Presentation,
}

/// How a piece's payload appears at `<data_dir>/<id>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presentation {
    /// The payload file itself, as `<data_dir>/<id>/<file name>`.
    #[default]
    File,
    /// The directory tree the payload (a UnixFS CAR) holds, extracted once with every block
    /// checked against its CID, kept under `<state_dir>/datasets/trees/<piece CID>`.
    Tree,
}

/// What a file was when it was hashed: a change in any of these means hashing again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        if !m.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// The last hash of one piece dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The piece the config names.
    pub piece_cid: PieceCid,
    /// The piece the bytes are.
    pub found: PieceCid,
    /// The padded piece size.
    pub piece_size: u64,
    /// The payload's size.
    pub payload_size: u64,
    /// The file that was hashed.
    pub file: FileIdentity,
    /// When, in seconds since the Unix epoch.
    pub checked_at: u64,
}

impl Verification {
    /// Whether the bytes were the configured piece.
    pub fn matches(&self) -> bool {
        self.piece_cid == self.found
    }
}

/// One dataset as the provider stands with it now, for metrics and `shale sp` status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetStatus {
    pub id: String,
    /// `None` for a directory dataset.
    pub piece_cid: Option<PieceCid>,
    /// The last hash, if there was one.
    pub last: Option<Verification>,
}

/// How an order's container gets a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetMount {
    pub id: String,
    /// Bind mounts, in order: (path in the container, path on the host).
    pub binds: Vec<(String, PathBuf)>,
    /// Added to the container's environment.
    pub env: Vec<String>,
}

/// The provider's datasets and what is known of their bytes.
pub(crate) struct Datasets {
    sources: BTreeMap<String, DatasetSource>,
    data_dir: String,
    /// `<state_dir>/datasets`: `verified.json` and each piece's mount directory.
    dir: PathBuf,
    verified: Mutex<BTreeMap<String, Verification>>,
    /// One hash of a dataset at a time: an order arriving while a hash runs waits for it.
    hashing: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Datasets {
    /// The datasets of the config, with what earlier runs found.
    pub(crate) fn new(
        sources: BTreeMap<String, DatasetSource>,
        data_dir: String,
        state_dir: &Path,
    ) -> Self {
        let dir = state_dir.join("datasets");
        let verified = std::fs::read(dir.join("verified.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            sources,
            data_dir,
            dir,
            verified: Mutex::new(verified),
            hashing: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether the provider serves `id` at all.
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.sources.contains_key(id)
    }

    /// How a container gets dataset `id`; for a piece, only once its bytes are that piece.
    pub(crate) async fn mount(&self, id: &str) -> Result<DatasetMount, ProvisionError> {
        let missing = || ProvisionError::DatasetMissing {
            dataset: id.to_string(),
        };
        let target = format!("{}/{id}", self.data_dir);
        match self.sources.get(id).ok_or_else(missing)? {
            DatasetSource::Directory(path) => {
                if !path.is_dir() {
                    return Err(missing());
                }
                Ok(DatasetMount {
                    id: id.to_string(),
                    binds: vec![(target, path.clone())],
                    env: vec![format!("SHALE_DATASET={id}")],
                })
            }
            DatasetSource::Piece(piece) => {
                let v = self.verify(id, piece, false).await?;
                if !v.matches() {
                    return Err(ProvisionError::DatasetMismatch {
                        dataset: id.to_string(),
                        expected: v.piece_cid.to_string(),
                        found: v.found.to_string(),
                    });
                }
                if piece.present == Presentation::Tree {
                    let (tree, root) = self.tree(id, piece, &v).await?;
                    return Ok(DatasetMount {
                        id: id.to_string(),
                        binds: vec![(target, tree)],
                        env: vec![
                            format!("SHALE_DATASET={id}"),
                            format!("SHALE_DATASET_PIECE_CID={}", v.piece_cid),
                            format!("SHALE_DATASET_ROOT_CID={root}"),
                        ],
                    });
                }
                let name = file_name(&piece.source);
                let dir = self.piece_dir(id, &name, &v)?;
                Ok(DatasetMount {
                    id: id.to_string(),
                    binds: vec![
                        (target.clone(), dir),
                        (format!("{target}/{name}"), piece.source.clone()),
                    ],
                    env: vec![
                        format!("SHALE_DATASET={id}"),
                        format!("SHALE_DATASET_PIECE_CID={}", v.piece_cid),
                    ],
                })
            }
        }
    }

    /// Hashes every piece whose last hash is older than `every` (or that was never hashed).
    pub(crate) async fn recheck(&self, every: Duration) {
        for (id, source) in &self.sources {
            let DatasetSource::Piece(piece) = source else {
                continue;
            };
            let due = self
                .verified
                .lock()
                .expect("datasets lock")
                .get(id)
                .is_none_or(|v| now_secs().saturating_sub(v.checked_at) >= every.as_secs());
            if !due {
                continue;
            }
            match self.verify(id, piece, true).await {
                Ok(v) if v.matches() => {
                    tracing::info!(dataset = %id, piece = %v.piece_cid, "dataset verified")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(dataset = %id, error = %e, "cannot verify dataset"),
            }
        }
    }

    /// What is known of every dataset now.
    pub(crate) fn statuses(&self) -> Vec<DatasetStatus> {
        let verified = self.verified.lock().expect("datasets lock");
        self.sources
            .iter()
            .map(|(id, source)| DatasetStatus {
                id: id.clone(),
                piece_cid: match source {
                    DatasetSource::Directory(_) => None,
                    DatasetSource::Piece(p) => Some(p.piece_cid),
                },
                last: match source {
                    DatasetSource::Directory(_) => None,
                    DatasetSource::Piece(_) => verified.get(id).cloned(),
                },
            })
            .collect()
    }

    /// The piece's verification for its file as it is now: the kept one if the file is the one
    /// hashed, otherwise (or with `fresh`) a new hash.
    async fn verify(
        &self,
        id: &str,
        piece: &PieceSource,
        fresh: bool,
    ) -> Result<Verification, ProvisionError> {
        let gate = self.gate(id.to_string());
        let started = now_secs();
        let _one = gate.lock().await;
        let unavailable = |reason: String| ProvisionError::DatasetUnavailable {
            dataset: id.to_string(),
            reason,
        };
        let file = FileIdentity::of(&piece.source)
            .map_err(|e| unavailable(format!("{}: {e}", piece.source.display())))?;
        if let Some(v) = self.verified.lock().expect("datasets lock").get(id) {
            // A hash that finished while this one waited is as fresh as asked for.
            let reusable = v.file == file
                && v.piece_cid == piece.piece_cid
                && (!fresh || v.checked_at >= started);
            if reusable {
                return Ok(v.clone());
            }
        }
        tracing::info!(dataset = %id, source = %piece.source.display(), bytes = file.size,
            "hashing dataset to check its piece CID");
        let path = piece.source.clone();
        let commp = tokio::task::spawn_blocking(move || piece::commp_file(&path))
            .await
            .map_err(|e| unavailable(format!("the hash stopped: {e}")))?
            .map_err(|e| unavailable(e.to_string()))?;
        // The file may have changed while it was read: then this hash says nothing about it.
        if FileIdentity::of(&piece.source).ok() != Some(file) {
            return Err(unavailable(format!(
                "{} changed while it was hashed",
                piece.source.display()
            )));
        }
        let v = Verification {
            piece_cid: piece.piece_cid,
            found: commp.cid(),
            piece_size: commp.piece_size,
            payload_size: commp.payload_size,
            file,
            checked_at: now_secs(),
        };
        if !v.matches() {
            tracing::error!(dataset = %id, expected = %v.piece_cid, found = %v.found,
                source = %piece.source.display(),
                "dataset bytes are not its piece: orders for it are refused");
        }
        self.record(id, &v)?;
        Ok(v)
    }

    /// The lock that lets one hash (or extract) of a dataset run at a time.
    fn gate(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        self.hashing
            .lock()
            .expect("datasets lock")
            .entry(key)
            .or_default()
            .clone()
    }

    /// Keeps a verification, on disk too.
    fn record(&self, id: &str, v: &Verification) -> Result<(), ProvisionError> {
        let all = {
            let mut verified = self.verified.lock().expect("datasets lock");
            verified.insert(id.to_string(), v.clone());
            serde_json::to_vec_pretty(&*verified).expect("verifications serialize")
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| ProvisionError::io("create", &self.dir, e))?;
        let path = self.dir.join("verified.json");
        let tmp = self.dir.join("verified.json.tmp");
        std::fs::write(&tmp, all).map_err(|e| ProvisionError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ProvisionError::io("rename", &path, e))
    }

    /// The extracted tree of a verified CAR piece and its root CID: extracted on first use
    /// (one extract at a time per dataset), kept by piece CID, since the bytes that hash to
    /// the piece are the only bytes the tree can come from.
    async fn tree(
        &self,
        id: &str,
        piece: &PieceSource,
        v: &Verification,
    ) -> Result<(PathBuf, String), ProvisionError> {
        let gate = self.gate(format!("tree:{id}"));
        let _one = gate.lock().await;
        let trees = self.dir.join("trees");
        let tree = trees.join(v.piece_cid.to_string());
        let record = tree.join(PIECE_FILE);
        let root_of = |bytes: Vec<u8>| -> Option<String> {
            let r: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            r["root_cid"].as_str().map(str::to_string)
        };
        if let Some(root) = std::fs::read(&record).ok().and_then(root_of) {
            return Ok((tree, root));
        }
        let unavailable = |reason: String| ProvisionError::DatasetUnavailable {
            dataset: id.to_string(),
            reason,
        };
        std::fs::create_dir_all(&trees).map_err(|e| ProvisionError::io("create", &trees, e))?;
        // Extracted beside, completed with its record, then renamed: a tree is either whole
        // with its record or not there.
        let staging = trees.join(format!(".{}.new", v.piece_cid));
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .map_err(|e| ProvisionError::io("remove", &staging, e))?;
        }
        if tree.exists() {
            std::fs::remove_dir_all(&tree).map_err(|e| ProvisionError::io("remove", &tree, e))?;
        }
        tracing::info!(dataset = %id, piece = %v.piece_cid, "extracting the dataset's CAR");
        let (car, to) = (piece.source.clone(), staging.clone());
        let summary = tokio::task::spawn_blocking(move || crate::car::extract(&car, &to))
            .await
            .map_err(|e| unavailable(format!("the extract stopped: {e}")))?
            .map_err(|e| unavailable(format!("its CAR cannot be extracted: {e}")))?;
        let inside = staging.join(PIECE_FILE);
        if inside.exists() {
            std::fs::remove_dir_all(&staging).ok();
            return Err(unavailable(format!(
                "its tree holds a {PIECE_FILE} of its own, the name Shale gives the piece's record"
            )));
        }
        let root = summary.root.to_string();
        let json = serde_json::json!({
            "dataset": id,
            "piece_cid": v.piece_cid.to_string(),
            "root_cid": root,
            "piece_size": v.piece_size,
            "payload_size": v.payload_size,
            "files": summary.files,
            "bytes": summary.bytes,
            "verified_at": v.checked_at,
        });
        std::fs::write(&inside, format!("{json:#}\n"))
            .map_err(|e| ProvisionError::io("write", &inside, e))?;
        std::fs::rename(&staging, &tree).map_err(|e| ProvisionError::io("rename", &tree, e))?;
        tracing::info!(dataset = %id, root = %root, files = summary.files, bytes = summary.bytes,
            "dataset tree extracted");
        Ok((tree, root))
    }

    /// The directory mounted at `<data_dir>/<id>`: the piece's `.piece` record and an empty
    /// file the payload is bound onto (the directory is read-only in the container, so the
    /// mount point must already be there).
    fn piece_dir(&self, id: &str, name: &str, v: &Verification) -> Result<PathBuf, ProvisionError> {
        let dir = self.dir.join("mounts").join(id);
        std::fs::create_dir_all(&dir).map_err(|e| ProvisionError::io("create", &dir, e))?;
        let record = serde_json::json!({
            "dataset": id,
            "file": name,
            "piece_cid": v.piece_cid.to_string(),
            "piece_size": v.piece_size,
            "payload_size": v.payload_size,
            "verified_at": v.checked_at,
        });
        let piece = dir.join(PIECE_FILE);
        std::fs::write(&piece, format!("{record:#}\n"))
            .map_err(|e| ProvisionError::io("write", &piece, e))?;
        let point = dir.join(name);
        if !point.exists() {
            std::fs::write(&point, b"").map_err(|e| ProvisionError::io("create", &point, e))?;
        }
        Ok(dir)
    }
}

/// The name the payload has in the container: its own file name.
fn file_name(source: &Path) -> String {
    source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n != PIECE_FILE)
        .unwrap_or_else(|| "payload".to_string())
}

fn now_secs() -> u64 {
    crate::lease::unix_secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(dir: &Path, bytes: &[u8]) -> (PathBuf, PieceCid) {
        let path = dir.join("digits.csv");
        std::fs::write(&path, bytes).unwrap();
        (path.clone(), piece::commp_file(&path).unwrap().cid())
    }

    fn datasets(state: &Path, source: PathBuf, piece_cid: PieceCid) -> Datasets {
        let sources = BTreeMap::from([(
            "digits".to_string(),
            DatasetSource::Piece(PieceSource {
                piece_cid,
                source,
                present: Presentation::File,
            }),
        )]);
        Datasets::new(sources, "/data".into(), state)
    }

    #[test]
    fn config_takes_a_directory_or_a_piece() {
        let cid = "baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy";
        let t: BTreeMap<String, DatasetSource> = toml::from_str(&format!(
            "old = \"/srv/dir\"\nnew = {{ piece_cid = \"{cid}\", source = \"/srv/p.car\" }}\n"
        ))
        .unwrap();
        assert_eq!(t["old"], DatasetSource::Directory("/srv/dir".into()));
        let DatasetSource::Piece(p) = &t["new"] else {
            panic!("{t:?}")
        };
        assert_eq!(p.piece_cid.to_string(), cid);
        let err = toml::from_str::<BTreeMap<String, DatasetSource>>(
            "bad = { piece_cid = \"bafkqaaa\", source = \"/x\" }",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a v1 piece CID"), "{err}");
        let err = toml::from_str::<BTreeMap<String, DatasetSource>>(&format!(
            "bad = {{ piece_cid = \"{cid}\", source = \"/x\", presnt = \"tree\" }}"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("presnt"), "{err}");
        // JSON, as the broker's config travels, reads the same.
        let json: BTreeMap<String, DatasetSource> =
            serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(json, t);
    }

    #[tokio::test]
    async fn a_piece_is_mounted_once_its_bytes_are_the_piece() {
        let dir = tempfile::tempdir().unwrap();
        let (source, cid) = payload(dir.path(), &[7u8; 5000]);
        let ds = datasets(&dir.path().join("state"), source.clone(), cid);
        let m = ds.mount("digits").await.unwrap();
        assert_eq!(m.binds[1], ("/data/digits/digits.csv".into(), source));
        assert!(m.env.contains(&format!("SHALE_DATASET_PIECE_CID={cid}")));
        let record = std::fs::read_to_string(m.binds[0].1.join(PIECE_FILE)).unwrap();
        assert!(record.contains(&cid.to_string()), "{record}");
        assert!(m.binds[0].1.join("digits.csv").exists());
        assert!(ds.statuses()[0].last.as_ref().unwrap().matches());
        // Kept on disk: a new provisioner does not hash the same file again.
        let again = datasets(&dir.path().join("state"), m.binds[1].1.clone(), cid);
        assert!(again.statuses()[0].last.is_some());
    }

    #[tokio::test]
    async fn one_changed_byte_refuses_the_dataset_with_both_cids() {
        let dir = tempfile::tempdir().unwrap();
        let (source, cid) = payload(dir.path(), &[7u8; 5000]);
        let ds = datasets(&dir.path().join("state"), source.clone(), cid);
        ds.mount("digits").await.unwrap();
        let mut bytes = std::fs::read(&source).unwrap();
        bytes[1234] ^= 1;
        std::fs::write(&source, bytes).unwrap();
        let err = ds.mount("digits").await.unwrap_err();
        let ProvisionError::DatasetMismatch {
            expected, found, ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(expected, &cid.to_string());
        assert_ne!(found, expected);
        assert!(!ds.statuses()[0].last.as_ref().unwrap().matches());
    }

    #[tokio::test]
    async fn a_car_piece_is_presented_as_its_tree_extracted_once() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("train")).unwrap();
        std::fs::write(tree.join("train/labels.csv"), "7,2,1\n").unwrap();
        std::fs::write(tree.join("README"), "digits\n").unwrap();
        let car = dir.path().join("digits.car");
        let root = crate::car::pack_dir(&tree, &car).unwrap();
        let cid = piece::commp_file(&car).unwrap().cid();
        let sources = BTreeMap::from([(
            "digits".to_string(),
            DatasetSource::Piece(PieceSource {
                piece_cid: cid,
                source: car,
                present: Presentation::Tree,
            }),
        )]);
        let ds = Datasets::new(sources, "/data".into(), &dir.path().join("state"));
        let m = ds.mount("digits").await.unwrap();
        assert_eq!(m.binds.len(), 1);
        let (target, host) = &m.binds[0];
        assert_eq!(target, "/data/digits");
        assert_eq!(
            std::fs::read_to_string(host.join("train/labels.csv")).unwrap(),
            "7,2,1\n"
        );
        let record = std::fs::read_to_string(host.join(PIECE_FILE)).unwrap();
        assert!(record.contains(&root.to_string()), "{record}");
        assert!(m.env.contains(&format!("SHALE_DATASET_ROOT_CID={root}")));
        // Kept: a second mount does not extract again.
        std::fs::write(host.join("marker"), "kept").unwrap();
        let again = ds.mount("digits").await.unwrap();
        assert!(again.binds[0].1.join("marker").exists());
    }

    #[tokio::test]
    async fn a_missing_payload_is_unavailable_not_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (_, cid) = payload(dir.path(), &[7u8; 5000]);
        let ds = datasets(dir.path(), dir.path().join("gone.car"), cid);
        let err = ds.mount("digits").await.unwrap_err();
        assert!(
            matches!(err, ProvisionError::DatasetUnavailable { .. }),
            "{err}"
        );
        assert!(matches!(
            ds.mount("other").await.unwrap_err(),
            ProvisionError::DatasetMissing { .. }
        ));
    }
}
