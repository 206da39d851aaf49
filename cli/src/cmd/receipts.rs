//! `shale receipts ORDER --verify`: the client's check on what the provider claims.
//!
//! The gateway serves an order's tick log as JSON lines on the `shale-receipts` SSH subsystem.
//! We fetch it with the stock `ssh` client (the order's own key and pinned host key), recompute
//! the Poseidon tick chain, and compare it with what the contract stored and paid: the head the
//! last claim reached, the claimed seconds and bytes, and the amount paid.

use std::process::Stdio;

use anyhow::Context;
use serde::Serialize;
use shale_contracts::{Order, U256};
use shale_meter::ledger::Receipt;
use shale_meter::{verify_receipts, Deployment, Head, Tariff, Tick, Usage};

use crate::exit::Failure;
use crate::money::Fil;
use crate::settings::Settings;
use crate::sshcfg::SshFiles;
use crate::view::{duration, hex, print_json, table};
use crate::wire::{WireCounts, WireTotals};

/// The stock `ssh` invocation for order `id`, through the Host entry `order create` wrote.
pub fn ssh(settings: &Settings, id: u64) -> tokio::process::Command {
    let files = SshFiles::new(&settings.ssh_dir);
    let mut c = tokio::process::Command::new("ssh");
    c.arg("-F")
        .arg(&files.config)
        .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
        .arg(format!("shale-{id}"));
    c
}

/// Fetches the receipts of order `id` over SSH.
pub async fn fetch(settings: &Settings, id: u64) -> anyhow::Result<Vec<Receipt>> {
    let out = ssh(settings, id)
        .args(["-s", "shale-receipts"])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running ssh (is openssh-client installed?)")?;
    if !out.status.success() {
        return Err(Failure::Ssh(format!(
            "ssh shale-{id} -s shale-receipts failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .into());
    }
    let text = String::from_utf8(out.stdout).context("receipts are not UTF-8")?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("receipt line {} is not a receipt", i + 1))
        })
        .collect()
}

/// The outcome of a check.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub order: u64,
    pub ticks: usize,
    pub sessions: usize,
    pub chain_ok: bool,
    pub receipts_head: String,
    pub onchain_head: String,
    /// Ticks covered by the provider's claims (the prefix ending at the on-chain head).
    pub claimed_ticks: Option<usize>,
    pub usage_seconds: u64,
    pub usage_bytes: u128,
    /// The receipts' bytes into the container and out of it.
    pub usage_bytes_in: u64,
    pub usage_bytes_out: u64,
    /// What this machine's payment tunnel counted on the wire, when it has a count.
    pub wire: Option<WireTotals>,
    pub usage_charge_wei: String,
    pub claimed_seconds: u64,
    pub claimed_bytes: String,
    pub paid_wei: String,
    pub matches: bool,
    pub problems: Vec<String>,
}

/// Checks the receipts against the order as the contract of `deployment` reports it (the tick
/// chain is hashed under the order's key on that deployment: another marketplace's log fails).
pub fn check(deployment: &Deployment, order: &Order, receipts: &[Receipt]) -> Verdict {
    let ticks: Vec<Tick> = receipts
        .iter()
        .filter_map(|r| match r {
            Receipt::Tick(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    let sessions = receipts
        .iter()
        .filter(|r| matches!(r, Receipt::Session(_)))
        .count();
    let mut problems = Vec::new();
    let head = match verify_receipts(deployment, &ticks) {
        Ok(h) => h,
        Err(e) => {
            problems.push(format!("the tick chain does not verify: {e}"));
            Head::GENESIS
        }
    };
    if ticks.iter().any(|t| t.order != order.id) {
        problems.push("some ticks belong to another order".into());
    }
    let tariff = Tariff::new(order.price_per_second, order.price_per_gib).ok();
    let usage = Usage::sum(ticks.iter().map(Tick::usage)).unwrap_or_default();
    let charge = tariff
        .as_ref()
        .map(|t| t.charge(&usage))
        .unwrap_or_default();
    // The contract stores the head its last paid claim reached: it must be on our chain.
    let onchain = Head(order.head);
    let claimed_ticks = if onchain == Head::GENESIS {
        Some(0)
    } else {
        ticks.iter().position(|t| t.head == onchain).map(|i| i + 1)
    };
    match claimed_ticks {
        None => problems.push(format!(
            "the provider was paid up to chain head 0x{}, which is not in the receipts",
            hex(&order.head)
        )),
        Some(n) => {
            let claimed = Usage::sum(ticks[..n].iter().map(Tick::usage)).unwrap_or_default();
            // The contract records the seconds it paid: fewer than the receipts' when the last
            // batch ran past the lease's end and was trimmed, never more.
            if order.claimed_seconds > claimed.seconds {
                problems.push(format!(
                    "the provider was paid for {} s, the receipts up to its head add up to {} s",
                    order.claimed_seconds, claimed.seconds
                ));
            }
            if claimed.bytes_total() != order.claimed_bytes {
                problems.push(format!(
                    "the provider claimed {} bytes, the receipts up to its head add up to {}",
                    order.claimed_bytes,
                    claimed.bytes_total()
                ));
            }
            // Each claim is charged on its batch's totals; the claim receipts give the batches.
            let batches: Vec<(u64, u64)> = receipts
                .iter()
                .filter_map(|r| match r {
                    Receipt::Claim(c) if c.head.0 != [0; 32] => Some((c.first_seq, c.last_seq)),
                    _ => None,
                })
                .collect();
            if let (Some(t), false) = (&tariff, batches.is_empty()) {
                let expected = most_payable(t, &ticks[..n], &batches, order.bytes_bound());
                // Less is the provider's loss (bytes forfeited without an acknowledgment, a last
                // batch trimmed at the lease's end), never the client's: only more is wrong.
                if order.paid > expected {
                    problems.push(format!(
                        "the provider was paid {}, its claimed batches cost at most {}",
                        Fil(order.paid),
                        Fil(expected)
                    ));
                }
            }
        }
    }
    Verdict {
        order: order.id,
        ticks: ticks.len(),
        sessions,
        chain_ok: !problems.iter().any(|p| p.starts_with("the tick chain")),
        receipts_head: format!("0x{}", hex(&head.0)),
        onchain_head: format!("0x{}", hex(&order.head)),
        claimed_ticks,
        usage_seconds: usage.seconds,
        usage_bytes: usage.bytes_total(),
        usage_bytes_in: usage.bytes_in,
        usage_bytes_out: usage.bytes_out,
        wire: None,
        usage_charge_wei: charge.to_string(),
        claimed_seconds: order.claimed_seconds,
        claimed_bytes: order.claimed_bytes.to_string(),
        paid_wei: order.paid.to_string(),
        matches: problems.is_empty(),
        problems,
    }
}

/// The most the contract can have paid for the claimed `ticks`, batch by batch as the claim
/// receipts give them (`(first_seq, last_seq)`): every second, and of each batch's bytes only
/// what still fitted `bytes_bound` (max(acknowledged, allowance)) above the bytes claimed before
/// it. The bound only grows, so today's is the largest any claim saw.
fn most_payable(
    tariff: &Tariff,
    ticks: &[Tick],
    batches: &[(u64, u64)],
    bytes_bound: u128,
) -> U256 {
    let mut claimed_bytes: u128 = 0;
    let mut most = U256::ZERO;
    for (first, last) in batches
        .iter()
        .filter(|(_, last)| ticks.iter().any(|t| t.seq == *last))
    {
        let batch = Usage::sum(
            ticks
                .iter()
                .filter(|t| t.seq >= *first && t.seq <= *last)
                .map(Tick::usage),
        )
        .unwrap_or_default();
        let room = bytes_bound.saturating_sub(claimed_bytes);
        // A batch's bytes fit u64 each way (the circuit's bound), so their paid part fits u128
        // and is charged as one total, as the contract charges it.
        let paid_bytes = batch.bytes_total().min(room);
        let paid = Usage {
            seconds: batch.seconds,
            bytes_in: u64::try_from(paid_bytes).unwrap_or(u64::MAX),
            bytes_out: u64::try_from(paid_bytes.saturating_sub(u128::from(u64::MAX)))
                .unwrap_or(u64::MAX),
        };
        most += tariff.charge(&paid);
        claimed_bytes = claimed_bytes.saturating_add(batch.bytes_total());
    }
    most
}

/// Holds the provider's byte totals to what the client's own tunnel relayed: SSH framing makes
/// the wire carry more than the channel payload the gateway meters, so an honest provider is
/// always at or below the tunnel's counts. Bytes past them are an over-claim once they pass
/// the order's allowance (what may have gone without the tunnel, as the contract pays it).
pub fn hold_to_wire(v: &mut Verdict, wire: WireTotals, allowance: u64) {
    let past = v.usage_bytes_in.saturating_sub(wire.up) as u128
        + v.usage_bytes_out.saturating_sub(wire.down) as u128;
    if past > u128::from(allowance) {
        v.problems.push(format!(
            "the provider counts {} bytes in and {} out, but this machine's tunnel relayed only \
             {} up and {} down: {past} bytes more, past the order's {allowance}-byte allowance \
             (an over-claim)",
            v.usage_bytes_in, v.usage_bytes_out, wire.up, wire.down
        ));
    }
    v.wire = Some(wire);
    v.matches = v.problems.is_empty();
}

/// `shale receipts ORDER [--verify]`.
pub async fn run(
    settings: &Settings,
    id: u64,
    verify: bool,
    json: bool,
) -> anyhow::Result<Verdict> {
    let market = settings.reader().await?;
    let order = market.order(id).await?;
    let deployment = Deployment::new(market.chain_id().await?, market.address().0 .0);
    let receipts = fetch(settings, id).await?;
    let mut v = check(&deployment, &order, &receipts);
    let counts = WireCounts::at(SshFiles::new(&settings.ssh_dir).wire_counts(id));
    if counts.path().exists() {
        hold_to_wire(&mut v, counts.read()?, order.byte_allowance);
    }
    if json && !verify {
        print_json(&receipts)?;
        return Ok(v);
    }
    if json {
        print_json(&v)?;
    } else {
        let mut t = table(["receipts of order".to_string(), id.to_string()]);
        t.add_row(vec!["sessions".into(), v.sessions.to_string()]);
        t.add_row(vec![
            "ticks".into(),
            format!(
                "{} ({} of lease, {} bytes)",
                v.ticks,
                duration(v.usage_seconds),
                v.usage_bytes
            ),
        ]);
        t.add_row(vec![
            "cost of all ticks".into(),
            Fil(v.usage_charge_wei.parse().unwrap_or_default()).to_string(),
        ]);
        let chain = if v.chain_ok {
            "recomputed, every head matches"
        } else {
            "BROKEN"
        };
        t.add_row(vec!["tick chain".to_string(), chain.to_string()]);
        t.add_row(vec!["head on chain".into(), v.onchain_head.clone()]);
        t.add_row(vec![
            "claimed".into(),
            format!(
                "{} ticks: {}, {} bytes, paid {}",
                v.claimed_ticks.map(|n| n.to_string()).unwrap_or("?".into()),
                duration(v.claimed_seconds),
                v.claimed_bytes,
                Fil(order.paid)
            ),
        ]);
        println!("{t}");
    }
    if verify {
        if v.matches {
            if !json {
                println!(
                    "✔ The provider's claims match your receipts{}.",
                    if order.head == [0; 32] {
                        " (it has claimed nothing yet)"
                    } else {
                        ""
                    }
                );
            }
        } else {
            for p in &v.problems {
                eprintln!("✘ {p}");
            }
            return Err(Failure::ReceiptsMismatch(format!(
                "the provider's claims on order {id} do not match your receipts"
            ))
            .into());
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(bytes_in: u64, bytes_out: u64) -> Verdict {
        Verdict {
            order: 7,
            ticks: 1,
            sessions: 1,
            chain_ok: true,
            receipts_head: String::new(),
            onchain_head: String::new(),
            claimed_ticks: Some(1),
            usage_seconds: 10,
            usage_bytes: u128::from(bytes_in) + u128::from(bytes_out),
            usage_bytes_in: bytes_in,
            usage_bytes_out: bytes_out,
            wire: None,
            usage_charge_wei: "0".into(),
            claimed_seconds: 10,
            claimed_bytes: "0".into(),
            paid_wei: "0".into(),
            matches: true,
            problems: Vec::new(),
        }
    }

    #[test]
    fn bytes_past_the_wire_count_are_an_over_claim_only_past_the_allowance() {
        let wire = WireTotals {
            up: 1_000,
            down: 10_000,
        };
        let mut honest = verdict(900, 9_000);
        hold_to_wire(&mut honest, wire, 0);
        assert!(honest.matches, "{:?}", honest.problems);
        // 600 bytes past the counts: fine with a 1,000-byte allowance, not with 500.
        let mut within = verdict(1_100, 10_500);
        hold_to_wire(&mut within, wire, 1_000);
        assert!(within.matches, "{:?}", within.problems);
        let mut over = verdict(1_100, 10_500);
        hold_to_wire(&mut over, wire, 500);
        assert!(!over.matches);
        assert!(
            over.problems[0].contains("over-claim"),
            "{:?}",
            over.problems
        );
    }

    #[test]
    fn the_most_payable_trims_each_batchs_bytes_to_what_still_fitted_the_bound() {
        // One wei a second and one wei a byte.
        let tariff = Tariff::new(U256::from(1u8), U256::from(1u64 << 30)).unwrap();
        let tick = |seq| Tick {
            order: 7,
            seq,
            started_at_ms: 0,
            seconds: 10,
            bytes_in: 60,
            bytes_out: 40,
            charge: U256::ZERO,
            prev_head: Head::GENESIS,
            head: Head::GENESIS,
        };
        let ticks = [tick(0), tick(1), tick(2)];
        let batches = [(0, 0), (1, 2)];
        // Everything fits: 30 s and 300 bytes.
        assert_eq!(
            most_payable(&tariff, &ticks, &batches, 1_000),
            U256::from(330u16)
        );
        // 150 bytes payable: the first batch's 100, then 50 of the second's 200.
        assert_eq!(
            most_payable(&tariff, &ticks, &batches, 150),
            U256::from(180u16)
        );
        // No allowance and no acknowledgment: the seconds only.
        assert_eq!(most_payable(&tariff, &ticks, &batches, 0), U256::from(30u8));
        // A batch whose last tick is not among the claimed ticks was not paid.
        assert_eq!(
            most_payable(&tariff, &ticks[..2], &batches, 1_000),
            U256::from(110u8)
        );
    }
}
