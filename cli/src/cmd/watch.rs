//! `shale watch ORDER`: the payment tunnel, live, from the chain's figures.
//!
//! Cost so far is what the lease has run up under the order's tariff: the claimed usage the
//! contract paid, plus the lease time not yet claimed at the per-second price. Bytes not yet
//! claimed are only known to the gateway's receipts; they are added when `--once` fetches them.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use shale_contracts::{Marketplace, Order, OrderState, U256};

use crate::money::{format_fil, Fil};
use crate::settings::Settings;
use crate::view::{duration, print_json};

/// One reading of an order.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub order: u64,
    pub state: String,
    pub lease_secs: u64,
    pub lease_left_secs: u64,
    pub claimed_seconds: u64,
    pub claimed_bytes: String,
    pub paid_wei: String,
    /// Paid plus unclaimed lease time at the tariff.
    pub cost_so_far_wei: String,
    /// Deposit (escrow left + paid) minus the cost so far.
    pub escrow_left_wei: String,
    pub deposit_wei: String,
    /// How long the escrow lasts at the per-second price (`None`: free or ended).
    pub time_left_at_rate_secs: Option<u64>,
}

/// Reads the order at chain time `now` into a snapshot.
pub fn snapshot(o: &Order, now: u64) -> Snapshot {
    let lease_end = o.ended_at.unwrap_or(now).min(o.expires_at().unwrap_or(now));
    let lease_secs = o
        .accepted_at
        .map(|a| lease_end.min(now).saturating_sub(a))
        .unwrap_or(0);
    let unclaimed = lease_secs.saturating_sub(o.claimed_seconds);
    let unclaimed_cost = o.price_per_second.saturating_mul(U256::from(unclaimed));
    let cost = o.paid.saturating_add(unclaimed_cost);
    let deposit = o.escrow.saturating_add(o.paid);
    let left = o.escrow.saturating_sub(unclaimed_cost);
    let live = o.state == OrderState::Active && o.ended_at.is_none();
    Snapshot {
        order: o.id,
        state: o.state.to_string(),
        lease_secs,
        lease_left_secs: if live {
            o.expires_at().unwrap_or(now).saturating_sub(now)
        } else {
            0
        },
        claimed_seconds: o.claimed_seconds,
        claimed_bytes: o.claimed_bytes.to_string(),
        paid_wei: o.paid.to_string(),
        cost_so_far_wei: cost.to_string(),
        escrow_left_wei: left.to_string(),
        deposit_wei: deposit.to_string(),
        time_left_at_rate_secs: (live && !o.price_per_second.is_zero())
            .then(|| u64::try_from(left / o.price_per_second).unwrap_or(u64::MAX)),
    }
}

/// Per-mille of `part` in `whole`, for the bar.
fn permille(part: U256, whole: U256) -> u64 {
    if whole.is_zero() {
        return 0;
    }
    u64::try_from(part.saturating_mul(U256::from(1000u32)) / whole).unwrap_or(1000)
}

/// Prints one snapshot in words.
pub fn print_snapshot(s: &Snapshot) {
    let left: U256 = s.escrow_left_wei.parse().unwrap_or_default();
    let deposit: U256 = s.deposit_wei.parse().unwrap_or_default();
    let pm = permille(left, deposit);
    let filled = (pm / 50) as usize;
    println!(
        "order {} {}: lease {} ({} left) · cost so far {} · claimed {} / {} bytes, paid {}",
        s.order,
        s.state,
        duration(s.lease_secs),
        duration(s.lease_left_secs),
        Fil(s.cost_so_far_wei.parse().unwrap_or_default()),
        duration(s.claimed_seconds),
        s.claimed_bytes,
        Fil(s.paid_wei.parse().unwrap_or_default()),
    );
    println!(
        "escrow [{}{}] {} of {} left{}",
        "█".repeat(filled),
        "░".repeat(20 - filled.min(20)),
        Fil(left),
        Fil(deposit),
        s.time_left_at_rate_secs
            .map(|t| format!(", lasts {} at the current rate", duration(t)))
            .unwrap_or_default()
    );
}

/// `shale watch ORDER [--once]`.
pub async fn run(settings: &Settings, id: u64, once: bool, json: bool) -> anyhow::Result<()> {
    let market = settings.reader().await?;
    if once || json {
        let s = read(&market, id).await?;
        if json {
            return print_json(&s);
        }
        print_snapshot(&s);
        return Ok(());
    }
    let multi = MultiProgress::new();
    let status = multi.add(ProgressBar::new_spinner());
    status.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("template"));
    let bar = multi.add(ProgressBar::new(1000));
    bar.set_style(
        ProgressStyle::with_template("escrow {bar:30.green/red} {msg}")
            .expect("template")
            .progress_chars("█▉░"),
    );
    let claims = multi.add(ProgressBar::new_spinner());
    claims.set_style(ProgressStyle::with_template("  {msg}").expect("template"));
    loop {
        let s = read(&market, id).await?;
        let left: U256 = s.escrow_left_wei.parse().unwrap_or_default();
        let deposit: U256 = s.deposit_wei.parse().unwrap_or_default();
        status.set_message(format!(
            "order {} {} · lease {} ({} left) · cost so far {}",
            s.order,
            s.state,
            duration(s.lease_secs),
            duration(s.lease_left_secs),
            Fil(s.cost_so_far_wei.parse().unwrap_or_default())
        ));
        status.tick();
        bar.set_position(permille(left, deposit));
        bar.set_message(format!(
            "{} of {} FIL left{}",
            format_fil(left),
            format_fil(deposit),
            s.time_left_at_rate_secs
                .map(|t| format!(" · lasts {} at this rate", duration(t)))
                .unwrap_or_default()
        ));
        claims.set_message(format!(
            "claims paid: {} for {} of lease and {} bytes",
            Fil(s.paid_wei.parse().unwrap_or_default()),
            duration(s.claimed_seconds),
            s.claimed_bytes
        ));
        if s.state != "active" {
            status.finish();
            bar.finish();
            claims.finish();
            println!("Order {id} is {}.", s.state);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads order `id` now.
pub async fn read(market: &Marketplace, id: u64) -> anyhow::Result<Snapshot> {
    let o = market.order(id).await?;
    let now = display_now(market).await?;
    Ok(snapshot(&o, now))
}

/// "Now" for showing lease time: the chain's clock, or the wall clock when that is later. A
/// local chain only stamps a new time when it mines a block, so its clock stands still between
/// transactions; figures shown here are estimates, never what the contract pays.
pub async fn display_now(market: &Marketplace) -> anyhow::Result<u64> {
    let chain = market.chain_time().await?;
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(chain.max(wall))
}
