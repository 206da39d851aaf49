//! Shared set-up of the integration tests: a real anvil, the marketplace deployed with the
//! test-only verifier, and a registered provider.

#![allow(dead_code)]

use shale_contracts::devnet::Devnet;
use shale_contracts::{
    key_fingerprint, Address, ClaimRequest, Dataset, Marketplace, NewOrder, Offer, U256,
};

pub const CAPACITY: u32 = 16;
pub const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILpbI6zHCqIRA4Rgyh8OHoWol7YJ57KPTCrSIlgfr2xe gateway";

/// One test's world: anvil, the contract, a provider (account 1) and a client (account 2).
pub struct World {
    pub devnet: Devnet,
    pub address: Address,
    pub sp: Marketplace,
    pub client: Marketplace,
    /// Account 3: neither party of any order.
    pub stranger: Marketplace,
    pub reader: Marketplace,
}

impl World {
    pub async fn new() -> World {
        let devnet = Devnet::start().await.expect("anvil starts");
        let address = devnet
            .deploy_marketplace_with_test_verifier(&[CAPACITY])
            .await
            .expect("marketplace deploys");
        let connect = |i: Option<usize>| {
            let url = devnet.rpc_url().to_string();
            let signer = i.map(|i| devnet.signer(i));
            async move {
                Marketplace::connect(&url, address, signer)
                    .await
                    .expect("client connects")
                    .with_poll_interval(std::time::Duration::from_millis(50))
            }
        };
        let sp = connect(Some(1)).await;
        let client = connect(Some(2)).await;
        let stranger = connect(Some(3)).await;
        let reader = connect(None).await;
        World {
            devnet,
            address,
            sp,
            client,
            stranger,
            reader,
        }
    }

    /// A world whose provider is registered with [`offer`] and one dataset.
    pub async fn with_provider() -> World {
        let world = World::new().await;
        world
            .sp
            .register_provider("sp.example:2222", HOST_KEY, &offer(), &[dataset()])
            .await
            .expect("provider registers");
        world
    }

    pub fn sp_address(&self) -> Address {
        self.sp.sender().unwrap()
    }

    pub fn client_address(&self) -> Address {
        self.client.sender().unwrap()
    }

    /// An order on the provider's offer with an odd escrow, so rounding shows.
    pub fn new_order(&self) -> NewOrder {
        NewOrder {
            provider: self.sp_address(),
            key_fingerprint: key_fingerprint(b"client key blob"),
            cpus: 2,
            memory_mib: 2048,
            disk_mib: 10_240,
            gpus: 0,
            dataset: Some("era5".into()),
            image_digest: None,
            image_repository: None,
            price_per_second: U256::from(1_000_003u64),
            price_per_gib: U256::from(7_000_000_001u64),
            max_duration_secs: 3_600,
            escrow: U256::from(10_000_000_007u64),
            collateral: U256::from(1_000_000_001u64),
            accept_timeout_secs: 600,
            ack_signer: None,
            byte_allowance: shale_contracts::DEFAULT_BYTE_ALLOWANCE,
        }
    }

    /// Creates and accepts an order; returns its id.
    pub async fn active_order(&self) -> u64 {
        let id = self.client.create_order(&self.new_order()).await.unwrap();
        self.sp.accept(id).await.unwrap();
        id
    }

    /// A claim the test-only verifier accepts: its proof's first word is keccak256 of the six
    /// public inputs, with the order's key (as the contract computes it) and prevHead the order's
    /// stored head.
    pub async fn claim_request(
        &self,
        order_id: u64,
        next_head: u8,
        seconds: u64,
        bytes_in: u64,
        bytes_out: u64,
    ) -> ClaimRequest {
        let order = self.reader.order(order_id).await.unwrap();
        let mut head = [0u8; 32];
        head[31] = next_head;
        let key = self.reader.order_key(order_id).await.unwrap();
        let input = [
            key,
            U256::from_be_bytes(order.head),
            U256::from_be_bytes(head),
            U256::from(seconds),
            U256::from(bytes_in),
            U256::from(bytes_out),
        ];
        let mut packed = Vec::with_capacity(6 * 32);
        for word in input {
            packed.extend_from_slice(&word.to_be_bytes::<32>());
        }
        let mut proof = vec![0u8; 256];
        proof[..32].copy_from_slice(alloy_keccak(&packed).as_slice());
        ClaimRequest {
            order_id,
            batch_capacity: CAPACITY,
            next_head: head,
            seconds,
            bytes_in,
            bytes_out,
            proof: proof.into(),
            ack: None,
        }
    }
}

fn alloy_keccak(data: &[u8]) -> shale_contracts::B256 {
    shale_contracts::B256::from(alloy::primitives::keccak256(data))
}

pub fn offer() -> Offer {
    Offer {
        cpus: 8,
        memory_mib: 32_768,
        disk_mib: 20_480,
        max_disk_mib: 102_400,
        gpu_model: "NVIDIA L4".into(),
        gpu_count: 1,
        price_per_second: U256::from(1_000_003u64),
        price_per_gib: U256::from(7_000_000_001u64),
    }
}

pub fn dataset() -> Dataset {
    Dataset {
        id: "era5".into(),
        piece_cid: Some("baga6ea4seaqao7s73y24kcutaosvacpdjgfe5pw76ooefnyqw4ynr3d2y6x2mpq".into()),
        // No deal: a deal is checked against Filecoin's market actor, which anvil lacks
        // (tests/deals.rs installs a double of it).
        deal_id: None,
        size_bytes: 34_359_738_368,
        description: "ERA5 reanalysis, 2020, hourly".into(),
        verified_at: None,
    }
}
