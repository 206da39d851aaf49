//! `ssh -L` and `ssh -D`: a `direct-tcpip` channel to a host and port dialled from inside the
//! order's network namespace, so a client can use Jupyter or TensorBoard on the container's
//! loopback as if it were local, or browse through the container's own way out, and reach
//! exactly what the container reaches on its own: never the SP's host or another order.

use std::io::ErrorKind;
use std::sync::Arc;

use russh::server::Msg;
use russh::{Channel, ChannelOpenFailure};
use shale_meter::{ChannelCounter, Metered, Side};
use shale_provisioner::{ProvisionError, Provisioner};
use tracing::Instrument;

use crate::lease_start::LeaseStart;
use crate::login::OrderId;

/// Where a forward goes, as the client asked for it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The host as the client named it: an address, `localhost` or a name.
    pub host: String,
    /// The TCP port.
    pub port: u16,
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
    order: OrderId,
    target: Target,
    lease: LeaseStart,
    provisioner: Provisioner,
    counter: Arc<ChannelCounter>,
) {
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
        let mut tcp = match connected {
            Ok(tcp) => tcp,
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
