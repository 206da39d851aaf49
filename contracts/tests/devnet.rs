//! The devnet harness itself: it starts a real anvil, exposes funded signers, and cleans up.

use std::net::TcpStream;

use shale_contracts::devnet::{Devnet, DevnetError, DevnetOptions};
use shale_contracts::Marketplace;

#[tokio::test]
async fn devnet_listens_with_funded_dev_accounts_and_stops_on_drop() {
    let devnet = Devnet::start_with(DevnetOptions {
        accounts: 3,
        ..DevnetOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(devnet.signers().len(), 3);
    // anvil's first well-known dev account.
    assert_eq!(
        format!("{:#x}", devnet.signer(0).address()),
        "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
    );
    let address = devnet
        .deploy_marketplace_with_test_verifier(&[4, 16])
        .await
        .unwrap();
    let market = Marketplace::connect(devnet.rpc_url(), address, None)
        .await
        .unwrap();
    assert_eq!(market.batch_capacities().await.unwrap(), vec![4, 16]);
    let balance = market.balance_of(devnet.signer(2).address()).await.unwrap();
    assert_eq!(
        balance,
        shale_contracts::U256::from(10_000u64)
            * shale_contracts::U256::from(10u64).pow(shale_contracts::U256::from(18u64))
    );

    let port = devnet.port();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(devnet);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "anvil must be gone once the devnet is dropped"
    );
}

#[tokio::test]
async fn two_devnets_run_side_by_side_on_their_own_ports() {
    let (a, b) = tokio::join!(Devnet::start(), Devnet::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
}

#[tokio::test]
async fn a_binary_that_is_not_anvil_is_reported_with_its_output() {
    let err = Devnet::start_with(DevnetOptions {
        anvil: Some("/bin/true".into()),
        ..DevnetOptions::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, DevnetError::Exited(_)), "{err:?}");

    let err = Devnet::start_with(DevnetOptions {
        anvil: Some("/nonexistent/anvil".into()),
        ..DevnetOptions::default()
    })
    .await
    .unwrap_err();
    assert!(matches!(err, DevnetError::Spawn { .. }), "{err:?}");
}

#[tokio::test]
async fn deploy_refuses_mismatched_verifier_lists() {
    let devnet = Devnet::start().await.unwrap();
    let err = devnet.deploy_marketplace(&[4, 16], &[]).await.unwrap_err();
    assert_eq!(err.to_string(), "2 batch capacities but 0 verifiers");
}
