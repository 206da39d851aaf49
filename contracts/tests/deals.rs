//! Datasets that name a Filecoin deal, through the typed client against a real anvil on which
//! the `call_actor_id` precompile and the market and miner actors are doubles
//! (`shale_contracts::filecoin_double`): the right deal is accepted and fills in its piece, a deal
//! of another piece or another miner is refused in words, and a chain without Filecoin refuses
//! every deal. Also the on-chain "last verified" time of a dataset.

mod common;

use common::{dataset, World};
use futures::StreamExt;
use shale_contracts::filecoin_double::FilecoinDouble;
use shale_contracts::{Dataset, MarketEvent};

const MINER: u64 = 1234;
const DEAL: u64 = 7_654_321;
const PADDED: u64 = 34_359_738_368;
const PIECE: &str = "baga6ea4seaqao7s73y24kcutaosvacpdjgfe5pw76ooefnyqw4ynr3d2y6x2mpq";

/// `PIECE` as a binary CID, and another piece (its last digest byte changed).
fn piece_bytes(last: u8) -> Vec<u8> {
    let mut b =
        hex_bytes("0181e203922020077e5fde35c50a9303a55009e3498a4ebedff39c42b710b730d8ec7ac7afa63e");
    *b.last_mut().unwrap() = last;
    b
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Why the registry refused to list `dataset`, in words.
async fn refusal(world: &World, dataset: &Dataset) -> String {
    world
        .sp
        .add_dataset(dataset)
        .await
        .expect_err("the registry refuses the dataset")
        .to_string()
}

fn deal_dataset(id: &str, piece: Option<&str>, deal: u64) -> Dataset {
    Dataset {
        id: id.into(),
        piece_cid: piece.map(str::to_string),
        deal_id: Some(deal),
        ..dataset()
    }
}

#[tokio::test]
async fn deals_are_checked_against_the_market_actor() {
    let world = World::with_provider().await;
    let sp = world.sp_address();
    let filecoin = FilecoinDouble::install(&world.devnet).await.unwrap();
    filecoin.add_miner(MINER, sp).await.unwrap();
    filecoin
        .add_deal(DEAL, &piece_bytes(0x3e), PADDED, MINER)
        .await
        .unwrap();
    filecoin
        .add_deal(DEAL + 1, &piece_bytes(0x3f), PADDED, MINER)
        .await
        .unwrap();
    filecoin
        .add_deal(DEAL + 2, &piece_bytes(0x3e), PADDED, 5678)
        .await
        .unwrap();
    let mut events = world.reader.watch().await.unwrap();

    // Without a miner a deal has nothing to be checked against.
    let err = refusal(&world, &deal_dataset("a", Some(PIECE), DEAL)).await;
    assert!(err.contains("has set no Filecoin miner"), "{err}");

    // A stranger's address does not control the miner.
    let err = world.stranger.set_miner(MINER).await.unwrap_err();
    assert!(
        err.to_string().contains("no provider is registered"),
        "{err}"
    );
    world.sp.set_miner(MINER).await.unwrap();
    assert_eq!(
        world.reader.provider(sp).await.unwrap().miner_id,
        Some(MINER)
    );

    // The right deal; then a deal alone, whose piece the registry fills in.
    world
        .sp
        .add_dataset(&deal_dataset("a", Some(PIECE), DEAL))
        .await
        .unwrap();
    world
        .sp
        .add_dataset(&deal_dataset("b", None, DEAL))
        .await
        .unwrap();
    let listed = world.reader.provider(sp).await.unwrap().datasets;
    let b = listed.iter().find(|d| d.id == "b").unwrap();
    assert_eq!(b.piece_cid.as_deref(), Some(PIECE), "the deal's piece");

    // Another piece, another miner, no such deal: each refused with its reason.
    let err = refusal(&world, &deal_dataset("c", Some(PIECE), DEAL + 1)).await;
    assert!(err.contains("not the dataset's piece"), "{err}");
    let err = refusal(&world, &deal_dataset("c", Some(PIECE), DEAL + 2)).await;
    assert!(err.contains("is stored with miner f05678"), "{err}");
    let err = refusal(&world, &deal_dataset("c", Some(PIECE), 999)).await;
    assert!(err.contains("knows no such deal"), "{err}");
    assert_eq!(world.reader.provider(sp).await.unwrap().datasets.len(), 3);

    let mut checked = Vec::new();
    while checked.len() < 2 {
        let event = tokio::time::timeout(std::time::Duration::from_secs(30), events.next())
            .await
            .expect("events arrive")
            .expect("stream runs")
            .expect("event decodes");
        if let MarketEvent::DealChecked {
            dataset_id,
            deal_id,
            miner_id,
            padded_size,
            ..
        } = event
        {
            assert_eq!((deal_id, miner_id, padded_size), (DEAL, MINER, PADDED));
            checked.push(dataset_id);
        }
    }
    assert_eq!(checked, ["a", "b"]);
}

#[tokio::test]
async fn without_filecoin_a_deal_is_refused_and_verification_is_recorded() {
    let world = World::with_provider().await;
    let sp = world.sp_address();
    // No doubles: this is what any non-Filecoin EVM chain answers.
    let err = refusal(&world, &deal_dataset("a", Some(PIECE), DEAL)).await;
    assert!(err.contains("has set no Filecoin miner"), "{err}");
    let err = world.sp.set_miner(MINER).await.unwrap_err();
    assert!(err.to_string().contains("no Filecoin actors"), "{err}");

    let before = world.reader.provider(sp).await.unwrap();
    assert_eq!(before.datasets[0].verified_at, None, "never verified");
    world.sp.mark_verified(&["era5".into()]).await.unwrap();
    let now = world.reader.chain_time().await.unwrap();
    let after = world.reader.provider(sp).await.unwrap();
    let at = after.datasets[0].verified_at.expect("verified");
    assert!(at <= now && at + 60 >= now, "{at} vs {now}");
    let err = world.sp.mark_verified(&["nope".into()]).await.unwrap_err();
    assert!(err.to_string().contains("does not serve dataset"), "{err}");
}
