//! The SP's catalog: an order's container runs exactly the image whose digest the order names.

mod common;

use std::collections::BTreeMap;

use common::*;
use shale_provisioner::{image_build, CatalogImage, ImageRef, ProvisionError, Provisioner};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_runs_the_catalog_image_its_digest_names_and_no_other() {
    let h = Harness::busybox().await;
    let archive = image_build::build_busybox_image(&image_build::default_cache_dir())
        .await
        .expect("the busybox archive");
    let catalog = BTreeMap::from([(
        "tiny".to_string(),
        CatalogImage {
            reference: None,
            archive: Some(archive),
            description: "busybox".into(),
            gpu_ready: false,
            size_bytes: None,
            default: true,
        },
    )]);
    // The provider's configured image is not installed: only the digest can find the image.
    let mut config = h.config.clone();
    config.image = ImageRef("shale/not-imported:1".into());
    let prov = Provisioner::connect(config).await.expect("connect");
    let installed = prov.install_catalog(&catalog, &[]).await;
    let tiny = installed
        .into_iter()
        .next()
        .expect("one image")
        .expect("installed");
    assert_eq!(tiny.name, "tiny");
    assert!(tiny.digest.starts_with("sha256:") && tiny.digest.len() == 71);
    assert_eq!(
        prov.image_with_digest(&tiny.digest).await.unwrap(),
        tiny.image
    );

    let spec = shale_provisioner::LeaseSpec {
        image: Some(tiny.digest.clone()),
        ..lease(31)
    };
    let started = prov.ensure(&spec).await.expect("the order's image starts");
    assert_eq!(started.image, tiny.image);
    let (out, _, _) = run(&prov, 31, &["echo", "from the catalog"]).await;
    assert_eq!(out.trim(), "from the catalog");

    // A digest nobody installed, and one that is not a digest at all, are refused by name.
    for digest in [format!("sha256:{}", "0".repeat(64)), "latest".to_string()] {
        let spec = shale_provisioner::LeaseSpec {
            image: Some(digest.clone()),
            ..lease(32)
        };
        let err = prov.ensure(&spec).await.expect_err("no such image");
        assert!(
            matches!(&err, ProvisionError::ImageMissing { image } if *image == digest),
            "{err:?}"
        );
    }
    // The catalog no longer offers it, and nothing unused is kept: the order's container still
    // holds it, so it stays.
    let policy = shale_provisioner::ImageGcPolicy { keep_unused: 0 };
    let removed = prov
        .collect_images(&std::collections::HashSet::new(), &policy)
        .await
        .unwrap();
    assert!(
        removed.is_empty(),
        "an image an order uses was removed: {removed:?}"
    );
    assert_eq!(
        prov.image_with_digest(&tiny.digest).await.unwrap(),
        tiny.image
    );
    prov.release(31).await.unwrap();
}
