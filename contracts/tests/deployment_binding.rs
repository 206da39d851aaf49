//! A proof is valid on one deployment only: two marketplaces on one anvil, behind the same REAL
//! Groth16 verifier (seeded keys from `shale-circuits`, compiled with the pinned solc-js), each
//! with an order of the same id and the same ticks. The proof made for one marketplace is refused
//! by the other, which pays only the proof of its own order key.

use std::time::Duration;

use shale_circuits::{setup_from_seed, Deployment, Head, TickBatch, TickFields};
use shale_contracts::bindings::Marketplace::MarketplaceErrors as E;
use shale_contracts::devnet::{self, Devnet};
use shale_contracts::{
    key_fingerprint, Address, Bytes, ChainError, ClaimRequest, Marketplace, NewOrder, Offer, U256,
};

const CAPACITY: u32 = 2;
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILpbI6zHCqIRA4Rgyh8OHoWol7YJ57KPTCrSIlgfr2xe gateway";

/// The provider's and the client's connections to one marketplace.
struct Market {
    sp: Marketplace,
    client: Marketplace,
}

impl Market {
    async fn deploy(devnet: &Devnet, verifier: Address) -> Market {
        let address = devnet
            .deploy_marketplace(&[CAPACITY], &[verifier])
            .await
            .expect("marketplace deploys");
        let connect = |i: usize| async move {
            devnet
                .marketplace_as(address, i)
                .await
                .unwrap()
                .with_poll_interval(Duration::from_millis(50))
        };
        let (sp, client) = (connect(1).await, connect(2).await);
        let offer = Offer {
            cpus: 1,
            memory_mib: 512,
            disk_mib: 1024,
            max_disk_mib: 1024,
            gpu_model: String::new(),
            gpu_count: 0,
            price_per_second: U256::from(1_000u64),
            price_per_gib: U256::from(3_000_000_007u64),
        };
        sp.register_provider("sp.example:2222", HOST_KEY, &offer, &[])
            .await
            .unwrap();
        Market { sp, client }
    }

    /// Creates and accepts an order; returns its id.
    async fn active_order(&self) -> u64 {
        let provider = self.sp.provider(self.sp.sender().unwrap()).await.unwrap();
        let new = NewOrder::for_offer(
            &provider,
            key_fingerprint(b"client key"),
            U256::from(10u64.pow(18)),
            36_000,
        );
        let id = self.client.create_order(&new).await.unwrap();
        self.sp.accept(id).await.unwrap();
        id
    }

    async fn deployment(&self) -> Deployment {
        Deployment::new(self.sp.chain_id().await.unwrap(), self.sp.address().0 .0)
    }
}

fn ticks(order: u64) -> Vec<TickFields> {
    (0..2)
        .map(|seq| TickFields {
            order,
            seq,
            seconds: 5,
            bytes_in: 1_000 + seq,
            bytes_out: 2_000 + seq,
        })
        .collect()
}

fn request(batch: &TickBatch, proof: &[u8]) -> ClaimRequest {
    let inputs = batch.inputs();
    ClaimRequest {
        order_id: batch.order(),
        batch_capacity: CAPACITY,
        next_head: inputs.next.0,
        seconds: inputs.seconds as u64,
        bytes_in: inputs.bytes_in as u64,
        bytes_out: inputs.bytes_out as u64,
        proof: Bytes::from(proof.to_vec()),
        ack: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_for_one_marketplace_is_refused_by_another_with_the_same_order_id() {
    let (pk, vk) = tokio::task::spawn_blocking(|| setup_from_seed(CAPACITY as usize, 2027))
        .await
        .unwrap()
        .unwrap();
    let code = tokio::task::spawn_blocking(move || shale_circuits::solc::compile_verifier(&vk))
        .await
        .unwrap()
        .expect("verifier compiles (needs scripts/setup.sh)");
    let devnet = Devnet::start().await.expect("anvil starts");
    let verifier = devnet::deploy_bytecode(devnet.rpc_url(), devnet.signer(0), Bytes::from(code))
        .await
        .unwrap();
    let x = Market::deploy(&devnet, verifier).await;
    let y = Market::deploy(&devnet, verifier).await;
    let (id_x, id_y) = (x.active_order().await, y.active_order().await);
    assert_eq!(
        id_x, id_y,
        "both marketplaces number their first order alike"
    );
    let id = id_x;
    devnet.advance_time(100).await.unwrap();

    let (on_x, on_y) = (x.deployment().await, y.deployment().await);
    assert_ne!(on_x, on_y);
    // The contract's key is the one the circuits crate computes.
    for (market, deployment) in [(&x, on_x), (&y, on_y)] {
        let key = market.sp.order_key(id).await.unwrap();
        assert_eq!(
            key.to_be_bytes::<32>(),
            deployment.order_key(id).to_word(),
            "{deployment}"
        );
    }

    let prove = |batch: &TickBatch| pk.prove_with_os_rng(batch).unwrap().to_bytes().to_vec();
    let batch_x = TickBatch::new(on_x.order_key(id), Head::GENESIS, None, ticks(id)).unwrap();
    let batch_y = TickBatch::new(on_y.order_key(id), Head::GENESIS, None, ticks(id)).unwrap();
    assert_ne!(
        batch_x.next(),
        batch_y.next(),
        "the same ticks chain to different heads on different deployments"
    );
    let (proof_x, proof_y) = (prove(&batch_x), prove(&batch_y));

    // X's claim, proof and head as they are, sent to Y.
    match y.sp.claim(&request(&batch_x, &proof_x)).await {
        Ok(receipt) => panic!("marketplace Y paid marketplace X's proof: {receipt:?}"),
        Err(e @ ChainError::Reverted { .. }) => match e.contract_error() {
            Some(E::InvalidProof(err)) => assert_eq!(err.orderId, U256::from(id)),
            other => panic!("expected InvalidProof, got {other:?}: {e}"),
        },
        Err(e) => panic!("expected a refusal, got {e}"),
    }
    assert!(Head(y.sp.order(id).await.unwrap().head).is_genesis());

    // Each marketplace pays the proof of its own order key.
    x.sp.claim(&request(&batch_x, &proof_x)).await.unwrap();
    y.sp.claim(&request(&batch_y, &proof_y)).await.unwrap();
    assert_eq!(x.sp.order(id).await.unwrap().head, batch_x.next().0);
    assert_eq!(y.sp.order(id).await.unwrap().head, batch_y.next().0);
}
