//! `shale order …` and `shale rate`: the client's side of an order.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shale_contracts::{
    format_fingerprint, key_fingerprint_openssh, Address, Image, Marketplace, Network, NewOrder,
    Order, OrderState, Provider, U256,
};

use crate::ack::AckKey;
use crate::exit::Failure;
use crate::money::{format_fil, Fil};
use crate::settings::Settings;
use crate::sshcfg::{split_endpoint, OrderHost, SshFiles, Tunnel, TunnelAcks};
use crate::view::{self, duration, print_json, size, table, OrderView};
use crate::wire::WireCounts;

/// What `shale order create` asks for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub provider: Address,
    pub key: PathBuf,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Disk in MiB; the offer's default disk when `None`.
    pub disk_mib: Option<u64>,
    pub gpus: Option<u32>,
    pub dataset: Option<String>,
    /// A name from the provider's image catalog; `None`: its default (see
    /// [`shale_contracts::Provider::default_image`]).
    pub image: Option<String>,
    pub hours: u64,
    pub deposit: U256,
    /// How long to wait for the provider to accept (also the on-chain accept timeout).
    pub wait: Duration,
    /// Bytes the provider may be paid for without the tunnel's acknowledgment.
    pub byte_allowance: u64,
}

/// What a created order gives the client: how to reach it.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedOrder {
    pub order: u64,
    pub state: String,
    pub alias: String,
    /// The command with the Host entry in place.
    pub ssh: String,
    /// The same without relying on ~/.ssh/config.
    pub ssh_explicit: String,
    pub host: String,
    pub port: u16,
    pub identity: String,
    pub known_hosts: String,
    pub ssh_config: String,
    /// What the order transaction cost in gas, in wei.
    pub fee_wei: String,
    /// The address of the order's acknowledgment key (its payment tunnel signs usage with it).
    pub ack_signer: String,
    /// Bytes payable without an acknowledgment.
    pub byte_allowance: u64,
}

/// Reads an OpenSSH public key file and returns its line and the matching private key path.
pub fn read_public_key(path: &Path) -> anyhow::Result<(String, PathBuf)> {
    let expanded = expand_tilde(path);
    let line = std::fs::read_to_string(&expanded)
        .with_context(|| format!("cannot read the SSH public key {}", expanded.display()))?;
    let identity = match expanded.to_str().and_then(|s| s.strip_suffix(".pub")) {
        Some(private) => PathBuf::from(private),
        None => bail!(
            "{} does not end in .pub: pass the public key (e.g. ~/.ssh/id_ed25519.pub)",
            expanded.display()
        ),
    };
    Ok((line.trim().to_string(), identity))
}

fn expand_tilde(path: &Path) -> PathBuf {
    match path.to_str().and_then(|s| s.strip_prefix("~/")) {
        Some(rest) => crate::settings::home().join(rest),
        None => path.to_path_buf(),
    }
}

/// Places an order, waits for acceptance, and writes the SSH entries.
pub async fn create(
    settings: &Settings,
    req: &CreateRequest,
    json: bool,
) -> anyhow::Result<CreatedOrder> {
    let market = settings.signer().await?;
    let created = create_with(&market, settings, req, !json).await?;
    if json {
        print_json(&created)?;
    }
    Ok(created)
}

/// [`create`] with an existing signing client (the demo uses its own).
pub async fn create_with(
    market: &Marketplace,
    settings: &Settings,
    req: &CreateRequest,
    talk: bool,
) -> anyhow::Result<CreatedOrder> {
    let provider = market
        .provider(req.provider)
        .await
        .context("reading the provider's offer")?;
    let shown = view::address(req.provider, view::network(market).await?);
    if !provider.active {
        bail!("provider {shown} has withdrawn its offer");
    }
    if let Some(d) = &req.dataset {
        if !provider.datasets.iter().any(|x| &x.id == d) {
            let ids: Vec<&str> = provider.datasets.iter().map(|x| x.id.as_str()).collect();
            bail!(
                "provider {shown} has no dataset {d:?}; it offers: {}",
                if ids.is_empty() {
                    "none".into()
                } else {
                    ids.join(", ")
                }
            );
        }
    }
    let own_image = match req.image.as_deref() {
        Some(text) if text.contains('/') => Some(client_image(&provider, text)?),
        _ => None,
    };
    let image = match own_image {
        Some(_) => None,
        None => resolve_image(&provider, req.image.as_deref())?,
    };
    let (key_line, identity) = read_public_key(&req.key)?;
    let fingerprint = key_fingerprint_openssh(&key_line)?;
    let max_duration = req
        .hours
        .checked_mul(3600)
        .context("--hours is too large")?;
    let mut order = NewOrder::for_offer(&provider, fingerprint, req.deposit, max_duration);
    order.dataset = req.dataset.clone();
    order.image_digest = image.map(|i| i.digest);
    if let Some((repository, digest)) = own_image {
        order.image_digest = Some(digest);
        order.image_repository = Some(repository);
    }
    if let Some(c) = req.cpus {
        order.cpus = c;
    }
    if let Some(m) = req.memory_mib {
        order.memory_mib = m;
    }
    if let Some(d) = req.disk_mib {
        order.disk_mib = d;
    }
    if let Some(g) = req.gpus {
        order.gpus = g;
    }
    if order.disk_mib == 0 {
        bail!("an order needs a disk of more than 0 MiB");
    }
    if order.disk_mib > provider.offer.max_disk_mib {
        bail!(
            "provider {shown} sells at most {} of disk per order; {} is more",
            size(provider.offer.max_disk_mib),
            size(order.disk_mib)
        );
    }
    order.accept_timeout_secs = req.wait.as_secs().max(1);
    // The order's own acknowledgment key: made now, so its address goes into the terms, and
    // moved under the order's name once the chain gives the order its id.
    let files = SshFiles::new(&settings.ssh_dir);
    let pending_key = files
        .dir
        .join("acks")
        .join(format!("pending-{}.key", std::process::id()));
    let ack_signer = AckKey::at(&pending_key).create()?;
    order.ack_signer = Some(ack_signer);
    order.byte_allowance = req.byte_allowance;
    if talk {
        let hourly = provider
            .offer
            .price_per_second
            .saturating_mul(U256::from(3600u32));
        eprintln!(
            "Ordering {} CPUs, {} of memory, {} of disk, {} GPUs{}{} from {shown} for up to {}h at {} \
             per hour + {} per GiB.",
            order.cpus,
            size(order.memory_mib),
            size(order.disk_mib),
            order.gpus,
            order
                .dataset
                .as_ref()
                .map(|d| format!(", dataset {d}"))
                .unwrap_or_default(),
            image
                .map(|i| format!(", image {} ({})", i.name, short_digest(&i.digest)))
                .unwrap_or_default(),
            req.hours,
            Fil(hourly),
            Fil(provider.offer.price_per_gib),
        );
        eprintln!(
            "Key {} ({}), escrow {}.",
            format_fingerprint(&fingerprint),
            req.key.display(),
            Fil(req.deposit)
        );
        eprintln!(
            "Usage is acknowledged by this machine's payment tunnel (key {ack_signer:#x}); \
             without it the provider is paid for at most {} of traffic.",
            size_bytes(req.byte_allowance)
        );
    }
    let (id, tx) = market.create_order_tx(&order).await?;
    if talk {
        eprintln!(
            "Order {id} placed (tx {:#x}, fee {}).",
            tx.tx_hash,
            Fil(tx.fee)
        );
    }
    let accepted = wait_for_acceptance(market, id, req.wait, talk).await?;
    if accepted.state != OrderState::Active {
        bail!("order {id} is {} and will not start", accepted.state);
    }
    let (host, port) = split_endpoint(&provider.endpoint)?;
    let ack_key = files.ack_key(id);
    std::fs::rename(&pending_key, &ack_key)
        .with_context(|| format!("keeping the acknowledgment key as {}", ack_key.display()))?;
    let user_config = settings.ssh_dir.join("config");
    let order_host = OrderHost {
        order: id,
        host: host.clone(),
        port,
        host_key: provider.ssh_host_key.clone(),
        identity: identity.clone(),
        tunnel: Some(Tunnel {
            exe: std::env::current_exe().context("finding the shale binary for the tunnel")?,
            acks: Some(TunnelAcks {
                rpc_url: settings.rpc_url.clone(),
                marketplace: format!("{:#x}", settings.marketplace),
                key: ack_key,
            }),
        }),
    };
    // A new order under this alias starts its wire count from zero.
    WireCounts::at(files.wire_counts(id)).reset()?;
    let alias = files.write(&order_host, Some(&user_config))?;
    let created = CreatedOrder {
        order: id,
        state: accepted.state.to_string(),
        ssh: format!("ssh {alias}"),
        ssh_explicit: format!(
            "ssh -p {port} -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} {id}@{host}",
            identity.display(),
            files.known_hosts.display()
        ),
        alias,
        host,
        port,
        identity: identity.display().to_string(),
        known_hosts: files.known_hosts.display().to_string(),
        ssh_config: files.config.display().to_string(),
        fee_wei: tx.fee.to_string(),
        ack_signer: format!("{ack_signer:#x}"),
        byte_allowance: req.byte_allowance,
    };
    if talk {
        eprintln!(
            "Order {id} is active for {}. The provider's host key is pinned in {}.",
            duration(accepted.max_duration_secs),
            files.known_hosts.display()
        );
        println!("{}", created.ssh);
        eprintln!("(or, without ~/.ssh/config: {})", created.ssh_explicit);
    }
    Ok(created)
}

/// Polls the order until the provider accepts it, with a spinner; on timeout offers (on a
/// terminal) to cancel it, and fails with the "timed out" exit code.
pub(crate) async fn wait_for_acceptance(
    market: &Marketplace,
    id: u64,
    wait: Duration,
    talk: bool,
) -> anyhow::Result<Order> {
    let spinner = if talk {
        let s = ProgressBar::new_spinner();
        s.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
        s.set_message(format!("waiting for the provider to accept order {id}…"));
        s.enable_steady_tick(Duration::from_millis(120));
        s
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    loop {
        let order = market.order(id).await?;
        if order.state == OrderState::Cancelled {
            spinner.finish_and_clear();
            // The reason is only in the decline's log; an outage reading it must not hide that
            // the order was declined and refunded.
            match market.decline_reason(id).await {
                Ok(Some(reason)) => {
                    bail!("the provider declined order {id}: {reason}; the escrow was refunded")
                }
                Ok(None) => bail!("the provider cancelled order {id}; the escrow was refunded"),
                Err(e) => bail!(
                    "the provider declined order {id} (its reason could not be read: {e}); the \
                     escrow was refunded"
                ),
            }
        }
        if order.state != OrderState::Pending {
            spinner.finish_and_clear();
            if talk {
                eprintln!(
                    "Accepted after {} (provider posted {} collateral).",
                    duration(start.elapsed().as_secs()),
                    Fil(order.collateral)
                );
            }
            return Ok(order);
        }
        if start.elapsed() >= wait {
            spinner.finish_and_clear();
            if talk && std::io::stdin().is_terminal() {
                eprint!(
                    "The provider has not accepted order {id} in {}. Cancel it and get the \
                     escrow back? [y/N] ",
                    duration(wait.as_secs())
                );
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim().eq_ignore_ascii_case("y") {
                    market.cancel(id).await.context("cancelling the order")?;
                    eprintln!("Order {id} cancelled; the escrow is back in your account.");
                }
            }
            return Err(Failure::TimedOut(format!(
                "the provider did not accept order {id} within {}; `shale order cancel {id}` \
                 returns the escrow",
                duration(wait.as_secs())
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Orders where `who` is the client or the provider.
pub async fn orders_of(market: &Marketplace, who: Address) -> anyhow::Result<Vec<Order>> {
    let count = market.order_count().await?;
    let mut out = Vec::new();
    for id in 1..=count {
        let o = market.order(id).await?;
        if o.client == who || o.provider == who {
            out.push(o);
        }
    }
    Ok(out)
}

/// `shale order list`: the orders of `who` (default: the signing key's address).
pub async fn list(settings: &Settings, who: Option<Address>, json: bool) -> anyhow::Result<()> {
    let who = match who {
        Some(w) => w,
        None => crate::settings::load_signer(settings.keystore.as_deref())
            .context("order list shows the orders of your key; or pass --client ADDRESS")?
            .address(),
    };
    let market = settings.reader().await?;
    let network = view::network(&market).await?;
    let orders = orders_of(&market, who).await?;
    if json {
        let v: Vec<OrderView> = orders.iter().map(|o| OrderView::new(o, network)).collect();
        return print_json(&v);
    }
    if orders.is_empty() {
        println!("No orders for {}.", view::address(who, network));
        return Ok(());
    }
    let now = crate::cmd::watch::display_now(&market).await?;
    println!("{}", orders_table_on(&orders, now, Some(network)));
    Ok(())
}

/// A table of orders; with a `network` their providers are shown in both spellings.
pub fn orders_table_on(orders: &[Order], now: u64, network: Option<Network>) -> comfy_table::Table {
    let mut t = table([
        "order",
        "state",
        "provider",
        "resources",
        "dataset",
        "escrow left",
        "paid",
        "lease",
    ]);
    for o in orders {
        let lease = match (o.accepted_at, o.ended_at, o.expires_at()) {
            (Some(a), Some(e), _) => format!("ran {}", duration(e.saturating_sub(a))),
            (Some(a), None, Some(x)) => format!(
                "{} used, {} left",
                duration(now.saturating_sub(a)),
                duration(x.saturating_sub(now))
            ),
            _ => "-".into(),
        };
        t.add_row(vec![
            o.id.to_string(),
            o.state.to_string(),
            match network {
                Some(n) => view::address(o.provider, n),
                None => format!("{:#x}", o.provider),
            },
            resources(o),
            o.dataset.clone().unwrap_or_else(|| "-".into()),
            format_fil(o.escrow),
            format_fil(o.paid),
            lease,
        ]);
    }
    t
}

/// An order's resources in words: `2 cpu, 2 GiB, 20 GiB disk, 0 gpu`.
fn resources(o: &Order) -> String {
    format!(
        "{} cpu, {}, {} disk, {} gpu",
        o.cpus,
        size(o.memory_mib),
        size(o.disk_mib),
        o.gpus
    )
}

/// `shale order show ID`.
pub async fn show(settings: &Settings, id: u64, json: bool) -> anyhow::Result<()> {
    let market = settings.reader().await?;
    let o = market.order(id).await?;
    let network = view::network(&market).await?;
    let v = OrderView::new(&o, network);
    if json {
        return print_json(&v);
    }
    let mut t = table(["order".to_string(), id.to_string()]);
    let rows: Vec<(&str, String)> = vec![
        ("state", v.state),
        ("client", view::address(o.client, network)),
        ("provider", view::address(o.provider, network)),
        ("key", v.key_fingerprint),
        ("resources", resources(&o)),
        ("dataset", v.dataset.unwrap_or_else(|| "-".into())),
        (
            "image",
            v.image_digest
                .unwrap_or_else(|| "the provider's built-in default".into()),
        ),
        (
            "tariff",
            format!(
                "{} per hour, {} per GiB",
                Fil(crate::view::per_hour(o.price_per_second)),
                Fil(o.price_per_gib)
            ),
        ),
        ("max lease", duration(o.max_duration_secs)),
        ("escrow left", Fil(o.escrow).to_string()),
        ("collateral", Fil(o.collateral).to_string()),
        ("paid to provider", Fil(o.paid).to_string()),
        (
            "claimed",
            format!(
                "{} of lease, {} bytes",
                duration(o.claimed_seconds),
                o.claimed_bytes
            ),
        ),
        ("chain head", v.head),
        ("settled", o.settled.to_string()),
        ("rated", o.rated.to_string()),
    ];
    for (k, val) in rows {
        t.add_row(vec![k.to_string(), val]);
    }
    println!("{t}");
    Ok(())
}

/// A sent transaction, for `--json`.
#[derive(Debug, Serialize)]
struct TxDone {
    order: u64,
    action: &'static str,
    tx: String,
    fee_wei: String,
}

fn report_tx(
    json: bool,
    order: u64,
    action: &'static str,
    tx: &shale_contracts::TxReceipt,
    words: String,
) -> anyhow::Result<()> {
    if json {
        print_json(&TxDone {
            order,
            action,
            tx: format!("{:#x}", tx.tx_hash),
            fee_wei: tx.fee.to_string(),
        })
    } else {
        println!("{words} (tx {:#x}, fee {})", tx.tx_hash, Fil(tx.fee));
        Ok(())
    }
}

/// `shale order top-up ID AMOUNT`.
pub async fn top_up(settings: &Settings, id: u64, amount: U256, json: bool) -> anyhow::Result<()> {
    let market = settings.signer().await?;
    let tx = market.top_up(id, amount).await?;
    let o = market.order(id).await?;
    report_tx(
        json,
        id,
        "top-up",
        &tx,
        format!(
            "Added {} to order {id}; escrow now {}.",
            Fil(amount),
            Fil(o.escrow)
        ),
    )
}

/// `shale order terminate ID`: ends the lease now, then pays out what is left.
pub async fn terminate(settings: &Settings, id: u64, json: bool) -> anyhow::Result<()> {
    let market = settings.signer().await?;
    let tx = market.terminate(id).await?;
    report_tx(
        json,
        id,
        "terminate",
        &tx,
        format!("Order {id} terminated; the provider may still claim the usage up to now."),
    )
}

/// `shale order cancel ID`: withdraws an order the provider did not accept.
pub async fn cancel(settings: &Settings, id: u64, json: bool) -> anyhow::Result<()> {
    let market = settings.signer().await?;
    let tx = market.cancel(id).await?;
    report_tx(
        json,
        id,
        "cancel",
        &tx,
        format!("Order {id} cancelled; the escrow is refunded."),
    )
}

/// `shale order settle ID`: pays out an ended order (escrow left to the client).
pub async fn settle(settings: &Settings, id: u64, json: bool) -> anyhow::Result<()> {
    let market = settings.signer().await?;
    let before = market.order(id).await?;
    let tx = market.settle(id).await?;
    report_tx(
        json,
        id,
        "settle",
        &tx,
        format!(
            "Order {id} settled; {} of escrow returned to the client.",
            Fil(before.escrow)
        ),
    )
}

/// `shale rate ID STARS --review TEXT`.
pub async fn rate(
    settings: &Settings,
    id: u64,
    stars: u8,
    review: &str,
    json: bool,
) -> anyhow::Result<()> {
    let market = settings.signer().await?;
    let tx = market.rate(id, stars, review).await?;
    report_tx(
        json,
        id,
        "rate",
        &tx,
        format!("Rated order {id}'s provider {stars}/5."),
    )
}

/// `n` bytes in the largest binary unit that keeps a whole number, e.g. `64 MiB`.
fn size_bytes(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} B")
}

/// The catalog image an order runs: `name` from the provider's catalog, or without a name its
/// default (the entry named `default`, else the first); `None` when the catalog is empty and no
/// name was given (the order carries 0: the provider's built-in image).
pub fn resolve_image<'p>(
    provider: &'p Provider,
    name: Option<&str>,
) -> anyhow::Result<Option<&'p Image>> {
    let Some(name) = name else {
        return Ok(provider.default_image());
    };
    match provider.image(name) {
        Some(image) => Ok(Some(image)),
        None => {
            let names: Vec<&str> = provider.images.iter().map(|i| i.name.as_str()).collect();
            bail!(
                "provider {:#x} has no image {name:?}; it offers: {}",
                provider.address,
                if names.is_empty() {
                    "none (its orders run its built-in default image)".into()
                } else {
                    names.join(", ")
                }
            )
        }
    }
}

/// The client's own image, `HOST/PATH@sha256:…`: its repository and digest, once the provider
/// is known to pull from that registry (the contract would refuse it otherwise).
fn client_image(provider: &Provider, text: &str) -> anyhow::Result<(String, [u8; 32])> {
    let Some((repository, digest)) = text.split_once('@') else {
        bail!(
            "name your own image by digest, HOST/PATH@sha256:…, so the provider runs exactly it \
             (`skopeo inspect docker://{text}` prints the digest)"
        );
    };
    let digest = shale_contracts::parse_image_digest(digest)
        .with_context(|| format!("the digest of image {text}"))?;
    if repository
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':'))
    {
        bail!("image {text}: name it by digest alone, without a tag");
    }
    if !provider.allows_client_image(repository) {
        bail!(
            "provider {:#x} does not pull clients' images from {}; {}",
            provider.address,
            repository.split('/').next().unwrap_or(repository),
            if provider.client_image_registries.is_empty() {
                "it runs only the images of its catalog (shale images)".to_string()
            } else {
                format!("it allows: {}", provider.client_image_registries.join(", "))
            }
        );
    }
    Ok((repository.to_string(), digest))
}

/// `sha256:` and the first 12 hex digits of an image digest, as `docker images` shortens them.
pub fn short_digest(digest: &[u8; 32]) -> String {
    let full = shale_contracts::format_image_digest(digest);
    full[..7 + 12].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shale_contracts::{Offer, Rating};

    fn provider(images: &[&str]) -> Provider {
        Provider {
            address: Address::ZERO,
            endpoint: "sp:22".into(),
            ssh_host_key: String::new(),
            offer: Offer {
                cpus: 1,
                memory_mib: 1024,
                disk_mib: 1024,
                max_disk_mib: 1024,
                gpu_model: String::new(),
                gpu_count: 0,
                price_per_second: U256::ZERO,
                price_per_gib: U256::ZERO,
            },
            active: true,
            registered_at: 0,
            datasets: vec![],
            miner_id: None,
            client_image_registries: Vec::new(),
            images: images
                .iter()
                .enumerate()
                .map(|(n, name)| Image {
                    name: name.to_string(),
                    digest: [n as u8 + 1; 32],
                    description: String::new(),
                    gpu_ready: false,
                    size_bytes: 0,
                })
                .collect(),
            rating: Rating::default(),
        }
    }

    #[test]
    fn an_image_is_picked_by_name_or_the_default() {
        let none = provider(&[]);
        assert!(resolve_image(&none, None).unwrap().is_none());
        let err = resolve_image(&none, Some("cuda")).unwrap_err().to_string();
        assert!(
            err.contains("no image \"cuda\"") && err.contains("built-in"),
            "{err}"
        );

        let p = provider(&["cuda", "default", "tiny"]);
        assert_eq!(resolve_image(&p, None).unwrap().unwrap().name, "default");
        assert_eq!(
            resolve_image(&p, Some("tiny")).unwrap().unwrap().digest,
            [3; 32]
        );
        let err = resolve_image(&p, Some("nope")).unwrap_err().to_string();
        assert!(err.contains("it offers: cuda, default, tiny"), "{err}");
        let first = provider(&["cuda", "tiny"]);
        assert_eq!(resolve_image(&first, None).unwrap().unwrap().name, "cuda");
        assert_eq!(short_digest(&[0xab; 32]), "sha256:abababababab");
    }
}
