//! `shale`: the one binary clients and storage providers use.
//!
//! Exit codes are documented in [`exit`]: 0 success, 1 failure, 2 usage, 3 chain unreachable,
//! 4 refused by the marketplace, 5 no such order or provider, 6 timed out, 7 receipts do not
//! match the claims, 8 ssh failed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shale_contracts::{Address, U256};

mod ack;
mod cmd;
mod exit;
mod installed;
mod money;
mod policy;
mod privsep;
mod settings;
mod spconfig;
mod ssh_filter;
mod sshcfg;
mod view;
mod wire;

use settings::ChainArgs;
use spconfig::SpConfig;

/// Lease compute next to Filecoin datasets over plain OpenSSH.
#[derive(Parser)]
#[command(
    name = "shale",
    version,
    about,
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 3 chain unreachable, 4 refused by the \
                  marketplace, 5 no such order or provider, 6 timed out, 7 receipts do not match \
                  the claims, 8 ssh failed."
)]
struct Cli {
    #[command(flatten)]
    chain: ChainArgs,
    /// Machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The storage providers on the marketplace: offers, prices, datasets, ratings.
    Providers {
        /// Include withdrawn providers.
        #[arg(long)]
        all: bool,
    },
    /// The datasets across providers.
    Datasets {
        /// Only datasets whose id or description contains this text.
        filter: Option<String>,
    },
    /// The images providers run orders from (their on-chain catalogs, pinned by digest).
    Images {
        /// Only this provider's catalog (0x…, f410f… or t410f…).
        #[arg(value_parser = settings::address_arg)]
        provider: Option<Address>,
    },
    /// Place and manage orders (client side).
    #[command(subcommand)]
    Order(OrderCommand),
    /// Rate the provider of an ended order.
    Rate {
        order: u64,
        /// 1 to 5 stars.
        #[arg(value_parser = clap::value_parser!(u8).range(1..=5))]
        stars: u8,
        /// A short review (at most 280 bytes).
        #[arg(long, default_value = "")]
        review: String,
    },
    /// Fetch an order's receipts over SSH and check them against the provider's claims.
    Receipts {
        order: u64,
        /// Recompute the tick chain and compare it with what the contract paid for.
        #[arg(long)]
        verify: bool,
    },
    /// Acknowledge an order's usage now (the payment tunnel also does it by itself): signs
    /// only what this machine's wire counts and the lease's clock confirm; exit 7 if not.
    Ack { order: u64 },
    /// Follow an order live: lease time, cost, escrow left, claims.
    Watch {
        order: u64,
        /// Print one snapshot and exit.
        #[arg(long)]
        once: bool,
    },
    /// The local payment tunnel: OpenSSH's ProxyCommand for an order's Host entry. Relays
    /// the connection unchanged and counts its bytes on the wire in FILE, durably.
    Tunnel {
        host: String,
        port: u16,
        /// The order's wire-count file (written by `shale order create`).
        #[arg(long)]
        counts: PathBuf,
        /// Bytes counted ahead per durable write (at most this much is over-counted by a crash).
        #[arg(long, default_value_t = cmd::tunnel::DEFAULT_STEP)]
        step: u64,
        /// Acknowledge this order's usage with its acknowledgment key (needs the other --ack-*
        /// options); without it the tunnel only counts.
        #[arg(long, requires_all = ["ack_key", "rpc_url_for_acks", "marketplace_for_acks", "ssh_config"])]
        ack_order: Option<u64>,
        /// The order's acknowledgment key file.
        #[arg(long)]
        ack_key: Option<PathBuf>,
        /// The chain RPC the acknowledgments are checked against.
        #[arg(long = "ack-rpc-url")]
        rpc_url_for_acks: Option<String>,
        /// The marketplace of the order (0x…, f410f… or t410f…).
        #[arg(long = "ack-marketplace", value_parser = settings::address_arg)]
        marketplace_for_acks: Option<Address>,
        /// The Shale ssh config with the order's Host entry.
        #[arg(long)]
        ssh_config: Option<PathBuf>,
        /// Seconds between acknowledgments.
        #[arg(long, default_value_t = 30)]
        ack_every: u64,
        /// Acknowledge sooner once this many bytes went through since the last one.
        #[arg(long, default_value_t = 64 << 20)]
        ack_bytes: u64,
    },
    /// Run the SSH gateway (SP side).
    Gateway {
        /// The gateway's TOML config (see gateway/gateway.example.toml).
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
        /// Which of the gateway's processes to run; the supervisor starts the others.
        #[arg(long, value_enum, default_value = "supervisor", hide = true)]
        role: cmd::gateway::Role,
    },
    /// Storage-provider commands.
    #[command(subcommand)]
    Sp(SpCommand),
    /// The whole stack on this machine: anvil, contracts, containerd, image, gateway, demo SP.
    #[command(subcommand)]
    Dev(DevCommand),
    /// The whole story on the local stack: order, ssh, train a model, scp, pay, verify, rate.
    Demo,
    /// Deploy the marketplace and its claim verifiers with the deployer's key (--keystore or
    /// SHALE_KEYSTORE, or SHALE_PRIVATE_KEY) on the chain at --rpc-url, and write client.toml,
    /// gateway.toml (an SP skeleton) and deployment.json.
    Deploy(cmd::deploy::DeployArgs),
}

#[derive(Subcommand)]
enum OrderCommand {
    /// Order a container from a provider, pay the escrow, and wait until it is accepted.
    Create {
        /// The provider's address (0x…, f410f… or t410f…).
        #[arg(long, value_parser = settings::address_arg)]
        provider: Address,
        /// Your SSH public key (its private half logs in).
        #[arg(long, default_value = "~/.ssh/id_ed25519.pub")]
        key: PathBuf,
        /// CPUs (default: the provider's offer).
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory, e.g. 8GiB (default: the offer).
        #[arg(long, value_parser = view::parse_size)]
        memory: Option<u64>,
        /// Disk, e.g. 20GiB: everything the container can write (its system's changes and
        /// /work), at most the offer's maximum (default: the offer's disk).
        #[arg(long, value_parser = view::parse_size)]
        disk: Option<u64>,
        /// GPUs (default: the offer).
        #[arg(long)]
        gpus: Option<u32>,
        /// A dataset of the provider, mounted read-only at /data/<id>.
        #[arg(long)]
        dataset: Option<String>,
        /// An image of the provider's catalog (`shale images PROVIDER`), by name (default: the
        /// one named `default`, else its first; none when it lists no images), or your own
        /// image as HOST/PATH@sha256:… from a registry the provider allows.
        #[arg(long)]
        image: Option<String>,
        /// Longest lease, in hours.
        #[arg(long, default_value_t = 1)]
        hours: u64,
        /// Escrow paid in, e.g. 0.5FIL.
        #[arg(long, value_parser = money::amount_arg)]
        deposit: U256,
        /// Seconds to wait for the provider to accept (also the on-chain accept timeout).
        #[arg(long, default_value_t = 300)]
        wait: u64,
        /// Bytes the provider may be paid for without this machine's payment tunnel
        /// acknowledging them (plain ssh, another machine), e.g. 64MiB.
        #[arg(long, value_parser = view::parse_byte_size, default_value = "64MiB")]
        byte_allowance: u64,
    },
    /// Your orders (as client or provider).
    List {
        /// Whose orders (0x…, f410f… or t410f…; default: the signing key's address).
        #[arg(long, value_parser = settings::address_arg)]
        client: Option<Address>,
    },
    /// One order in detail.
    Show { order: u64 },
    /// Add escrow to a live order.
    TopUp {
        order: u64,
        #[arg(value_parser = money::amount_arg)]
        amount: U256,
    },
    /// End a live order now.
    Terminate { order: u64 },
    /// Withdraw an order the provider did not accept in time (full refund).
    Cancel { order: u64 },
    /// Pay out an ended order: the escrow left back to you, the collateral back to the provider.
    Settle { order: u64 },
}

#[derive(Subcommand)]
enum SpCommand {
    /// Print the gateway's SSH host key (created if missing), as registered on chain.
    HostKey {
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Register the endpoint, host key, offer, datasets and image catalog of the config.
    Register {
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Update the registered endpoint, host key, offer, datasets and image catalog from the
    /// config (images are published once the broker installed them and knows their digests).
    Update {
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Withdraw the offer: no new orders, live orders continue.
    Withdraw {
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// This provider's orders: pending, active, ended, and the earnings.
    Orders {
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Accept a pending order (posting its collateral).
    Accept {
        order: u64,
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Print the v1 piece CID (CommP), piece size and payload size of a file: what a Filecoin
    /// deal for it names, and what `[containers.datasets]` takes as `piece_cid`.
    Commp { file: PathBuf },
    /// The config's datasets and what the gateway's last check of each piece found.
    Datasets {
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
        /// Also record on chain when each dataset that matched its piece was last verified
        /// (clients see it in `shale datasets`).
        #[arg(long)]
        publish: bool,
    },
    /// Set the Filecoin miner (f01234) whose deals the datasets' `deal_id`s name; on FEVM the
    /// miner must list this provider's f410 address as a control address.
    Miner {
        miner: String,
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Datasets as Filecoin pieces.
    #[command(subcommand)]
    Dataset(DatasetCommand),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Pack a directory as a UnixFS CAR (what ipfs-car makes, same root CID) and print the
    /// piece CID a deal for the CAR names.
    Pack {
        dir: PathBuf,
        /// The CAR to write (default: DIR.car beside the directory).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Start the local stack in the background (state in SHALE_DEV_DIR, else SHALE_HOME/dev;
    /// SHALE_HOME defaults to <checkout>/.state for a binary in a checkout's target/,
    /// /var/lib/shale for root, else ~/.local/state/shale).
    Up,
    /// Stop everything `dev up` started and remove its state.
    Down,
    /// Show the local stack's endpoints.
    Status,
    /// Keeps a project-local containerd running until SIGTERM (started by `dev up`).
    #[command(hide = true)]
    Containerd {
        #[arg(long)]
        dir: PathBuf,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Providers { all } => {
            cmd::market::providers(&cli.chain.resolve()?, all, json).await
        }
        Command::Datasets { filter } => {
            cmd::market::datasets(&cli.chain.resolve()?, filter.as_deref(), json).await
        }
        Command::Images { provider } => {
            cmd::market::images(&cli.chain.resolve()?, provider, json).await
        }
        Command::Order(o) => {
            let s = cli.chain.resolve()?;
            match o {
                OrderCommand::Create {
                    provider,
                    key,
                    cpus,
                    memory,
                    disk,
                    gpus,
                    dataset,
                    image,
                    hours,
                    deposit,
                    wait,
                    byte_allowance,
                } => {
                    let req = cmd::order::CreateRequest {
                        provider,
                        key,
                        cpus,
                        memory_mib: memory,
                        disk_mib: disk,
                        gpus,
                        dataset,
                        image,
                        hours,
                        deposit,
                        wait: Duration::from_secs(wait),
                        byte_allowance,
                    };
                    cmd::order::create(&s, &req, json).await.map(|_| ())
                }
                OrderCommand::List { client } => cmd::order::list(&s, client, json).await,
                OrderCommand::Show { order } => cmd::order::show(&s, order, json).await,
                OrderCommand::TopUp { order, amount } => {
                    cmd::order::top_up(&s, order, amount, json).await
                }
                OrderCommand::Terminate { order } => cmd::order::terminate(&s, order, json).await,
                OrderCommand::Cancel { order } => cmd::order::cancel(&s, order, json).await,
                OrderCommand::Settle { order } => cmd::order::settle(&s, order, json).await,
            }
        }
        Command::Rate {
            order,
            stars,
            review,
        } => cmd::order::rate(&cli.chain.resolve()?, order, stars, &review, json).await,
        Command::Receipts { order, verify } => {
            cmd::receipts::run(&cli.chain.resolve()?, order, verify, json)
                .await
                .map(|_| ())
        }
        Command::Ack { order } => cmd::ack::run(&cli.chain.resolve()?, order, json)
            .await
            .map(|_| ()),
        Command::Watch { order, once } => {
            cmd::watch::run(&cli.chain.resolve()?, order, once, json).await
        }
        Command::Tunnel {
            host,
            port,
            counts,
            step,
            ack_order,
            ack_key,
            rpc_url_for_acks,
            marketplace_for_acks,
            ssh_config,
            ack_every,
            ack_bytes,
        } => {
            let acks = match (
                ack_order,
                ack_key,
                rpc_url_for_acks,
                marketplace_for_acks,
                ssh_config,
            ) {
                (Some(order), Some(key), Some(rpc_url), Some(marketplace), Some(ssh_config)) => {
                    Some(cmd::tunnel::AckPlan {
                        exchange: cmd::tunnel::PendingExchange {
                            rpc_url,
                            marketplace,
                            order,
                            ssh_config,
                            exe: std::env::current_exe()?,
                            counts: counts.clone(),
                            key,
                        },
                        every: Duration::from_secs(ack_every.max(1)),
                        bytes: ack_bytes,
                    })
                }
                _ => None,
            };
            use tokio::signal::unix::{signal, SignalKind};
            let reservation = cmd::tunnel::reservation(&counts, step);
            let mut hangup = signal(SignalKind::hangup())?;
            let mut terminate = signal(SignalKind::terminate())?;
            let relay = tokio::task::spawn_blocking({
                let reservation = reservation.clone();
                move || cmd::tunnel::run(&host, port, reservation, acks)
            });
            tokio::select! {
                done = relay => done.context("the tunnel thread")?,
                _ = hangup.recv() => cmd::tunnel::finish(&reservation),
                _ = terminate.recv() => cmd::tunnel::finish(&reservation),
            }
        }
        Command::Gateway { config, role } => cmd::gateway::run(&config, role).await,
        Command::Sp(sp) => match sp {
            SpCommand::HostKey { config } => {
                println!("{}", cmd::sp::host_key(&SpConfig::load(&config)?)?);
                Ok(())
            }
            SpCommand::Register { config } => cmd::sp::register(&SpConfig::load(&config)?).await,
            SpCommand::Update { config } => cmd::sp::update(&SpConfig::load(&config)?).await,
            SpCommand::Withdraw { config } => cmd::sp::withdraw(&SpConfig::load(&config)?).await,
            SpCommand::Orders { config } => cmd::sp::orders(&SpConfig::load(&config)?, json).await,
            SpCommand::Commp { file } => cmd::piece::commp(&file, json),
            SpCommand::Datasets { config, publish } => {
                let config = SpConfig::load(&config)?;
                cmd::piece::datasets(&config, json)?;
                if publish {
                    cmd::sp::publish_verified(&config).await?;
                }
                Ok(())
            }
            SpCommand::Miner { miner, config } => {
                cmd::sp::set_miner(&SpConfig::load(&config)?, &miner).await
            }
            SpCommand::Dataset(DatasetCommand::Pack { dir, out }) => {
                let out = out.unwrap_or_else(|| dir.with_extension("car"));
                cmd::piece::pack(&dir, &out, json)
            }
            SpCommand::Accept { order, config } => {
                cmd::sp::accept(&SpConfig::load(&config)?, order).await
            }
        },
        Command::Dev(d) => match d {
            DevCommand::Up => cmd::dev::up().await.map(|_| ()),
            DevCommand::Down => cmd::dev::down().await,
            DevCommand::Status => cmd::dev::status(json),
            DevCommand::Containerd { dir } => cmd::dev::containerd(&dir).await,
        },
        Command::Demo => cmd::demo::run().await,
        Command::Deploy(args) => cmd::deploy::run(&args.request(&cli.chain)?, json).await,
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,shale_gateway=info,russh=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(err) = run(cli).await {
        eprintln!("error: {err}");
        for cause in err.chain().skip(1) {
            eprintln!("  because: {cause}");
        }
        std::process::exit(exit::code_of(&err));
    }
}
