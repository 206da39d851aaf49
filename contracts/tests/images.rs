//! The provider's image catalog against a real anvil: add, list, remove, sync, and an order
//! that carries the digest of the image it runs.

mod common;

use common::World;
use futures::StreamExt;
use shale_contracts::{parse_image_digest, ChainError, Image, MarketEvent, NewOrder};

fn image(name: &str, hex_digit: char, gpu_ready: bool) -> Image {
    let text = format!("sha256:{}", hex_digit.to_string().repeat(64));
    Image {
        name: name.into(),
        digest: parse_image_digest(&text).unwrap(),
        description: format!("{name} image"),
        gpu_ready,
        size_bytes: 1 << 30,
    }
}

#[tokio::test]
async fn images_are_added_listed_and_removed() {
    let world = World::with_provider().await;
    let sp = world.sp_address();
    assert!(world.reader.provider(sp).await.unwrap().images.is_empty());

    let mut events = world.reader.watch().await.unwrap();
    let pytorch = image("pytorch", 'a', true);
    let default = image("default", 'b', false);
    world.sp.add_image(&pytorch).await.unwrap();
    world.sp.add_image(&default).await.unwrap();
    let provider = world.reader.provider(sp).await.unwrap();
    assert_eq!(provider.images, vec![pytorch.clone(), default.clone()]);
    assert_eq!(provider.default_image(), Some(&default));
    assert_eq!(pytorch.digest_text(), format!("sha256:{}", "a".repeat(64)));

    // A name is pinned to its digest: a second add is refused in words.
    let err = world
        .sp
        .add_image(&image("pytorch", 'c', true))
        .await
        .unwrap_err();
    assert!(matches!(err, ChainError::Reverted { .. }), "{err:?}");
    assert!(err.to_string().contains("already lists image"), "{err}");

    world.sp.remove_image("pytorch").await.unwrap();
    assert_eq!(
        world.reader.provider(sp).await.unwrap().images,
        vec![default.clone()]
    );
    let err = world.sp.remove_image("pytorch").await.unwrap_err();
    assert!(err.to_string().contains("lists no image"), "{err}");

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(std::time::Duration::from_secs(30), events.next())
            .await
            .expect("events arrive")
            .expect("stream runs")
            .expect("event decodes");
        seen.push(event);
    }
    assert_eq!(
        seen,
        vec![
            MarketEvent::ImageAdded {
                provider: sp,
                name: "pytorch".into(),
                digest: pytorch.digest
            },
            MarketEvent::ImageAdded {
                provider: sp,
                name: "default".into(),
                digest: default.digest
            },
            MarketEvent::ImageRemoved {
                provider: sp,
                name: "pytorch".into()
            },
        ]
    );
}

#[tokio::test]
async fn sync_images_makes_the_catalog_match_the_config() {
    let world = World::with_provider().await;
    let sp = world.sp_address();
    let a = image("a", '1', false);
    let b = image("b", '2', false);
    assert_eq!(
        world
            .sp
            .sync_images(&[a.clone(), b.clone()])
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(world
        .sp
        .sync_images(&[a.clone(), b.clone()])
        .await
        .unwrap()
        .is_empty());
    // b re-pinned to another digest, a dropped, c new: remove a, remove b, add b, add c.
    let b2 = image("b", '3', true);
    let c = image("c", '4', false);
    assert_eq!(
        world
            .sp
            .sync_images(&[b2.clone(), c.clone()])
            .await
            .unwrap()
            .len(),
        4
    );
    let mut listed = world.reader.provider(sp).await.unwrap().images;
    listed.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(listed, vec![b2.clone(), c.clone()]);
    // The first entry given is the default: c first means the catalog is laid out again.
    world
        .sp
        .sync_images(&[c.clone(), b2.clone()])
        .await
        .unwrap();
    let provider = world.reader.provider(sp).await.unwrap();
    assert_eq!(provider.default_image(), Some(&c));
    assert_eq!(provider.images, vec![c, b2]);
}

#[tokio::test]
async fn an_order_carries_the_digest_of_a_catalog_image() {
    let world = World::with_provider().await;
    // No catalog: the order carries no digest (the provider's built-in default).
    let id = world.client.create_order(&world.new_order()).await.unwrap();
    assert_eq!(world.reader.order(id).await.unwrap().image_digest, None);

    let pytorch = image("pytorch", 'e', true);
    world.sp.add_image(&pytorch).await.unwrap();
    // With a catalog, no digest is refused, and so is one it does not list.
    let err = world
        .client
        .create_order(&world.new_order())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("must name one of their digests"),
        "{err}"
    );
    let mut unknown = world.new_order();
    unknown.image_digest = Some([0x77; 32]);
    let err = world.client.create_order(&unknown).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("lists no image with digest sha256:7777"),
        "{err}"
    );

    // The default picked from the catalog, as `NewOrder::for_offer` does.
    let provider = world.reader.provider(world.sp_address()).await.unwrap();
    let order = NewOrder {
        image_digest: provider.default_image().map(|i| i.digest),
        image_repository: None,
        ..world.new_order()
    };
    let id = world.client.create_order(&order).await.unwrap();
    let read = world.reader.order(id).await.unwrap();
    assert_eq!(read.image_digest, Some(pytorch.digest));
    assert_eq!(
        provider
            .image_by_digest(&read.image_digest.unwrap())
            .map(|i| i.name.as_str()),
        Some("pytorch")
    );
}
