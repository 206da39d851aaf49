//! What a dishonest SP can do with what it holds: rewrite its own ledger's SQL rows, and prove
//! and send claims itself, bypassing its settler's checks. Tests use it to show that neither
//! gets it paid past what the client acknowledged (or the order's allowance), and that the
//! client's checks catch it.

use std::path::Path;

use anyhow::Context;
use shale_circuits::next_head;
use shale_circuits::{Anchor, Deployment, Head, TickBatch};
use shale_contracts::{
    Bytes, ChainError, ClaimReceipt, ClaimRequest, Marketplace, SignedAck, B256,
};
use shale_meter::{Ledger, Tariff, Tick};
use sqlx::Connection;

use crate::keys::{claim_keys, CAPACITY};

/// The order's stored tick the chain's paid head points at (`None` before the first claim).
async fn paid_tick(ledger: &Ledger, order: u64, head: [u8; 32]) -> anyhow::Result<Option<Tick>> {
    if head == [0; 32] {
        return Ok(None);
    }
    let ticks = ledger.ticks_after(order, None, u32::MAX).await?;
    let tick = ticks
        .into_iter()
        .find(|t| t.head.0 == head)
        .context("the chain's paid head is not in the ledger")?;
    Ok(Some(tick))
}

/// Rewrites every tick of `order` after the one the chain paid for, as a dishonest SP would
/// in its ledger's SQL database: bytes in and out times `factor`, and the charges and the
/// chain's heads recomputed, so the log still verifies and proofs of it still hold. The
/// gateway must be stopped (its lease meter holds the honest head in memory). Returns the
/// rewritten ticks.
pub async fn inflate_unpaid_ticks(
    ledger_path: &Path,
    market: &Marketplace,
    order: u64,
    factor: u64,
) -> anyhow::Result<Vec<Tick>> {
    let on_chain = market.order(order).await?;
    let tariff = Tariff::new(on_chain.price_per_second, on_chain.price_per_gib)?;
    let key = Deployment::new(market.chain_id().await?, market.address().0 .0).order_key(order);
    let ledger = Ledger::open_sqlite(ledger_path).await?;
    let paid = paid_tick(&ledger, order, on_chain.head).await?;
    let honest = ledger
        .ticks_after(order, paid.as_ref().map(|t| t.seq), u32::MAX)
        .await?;
    ledger.close().await;
    let mut head = paid.map_or(Head::GENESIS, |t| t.head);
    let mut forged = Vec::with_capacity(honest.len());
    for t in honest {
        let mut f = Tick {
            bytes_in: t.bytes_in.checked_mul(factor).context("bytes overflow")?,
            bytes_out: t.bytes_out.checked_mul(factor).context("bytes overflow")?,
            prev_head: head,
            ..t
        };
        f.charge = tariff.charge(&f.usage());
        f.head = next_head(&key, &f.prev_head, &f.fields());
        head = f.head;
        forged.push(f);
    }
    let url = format!("sqlite://{}", ledger_path.display());
    let mut db = sqlx::sqlite::SqliteConnection::connect(&url)
        .await
        .with_context(|| format!("opening {url}"))?;
    let mut tx = db.begin().await?;
    for t in &forged {
        let done = sqlx::query(
            "UPDATE ticks SET bytes_in = ?1, bytes_out = ?2, charge_wei = ?3, prev_head = ?4, \
             head = ?5 WHERE order_id = ?6 AND seq = ?7",
        )
        .bind(i64::try_from(t.bytes_in)?)
        .bind(i64::try_from(t.bytes_out)?)
        .bind(t.charge.to_string())
        .bind(t.prev_head.0.to_vec())
        .bind(t.head.0.to_vec())
        .bind(i64::try_from(t.order)?)
        .bind(i64::try_from(t.seq)?)
        .execute(&mut *tx)
        .await?;
        anyhow::ensure!(done.rows_affected() == 1, "tick {} is not stored", t.seq);
    }
    tx.commit().await?;
    db.close().await?;
    Ok(forged)
}

/// Proves the next batch of `order`'s stored ticks from the chain's paid head (at most
/// [`CAPACITY`] of them, with the client's newest acknowledgment attached, if any) and sends
/// it as the SP: no check of the settler's comes between the ledger and the contract.
pub async fn claim_next_batch(
    ledger: &Ledger,
    sp: &Marketplace,
    order: u64,
) -> anyhow::Result<Result<ClaimReceipt, ChainError>> {
    let on_chain = sp.order(order).await?;
    let paid = paid_tick(ledger, order, on_chain.head).await?;
    let ticks = ledger
        .ticks_after(order, paid.as_ref().map(|t| t.seq), CAPACITY)
        .await?;
    anyhow::ensure!(!ticks.is_empty(), "order {order} has no unpaid ticks");
    let key = Deployment::new(sp.chain_id().await?, sp.address().0 .0).order_key(order);
    let batch = TickBatch::new(
        key,
        paid.as_ref().map_or(Head::GENESIS, |t| t.head),
        paid.as_ref().map(|t| Anchor {
            before: t.prev_head,
            tick: t.fields(),
        }),
        ticks.iter().map(Tick::fields).collect(),
    )?;
    let keys = claim_keys().await?;
    let proof = tokio::task::spawn_blocking({
        let batch = batch.clone();
        move || keys.pk.prove_with_os_rng(&batch).map(|p| p.to_bytes())
    })
    .await??;
    let ack = match ledger.latest_ack(order).await? {
        Some(a) => Some(SignedAck {
            ack: shale_contracts::ack::Acknowledgment::new(
                order,
                B256::from(a.head.0),
                a.seconds,
                a.bytes_in,
                a.bytes_out,
            ),
            signature: a.signature.parse::<Bytes>()?,
        }),
        None => None,
    };
    let inputs = batch.inputs();
    let request = ClaimRequest {
        order_id: order,
        batch_capacity: CAPACITY,
        next_head: batch.next().0,
        seconds: u64::try_from(inputs.seconds)?,
        bytes_in: u64::try_from(inputs.bytes_in)?,
        bytes_out: u64::try_from(inputs.bytes_out)?,
        proof: Bytes::from(proof.to_vec()),
        ack,
    };
    Ok(sp.claim(&request).await)
}
