//! Auth: the order lookup behind every login, with a warm and a cold cache, against a real anvil
//! with the marketplace deployed and one active order on it.
//!
//! - `order_lookup/warm`: [`OrderDirectory::get`] of a fresh cached order (no chain call);
//! - `order_lookup/cold`: [`OrderDirectory::invalidate`] then `get`, i.e. one `eth_call` round trip
//!   to anvil over HTTP on loopback, and the cache insert;
//! - `login/warm` and `login/cold`: what the login path does with the username and the offered key
//!   (parse the login, look the order up, admit the order, admit the key), either way.
//!
//! The quoted figure is cold / warm. Needs anvil (`scripts/setup.sh`); without it the bench says so
//! and exits successfully.
//!
//! ```text
//! cargo bench -p shale-bench --bench auth
//! ```

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::Criterion;
use russh::keys::PublicKey;
use shale_contracts::devnet::{self, Devnet};
use shale_contracts::{Address, Marketplace, NewOrder, Offer, U256};
use shale_gateway::admission::{admit_key, admit_order, key_digest};
use shale_gateway::login::{parse_login, OrderId};
use shale_gateway::orders::OrderDirectory;

const SAMPLES: usize = 50;
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILpbI6zHCqIRA4Rgyh8OHoWol7YJ57KPTCrSIlgfr2xe gateway";
const CLIENT_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl client";

/// Anvil with the marketplace, a provider (account 1) and one order of a client (account 2) that
/// the provider accepted.
struct World {
    _devnet: Devnet,
    rpc_url: String,
    market: Address,
    provider: Address,
    order: OrderId,
    key: PublicKey,
}

impl World {
    async fn new() -> World {
        let devnet = Devnet::start().await.expect("anvil starts");
        let market = devnet
            .deploy_marketplace_with_test_verifier(&[16])
            .await
            .expect("marketplace deploys");
        let chain = &devnet;
        let connect = |i: usize| async move {
            chain
                .marketplace_as(market, i)
                .await
                .expect("connects")
                .with_poll_interval(Duration::from_millis(50))
        };
        let (sp, client) = (connect(1).await, connect(2).await);
        let offer = Offer {
            cpus: 2,
            memory_mib: 2048,
            disk_mib: 1024,
            max_disk_mib: 1024,
            gpu_model: String::new(),
            gpu_count: 0,
            price_per_second: U256::from(1_000_003u64),
            price_per_gib: U256::from(7_000_000_001u64),
        };
        sp.register_provider("sp.example:2222", HOST_KEY, &offer, &[])
            .await
            .expect("provider registers");
        let provider = sp.sender().expect("a signing client");
        let key = PublicKey::from_openssh(CLIENT_KEY).expect("a valid key line");
        let new_order = NewOrder::for_offer(
            &sp.provider(provider).await.expect("provider reads"),
            key_digest(&key),
            U256::from(10u64).pow(U256::from(18u64)),
            36_000,
        );
        let id = client.create_order(&new_order).await.expect("order placed");
        sp.accept(id).await.expect("order accepted");
        World {
            rpc_url: devnet.rpc_url().to_owned(),
            _devnet: devnet,
            market,
            provider,
            order: OrderId(id),
            key,
        }
    }

    /// A directory as the gateway builds it: read-only client, entries fresh long enough that a
    /// warm lookup never expires during the run.
    async fn directory(&self) -> OrderDirectory {
        let market = Marketplace::connect(&self.rpc_url, self.market, None)
            .await
            .expect("connects");
        OrderDirectory::new(
            market,
            shale_gateway::orders::DirectoryTimes {
                fresh_for: Duration::from_secs(3600),
                missing_for: Duration::from_secs(5),
                stale_max: Duration::from_secs(3600),
                count_refresh: Duration::from_secs(2),
            },
            Default::default(),
        )
    }
}

/// What the login path does for a username and an offered key, minus rate limiting and billing.
async fn login(directory: &OrderDirectory, user: &str, key: &PublicKey, provider: Address) {
    let id = parse_login(user).expect("a valid login");
    let order = directory.get(id).await.expect("the order exists");
    admit_order(&order, provider, now()).expect("the order is admitted");
    admit_key(&order, key).expect("the key is the order's");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Per-iteration times of the calls criterion makes; the last `SAMPLES` are its samples.
#[derive(Default)]
struct Samples(RefCell<Vec<Duration>>);

impl Samples {
    fn record(&self, iters: u64, elapsed: Duration) -> Duration {
        self.0
            .borrow_mut()
            .push(elapsed / u32::try_from(iters).unwrap_or(u32::MAX));
        elapsed
    }

    fn median(&self) -> Option<Duration> {
        let all = self.0.borrow();
        let mut last: Vec<Duration> = all[all.len().saturating_sub(SAMPLES)..].to_vec();
        last.sort();
        (!last.is_empty()).then(|| last[last.len() / 2])
    }
}

fn main() {
    if devnet::find_anvil().is_none() {
        eprintln!(
            "SKIPPED: anvil not found (SHALE_ANVIL, PATH, .tools/bin/anvil); run scripts/setup.sh"
        );
        // In CI a missing component is a failure, never a skipped pass.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the reason above fails the test"
        );
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let world = rt.block_on(World::new());
    let directory = rt.block_on(world.directory());
    let user = world.order.0.to_string();
    // Shared references, copied into every timed future.
    let (directory, user) = (&directory, user.as_str());
    let (id, key, provider) = (world.order, &world.key, world.provider);
    rt.block_on(login(directory, user, key, provider));

    let mut c = Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let samples: [[Samples; 2]; 2] = Default::default();
    for (group, [warm, cold]) in ["order_lookup", "login"].into_iter().zip(&samples) {
        let mut g = c.benchmark_group(group);
        let full = group == "login";
        g.bench_function("warm", |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let t = Instant::now();
                for _ in 0..iters {
                    if full {
                        login(directory, user, key, provider).await;
                    } else {
                        std::hint::black_box(directory.get(id).await.expect("cached"));
                    }
                }
                warm.record(iters, t.elapsed())
            })
        });
        g.bench_function("cold", |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let t = Instant::now();
                for _ in 0..iters {
                    directory.invalidate(id).await;
                    if full {
                        login(directory, user, key, provider).await;
                    } else {
                        std::hint::black_box(directory.get(id).await.expect("read"));
                    }
                }
                cold.record(iters, t.elapsed())
            })
        });
        g.finish();
    }
    c.final_summary();

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("\nauth on {cores} cores, anvil on the same machine (medians of {SAMPLES} samples)");
    for (group, [warm, cold]) in ["order_lookup", "login"].into_iter().zip(&samples) {
        if let (Some(w), Some(c)) = (warm.median(), cold.median()) {
            println!(
                "{group:>12}: warm {:>9.2} µs, cold {:>9.2} µs, cold / warm {:.0}",
                w.as_secs_f64() * 1e6,
                c.as_secs_f64() * 1e6,
                c.as_secs_f64() / w.as_secs_f64()
            );
        }
    }
}
