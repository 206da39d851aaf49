//! The veth pair of one order, over netlink: the host end in the host's namespace, `eth0` in
//! the container's, each with its end of the order's /31, and the container's default route.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use futures::TryStreamExt;
use nix::sched::{setns, CloneFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The interface name inside every container.
pub const CONTAINER_IF: &str = "eth0";

/// Where an order's link is and what it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderLink {
    /// The host end's interface name.
    pub host_if: String,
    /// The host end's address (the container's gateway).
    pub host_addr: Ipv4Addr,
    /// The container's address.
    pub container_addr: Ipv4Addr,
}

/// A netlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{action}: {reason}")]
pub struct LinkError {
    pub action: String,
    pub reason: String,
}

fn fail(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let action = action.into();
    move |e| LinkError {
        action,
        reason: e.to_string(),
    }
}

fn io_fail(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> LinkError {
    let action = action.into();
    move |e| LinkError {
        action,
        reason: e.to_string(),
    }
}

/// A netlink connection in the calling thread's network namespace, driven on the current
/// runtime.
fn connect() -> Result<Handle, LinkError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(io_fail("open a netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The host-namespace link called `name`, if there is one.
async fn find(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, LinkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code.map(|c| c.get()) == Some(-nix::libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(e) => Err(fail(format!("look up link {name}"))(e)),
    }
}

/// Whether the host end of `link` exists and is up (its peer dies with it, so this says
/// whether the order still has its way out).
pub async fn is_up(link: &OrderLink) -> Result<bool, LinkError> {
    let handle = connect()?;
    Ok(find(&handle, &link.host_if).await?.is_some_and(|m| {
        m.header
            .flags
            .contains(rtnetlink::packet_route::link::LinkFlags::Up)
    }))
}

/// The names of the host's links that start with `prefix`.
pub async fn host_links_named(prefix: &str) -> Result<Vec<String>, LinkError> {
    let handle = connect()?;
    let mut links = handle.link().get().execute();
    let mut names = Vec::new();
    while let Some(m) = links.try_next().await.map_err(fail("list links"))? {
        for attr in m.attributes {
            if let LinkAttribute::IfName(name) = attr {
                if name.starts_with(prefix) {
                    names.push(name);
                }
            }
        }
    }
    Ok(names)
}

/// Deletes the host link `name` (and with it its peer); gone already is fine.
pub async fn delete(name: &str) -> Result<(), LinkError> {
    let handle = connect()?;
    if let Some(m) = find(&handle, name).await? {
        match handle.link().del(m.header.index).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e))
                if e.code.map(|c| c.get()) == Some(-nix::libc::ENODEV) => {}
            Err(e) => return Err(fail(format!("delete link {name}"))(e)),
        }
    }
    Ok(())
}

/// Creates the pair with `eth0` directly in the namespace `netns`, configures the host end,
/// then (in a thread that enters the namespace) the container end. Any old host end of the
/// same name is deleted first, so this also repairs a half-made link.
pub async fn create(link: &OrderLink, netns: OwnedFd) -> Result<(), LinkError> {
    delete(&link.host_if).await?;
    let handle = connect()?;
    // Another link holding this address means another Shale instance (or something else)
    // shares the subnet: two routes to one /31 would cross orders' traffic.
    let mut held = handle
        .address()
        .get()
        .set_address_filter(IpAddr::V4(link.host_addr))
        .execute();
    if held
        .try_next()
        .await
        .map_err(fail("list addresses"))?
        .is_some()
    {
        return Err(LinkError {
            action: format!("make the link {}", link.host_if),
            reason: format!(
                "{} is already on another interface of this host; give network.subnet a \
                 range nothing else uses",
                link.host_addr
            ),
        });
    }
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(CONTAINER_IF.to_string())
        .setns_by_fd(netns.as_raw_fd())
        .build();
    let pair = LinkMessageBuilder::<LinkVeth>::new(&link.host_if, CONTAINER_IF)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    handle
        .link()
        .add(pair)
        .execute()
        .await
        .map_err(fail(format!("create the veth pair {}", link.host_if)))?;
    let host = find(&handle, &link.host_if)
        .await?
        .ok_or_else(|| LinkError {
            action: format!("find the new link {}", link.host_if),
            reason: "it vanished right after it was made".into(),
        })?;
    let index = host.header.index;
    // No IPv6 on the host end either: no link-local address, no router solicitations.
    disable_ipv6(&link.host_if).map_err(io_fail("turn IPv6 off on the host end"))?;
    handle
        .address()
        .add(index, IpAddr::V4(link.host_addr), 31)
        .execute()
        .await
        .map_err(fail(format!("address the host end {}", link.host_if)))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(fail(format!("bring up {}", link.host_if)))?;
    let inside = link.clone();
    let configured = tokio::task::spawn_blocking(move || configure_inside(&netns, &inside))
        .await
        .map_err(|e| LinkError {
            action: "configure the container end".into(),
            reason: e.to_string(),
        })?;
    configured
}

/// Runs in a thread of its own (it never returns to a pool): enters the container's network
/// namespace and, with a netlink socket opened there, addresses and raises `eth0` and adds the
/// default route through the host end.
fn configure_inside(netns: &OwnedFd, link: &OrderLink) -> Result<(), LinkError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = netns
        .try_clone()
        .map_err(io_fail("duplicate the namespace fd"))?;
    let link = link.clone();
    std::thread::Builder::new()
        .name("netns-configure".into())
        .spawn(move || {
            let result = (|| {
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io_fail("enter the container's namespace")(e.into()))?;
                disable_ipv6(CONTAINER_IF).map_err(io_fail("turn IPv6 off on eth0"))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .map_err(io_fail("start a runtime"))?;
                rt.block_on(async {
                    let handle = connect()?;
                    let eth0 = find(&handle, CONTAINER_IF)
                        .await?
                        .ok_or_else(|| LinkError {
                            action: "find eth0 in the container".into(),
                            reason: "it is not there".into(),
                        })?;
                    let index = eth0.header.index;
                    handle
                        .address()
                        .add(index, IpAddr::V4(link.container_addr), 31)
                        .execute()
                        .await
                        .map_err(fail("address eth0"))?;
                    handle
                        .link()
                        .set(LinkUnspec::new_with_index(index).up().build())
                        .execute()
                        .await
                        .map_err(fail("bring up eth0"))?;
                    handle
                        .route()
                        .add(
                            RouteMessageBuilder::<Ipv4Addr>::new()
                                .gateway(link.host_addr)
                                .output_interface(index)
                                .build(),
                        )
                        .execute()
                        .await
                        .map_err(fail("add the default route"))
                })
            })();
            let _ = tx.send(result);
        })
        .map_err(io_fail("start a thread for the container's namespace"))?;
    rx.recv().map_err(|_| LinkError {
        action: "configure the container end".into(),
        reason: "its thread died".into(),
    })?
}

/// Turns IPv6 off on `ifname` in the calling thread's network namespace.
fn disable_ipv6(ifname: &str) -> std::io::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    match std::fs::write(&path, "1") {
        // A kernel without IPv6 has nothing to turn off.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Byte counters of the host end: (received from the container, sent to it).
pub fn counters(host_if: &str) -> std::io::Result<Option<(u64, u64)>> {
    let read = |what: &str| -> std::io::Result<Option<u64>> {
        let path = format!("/sys/class/net/{host_if}/statistics/{what}");
        match std::fs::read_to_string(&path) {
            Ok(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|e| std::io::Error::other(format!("{path}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    };
    match (read("rx_bytes")?, read("tx_bytes")?) {
        (Some(rx), Some(tx)) => Ok(Some((rx, tx))),
        _ => Ok(None),
    }
}
