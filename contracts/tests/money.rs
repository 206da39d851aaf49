//! Money against a real anvil: claims, top-ups, cancellation, settlement and ratings, with every
//! balance accounted for down to the gas fees.

mod common;

use common::World;
use shale_contracts::{ChainError, OrderState, TxReceipt, U256};

/// Seconds in the contract's claim window (`CLAIM_WINDOW`).
const CLAIM_WINDOW: u64 = 86_400;

async fn balances(world: &World) -> (U256, U256, U256) {
    let r = &world.reader;
    (
        r.balance_of(world.client_address()).await.unwrap(),
        r.balance_of(world.sp_address()).await.unwrap(),
        r.balance_of(world.address).await.unwrap(),
    )
}

fn fees(receipts: &[TxReceipt]) -> U256 {
    receipts.iter().map(|r| r.fee).sum()
}

#[tokio::test]
async fn full_lease_conserves_every_wei() {
    let world = World::with_provider().await;
    let (client0, sp0, contract0) = balances(&world).await;
    assert_eq!(contract0, U256::ZERO);

    let request = world.new_order();
    let (id, created) = world.client.create_order_tx(&request).await.unwrap();
    let accepted = world.sp.accept(id).await.unwrap();
    let topped = world.client.top_up(id, U256::from(13u64)).await.unwrap();
    world.devnet.advance_time(100).await.unwrap();

    let claim = world.claim_request(id, 1, 90, 1 << 20, 3 << 20).await;
    let expected = world.reader.quote(id, 90, 1 << 20, 3 << 20).await.unwrap();
    let paid = world.sp.claim(&claim).await.unwrap();
    assert_eq!(paid.amount, expected);
    assert!(paid.gas_used > 21_000, "a claim costs real gas");
    assert_eq!(
        paid.escrow_left,
        request.escrow + U256::from(13u64) - expected
    );

    let terminated = world.client.terminate(id).await.unwrap();
    let settled = world.sp.settle(id).await.unwrap();

    let order = world.reader.order(id).await.unwrap();
    assert_eq!(order.state, OrderState::Ended);
    assert!(order.settled);
    assert_eq!(order.escrow, U256::ZERO);
    assert_eq!(order.paid, expected);
    assert_eq!(order.claimed_seconds, 90);
    assert_eq!(order.claimed_bytes, 4 << 20);
    assert_eq!(order.head, claim.next_head);

    let (client1, sp1, contract1) = balances(&world).await;
    assert_eq!(contract1, U256::ZERO, "nothing stays in the contract");
    let client_fees = fees(&[created, topped, terminated]);
    let sp_fees = fees(&[accepted, paid.tx, settled]);
    assert_eq!(
        client1,
        client0 - expected - client_fees,
        "client paid the claim and gas"
    );
    assert_eq!(
        sp1,
        sp0 + expected - sp_fees,
        "provider got the claim, collateral back, paid gas"
    );
    assert_eq!(
        client0 + sp0,
        client1 + sp1 + client_fees + sp_fees,
        "sum before == sum after plus gas"
    );
}

#[tokio::test]
async fn provider_terminating_early_is_slashed_on_settlement() {
    let world = World::with_provider().await;
    let id = world.active_order().await;
    world.devnet.advance_time(599).await.unwrap();
    world.sp.terminate(id).await.unwrap();
    let order = world.reader.order(id).await.unwrap();
    let unserved = order.expires_at().unwrap() - order.ended_at.unwrap();
    let (client0, _, _) = balances(&world).await;
    world.sp.settle(id).await.unwrap();
    let (client1, _, contract) = balances(&world).await;
    // ceil(collateral * unserved / max_duration), paid to the client with the escrow.
    let num = order.collateral * U256::from(unserved);
    let max = U256::from(order.max_duration_secs);
    let slash = num / max + U256::from(u8::from(!(num % max).is_zero()));
    assert_eq!(client1, client0 + order.escrow + slash);
    assert_eq!(contract, U256::ZERO);
}

#[tokio::test]
async fn client_cancels_an_unaccepted_order_after_the_timeout_with_a_full_refund() {
    let world = World::with_provider().await;
    let (client0, _, _) = balances(&world).await;
    let (id, created) = world
        .client
        .create_order_tx(&world.new_order())
        .await
        .unwrap();

    let err = world.client.cancel(id).await.unwrap_err();
    assert!(
        err.to_string().contains("may be cancelled from unix time"),
        "{err}"
    );
    world.devnet.advance_time(600).await.unwrap();
    let cancelled = world.client.cancel(id).await.unwrap();
    assert_eq!(
        world.reader.order(id).await.unwrap().state,
        OrderState::Cancelled
    );
    let (client1, _, contract) = balances(&world).await;
    assert_eq!(
        client1,
        client0 - created.fee - cancelled.fee,
        "only gas was spent"
    );
    assert_eq!(contract, U256::ZERO);
}

#[tokio::test]
async fn claims_are_refused_with_reasons() {
    let world = World::with_provider().await;
    let id = world.active_order().await;
    world.devnet.advance_time(10).await.unwrap();

    // More seconds than the lease has run.
    let claim = world.claim_request(id, 1, 1_000, 0, 0).await;
    let err = world.sp.claim(&claim).await.unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "the claim for order {id} would bring claimed time to 1000 s"
        )),
        "{err}"
    );

    // The same commitment twice.
    let claim = world.claim_request(id, 1, 5, 0, 0).await;
    world.sp.claim(&claim).await.unwrap();
    let err = world.sp.claim(&claim).await.unwrap_err();
    assert!(err.to_string().contains("was already paid"), "{err}");

    // A proof that does not match the totals.
    let mut forged = world.claim_request(id, 2, 1, 0, 0).await;
    forged.seconds = 2;
    let err = world.sp.claim(&forged).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the marketplace refused: the proof of the claim for order {id} does not verify")
    );

    // Only the provider claims.
    let claim = world.claim_request(id, 2, 1, 0, 0).await;
    let err = world.client.claim(&claim).await.unwrap_err();
    assert!(
        err.to_string().contains("is not the provider of order"),
        "{err}"
    );
}

#[tokio::test]
async fn client_rates_an_ended_order_once() {
    let world = World::with_provider().await;
    let first = world.active_order().await;
    let second = world.active_order().await;
    // Only an order that paid its provider may rate it: each pays for 10 seconds.
    world.devnet.advance_time(30).await.unwrap();
    for id in [first, second] {
        let claim = world.claim_request(id, 9, 10, 0, 0).await;
        world.sp.claim(&claim).await.unwrap();
    }
    let unpaid = world.active_order().await;
    world.client.terminate(unpaid).await.unwrap();
    let err = world.client.rate(unpaid, 5, "").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the marketplace refused: order {unpaid} paid its provider nothing, so it cannot be rated")
    );
    world.client.terminate(first).await.unwrap();
    world.sp.terminate(second).await.unwrap();

    let err = world.client.rate(first, 6, "").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the marketplace refused: a rating is 1 to 5 stars, not 6"
    );
    world.client.rate(first, 5, "quick").await.unwrap();
    world.client.rate(second, 4, "").await.unwrap();
    let err = world.client.rate(first, 1, "again").await.unwrap_err();
    assert!(matches!(err, ChainError::Reverted { .. }), "{err:?}");

    let provider = world.reader.provider(world.sp_address()).await.unwrap();
    assert_eq!(provider.rating.count, 2);
    // Both paid the same, so the weighted average is the plain one.
    assert_eq!(provider.rating.average_centistars(), Some(450));
}

#[tokio::test]
async fn expired_order_reads_as_ended_and_cannot_be_topped_up() {
    let world = World::with_provider().await;
    let id = world.active_order().await;
    let order = world.reader.order(id).await.unwrap();
    world
        .devnet
        .advance_time(order.max_duration_secs)
        .await
        .unwrap();
    let order = world.reader.order(id).await.unwrap();
    assert_eq!(order.state, OrderState::Ended);
    assert_eq!(order.ended_at, order.expires_at());
    assert!(!order.is_live_at(world.reader.chain_time().await.unwrap()));
    let err = world.client.top_up(id, U256::from(1u8)).await.unwrap_err();
    assert!(
        err.to_string().contains("is not active (it is ended)"),
        "{err}"
    );

    // After the claim window anyone may settle; the client gets the untouched escrow back.
    world.devnet.advance_time(CLAIM_WINDOW).await.unwrap();
    world.stranger.settle(id).await.unwrap();
    assert!(world.reader.order(id).await.unwrap().settled);
}
