//! `shale providers` and `shale datasets`: what the marketplace offers.

use serde::Serialize;
use shale_contracts::Network;

use crate::money::format_fil;
use crate::settings::Settings;
use crate::view::{self, per_hour, print_json, rating_text, size, table, ImageView, ProviderView};

/// Lists the providers, active ones first.
pub async fn providers(settings: &Settings, all: bool, json: bool) -> anyhow::Result<()> {
    let market = settings.reader().await?;
    let network = view::network(&market).await?;
    let mut providers = market.providers().await?;
    providers.retain(|p| all || p.active);
    providers.sort_by_key(|p| (!p.active, p.offer.price_per_second));
    if json {
        let views: Vec<ProviderView> = providers
            .iter()
            .map(|p| ProviderView::new(p, network))
            .collect();
        return print_json(&views);
    }
    if providers.is_empty() {
        println!("No providers are registered on this marketplace yet.");
        return Ok(());
    }
    let mut t = table([
        "provider", "endpoint", "cpus", "memory", "disk", "gpus", "FIL/hour", "FIL/GiB",
        "datasets", "images", "rating",
    ]);
    for p in &providers {
        let gpus = if p.offer.gpu_count == 0 {
            "-".to_string()
        } else {
            format!("{} × {}", p.offer.gpu_count, p.offer.gpu_model)
        };
        let datasets: Vec<&str> = p.datasets.iter().map(|d| d.id.as_str()).collect();
        let images: Vec<&str> = p.images.iter().map(|i| i.name.as_str()).collect();
        t.add_row(vec![
            format!(
                "{}{}",
                view::address(p.address, network),
                if p.active { "" } else { " (withdrawn)" }
            ),
            p.endpoint.clone(),
            p.offer.cpus.to_string(),
            size(p.offer.memory_mib),
            format!(
                "{} (up to {})",
                size(p.offer.disk_mib),
                size(p.offer.max_disk_mib)
            ),
            gpus,
            format_fil(per_hour(p.offer.price_per_second)),
            format_fil(p.offer.price_per_gib),
            datasets.join(", "),
            if images.is_empty() {
                "built-in".to_string()
            } else {
                images.join(", ")
            },
            rating_text(p),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// One dataset and who serves it.
#[derive(Debug, Serialize)]
struct DatasetRow {
    id: String,
    provider: String,
    /// The provider's Filecoin spelling.
    provider_filecoin: String,
    endpoint: String,
    size_bytes: u64,
    piece_cid: Option<String>,
    /// On FEVM the registry checked it when the dataset was listed: the deal stores
    /// `piece_cid` with the provider's miner (`miner`).
    deal_id: Option<u64>,
    /// The provider's Filecoin miner, `f0…`, once set.
    miner: Option<String>,
    /// When the provider last recorded that the bytes it serves hash to `piece_cid` (unix
    /// seconds; absent when never).
    verified_at: Option<u64>,
    description: String,
}

/// Lists the datasets of active providers, optionally only those whose id or description
/// contains `filter` (case-insensitive).
pub async fn datasets(settings: &Settings, filter: Option<&str>, json: bool) -> anyhow::Result<()> {
    let market = settings.reader().await?;
    let network = view::network(&market).await?;
    let needle = filter.map(str::to_lowercase);
    let mut rows = Vec::new();
    for p in market.providers().await? {
        if !p.active {
            continue;
        }
        for d in &p.datasets {
            let hit = needle.as_ref().is_none_or(|n| {
                d.id.to_lowercase().contains(n) || d.description.to_lowercase().contains(n)
            });
            if hit {
                rows.push(DatasetRow {
                    id: d.id.clone(),
                    provider: format!("{:#x}", p.address),
                    provider_filecoin: shale_contracts::filecoin_address::to_filecoin(
                        p.address, network,
                    ),
                    endpoint: p.endpoint.clone(),
                    size_bytes: d.size_bytes,
                    piece_cid: d.piece_cid.clone(),
                    deal_id: d.deal_id,
                    miner: p.miner_id.map(|m| format!("f0{m}")),
                    verified_at: d.verified_at,
                    description: d.description.clone(),
                });
            }
        }
    }
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("No dataset matches.");
        return Ok(());
    }
    let now = market.chain_time().await?;
    let mut t = table([
        "dataset",
        "size",
        "piece CID",
        "deal",
        "verified",
        "provider",
        "description",
    ]);
    for r in rows {
        t.add_row(vec![
            r.id,
            bytes(r.size_bytes),
            r.piece_cid.unwrap_or_else(|| "-".into()),
            match (r.deal_id, &r.miner) {
                // A listed deal passed the registry's check against the market actor.
                (Some(deal), Some(miner)) => format!("{deal} ({miner})"),
                (Some(deal), None) => deal.to_string(),
                (None, _) => "-".into(),
            },
            r.verified_at
                .map(|at| format!("{} ago", view::duration(now.saturating_sub(at))))
                .unwrap_or_else(|| "never".into()),
            format!("{} ({})", r.provider, r.provider_filecoin),
            r.description,
        ]);
    }
    println!("{t}");
    Ok(())
}

/// Lists the image catalogs of active providers (or of one provider, withdrawn or not).
pub async fn images(
    settings: &Settings,
    provider: Option<shale_contracts::Address>,
    json: bool,
) -> anyhow::Result<()> {
    let market = settings.reader().await?;
    let network = view::network(&market).await?;
    let providers = match provider {
        Some(address) => vec![market.provider(address).await?],
        None => market
            .providers()
            .await?
            .into_iter()
            .filter(|p| p.active)
            .collect(),
    };
    let mut rows = Vec::new();
    for p in &providers {
        let default = p.default_image().map(|i| i.name.clone());
        for i in &p.images {
            rows.push(ImageView::new(
                p,
                i,
                default.as_deref() == Some(i.name.as_str()),
                network,
            ));
        }
    }
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        match provider {
            Some(a) => println!(
                "Provider {} lists no images: its orders run its built-in default image.",
                view::address(a, network)
            ),
            None => println!("No provider lists images: orders run each one's built-in default."),
        }
        print_client_registries(&providers, network);
        return Ok(());
    }
    let mut t = table([
        "image",
        "digest",
        "GPU-ready",
        "size",
        "provider",
        "description",
    ]);
    for r in rows {
        t.add_row(vec![
            if r.default {
                format!("{} (default)", r.name)
            } else {
                r.name
            },
            r.digest_short,
            if r.gpu_ready { "yes" } else { "no" }.to_string(),
            if r.size_bytes == 0 {
                "-".into()
            } else {
                bytes(r.size_bytes)
            },
            format!("{} ({})", r.provider, r.provider_filecoin),
            r.description,
        ]);
    }
    println!("{t}");
    print_client_registries(&providers, network);
    Ok(())
}

/// Where each provider lets clients bring their own images from (`--image HOST/PATH@sha256:…`).
fn print_client_registries(providers: &[shale_contracts::Provider], network: Network) {
    for p in providers
        .iter()
        .filter(|p| !p.client_image_registries.is_empty())
    {
        println!(
            "{} also runs your own image, by digest, from: {}",
            view::address(p.address, network),
            p.client_image_registries.join(", ")
        );
    }
}

/// A byte count in words.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64; // display only; never money
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
