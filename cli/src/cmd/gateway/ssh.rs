//! `shale gateway`'s SSH process: binds its sockets and reads its host key as root, then runs
//! as the `[privsep] user` with no capabilities, reaching containers only through the broker.
//! It holds no wallet key; it tells the supervisor of its leases as JSON lines on stdout.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shale_broker::BrokerClient;
use shale_gateway::{Gateway, LeaseEvent};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::spconfig::SpConfig;

/// How long the SSH process waits for the broker to answer at start.
const BROKER_WAIT: Duration = Duration::from_secs(60);

/// Serves SSH until SIGINT or SIGTERM.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let sp = SpConfig::load(config_path)?;
    let config = sp.gateway.clone();
    let user = crate::privsep::lookup(&config.privsep.user)?.with_context(|| {
        format!(
            "no user {}: start the set with `shale gateway`",
            config.privsep.user
        )
    })?;
    let socket = super::broker::socket_path(&sp);
    let machines = connect_broker(&socket).await?;
    let market = super::read_market(&config).await?;
    let watched = market
        .clone()
        .with_poll_interval(config.chain.poll_interval);
    // As root: the host key, the listen and metrics sockets, the ledger.
    let mut gateway = Gateway::bind(config.clone(), market, Arc::new(machines)).await?;
    crate::privsep::drop_to(&user).context("dropping privileges")?;
    crate::ssh_filter::apply().context("confining the SSH process")?;
    tracing::info!(user = %user.name, uid = user.uid.as_raw(), "the SSH process runs unprivileged");
    eprintln!(
        "shale gateway on {} with host key {}",
        gateway.local_addr(),
        gateway.host_public_key()
    );
    let (market_events, _) = broadcast::channel(super::MARKET_EVENTS);
    gateway.follow_market(market_events.subscribe());
    let background = super::Background::default();
    background.spawn(super::follow_market(watched, market_events));
    background.spawn(report_leases(gateway.lease_events()));
    let result = gateway.run(super::shutdown_signal()).await;
    background.shutdown().await;
    Ok(result?)
}

async fn connect_broker(socket: &Path) -> anyhow::Result<BrokerClient> {
    let deadline = tokio::time::Instant::now() + BROKER_WAIT;
    loop {
        match BrokerClient::connect(socket).await {
            Ok(client) => return Ok(client),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "waiting for the broker");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("reaching the broker"),
        }
    }
}

/// Writes every lease event to stdout, one JSON line each, for the supervisor's settler.
async fn report_leases(mut events: broadcast::Receiver<LeaseEvent>) {
    let mut out = tokio::io::stdout();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "lease events lost on their way to the settler");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let mut line = serde_json::to_vec(&event).expect("a lease event serializes");
        line.push(b'\n');
        if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
            // The supervisor is gone; it restarts the set.
            return;
        }
    }
}
