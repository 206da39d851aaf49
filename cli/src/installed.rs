//! The catalog as the broker installed it: each image's name and the digest it resolved to,
//! and why an image could not be installed. The broker writes it; the accept policy and
//! `shale sp update` (which publishes the digests on chain) read it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shale_provisioner::InstalledImage;

use crate::spconfig::SpConfig;

/// The record of one installation of the catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledCatalog {
    /// The images installed, with their digests.
    pub installed: Vec<InstalledImage>,
    /// Images that could not be installed, with the reason.
    pub failed: BTreeMap<String, String>,
}

impl InstalledCatalog {
    /// Where the broker keeps the record: beside the gateway's state.
    pub fn path(sp: &SpConfig) -> PathBuf {
        sp.gateway.state_dir.join("catalog.json")
    }

    /// Reads the record; an absent one is an empty catalog (nothing installed yet).
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is damaged", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the record whole (a reader never sees half of it).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("the record serializes");
        let partial = path.with_extension("json.partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The digest `image`'s name had in this record, when the name now resolves to another
    /// (its tag moved on the registry).
    pub fn moved(&self, image: &InstalledImage) -> Option<&str> {
        self.installed
            .iter()
            .find(|i| i.name == image.name && i.digest != image.digest)
            .map(|i| i.digest.as_str())
    }

    /// Whether an order naming `digest` can start here now, or why not in words a client reads.
    pub fn serves(&self, digest: &str) -> Result<(), String> {
        if self.installed.iter().any(|i| i.digest == digest) {
            return Ok(());
        }
        match self.failed.iter().next() {
            Some((name, why)) if self.failed.len() == 1 => Err(format!(
                "image {digest} is not installed on this provider (image {name} failed: {why})"
            )),
            _ => Err(format!("image {digest} is not installed on this provider")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shale_provisioner::ImageRef;

    #[test]
    fn the_record_round_trips_and_names_what_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        assert_eq!(
            InstalledCatalog::read(&path).unwrap(),
            InstalledCatalog::default()
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let record = InstalledCatalog {
            installed: vec![InstalledImage {
                name: "tiny".into(),
                image: ImageRef("r.example/tiny:1".into()),
                digest: digest.clone(),
            }],
            failed: BTreeMap::from([("cuda".into(), "HTTP 401".into())]),
        };
        record.write(&path).unwrap();
        let read = InstalledCatalog::read(&path).unwrap();
        assert_eq!(read, record);
        assert_eq!(read.serves(&digest), Ok(()));
        let other = format!("sha256:{}", "b".repeat(64));
        assert!(read
            .serves(&other)
            .unwrap_err()
            .contains("cuda failed: HTTP 401"));
        let retagged = InstalledImage {
            digest: other.clone(),
            ..read.installed[0].clone()
        };
        assert_eq!(read.moved(&retagged), Some(digest.as_str()));
        assert_eq!(read.moved(&read.installed[0]), None);
    }
}
