//! The settler against a real anvil with the marketplace deployed behind REAL Groth16 verifiers
//! (generated from seeded keys, compiled with the pinned solc-js), and a real SQLite ledger.
//!
//! Needs `scripts/setup.sh` (anvil and solc-js under `.tools/`); every test skips, saying so,
//! when anvil is missing.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use shale_circuits::{setup_from_seed, Anchor, ProvingKey, TickBatch};
use shale_contracts::devnet::{self, Devnet};
use shale_contracts::{
    Address, Bytes, ClaimRequest, Marketplace, NewOrder, Offer, OrderState, U256,
};
use shale_meter::ledger::{ClaimStatus, NewClaim};
use shale_meter::{
    Deployment, LeaseSpec, Ledger, Meter, MeterConfig, Tariff, Tick, TickChain, Usage,
};
use shale_settler::{Settler, SettlerConfig, SettlerError, SettlerEvent};
use tokio::sync::broadcast;

const CAPACITY: u32 = 16;
/// The seed of the keys the marketplace's verifier is generated from.
const SEED: u64 = 0x5e771e;
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILpbI6zHCqIRA4Rgyh8OHoWol7YJ57KPTCrSIlgfr2xe gateway";
const PRICE_PER_SECOND: u64 = 1_000_003;
const PRICE_PER_GIB: u64 = 7_000_000_001;
const GIB: u64 = 1 << 30;

/// Keys and compiled verifiers, made once per test binary: setup is the slow part of a debug
/// build. The proving key is also written to a key directory, as the deployer ships it.
struct Keys {
    pk: ProvingKey,
    /// Creation code of the verifier for `pk`.
    verifier: Vec<u8>,
    /// Creation code of a verifier from another setup: it refuses every proof made with `pk`.
    foreign_verifier: Vec<u8>,
    dir: tempfile::TempDir,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let (pk, vk) = setup_from_seed(CAPACITY as usize, SEED).expect("setup");
        let (_, other_vk) = setup_from_seed(CAPACITY as usize, SEED + 1).expect("setup");
        let verifier = shale_circuits::solc::compile_verifier(&vk).expect("verifier compiles");
        let foreign_verifier =
            shale_circuits::solc::compile_verifier(&other_vk).expect("verifier compiles");
        let dir = tempfile::tempdir().unwrap();
        pk.write(&dir.path().join(format!("tick-{CAPACITY}.pk")))
            .unwrap();
        Keys {
            pk,
            verifier,
            foreign_verifier,
            dir,
        }
    })
}

/// One test's world: anvil, the marketplace, a provider (account 1) with an active order from a
/// client (account 2), and a SQLite ledger.
struct World {
    devnet: Devnet,
    sp: Marketplace,
    client: Marketplace,
    state: tempfile::TempDir,
    ledger: Ledger,
}

impl World {
    /// `None` when anvil is not installed (the test then skips).
    async fn new(foreign_verifier: bool) -> Option<World> {
        if devnet::find_anvil().is_none() {
            eprintln!("SKIPPED: anvil not found; run scripts/setup.sh");
            // In CI a missing component is a failure, never a skipped pass.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: the reason above fails the test"
            );
            return None;
        }
        let keys = tokio::task::spawn_blocking(keys).await.unwrap();
        let code = if foreign_verifier {
            &keys.foreign_verifier
        } else {
            &keys.verifier
        };
        Some(World::with_verifier(CAPACITY, code).await)
    }

    /// A world whose marketplace verifies batches of `capacity` with the verifier `code`.
    async fn with_verifier(capacity: u32, code: &[u8]) -> World {
        let devnet = Devnet::start().await.expect("anvil starts");
        let verifier = devnet::deploy_bytecode(
            devnet.rpc_url(),
            devnet.signer(0),
            Bytes::from(code.to_vec()),
        )
        .await
        .expect("verifier deploys");
        let address = devnet
            .deploy_marketplace(&[capacity], &[verifier])
            .await
            .expect("marketplace deploys");
        let chain = &devnet;
        let connect = |i: usize| async move {
            chain
                .marketplace_as(address, i)
                .await
                .expect("connects")
                .with_poll_interval(Duration::from_millis(50))
        };
        let sp = connect(1).await;
        let client = connect(2).await;
        let offer = Offer {
            cpus: 2,
            memory_mib: 2048,
            disk_mib: 1024,
            max_disk_mib: 1024,
            gpu_model: String::new(),
            gpu_count: 0,
            price_per_second: U256::from(PRICE_PER_SECOND),
            price_per_gib: U256::from(PRICE_PER_GIB),
        };
        sp.register_provider("sp.example:2222", HOST_KEY, &offer, &[])
            .await
            .expect("provider registers");
        let state = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_sqlite(&state.path().join("ledger.db"))
            .await
            .unwrap();
        World {
            devnet,
            sp,
            client,
            state,
            ledger,
        }
    }

    fn sp_address(&self) -> Address {
        self.sp.sender().unwrap()
    }

    /// The marketplace's chain and address: what the orders' tick chains are bound to.
    async fn deployment(&self) -> Deployment {
        Deployment::new(self.sp.chain_id().await.unwrap(), self.sp.address().0 .0)
    }

    /// Creates and accepts an order with `escrow` wei; its lease has run `run_secs` on chain.
    async fn active_order(&self, escrow: u64, run_secs: u64) -> u64 {
        let provider = self.sp.provider(self.sp_address()).await.unwrap();
        let mut order = NewOrder::for_offer(
            &provider,
            shale_contracts::key_fingerprint(b"client key blob"),
            U256::from(escrow),
            36_000,
        );
        order.collateral = U256::from(1_000_000_001u64);
        // These tests move gibibytes with no client tunnel: bytes need no acknowledgment.
        order.byte_allowance = 1 << 50;
        let id = self.client.create_order(&order).await.unwrap();
        self.sp.accept(id).await.unwrap();
        self.devnet.advance_time(run_secs).await.unwrap();
        id
    }

    /// Like [`World::active_order`] with the client's acknowledgment key `ack` and no bytes
    /// payable without it.
    async fn acknowledged_order(&self, escrow: u64, run_secs: u64, ack: Address) -> u64 {
        self.acknowledged_order_with(escrow, run_secs, ack, 0).await
    }

    /// Like [`World::acknowledged_order`] with `allowance` bytes payable without an
    /// acknowledgment.
    async fn acknowledged_order_with(
        &self,
        escrow: u64,
        run_secs: u64,
        ack: Address,
        allowance: u64,
    ) -> u64 {
        let provider = self.sp.provider(self.sp_address()).await.unwrap();
        let mut order = NewOrder::for_offer(
            &provider,
            shale_contracts::key_fingerprint(b"client key blob"),
            U256::from(escrow),
            36_000,
        );
        order.collateral = U256::from(1_000_000_001u64);
        order.ack_signer = Some(ack);
        order.byte_allowance = allowance;
        let id = self.client.create_order(&order).await.unwrap();
        self.sp.accept(id).await.unwrap();
        self.devnet.advance_time(run_secs).await.unwrap();
        id
    }

    /// Appends `n` ticks through the ledger API, as the meter would.
    async fn append_ticks(&self, order: u64, n: u64) -> Vec<Tick> {
        self.append_ticks_from(order, n, shale_meter::ledger::now_ms())
            .await
    }

    /// Like [`World::append_ticks`], stamped as started at `started_at_ms`.
    async fn append_ticks_from(&self, order: u64, n: u64, started_at_ms: u64) -> Vec<Tick> {
        let tariff = tariff();
        let last = self.ledger.chain_head(order).await.unwrap();
        let deployment = self.deployment().await;
        let mut chain = TickChain::resume(deployment.order_key(order), tariff, last);
        let mut ticks = Vec::new();
        for _ in 0..n {
            let seq = chain.next_seq();
            // Uneven bytes so that per-batch flooring of the byte charge shows.
            let usage = Usage {
                seconds: 5,
                bytes_in: 3 * GIB + seq * 1_234_567,
                bytes_out: 777_777 * (seq + 1),
            };
            let tick = chain.prepare(started_at_ms, usage);
            self.ledger.append_tick(&deployment, &tick).await.unwrap();
            chain.commit(&tick).unwrap();
            ticks.push(tick);
        }
        ticks
    }

    async fn settler(&self, config: SettlerConfig) -> Settler {
        Settler::new(&config, self.sp.clone(), self.ledger.clone())
            .await
            .expect("settler starts")
    }
}

fn tariff() -> Tariff {
    Tariff::new(U256::from(PRICE_PER_SECOND), U256::from(PRICE_PER_GIB)).unwrap()
}

/// A config for tests: the shipped key directory, no waiting, fast retries.
fn config() -> SettlerConfig {
    SettlerConfig {
        key_dir: Some(PathBuf::from(keys().dir.path())),
        capacities: vec![CAPACITY],
        max_wait_secs: 3_600,
        poll_interval_ms: 100,
        backoff_initial_ms: 10,
        backoff_max_ms: 100,
        scan_chain_on_start: false,
        ..SettlerConfig::default()
    }
}

/// The contract's tariff, computed here independently: seconds at the per-second price plus
/// the batch's bytes at the per-GiB price, floored.
fn charge(ticks: &[Tick]) -> U256 {
    let seconds: u64 = ticks.iter().map(|t| t.seconds).sum();
    let bytes: u128 = ticks
        .iter()
        .map(|t| u128::from(t.bytes_in) + u128::from(t.bytes_out))
        .sum();
    U256::from(seconds) * U256::from(PRICE_PER_SECOND)
        + U256::from(bytes) * U256::from(PRICE_PER_GIB) / U256::from(GIB)
}

fn drain(events: &mut broadcast::Receiver<SettlerEvent>) -> Vec<SettlerEvent> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_batches_are_claimed_and_the_sp_is_paid_exactly_the_tariff_then_settled() {
    let Some(world) = World::new(false).await else {
        return;
    };
    let id = world.active_order(10u64.pow(18), 1_000).await;
    let ticks = world.append_ticks(id, 40).await;
    let settler = world.settler(config()).await;
    let mut registry = prometheus_client::registry::Registry::with_prefix("shale_gateway");
    settler.metrics().register(&mut registry);
    let mut events = settler.subscribe();
    settler.track(id);
    let sp = world.sp_address();
    let before = world.sp.balance_of(sp).await.unwrap();

    // Two full batches of 16; the 8 left wait (not full, not old, the order is live).
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 2);
    let events1 = drain(&mut events);
    let mut fees = U256::ZERO;
    let mut hashes = Vec::new();
    for (event, range) in events1.iter().zip([0usize..16, 16..32]) {
        let SettlerEvent::Claimed {
            order,
            first_seq,
            last_seq,
            amount,
            fee,
            tx_hash,
            capacity,
            ..
        } = event
        else {
            panic!("expected a claim, got {event:?}");
        };
        assert_eq!(*order, id);
        assert_eq!(
            (*first_seq, *last_seq),
            (range.start as u64, range.end as u64 - 1)
        );
        assert_eq!(*capacity, CAPACITY);
        assert_eq!(*amount, charge(&ticks[range]));
        fees += *fee;
        hashes.push(tx_hash.to_string());
    }
    let expected = charge(&ticks[0..16]) + charge(&ticks[16..32]);
    let after = world.sp.balance_of(sp).await.unwrap();
    assert_eq!(after + fees, before + expected, "paid exactly the tariff");
    let on_chain = world.sp.order(id).await.unwrap();
    assert_eq!(on_chain.paid, expected);
    assert_eq!(on_chain.head, ticks[31].head.0);
    assert_eq!(on_chain.claimed_seconds, 32 * 5);
    let claims = world.ledger.claims(id).await.unwrap();
    assert_eq!(claims.len(), 2);
    for (claim, hash) in claims.iter().zip(&hashes) {
        assert_eq!(claim.status, ClaimStatus::Confirmed);
        assert_eq!(claim.tx_hash.as_deref(), Some(hash.as_str()));
    }
    assert_eq!(world.ledger.last_claimed_seq(id).await.unwrap(), Some(31));

    // The client ends the order: the rest is claimed at once, as a partial batch.
    world.client.terminate(id).await.unwrap();
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!((report.claimed, report.settled), (1, false));
    assert!(matches!(
        drain(&mut events).as_slice(),
        [SettlerEvent::Claimed { first_seq: 32, last_seq: 39, amount, .. }] if *amount == charge(&ticks[32..40])
    ));
    assert_eq!(world.ledger.unclaimed_ticks(id).await.unwrap(), vec![]);

    // After the settle delay, the ended order is settled and no longer tracked.
    world.devnet.advance_time(1_000).await.unwrap();
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!((report.claimed, report.settled), (0, true));
    assert!(world.sp.order(id).await.unwrap().settled);
    assert!(settler.tracked().is_empty());

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("shale_gateway_settler_claims_paid_total 3"),
        "{text}"
    );
    assert!(text.contains("shale_gateway_settler_proof_seconds_count 3"));
    assert!(text.contains("shale_gateway_settler_batch_ticks_sum 40.0"));
    assert!(text.contains("shale_gateway_settler_claim_gas_count 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_ledger_and_sends_nothing_twice() {
    let Some(world) = World::new(false).await else {
        return;
    };
    let id = world.active_order(10u64.pow(18), 1_000).await;
    world.append_ticks(id, 20).await;
    let first = world.settler(config()).await;
    first.track(id);
    assert_eq!(first.round().await[&id].as_ref().unwrap().claimed, 1);
    drop(first);

    // A new process: a fresh ledger connection and a settler that finds the order on chain.
    world.ledger.close().await;
    let ledger = Ledger::open_sqlite(&world.state.path().join("ledger.db"))
        .await
        .unwrap();
    let settler = Settler::new(&config(), world.sp.clone(), ledger.clone())
        .await
        .unwrap();
    assert_eq!(settler.discover().await.unwrap(), 1);
    assert_eq!(settler.tracked(), vec![id]);
    let block = world.sp.block_number().await.unwrap();
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed + report.recovered, 0);
    assert_eq!(
        world.sp.block_number().await.unwrap(),
        block,
        "no transaction sent"
    );
    assert_eq!(ledger.claims(id).await.unwrap().len(), 1);

    // It goes on from the ledger: with no wait, the 4 left are claimed from the paid head.
    let settler = Settler::new(
        &SettlerConfig {
            max_wait_secs: 0,
            ..config()
        },
        world.sp.clone(),
        ledger.clone(),
    )
    .await
    .unwrap();
    settler.track(id);
    assert_eq!(settler.round().await[&id].as_ref().unwrap().claimed, 1);
    let claims = ledger.claims(id).await.unwrap();
    assert_eq!(
        claims
            .iter()
            .map(|c| (c.first_seq, c.last_seq, c.status))
            .collect::<Vec<_>>(),
        vec![
            (0, 15, ClaimStatus::Confirmed),
            (16, 19, ClaimStatus::Confirmed)
        ]
    );
}

/// Proves and sends a claim of `ticks` outside the settler, as a crashed run would have.
async fn claim_behind_the_settlers_back(
    world: &World,
    id: u64,
    paid: Option<&Tick>,
    ticks: &[Tick],
) {
    let anchor = paid.map(|t| Anchor {
        before: t.prev_head,
        tick: t.fields(),
    });
    let batch = TickBatch::new(
        world.deployment().await.order_key(id),
        paid.map_or(shale_circuits::Head::GENESIS, |t| t.head),
        anchor,
        ticks.iter().map(Tick::fields).collect(),
    )
    .unwrap();
    let inputs = batch.inputs();
    let proof = tokio::task::spawn_blocking(move || keys().pk.prove_with_os_rng(&batch).unwrap())
        .await
        .unwrap();
    world
        .sp
        .claim(&ClaimRequest {
            order_id: id,
            batch_capacity: CAPACITY,
            next_head: inputs.next.0,
            seconds: inputs.seconds as u64,
            bytes_in: inputs.bytes_in as u64,
            bytes_out: inputs.bytes_out as u64,
            proof: Bytes::from(proof.to_bytes().to_vec()),
            ack: None,
        })
        .await
        .expect("the claim is paid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_mined_but_not_recorded_is_found_on_chain_and_never_resent() {
    let Some(world) = World::new(false).await else {
        return;
    };
    // Order A crashed after recording its claim as submitted; order B before recording anything.
    let a = world.active_order(10u64.pow(18), 1_000).await;
    let b = world.active_order(10u64.pow(18), 1_000).await;
    let ticks_a = world.append_ticks(a, 20).await;
    let ticks_b = world.append_ticks(b, 20).await;
    let in_flight = world
        .ledger
        .record_claim(&NewClaim {
            order: a,
            first_seq: 0,
            last_seq: 15,
            amount: charge(&ticks_a[..16]),
            tx_hash: None,
            status: ClaimStatus::Submitted,
        })
        .await
        .unwrap();
    claim_behind_the_settlers_back(&world, a, None, &ticks_a[..16]).await;
    claim_behind_the_settlers_back(&world, b, None, &ticks_b[..16]).await;

    let settler = world
        .settler(SettlerConfig {
            max_wait_secs: 0,
            ..config()
        })
        .await;
    let mut events = settler.subscribe();
    settler.track(a);
    settler.track(b);
    let reports = settler.round().await;
    for id in [a, b] {
        let report = reports[&id].as_ref().unwrap();
        assert_eq!((report.recovered, report.claimed), (1, 1), "order {id}");
    }
    let seen = drain(&mut events);
    assert!(seen.contains(&SettlerEvent::Recovered {
        order: a,
        claim_id: in_flight.claim_id,
        last_seq: 15
    }));
    // Each order was paid once for 0..=15 (behind the back) and once for 16..=19 (settler).
    for (id, ticks) in [(a, &ticks_a), (b, &ticks_b)] {
        let order = world.sp.order(id).await.unwrap();
        assert_eq!(order.paid, charge(&ticks[..16]) + charge(&ticks[16..]));
        assert_eq!(order.claimed_seconds, 20 * 5);
        let claims = world.ledger.claims(id).await.unwrap();
        let ranges: Vec<_> = claims
            .iter()
            .map(|c| (c.first_seq, c.last_seq, c.status))
            .collect();
        assert_eq!(
            ranges,
            vec![
                (0, 15, ClaimStatus::Confirmed),
                (16, 19, ClaimStatus::Confirmed)
            ]
        );
        // The recovered claim's amount is what the chain paid for it.
        assert_eq!(claims[0].amount, charge(&ticks[..16]));
    }
    assert_eq!(
        world.ledger.claims(a).await.unwrap()[0].claim_id,
        in_flight.claim_id,
        "the in-flight record itself is confirmed"
    );
    let claimed = seen
        .iter()
        .filter(|e| matches!(e, SettlerEvent::Claimed { .. }))
        .count();
    assert_eq!(claimed, 2, "only the two new batches were sent: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_proof_is_refused_by_the_contract_with_its_reason() {
    // The marketplace verifies with keys from another setup than the settler proves with.
    let Some(world) = World::new(true).await else {
        return;
    };
    let id = world.active_order(10u64.pow(18), 1_000).await;
    world.append_ticks(id, 16).await;
    // Keys derived from the seed at start (the local-stack path) rather than read from a file.
    let settler = world
        .settler(SettlerConfig {
            key_dir: None,
            key_seed: Some(SEED),
            backoff_initial_ms: 60_000,
            ..config()
        })
        .await;
    let mut events = settler.subscribe();
    settler.track(id);
    let err = settler.round().await.remove(&id).unwrap().unwrap_err();
    let SettlerError::Refused {
        reason, claim_id, ..
    } = &err
    else {
        panic!("expected a refusal, got {err}");
    };
    assert!(reason.contains("does not verify"), "{reason}");
    assert_eq!(settler.metrics().failures_with("InvalidProof"), 1);
    assert!(drain(&mut events).contains(&SettlerEvent::Refused {
        order: id,
        claim_id: *claim_id,
        reason: reason.clone()
    }));
    let claims = world.ledger.claims(id).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].status, ClaimStatus::Failed);
    let order = world.sp.order(id).await.unwrap();
    assert_eq!((order.paid, order.head), (U256::ZERO, [0u8; 32]));

    // The order cools down rather than being proved and refused again at every poll.
    assert!(settler.round().await.is_empty());
    assert_eq!(world.ledger.claims(id).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_cut_to_what_the_escrow_can_pay() {
    let Some(world) = World::new(false).await else {
        return;
    };
    // Enough escrow for about five ticks.
    let ticks_charge = charge(&world_ticks_preview());
    let escrow = (ticks_charge * U256::from(5) / U256::from(16)).to::<u64>() + 1;
    let id = world.active_order(escrow, 1_000).await;
    let ticks = world.append_ticks(id, 16).await;
    let settler = world.settler(config()).await;
    settler.track(id);
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 1);
    let claims = world.ledger.claims(id).await.unwrap();
    let n = (claims[0].last_seq + 1) as usize;
    assert!(n < 16, "the batch was cut");
    let order = world.sp.order(id).await.unwrap();
    assert_eq!(order.paid, charge(&ticks[..n]));
    assert!(charge(&ticks[..n + 1]) > U256::from(escrow));
    assert_eq!(settler.metrics().failures_with("escrow_exhausted"), 0);

    // Even with no wait, the next tick alone is more than the escrow left: nothing is sent,
    // and the reason is counted.
    let settler = world
        .settler(SettlerConfig {
            max_wait_secs: 0,
            ..config()
        })
        .await;
    settler.track(id);
    let block = world.sp.block_number().await.unwrap();
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 0);
    assert_eq!(world.sp.block_number().await.unwrap(), block);
    assert_eq!(settler.metrics().failures_with("escrow_exhausted"), 1);
    assert_eq!(world.sp.order(id).await.unwrap().state, OrderState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_said_stopped_is_claimed_at_once_until_it_is_tracked_running_again() {
    let Some(world) = World::new(false).await else {
        return;
    };
    let id = world.active_order(10u64.pow(18), 1_000).await;
    world.append_ticks(id, 3).await;
    let settler = world.settler(config()).await;
    settler.track(id);
    // Not a full batch, not old, the order live on chain: the ticks wait.
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 0);

    // The gateway says the lease stopped: its ticks are claimed now, and nothing more (the
    // order is still active on chain, so it is not settled).
    settler.lease_stopped(id);
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!((report.claimed, report.settled), (1, false));
    assert_eq!(world.ledger.unclaimed_ticks(id).await.unwrap(), vec![]);
    assert_eq!(world.sp.order(id).await.unwrap().state, OrderState::Active);

    // The lease runs again (a top-up): its new ticks wait for a batch again.
    settler.track(id);
    world.append_ticks(id, 2).await;
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 0);

    // An order the settler did not track is tracked by the hint.
    let other = world.active_order(10u64.pow(18), 1_000).await;
    world.append_ticks(other, 2).await;
    settler.lease_stopped(other);
    assert!(settler.tracked().contains(&other));
    let report = settler.round().await.remove(&other).unwrap().unwrap();
    assert_eq!(report.claimed, 1);
}

/// The 16 ticks `append_ticks` writes first, without a ledger (for sizing an escrow).
fn world_ticks_preview() -> Vec<Tick> {
    // Only the usage counts here; the heads' deployment does not matter.
    let mut chain = TickChain::genesis(Deployment::default().order_key(1), tariff());
    (0..16)
        .map(|seq| {
            let tick = chain.prepare(
                0,
                Usage {
                    seconds: 5,
                    bytes_in: 3 * GIB + seq * 1_234_567,
                    bytes_out: 777_777 * (seq + 1),
                },
            );
            chain.commit(&tick).unwrap();
            tick
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_task_claims_a_real_lease_meters_ticks_and_its_final_tick_when_told_stopped()
{
    let Some(world) = World::new(false).await else {
        return;
    };
    let id = world.active_order(10u64.pow(18), 100).await;
    let meter = Meter::new(
        world.ledger.clone(),
        world.deployment().await,
        &MeterConfig {
            tick_interval_secs: 1,
            ledger_url: None,
        },
    )
    .unwrap();
    let lease: Arc<_> = meter
        .start_lease(LeaseSpec {
            order: id,
            tariff: tariff(),
            max_seconds: None,
        })
        .await
        .unwrap();
    let session = lease.open_session();
    let channel = session.open_channel();
    channel.add_in(3 * GIB);
    channel.add_out(12_345);
    let settler = world
        .settler(SettlerConfig {
            max_wait_secs: 0,
            ..config()
        })
        .await;
    let mut events = settler.subscribe();
    settler.track(id);
    let task = settler.spawn();

    // A claim while the lease runs. The settler knows no meter; the claim is confirmed in the
    // ledger before it is published, so a refresh then (as the gateway does on the chain's
    // `Claimed` event) sees the meter's unclaimed totals drop below what it metered.
    let first = next_claim(&mut events).await;
    lease.refresh_claims().await.unwrap();
    let totals = lease.totals();
    assert!(
        totals.unclaimed.seconds < totals.metered.seconds,
        "{totals:?} after {first:?}"
    );

    // The lease ends: its final tick is claimed too.
    let last_tick = meter.end_lease(id).await.unwrap();
    let last_seq = match last_tick {
        Some(t) => t.seq,
        None => world.ledger.chain_head(id).await.unwrap().unwrap().seq,
    };
    settler.lease_stopped(id);
    loop {
        if let SettlerEvent::Claimed { last_seq: seq, .. } = next_claim(&mut events).await {
            if seq == last_seq {
                break;
            }
        }
    }
    task.shutdown().await;
    assert_eq!(world.ledger.unclaimed_ticks(id).await.unwrap(), vec![]);
    let metered = world.ledger.usage_after(id, None).await.unwrap().0;
    let order = world.sp.order(id).await.unwrap();
    assert_eq!(order.claimed_seconds, metered.seconds);
    assert_eq!(order.claimed_bytes, metered.bytes_total());
}

async fn next_claim(events: &mut broadcast::Receiver<SettlerEvent>) -> SettlerEvent {
    // Generous: a debug-build proof on a loaded 2-core CI machine.
    tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            match events.recv().await.unwrap() {
                e @ SettlerEvent::Claimed { .. } => return e,
                SettlerEvent::Refused { reason, .. } => panic!("claim refused: {reason}"),
                _ => {}
            }
        }
    })
    .await
    .expect("a claim within the timeout")
}

/// Proving time on the settler's pool per capacity and pool size, and the gas of each claim:
/// `cargo test --release -p shale-gateway --test settler -- --ignored --nocapture measure`.
/// `SHALE_MEASURE_CAPACITIES=16,64` picks the capacities (default 16,64,256,1024).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run in release on purpose"]
async fn measure_settler_proving_time_and_claim_gas() {
    if devnet::find_anvil().is_none() {
        eprintln!("SKIPPED: anvil not found; run scripts/setup.sh");
        // In CI a missing component is a failure, never a skipped pass.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the reason above fails the test"
        );
        return;
    }
    let capacities: Vec<u32> = std::env::var("SHALE_MEASURE_CAPACITIES")
        .unwrap_or_else(|_| "16,64,256,1024".into())
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    eprintln!("capacity | pool threads | first proof (builds matrices) | steady proof | ticks per second | claim gas");
    for capacity in capacities {
        let (pk, code) = tokio::task::spawn_blocking(move || {
            let (pk, vk) = setup_from_seed(capacity as usize, SEED).unwrap();
            (pk, shale_circuits::solc::compile_verifier(&vk).unwrap())
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        pk.write(&dir.path().join(format!("tick-{capacity}.pk")))
            .unwrap();
        drop(pk);
        let world = World::with_verifier(capacity, &code).await;
        for threads in [1usize, 2] {
            let id = world.active_order(10u64.pow(18), 0).await;
            world
                .devnet
                .advance_time(2 * u64::from(capacity) * 5 + 100)
                .await
                .unwrap();
            world.append_ticks(id, 2 * u64::from(capacity)).await;
            let settler = world
                .settler(SettlerConfig {
                    key_dir: Some(dir.path().to_path_buf()),
                    capacities: vec![capacity],
                    worker_threads: threads,
                    ..config()
                })
                .await;
            let mut events = settler.subscribe();
            settler.track(id);
            let report = settler.round().await.remove(&id).unwrap().unwrap();
            assert_eq!(report.claimed, 2);
            let claims: Vec<(Duration, u64)> = drain(&mut events)
                .into_iter()
                .filter_map(|e| match e {
                    SettlerEvent::Claimed {
                        proof_time,
                        gas_used,
                        ..
                    } => Some((proof_time, gas_used)),
                    _ => None,
                })
                .collect();
            let steady = claims[1].0.as_secs_f64();
            eprintln!(
                "{capacity} | {threads} | {:.2} s | {steady:.2} s | {:.0} | {} / {}",
                claims[0].0.as_secs_f64(),
                f64::from(capacity) / steady,
                claims[0].1,
                claims[1].1
            );
        }
    }
}

/// A JSON-RPC proxy in front of anvil that answers HTTP 503 (an outage, to the client) to the
/// next `failures` `eth_estimateGas` requests, and forwards everything else untouched. Returns
/// its URL and the counter of failures still to inject.
async fn flaky_proxy(upstream: String) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("http://").to_owned();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let left = Arc::clone(&failures);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (upstream, left) = (upstream.clone(), Arc::clone(&left));
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut reader = BufReader::new(read);
                // One JSON-RPC request per HTTP/1.1 request, several per connection.
                loop {
                    let (mut length, mut line) = (0usize, String::new());
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let header = line.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).await.unwrap();
                    let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let fail = request["method"] == "eth_estimateGas"
                        && left
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                    let (status, answer) = if fail {
                        ("503 Service Unavailable", b"node overloaded".to_vec())
                    } else {
                        let mut up = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                        let head = format!(
                            "POST / HTTP/1.1\r\nhost: {upstream}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        up.write_all(head.as_bytes()).await.unwrap();
                        up.write_all(&body).await.unwrap();
                        let mut response = Vec::new();
                        up.read_to_end(&mut response).await.unwrap();
                        let split = response
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .expect("an HTTP response");
                        ("200 OK", response[split + 4..].to_vec())
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        answer.len()
                    );
                    write.write_all(head.as_bytes()).await.unwrap();
                    write.write_all(&answer).await.unwrap();
                }
            });
        }
    });
    (url, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_while_claiming_is_retried_with_backoff_and_paid_once() {
    use std::sync::atomic::Ordering;
    let Some(world) = World::new(false).await else {
        return;
    };
    let id = world.active_order(10u64.pow(18), 1_000).await;
    let ticks = world.append_ticks(id, 32).await;
    let (proxy, failures) = flaky_proxy(world.devnet.rpc_url().to_owned()).await;
    let market = Marketplace::connect(&proxy, world.sp.address(), Some(world.devnet.signer(1)))
        .await
        .unwrap();
    let settler = Settler::new(
        &SettlerConfig {
            max_attempts: 3,
            ..config()
        },
        market,
        world.ledger.clone(),
    )
    .await
    .unwrap();
    settler.track(id);

    // Two outages, then the third attempt goes through.
    failures.store(2, Ordering::SeqCst);
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 2);
    assert_eq!(settler.metrics().failures_with("outage"), 2);
    let order = world.sp.order(id).await.unwrap();
    assert_eq!(order.paid, charge(&ticks[..16]) + charge(&ticks[16..]));

    // An outage longer than the attempts: the claim is recorded as failed, nothing is paid, and
    // the next round proves and claims the same ticks again, paid exactly once.
    world.append_ticks(id, 16).await;
    failures.store(usize::MAX, Ordering::SeqCst);
    let err = settler.round().await.remove(&id).unwrap().unwrap_err();
    assert!(
        matches!(err, SettlerError::RetriesExhausted { attempts: 3, .. }),
        "{err}"
    );
    assert_eq!(settler.metrics().failures_with("retries_exhausted"), 1);
    assert_eq!(world.sp.order(id).await.unwrap().paid, order.paid);
    failures.store(0, Ordering::SeqCst);
    let report = loop {
        // The order cools down for `backoff_initial_ms` (10 ms here) after the failed round.
        if let Some(report) = settler.round().await.remove(&id) {
            break report.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(report.claimed, 1);
    let statuses: Vec<_> = world
        .ledger
        .claims(id)
        .await
        .unwrap()
        .iter()
        .map(|c| (c.first_seq, c.status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (0, ClaimStatus::Confirmed),
            (16, ClaimStatus::Confirmed),
            (32, ClaimStatus::Failed),
            (32, ClaimStatus::Confirmed)
        ]
    );
    let ticks = world.ledger.ticks(id, 0, 47).await.unwrap();
    assert_eq!(
        world.sp.order(id).await.unwrap().paid,
        charge(&ticks[..16]) + charge(&ticks[16..32]) + charge(&ticks[32..])
    );
}

/// Bytes past the order's allowance are not claimed until the client's tunnel acknowledges
/// them; the acknowledgment, taken over the `shale-ack` exchange and checked against the order's
/// key on chain, then rides along with the claim and the batch is paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_past_the_allowance_wait_for_the_clients_acknowledgment() {
    use shale_contracts::ack::Acknowledgment;
    use shale_contracts::{PrivateKeySigner, B256};
    use shale_gateway::ack_channel::{exchange, AckDesk, AckOutcome};
    use shale_meter::ack::{AckAnswer, AckLine, AckRequest};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    let Some(world) = World::new(false).await else {
        return;
    };
    let key = PrivateKeySigner::random();
    let id = world
        .acknowledged_order(10u64.pow(18), 600, key.address())
        .await;
    world.append_ticks(id, 3).await;
    let settler = world
        .settler(SettlerConfig {
            max_wait_secs: 0,
            ..config()
        })
        .await;
    settler.track(id);
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(
        report.claimed, 0,
        "nothing is paid before an acknowledgment"
    );
    assert_eq!(world.sp.order(id).await.unwrap().paid, U256::ZERO);
    let waiting = |settler: &Settler| {
        settler
            .metrics()
            .unacknowledged_bytes
            .get_or_create(&shale_settler::OrderLabel { order: id })
            .get()
    };
    assert!(waiting(&settler) > 0, "the waiting bytes are exported");

    // The client's side of the exchange, in the test: it signs what it is offered.
    let desk = AckDesk {
        chain_id: world.sp.chain_id().await.unwrap(),
        market: world.sp.clone(),
    };
    let run_client = |signer: PrivateKeySigner| {
        let desk = desk.clone();
        let ledger = world.ledger.clone();
        async move {
            let (client_io, gateway_io) = tokio::io::duplex(1 << 20);
            let (g_read, g_write) = tokio::io::split(gateway_io);
            let gateway =
                tokio::spawn(async move { exchange(&ledger, &desk, id, g_read, g_write).await });
            let (c_read, mut c_write) = tokio::io::split(client_io);
            let mut lines = tokio::io::BufReader::new(c_read).lines();
            let request = serde_json::to_string(&AckRequest::default()).unwrap();
            c_write
                .write_all(format!("{request}\n").as_bytes())
                .await
                .unwrap();
            let offer = loop {
                let line = lines.next_line().await.unwrap().unwrap();
                if let AckLine::Offer(o) = serde_json::from_str(&line).unwrap() {
                    break o;
                }
            };
            let ack = Acknowledgment::new(
                id,
                B256::from(offer.head.0),
                offer.seconds,
                offer.bytes_in,
                offer.bytes_out,
            );
            let sig = ack
                .sign(&signer, offer.chain_id, offer.marketplace.parse().unwrap())
                .unwrap();
            let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
            let answer = serde_json::to_string(&AckAnswer::Signed {
                signature: format!("0x{hex}"),
            })
            .unwrap();
            c_write
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .unwrap();
            let reply: AckLine =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            (gateway.await.unwrap(), reply)
        }
    };

    // Signed by another key: refused, nothing stored.
    let (outcome, reply) = run_client(PrivateKeySigner::random()).await;
    assert!(outcome.is_err(), "{outcome:?}");
    assert!(matches!(reply, AckLine::Error { .. }), "{reply:?}");
    assert_eq!(world.ledger.latest_ack(id).await.unwrap(), None);

    // Signed by the order's key: stored, and the next round is paid with it.
    let (outcome, reply) = run_client(key).await;
    assert!(matches!(outcome, Ok(AckOutcome::Stored(_))), "{outcome:?}");
    assert_eq!(reply, AckLine::Stored);
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 1);
    settler.round().await;
    assert_eq!(
        waiting(&settler),
        0,
        "nothing waits once acknowledged and claimed"
    );
    let order = world.sp.order(id).await.unwrap();
    assert!(order.paid > U256::ZERO);
    assert_eq!(order.acked_bytes, order.claimed_bytes);
}

/// Without an acknowledgment, bytes past the allowance wait `ack_wait_secs` and are then claimed
/// anyway: every second is paid, the bytes only up to the allowance, and the rest is forfeited
/// and counted. An ended order waits the same time from when the settler saw it end, because
/// the tunnel's final acknowledgment comes right after the end; meanwhile it is not settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_bytes_are_forfeited_after_the_wait_and_every_second_is_paid() {
    use shale_contracts::PrivateKeySigner;

    let Some(world) = World::new(false).await else {
        return;
    };
    let key = PrivateKeySigner::random();
    let proved = |ticks: &[Tick]| -> u128 {
        ticks
            .iter()
            .map(|t| u128::from(t.bytes_in) + u128::from(t.bytes_out))
            .sum()
    };
    // Each order's ticks ended two minutes ago: a live tunnel would have acknowledged them.
    let long_ago = shale_meter::ledger::now_ms() - 120_000;
    let settler_with = |ack_wait_secs: u64| {
        world.settler(SettlerConfig {
            max_wait_secs: 0,
            ack_wait_secs,
            settle_delay_secs: 0,
            ..config()
        })
    };

    // A live order.
    let id = world
        .acknowledged_order_with(10u64.pow(18), 600, key.address(), GIB)
        .await;
    let ticks = world.append_ticks_from(id, 3, long_ago).await;
    let patient = settler_with(3_600).await;
    patient.track(id);
    let report = patient.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 0, "within the wait, the bytes wait");
    assert_eq!(world.sp.order(id).await.unwrap().paid, U256::ZERO);

    let settler = settler_with(60).await;
    settler.track(id);
    let report = settler.round().await.remove(&id).unwrap().unwrap();
    assert_eq!(report.claimed, 1, "{report:?}");
    let forfeited = proved(&ticks) - u128::from(GIB);
    assert_eq!(report.forfeited_bytes, forfeited);
    assert_eq!(
        u128::from(settler.metrics().forfeited_bytes.get()),
        forfeited
    );
    let order = world.sp.order(id).await.unwrap();
    assert_eq!(order.claimed_seconds, 15, "every second");
    assert_eq!(
        order.claimed_bytes,
        proved(&ticks),
        "every proved byte is claimed"
    );
    assert_eq!(
        order.paid,
        U256::from(15 * PRICE_PER_SECOND) + U256::from(PRICE_PER_GIB),
        "the seconds in full and exactly the allowance's bytes"
    );

    // An order that has just ended: its ticks are old, but the wait runs from the end.
    let ended = world
        .acknowledged_order_with(10u64.pow(18), 600, key.address(), GIB)
        .await;
    let ticks = world.append_ticks_from(ended, 3, long_ago).await;
    world.client.terminate(ended).await.unwrap();
    let settler = settler_with(2).await;
    settler.track(ended);
    let report = settler.round().await.remove(&ended).unwrap().unwrap();
    assert_eq!(report.claimed, 0, "the final acknowledgment may still come");
    assert!(!report.settled, "not settled while its ticks wait");
    // The wait runs on the settler's clock from when it saw the end (chain time only moves
    // with blocks).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let report = settler.round().await.remove(&ended).unwrap().unwrap();
    assert_eq!(report.claimed, 1, "{report:?}");
    assert!(report.settled, "claimed, then settled");
    let order = world.sp.order(ended).await.unwrap();
    assert!(order.settled);
    assert_eq!(order.claimed_seconds, 15);
    assert_eq!(order.claimed_bytes, proved(&ticks));
    assert_eq!(
        order.paid,
        U256::from(15 * PRICE_PER_SECOND) + U256::from(PRICE_PER_GIB)
    );
}
