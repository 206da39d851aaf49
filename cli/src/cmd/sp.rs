//! `shale sp …`: the storage provider's side of the marketplace.

use anyhow::{bail, Context};
use serde::Serialize;
use shale_contracts::{Marketplace, OrderState, U256};

use crate::cmd::order::{orders_of, orders_table};
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
    Marketplace::connect(&chain.rpc_url, chain.marketplace, Some(key))
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
    Ok(())
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
    let count = |s| list.iter().filter(|o| o.state == s).count();
    let (pending, active, ended) = (
        count(OrderState::Pending),
        count(OrderState::Active),
        count(OrderState::Ended),
    );
    if json {
        return print_json(&SpOrders {
            orders: list.iter().map(OrderView::from).collect(),
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
        orders_table(&list, crate::cmd::watch::display_now(&market).await?)
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
