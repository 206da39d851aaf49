//! The marketplace against a real anvil: registry, the order lifecycle, money, events, errors.

mod common;

use std::time::Duration;

use common::{dataset, offer, World, HOST_KEY};
use futures::StreamExt;
use shale_contracts::{ChainError, MarketEvent, OrderState, U256};

#[tokio::test]
async fn registered_provider_reads_back_with_datasets() {
    let world = World::with_provider().await;
    let provider = world.reader.provider(world.sp_address()).await.unwrap();
    assert_eq!(provider.address, world.sp_address());
    assert_eq!(provider.endpoint, "sp.example:2222");
    assert_eq!(provider.ssh_host_key, HOST_KEY);
    assert_eq!(provider.offer, offer());
    assert!(provider.active);
    assert_eq!(provider.datasets, vec![dataset()]);
    assert_eq!(provider.rating.count, 0);

    let all = world.reader.providers().await.unwrap();
    assert_eq!(all, vec![provider]);
}

#[tokio::test]
async fn order_is_created_accepted_and_terminated() {
    let world = World::with_provider().await;
    let request = world.new_order();
    let id = world.client.create_order(&request).await.unwrap();
    assert_eq!(id, 1);

    let order = world.reader.order(id).await.unwrap();
    assert_eq!(order.state, OrderState::Pending);
    assert_eq!(order.client, world.client_address());
    assert_eq!(order.provider, world.sp_address());
    assert_eq!(order.key_fingerprint, request.key_fingerprint);
    assert_eq!(order.dataset.as_deref(), Some("era5"));
    assert_eq!(order.disk_mib, 10_240);
    assert_eq!(order.escrow, request.escrow);
    assert_eq!(order.collateral, request.collateral);
    assert_eq!(order.accepted_at, None);
    assert_eq!(order.expires_at(), None);

    world.sp.accept(id).await.unwrap();
    let order = world.reader.order(id).await.unwrap();
    assert_eq!(order.state, OrderState::Active);
    let accepted_at = order.accepted_at.expect("accepted");
    assert_eq!(order.expires_at(), Some(accepted_at + 3_600));
    let now = world.reader.chain_time().await.unwrap();
    assert!(order.is_live_at(now));

    world.client.terminate(id).await.unwrap();
    let order = world.reader.order(id).await.unwrap();
    assert_eq!(order.state, OrderState::Ended);
    assert_eq!(order.ended_by, Some(world.client_address()));
    assert!(!order.is_live_at(now));
}

#[tokio::test]
async fn unknown_order_is_its_own_error() {
    let world = World::new().await;
    let err = world.reader.order(42).await.unwrap_err();
    assert!(matches!(err, ChainError::OrderNotFound(42)), "{err:?}");
    assert_eq!(err.to_string(), "order 42 does not exist");
}

#[tokio::test]
async fn revert_reason_is_decoded_into_words() {
    let world = World::with_provider().await;
    let id = world.client.create_order(&world.new_order()).await.unwrap();
    let err = world.client.terminate(id).await.unwrap_err();
    assert!(matches!(err, ChainError::Reverted { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("the marketplace refused: order {id} is not active (it is pending)")
    );

    let err = world.stranger.accept(id).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the marketplace refused: {} is not the provider of order {id}",
            world.stranger.sender().unwrap()
        )
    );
}

#[tokio::test]
async fn disk_outside_the_offer_is_refused_in_words() {
    let world = World::with_provider().await;
    let mut request = world.new_order();
    request.disk_mib = 0;
    let err = world.client.create_order(&request).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the marketplace refused: a disk of 0 MiB is too small: an order needs at least 32 MiB"
    );
    request.disk_mib = offer().max_disk_mib + 1;
    let err = world.client.create_order(&request).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the marketplace refused: a disk of 102401 MiB is more than the 102400 MiB the provider \
         offers per order"
    );
    request.disk_mib = offer().max_disk_mib;
    let id = world.client.create_order(&request).await.unwrap();
    assert_eq!(world.reader.order(id).await.unwrap().disk_mib, 102_400);

    let mut bad = offer();
    bad.disk_mib = bad.max_disk_mib + 1;
    let err = world
        .sp
        .update_provider("sp.example:2222", HOST_KEY, &bad)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the marketplace refused: an offer's disk must be at least 32 MiB and at most its \
         maximum per order, not 102401 MiB with a maximum of 102400 MiB"
    );
}

#[tokio::test]
async fn unreachable_rpc_is_an_outage() {
    let world = World::new().await;
    let url = world.devnet.rpc_url().to_string();
    let address = world.address;
    drop(world);
    let err = shale_contracts::Marketplace::connect(&url, address, None)
        .await
        .unwrap_err();
    assert!(err.is_outage(), "{err:?}");
}

#[tokio::test]
async fn read_only_client_refuses_to_send() {
    let world = World::with_provider().await;
    let err = world
        .reader
        .create_order(&world.new_order())
        .await
        .unwrap_err();
    assert!(matches!(err, ChainError::ReadOnly), "{err:?}");
}

#[tokio::test]
async fn watch_streams_the_lifecycle_events_in_order() {
    let world = World::new().await;
    let mut events = world.reader.watch().await.unwrap();
    world
        .sp
        .register_provider("sp.example:2222", HOST_KEY, &offer(), &[dataset()])
        .await
        .unwrap();
    let id = world.active_order().await;
    world.client.top_up(id, U256::from(5u64)).await.unwrap();
    world.sp.terminate(id).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 6 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("events arrive")
            .expect("stream never ends")
            .expect("no outage");
        seen.push(event);
    }
    let sp = world.sp_address();
    assert_eq!(
        seen[0],
        MarketEvent::ProviderRegistered {
            provider: sp,
            endpoint: "sp.example:2222".into(),
            ssh_host_key: HOST_KEY.into()
        }
    );
    assert_eq!(
        seen[1],
        MarketEvent::DatasetAdded {
            provider: sp,
            dataset_id: "era5".into()
        }
    );
    let request = world.new_order();
    assert_eq!(
        seen[2],
        MarketEvent::OrderCreated {
            order_id: id,
            client: world.client_address(),
            provider: sp,
            escrow: request.escrow,
            collateral: request.collateral,
            dataset: Some("era5".into()),
        }
    );
    assert!(matches!(seen[3], MarketEvent::OrderAccepted { order_id, .. } if order_id == id));
    assert_eq!(
        seen[4],
        MarketEvent::OrderToppedUp {
            order_id: id,
            amount: U256::from(5u64),
            escrow: request.escrow + U256::from(5u64)
        }
    );
    assert!(
        matches!(seen[5], MarketEvent::OrderTerminated { order_id, by, .. } if order_id == id && by == sp)
    );
}

#[tokio::test]
async fn a_refused_call_does_not_stall_the_next_transaction() {
    let world = World::with_provider().await;
    let id = world.client.create_order(&world.new_order()).await.unwrap();
    // Refused in gas estimation: nothing is sent, so no nonce may be used up.
    world.client.terminate(id).await.unwrap_err();
    let next = tokio::time::timeout(
        Duration::from_secs(60),
        world.client.top_up(id, U256::from(1u8)),
    )
    .await
    .expect("the next transaction is mined, not stuck behind a nonce gap");
    next.unwrap();
}

#[tokio::test]
async fn concurrent_sends_from_one_signer_all_land() {
    let world = World::with_provider().await;
    let id = world.client.create_order(&world.new_order()).await.unwrap();
    let sends = (1..=5u64).map(|amount| {
        let client = world.client.clone();
        async move { client.top_up(id, U256::from(amount)).await }
    });
    for result in futures::future::join_all(sends).await {
        result.unwrap();
    }
    let order = world.reader.order(id).await.unwrap();
    assert_eq!(order.escrow, world.new_order().escrow + U256::from(15u64));
}

#[tokio::test]
async fn provider_updates_datasets_and_withdrawal_are_visible() {
    let world = World::with_provider().await;
    let mut changed = offer();
    changed.price_per_second = U256::from(9u8);
    world
        .sp
        .update_provider("new.example:22", HOST_KEY, &changed)
        .await
        .unwrap();
    let mut second = dataset();
    second.id = "cmip6".into();
    second.piece_cid = None;
    second.deal_id = None;
    world.sp.add_dataset(&second).await.unwrap();
    world.sp.remove_dataset("era5").await.unwrap();

    let provider = world.reader.provider(world.sp_address()).await.unwrap();
    assert_eq!(provider.endpoint, "new.example:22");
    assert_eq!(provider.offer, changed);
    assert_eq!(provider.datasets, vec![second]);

    world.sp.withdraw_provider().await.unwrap();
    assert!(!world.reader.providers().await.unwrap()[0].active);
    let err = world
        .client
        .create_order(&world.new_order())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has withdrawn its offer"), "{err}");
    let err = world
        .reader
        .provider(world.client_address())
        .await
        .unwrap_err();
    assert!(matches!(err, ChainError::ProviderNotFound(_)), "{err:?}");
}

#[tokio::test]
async fn watch_decodes_claims_settlements_ratings_and_cancellations() {
    let world = World::with_provider().await;
    let mut events = world.reader.watch().await.unwrap();
    let id = world.active_order().await;
    world.devnet.advance_time(20).await.unwrap();
    let claim = world.claim_request(id, 7, 10, 100, 200).await;
    let paid = world.sp.claim(&claim).await.unwrap();
    world.client.terminate(id).await.unwrap();
    world.sp.settle(id).await.unwrap();
    world.client.rate(id, 5, "fine").await.unwrap();
    let pending = world.client.create_order(&world.new_order()).await.unwrap();
    world.sp.cancel(pending).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 8 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("events arrive")
            .expect("stream never ends")
            .expect("no outage");
        seen.push(event);
    }
    assert_eq!(
        seen[2],
        MarketEvent::Claimed {
            order_id: id,
            head: claim.next_head,
            seconds: 10,
            bytes_in: 100,
            bytes_out: 200,
            amount: paid.amount,
            escrow_left: paid.escrow_left,
        }
    );
    assert!(matches!(seen[3], MarketEvent::OrderTerminated { .. }));
    let order = world.reader.order(id).await.unwrap();
    assert_eq!(
        seen[4],
        MarketEvent::OrderSettled {
            order_id: id,
            refund: paid.escrow_left,
            collateral_returned: order.collateral,
            collateral_slashed: U256::ZERO,
        }
    );
    assert_eq!(
        seen[5],
        MarketEvent::Rated {
            order_id: id,
            provider: world.sp_address(),
            stars: 5,
            review: "fine".into()
        }
    );
    assert!(matches!(seen[6], MarketEvent::OrderCreated { order_id, .. } if order_id == pending));
    assert_eq!(
        seen[7],
        MarketEvent::OrderCancelled {
            order_id: pending,
            by: world.sp_address(),
            refund: world.new_order().escrow
        }
    );
    assert_eq!(seen[7].order_id(), Some(pending));
}

#[tokio::test]
async fn watch_reports_an_outage_and_keeps_going() {
    let world = World::new().await;
    let mut events = world.reader.watch().await.unwrap();
    let World { devnet, .. } = world;
    drop(devnet);
    let item = tokio::time::timeout(Duration::from_secs(60), events.next())
        .await
        .expect("the watcher reports")
        .expect("stream never ends");
    let err = item.unwrap_err();
    assert!(err.is_outage(), "{err:?}");
    // Still polling: the next item is another report, not the end of the stream.
    let again = tokio::time::timeout(Duration::from_secs(60), events.next())
        .await
        .expect("the watcher keeps reporting");
    assert!(matches!(again, Some(Err(_))));
}

#[tokio::test]
async fn declined_order_refunds_the_client_and_tells_why() {
    let world = World::with_provider().await;
    let request = world.new_order();
    let declined = world.client.create_order(&request).await.unwrap();
    let cancelled = world.client.create_order(&request).await.unwrap();
    let accepted = world.client.create_order(&request).await.unwrap();
    let before = world
        .reader
        .balance_of(world.client_address())
        .await
        .unwrap();

    let reason = "no GPU free until Friday";
    world.sp.decline(declined, reason).await.unwrap();
    let order = world.reader.order(declined).await.unwrap();
    assert_eq!(order.state, OrderState::Cancelled);
    assert_eq!(order.ended_by, Some(world.sp_address()));
    assert_eq!(order.escrow, U256::ZERO);
    assert_eq!(
        world
            .reader
            .balance_of(world.client_address())
            .await
            .unwrap(),
        before + request.escrow,
        "the whole escrow is back"
    );
    assert_eq!(
        world
            .reader
            .decline_reason(declined)
            .await
            .unwrap()
            .as_deref(),
        Some(reason)
    );

    // A provider's plain cancel and a live order have no reason; neither has a client's refusal.
    world.sp.cancel(cancelled).await.unwrap();
    world.sp.accept(accepted).await.unwrap();
    assert_eq!(world.reader.decline_reason(cancelled).await.unwrap(), None);
    assert_eq!(world.reader.decline_reason(accepted).await.unwrap(), None);

    let err = world.client.decline(accepted, "mine").await.unwrap_err();
    assert!(matches!(err, ChainError::Reverted { .. }), "{err:?}");
    let err = world.sp.decline(accepted, "late").await.unwrap_err();
    assert!(
        err.to_string().contains("not pending"),
        "an accepted order cannot be declined: {err}"
    );
    let too_long = "x".repeat(shale_contracts::Marketplace::MAX_DECLINE_REASON + 1);
    let err = world.sp.decline(accepted, &too_long).await.unwrap_err();
    assert!(matches!(err, ChainError::InvalidInput(_)), "{err:?}");
}
