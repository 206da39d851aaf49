//! `shale ack ORDER`: acknowledge the order's usage now, as the payment tunnel does every so
//! often by itself: fetch the ticks, check them against this machine's wire counts and the
//! lease's clock, and sign only if they hold.

use anyhow::Context;

use crate::ack::{Exchange, Expected, Outcome};
use crate::exit::Failure;
use crate::settings::Settings;
use crate::sshcfg::SshFiles;
use crate::view::print_json;

/// Runs one acknowledgment round for order `id`.
pub async fn run(settings: &Settings, id: u64, json: bool) -> anyhow::Result<Outcome> {
    let market = settings.reader().await?;
    let order = market.order(id).await?;
    let files = SshFiles::new(&settings.ssh_dir);
    let exchange = Exchange {
        ssh_config: files.config.clone(),
        alias: format!("shale-{id}"),
        exe: std::env::current_exe().context("finding the shale binary")?,
        counts: files.wire_counts(id),
        key: files.ack_key(id),
        expected: Expected {
            chain_id: market.chain_id().await?,
            marketplace: settings.marketplace,
            order: id,
            max_seconds: 0,
        },
        accepted_at: order.accepted_at.context("the order was never accepted")?,
    };
    let outcome = tokio::task::spawn_blocking(move || exchange.run())
        .await
        .context("the acknowledgment thread")??;
    match &outcome {
        Outcome::Acknowledged(v) => {
            if json {
                print_json(v)?;
            } else {
                println!(
                    "Acknowledged order {id}'s usage through tick {}: {} s, {} B in, {} B out.",
                    v.seq.map_or("none".into(), |s| s.to_string()),
                    v.seconds,
                    v.bytes_in,
                    v.bytes_out
                );
            }
        }
        Outcome::Refused(reason) => {
            return Err(Failure::ReceiptsMismatch(format!(
                "order {id}'s usage is not acknowledged: {reason}"
            ))
            .into())
        }
    }
    Ok(outcome)
}
