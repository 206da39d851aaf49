//! TCP into an order's network namespace, for `ssh -L`: a dedicated thread enters the
//! namespace of the container's init and connects to `127.0.0.1:PORT` there. The socket keeps
//! its namespace after the thread ends, so the gateway uses it like any other connection.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use tracing::instrument;

use crate::{ProvisionError, Provisioner};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Provisioner {
    /// Opens a TCP connection to `127.0.0.1:port` inside the order's container.
    #[instrument(skip(self))]
    pub async fn connect_tcp(
        &self,
        order: u64,
        port: u16,
    ) -> Result<tokio::net::TcpStream, ProvisionError> {
        let pid = self.task_pid(order).await?;
        let ns_path = format!("/proc/{pid}/ns/net");
        let ns = std::fs::File::open(&ns_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ProvisionError::NotProvisioned { order }
            } else {
                ProvisionError::io("open the network namespace", ns_path.clone(), e)
            }
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A thread of its own: after setns it lives in the order's namespace, so it must never
        // go back to a pool that other work uses.
        std::thread::Builder::new()
            .name(format!("netns-order-{order}"))
            .spawn(move || {
                let result = setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
                    .and_then(|()| {
                        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
                        stream.set_nonblocking(true)?;
                        stream.set_nodelay(true)?;
                        Ok(stream)
                    });
                let _ = tx.send(result);
            })
            .map_err(|e| ProvisionError::io("start a thread for", "the network namespace", e))?;
        let stream = rx
            .await
            .map_err(|_| ProvisionError::Connect {
                order,
                port,
                source: std::io::Error::other("connector thread died"),
            })?
            .map_err(|source| ProvisionError::Connect {
                order,
                port,
                source,
            })?;
        tokio::net::TcpStream::from_std(stream).map_err(|source| ProvisionError::Connect {
            order,
            port,
            source,
        })
    }
}
