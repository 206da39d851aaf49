//! How providers and orders are shown: tables for people, JSON for scripts.

use comfy_table::{presets::UTF8_BORDERS_ONLY, ContentArrangement, Table};
use serde::Serialize;
use shale_contracts::filecoin_address::{display_both, to_filecoin};
use shale_contracts::{format_fingerprint, Address, Marketplace, Network, Order, Provider, U256};

use crate::money::format_fil;

/// A table in the house style.
pub fn table<I, S>(header: I) -> Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    t
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Which Filecoin spelling this chain's addresses are shown in (`f` on mainnet, else `t`).
pub async fn network(market: &Marketplace) -> anyhow::Result<Network> {
    Ok(Network::of_chain(market.chain_id().await?))
}

/// An address as people read it: `0x…` and its Filecoin spelling, `0xab… (t410f…)`.
pub fn address(a: Address, network: Network) -> String {
    display_both(a, network)
}

/// Wei per hour from wei per second.
pub fn per_hour(per_second: U256) -> U256 {
    per_second.saturating_mul(U256::from(3600u32))
}

/// A provider as scripts see it; amounts are decimal wei strings (exact) plus FIL for people.
#[derive(Debug, Serialize)]
pub struct ProviderView {
    pub address: String,
    /// The same account's Filecoin spelling (`f410f…` on mainnet, `t410f…` elsewhere).
    pub address_filecoin: String,
    pub endpoint: String,
    pub ssh_host_key: String,
    pub active: bool,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Disk an order gets unless it asks for another size.
    pub disk_mib: u64,
    /// The most disk one order may ask for.
    pub max_disk_mib: u64,
    pub gpu_model: String,
    pub gpu_count: u32,
    pub price_per_second_wei: String,
    pub price_per_hour_fil: String,
    pub price_per_gib_wei: String,
    pub price_per_gib_fil: String,
    pub datasets: Vec<shale_contracts::Dataset>,
    /// The image catalog (empty: orders run the provider's built-in default image).
    pub images: Vec<ImageView>,
    pub rating_count: u64,
    /// Average stars with two decimals, `null` when unrated.
    pub rating: Option<String>,
}

/// One image of a provider's catalog as scripts see it.
#[derive(Debug, Serialize)]
pub struct ImageView {
    pub name: String,
    /// `sha256:<64 hex>`: what the order's terms carry and the gateway runs.
    pub digest: String,
    /// `sha256:` and the first 12 hex digits.
    pub digest_short: String,
    pub gpu_ready: bool,
    /// 0 when the provider did not say.
    pub size_bytes: u64,
    pub description: String,
    /// The image `shale order create` picks without `--image`.
    pub default: bool,
    pub provider: String,
    /// The provider's Filecoin spelling.
    pub provider_filecoin: String,
}

impl ImageView {
    pub fn new(p: &Provider, i: &shale_contracts::Image, default: bool, network: Network) -> Self {
        Self {
            name: i.name.clone(),
            digest: i.digest_text(),
            digest_short: crate::cmd::order::short_digest(&i.digest),
            gpu_ready: i.gpu_ready,
            size_bytes: i.size_bytes,
            description: i.description.clone(),
            default,
            provider: format!("{:#x}", p.address),
            provider_filecoin: to_filecoin(p.address, network),
        }
    }
}

/// The average rating as `4.67 (3)`, or `unrated`.
pub fn rating_text(p: &Provider) -> String {
    match p.rating.average_centistars() {
        Some(c) => format!("{}.{:02} ★ ({})", c / 100, c % 100, p.rating.count),
        None => "unrated".into(),
    }
}

impl ProviderView {
    /// The view of `p`, with Filecoin spellings for `network`.
    pub fn new(p: &Provider, network: Network) -> Self {
        Self {
            address: format!("{:#x}", p.address),
            address_filecoin: to_filecoin(p.address, network),
            endpoint: p.endpoint.clone(),
            ssh_host_key: p.ssh_host_key.clone(),
            active: p.active,
            cpus: p.offer.cpus,
            memory_mib: p.offer.memory_mib,
            disk_mib: p.offer.disk_mib,
            max_disk_mib: p.offer.max_disk_mib,
            gpu_model: p.offer.gpu_model.clone(),
            gpu_count: p.offer.gpu_count,
            price_per_second_wei: p.offer.price_per_second.to_string(),
            price_per_hour_fil: format_fil(per_hour(p.offer.price_per_second)),
            price_per_gib_wei: p.offer.price_per_gib.to_string(),
            price_per_gib_fil: format_fil(p.offer.price_per_gib),
            datasets: p.datasets.clone(),
            images: {
                let default = p.default_image().map(|i| i.name.clone());
                p.images
                    .iter()
                    .map(|i| {
                        let is_default = default.as_deref() == Some(i.name.as_str());
                        ImageView::new(p, i, is_default, network)
                    })
                    .collect()
            },
            rating_count: p.rating.count,
            rating: p
                .rating
                .average_centistars()
                .map(|c| format!("{}.{:02}", c / 100, c % 100)),
        }
    }
}

/// An order as scripts see it.
#[derive(Debug, Serialize)]
pub struct OrderView {
    pub id: u64,
    pub state: String,
    pub client: String,
    pub provider: String,
    /// The client's Filecoin spelling; absent where the chain's network was not asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_filecoin: Option<String>,
    /// The provider's Filecoin spelling; absent like `client_filecoin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_filecoin: Option<String>,
    pub key_fingerprint: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub gpus: u32,
    pub dataset: Option<String>,
    /// `sha256:<64 hex>` of the image the order runs; `null`: the provider's built-in default.
    pub image_digest: Option<String>,
    pub price_per_second_wei: String,
    pub price_per_gib_wei: String,
    pub max_duration_secs: u64,
    pub escrow_wei: String,
    pub escrow_fil: String,
    pub collateral_wei: String,
    pub paid_wei: String,
    pub paid_fil: String,
    pub created_at: u64,
    pub accepted_at: Option<u64>,
    pub ended_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub claimed_seconds: u64,
    pub claimed_bytes: String,
    pub head: String,
    pub settled: bool,
    pub rated: bool,
}

impl OrderView {
    /// The view of `o` with the Filecoin spellings of its parties for `network`.
    pub fn new(o: &Order, network: Network) -> Self {
        Self {
            client_filecoin: Some(to_filecoin(o.client, network)),
            provider_filecoin: Some(to_filecoin(o.provider, network)),
            ..Self::from(o)
        }
    }
}

/// Without the chain's network: no Filecoin spellings (what [`OrderView::new`] adds to).
impl From<&Order> for OrderView {
    fn from(o: &Order) -> Self {
        Self {
            id: o.id,
            state: o.state.to_string(),
            client: format!("{:#x}", o.client),
            provider: format!("{:#x}", o.provider),
            client_filecoin: None,
            provider_filecoin: None,
            key_fingerprint: format_fingerprint(&o.key_fingerprint),
            cpus: o.cpus,
            memory_mib: o.memory_mib,
            disk_mib: o.disk_mib,
            gpus: o.gpus,
            dataset: o.dataset.clone(),
            image_digest: o
                .image_digest
                .as_ref()
                .map(shale_contracts::format_image_digest),
            price_per_second_wei: o.price_per_second.to_string(),
            price_per_gib_wei: o.price_per_gib.to_string(),
            max_duration_secs: o.max_duration_secs,
            escrow_wei: o.escrow.to_string(),
            escrow_fil: format_fil(o.escrow),
            collateral_wei: o.collateral.to_string(),
            paid_wei: o.paid.to_string(),
            paid_fil: format_fil(o.paid),
            created_at: o.created_at,
            accepted_at: o.accepted_at,
            ended_at: o.ended_at,
            expires_at: o.expires_at(),
            claimed_seconds: o.claimed_seconds,
            claimed_bytes: o.claimed_bytes.to_string(),
            head: format!("0x{}", hex(&o.head)),
            settled: o.settled,
            rated: o.rated,
        }
    }
}

/// Lower-case hex without prefix.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A duration in words: `1h 02m`, `4m 05s`, `12s`.
pub fn duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// A memory or disk size in words: MiB under a GiB, GiB with two decimals above.
pub fn size(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else if mib >= 1024 {
        format!("{}.{:02} GiB", mib / 1024, (mib % 1024) * 100 / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// Parses a memory or disk size, `8GiB`, `512MiB`, `1TiB`, `1024` (MiB), into MiB.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a size (write 8GiB or 512MiB)"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "mib" | "m" => 1,
        "gib" | "g" => 1024,
        "tib" | "t" => 1024 * 1024,
        other => {
            return Err(format!(
                "{text:?}: unknown size unit {other:?} (use MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Like [`parse_size`], in bytes (`64MiB` is 67108864; `0` is zero).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    parse_size(text)?
        .checked_mul(1 << 20)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("8GiB").unwrap(), 8192);
        assert_eq!(parse_size("512MiB").unwrap(), 512);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("20GiB").unwrap(), 20_480);
        assert_eq!(parse_size("1TiB").unwrap(), 1_048_576);
        assert!(parse_size("8GB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999999999TiB").is_err());
        assert_eq!(size(8192), "8 GiB");
        assert_eq!(size(1536), "1.50 GiB");
        assert_eq!(size(512), "512 MiB");
    }

    #[test]
    fn durations_read_as_words() {
        assert_eq!(duration(12), "12s");
        assert_eq!(duration(245), "4m 05s");
        assert_eq!(duration(3720), "1h 02m");
    }
}
