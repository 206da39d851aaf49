//! Images without a registry: OCI image archives (or layout directories) are written into
//! containerd's content store and unpacked with the overlayfs snapshotter.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::{
    images_client::ImagesClient, snapshots::CommitSnapshotRequest,
    snapshots::PrepareSnapshotRequest, snapshots::RemoveSnapshotRequest,
    snapshots::StatSnapshotRequest, AbortRequest, ApplyRequest, CreateImageRequest,
    CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest, GetImageRequest,
    Image, Info as ContentInfo, InfoRequest, ReadContentRequest, UpdateImageRequest,
    UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tracing::{debug, info};

use crate::ctd::{is_already_exists, is_not_found, Ctd, SNAPSHOTTER};
use crate::{ImageRef, ProvisionError};

pub(crate) const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const MEDIA_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Blobs up to this size are kept in memory while importing (indexes, manifests, configs).
pub(crate) const SMALL_BLOB: u64 = 4 << 20;
pub(crate) const CHUNK: usize = 1 << 20;

#[derive(Deserialize)]
pub(crate) struct OciIndex {
    pub(crate) manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OciDescriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: i64,
    #[serde(default)]
    pub(crate) annotations: HashMap<String, String>,
    #[serde(default)]
    pub(crate) platform: Option<OciPlatform>,
}

#[derive(Deserialize, Clone)]
pub(crate) struct OciPlatform {
    pub(crate) architecture: String,
    pub(crate) os: String,
}

#[derive(Deserialize)]
pub(crate) struct OciManifest {
    pub(crate) config: OciDescriptor,
    pub(crate) layers: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
pub(crate) struct OciConfig {
    #[serde(default)]
    pub(crate) config: ImageRuntimeConfig,
    pub(crate) rootfs: OciRootfs,
}

#[derive(Deserialize)]
pub(crate) struct OciRootfs {
    pub(crate) diff_ids: Vec<String>,
}

/// What the image asks of the processes it runs (environment, user, working directory).
#[derive(Deserialize, Default, Clone, Debug)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ImageRuntimeConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
}

/// An image whose blobs are all in the content store, ready for [`Ctd::install`].
pub(crate) struct InstalledImage<'a> {
    /// The name the image is recorded under.
    pub name: &'a str,
    /// What the name points at: the index or the manifest.
    pub target: Descriptor,
    /// The platform's manifest when `target` is an index.
    pub index_child: Option<&'a str>,
    pub manifest_digest: &'a str,
    pub manifest: &'a OciManifest,
    pub config: &'a OciConfig,
}

/// An image resolved down to the snapshot its containers start from.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedImage {
    pub name: String,
    pub chain_id: String,
    pub config: ImageRuntimeConfig,
}

/// The identity of a stack of layers, as containerd's snapshotters name committed snapshots.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => format!(
                "sha256:{:x}",
                Sha256::digest(format!("{parent} {diff}").as_bytes())
            ),
        };
        out.push(next);
    }
    out
}

/// The one platform rule for indexes: linux/amd64, or an entry that names no platform.
pub(crate) fn platform_matches(d: &OciDescriptor) -> bool {
    d.platform
        .as_ref()
        .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
}

/// How a blob upload ended on containerd's side.
enum Written {
    Committed,
    /// The store already had the blob (another writer, or another namespace sharing it).
    Exists,
    /// The stream ended without a commit.
    Unconfirmed,
}

/// One item the archive reader hands to the async writer.
enum ArchiveItem {
    Small {
        digest: String,
        data: Vec<u8>,
    },
    Large {
        digest: String,
        size: u64,
        chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    },
    Index(Vec<u8>),
}

fn digest_of_blob_path(path: &Path) -> Option<String> {
    let mut comps = path
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir));
    let first = comps.next()?.as_os_str().to_str()?;
    let algo = comps.next()?.as_os_str().to_str()?;
    let hex = comps.next()?.as_os_str().to_str()?;
    (first == "blobs" && comps.next().is_none()).then(|| format!("{algo}:{hex}"))
}

/// Reads an OCI archive (tar) or layout directory on a blocking thread and streams its blobs.
fn read_archive(path: PathBuf, tx: mpsc::Sender<ArchiveItem>) -> Result<(), String> {
    fn send_file(
        reader: &mut dyn Read,
        rel: &Path,
        size: u64,
        tx: &mpsc::Sender<ArchiveItem>,
    ) -> Result<(), String> {
        if rel == Path::new("index.json") {
            let mut data = Vec::new();
            reader.read_to_end(&mut data).map_err(|e| e.to_string())?;
            let _ = tx.blocking_send(ArchiveItem::Index(data));
            return Ok(());
        }
        let Some(digest) = digest_of_blob_path(rel) else {
            return Ok(());
        };
        if size <= SMALL_BLOB {
            let mut data = Vec::with_capacity(size as usize);
            reader.read_to_end(&mut data).map_err(|e| e.to_string())?;
            let _ = tx.blocking_send(ArchiveItem::Small { digest, data });
            return Ok(());
        }
        let (ctx, crx) = mpsc::channel(4);
        if tx
            .blocking_send(ArchiveItem::Large {
                digest,
                size,
                chunks: crx,
            })
            .is_err()
        {
            return Ok(());
        }
        loop {
            let mut buf = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        let _ = ctx.blocking_send(Err(e));
                        return Ok(());
                    }
                }
            }
            if filled == 0 {
                return Ok(());
            }
            buf.truncate(filled);
            // The writer hangs up when the blob is already stored: skip the rest of it.
            if ctx.blocking_send(Ok(buf)).is_err() {
                return Ok(());
            }
        }
    }

    if path.is_dir() {
        let mut files = vec![PathBuf::from("index.json")];
        let blobs = path.join("blobs");
        for algo in std::fs::read_dir(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))? {
            let algo = algo.map_err(|e| e.to_string())?;
            for blob in std::fs::read_dir(algo.path()).map_err(|e| e.to_string())? {
                let blob = blob.map_err(|e| e.to_string())?;
                files.push(
                    Path::new("blobs")
                        .join(algo.file_name())
                        .join(blob.file_name()),
                );
            }
        }
        for rel in files {
            let full = path.join(&rel);
            let mut f =
                std::fs::File::open(&full).map_err(|e| format!("{}: {e}", full.display()))?;
            let size = f.metadata().map_err(|e| e.to_string())?.len();
            send_file(&mut f, &rel, size, &tx)?;
        }
        return Ok(());
    }
    let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(CHUNK, file));
    for entry in archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("corrupt tar archive: {e}"))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let rel = entry.path().map_err(|e| e.to_string())?.into_owned();
        let size = entry.size();
        send_file(&mut entry, &rel, size, &tx)?;
    }
    Ok(())
}

pub(crate) fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

impl Ctd {
    /// A containerd lease that protects what is written under it from garbage collection;
    /// it expires by itself if we die before dropping it.
    pub(crate) async fn temporary_lease(&self, prefix: &str) -> Result<String, ProvisionError> {
        let id = format!("{prefix}-{}", unique_suffix());
        let mut labels = HashMap::new();
        labels.insert("containerd.io/gc.expire".to_string(), rfc3339_in(3600));
        self.leases()
            .create(self.req(CreateLeaseRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(|s| self.status("create a containerd lease", s))?;
        Ok(id)
    }

    pub(crate) async fn drop_lease(&self, id: String) {
        let _ = self
            .leases()
            .delete(self.req(DeleteLeaseRequest { id, sync: false }))
            .await;
    }

    pub(crate) async fn content_exists(&self, digest: &str) -> Result<bool, ProvisionError> {
        match self
            .content()
            .info(self.req(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if is_not_found(&s) => Ok(false),
            Err(s) => Err(self.status("look up content", s)),
        }
    }

    /// Streams one blob into the content store; containerd verifies size and digest on commit.
    /// Every call ingests under a ref of its own, and a failed ingest is aborted, so nothing of
    /// a broken upload stays behind (an error in `chunks` stops it before the commit).
    pub(crate) async fn write_blob(
        &self,
        lease: &str,
        digest: &str,
        size: u64,
        mut chunks: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    ) -> Result<(), ProvisionError> {
        let reference = format!("shale-import-{digest}-{}", unique_suffix());
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
        let feeder_ref = reference.clone();
        let feeder_digest = digest.to_string();
        let feeder = tokio::spawn(async move {
            let mut offset = 0i64;
            while let Some(chunk) = chunks.recv().await {
                let data = chunk.map_err(|e| e.to_string())?;
                let len = data.len() as i64;
                let msg = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: feeder_ref.clone(),
                    total: size as i64,
                    expected: feeder_digest.clone(),
                    offset,
                    data,
                    labels: HashMap::new(),
                };
                offset += len;
                if tx.send(msg).await.is_err() {
                    return Err("containerd closed the upload".to_string());
                }
            }
            let commit = WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: feeder_ref,
                total: size as i64,
                expected: feeder_digest,
                offset,
                data: Vec::new(),
                labels: HashMap::new(),
            };
            let _ = tx.send(commit).await;
            Ok::<(), String>(())
        });
        let mut req = self.req_leased(ReceiverStream::new(rx), lease);
        req.set_timeout(std::time::Duration::from_secs(3600));
        let result = async {
            // Another import stored the same blob meanwhile: content is addressed by digest,
            // so theirs is ours.
            let mut responses = match self.content().write(req).await {
                Ok(r) => r.into_inner(),
                Err(s) if is_already_exists(&s) => return Ok(Written::Exists),
                Err(s) => return Err(self.status("store an image blob", s)),
            };
            let mut committed = Written::Unconfirmed;
            while let Some(resp) = responses.next().await {
                let resp = match resp {
                    Ok(r) => r,
                    Err(s) if is_already_exists(&s) => return Ok(Written::Exists),
                    Err(s) => return Err(self.status("store an image blob", s)),
                };
                if resp.action == WriteAction::Commit as i32 {
                    committed = Written::Committed;
                }
            }
            Ok::<Written, ProvisionError>(committed)
        }
        .await;
        let fed = feeder.await.unwrap_or_else(|e| Err(e.to_string()));
        let outcome = match (result, fed) {
            (Ok(Written::Committed), Ok(())) => Ok(()),
            // containerd hung up on the feeder once it knew the blob: its error is no failure.
            (Ok(Written::Exists), _) => Ok(()),
            (Err(e), _) => Err(e),
            (_, Err(reason)) => Err(ProvisionError::Runtime {
                action: format!("store image blob {digest}"),
                status: reason,
            }),
            (Ok(Written::Unconfirmed), Ok(())) => Err(ProvisionError::Runtime {
                action: format!("store image blob {digest}"),
                status: "containerd did not confirm the commit".into(),
            }),
        };
        if outcome.is_err() {
            // An ingest that was never committed is not content: drop what it wrote rather
            // than leave it for the lease's expiry. Best effort: it may never have started.
            let _ = self
                .content()
                .abort(self.req(AbortRequest { r#ref: reference }))
                .await;
        }
        outcome
    }

    async fn set_content_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), ProvisionError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = ContentInfo {
            digest: digest.to_string(),
            labels,
            ..Default::default()
        };
        self.content()
            .update(self.req(UpdateContentRequest {
                info: Some(info),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|s| self.status("label image content", s))?;
        Ok(())
    }

    pub(crate) async fn read_content(&self, digest: &str) -> Result<Vec<u8>, ProvisionError> {
        let mut stream = self
            .content()
            .read(self.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| self.status("read image content", s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(part) = stream.next().await {
            out.extend_from_slice(&part.map_err(|s| self.status("read image content", s))?.data);
        }
        Ok(out)
    }

    /// Imports an OCI image archive or layout directory and unpacks it for the overlayfs snapshotter.
    pub(crate) async fn import(&self, path: &Path) -> Result<ImageRef, ProvisionError> {
        let invalid = |reason: String| ProvisionError::ImageInvalid {
            path: path.to_path_buf(),
            reason,
        };
        if !path.exists() {
            return Err(invalid("no such file or directory".into()));
        }
        let lease = self.temporary_lease("shale-import").await?;
        let result = self.import_leased(path, &lease).await;
        self.drop_lease(lease).await;
        result.map_err(|e| match e {
            ProvisionError::Runtime { action, status } => invalid(format!("{action}: {status}")),
            other => other,
        })
    }

    async fn import_leased(&self, path: &Path, lease: &str) -> Result<ImageRef, ProvisionError> {
        let invalid = |reason: String| ProvisionError::ImageInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let (tx, mut rx) = mpsc::channel(2);
        let owned = path.to_path_buf();
        let reader = tokio::task::spawn_blocking(move || read_archive(owned, tx));
        let mut small: HashMap<String, Vec<u8>> = HashMap::new();
        let mut index = None;
        let mut stored = 0usize;
        while let Some(item) = rx.recv().await {
            match item {
                ArchiveItem::Index(data) => index = Some(data),
                ArchiveItem::Small { digest, data } => {
                    if !self.content_exists(&digest).await? {
                        let (ctx, crx) = mpsc::channel(1);
                        let _ = ctx.send(Ok(data.clone())).await;
                        drop(ctx);
                        self.write_blob(lease, &digest, data.len() as u64, crx)
                            .await?;
                        stored += 1;
                    }
                    small.insert(digest, data);
                }
                ArchiveItem::Large {
                    digest,
                    size,
                    chunks,
                } => {
                    if !self.content_exists(&digest).await? {
                        self.write_blob(lease, &digest, size, chunks).await?;
                        stored += 1;
                    }
                }
            }
        }
        reader
            .await
            .map_err(|e| invalid(e.to_string()))?
            .map_err(invalid)?;
        debug!(stored, "image blobs written");

        let index: OciIndex =
            serde_json::from_slice(&index.ok_or_else(|| invalid("no index.json".into()))?)
                .map_err(|e| invalid(format!("index.json: {e}")))?;
        let top = index
            .manifests
            .iter()
            .find(|d| platform_matches(d))
            .cloned()
            .ok_or_else(|| invalid("index.json lists no linux/amd64 image".into()))?;
        let name = top
            .annotations
            .get("io.containerd.image.name")
            .or_else(|| top.annotations.get("org.opencontainers.image.ref.name"))
            .cloned()
            .unwrap_or_else(|| format!("import/{}", top.digest.replace(':', "-")));
        let blob = |d: &str| {
            small
                .get(d)
                .ok_or_else(|| invalid(format!("blob {d} missing from the archive")))
        };

        let mut manifest_desc = top.clone();
        let mut index_child = None;
        if top.media_type == MEDIA_INDEX || top.media_type == MEDIA_DOCKER_LIST {
            let nested: OciIndex = serde_json::from_slice(blob(&top.digest)?)
                .map_err(|e| invalid(format!("image index: {e}")))?;
            let m = nested
                .manifests
                .iter()
                .find(|d| platform_matches(d))
                .cloned()
                .ok_or_else(|| invalid("image index lists no linux/amd64 manifest".into()))?;
            index_child = Some(m.digest.clone());
            manifest_desc = m;
        }
        let manifest: OciManifest = serde_json::from_slice(blob(&manifest_desc.digest)?)
            .map_err(|e| invalid(format!("manifest: {e}")))?;
        let config: OciConfig = serde_json::from_slice(blob(&manifest.config.digest)?)
            .map_err(|e| invalid(format!("image config: {e}")))?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(invalid(
                "the manifest's layers do not match the config's diff_ids".into(),
            ));
        }
        let target = Descriptor {
            media_type: if top.media_type.is_empty() {
                MEDIA_MANIFEST.to_string()
            } else {
                top.media_type.clone()
            },
            digest: top.digest.clone(),
            size: top.size,
            annotations: HashMap::new(),
        };
        let installed = InstalledImage {
            name: &name,
            target,
            index_child: index_child.as_deref(),
            manifest_digest: &manifest_desc.digest,
            manifest: &manifest,
            config: &config,
        };
        self.install(&installed, lease).await?;
        info!(image = %name, digest = %top.digest, "image imported");
        Ok(ImageRef(name))
    }

    /// Links an image's blobs (all already in the content store) for the garbage collector,
    /// unpacks its layers and records the image under its name: the last steps of an archive
    /// import and of a registry pull alike.
    pub(crate) async fn install(
        &self,
        image: &InstalledImage<'_>,
        lease: &str,
    ) -> Result<(), ProvisionError> {
        let manifest = image.manifest;
        let config = image.config;
        if let Some(child) = image.index_child {
            let mut labels = HashMap::new();
            labels.insert(
                "containerd.io/gc.ref.content.m.0".to_string(),
                child.to_string(),
            );
            self.set_content_labels(&image.target.digest, labels)
                .await?;
        }
        let chains = chain_ids(&config.rootfs.diff_ids);

        // Garbage-collection references: image -> manifest -> config + layers, config -> snapshot.
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/gc.ref.content.config".to_string(),
            manifest.config.digest.clone(),
        );
        for (i, layer) in manifest.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        self.set_content_labels(image.manifest_digest, labels)
            .await?;
        if let Some(top_chain) = chains.last() {
            let mut labels = HashMap::new();
            labels.insert(
                format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                top_chain.clone(),
            );
            self.set_content_labels(&manifest.config.digest, labels)
                .await?;
        }
        for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            let mut labels = HashMap::new();
            labels.insert("containerd.io/uncompressed".to_string(), diff_id.clone());
            self.set_content_labels(&layer.digest, labels).await?;
        }

        self.unpack(&manifest.layers, &config.rootfs.diff_ids, Some(lease))
            .await?;

        let record = Image {
            name: image.name.to_string(),
            labels: HashMap::new(),
            target: Some(image.target.clone()),
            created_at: None,
            updated_at: None,
        };
        let mut images: ImagesClient<_> = self.images();
        match images
            .create(self.req(CreateImageRequest {
                image: Some(record.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => {}
            Err(s) if is_already_exists(&s) => {
                images
                    .update(self.req(UpdateImageRequest {
                        image: Some(record),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into()],
                        }),
                        source_date_epoch: None,
                    }))
                    .await
                    .map_err(|s| self.status("record the image", s))?;
            }
            Err(s) => return Err(self.status("record the image", s)),
        }
        Ok(())
    }

    /// Applies each layer onto its parent snapshot, skipping the ones already unpacked.
    async fn unpack(
        &self,
        layers: &[OciDescriptor],
        diff_ids: &[String],
        lease: Option<&str>,
    ) -> Result<(), ProvisionError> {
        let chains = chain_ids(diff_ids);
        for (i, layer) in layers.iter().enumerate() {
            let chain = &chains[i];
            if self.snapshot_exists(chain).await? {
                continue;
            }
            let parent = if i == 0 {
                String::new()
            } else {
                chains[i - 1].clone()
            };
            let key = format!("shale-extract-{}-{chain}", unique_suffix());
            let prepare = PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.clone(),
                parent,
                labels: HashMap::new(),
            };
            let req = match lease {
                Some(l) => self.req_leased(prepare, l),
                None => self.req(prepare),
            };
            let mounts = self
                .snapshots()
                .prepare(req)
                .await
                .map_err(|s| self.status("prepare a snapshot for unpacking", s))?
                .into_inner()
                .mounts;
            let applied = async {
                let mut req = self.req(ApplyRequest {
                    diff: Some(Descriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.clone(),
                        size: layer.size,
                        annotations: HashMap::new(),
                    }),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                });
                req.set_timeout(std::time::Duration::from_secs(1800));
                let applied = self
                    .diff()
                    .apply(req)
                    .await
                    .map_err(|s| self.status("unpack an image layer", s))?
                    .into_inner()
                    .applied
                    .map(|d| d.digest)
                    .unwrap_or_default();
                if applied != diff_ids[i] {
                    return Err(ProvisionError::Runtime {
                        action: "unpack an image layer".into(),
                        status: format!(
                            "layer {} unpacked to {applied}, expected {}",
                            layer.digest, diff_ids[i]
                        ),
                    });
                }
                let commit = CommitSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    name: chain.clone(),
                    key: key.clone(),
                    labels: HashMap::new(),
                };
                let req = match lease {
                    Some(l) => self.req_leased(commit, l),
                    None => self.req(commit),
                };
                match self.snapshots().commit(req).await {
                    Ok(_) => Ok(true),
                    // Someone else unpacked the same layer meanwhile: theirs is as good as ours.
                    Err(s) if is_already_exists(&s) => Ok(false),
                    Err(s) => Err(self.status("commit an unpacked layer", s)),
                }
            }
            .await;
            if !matches!(applied, Ok(true)) {
                let _ = self
                    .snapshots()
                    .remove(self.req(RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key,
                    }))
                    .await;
            }
            applied?;
        }
        Ok(())
    }

    pub(crate) async fn snapshot_exists(&self, key: &str) -> Result<bool, ProvisionError> {
        match self
            .snapshots()
            .stat(self.req(StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.to_string(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if is_not_found(&s) => Ok(false),
            Err(s) => Err(self.status("look up a snapshot", s)),
        }
    }

    /// The descriptor an image's record points at (a manifest or an index).
    pub(crate) async fn image_target(
        &self,
        image: &ImageRef,
    ) -> Result<containerd_client::types::Descriptor, ProvisionError> {
        let missing = || ProvisionError::ImageMissing {
            image: image.to_string(),
        };
        match self
            .images()
            .get(self.req(GetImageRequest {
                name: image.to_string(),
            }))
            .await
        {
            Ok(resp) => resp
                .into_inner()
                .image
                .and_then(|i| i.target)
                .ok_or_else(missing),
            Err(s) if is_not_found(&s) => Err(missing()),
            Err(s) => Err(self.status("look up the image", s)),
        }
    }

    /// Finds an image by name and makes sure its layers are unpacked.
    pub(crate) async fn resolve_image(
        &self,
        image: &ImageRef,
    ) -> Result<ResolvedImage, ProvisionError> {
        let missing = || ProvisionError::ImageMissing {
            image: image.to_string(),
        };
        let target = self.image_target(image).await?;
        let read = |digest: String| async move {
            self.read_content(&digest).await.map_err(|e| match e {
                ProvisionError::Runtime { .. } => missing(),
                other => other,
            })
        };
        let mut manifest_digest = target.digest.clone();
        if target.media_type == MEDIA_INDEX || target.media_type == MEDIA_DOCKER_LIST {
            let idx: OciIndex = serde_json::from_slice(&read(target.digest.clone()).await?)
                .map_err(|_| missing())?;
            manifest_digest = idx
                .manifests
                .iter()
                .find(|d| platform_matches(d))
                .ok_or_else(missing)?
                .digest
                .clone();
        }
        let manifest: OciManifest =
            serde_json::from_slice(&read(manifest_digest).await?).map_err(|_| missing())?;
        let config: OciConfig =
            serde_json::from_slice(&read(manifest.config.digest.clone()).await?)
                .map_err(|_| missing())?;
        let chain_id = chain_ids(&config.rootfs.diff_ids)
            .pop()
            .ok_or_else(missing)?;
        if !self.snapshot_exists(&chain_id).await? {
            let lease = self.temporary_lease("shale-unpack").await?;
            let unpacked = self
                .unpack(&manifest.layers, &config.rootfs.diff_ids, Some(&lease))
                .await;
            self.drop_lease(lease).await;
            unpacked?;
        }
        Ok(ResolvedImage {
            name: image.to_string(),
            chain_id,
            config: config.config,
        })
    }
}

/// An RFC 3339 UTC timestamp `secs` seconds from now (containerd's lease expiry label format).
fn rfc3339_in(secs: u64) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + secs;
    let (days, rem) = (t / 86400, t % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_of_one_layer_is_its_diff_id_and_stacks_hash_parent_and_child() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a);
        let expected = format!("sha256:{:x}", Sha256::digest(b"sha256:aaaa sha256:bbbb"));
        assert_eq!(chains[1], expected);
    }

    #[test]
    fn civil_dates_match_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn blob_paths_map_to_digests() {
        assert_eq!(
            digest_of_blob_path(Path::new("blobs/sha256/abc")).as_deref(),
            Some("sha256:abc")
        );
        assert_eq!(
            digest_of_blob_path(Path::new("./blobs/sha256/abc")).as_deref(),
            Some("sha256:abc")
        );
        assert_eq!(digest_of_blob_path(Path::new("index.json")), None);
        assert_eq!(digest_of_blob_path(Path::new("blobs/sha256/abc/x")), None);
    }
}
