//! The SP's auto-accept policy: accept an order that fits the offer, the free capacity and the
//! local datasets; decline any other with the reason.

use shale_contracts::{Order, Provider};

/// What is still free on the machine, from the offer less the live orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    pub cpus: u64,
    pub memory_mib: u64,
    pub gpus: u64,
}

/// The offer's resources less those of `live` orders (the offer is the machine's total).
pub fn free_capacity(provider: &Provider, live: &[Order]) -> Free {
    let used = |f: fn(&Order) -> u64| live.iter().map(f).sum::<u64>();
    Free {
        cpus: u64::from(provider.offer.cpus).saturating_sub(used(|o| u64::from(o.cpus))),
        memory_mib: provider
            .offer
            .memory_mib
            .saturating_sub(used(|o| o.memory_mib)),
        gpus: u64::from(provider.offer.gpu_count).saturating_sub(used(|o| u64::from(o.gpus))),
    }
}

/// `Ok` when the SP should accept `order`, else the reason to decline it.
pub fn decide(
    order: &Order,
    provider: &Provider,
    free: Free,
    has_dataset: impl Fn(&str) -> bool,
) -> Result<(), String> {
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
    if u64::from(order.gpus) > free.gpus {
        return Err(format!(
            "it asks for {} GPUs, {} are free",
            order.gpus, free.gpus
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shale_contracts::{Address, Offer, OrderState, Rating, U256};

    fn provider() -> Provider {
        Provider {
            address: Address::ZERO,
            endpoint: "h:22".into(),
            ssh_host_key: String::new(),
            offer: Offer {
                cpus: 4,
                memory_mib: 4096,
                gpu_model: String::new(),
                gpu_count: 1,
                price_per_second: U256::from(10u8),
                price_per_gib: U256::from(5u8),
            },
            active: true,
            registered_at: 0,
            datasets: vec![],
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
            gpus,
            dataset: dataset.map(Into::into),
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
        let free = free_capacity(&p, &[order(3, 1024, 1, None)]);
        assert_eq!(
            free,
            Free {
                cpus: 1,
                memory_mib: 3072,
                gpus: 0
            }
        );
        assert!(decide(&order(1, 1024, 0, Some("digits")), &p, free, local).is_ok());
        let reason = decide(&order(2, 1024, 0, None), &p, free, local).unwrap_err();
        assert_eq!(reason, "it asks for 2 CPUs, 1 are free");
        assert!(decide(&order(1, 4096, 0, None), &p, free, local)
            .unwrap_err()
            .contains("memory"));
        assert!(decide(&order(1, 1, 1, None), &p, free, local)
            .unwrap_err()
            .contains("GPUs"));
        assert!(decide(&order(1, 1, 0, Some("mnist")), &p, free, local)
            .unwrap_err()
            .contains("not stored here"));
        let mut cheap = order(1, 1, 0, None);
        cheap.price_per_second = U256::from(9u8);
        assert!(decide(&cheap, &p, free, local)
            .unwrap_err()
            .contains("below"));
    }
}
