//! Session quality as the client really gets it: probes run inside the order's container when
//! its lease starts (CPUs, memory limit, GPUs as seen from inside) and the SSH round-trip time
//! measured with keepalives. Readings go to the ledger (the client's receipts) and to metrics.
//! This is how clients catch an SP that under-delivers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shale_meter::probe::{default_probes, run_probes, ProbeOutput, Reading};
use shale_meter::Ledger;
use shale_provisioner::{ExecRequest, ExitStatus, Machines};
use tokio::io::AsyncReadExt;

use crate::login::OrderId;

/// How long one probe command may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The most of a probe's stdout (and of its stderr) that is kept: the probes print a few lines,
/// and the container is the tenant's, so its `nproc` or `nvidia-smi` may print anything.
pub const PROBE_OUTPUT_MAX: u64 = 64 * 1024;

/// How often the probes run again during a lease: an SP could shrink a lease after it starts.
pub const PROBE_EVERY: Duration = Duration::from_secs(600);

/// The latest readings of each order's probes, for `/metrics`.
#[derive(Default)]
pub struct QualityBoard {
    readings: Mutex<HashMap<OrderId, Vec<Reading>>>,
    /// When each order was last probed (or a probe was started), to pace them.
    probed_at: Mutex<HashMap<OrderId, Instant>>,
}

impl QualityBoard {
    /// The latest readings of every order.
    pub fn snapshot(&self) -> Vec<(OrderId, Vec<Reading>)> {
        self.readings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    /// Claims the next probe of `order` if none ran within `every`; false when one is recent.
    pub fn due(&self, order: OrderId, every: Duration) -> bool {
        let mut probed = self.probed_at.lock().unwrap_or_else(|p| p.into_inner());
        match probed.get(&order) {
            Some(at) if at.elapsed() < every => false,
            _ => {
                probed.insert(order, Instant::now());
                true
            }
        }
    }

    /// Forgets `order` (its lease ended).
    pub fn forget(&self, order: OrderId) {
        self.readings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&order);
        self.probed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&order);
    }

    /// Runs the default probes in `order`'s container, records them in the ledger and keeps the
    /// readings for metrics.
    pub async fn probe(
        self: Arc<Self>,
        provisioner: Arc<dyn Machines>,
        ledger: Ledger,
        order: OrderId,
        session: String,
    ) {
        let probes = default_probes();
        let results = run_probes(&ledger, order.0, Some(&session), &probes, |argv| {
            run_in_container(&provisioner, order, argv)
        })
        .await;
        let mut readings = Vec::new();
        for result in results {
            match result.outcome {
                Ok(r) => readings.extend(r),
                Err(e) => {
                    tracing::info!(order = order.0, probe = result.probe, error = %e, "probe gave no reading")
                }
            }
        }
        tracing::info!(order = order.0, readings = ?readings, "session-quality probes");
        if readings.is_empty() {
            // Nothing answered (the container was not up yet): try again at the next chance.
            self.probed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&order);
            return;
        }
        self.readings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(order, readings);
    }
}

/// Runs `argv` in the container and collects its output, bounded in time.
async fn run_in_container(
    provisioner: &Arc<dyn Machines>,
    order: OrderId,
    argv: Vec<String>,
) -> Result<ProbeOutput, String> {
    let run = async {
        let mut process = provisioner
            .exec(
                order.0,
                ExecRequest {
                    argv,
                    ..ExecRequest::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        process
            .handle
            .close_stdin()
            .await
            .map_err(|e| e.to_string())?;
        let read_err = async {
            match process.stderr.as_mut() {
                Some(err) => read_bounded(err).await.unwrap_or_default(),
                None => String::new(),
            }
        };
        let (stdout, stderr) = tokio::join!(read_bounded(&mut process.stdout), read_err);
        let stdout = stdout.map_err(|e| e.to_string())?;
        let status = process.handle.wait().await.map_err(|e| e.to_string())?;
        Ok(ProbeOutput {
            exit_code: match status {
                ExitStatus::Code(c) => Some(c),
                ExitStatus::Signal(_) => None,
            },
            stdout,
            stderr,
        })
    };
    tokio::time::timeout(PROBE_TIMEOUT, run)
        .await
        .map_err(|_| format!("no answer within {PROBE_TIMEOUT:?}"))?
}

/// Reads `from` to its end, keeping at most [`PROBE_OUTPUT_MAX`] bytes (the rest is read and
/// dropped, so the process is not left blocked on a full pipe).
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(from: &mut R) -> std::io::Result<String> {
    let mut kept = Vec::new();
    (&mut *from)
        .take(PROBE_OUTPUT_MAX)
        .read_to_end(&mut kept)
        .await?;
    tokio::io::copy(from, &mut tokio::io::sink()).await?;
    Ok(String::from_utf8_lossy(&kept).into_owned())
}

/// Sends an SSH keepalive and records the time to its reply as the session's round-trip time.
pub fn measure_round_trip(
    session: &mut russh::server::Session,
    histogram: prometheus_client::metrics::histogram::Histogram,
    ledger: Ledger,
    order: OrderId,
    session_id: String,
    tasks: &crate::tasks::Tasks,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = Instant::now();
    if session.send_ping(tx).is_err() {
        return;
    }
    tasks.spawn_until_stopped(async move {
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(30), rx).await {
            let rtt = sent.elapsed();
            histogram.observe(rtt.as_secs_f64());
            let reading = Reading::RoundTrip {
                micros: rtt.as_micros() as u64,
            };
            if let Err(e) = ledger
                .record_probe(
                    order.0,
                    Some(&session_id),
                    "round_trip",
                    shale_meter::ledger::now_ms(),
                    &[reading],
                )
                .await
            {
                tracing::debug!(order = order.0, error = %e, "cannot record the round-trip time");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_output_is_kept_up_to_the_bound_and_the_rest_drained() {
        let big = vec![b'x'; 3 * PROBE_OUTPUT_MAX as usize];
        let mut reader = &big[..];
        let kept = read_bounded(&mut reader).await.unwrap();
        assert_eq!(kept.len() as u64, PROBE_OUTPUT_MAX);
        assert!(reader.is_empty());
    }

    #[test]
    fn probes_are_paced_per_order_and_restart_after_forget() {
        let board = QualityBoard::default();
        let (a, b) = (OrderId(1), OrderId(2));
        assert!(board.due(a, Duration::from_secs(600)));
        assert!(!board.due(a, Duration::from_secs(600)));
        assert!(board.due(b, Duration::from_secs(600)));
        assert!(board.due(a, Duration::ZERO));
        board.forget(a);
        assert!(board.due(a, Duration::from_secs(600)));
    }
}
