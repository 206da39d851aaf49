//! The SP's image catalog: named images, each pulled from a registry or imported from an OCI
//! archive, and known to orders by digest.
//!
//! An order names the digest of the image it runs (the chain holds it in the order's terms), so
//! a container is only ever created from exactly that content: a tag that moved on the registry
//! since the catalog was published changes nothing for the orders placed against it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use containerd_client::services::v1::ListImagesRequest;
use serde::Deserialize;
use tracing::{info, warn};

use crate::ctd::Ctd;
use crate::{ImageRef, ProvisionError, Provisioner, RegistryConfig};

/// One image of the catalog, as the SP's config names it (`[images.NAME]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CatalogImage {
    /// Pulled from a registry: `REGISTRY/REPO:TAG` or `REGISTRY/REPO@sha256:…`.
    #[serde(default)]
    pub reference: Option<String>,
    /// Imported from an OCI archive (or layout directory) on this machine.
    #[serde(default)]
    pub archive: Option<PathBuf>,
    /// What the image holds, for clients choosing one.
    #[serde(default)]
    pub description: String,
    /// Whether the image is built for the GPUs (CUDA user space) the provider hands out.
    #[serde(default)]
    pub gpu_ready: bool,
    /// The unpacked size clients may expect, in bytes, if the SP states it.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// The image an order gets when it names none; at most one entry says so.
    #[serde(default)]
    pub default: bool,
}

impl CatalogImage {
    /// Where the image comes from, checked: exactly one of a reference and an archive.
    pub fn source(&self, name: &str) -> Result<ImageSource<'_>, ProvisionError> {
        match (&self.reference, &self.archive) {
            (Some(r), None) => Ok(ImageSource::Registry(r)),
            (None, Some(a)) => Ok(ImageSource::Archive(a)),
            _ => Err(ProvisionError::Config(format!(
                "image {name}: give exactly one of `reference` (a registry) and `archive` (an OCI archive)"
            ))),
        }
    }
}

/// Where a catalog image comes from.
#[derive(Clone, Copy, Debug)]
pub enum ImageSource<'a> {
    /// A registry reference.
    Registry(&'a str),
    /// An OCI archive on this machine.
    Archive(&'a std::path::Path),
}

/// The catalog: image names to their sources.
pub type Catalog = BTreeMap<String, CatalogImage>;

/// Checks a catalog: every entry has one source, and at most one is the default.
pub fn check_catalog(catalog: &Catalog) -> Result<(), ProvisionError> {
    for (name, image) in catalog {
        image.source(name)?;
    }
    let defaults: Vec<&String> = catalog
        .iter()
        .filter(|(_, i)| i.default)
        .map(|(n, _)| n)
        .collect();
    if defaults.len() > 1 {
        return Err(ProvisionError::Config(format!(
            "images {defaults:?} are all marked default; mark one"
        )));
    }
    Ok(())
}

/// A catalog image installed in containerd.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstalledImage {
    /// The catalog's name for it.
    pub name: String,
    /// The name containerd records it under.
    pub image: ImageRef,
    /// The digest orders name it by (`sha256:…`: an index's for a multi-arch image).
    pub digest: String,
}

impl Provisioner {
    /// Installs one catalog image: pulled (once per digest, however many callers wait) or
    /// imported; already-present content is not fetched again.
    pub async fn install_image(
        &self,
        name: &str,
        image: &CatalogImage,
        registries: &[RegistryConfig],
    ) -> Result<InstalledImage, ProvisionError> {
        let installed = match image.source(name)? {
            ImageSource::Registry(reference) => {
                let pulled = self.pull_image(reference, registries).await?;
                // Recorded under REPO@DIGEST as well: when the tag moves and is pulled again,
                // orders placed against this digest still find their image.
                let pinned = pinned_reference(reference, &pulled.digest)?;
                let image = if pinned == pulled.image.as_str() {
                    pulled.image
                } else {
                    self.pull_image(&pinned, registries).await?.image
                };
                InstalledImage {
                    name: name.to_string(),
                    image,
                    digest: pulled.digest,
                }
            }
            ImageSource::Archive(path) => {
                let image = self.import_image(path).await?;
                let digest = self.inner.ctd.image_digest(&image).await?;
                InstalledImage {
                    name: name.to_string(),
                    image,
                    digest,
                }
            }
        };
        info!(name, image = %installed.image, digest = %installed.digest, "catalog image installed");
        Ok(installed)
    }

    /// Installs every image of the catalog, each independently: one that fails is logged and
    /// left out, the others serve.
    pub async fn install_catalog(
        &self,
        catalog: &Catalog,
        registries: &[RegistryConfig],
    ) -> Vec<Result<InstalledImage, (String, ProvisionError)>> {
        self.inner.installs.send_modify(|n| *n += 1);
        let _done = InstallGuard(&self.inner.installs);
        let mut out = Vec::with_capacity(catalog.len());
        for (name, image) in catalog {
            let installed = self.install_image(name, image, registries).await;
            if let Err(e) = &installed {
                warn!(name, error = %e, "catalog image not installed");
            }
            out.push(installed.map_err(|e| (name.clone(), e)));
        }
        out
    }

    /// The installed image whose digest is `digest` (`sha256:…`).
    pub async fn image_with_digest(&self, digest: &str) -> Result<ImageRef, ProvisionError> {
        self.inner.ctd.image_with_digest(digest).await
    }

    /// The client's own image of an order, `repository@digest`: refused unless the config lets
    /// clients bring images from its registry; pulled once (concurrent orders share the pull),
    /// then found by digest like a catalog image.
    pub async fn client_image(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<ImageRef, ProvisionError> {
        let config = &self.inner.config;
        if let Some(reason) = config.refuse_client_image(repository) {
            return Err(ProvisionError::ClientImageRefused {
                repository: repository.to_string(),
                reason,
            });
        }
        match self.image_with_digest(digest).await {
            Err(ProvisionError::ImageMissing { .. }) => {}
            found => return found,
        }
        let reference = format!("{repository}@{digest}");
        tracing::info!(%reference, "pulling the client's image");
        let pulled = self.pull_image(&reference, &config.registries).await?;
        Ok(pulled.image)
    }

    /// The image an order's container starts from: the one of `digest`, waiting (up to
    /// [`INSTALL_WAIT`]) for a catalog installation under way to bring it.
    pub(crate) async fn image_for_order(&self, digest: &str) -> Result<ImageRef, ProvisionError> {
        let mut installs = self.inner.installs.subscribe();
        let deadline = tokio::time::Instant::now() + INSTALL_WAIT;
        loop {
            installs.borrow_and_update();
            match self.image_with_digest(digest).await {
                Err(ProvisionError::ImageMissing { .. }) if *installs.borrow() > 0 => {
                    tracing::info!(%digest, "the order's image is not installed yet: waiting for the catalog's installation");
                    let ended = tokio::time::timeout_at(deadline, installs.wait_for(|n| *n == 0));
                    if ended.await.is_err() {
                        return self.image_with_digest(digest).await;
                    }
                }
                other => return other,
            }
        }
    }
}

/// How long an order's start waits for the catalog's installation to bring its image.
pub const INSTALL_WAIT: std::time::Duration = std::time::Duration::from_secs(900);

/// Counts an installation as ended, however it ends.
struct InstallGuard<'a>(&'a tokio::sync::watch::Sender<usize>);

impl Drop for InstallGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// `reference` pinned to `digest`: `REGISTRY/REPO@DIGEST`, whatever tag it named.
fn pinned_reference(reference: &str, digest: &str) -> Result<String, ProvisionError> {
    let parsed: oci_client::Reference =
        reference.parse().map_err(|e: oci_client::ParseError| {
            ProvisionError::ReferenceInvalid {
                reference: reference.to_string(),
                reason: e.to_string(),
            }
        })?;
    Ok(oci_client::Reference::with_digest(
        parsed.registry().to_string(),
        parsed.repository().to_string(),
        digest.to_string(),
    )
    .whole())
}

impl Ctd {
    /// The digest an image's record points at.
    pub(crate) async fn image_digest(&self, image: &ImageRef) -> Result<String, ProvisionError> {
        Ok(self.image_target(image).await?.digest)
    }

    /// An image record pointing at `digest`; several names may: the one pinned to it serves,
    /// else the first by name.
    pub(crate) async fn image_with_digest(&self, digest: &str) -> Result<ImageRef, ProvisionError> {
        let well_formed = digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let missing = || ProvisionError::ImageMissing {
            image: digest.to_string(),
        };
        if !well_formed {
            return Err(missing());
        }
        let listed = self
            .images()
            .list(self.req(ListImagesRequest {
                filters: vec![format!("target.digest=={digest}")],
            }))
            .await
            .map_err(|s| self.status("list the images", s))?;
        let mut names: Vec<String> = listed
            .into_inner()
            .images
            .into_iter()
            .filter(|i| i.target.as_ref().is_some_and(|t| t.digest == digest))
            .map(|i| i.name)
            .collect();
        // The record pinned to the digest first: it never moves, a tag's record may.
        names.sort_by_key(|n| (!n.ends_with(&format!("@{digest}")), n.clone()));
        names.into_iter().next().map(ImageRef).ok_or_else(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_pinned_to_its_digest() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            pinned_reference("127.0.0.1:5000/ml/cuda:12.4", &d).unwrap(),
            format!("127.0.0.1:5000/ml/cuda@{d}")
        );
        assert!(pinned_reference("UPPER/Case:x", &d).is_err());
    }

    #[test]
    fn a_catalog_reads_from_toml_and_each_image_has_one_source() {
        let catalog: Catalog = toml::from_str(
            r#"
            [default]
            archive = "/var/lib/shale/images/default.tar"
            description = "Debian 12 with Python"
            default = true

            [cuda]
            reference = "registry.example/ml/cuda:12.4"
            gpu_ready = true
            size_bytes = 4000000000
            "#,
        )
        .unwrap();
        check_catalog(&catalog).unwrap();
        assert!(catalog["cuda"].gpu_ready);
        assert!(matches!(
            catalog["cuda"].source("cuda").unwrap(),
            ImageSource::Registry("registry.example/ml/cuda:12.4")
        ));

        let both: Catalog =
            toml::from_str("[x]\nreference = \"r/x:1\"\narchive = \"/x.tar\"\n").unwrap();
        assert!(check_catalog(&both)
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
        let neither: Catalog = toml::from_str("[x]\ndescription = \"?\"\n").unwrap();
        assert!(check_catalog(&neither).is_err());
        let two: Catalog = toml::from_str(
            "[a]\narchive = \"/a\"\ndefault = true\n[b]\narchive = \"/b\"\ndefault = true\n",
        )
        .unwrap();
        assert!(check_catalog(&two)
            .unwrap_err()
            .to_string()
            .contains("default"));
    }
}
