//! The provisioner's configuration: one serde struct, defaults next to the fields.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dataset::DatasetSource;
use crate::network::NetworkConfig;

/// The name of an image in containerd's image store, e.g. `shale/default:latest`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageRef(pub String);

impl ImageRef {
    /// The name under which `provisioner/image/build-default.sh` packs the default image.
    pub const DEFAULT: &'static str = "shale/default:latest";
    /// The name under which `provisioner/image/build-busybox.sh` packs the small test image.
    pub const BUSYBOX: &'static str = "shale/busybox:latest";

    /// The image name as containerd knows it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ImageRef {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ImageRef(s.to_string()))
    }
}

impl Default for ImageRef {
    fn default() -> Self {
        ImageRef(Self::DEFAULT.to_string())
    }
}

/// How the provisioner reaches containerd and shapes every order's container.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvisionerConfig {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// The containerd namespace that holds Shale's images and containers, apart from anything
    /// else the machine runs.
    pub namespace: String,
    /// Where per-order volumes, FIFOs and runc state live; must be on a local filesystem.
    pub state_dir: PathBuf,
    /// The image every order's container runs.
    pub image: ImageRef,
    /// Dataset id to its local bytes: a directory (`ID = "/srv/dir"`, not verified), or a
    /// Filecoin piece's payload and its piece CID (`ID = { piece_cid = "baga…", source =
    /// "/srv/piece.car" }`), mounted only once its CommP matches.
    pub datasets: BTreeMap<String, DatasetSource>,
    /// How often every piece dataset is hashed again, even when its file looks unchanged (bytes
    /// changed in place keep size and, with care, mtime).
    #[serde(with = "duration_secs")]
    pub dataset_recheck: Duration,
    /// Directories searched for CDI spec files (`*.yaml`, `*.json`), e.g. from `nvidia-ctk cdi generate`.
    pub cdi_dirs: Vec<PathBuf>,
    /// The fully qualified CDI device kind handed out as GPUs.
    pub gpu_kind: String,
    /// This provider's id, written on every container so that adoption only touches our own.
    pub provider: String,
    /// How long a stopping order's processes get after SIGTERM before SIGKILL.
    #[serde(with = "duration_secs")]
    pub stop_grace: Duration,
    /// uid and gid of the processes inside an order's container (inside its user namespace, so
    /// 0 is root there and an unprivileged host uid outside); they own `/work`.
    pub user: (u32, u32),
    /// The first host uid (and gid) of the ranges given to orders' user namespaces. Order `n`'s
    /// range is `uid_base + slot * 65536 ..+ 65536`; no host account may live in the whole span.
    pub uid_base: u32,
    /// How many orders can hold a uid range at once (the span is `uid_ranges * 65536` ids).
    pub uid_ranges: u32,
    /// Which chain and marketplace the orders belong to (e.g. `31337:0x5fbd…`); part of every
    /// container's id and label, so a new marketplace on the same state directory never sees
    /// another marketplace's order of the same number.
    pub scope: String,
    /// Where the order's writable volume is mounted; also `HOME` and the working directory.
    pub work_dir: String,
    /// Where datasets are mounted, as `<data_dir>/<dataset id>`, read-only.
    pub data_dir: String,
    /// The pids limit when an order does not name one.
    pub default_pids_limit: u64,
    /// Size of `/tmp` (a tmpfs counted against the order's memory), in bytes.
    pub tmp_size_bytes: u64,
    /// Each order's way out to the internet, and what it may not reach.
    pub network: NetworkConfig,
    /// A directory on the filesystem containerd keeps images on (its root): a pull that would
    /// leave less than `image_store_reserve_bytes` free there is refused before it writes.
    pub image_store: PathBuf,
    /// Bytes every pull leaves free on the image store's filesystem.
    pub image_store_reserve_bytes: u64,
    /// Whether clients may bring their own images (pulled by digest from `allowed_registries`)
    /// instead of picking one of the catalog's. Off by default.
    pub allow_client_images: bool,
    /// Registry hosts (`host[:port]`, as image references start) clients may bring images from.
    pub allowed_registries: Vec<String>,
    /// Credentials for pulling clients' images: the gateway's `[[registries]]`, set by the
    /// broker (not part of this table).
    #[serde(skip)]
    pub registries: Vec<crate::RegistryConfig>,
    /// Start processes through the agent in each container (no shim copies their bytes), with
    /// containerd's exec where the agent is unavailable. On by default.
    pub exec_agent: bool,
    /// The agent's binary, a static executable (`scripts/build-agent.sh` builds it). Unset, it
    /// is looked for as `shale-agent` next to the running program and in `../agent/` from it.
    pub agent: Option<PathBuf>,
}

impl ProvisionerConfig {
    /// Why a client may not bring an image from `repository` (`HOST/PATH`), if it may not.
    pub fn refuse_client_image(&self, repository: &str) -> Option<String> {
        if !self.allow_client_images {
            return Some("this provider runs only the images of its catalog".into());
        }
        let host = repository.split_once('/').map(|(h, _)| h);
        match host {
            Some(h) if self.allowed_registries.iter().any(|a| a == h) => None,
            _ => Some(format!(
                "images may come only from {}",
                if self.allowed_registries.is_empty() {
                    "no registry (allowed_registries is empty)".to_string()
                } else {
                    self.allowed_registries.join(", ")
                }
            )),
        }
    }
}

impl Default for ProvisionerConfig {
    fn default() -> Self {
        ProvisionerConfig {
            socket: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "shale".to_string(),
            state_dir: PathBuf::from("/var/lib/shale/provisioner"),
            image: ImageRef::default(),
            datasets: BTreeMap::new(),
            dataset_recheck: Duration::from_secs(7 * 24 * 3600),
            cdi_dirs: vec![PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")],
            gpu_kind: "nvidia.com/gpu".to_string(),
            provider: "local".to_string(),
            stop_grace: Duration::from_secs(10),
            user: (0, 0),
            uid_base: 1 << 30,
            uid_ranges: 4096,
            scope: "local".to_string(),
            work_dir: "/work".to_string(),
            data_dir: "/data".to_string(),
            default_pids_limit: 1024,
            tmp_size_bytes: 256 << 20,
            network: NetworkConfig::default(),
            image_store: PathBuf::from("/var/lib/containerd"),
            image_store_reserve_bytes: 2 << 30,
            allow_client_images: false,
            allowed_registries: Vec::new(),
            registries: Vec::new(),
            exec_agent: true,
            agent: None,
        }
    }
}

mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        if !(secs.is_finite() && secs >= 0.0) {
            return Err(serde::de::Error::custom(
                "a duration must be a non-negative number of seconds",
            ));
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_config_takes_defaults_for_missing_fields() {
        let cfg: ProvisionerConfig = serde_json::from_str(
            r#"{"socket":"/tmp/c.sock","stop_grace":2.5,"datasets":{"bafy1":"/srv/d1"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.socket, PathBuf::from("/tmp/c.sock"));
        assert_eq!(cfg.stop_grace, Duration::from_millis(2500));
        assert_eq!(cfg.namespace, "shale");
        assert_eq!(
            cfg.datasets["bafy1"],
            DatasetSource::Directory(PathBuf::from("/srv/d1"))
        );
        assert_eq!(cfg.image.as_str(), ImageRef::DEFAULT);
    }

    #[test]
    fn the_example_file_parses_and_matches_the_defaults() {
        let text = include_str!("../config.example.toml");
        let cfg: ProvisionerConfig = toml::from_str(text).expect("example config parses");
        let defaults = ProvisionerConfig::default();
        assert_eq!(cfg.datasets.len(), 2);
        let without_datasets = ProvisionerConfig {
            datasets: BTreeMap::new(),
            ..cfg
        };
        assert_eq!(
            serde_json::to_value(&without_datasets).unwrap(),
            serde_json::to_value(&defaults).unwrap(),
            "config.example.toml documents the defaults"
        );
    }

    #[test]
    fn unknown_fields_and_negative_grace_are_rejected() {
        assert!(serde_json::from_str::<ProvisionerConfig>(r#"{"sokcet":"/x"}"#).is_err());
        assert!(serde_json::from_str::<ProvisionerConfig>(r#"{"stop_grace":-1}"#).is_err());
    }
}
