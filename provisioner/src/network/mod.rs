//! Each order's way out: a veth pair from the container's own network namespace to the host,
//! a /31 of the SP's subnet on it, IPv4 NAT on the host's uplink, and host-side nftables rules
//! the tenant cannot touch that let through the internet and nothing else.
//!
//! The link is made when the order's task is created (before its first process runs) and dies
//! with the task's namespace; the rules are one nftables table per provisioner scope, rebuilt
//! atomically from the orders that run, so a reconcile restores anything deleted by hand and
//! removes whatever a crash left behind.

mod config;
mod dns;
mod link;
mod rules;

pub use config::{NetRule, NetworkConfig, DENIED_RANGES, DENIED_TCP_PORTS};
pub use link::OrderLink;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use tracing::{info, warn};

use crate::userns::{IdRange, RANGE_SIZE};
use crate::{ProvisionError, Provisioner};
use rules::Table;

/// Bytes through an order's link since its task started, as the host end counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// Bytes the order sent out (to the internet).
    pub egress_bytes: u64,
    /// Bytes the order received.
    pub ingress_bytes: u64,
}

/// What one reconcile of the orders' network did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reconciled {
    /// Whether the nftables table had to be written again (missing, edited, or changed).
    pub rules_rewritten: bool,
    /// Orders whose link had gone and was made again.
    pub restored: Vec<u64>,
    /// Orders whose link could not be restored and that were stopped, with the reason.
    pub stopped: Vec<(u64, String)>,
    /// Host links left behind by a crash and removed.
    pub orphans_removed: usize,
}

fn net_err(action: &str, reason: impl std::fmt::Display) -> ProvisionError {
    ProvisionError::Network(format!("{action}: {reason}"))
}

impl Provisioner {
    /// The nftables table that holds this provisioner's rules (inet family).
    pub fn network_table(&self) -> String {
        format!("shale_{}", self.inner.instance)
    }

    /// The prefix of every host link this provisioner makes.
    fn link_prefix(&self) -> String {
        format!("sh{}-", &self.inner.instance[..6])
    }

    /// The link of the order that holds uid range `ids`, or `None` when the range is not one
    /// of this provisioner's slots.
    fn link_for(&self, ids: IdRange) -> Option<OrderLink> {
        let config = &self.inner.config;
        let slot = ids.host_base.checked_sub(config.uid_base)? / RANGE_SIZE;
        if slot >= config.uid_ranges {
            return None;
        }
        let (host_addr, container_addr) = config.network.link_addresses(slot);
        Some(OrderLink {
            host_if: format!("{}{slot}", self.link_prefix()),
            host_addr,
            container_addr,
        })
    }

    /// The resolvers orders use: the SP's, or the host's upstream ones.
    pub fn resolvers(&self) -> Vec<Ipv4Addr> {
        let configured = &self.inner.config.network.dns;
        if configured.is_empty() {
            dns::host_resolvers()
        } else {
            configured.clone()
        }
    }

    /// The `/etc/resolv.conf` every order's container sees.
    pub(crate) fn resolv_conf(&self) -> String {
        if self.inner.config.network.enabled {
            dns::resolv_conf(&self.resolvers())
        } else {
            dns::resolv_conf(&[])
        }
    }

    /// Gives a just-created task (its init not yet running) its way out: first the rules that
    /// include its link, so no packet ever passes unfiltered, then the link itself.
    pub(crate) async fn attach_network(
        &self,
        order: u64,
        ids: IdRange,
        pid: u32,
    ) -> Result<Option<OrderLink>, ProvisionError> {
        if !self.inner.config.network.enabled {
            return Ok(None);
        }
        let link = self.link_for(ids).ok_or_else(|| {
            net_err(
                "place the order's link",
                format!(
                    "uid range {} is outside this provider's slots",
                    ids.host_base
                ),
            )
        })?;
        let started = std::time::Instant::now();
        self.write_rules(Some(&link)).await?;
        let rules_ready = started.elapsed();
        enable_forwarding()?;
        let netns = open_netns(order, pid)?;
        link::create(&link, netns)
            .await
            .map_err(|e| net_err("make the order's link", e))?;
        tracing::debug!(
            rules_us = rules_ready.as_micros() as u64,
            link_us = (started.elapsed() - rules_ready).as_micros() as u64,
            host_if = %link.host_if,
            addr = %link.container_addr,
            "network attached"
        );
        Ok(Some(link))
    }

    /// Bytes through the order's link, or `None` when it has no running task or no network.
    pub async fn traffic(&self, order: u64) -> Result<Option<Traffic>, ProvisionError> {
        let Some(ids) = self.order_id_range(order).await? else {
            return Ok(None);
        };
        let Some(link) = self.link_for(ids) else {
            return Ok(None);
        };
        let counters = tokio::task::spawn_blocking(move || link::counters(&link.host_if))
            .await
            .expect("reading counters does not panic")
            .map_err(|e| net_err("read the order's link counters", e))?;
        Ok(counters.map(|(rx, tx)| Traffic {
            egress_bytes: rx,
            ingress_bytes: tx,
        }))
    }

    /// Makes the host match the running orders: rewrites the rules if anything in them is
    /// missing or changed, restores missing links (stopping an order whose link cannot be
    /// restored, never leaving it open), and removes links of orders that no longer run.
    pub async fn reconcile_network(&self) -> Result<Reconciled, ProvisionError> {
        let mut done = Reconciled::default();
        if !self.inner.config.network.enabled {
            return Ok(done);
        }
        done.rules_rewritten = self.write_rules(None).await?;
        let mut running: BTreeMap<String, (u64, OrderLink)> = BTreeMap::new();
        for c in self.list_containers().await? {
            let Some(order) = crate::lease::order_of(&c) else {
                continue;
            };
            let Some(link) = crate::lease::id_range_of(&c).and_then(|ids| self.link_for(ids))
            else {
                continue;
            };
            running.insert(link.host_if.clone(), (order, link));
        }
        let mut to_stop = Vec::new();
        for (order, link) in running.values() {
            // An order being started or stopped right now is left to that.
            let lock = self.order_lock(*order);
            let Ok(_guard) = lock.try_lock() else {
                continue;
            };
            let pid = match self.task_pid(*order).await {
                Ok(pid) => pid,
                Err(ProvisionError::NotProvisioned { .. }) => continue,
                Err(e) => return Err(e),
            };
            if link::is_up(link)
                .await
                .map_err(|e| net_err("check a link", e))?
            {
                continue;
            }
            warn!(order, host_if = %link.host_if, "the order's link is gone; making it again");
            let made = match open_netns(*order, pid) {
                Ok(ns) => link::create(link, ns)
                    .await
                    .map_err(|e| net_err("make the order's link", e)),
                Err(e) => Err(e),
            };
            match made {
                Ok(()) => done.restored.push(*order),
                Err(e) => to_stop.push((*order, e.to_string())),
            }
        }
        for (order, reason) in to_stop {
            warn!(order, %reason, "stopping the order: its network could not be restored");
            self.stop(order).await.ok();
            done.stopped.push((order, reason));
        }
        let prefix = self.link_prefix();
        for name in link::host_links_named(&prefix)
            .await
            .map_err(|e| net_err("list links", e))?
        {
            let ours = running
                .get(&name)
                .is_some_and(|(order, _)| !done.stopped.iter().any(|(o, _)| o == order));
            if !ours {
                info!(host_if = %name, "removing a link no running order owns");
                link::delete(&name)
                    .await
                    .map_err(|e| net_err("remove a stale link", e))?;
                done.orphans_removed += 1;
            }
        }
        Ok(done)
    }

    /// Writes the table for every order that holds a container (plus `starting`), unless the
    /// kernel already has exactly that; with no order at all, removes it. Returns whether it
    /// wrote anything.
    pub(crate) async fn write_rules(
        &self,
        starting: Option<&OrderLink>,
    ) -> Result<bool, ProvisionError> {
        if !self.inner.config.network.enabled {
            return Ok(false);
        }
        let _guard = self.inner.net_lock.lock().await;
        let mut links: BTreeMap<String, OrderLink> = BTreeMap::new();
        for c in self.list_containers().await? {
            if let Some(link) = crate::lease::id_range_of(&c).and_then(|ids| self.link_for(ids)) {
                links.insert(link.host_if.clone(), link);
            }
        }
        if let Some(link) = starting {
            links.insert(link.host_if.clone(), link.clone());
        }
        let name = self.network_table();
        let links: Vec<OrderLink> = links.into_values().collect();
        // A starting order is never in the kernel's table yet: no need to read it first.
        let adding = starting.is_some();
        let table = Table::build(&name, &self.inner.config.network, &self.resolvers(), &links);
        tokio::task::spawn_blocking(move || {
            let current = if adding {
                Err(None)
            } else {
                nftables::helper::get_current_ruleset_with_args::<str, str, _>(
                    None,
                    ["list", "table", "inet", name.as_str()],
                )
                .map_err(Some)
            };
            if links.is_empty() {
                if current.is_ok() {
                    nftables::helper::apply_ruleset(&Table::removing(&name))
                        .map_err(|e| net_err("remove the orders' rules", nft_reason(e)))?;
                    return Ok(true);
                }
                return Ok(false);
            }
            if !adding && current.as_ref().is_ok_and(|c| table.matches(c)) {
                return Ok(false);
            }
            if current.is_ok() {
                warn!(table = %name, "the orders' rules differ from what they should be; writing them again");
            }
            nftables::helper::apply_ruleset(&table.replacing())
                .map_err(|e| net_err("write the orders' rules", nft_reason(e)))?;
            Ok(true)
        })
        .await
        .expect("nft does not panic")
    }

    /// Checks at start that the network can be made: the subnet fits, `nft` runs.
    pub(crate) fn check_network(config: &crate::ProvisionerConfig) -> Result<(), ProvisionError> {
        if !config.network.enabled {
            return Ok(());
        }
        config
            .network
            .check(config.uid_ranges)
            .map_err(ProvisionError::Config)?;
        let nft = std::process::Command::new("nft").arg("--version").output();
        if !nft.is_ok_and(|o| o.status.success()) {
            return Err(ProvisionError::Config(
                "orders' network needs nftables: install the `nftables` package, or set \
                 network.enabled = false to give orders loopback only"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn nft_reason(e: nftables::helper::NftablesError) -> String {
    match e {
        nftables::helper::NftablesError::NftFailed { stderr, .. } => stderr.trim().to_string(),
        other => other.to_string(),
    }
}

/// The container's network namespace, through its init.
fn open_netns(order: u64, pid: u32) -> Result<OwnedFd, ProvisionError> {
    let path = format!("/proc/{pid}/ns/net");
    std::fs::File::open(&path)
        .map(OwnedFd::from)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProvisionError::NotProvisioned { order },
            _ => ProvisionError::io("open the network namespace", path, e),
        })
}

/// Orders' traffic is routed by the host, so IPv4 forwarding must be on. It is a host-wide
/// switch (as for Docker or Podman); what may cross is up to the SP's firewall for its own
/// interfaces and to Shale's table for orders'.
fn enable_forwarding() -> Result<(), ProvisionError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let now = std::fs::read_to_string(PATH).map_err(|e| ProvisionError::io("read", PATH, e))?;
    if now.trim() != "1" {
        std::fs::write(PATH, "1").map_err(|e| ProvisionError::io("turn on", PATH, e))?;
        info!("turned on IPv4 forwarding (net.ipv4.ip_forward = 1) for orders' egress");
    }
    Ok(())
}
