//! The documents of an image as a registry serves them, checked before anything is stored:
//! their kinds, media types we can unpack, digests and sizes.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::failure::Failure;
use crate::image::{OciManifest, MEDIA_DOCKER_LIST, MEDIA_INDEX, MEDIA_MANIFEST};

pub(super) const MEDIA_DOCKER_MANIFEST: &str =
    "application/vnd.docker.distribution.manifest.v2+json";
/// What we ask a registry for: the two manifest kinds and the two index kinds we can use.
pub(super) const ACCEPTED_MANIFESTS: [&str; 4] = [
    MEDIA_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_INDEX,
    MEDIA_DOCKER_LIST,
];
pub(super) const CONFIG_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];
/// Layer media types containerd 1.6's applier unpacks. Foreign ("non-distributable") layers
/// are refused: their bytes would come from URLs outside the registry the provider named.
pub(super) const LAYER_MEDIA_TYPES: [&str; 5] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];
/// An image config is a small JSON document, but images with a long history carry big ones.
pub(super) const CONFIG_LIMIT: u64 = 16 << 20;

pub(super) fn sha256_of(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Digests name files and ingest refs in containerd: accept only the canonical SHA-256 form.
pub(super) fn check_digest(digest: &str) -> Result<(), Failure> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(Failure::Invalid(format!(
            "{digest:?} is not a sha256 digest"
        )))
    }
}

/// The fields that tell a manifest from an index.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    layers: Option<serde_json::Value>,
}

/// A document's kind, from its `mediaType` or, as OCI allows it to be absent, from its shape.
pub(super) fn kind_of(data: &[u8]) -> Result<(String, bool), Failure> {
    let head: Head = serde_json::from_slice(data)
        .map_err(|e| Failure::Invalid(format!("not a JSON manifest: {e}")))?;
    if head.schema_version != Some(2) {
        return Err(Failure::Invalid(format!(
            "schemaVersion {:?}, only 2 is supported",
            head.schema_version
        )));
    }
    let media_type = match head.media_type {
        Some(m) => m,
        None if head.manifests.is_some() => MEDIA_INDEX.to_string(),
        None if head.layers.is_some() => MEDIA_MANIFEST.to_string(),
        None => return Err(Failure::Invalid("neither a manifest nor an index".into())),
    };
    let is_index = media_type == MEDIA_INDEX || media_type == MEDIA_DOCKER_LIST;
    if !ACCEPTED_MANIFESTS.contains(&media_type.as_str()) {
        return Err(Failure::Invalid(format!(
            "media type {media_type} is not an image manifest or index"
        )));
    }
    Ok((media_type, is_index))
}

/// Parses and checks an image manifest: media types we can unpack, sane digests and sizes.
pub(super) fn parse_manifest(data: &[u8]) -> Result<OciManifest, Failure> {
    let manifest: OciManifest =
        serde_json::from_slice(data).map_err(|e| Failure::Invalid(format!("manifest: {e}")))?;
    if !CONFIG_MEDIA_TYPES.contains(&manifest.config.media_type.as_str()) {
        return Err(Failure::Invalid(format!(
            "config media type {:?} is not a container image's",
            manifest.config.media_type
        )));
    }
    check_digest(&manifest.config.digest)?;
    if manifest.config.size < 0 || manifest.config.size as u64 > CONFIG_LIMIT {
        return Err(Failure::Invalid(format!(
            "config size {} is out of bounds",
            manifest.config.size
        )));
    }
    if manifest.layers.is_empty() {
        return Err(Failure::Invalid("the manifest lists no layers".into()));
    }
    for layer in &manifest.layers {
        check_digest(&layer.digest)?;
        if !LAYER_MEDIA_TYPES.contains(&layer.media_type.as_str()) {
            return Err(Failure::Invalid(format!(
                "layer {} has media type {:?}, which cannot be unpacked here",
                layer.digest, layer.media_type
            )));
        }
        if layer.size < 0 {
            return Err(Failure::Invalid(format!(
                "layer {} has a negative size",
                layer.digest
            )));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_sha256_digests_pass() {
        assert!(check_digest(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(check_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(check_digest("sha256:../../etc").is_err());
        assert!(check_digest(&format!("sha512:{}", "a".repeat(128))).is_err());
    }

    #[test]
    fn malformed_manifests_are_refused_with_a_reason() {
        let bad = |doc: &str| match kind_of(doc.as_bytes())
            .and_then(|_| parse_manifest(doc.as_bytes()).map(|_| ()))
        {
            Err(Failure::Invalid(reason)) => reason,
            other => panic!("{doc}: {other:?}"),
        };
        assert!(bad("not json").contains("JSON"));
        assert!(bad(r#"{"schemaVersion":1,"layers":[]}"#).contains("schemaVersion"));
        let d = format!("sha256:{}", "b".repeat(64));
        let cfg = format!(
            r#""config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{d}","size":2}}"#
        );
        assert!(bad(&format!(r#"{{"schemaVersion":2,{cfg},"layers":[]}}"#)).contains("no layers"));
        let foreign = format!(
            r#"{{"schemaVersion":2,{cfg},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{d}","size":1}}]}}"#
        );
        assert!(bad(&foreign).contains("cannot be unpacked"));
        let helm = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{d}","size":2}},"layers":[]}}"#
        );
        assert!(bad(&helm).contains("not a container image"));
        let good = format!(
            r#"{{"schemaVersion":2,{cfg},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{d}","size":1}}]}}"#
        );
        assert!(kind_of(good.as_bytes()).is_ok());
        assert!(parse_manifest(good.as_bytes()).is_ok());
    }
}
