//! An order placed against the SP's on-chain image catalog runs the image it names, pulled from
//! a real registry (Debian's docker-registry on loopback), reached with stock ssh.

use std::time::Instant;

use anyhow::{ensure, Context};
use shale_contracts::{parse_image_digest, Image};
use shale_provisioner::{image_build, CatalogImage, RegistryAuth, RegistryConfig};
use shale_tests::registry::LocalRegistry;
use shale_tests::ssh::run;
use shale_tests::{OrderOptions, Stack, StackOptions};

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

/// A client brings its own image: pulled by digest from a registry the SP allows, refused on
/// chain from any other, and a digest the registry does not serve fails the login in words.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_brings_its_own_image_from_an_allowed_registry_only() -> anyhow::Result<()> {
    if !LocalRegistry::available()? {
        return Ok(());
    }
    let registry = LocalRegistry::start()?;
    let archive = image_build::build_busybox_image(&image_build::default_cache_dir()).await?;
    let reference = registry.push_archive(&archive, "client/tools:1")?;
    let digest = registry.digest(&reference)?;
    let repository = format!("{}/client/tools", registry.host());
    let stack = Stack::start_with(StackOptions {
        client_image_registries: vec![RegistryConfig {
            host: registry.host(),
            auth: RegistryAuth::Anonymous,
            insecure_http: true,
        }],
        ..StackOptions::default()
    })
    .await?;
    let listed = stack.client.provider(stack.provider()).await?;
    ensure!(
        listed.client_image_registries == [registry.host()],
        "the SP's allowed registries are on chain: {:?}",
        listed.client_image_registries
    );

    let key = stack.key("jo", "ed25519")?;
    let own = stack
        .order(
            &key,
            OrderOptions {
                own_image: Some((repository.clone(), parse_image_digest(&digest)?)),
                ..OrderOptions::default()
            },
        )
        .await?;
    // A digest the allowed registry does not serve: the order exists, its login says why.
    // Placed before the first login: the gateway's cached order count would refuse a later one
    // for a while.
    let missing = format!("sha256:{}", "ab".repeat(32));
    let ghost = stack
        .order(
            &key,
            OrderOptions {
                own_image: Some((repository.clone(), parse_image_digest(&missing)?)),
                ..OrderOptions::default()
            },
        )
        .await?;
    let order = stack.client.order(own).await?;
    ensure!(
        order.image_repository.as_deref() == Some(repository.as_str()),
        "the order carries the client's repository: {order:?}"
    );
    let login = |order: u64, command: &'static str| {
        let mut cmd = stack.target(order.to_string(), &key).ssh();
        cmd.arg(command);
        tokio::task::spawn_blocking(move || run(cmd))
    };
    let started = Instant::now();
    let out = login(
        own,
        "test -e /etc/debian_version && echo debian || echo busybox",
    )
    .await??;
    let cold_login = started.elapsed();
    ensure!(
        out.code == Some(0) && out.stdout.trim() == "busybox",
        "the container runs the client's image, not the SP's Debian default: {out:?}"
    );

    // Another registry is refused by the contract before any escrow moves.
    let elsewhere = stack
        .order(
            &key,
            OrderOptions {
                own_image: Some((
                    "203.0.113.7:5000/client/tools".into(),
                    parse_image_digest(&digest)?,
                )),
                ..OrderOptions::default()
            },
        )
        .await
        .unwrap_err();
    ensure!(
        format!("{elsewhere:#}").contains("does not let clients bring images from"),
        "refused in words: {elsewhere:#}"
    );

    let out = login(ghost, "true").await??;
    ensure!(
        out.code != Some(0) && out.stderr.contains(&missing),
        "the login names the image it could not get: {out:?}"
    );
    eprintln!("client image figures: first login with a cold pull {cold_login:?}");
    Ok(())
}
