//! Removing images no order uses, so pulled images never fill the disk for good.
//!
//! An image is kept when the catalog offers it (its digest is one the caller keeps), when any
//! order's container was created from it (running or stopped: its order may come back), or when
//! it is among the `keep_unused` most recently updated of the rest. Everything else loses its
//! image record; containerd's garbage collector then frees the content and snapshots nothing else
//! refers to.

use std::collections::HashSet;

use containerd_client::services::v1::{
    DeleteImageRequest, ListContainersRequest, ListImagesRequest,
};
use serde::Deserialize;
use tracing::info;

use crate::{ImageRef, ProvisionError, Provisioner};

/// The image garbage collection policy (`[image_gc]` in the SP's config).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ImageGcPolicy {
    /// Images neither offered nor used kept anyway, most recently updated first: a catalog
    /// change can be undone without a pull.
    pub keep_unused: usize,
}

impl Default for ImageGcPolicy {
    fn default() -> Self {
        ImageGcPolicy { keep_unused: 2 }
    }
}

impl Provisioner {
    /// Removes the images the policy does not keep; `offered` are the digests (`sha256:…`) the
    /// catalog offers, and the configured default image is always kept. Returns what was
    /// removed.
    pub async fn collect_images(
        &self,
        offered: &HashSet<String>,
        policy: &ImageGcPolicy,
    ) -> Result<Vec<ImageRef>, ProvisionError> {
        let ctd = &self.inner.ctd;
        let containers = ctd
            .containers()
            .list(ctd.req(ListContainersRequest { filters: vec![] }))
            .await
            .map_err(|s| ctd.status("list the containers", s))?
            .into_inner()
            .containers;
        let used: HashSet<String> = containers.into_iter().map(|c| c.image).collect();
        let images = ctd
            .images()
            .list(ctd.req(ListImagesRequest { filters: vec![] }))
            .await
            .map_err(|s| ctd.status("list the images", s))?
            .into_inner()
            .images;
        let digest_of = |i: &containerd_client::services::v1::Image| {
            i.target
                .as_ref()
                .map(|t| t.digest.clone())
                .unwrap_or_default()
        };
        // A digest stays when any of its names is used or is the default: its other names cost
        // nothing and may be what the next order's lookup finds.
        let default = self.inner.config.image.as_str();
        let kept_digests: HashSet<String> = images
            .iter()
            .filter(|i| used.contains(&i.name) || i.name == default)
            .map(digest_of)
            .chain(offered.iter().cloned())
            .collect();
        let mut unused: Vec<_> = images
            .into_iter()
            .filter(|i| !kept_digests.contains(&digest_of(i)))
            .collect();
        unused.sort_by_key(|i| {
            std::cmp::Reverse(
                i.updated_at
                    .as_ref()
                    .map(|t| (t.seconds, t.nanos))
                    .unwrap_or_default(),
            )
        });
        // Keep whole digests, not names: count distinct digests among the most recent.
        let mut recent = HashSet::new();
        let mut removed = Vec::new();
        for image in unused {
            let digest = digest_of(&image);
            if recent.contains(&digest) || recent.len() < policy.keep_unused {
                recent.insert(digest);
                continue;
            }
            ctd.images()
                .delete(ctd.req(DeleteImageRequest {
                    name: image.name.clone(),
                    sync: true,
                    ..Default::default()
                }))
                .await
                .map_err(|s| ctd.status("remove an unused image", s))?;
            info!(image = %image.name, %digest, "removed an image no order uses");
            removed.push(ImageRef(image.name));
        }
        Ok(removed)
    }
}
