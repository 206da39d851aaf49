//! `shale sp …`: the storage provider's side of the marketplace.

use anyhow::{bail, Context};
use serde::Serialize;
use shale_contracts::{parse_image_digest, Image, Marketplace, OrderState, U256};

use crate::cmd::order::{orders_of, orders_table_on};
use crate::money::Fil;
use crate::spconfig::SpConfig;
use crate::view::{print_json, OrderView};

/// A signing client for the provider of `config`.
pub async fn signer(config: &SpConfig) -> anyhow::Result<Marketplace> {
    let key = crate::settings::load_signer(
        config
            .sp
            .keystore
            .as_deref()
            .or(std::env::var_os("SHALE_KEYSTORE")
                .as_ref()
                .map(std::path::Path::new)),
    )?;
    if key.address() != config.gateway.chain.provider {
        bail!(
            "the signing key is {:#x} but the config's provider is {:#x}; sign with the provider's key",
            key.address(),
            config.gateway.chain.provider
        );
    }
    let chain = &config.gateway.chain;
    Marketplace::connect_with_fees(&chain.rpc_url, chain.marketplace, Some(key), chain.fees)
        .await
        .with_context(|| format!("connecting to the marketplace on {}", chain.rpc_url))
}

/// The gateway's public host key (created when missing), as registered on chain.
pub fn host_key(config: &SpConfig) -> anyhow::Result<String> {
    let key = shale_gateway::hostkey::load_or_generate(&config.gateway.host_key)
        .context("loading the host key")?;
    Ok(shale_gateway::hostkey::public_openssh(&key))
}

/// `shale sp register`: the endpoint, host key, offer and datasets of the config, on chain.
pub async fn register(config: &SpConfig) -> anyhow::Result<()> {
    let market = signer(config).await?;
    let offer = config.offer()?;
    let datasets = config.datasets()?;
    let tx = market
        .register_provider(&config.endpoint(), &host_key(config)?, &offer, &datasets)
        .await?;
    println!(
        "Registered {:#x} at {} with {} dataset(s) (tx {:#x}, fee {}).",
        config.gateway.chain.provider,
        config.endpoint(),
        datasets.len(),
        tx.tx_hash,
        Fil(tx.fee)
    );
    publish_client_registries(config, &market).await?;
    publish_images(config, &market).await
}

/// Puts on chain the registries clients may bring their own images from
/// (`[containers] allow_client_images`, `allowed_registries`), when the chain says otherwise.
async fn publish_client_registries(config: &SpConfig, market: &Marketplace) -> anyhow::Result<()> {
    let containers = &config.gateway.containers;
    let wanted = if containers.allow_client_images {
        containers.allowed_registries.clone()
    } else {
        Vec::new()
    };
    let listed = market
        .provider(config.gateway.chain.provider)
        .await?
        .client_image_registries;
    if listed == wanted {
        return Ok(());
    }
    let tx = market.set_client_image_registries(&wanted).await?;
    if wanted.is_empty() {
        println!(
            "Clients may no longer bring their own images (tx {:#x}).",
            tx.tx_hash
        );
    } else {
        println!(
            "Clients may bring their own images from {} (tx {:#x}, fee {}).",
            wanted.join(", "),
            tx.tx_hash,
            Fil(tx.fee)
        );
    }
    Ok(())
}

/// The catalog as it goes on chain: every `[images.NAME]` whose digest is known, the one marked
/// `default` first (clients without `--image` take the first entry unless one is named
/// `default`). A digest is known once the broker installed the image (`catalog.json` beside the
/// gateway's state records what each name resolved to) or when the reference pins it
/// (`REPO@sha256:…`). `record` is that `catalog.json`. Returns the images and the names still
/// without a digest.
pub fn catalog_images(
    catalog: &shale_provisioner::Catalog,
    record: &std::path::Path,
) -> anyhow::Result<(Vec<Image>, Vec<String>)> {
    if catalog.is_empty() {
        return Ok((vec![], vec![]));
    }
    let record = crate::installed::InstalledCatalog::read(record)?;
    let mut images = Vec::new();
    let mut pending = Vec::new();
    for (name, entry) in catalog {
        let installed = record.installed.iter().find(|i| &i.name == name);
        let pinned = entry
            .reference
            .as_deref()
            .and_then(|r| r.rsplit_once('@'))
            .map(|(_, d)| d);
        let Some(text) = installed.map(|i| i.digest.as_str()).or(pinned) else {
            pending.push(name.clone());
            continue;
        };
        let digest = parse_image_digest(text).with_context(|| format!("image {name}"))?;
        let image = Image {
            name: name.clone(),
            digest,
            description: entry.description.clone(),
            gpu_ready: entry.gpu_ready,
            size_bytes: entry.size_bytes.unwrap_or(0),
        };
        if entry.default {
            images.insert(0, image);
        } else {
            images.push(image);
        }
    }
    Ok((images, pending))
}

/// Publishes the config's image catalog on chain (see [`catalog_images`]).
async fn publish_images(config: &SpConfig, market: &Marketplace) -> anyhow::Result<()> {
    let record = crate::installed::InstalledCatalog::path(config);
    let (images, pending) = catalog_images(&config.gateway.images, &record)?;
    if images.is_empty() && pending.is_empty() {
        // No [images]: whatever the chain lists is left alone (none: orders carry 0).
        return Ok(());
    }
    let sent = market
        .sync_images(&images)
        .await
        .context("publishing the image catalog")?;
    let names: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
    println!(
        "Image catalog on chain: {} ({} transaction(s)).",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        },
        sent.len()
    );
    if !pending.is_empty() {
        eprintln!(
            "Not published yet (no digest until the gateway's broker installs them): {}. Run \
             `shale sp update` once `shale gateway` has started.",
            pending.join(", ")
        );
    }
    Ok(())
}

/// `shale sp update`: endpoint, host key and offer; datasets added or removed to match.
pub async fn update(config: &SpConfig) -> anyhow::Result<()> {
    let market = signer(config).await?;
    let offer = config.offer()?;
    let tx = market
        .update_provider(&config.endpoint(), &host_key(config)?, &offer)
        .await?;
    println!(
        "Updated the offer (tx {:#x}, fee {}).",
        tx.tx_hash,
        Fil(tx.fee)
    );
    let on_chain = market
        .provider(config.gateway.chain.provider)
        .await?
        .datasets;
    let local = config.datasets()?;
    for d in &on_chain {
        if !local.iter().any(|l| l.id == d.id) {
            market.remove_dataset(&d.id).await?;
            println!("Removed dataset {}.", d.id);
        }
    }
    for d in &local {
        if !on_chain.iter().any(|c| c.id == d.id) {
            market.add_dataset(d).await?;
            println!("Added dataset {}.", d.id);
        }
    }
    publish_client_registries(config, &market).await?;
    publish_images(config, &market).await
}

/// `shale sp miner f0…`: the Filecoin miner whose deals the provider's datasets name. FEVM
/// checks that the provider's f410 address controls it.
pub async fn set_miner(config: &SpConfig, miner: &str) -> anyhow::Result<()> {
    let id = parse_miner(miner)?;
    let market = signer(config).await?;
    let tx = market.set_miner(id).await?;
    println!(
        "Set miner f0{id}: datasets with a deal_id are now checked against its deals (tx {:#x}, fee {}).",
        tx.tx_hash,
        Fil(tx.fee)
    );
    Ok(())
}

/// A miner actor id from `f01234`, `t01234` or `1234`.
pub fn parse_miner(text: &str) -> anyhow::Result<u64> {
    let digits = text
        .strip_prefix("f0")
        .or_else(|| text.strip_prefix("t0"))
        .unwrap_or(text);
    match digits.parse::<u64>() {
        Ok(id) if id > 0 && !digits.starts_with('0') => Ok(id),
        _ => {
            bail!("{text:?} is not a miner actor id: write it as f01234 (or t01234 on Calibration)")
        }
    }
}

/// `shale sp datasets --publish`: records on chain when the gateway last verified each dataset
/// whose bytes matched its piece CID at the broker's last check, for those checked since the
/// chain last heard. Returns the ids published.
pub async fn publish_verified(config: &SpConfig) -> anyhow::Result<Vec<String>> {
    let market = signer(config).await?;
    let ids = unpublished_verifications(config, &market).await?;
    if ids.is_empty() {
        println!("Nothing to publish: no dataset was verified since the chain last heard.");
        return Ok(ids);
    }
    let tx = market.mark_verified(&ids).await?;
    println!(
        "Published the verification of {} (tx {:#x}, fee {}).",
        ids.join(", "),
        tx.tx_hash,
        Fil(tx.fee)
    );
    Ok(ids)
}

/// The listed datasets whose bytes the broker's last check found to be their piece, after the
/// chain's record of the provider's last verification of them.
pub async fn unpublished_verifications(
    config: &SpConfig,
    market: &Marketplace,
) -> anyhow::Result<Vec<String>> {
    let on_chain = market
        .provider(config.gateway.chain.provider)
        .await?
        .datasets;
    Ok(crate::cmd::piece::dataset_rows(config)?
        .into_iter()
        .filter(|r| r.state == crate::cmd::piece::VERIFIED)
        .filter(|r| {
            on_chain
                .iter()
                .any(|d| d.id == r.id && d.verified_at.unwrap_or(0) < r.checked_at.unwrap_or(0))
        })
        .map(|r| r.id)
        .collect())
}

/// `shale sp withdraw`: no new orders; live ones continue.
pub async fn withdraw(config: &SpConfig) -> anyhow::Result<()> {
    let market = signer(config).await?;
    let tx = market.withdraw_provider().await?;
    println!(
        "Withdrawn: no new orders can name {:#x}; live orders continue (tx {:#x}).",
        config.gateway.chain.provider, tx.tx_hash
    );
    Ok(())
}

#[derive(Serialize)]
struct SpOrders {
    orders: Vec<OrderView>,
    earned_wei: String,
    pending: usize,
    active: usize,
    ended: usize,
}

/// `shale sp orders`: pending, active and ended orders with the earnings.
pub async fn orders(config: &SpConfig, json: bool) -> anyhow::Result<()> {
    let chain = &config.gateway.chain;
    let market = Marketplace::connect(&chain.rpc_url, chain.marketplace, None).await?;
    let mut list = orders_of(&market, chain.provider).await?;
    list.retain(|o| o.provider == chain.provider);
    let earned = list
        .iter()
        .fold(U256::ZERO, |a, o| a.saturating_add(o.paid));
    let network = crate::view::network(&market).await?;
    let count = |s| list.iter().filter(|o| o.state == s).count();
    let (pending, active, ended) = (
        count(OrderState::Pending),
        count(OrderState::Active),
        count(OrderState::Ended),
    );
    if json {
        return print_json(&SpOrders {
            orders: list.iter().map(|o| OrderView::new(o, network)).collect(),
            earned_wei: earned.to_string(),
            pending,
            active,
            ended,
        });
    }
    if list.is_empty() {
        println!("No orders yet.");
        return Ok(());
    }
    println!(
        "{}",
        orders_table_on(
            &list,
            crate::cmd::watch::display_now(&market).await?,
            Some(network)
        )
    );
    println!(
        "{pending} pending, {active} active, {ended} ended; earned {} in claims.",
        Fil(earned)
    );
    Ok(())
}

/// `shale sp accept ORDER`: accepts a pending order after checking it fits this SP.
pub async fn accept(config: &SpConfig, id: u64) -> anyhow::Result<()> {
    let market = signer(config).await?;
    accept_with(&market, config, id).await.map(|_| ())
}

/// [`accept`] with a given signing client; returns the transaction.
pub async fn accept_with(
    market: &Marketplace,
    config: &SpConfig,
    id: u64,
) -> anyhow::Result<shale_contracts::TxReceipt> {
    let o = market.order(id).await?;
    if o.provider != config.gateway.chain.provider {
        bail!(
            "order {id} was placed with {:#x}, not with this provider",
            o.provider
        );
    }
    if o.state != OrderState::Pending {
        bail!(
            "order {id} is {}, only pending orders can be accepted",
            o.state
        );
    }
    if let Some(d) = &o.dataset {
        if !config.gateway.containers.datasets.contains_key(d) {
            bail!("order {id} asks for dataset {d:?}, which is not in [containers.datasets]");
        }
    }
    let tx = market.accept(id).await?;
    println!(
        "Accepted order {id}, posting {} collateral (tx {:#x}, fee {}).",
        Fil(o.collateral),
        tx.tx_hash,
        Fil(tx.fee)
    );
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn miner_ids_are_read_in_every_spelling_and_nonsense_is_refused() {
        assert_eq!(parse_miner("f01234").unwrap(), 1234);
        assert_eq!(parse_miner("t01234").unwrap(), 1234);
        assert_eq!(parse_miner("1234").unwrap(), 1234);
        for bad in [
            "", "f0", "f00123", "f0-1", "f1abc", "t410fxyz", "0", "f0 12",
        ] {
            let err = parse_miner(bad).unwrap_err().to_string();
            assert!(err.contains("not a miner actor id"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_catalog_goes_on_chain_with_its_installed_digests_default_first() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("catalog.json");
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let catalog: shale_provisioner::Catalog = toml::from_str(&format!(
            r#"
            [base]
            archive = "/srv/base.oci"
            description = "Debian"
            [cuda]
            reference = "registry.local/cuda:12"
            gpu_ready = true
            size_bytes = 9000
            default = true
            [pinned]
            reference = "registry.local/tiny@{b}"
            "#
        ))
        .unwrap();
        // Before the broker installed anything only the pinned reference has a digest.
        let (images, pending) = catalog_images(&catalog, &record).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].digest_text(), b);
        assert_eq!(pending, vec!["base".to_string(), "cuda".to_string()]);

        std::fs::write(
            &record,
            format!(
                r#"{{"installed": [{{"name": "cuda", "image": "registry.local/cuda:12", "digest": "{a}"}},
                                  {{"name": "base", "image": "base", "digest": "{b}"}}],
                    "failed": {{}}}}"#
            ),
        )
        .unwrap();
        let (images, pending) = catalog_images(&catalog, &record).unwrap();
        assert!(pending.is_empty());
        let names: Vec<&str> = images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["cuda", "base", "pinned"], "the default first");
        assert_eq!(images[0].digest_text(), a);
        assert!(images[0].gpu_ready);
        assert_eq!(images[0].size_bytes, 9000);
        assert_eq!(images[1].description, "Debian");
    }
}
