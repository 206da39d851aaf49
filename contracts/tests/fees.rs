//! The fee policy on a real node: the headroom lands on the sent transaction's gas limit and
//! fee cap, and a transaction with it goes through.

mod common;

use alloy::consensus::Transaction as _;
use alloy::providers::{Provider, ProviderBuilder};
use common::{dataset, offer, World, HOST_KEY};
use shale_contracts::{FeePolicy, Marketplace};

/// Registers account `signer` with `fees` and returns (gas limit, gas used, max fee per gas).
async fn register_with(world: &World, signer: usize, fees: FeePolicy) -> (u64, u64, u128) {
    let sp = Marketplace::connect_with_fees(
        world.devnet.rpc_url(),
        world.address,
        Some(world.devnet.signer(signer)),
        fees,
    )
    .await
    .unwrap();
    let receipt = sp
        .register_provider("sp.example:2222", HOST_KEY, &offer(), &[dataset()])
        .await
        .unwrap();
    let node = ProviderBuilder::new().connect_http(world.devnet.rpc_url().parse().unwrap());
    let tx = node
        .get_transaction_by_hash(receipt.tx_hash)
        .await
        .unwrap()
        .expect("the transaction is on chain");
    (tx.gas_limit(), receipt.gas_used, tx.max_fee_per_gas())
}

#[tokio::test]
async fn headroom_is_added_to_the_estimates_and_the_transaction_goes_through() {
    let world = World::new().await;
    let (default_limit, default_used, default_fee) =
        register_with(&world, 4, FeePolicy::default()).await;
    let generous = FeePolicy {
        gas_headroom_percent: 60,
        fee_headroom_percent: 200,
    };
    let (limit, used, fee) = register_with(&world, 5, generous).await;
    // Anvil's estimate is what the call used, give or take refunds.
    let ratio = |limit: u64, used: u64| limit as f64 / used as f64;
    assert!(
        (1.24..1.35).contains(&ratio(default_limit, default_used)),
        "{default_limit} for {default_used}"
    );
    assert!(
        (1.59..1.7).contains(&ratio(limit, used)),
        "{limit} for {used}"
    );
    // The fee caps: 3× against 1.25× the same estimator's figure (the base fee moves a little
    // between the two blocks).
    let fee_ratio = fee as f64 / default_fee as f64;
    assert!(
        (2.0..3.0).contains(&fee_ratio),
        "{fee} against {default_fee}"
    );
}
