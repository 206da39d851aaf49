//! The SP's auto-accept policy: accept an order that fits the offer, the free capacity, the
//! local datasets and the SP's limits on collateral, duration and escrow; decline any other with
//! the reason.

use std::path::Path;

use shale_contracts::{Order, Provider, U256};

use crate::money::Fil;
use crate::view::duration;

/// What is still free on the machine, from the offer less the live orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    pub cpus: u64,
    pub memory_mib: u64,
    /// Disk that can still be promised to an order; `None` when the host's disk could not be
    /// measured (then only the offer's maximum per order is checked).
    pub disk_mib: Option<u64>,
    pub gpus: u64,
}

/// The filesystem that holds the orders' disks, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostDisk {
    /// Its size.
    pub total_mib: u64,
    /// What an unprivileged writer may still allocate on it now.
    pub available_mib: u64,
}

/// Measures the filesystem that holds `path` (or, while `path` does not exist yet, its nearest
/// existing ancestor): the provisioner keeps the orders' disk images under its state directory.
pub fn host_disk(path: &Path) -> std::io::Result<HostDisk> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path
        .ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .unwrap_or(Path::new("/"));
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string and `stat` is a writable statvfs buffer.
    if unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    // The field types are c_ulong and fsblkcnt_t, 32 bits on some targets, 64 bits here.
    #[allow(clippy::unnecessary_cast)]
    let (frsize, blocks, avail) = (
        stat.f_frsize as u64,
        stat.f_blocks as u64,
        stat.f_bavail as u64,
    );
    let mib = |blocks: u64| {
        let bytes = u128::from(blocks) * u128::from(frsize);
        u64::try_from(bytes >> 20).unwrap_or(u64::MAX)
    };
    Ok(HostDisk {
        total_mib: mib(blocks),
        available_mib: mib(avail),
    })
}

/// The offer's resources less those of `live` orders (the offer is the machine's total).
///
/// Disk has no total in the offer: the filesystem of the orders' disks plays that part. What
/// can still be promised is its size less the disks of the live orders (each is reserved in full
/// when its lease starts, so one accepted but not yet started counts too), and never more than
/// what is available on it right now (the host's own files, the ledger and the images use it as
/// well).
pub fn free_capacity(provider: &Provider, live: &[Order], disk: Option<HostDisk>) -> Free {
    let used = |f: fn(&Order) -> u64| live.iter().map(f).sum::<u64>();
    Free {
        cpus: u64::from(provider.offer.cpus).saturating_sub(used(|o| u64::from(o.cpus))),
        memory_mib: provider
            .offer
            .memory_mib
            .saturating_sub(used(|o| o.memory_mib)),
        disk_mib: disk.map(|d| {
            d.total_mib
                .saturating_sub(used(|o| o.disk_mib))
                .min(d.available_mib)
        }),
        gpus: u64::from(provider.offer.gpu_count).saturating_sub(used(|o| u64::from(o.gpus))),
    }
}

/// What the SP risks on one order, bounded (`[sp.accept]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptLimits {
    /// The most collateral posted for one order; `None`: at most the order's escrow.
    pub max_collateral: Option<U256>,
    /// The longest lease.
    pub max_duration_secs: u64,
    /// The least escrow, in seconds of the order's price (capped by the lease's length).
    pub min_escrow_secs: u64,
}

/// `Ok` when the SP should accept `order`, else the reason to decline it (it reaches the client
/// on chain, so it names the figures).
pub fn decide(
    order: &Order,
    provider: &Provider,
    free: Free,
    limits: &AcceptLimits,
    has_dataset: impl Fn(&str) -> bool,
) -> Result<(), String> {
    check_risk(order, limits)?;
    if order.price_per_second < provider.offer.price_per_second
        || order.price_per_gib < provider.offer.price_per_gib
    {
        return Err("its prices are below the offer's".into());
    }
    if let Some(d) = &order.dataset {
        if !has_dataset(d) {
            return Err(format!("dataset {d:?} is not stored here"));
        }
    }
    if u64::from(order.cpus) > free.cpus {
        return Err(format!(
            "it asks for {} CPUs, {} are free",
            order.cpus, free.cpus
        ));
    }
    if order.memory_mib > free.memory_mib {
        return Err(format!(
            "it asks for {} MiB of memory, {} MiB are free",
            order.memory_mib, free.memory_mib
        ));
    }
    // Below the provisioner's minimum the container could never start: decline now, not later.
    let min_mib = shale_provisioner::MIN_DISK_BYTES >> 20;
    if order.disk_mib < min_mib || order.disk_mib > provider.offer.max_disk_mib {
        return Err(format!(
            "it asks for {} MiB of disk, the offer allows {min_mib} to {} MiB per order",
            order.disk_mib, provider.offer.max_disk_mib
        ));
    }
    if let Some(free_disk) = free.disk_mib {
        if order.disk_mib > free_disk {
            return Err(format!(
                "it asks for {} MiB of disk, {} MiB are free",
                order.disk_mib, free_disk
            ));
        }
    }
    if u64::from(order.gpus) > free.gpus {
        return Err(format!(
            "it asks for {} GPUs, {} are free",
            order.gpus, free.gpus
        ));
    }
    Ok(())
}

/// The limits on what the SP stakes and for how long: collateral, lease length, escrow.
fn check_risk(order: &Order, limits: &AcceptLimits) -> Result<(), String> {
    let max_collateral = limits.max_collateral.unwrap_or(order.escrow);
    if order.collateral > max_collateral {
        return Err(match limits.max_collateral {
            Some(_) => format!(
                "it asks for {} of collateral, this provider posts at most {}",
                Fil(order.collateral),
                Fil(max_collateral)
            ),
            None => format!(
                "it asks for {} of collateral, more than its escrow of {}",
                Fil(order.collateral),
                Fil(order.escrow)
            ),
        });
    }
    if order.max_duration_secs > limits.max_duration_secs {
        return Err(format!(
            "its lease of {} is longer than the {} this provider accepts",
            duration(order.max_duration_secs),
            duration(limits.max_duration_secs)
        ));
    }
    let secs = limits.min_escrow_secs.min(order.max_duration_secs);
    let needed = order.price_per_second.saturating_mul(U256::from(secs));
    if order.escrow < needed {
        return Err(format!(
            "its escrow of {} pays for less than {} at its price ({} needed)",
            Fil(order.escrow),
            duration(secs),
            Fil(needed)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shale_contracts::{Address, Offer, OrderState, Rating};

    /// Limits that let every order of these tests through, so each test checks one rule.
    const OPEN: AcceptLimits = AcceptLimits {
        max_collateral: None,
        max_duration_secs: u64::MAX,
        min_escrow_secs: 0,
    };

    fn provider() -> Provider {
        Provider {
            address: Address::ZERO,
            endpoint: "h:22".into(),
            ssh_host_key: String::new(),
            offer: Offer {
                cpus: 4,
                memory_mib: 4096,
                disk_mib: 1024,
                max_disk_mib: 10_240,
                gpu_model: String::new(),
                gpu_count: 1,
                price_per_second: U256::from(10u8),
                price_per_gib: U256::from(5u8),
            },
            active: true,
            registered_at: 0,
            datasets: vec![],
            miner_id: None,
            client_image_registries: Vec::new(),
            images: vec![],
            rating: Rating::default(),
        }
    }

    fn order(cpus: u32, memory_mib: u64, gpus: u32, dataset: Option<&str>) -> Order {
        Order {
            id: 1,
            client: Address::ZERO,
            provider: Address::ZERO,
            key_fingerprint: [0; 32],
            cpus,
            memory_mib,
            disk_mib: 1024,
            gpus,
            dataset: dataset.map(Into::into),
            image_digest: None,
            image_repository: None,
            price_per_second: U256::from(10u8),
            price_per_gib: U256::from(5u8),
            max_duration_secs: 60,
            escrow: U256::from(1u8),
            collateral: U256::ZERO,
            state: OrderState::Pending,
            created_at: 0,
            accept_timeout_secs: 60,
            accepted_at: None,
            ended_at: None,
            ended_by: None,
            claimed_seconds: 0,
            claimed_bytes: 0,
            ack_signer: None,
            byte_allowance: 0,
            acked_bytes: 0,
            acked_head: [0; 32],
            paid: U256::ZERO,
            head: [0; 32],
            settled: false,
            rated: false,
        }
    }

    #[test]
    fn orders_that_fit_are_accepted_and_others_declined_with_the_reason() {
        let p = provider();
        let local = |d: &str| d == "digits";
        let free = free_capacity(&p, &[order(3, 1024, 1, None)], None);
        assert_eq!(
            free,
            Free {
                cpus: 1,
                memory_mib: 3072,
                disk_mib: None,
                gpus: 0
            }
        );
        assert!(decide(&order(1, 1024, 0, Some("digits")), &p, free, &OPEN, local).is_ok());
        let reason = decide(&order(2, 1024, 0, None), &p, free, &OPEN, local).unwrap_err();
        assert_eq!(reason, "it asks for 2 CPUs, 1 are free");
        assert!(decide(&order(1, 4096, 0, None), &p, free, &OPEN, local)
            .unwrap_err()
            .contains("memory"));
        assert!(decide(&order(1, 1, 1, None), &p, free, &OPEN, local)
            .unwrap_err()
            .contains("GPUs"));
        assert!(
            decide(&order(1, 1, 0, Some("mnist")), &p, free, &OPEN, local)
                .unwrap_err()
                .contains("not stored here")
        );
        let mut cheap = order(1, 1, 0, None);
        cheap.price_per_second = U256::from(9u8);
        assert!(decide(&cheap, &p, free, &OPEN, local)
            .unwrap_err()
            .contains("below"));
    }

    #[test]
    fn disk_must_fit_the_offers_maximum_and_the_hosts_free_disk() {
        let p = provider();
        let local = |_: &str| false;
        let with_disk = |disk_mib| {
            let mut o = order(1, 1, 0, None);
            o.disk_mib = disk_mib;
            o
        };
        // A 20 GiB filesystem, two live orders of 1 GiB and 4 GiB: 15 GiB can be promised,
        // unless less is available now (the host's own files use the disk too).
        let live = [with_disk(1024), with_disk(4096)];
        let disk = HostDisk {
            total_mib: 20_480,
            available_mib: 18_000,
        };
        let free = free_capacity(&p, &live, Some(disk));
        assert_eq!(free.disk_mib, Some(15_360));
        let tight = free_capacity(
            &p,
            &live,
            Some(HostDisk {
                available_mib: 2_000,
                ..disk
            }),
        );
        assert_eq!(tight.disk_mib, Some(2_000));

        assert!(decide(&with_disk(10_240), &p, free, &OPEN, local).is_ok());
        assert_eq!(
            decide(&with_disk(10_241), &p, free, &OPEN, local).unwrap_err(),
            "it asks for 10241 MiB of disk, the offer allows 32 to 10240 MiB per order"
        );
        assert!(decide(&with_disk(0), &p, free, &OPEN, local)
            .unwrap_err()
            .contains("the offer allows"));
        // Under the provisioner's minimum the container could never start.
        assert!(decide(&with_disk(31), &p, free, &OPEN, local).is_err());
        assert!(decide(&with_disk(32), &p, free, &OPEN, local).is_ok());
        assert_eq!(
            decide(&with_disk(2_001), &p, tight, &OPEN, local).unwrap_err(),
            "it asks for 2001 MiB of disk, 2000 MiB are free"
        );
        // Unmeasured host disk: only the offer's maximum applies.
        let unknown = free_capacity(&p, &live, None);
        assert!(decide(&with_disk(10_240), &p, unknown, &OPEN, local).is_ok());
    }

    #[test]
    fn the_host_disk_is_measured_from_the_nearest_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let disk = host_disk(&dir.path().join("not/yet/made")).unwrap();
        assert!(disk.total_mib > 0);
        assert!(disk.available_mib <= disk.total_mib);
        assert_eq!(host_disk(dir.path()).unwrap().total_mib, disk.total_mib);
    }

    #[test]
    fn collateral_duration_and_escrow_are_bounded_with_the_figures_in_the_reason() {
        let p = provider();
        let free = free_capacity(&p, &[], None);
        let local = |_: &str| false;
        let limits = AcceptLimits {
            max_collateral: Some(U256::from(100u8)),
            max_duration_secs: 7200,
            min_escrow_secs: 3600,
        };
        // 10 wei a second: an hour of escrow is 36,000 wei.
        let fitting = || {
            let mut o = order(1, 1, 0, None);
            o.max_duration_secs = 7200;
            o.escrow = U256::from(36_000u32);
            o.collateral = U256::from(100u8);
            o
        };
        assert_eq!(decide(&fitting(), &p, free, &limits, local), Ok(()));

        let mut greedy = fitting();
        greedy.collateral = U256::from(101u8);
        assert!(decide(&greedy, &p, free, &limits, local)
            .unwrap_err()
            .contains("collateral, this provider posts at most"));

        let mut long = fitting();
        long.max_duration_secs = 3 * 3600;
        assert_eq!(
            decide(&long, &p, free, &limits, local).unwrap_err(),
            "its lease of 3h 00m is longer than the 2h 00m this provider accepts"
        );

        let mut poor = fitting();
        poor.escrow = U256::from(35_999u32);
        assert!(decide(&poor, &p, free, &limits, local)
            .unwrap_err()
            .starts_with("its escrow of 0.000000000000035999 FIL pays for less than 1h 00m"));

        // A lease shorter than the minimum needs escrow for the lease only.
        let mut short = fitting();
        short.max_duration_secs = 60;
        short.escrow = U256::from(600u16);
        assert_eq!(decide(&short, &p, free, &limits, local), Ok(()));

        // Without an explicit maximum the SP posts no more collateral than the escrow.
        let default_cap = AcceptLimits {
            max_collateral: None,
            ..limits
        };
        let mut staked = fitting();
        staked.collateral = U256::from(36_001u32);
        assert!(decide(&staked, &p, free, &default_cap, local)
            .unwrap_err()
            .contains("more than its escrow"));
    }
}
