//! Images from OCI registries, pulled into containerd's content store and unpacked like an
//! archive import.
//!
//! containerd 1.6's gRPC API does not pull for us, so this module is the client: `oci-client`
//! speaks the distribution protocol (auth challenges, tokens, manifests, blob streams) and we
//! do the rest the way `ctr pull` does:
//!
//! 1. resolve the reference to a manifest (an index is narrowed to linux/amd64 with the same
//!    rule as archive imports, [`platform_matches`]);
//! 2. fetch every blob the manifest names, children first: layers are streamed in bounded
//!    chunks straight into a containerd ingest whose expected digest is set, and config,
//!    manifest and index are small documents checked in memory;
//! 3. link, unpack and record the image with [`Ctd::install`], the same code as an import.
//!
//! Every blob is checked against its SHA-256 twice: `oci-client`'s verifying stream fails the
//! last read of a blob whose bytes do not hash to its digest, which stops the ingest before its
//! commit, and containerd refuses a commit whose bytes do not match the expected digest. A blob
//! that fails either way is never committed.
//!
//! Layer contents are applied by containerd's diff service (the `walking` applier): it resolves
//! every tar entry, hard link and symlink target inside the snapshot's root, so an entry that
//! names `../x` or an absolute path outside lands inside the root instead of escaping it.
//! Compression is containerd's business too: gzip and zstd layers, OCI and Docker media types.

mod config;
mod failure;
mod locks;
mod manifest;

pub use config::{RegistryAuth, RegistryConfig};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use containerd_client::services::v1::{AddResourceRequest, Resource};
use containerd_client::types::Descriptor;
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{Client, Reference};

use crate::store_room::StoreRoom;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::ctd::Ctd;
use crate::image::{
    platform_matches, InstalledImage, OciConfig, OciDescriptor, OciIndex, CHUNK, SMALL_BLOB,
};
use crate::{ImageRef, ProvisionError};
use failure::{classify, classify_io, Failure};
use locks::KeyedLocks;
use manifest::{
    check_digest, kind_of, parse_manifest, sha256_of, ACCEPTED_MANIFESTS, CONFIG_LIMIT,
};

/// Tries of one registry request before a transient failure becomes the pull's error.
const TRIES: usize = 4;
/// A progress line every this many bytes of one blob.
const PROGRESS_EVERY: u64 = 64 << 20;

/// What [`crate::Provisioner::pull_image`] did.
#[derive(Clone, Debug)]
pub struct PulledImage {
    /// The name the image is recorded under in containerd (the full reference, e.g.
    /// `registry.example/team/cuda:12.4` or `…@sha256:…`): pass it to `has_image` and leases.
    pub image: ImageRef,
    /// The digest the reference resolved to (an index's digest for a multi-arch image): pin
    /// the image to this, `REGISTRY/REPO@DIGEST` pulls exactly this again.
    pub digest: String,
    /// The digest of the linux/amd64 manifest whose layers were unpacked (equal to `digest`
    /// for a single-platform image).
    pub manifest_digest: String,
    /// Bytes fetched from the registry by this pull (0 when everything was already present).
    pub bytes: u64,
    /// The image's size as its manifest states it: config plus compressed layers.
    pub size: u64,
    /// Wall time of the pull, waiting for a concurrent pull of the same reference included.
    pub took: Duration,
}

/// Counters of every pull since the provisioner connected, for the gateway to export.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PullStats {
    /// Pulls that ended with the image installed.
    pub pulls_ok: u64,
    /// Pulls that ended with an error.
    pub pulls_failed: u64,
    /// Pulls running now.
    pub in_flight: u64,
    /// Blobs fetched from registries and committed (skipped ones, already present, not counted).
    pub blobs_fetched: u64,
    /// Bytes received from registries, counted as they arrive (failed attempts included).
    pub bytes: u64,
    /// Seconds spent in finished pulls, successful or not.
    pub seconds: f64,
}

/// The registry side of a [`crate::Provisioner`]: in-flight pulls and their counters.
pub(crate) struct Puller {
    /// What every pull must leave free on the image store's disk.
    room: StoreRoom,
    /// One lock per reference and per blob digest, so that concurrent pulls of one image
    /// share its transfer: the first holder fetches, the others then find the content present.
    locks: KeyedLocks,
    ok: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    blobs: AtomicU64,
    bytes: AtomicU64,
    micros: AtomicU64,
}

impl Puller {
    pub(crate) fn new(room: StoreRoom) -> Self {
        Puller {
            room,
            locks: KeyedLocks::default(),
            ok: AtomicU64::default(),
            failed: AtomicU64::default(),
            in_flight: AtomicU64::default(),
            blobs: AtomicU64::default(),
            bytes: AtomicU64::default(),
            micros: AtomicU64::default(),
        }
    }

    pub(crate) fn stats(&self) -> PullStats {
        PullStats {
            pulls_ok: self.ok.load(Ordering::Relaxed),
            pulls_failed: self.failed.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            blobs_fetched: self.blobs.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            seconds: self.micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Pulls `reference` with the credentials of the matching entry of `registries` (anonymous
    /// HTTPS when none matches) and installs it for the overlayfs snapshotter.
    pub(crate) async fn pull(
        &self,
        ctd: &Ctd,
        reference: &str,
        registries: &[RegistryConfig],
    ) -> Result<PulledImage, ProvisionError> {
        let started = Instant::now();
        let parsed: Reference = reference
            .trim()
            .parse()
            .map_err(
                |e: oci_client::ParseError| ProvisionError::ReferenceInvalid {
                    reference: reference.to_string(),
                    reason: e.to_string(),
                },
            )?;
        let config = registries
            .iter()
            .find(|r| r.host == parsed.registry())
            .cloned()
            .unwrap_or_else(|| RegistryConfig::anonymous(parsed.registry()));
        let in_flight = InFlight::enter(&self.in_flight);
        let span = info_span!("pull", reference = %parsed.whole());
        let result = async {
            let _whole = self.locks.lock(&format!("ref:{}", parsed.whole())).await;
            let pull = Pull::new(self, ctd, parsed, config);
            let lease = ctd.temporary_lease("shale-pull").await?;
            let result = pull.run(&lease).await;
            ctd.drop_lease(lease).await;
            result.map_err(|f| pull.error(f))
        }
        .instrument(span)
        .await;
        let took = started.elapsed();
        drop(in_flight);
        self.micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(mut pulled) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                pulled.took = took;
                info!(image = %pulled.image, digest = %pulled.digest, bytes = pulled.bytes,
                      size = pulled.size, took = ?took, "image pulled");
                Ok(pulled)
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                warn!(reference, error = %e, took = ?took, "image pull failed");
                Err(e)
            }
        }
    }
}

/// Counts a pull as running until it ends, also when its caller drops it half way.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One pull of one reference.
struct Pull<'a> {
    puller: &'a Puller,
    ctd: &'a Ctd,
    client: Client,
    auth: OciAuth,
    reference: Reference,
    registry: String,
    /// Bytes this pull received.
    fetched: AtomicU64,
}

impl<'a> Pull<'a> {
    fn new(puller: &'a Puller, ctd: &'a Ctd, reference: Reference, config: RegistryConfig) -> Self {
        let protocol = if config.insecure_http {
            ClientProtocol::HttpsExcept(vec![reference.resolve_registry().to_string()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            // We narrow indexes ourselves, with the rule archive imports use.
            platform_resolver: None,
            // A registry that stops answering becomes a transient error, then a retry.
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        let auth = match config.auth {
            RegistryAuth::Anonymous => OciAuth::Anonymous,
            RegistryAuth::Basic { username, password } => OciAuth::Basic(username, password),
            RegistryAuth::Bearer { token } => OciAuth::Bearer(token),
        };
        Pull {
            puller,
            ctd,
            client,
            auth,
            registry: reference.registry().to_string(),
            reference,
            fetched: AtomicU64::new(0),
        }
    }

    /// Names a failure with the registry and the reference, as the provider reads it.
    fn error(&self, f: Failure) -> ProvisionError {
        let registry = self.registry.clone();
        let reference = self.reference.whole();
        match f {
            Failure::Transient(reason) => ProvisionError::RegistryUnavailable {
                registry,
                reference,
                tries: TRIES,
                reason,
            },
            Failure::Unauthorized => ProvisionError::RegistryUnauthorized {
                registry,
                reference,
            },
            Failure::NotFound(reason) => ProvisionError::ImageNotFound {
                registry,
                reference,
                reason,
            },
            Failure::Refused(reason) => ProvisionError::RegistryRefused {
                registry,
                reference,
                reason,
            },
            Failure::Mismatch { expected, actual } => ProvisionError::DigestMismatch {
                reference,
                expected,
                actual,
            },
            Failure::Invalid(reason) => ProvisionError::ManifestInvalid { reference, reason },
            Failure::Store(ProvisionError::Runtime { action, status })
                if status.contains("no space left on device") =>
            {
                ProvisionError::ImageStoreFull {
                    reference,
                    reason: format!("{action}: {status}"),
                }
            }
            Failure::Store(e) => e,
        }
    }

    /// Runs one registry request, again after a transient failure, with exponential backoff
    /// (0.5 s, 1 s, 2 s: four tries); a refusal (401, 404, a digest mismatch) is final at once.
    async fn retried<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(4))
            .with_max_times(TRIES - 1);
        f.retry(backoff)
            .when(Failure::is_transient)
            .notify(|e, after| {
                warn!(registry = %self.registry, reference = %self.reference, what, error = ?e,
                      retry_in = ?after, "registry request failed; retrying");
            })
            .await
    }

    async fn run(&self, lease: &str) -> Result<PulledImage, Failure> {
        // The top document: by digest it may already be here (no network needed); by tag the
        // registry is asked every time, since a tag moves.
        let (top, top_digest) = match self.reference.digest() {
            Some(d) => {
                check_digest(d)?;
                let data = self.manifest(d).await?;
                (data, d.to_string())
            }
            None => {
                let data = self.manifest_by_reference(&self.reference).await?;
                let digest = sha256_of(&data);
                (data, digest)
            }
        };
        let (top_type, is_index) = kind_of(&top)?;
        let (manifest_bytes, manifest_digest, index_child) = if is_index {
            let index: OciIndex = serde_json::from_slice(&top)
                .map_err(|e| Failure::Invalid(format!("image index: {e}")))?;
            let chosen = index
                .manifests
                .iter()
                .find(|d| platform_matches(d))
                .ok_or_else(|| Failure::Invalid("the index lists no linux/amd64 image".into()))?;
            check_digest(&chosen.digest)?;
            let data = self.manifest(&chosen.digest).await?;
            let (_, nested) = kind_of(&data)?;
            if nested {
                return Err(Failure::Invalid("an index inside an index".into()));
            }
            (data, chosen.digest.clone(), Some(chosen.digest.clone()))
        } else {
            (top.clone(), top_digest.clone(), None)
        };
        let manifest = parse_manifest(&manifest_bytes)?;
        let config_bytes = self.small_blob(&manifest.config, CONFIG_LIMIT).await?;
        let config: OciConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| Failure::Invalid(format!("image config: {e}")))?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(Failure::Invalid(format!(
                "the manifest lists {} layers but the config {} diff_ids",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        for diff_id in &config.rootfs.diff_ids {
            check_digest(diff_id)?;
        }
        let size = manifest.config.size as u64
            + manifest.layers.iter().map(|l| l.size as u64).sum::<u64>();
        info!(reference = %self.reference, digest = %top_digest, layers = manifest.layers.len(),
              size, "pulling image");
        // Refused before a layer is written, not when the disk is already full.
        self.puller.room.check(size).map_err(|reason| {
            Failure::Store(ProvisionError::ImageStoreFull {
                reference: self.reference.whole(),
                reason,
            })
        })?;

        // Children before parents, as containerd's own pull does: a manifest in the store
        // always has its layers there, whatever point a failure stops us at.
        let count = manifest.layers.len();
        for (i, layer) in manifest.layers.iter().enumerate() {
            self.layer(layer, i, count, lease).await?;
        }
        self.store_small(&manifest.config.digest, config_bytes, lease)
            .await?;
        self.store_small(&manifest_digest, manifest_bytes, lease)
            .await?;
        let top_size = top.len() as i64;
        if is_index {
            self.store_small(&top_digest, top, lease).await?;
        }

        let name = self.reference.whole();
        let installed = InstalledImage {
            name: &name,
            target: Descriptor {
                media_type: top_type,
                digest: top_digest.clone(),
                size: top_size,
                annotations: HashMap::new(),
            },
            index_child: index_child.as_deref(),
            manifest_digest: &manifest_digest,
            manifest: &manifest,
            config: &config,
        };
        self.ctd.install(&installed, lease).await?;
        Ok(PulledImage {
            image: ImageRef(name),
            digest: top_digest,
            manifest_digest,
            bytes: self.fetched.load(Ordering::Relaxed),
            size,
            took: Duration::ZERO,
        })
    }

    /// The document a tag (or digest) names, from the registry.
    async fn manifest_by_reference(&self, reference: &Reference) -> Result<Vec<u8>, Failure> {
        let data = self
            .retried("manifest", || async {
                let (data, _) = self
                    .client
                    .pull_manifest_raw(reference, &self.auth, &ACCEPTED_MANIFESTS)
                    .await
                    .map_err(classify)?;
                Ok(data)
            })
            .await?;
        if data.len() as u64 > SMALL_BLOB {
            return Err(Failure::Invalid(format!(
                "the manifest is {} bytes, more than the {SMALL_BLOB} allowed",
                data.len()
            )));
        }
        self.count(data.len() as u64);
        Ok(data.to_vec())
    }

    /// A manifest or index by digest: from the content store when it is there (containerd
    /// verified it when it was committed), else from the registry, checked here.
    async fn manifest(&self, digest: &str) -> Result<Vec<u8>, Failure> {
        if self.ctd.content_exists(digest).await? {
            return Ok(self.ctd.read_content(digest).await?);
        }
        let data = self
            .manifest_by_reference(&self.reference.clone_with_digest(digest.to_string()))
            .await?;
        let actual = sha256_of(&data);
        if actual != digest {
            return Err(Failure::Mismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(data)
    }

    /// A small blob (the config) into memory, from the content store or the registry.
    async fn small_blob(&self, desc: &OciDescriptor, limit: u64) -> Result<Vec<u8>, Failure> {
        if self.ctd.content_exists(&desc.digest).await? {
            return Ok(self.ctd.read_content(&desc.digest).await?);
        }
        let data = self
            .retried("config", || async {
                let mut stream = self
                    .client
                    .pull_blob_stream(&self.reference, desc.digest.as_str())
                    .await
                    .map_err(classify)?;
                let mut data = Vec::new();
                while let Some(part) = stream.next().await {
                    let part = part.map_err(classify_io)?;
                    self.count(part.len() as u64);
                    data.extend_from_slice(&part);
                    if data.len() as u64 > limit {
                        return Err(Failure::Invalid(format!(
                            "blob {} is larger than {limit} bytes",
                            desc.digest
                        )));
                    }
                }
                Ok(data)
            })
            .await?;
        self.puller.blobs.fetch_add(1, Ordering::Relaxed);
        let actual = sha256_of(&data);
        if actual != desc.digest {
            return Err(Failure::Mismatch {
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(data)
    }

    /// Commits a verified small document unless it is already stored.
    async fn store_small(&self, digest: &str, data: Vec<u8>, lease: &str) -> Result<(), Failure> {
        if self.ctd.content_exists(digest).await? {
            self.ctd.keep_under_lease(lease, digest).await?;
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(1);
        let size = data.len() as u64;
        let _ = tx.send(Ok(data)).await;
        drop(tx);
        self.ctd.write_blob(lease, digest, size, rx).await?;
        Ok(())
    }

    /// Fetches one layer into the content store unless it is there already.
    async fn layer(
        &self,
        layer: &OciDescriptor,
        index: usize,
        count: usize,
        lease: &str,
    ) -> Result<(), Failure> {
        // Pulls of different references that share a layer fetch it once.
        let _blob = self
            .puller
            .locks
            .lock(&format!("blob:{}", layer.digest))
            .await;
        if self.ctd.content_exists(&layer.digest).await? {
            // Present, perhaps left by an earlier pull that failed later on: keep it from the
            // garbage collector until this pull has linked it to its manifest.
            self.ctd.keep_under_lease(lease, &layer.digest).await?;
            debug!(layer = %layer.digest, "layer already present");
            return Ok(());
        }
        let started = Instant::now();
        // An interrupted transfer starts the blob again from its first byte, under a fresh
        // ingest ref, and the failed ingest is aborted (see `Ctd::write_blob`): resuming would
        // need the ingested prefix hashed again to keep the digest check end to end, and a
        // blob is restarted at most three times. Layers already committed by a failed pull are
        // kept, so a second pull resumes at the first missing layer.
        let fetched = self
            .retried("layer", || self.layer_once(layer, lease))
            .await?;
        self.puller.blobs.fetch_add(1, Ordering::Relaxed);
        info!(reference = %self.reference, layer = index + 1, of = count, digest = %layer.digest,
              bytes = fetched, took = ?started.elapsed(), "layer fetched");
        Ok(())
    }

    /// One attempt at one layer: the registry's body is cut into chunks of at most [`CHUNK`]
    /// bytes and streamed into a containerd ingest, so memory stays bounded whatever its size.
    async fn layer_once(&self, layer: &OciDescriptor, lease: &str) -> Result<u64, Failure> {
        let size = layer.size as u64;
        // A descriptor given as a bare digest: the layer's `urls` (foreign sources) are never
        // followed, so bytes only ever come from the registry the provider configured.
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, layer.digest.as_str())
            .await
            .map_err(classify)?;
        let (tx, rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        let pump = async move {
            let mut done = 0u64;
            let mut next_report = PROGRESS_EVERY;
            let mut buf = Vec::with_capacity(CHUNK);
            while let Some(part) = stream.next().await {
                let part = match part {
                    Ok(p) => p,
                    Err(e) => {
                        // Tell the writer to stop before its commit: an error in the stream.
                        let _ = tx.send(Err(std::io::Error::other("fetch failed"))).await;
                        return Err(classify_io(e));
                    }
                };
                done += part.len() as u64;
                self.count(part.len() as u64);
                if done > size {
                    let _ = tx.send(Err(std::io::Error::other("oversized"))).await;
                    return Err(Failure::Invalid(format!(
                        "layer {} is larger than the {size} bytes its manifest states",
                        layer.digest
                    )));
                }
                buf.extend_from_slice(&part);
                if buf.len() >= CHUNK && tx.send(Ok(std::mem::take(&mut buf))).await.is_err() {
                    // containerd hung up: the writer's error says why.
                    return Ok(done);
                }
                if done >= next_report {
                    info!(reference = %self.reference, digest = %layer.digest, done, size,
                          "layer progress");
                    next_report += PROGRESS_EVERY;
                }
            }
            if !buf.is_empty() {
                let _ = tx.send(Ok(buf)).await;
            }
            Ok(done)
        };
        let (fetched, stored) =
            tokio::join!(pump, self.ctd.write_blob(lease, &layer.digest, size, rx));
        let fetched = fetched?;
        stored?;
        Ok(fetched)
    }

    fn count(&self, n: u64) {
        self.fetched.fetch_add(n, Ordering::Relaxed);
        self.puller.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

impl Ctd {
    /// Adds content that is already stored to a lease, so the garbage collector keeps it until
    /// the image that references it is recorded.
    pub(crate) async fn keep_under_lease(
        &self,
        lease: &str,
        digest: &str,
    ) -> Result<(), ProvisionError> {
        self.leases()
            .add_resource(self.req(AddResourceRequest {
                id: lease.to_string(),
                resource: Some(Resource {
                    id: digest.to_string(),
                    r#type: "content".into(),
                }),
            }))
            .await
            .map_err(|s| self.status("hold image content under a lease", s))?;
        Ok(())
    }
}
