//! The SP's config: the gateway's TOML plus an `[sp]` section with what goes on chain (the
//! public endpoint, the offer and its prices, dataset descriptions) and the accept policy.
//!
//! The gateway crate's config refuses unknown fields, so the `[sp]` table is taken out before
//! the rest is read as a [`GatewayConfig`]; `shale gateway` reads the same file the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shale_contracts::{Dataset, Offer, U256};
use shale_gateway::GatewayConfig;
use shale_provisioner::DatasetSource;

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
    /// when absent. Fields: see `shale_settler::SettlerConfig`.
    pub settler: Option<shale_settler::SettlerConfig>,
    /// The accept policy `shale gateway` applies to new orders.
    #[serde(default)]
    pub accept: AcceptSection,
}

/// `[sp.accept]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptSection {
    /// Accept every new order that fits the offer, the free capacity, the local datasets and
    /// the limits below; decline any other on chain with the reason (the client is refunded and
    /// `shale order create` shows why). Default false: accept by hand with `shale sp accept`.
    #[serde(default)]
    pub auto: bool,
    /// The most collateral the SP posts for one order, e.g. `5FIL`. Default: no more than the
    /// order's own escrow, so a client cannot make the SP stake more than the client pays in.
    pub max_collateral: Option<String>,
    /// The longest lease accepted, in hours: collateral stays locked for the whole lease, and
    /// leaving early is slashed. Default 720 (30 days).
    #[serde(default = "default_max_hours")]
    pub max_hours: u64,
    /// The least escrow accepted, in hours of the order's price per second (or its whole lease,
    /// if shorter): an order with almost no escrow would hold the capacity and the collateral
    /// while paying nothing. Default 1.
    #[serde(default = "default_min_escrow_hours")]
    pub min_escrow_hours: u64,
}

fn default_max_hours() -> u64 {
    720
}

fn default_min_escrow_hours() -> u64 {
    1
}

impl Default for AcceptSection {
    fn default() -> Self {
        Self {
            auto: false,
            max_collateral: None,
            max_hours: default_max_hours(),
            min_escrow_hours: default_min_escrow_hours(),
        }
    }
}

impl AcceptSection {
    /// The limits in the contract's units.
    pub fn limits(&self) -> anyhow::Result<crate::policy::AcceptLimits> {
        let max_collateral = self
            .max_collateral
            .as_deref()
            .map(crate::money::parse_amount)
            .transpose()
            .context("[sp.accept] max_collateral")?;
        let secs = |field: &str, hours: u64| {
            hours
                .checked_mul(3600)
                .with_context(|| format!("[sp.accept] {field} {hours} is too large"))
        };
        Ok(crate::policy::AcceptLimits {
            max_collateral,
            max_duration_secs: secs("max_hours", self.max_hours)?,
            min_escrow_secs: secs("min_escrow_hours", self.min_escrow_hours)?,
        })
    }
}

/// `[sp.offer]`: resources and prices; prices are amounts like `0.36FIL` (exact, in wei).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferSection {
    pub cpus: u32,
    /// Memory, e.g. `8GiB`.
    pub memory: String,
    /// Disk an order gets unless it asks for another size, e.g. `20GiB`: everything its
    /// container can write (its system's changes and /work) is bounded by it.
    pub disk: String,
    /// The most disk one order may ask for, e.g. `200GiB`; at least `disk`. Default: `disk`.
    pub max_disk: Option<String>,
    #[serde(default)]
    pub gpu_model: String,
    #[serde(default)]
    pub gpu_count: u32,
    /// Price per hour of lease, e.g. `0.36FIL`; charged per second (must divide into whole wei).
    pub price_per_hour: String,
    /// Price per GiB moved either way, e.g. `0.001FIL`.
    pub price_per_gib: String,
}

impl OfferSection {
    /// The offer in the contract's units: MiB and wei per second.
    pub fn to_offer(&self) -> anyhow::Result<Offer> {
        let o = self;
        let per_hour =
            crate::money::parse_amount(&o.price_per_hour).context("[sp.offer] price_per_hour")?;
        if !(per_hour % U256::from(3600u32)).is_zero() {
            anyhow::bail!(
                "[sp.offer] price_per_hour {} is not a whole number of wei per second; the \
                 contract charges per second (use a multiple of 3600 wei)",
                o.price_per_hour
            );
        }
        let size = |field: &str, text: &str| {
            crate::view::parse_size(text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("[sp.offer] {field}"))
        };
        let disk_mib = size("disk", &o.disk)?;
        let max_disk_mib = match &o.max_disk {
            Some(max) => size("max_disk", max)?,
            None => disk_mib,
        };
        let min_mib = shale_provisioner::MIN_DISK_BYTES >> 20;
        if disk_mib < min_mib {
            anyhow::bail!("[sp.offer] disk must be at least {min_mib} MiB");
        }
        if disk_mib > max_disk_mib {
            anyhow::bail!(
                "[sp.offer] disk {} is more than max_disk {}: an order's default disk must be one \
                 it may ask for",
                o.disk,
                o.max_disk.as_deref().unwrap_or_default()
            );
        }
        Ok(Offer {
            cpus: o.cpus,
            memory_mib: size("memory", &o.memory)?,
            disk_mib,
            max_disk_mib,
            gpu_model: o.gpu_model.clone(),
            gpu_count: o.gpu_count,
            price_per_second: per_hour / U256::from(3600u32),
            price_per_gib: crate::money::parse_amount(&o.price_per_gib)
                .context("[sp.offer] price_per_gib")?,
        })
    }
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
        // Checked now, so a typo fails `shale gateway` at start, not at the first order.
        sp.accept
            .limits()
            .with_context(|| format!("the [sp.accept] section of {} is invalid", path.display()))?;
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
        self.sp
            .offer
            .as_ref()
            .with_context(|| {
                format!(
                    "{} has no [sp.offer] section: say what you offer (cpus, memory, disk, \
                     price_per_hour, price_per_gib)",
                    self.path.display()
                )
            })?
            .to_offer()
    }

    /// The datasets served locally (`[containers.datasets]`), described by `[sp.datasets]`,
    /// with their size measured on disk.
    pub fn datasets(&self) -> anyhow::Result<Vec<Dataset>> {
        let mut out = Vec::new();
        for (id, source) in &self.gateway.containers.datasets {
            let meta = self.sp.datasets.get(id).cloned().unwrap_or_default();
            let (piece_cid, path) = match source {
                DatasetSource::Directory(path) => (meta.piece_cid.clone(), path),
                DatasetSource::Piece(p) => {
                    // The piece CID the gateway verifies is the one published: one place to
                    // write it, and a second spelling that disagrees is a config error.
                    let cid = p.piece_cid.to_string();
                    if let Some(other) = meta.piece_cid.as_ref().filter(|c| **c != cid) {
                        bail!(
                            "dataset {id}: [sp.datasets.{id}] piece_cid {other} is not the \
                             [containers.datasets] piece_cid {cid}; drop the first"
                        );
                    }
                    (Some(cid), &p.source)
                }
            };
            let size_bytes = dir_size(path)
                .with_context(|| format!("measuring dataset {id} at {}", path.display()))?;
            out.push(Dataset {
                id: id.clone(),
                piece_cid,
                deal_id: meta.deal_id,
                size_bytes,
                description: meta.description,
                verified_at: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn section(extra: &str) -> anyhow::Result<OfferSection> {
        let text = format!(
            "cpus = 4\nmemory = \"8GiB\"\nprice_per_hour = \"3600wei\"\nprice_per_gib = \"1wei\"\n{extra}"
        );
        Ok(toml::from_str(&text)?)
    }

    #[test]
    fn the_offer_states_its_disk_and_the_most_an_order_may_ask_for() {
        let offer = section("disk = \"20GiB\"\nmax_disk = \"1TiB\"")
            .unwrap()
            .to_offer()
            .unwrap();
        assert_eq!((offer.disk_mib, offer.max_disk_mib), (20_480, 1_048_576));
        assert_eq!(offer.memory_mib, 8192);

        // Without max_disk an order may ask for the default disk and no more.
        let offer = section("disk = \"512MiB\"").unwrap().to_offer().unwrap();
        assert_eq!((offer.disk_mib, offer.max_disk_mib), (512, 512));

        let err = section("disk = \"20GiB\"\nmax_disk = \"10GiB\"")
            .unwrap()
            .to_offer()
            .unwrap_err();
        assert!(format!("{err:#}").contains("more than max_disk"), "{err:#}");
        for small in ["0", "31MiB"] {
            let err = section(&format!("disk = \"{small}\""))
                .unwrap()
                .to_offer()
                .unwrap_err();
            assert!(format!("{err:#}").contains("at least 32 MiB"), "{err:#}");
        }
        let err = section("disk = \"20GB\"").unwrap().to_offer().unwrap_err();
        assert!(format!("{err:#}").contains("[sp.offer] disk"), "{err:#}");
        // The disk is part of every offer.
        assert!(section("").is_err());
    }

    #[test]
    fn accept_limits_have_safe_defaults_and_bad_amounts_are_refused() {
        let limits = AcceptSection::default().limits().unwrap();
        assert_eq!(limits.max_collateral, None);
        assert_eq!(limits.max_duration_secs, 720 * 3600);
        assert_eq!(limits.min_escrow_secs, 3600);
        // Fields left out of the file take the same defaults as no section at all.
        let parsed: AcceptSection = toml::from_str("auto = true").unwrap();
        assert_eq!(parsed.limits().unwrap(), limits);

        let parsed: AcceptSection =
            toml::from_str("max_collateral = \"2.5FIL\"\nmax_hours = 24\nmin_escrow_hours = 2")
                .unwrap();
        let l = parsed.limits().unwrap();
        assert_eq!(
            l.max_collateral,
            Some(U256::from(2_500_000_000_000_000_000u128))
        );
        assert_eq!((l.max_duration_secs, l.min_escrow_secs), (86_400, 7_200));

        let parsed: AcceptSection = toml::from_str("max_collateral = \"lots\"").unwrap();
        let err = parsed.limits().unwrap_err();
        assert!(format!("{err:#}").contains("max_collateral"), "{err:#}");
        assert!(toml::from_str::<AcceptSection>("max_colateral = \"1FIL\"").is_err());
    }
}
