//! `shale`: the one binary clients and storage providers use.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod cmd;

/// Lease compute next to Filecoin datasets over plain OpenSSH.
#[derive(Parser)]
#[command(name = "shale", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SSH gateway (SP side).
    Gateway {
        /// The gateway's TOML config (see gateway/gateway.example.toml).
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Storage-provider commands.
    #[command(subcommand)]
    Sp(SpCommand),
}

#[derive(Subcommand)]
enum SpCommand {
    /// Print the gateway's SSH host key (created if missing), as registered on chain.
    HostKey {
        /// The gateway's TOML config.
        #[arg(long, short, env = "SHALE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,russh=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Gateway { config } => cmd::gateway::run(&config).await,
        Command::Sp(SpCommand::HostKey { config }) => {
            let config = shale_gateway::GatewayConfig::load(&config)?;
            let key = shale_gateway::hostkey::load_or_generate(&config.host_key)
                .context("loading the host key")?;
            println!("{}", shale_gateway::hostkey::public_openssh(&key));
            Ok(())
        }
    }
}
