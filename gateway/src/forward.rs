//! `ssh -L`: a `direct-tcpip` channel to a port on the container's own loopback, reached inside the
//! order's network namespace, so a client can use Jupyter or TensorBoard as if it were local.

use russh::server::Msg;
use russh::{Channel, ChannelOpenFailure};
use std::sync::Arc;

use shale_meter::{ChannelCounter, Metered, Side};
use shale_provisioner::Provisioner;
use tracing::Instrument;

use crate::lease_start::LeaseStart;
use crate::login::OrderId;

/// Connects the forwarded channel to `port` inside the order's container, or refuses it.
///
/// The connection is made before the channel is confirmed, so a closed port is reported to the
/// client as a failed open (`channel N: open failed: connect failed`), as sshd does.
pub async fn serve(
    channel: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    order: OrderId,
    port: u16,
    lease: LeaseStart,
    provisioner: Provisioner,
    counter: Arc<ChannelCounter>,
) {
    let span = tracing::info_span!("forward", channel = %channel.id(), port);
    async move {
        let connected = async {
            lease.ready().await.map_err(|e| e.to_string())?;
            provisioner
                .connect_tcp(order.0, port)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        let mut tcp = match connected {
            Ok(tcp) => tcp,
            Err(reason) => {
                tracing::info!(%reason, "forward refused");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
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
