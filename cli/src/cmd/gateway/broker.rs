//! `shale gateway`'s broker process: root, no wallet key, serving the provisioner to the SSH
//! process on a local socket only that process's user may use.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use shale_broker::Broker;
use shale_gateway::chain_standing::ChainStanding;
use shale_provisioner::{Catalog, ImageGcPolicy, Provisioner, ProvisionerConfig, RegistryConfig};

use crate::installed::InstalledCatalog;
use crate::spconfig::SpConfig;

/// Where the broker listens: beside the gateway's state, which the SSH process can reach.
pub fn socket_path(sp: &SpConfig) -> PathBuf {
    sp.gateway.state_dir.join("broker.sock")
}

/// Installs every catalog image, records what was installed (and why the rest was not), then
/// removes the images the policy does not keep.
async fn install_catalog(
    provisioner: Provisioner,
    catalog: Catalog,
    registries: Vec<RegistryConfig>,
    gc: ImageGcPolicy,
    record: PathBuf,
) {
    if catalog.is_empty() {
        return;
    }
    let before = InstalledCatalog::read(&record).unwrap_or_default();
    let mut done = InstalledCatalog::default();
    for outcome in provisioner.install_catalog(&catalog, &registries).await {
        match outcome {
            Ok(image) => {
                if let Some(old) = before.moved(&image) {
                    tracing::warn!(
                        name = %image.name,
                        was = %old,
                        now = %image.digest,
                        "the image's tag moved: orders placed against the old digest keep running \
                         it; `shale sp update` publishes the new one"
                    );
                }
                done.installed.push(image)
            }
            Err((name, e)) => {
                done.failed.insert(name, e.to_string());
            }
        }
    }
    if let Err(e) = done.write(&record) {
        tracing::warn!(error = %e, "cannot record the installed catalog");
    }
    // What this and the last installation offered stays: the chain may still name a digest
    // that a failed or moved image had.
    let offered: HashSet<String> = done
        .installed
        .iter()
        .chain(&before.installed)
        .map(|i| i.digest.clone())
        .collect();
    match provisioner.collect_images(&offered, &gc).await {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(removed = removed.len(), "removed images no order uses")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot collect unused images"),
    }
}

/// Hashes every piece dataset at start (those whose kept hash is older than `dataset_recheck`)
/// and looks again hourly, so a dataset changed on disk is caught without an order asking.
async fn check_datasets(provisioner: Provisioner) {
    let every = provisioner.config().dataset_recheck.clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(3600),
    );
    loop {
        provisioner.recheck_datasets().await;
        tokio::time::sleep(every).await;
    }
}

/// Connects to containerd and serves it until SIGINT or SIGTERM.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let sp = SpConfig::load(config_path)?;
    let config = &sp.gateway;
    let user = crate::privsep::lookup(&config.privsep.user)?.with_context(|| {
        format!(
            "no user {}: start the set with `shale gateway`",
            config.privsep.user
        )
    })?;
    // Containers and disks are keyed by chain and marketplace as well as by order id.
    let market = super::read_market(config).await?;
    let containers = ProvisionerConfig {
        scope: market
            .scope()
            .await
            .context("identifying the marketplace")?,
        // Clients' own images are pulled with the catalog's credentials.
        registries: config.registries.clone(),
        ..config.containers.clone()
    };
    let provisioner = Provisioner::connect(containers)
        .await
        .context("connecting to containerd")?;
    // Pull early: the catalog is installed while the broker already serves, so a login never
    // waits for a registry it need not wait for.
    tokio::spawn(install_catalog(
        provisioner.clone(),
        config.images.clone(),
        config.registries.clone(),
        config.image_gc.clone(),
        InstalledCatalog::path(&sp),
    ));
    tokio::spawn(check_datasets(provisioner.clone()));
    let socket = socket_path(&sp);
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}", socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding the broker socket {}", socket.display()))?;
    // Only the SSH process's user (and root) may connect; the broker checks each peer's uid too.
    nix::unistd::chown(&socket, Some(user.uid), Some(user.gid))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), user = %user.name, "broker serving the SSH process");
    // The broker reads each order the SSH process names from the chain itself.
    let chain = ChainStanding::new(market, config.chain.provider);
    Broker::new(provisioner, chain, vec![0, user.uid.as_raw()])
        .with_stale_max(config.auth.stale_order_max)
        .serve(listener, super::shutdown_signal())
        .await;
    Ok(())
}
