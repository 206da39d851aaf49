//! The SP's config: the gateway's TOML plus an `[sp]` section with what goes on chain (the
//! public endpoint, the offer and its prices, dataset descriptions) and the accept policy.
//!
//! The gateway crate's config refuses unknown fields, so the `[sp]` table is taken out before
//! the rest is read as a [`GatewayConfig`]; `shale gateway` reads the same file the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shale_contracts::{Dataset, Offer, U256};
use shale_gateway::GatewayConfig;

/// The `[sp]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpSection {
    /// `host:port` clients dial; defaults to the gateway's listen address.
    pub endpoint: Option<String>,
    /// Keystore file of the provider's signing key (else SHALE_KEYSTORE / SHALE_PRIVATE_KEY).
    pub keystore: Option<PathBuf>,
    /// What is offered and at what price.
    pub offer: Option<OfferSection>,
    /// Dataset id -> how it is described on chain; the local path is in `[containers.datasets]`.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetSection>,
    /// The settler `shale gateway` runs beside the gateway (claims with Groth16 proofs); none
    /// when absent. Fields: see `shale_gateway::settler::SettlerConfig`.
    pub settler: Option<shale_gateway::settler::SettlerConfig>,
    /// The accept policy `shale gateway` applies to new orders.
    #[serde(default)]
    pub accept: AcceptSection,
}

/// `[sp.accept]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptSection {
    /// Accept every new order that fits the offer, the free capacity and the local datasets;
    /// decline (cancel, refunding the client) any other, logging why. Default false: accept by
    /// hand with `shale sp accept`.
    #[serde(default)]
    pub auto: bool,
}

/// `[sp.offer]`: resources and prices; prices are amounts like `0.36FIL` (exact, in wei).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferSection {
    pub cpus: u32,
    /// Memory, e.g. `8GiB`.
    pub memory: String,
    #[serde(default)]
    pub gpu_model: String,
    #[serde(default)]
    pub gpu_count: u32,
    /// Price per hour of lease, e.g. `0.36FIL`; charged per second (must divide into whole wei).
    pub price_per_hour: String,
    /// Price per GiB moved either way, e.g. `0.001FIL`.
    pub price_per_gib: String,
}

/// `[sp.datasets.ID]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    #[serde(default)]
    pub description: String,
    pub piece_cid: Option<String>,
    pub deal_id: Option<u64>,
}

/// The whole file.
#[derive(Debug, Clone)]
pub struct SpConfig {
    pub path: PathBuf,
    pub gateway: GatewayConfig,
    pub sp: SpSection,
}

impl SpConfig {
    /// Reads the gateway config and its `[sp]` section.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("the config {} is not valid TOML", path.display()))?;
        let sp = match table.remove("sp") {
            Some(v) => v
                .try_into()
                .with_context(|| format!("the [sp] section of {} is invalid", path.display()))?,
            None => SpSection::default(),
        };
        let gateway: GatewayConfig = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("the config {} is invalid", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            gateway,
            sp,
        })
    }

    /// The endpoint registered on chain.
    pub fn endpoint(&self) -> String {
        self.sp
            .endpoint
            .clone()
            .unwrap_or_else(|| self.gateway.listen.to_string())
    }

    /// The offer of `[sp.offer]`, in wei.
    pub fn offer(&self) -> anyhow::Result<Offer> {
        let o = self.sp.offer.as_ref().with_context(|| {
            format!(
                "{} has no [sp.offer] section: say what you offer (cpus, memory, price_per_hour, \
                 price_per_gib)",
                self.path.display()
            )
        })?;
        let per_hour =
            crate::money::parse_amount(&o.price_per_hour).context("[sp.offer] price_per_hour")?;
        if !(per_hour % U256::from(3600u32)).is_zero() {
            anyhow::bail!(
                "[sp.offer] price_per_hour {} is not a whole number of wei per second; the \
                 contract charges per second (use a multiple of 3600 wei)",
                o.price_per_hour
            );
        }
        Ok(Offer {
            cpus: o.cpus,
            memory_mib: crate::view::parse_memory(&o.memory)
                .map_err(anyhow::Error::msg)
                .context("[sp.offer] memory")?,
            gpu_model: o.gpu_model.clone(),
            gpu_count: o.gpu_count,
            price_per_second: per_hour / U256::from(3600u32),
            price_per_gib: crate::money::parse_amount(&o.price_per_gib)
                .context("[sp.offer] price_per_gib")?,
        })
    }

    /// The datasets served locally (`[containers.datasets]`), described by `[sp.datasets]`,
    /// with their size measured on disk.
    pub fn datasets(&self) -> anyhow::Result<Vec<Dataset>> {
        let mut out = Vec::new();
        for (id, path) in &self.gateway.containers.datasets {
            let meta = self.sp.datasets.get(id).cloned().unwrap_or_default();
            let size_bytes = dir_size(path)
                .with_context(|| format!("measuring dataset {id} at {}", path.display()))?;
            out.push(Dataset {
                id: id.clone(),
                piece_cid: meta.piece_cid,
                deal_id: meta.deal_id,
                size_bytes,
                description: meta.description,
            });
        }
        Ok(out)
    }
}

/// Total size of the regular files under `path`.
fn dir_size(path: &Path) -> std::io::Result<u64> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut total = 0;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            total += dir_size(&entry?.path())?;
        }
    }
    Ok(total)
}
