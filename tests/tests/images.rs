//! An order placed against the SP's on-chain image catalog runs the image it names, pulled from
//! a real registry (Debian's docker-registry on loopback), reached with stock ssh.

use std::time::Instant;

use anyhow::{ensure, Context};
use shale_contracts::{parse_image_digest, Image};
use shale_provisioner::{image_build, CatalogImage, RegistryAuth, RegistryConfig};
use shale_tests::registry::LocalRegistry;
use shale_tests::ssh::run;
use shale_tests::{OrderOptions, Stack};

#[tokio::test(flavor = "multi_thread")]
async fn an_order_runs_the_registry_image_its_terms_name() -> anyhow::Result<()> {
    if !LocalRegistry::available()? {
        return Ok(());
    }
    let stack = Stack::start().await?;
    let registry = LocalRegistry::start()?;
    let archive = image_build::build_busybox_image(&image_build::default_cache_dir()).await?;
    let reference = registry.push_archive(&archive, "shale/tiny:1")?;
    let registries = [RegistryConfig {
        host: registry.host(),
        auth: RegistryAuth::Anonymous,
        insecure_http: true,
    }];
    let entry = CatalogImage {
        reference: Some(reference.clone()),
        archive: None,
        description: "busybox, for the test".into(),
        gpu_ready: false,
        size_bytes: None,
        default: true,
    };

    // What the broker does at start: install the catalog. Then the SP publishes it.
    let started = Instant::now();
    let tiny = stack
        .provisioner
        .install_image("tiny", &entry, &registries)
        .await?;
    let cold_pull = started.elapsed();
    stack
        .sp
        .add_image(&Image {
            name: "tiny".into(),
            digest: parse_image_digest(&tiny.digest)?,
            description: entry.description.clone(),
            gpu_ready: false,
            size_bytes: 0,
        })
        .await?;

    // A client orders the provider's offer: the catalog's image is in the terms.
    let key = stack.key("ida", "ed25519")?;
    let first = stack.order(&key, OrderOptions::default()).await?;
    let second = stack.order(&key, OrderOptions::default()).await?;
    let order = stack.client.order(first).await?;
    ensure!(
        order.image_digest == Some(parse_image_digest(&tiny.digest)?),
        "the order names the catalog's image: {:?}",
        order.image_digest
    );
    let login = |order: u64| {
        let mut cmd = stack.target(order.to_string(), &key).ssh();
        cmd.arg("test -e /etc/debian_version && echo debian || echo busybox; busybox | head -n 1");
        tokio::task::spawn_blocking(move || run(cmd))
    };
    let started = Instant::now();
    let out = login(first).await??;
    let cold_login = started.elapsed();
    ensure!(out.code == Some(0), "ssh into the order: {out:?}");
    let mut lines = out.stdout.lines();
    ensure!(
        lines.next() == Some("busybox"),
        "the container runs the pulled image, not the provider's Debian default: {out:?}"
    );
    ensure!(
        lines.next().is_some_and(|l| l.starts_with("BusyBox")),
        "busybox answers: {out:?}"
    );

    // A second order of the same image: no second transfer, the container starts from cache.
    let fetched = stack.provisioner.pull_stats().blobs_fetched;
    let started = Instant::now();
    let again = stack
        .provisioner
        .install_image("tiny", &entry, &registries)
        .await?;
    let cached_pull = started.elapsed();
    ensure!(again.digest == tiny.digest, "the same digest");
    ensure!(
        stack.provisioner.pull_stats().blobs_fetched == fetched,
        "nothing fetched again"
    );
    let started = Instant::now();
    let out = login(second).await??;
    let cached_login = started.elapsed();
    ensure!(
        out.code == Some(0) && out.stdout.starts_with("busybox"),
        "the second order: {out:?}"
    );
    eprintln!(
        "image figures: pull cold {cold_pull:?}, cached {cached_pull:?}; first login (container \
         start and the command) {cold_login:?}, second order's {cached_login:?}"
    );

    // The gateway exports the broker's pull counters.
    let metrics = stack.scrape().await.context("scraping")?;
    ensure!(
        metrics.contains("shale_gateway_image_pulls_total"),
        "pull counters on /metrics"
    );
    Ok(())
}
