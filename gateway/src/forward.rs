//! `ssh -L` and `ssh -D`: a `direct-tcpip` channel to a host and port dialled from inside the
//! order's network namespace, so a client can use Jupyter or TensorBoard on the container's
//! loopback as if it were local, or browse through the container's own way out, and reach
//! exactly what the container reaches on its own: never the SP's host or another order.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex};

use russh::server::Msg;
use russh::{Channel, ChannelOpenFailure};
use shale_meter::{ChannelCounter, Metered, Side};
use shale_provisioner::{Machines, ProvisionError};
use tracing::Instrument;

use crate::ack_policy::{gated, TransferGate};
use crate::lease_start::LeaseStart;
use crate::login::OrderId;

/// Forwards open (or being dialled) per order, against a cap: each holds a socket in the order's
/// network and a dial, whichever connection of the order opened it.
#[derive(Clone)]
pub struct ForwardSlots {
    open: Arc<Mutex<HashMap<OrderId, usize>>>,
    max_per_order: usize,
}

/// One forward's place under its order's cap; freed on drop.
pub struct ForwardSlot {
    open: Arc<Mutex<HashMap<OrderId, usize>>>,
    order: OrderId,
}

impl ForwardSlots {
    /// At most `max_per_order` forwards per order at once.
    pub fn new(max_per_order: usize) -> Self {
        Self {
            open: Arc::default(),
            max_per_order,
        }
    }

    /// The cap.
    pub fn max_per_order(&self) -> usize {
        self.max_per_order
    }

    /// A place for one more forward of `order`, unless it has as many as it may.
    pub fn take(&self, order: OrderId) -> Option<ForwardSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(order).or_insert(0);
        if *n >= self.max_per_order {
            return None;
        }
        *n += 1;
        Some(ForwardSlot {
            open: self.open.clone(),
            order,
        })
    }
}

impl Drop for ForwardSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.order) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.order);
            }
        }
    }
}

/// Where a forward goes, as the client asked for it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The host as the client named it: an address, `localhost` or a name.
    pub host: String,
    /// The TCP port.
    pub port: u16,
}

/// What a forward needs from its connection.
pub struct ForwardContext {
    /// The order whose network the target is dialled from.
    pub order: OrderId,
    /// The container start the dial waits on.
    pub lease: LeaseStart,
    /// Dials inside the order's network.
    pub provisioner: Arc<dyn Machines>,
    /// The forward's byte counters (billing).
    pub counter: Arc<ChannelCounter>,
    /// Its place under the order's forward cap, held until it closes.
    pub slot: ForwardSlot,
    /// Holds the socket while the order's transfers are paused (`None`: never paused).
    pub gate: Option<TransferGate>,
}

/// Connects the forwarded channel to the target from inside the order's container, or refuses
/// it.
///
/// The connection is made before the channel is confirmed, so a failure is reported to the
/// client as a failed open with its reason (`channel N: open failed: connect failed: ...`), as
/// sshd does.
pub async fn serve(
    channel: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    target: Target,
    ctx: ForwardContext,
) {
    let ForwardContext {
        order,
        lease,
        provisioner,
        counter,
        slot: _slot,
        gate,
    } = ctx;
    let span = tracing::info_span!(
        "forward",
        channel = %channel.id(),
        host = %target.host,
        port = target.port
    );
    async move {
        let connected = async {
            lease
                .ready()
                .await
                .map_err(|e| format!("the order's container did not start: {e}"))?;
            provisioner
                .connect_tcp(order.0, &target.host, target.port)
                .await
                .map_err(|e| failure_reason(&target, &e))
        }
        .await;
        // Gated on the container's side: while paused the socket is neither read nor written,
        // so the client's window and its connection hold the rest.
        let mut tcp = match connected {
            Ok(tcp) => gated(tcp, &gate),
            Err(reason) => {
                tracing::info!(%reason, "forward refused");
                reply
                    .reject(ChannelOpenFailure::Other {
                        code: ChannelOpenFailure::ConnectFailed.code(),
                        reason,
                    })
                    .await;
                return;
            }
        };
        reply.accept().await;
        let mut stream = Metered::new(channel.into_stream(), counter, Side::Client);
        match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
            Ok((up, down)) => tracing::debug!(up, down, "forward closed"),
            Err(e) => tracing::debug!(error = %e, "forward ended"),
        }
    }
    .instrument(span)
    .await
}

/// Orders reach this, and only this, from inside; said with every refusal that may be the rules'.
const REACH: &str =
    "an order reaches its own loopback and the internet, not the provider's host, private ranges or other orders";

/// What the client reads when the connection could not be made: what was dialled, from where,
/// and what happened.
fn failure_reason(target: &Target, error: &ProvisionError) -> String {
    let what = format!("{}:{} from inside the container", target.host, target.port);
    match error {
        ProvisionError::Connect { source, .. } => match source.kind() {
            ErrorKind::ConnectionRefused => {
                format!("{what}: connection refused (nothing listens there, or {REACH})")
            }
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                format!("{what}: unreachable ({REACH})")
            }
            ErrorKind::TimedOut => format!("{what}: no answer in time"),
            _ => format!("{what}: {source}"),
        },
        ProvisionError::NotProvisioned { .. } => {
            format!("{what}: the order's container is not running")
        }
        other => format!("{what}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_error(kind: ErrorKind, text: &str) -> ProvisionError {
        ProvisionError::Connect {
            order: 7,
            host: "10.0.0.1".into(),
            port: 22,
            source: std::io::Error::new(kind, text),
        }
    }

    #[test]
    fn forwards_are_capped_per_order_and_freed_on_drop() {
        let slots = ForwardSlots::new(2);
        let a = slots.take(OrderId(1)).unwrap();
        let _b = slots.take(OrderId(1)).unwrap();
        assert!(slots.take(OrderId(1)).is_none());
        assert!(slots.take(OrderId(2)).is_some());
        drop(a);
        assert!(slots.take(OrderId(1)).is_some());
    }

    #[test]
    fn failures_name_the_target_and_say_what_an_order_reaches() {
        let target = Target {
            host: "10.0.0.1".into(),
            port: 22,
        };
        let refused = failure_reason(&target, &connect_error(ErrorKind::ConnectionRefused, "x"));
        assert!(refused.starts_with("10.0.0.1:22 from inside the container: connection refused"));
        assert!(refused.contains("not the provider's host"), "{refused}");
        let unreachable = failure_reason(&target, &connect_error(ErrorKind::HostUnreachable, "x"));
        assert!(
            unreachable.contains("unreachable (an order reaches"),
            "{unreachable}"
        );
        let unresolved = failure_reason(
            &target,
            &connect_error(
                ErrorKind::NotFound,
                "cannot resolve pypi.invalid: no such name",
            ),
        );
        assert!(unresolved.ends_with("cannot resolve pypi.invalid: no such name"));
        let gone = failure_reason(&target, &ProvisionError::NotProvisioned { order: 7 });
        assert!(gone.ends_with("the order's container is not running"));
    }
}
