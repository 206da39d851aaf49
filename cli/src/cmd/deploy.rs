//! `shale deploy`: the marketplace and its claim verifiers on any EVM chain (Filecoin
//! Calibration or mainnet through an FEVM node, or anvil), and the config that points at them.
//!
//! In order, so that nothing is sent that a later check would have refused: the files it will
//! write must not exist (unless `--force`); the node's chain id must be the one `--chain` names
//! (and mainnet needs `--yes`); the claim circuit's Groth16 keys are made, or reused from
//! `--keys`, one pair per batch capacity, and their Solidity verifiers compiled with the pinned
//! solc-js; the node estimates every creation and the deployer's balance must cover the most it
//! can cost. Then the verifiers and the marketplace are created, each waited for, and
//! `client.toml`, `gateway.toml` and `deployment.json` are written.
//!
//! The keys come from a single-party set-up on this machine ([`shale_circuits::setup_with_os_rng`]):
//! whoever ran it could forge claim proofs. Fine on a testnet; mainnet needs a ceremony, which
//! this command does not run.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alloy::network::TransactionBuilder;
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::transports::http::reqwest;
use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};
use shale_circuits::{ProvingKey, VerifyingKey};
use shale_contracts::filecoin_address::{to_f4, Network};
use shale_contracts::{
    bindings, devnet, Address, AnyAddress, Bytes, ChainError, FeePolicy, Marketplace,
    PrivateKeySigner, B256, U256,
};

use crate::money::format_fil;
use crate::settings::{load_signer, ChainArgs, ClientConfig};
use crate::view::print_json;

/// The chain a deployment is meant for; the node must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Chain {
    /// Filecoin Calibration testnet (chain id 314159).
    Calibration,
    /// Filecoin mainnet (chain id 314): real FIL, needs `--yes`.
    Mainnet,
    /// A local anvil (chain id 31337).
    Dev,
}

impl Chain {
    /// The EVM chain id its nodes answer with.
    pub fn id(self) -> u64 {
        match self {
            Chain::Calibration => 314_159,
            Chain::Mainnet => 314,
            Chain::Dev => 31_337,
        }
    }

    /// The name `--chain` takes.
    pub fn name(self) -> &'static str {
        match self {
            Chain::Calibration => "calibration",
            Chain::Mainnet => "mainnet",
            Chain::Dev => "dev",
        }
    }
}

/// `shale deploy`'s options; the RPC URL and the key come from the global [`ChainArgs`].
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// The chain the node must be: calibration (314159), mainnet (314), dev (anvil, 31337).
    #[arg(long, value_enum)]
    pub chain: Chain,
    /// Batch capacities, one verifier and proving key each.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub capacities: Vec<u32>,
    /// Seconds after a lease ends during which its provider may still claim.
    #[arg(long, default_value_t = devnet::DEFAULT_CLAIM_WINDOW_SECS)]
    pub claim_window: u64,
    /// Where the claim keys are made, or reused if they match (default: SHALE_HOME/keys/CHAIN).
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Where client.toml, gateway.toml and deployment.json are written.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Overwrite those files.
    #[arg(long)]
    pub force: bool,
    /// Confirm a mainnet deployment (real FIL).
    #[arg(long)]
    pub yes: bool,
}

impl DeployArgs {
    /// The request, with the node from `--rpc-url`/`SHALE_RPC_URL` (never a config file: a
    /// deployment names its chain on purpose) and the keystore from `--keystore`/`SHALE_KEYSTORE`.
    pub fn request(self, chain: &ChainArgs) -> anyhow::Result<DeployRequest> {
        let Some(rpc_url) = chain.rpc_url.clone() else {
            bail!("shale deploy needs the chain's node: pass --rpc-url URL (or set SHALE_RPC_URL)");
        };
        Ok(DeployRequest {
            rpc_url,
            chain: self.chain,
            capacities: self.capacities,
            claim_window_secs: self.claim_window,
            keys_dir: self.keys,
            out_dir: self.out,
            force: self.force,
            yes: self.yes,
            keystore: chain.keystore.clone(),
        })
    }
}

/// What `shale deploy` was asked to do.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub rpc_url: String,
    pub chain: Chain,
    pub capacities: Vec<u32>,
    pub claim_window_secs: u64,
    /// `None`: `keys/<chain>` in Shale's home.
    pub keys_dir: Option<PathBuf>,
    pub out_dir: PathBuf,
    pub force: bool,
    pub yes: bool,
    pub keystore: Option<PathBuf>,
}

/// `deployment.json`: what was deployed, where, by whom, with which keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub chain: String,
    pub chain_id: u64,
    /// The RPC endpoint as `scheme://host[:port]` (its API key, if any, left out).
    pub rpc_endpoint: String,
    pub marketplace: Contract,
    pub verifiers: Vec<VerifierRecord>,
    /// The block the marketplace was created in: where a watcher of its events starts.
    pub block: u64,
    pub deployer: Contract,
    pub capacities: Vec<u32>,
    pub claim_window_secs: u64,
    pub keys: Vec<KeyRecord>,
    /// How the keys were made: `single-party` (this machine's OS randomness).
    pub setup: String,
    pub shale_version: String,
}

/// An address in both spellings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contract {
    pub address: Address,
    pub filecoin: String,
}

impl Contract {
    fn of(address: Address, chain_id: u64) -> Self {
        Self {
            address,
            filecoin: to_f4(address, Network::of_chain(chain_id)),
        }
    }
}

/// One capacity's verifier on chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifierRecord {
    pub capacity: u32,
    pub address: Address,
    pub filecoin: String,
}

/// One capacity's key files, with the hashes an SP checks a downloaded proving key against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub capacity: u32,
    pub proving_key: PathBuf,
    pub proving_key_keccak256: B256,
    pub verifying_key_keccak256: B256,
    /// Found in the keys folder rather than made by this run.
    pub reused: bool,
}

/// The files `shale deploy` writes into `--out`.
pub const CLIENT_TOML: &str = "client.toml";
pub const GATEWAY_TOML: &str = "gateway.toml";
pub const DEPLOYMENT_JSON: &str = "deployment.json";

/// What a node may take to answer one call (a hosted Calibration endpoint can be slow).
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// The warning every deployment prints: the keys' trust rests on whoever ran the set-up.
const SINGLE_PARTY_WARNING: &str = "warning: the claim keys come from a single-party Groth16 \
set-up on this machine. Whoever ran it (you) could forge claim proofs and be paid from any \
order's escrow. That is acceptable on a testnet; a mainnet deployment needs keys from a \
multi-party ceremony, which `shale deploy` does not run (see the README, \"Run on Calibration\").";

/// `shale deploy`.
pub async fn run(req: &DeployRequest, json: bool) -> anyhow::Result<()> {
    check_capacities(&req.capacities)?;
    ensure!(
        req.claim_window_secs > 0,
        "--claim-window must be at least 1 second"
    );
    std::fs::create_dir_all(&req.out_dir)
        .with_context(|| format!("creating the output folder {}", req.out_dir.display()))?;
    let outputs = [CLIENT_TOML, GATEWAY_TOML, DEPLOYMENT_JSON].map(|f| req.out_dir.join(f));
    if !req.force {
        refuse_existing(&outputs)?;
    }

    let endpoint = Marketplace::redact_url(&req.rpc_url);
    let node = Node::connect(&req.rpc_url)?;
    let chain_id = node.chain_id().await?;
    check_chain(req.chain, chain_id, &endpoint, req.yes)?;
    let network = Network::of_chain(chain_id);
    let signer = load_signer(req.keystore.as_deref())?;
    let deployer = signer.address();
    eprintln!(
        "✔ {endpoint} is chain {chain_id} ({}); deployer {deployer:#x} ({})",
        req.chain.name(),
        to_f4(deployer, network)
    );

    let keys_dir = match &req.keys_dir {
        Some(d) => d.clone(),
        None => shale_provisioner::image_build::shale_home()
            .join("keys")
            .join(req.chain.name()),
    };
    let started = Instant::now();
    let keys = {
        let (dir, caps) = (keys_dir.clone(), req.capacities.clone());
        tokio::task::spawn_blocking(move || claim_keys(&dir, &caps))
            .await
            .context("the key set-up thread")??
    };
    let keys_dir = std::fs::canonicalize(&keys_dir)?;
    eprintln!(
        "✔ claim keys for capacities {:?} in {} ({} made, {} reused; {:.1} s, verifiers compiled)",
        req.capacities,
        keys_dir.display(),
        keys.iter().filter(|k| !k.record.reused).count(),
        keys.iter().filter(|k| k.record.reused).count(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("{SINGLE_PARTY_WARNING}");

    let cost = node.estimate(deployer, &keys, req).await?;
    let balance = node.balance(deployer).await?;
    if balance < cost.total {
        bail!(
            "the deployer {deployer:#x} ({}) holds {} FIL on chain {chain_id}, but deploying {} \
             verifier(s) and the marketplace may cost up to {} FIL ({} gas at up to {} attoFIL \
             per gas, headroom included): fund the account (Calibration: the faucet) and run \
             again; nothing was sent",
            to_f4(deployer, network),
            format_fil(balance),
            keys.len(),
            format_fil(cost.total),
            cost.gas,
            cost.max_fee_per_gas
        );
    }
    eprintln!(
        "✔ balance {} FIL covers the estimate of at most {} FIL",
        format_fil(balance),
        format_fil(cost.total)
    );

    let mut verifiers = Vec::with_capacity(keys.len());
    for key in &keys {
        let address = devnet::deploy_bytecode(
            &req.rpc_url,
            signer.clone(),
            Bytes::from(key.verifier.clone()),
        )
        .await
        .with_context(|| format!("deploying the verifier of capacity {}", key.capacity))?;
        eprintln!(
            "✔ verifier for batches of {} at {address:#x} ({})",
            key.capacity,
            to_f4(address, network)
        );
        verifiers.push(address);
    }
    let before = node.block_number().await?;
    let marketplace = deploy_marketplace(&req.rpc_url, signer, req, &verifiers).await?;
    let block = node.creation_block(marketplace, before).await;
    let market = Marketplace::connect(&req.rpc_url, marketplace, None)
        .await
        .context("reading the new marketplace back")?;
    let on_chain = market.batch_capacities().await?;
    ensure!(
        on_chain == req.capacities,
        "the marketplace at {marketplace:#x} reports capacities {on_chain:?}, not {:?}",
        req.capacities
    );

    let record = DeploymentRecord {
        chain: req.chain.name().into(),
        chain_id,
        rpc_endpoint: endpoint,
        marketplace: Contract::of(marketplace, chain_id),
        verifiers: keys
            .iter()
            .zip(&verifiers)
            .map(|(k, &address)| VerifierRecord {
                capacity: k.capacity,
                address,
                filecoin: to_f4(address, network),
            })
            .collect(),
        block,
        deployer: Contract::of(deployer, chain_id),
        capacities: req.capacities.clone(),
        claim_window_secs: req.claim_window_secs,
        keys: keys.iter().map(|k| k.record.clone()).collect(),
        setup: "single-party".into(),
        shale_version: env!("CARGO_PKG_VERSION").into(),
    };
    // The record first: it alone names everything that now exists on chain.
    let [client_path, gateway_path, record_path] = &outputs;
    write_new(
        record_path,
        &serde_json::to_vec_pretty(&record)?,
        0o644,
        req.force,
    )?;
    write_new(
        client_path,
        client_toml(req, chain_id, marketplace)?.as_bytes(),
        0o600,
        req.force,
    )?;
    write_new(
        gateway_path,
        gateway_toml(req, chain_id, marketplace, &keys_dir).as_bytes(),
        0o600,
        req.force,
    )?;

    if json {
        return print_json(&record);
    }
    println!(
        "Marketplace deployed on {} (chain {chain_id}) in block {block}:",
        req.chain.name()
    );
    println!(
        "  marketplace  {marketplace:#x}  {}",
        record.marketplace.filecoin
    );
    for v in &record.verifiers {
        println!(
            "  verifier {:<4} {:#x}  {}",
            v.capacity, v.address, v.filecoin
        );
    }
    println!("  deployer     {deployer:#x}  {}", record.deployer.filecoin);
    println!("  proving keys {}", keys_dir.display());
    println!("Wrote:");
    println!(
        "  {}  (clients: SHALE_CONFIG={0} shale providers)",
        client_path.display()
    );
    println!(
        "  {}  (SP skeleton: fill every FILL-IN, then shale sp register --config {0})",
        gateway_path.display()
    );
    println!("  {}", record_path.display());
    Ok(())
}

/// Capacities the contract takes: at least one, none zero, none twice.
fn check_capacities(capacities: &[u32]) -> anyhow::Result<()> {
    ensure!(
        !capacities.is_empty(),
        "--capacities names no batch capacity (e.g. --capacities 16,64,256)"
    );
    for (i, c) in capacities.iter().enumerate() {
        ensure!(*c > 0, "batch capacity 0 is not a circuit: use 1 or more");
        ensure!(
            !capacities[..i].contains(c),
            "batch capacity {c} is named twice in --capacities"
        );
    }
    Ok(())
}

fn refuse_existing(paths: &[PathBuf]) -> anyhow::Result<()> {
    let existing: Vec<String> = paths
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    ensure!(
        existing.is_empty(),
        "{} already exist(s): deploying would overwrite them; choose another --out folder or \
         pass --force; nothing was sent",
        existing.join(", ")
    );
    Ok(())
}

/// The node must be the chain `--chain` names, and mainnet needs `--yes`.
fn check_chain(chain: Chain, actual: u64, endpoint: &str, yes: bool) -> anyhow::Result<()> {
    if actual != chain.id() {
        bail!(
            "--chain {} expects chain id {}, but {endpoint} is chain {actual}; nothing was sent",
            chain.name(),
            chain.id()
        );
    }
    if chain == Chain::Mainnet && !yes {
        bail!(
            "--chain mainnet deploys with real FIL and the single-party keys of this machine \
             (mainnet needs a set-up ceremony; see the README): pass --yes if you mean it; \
             nothing was sent"
        );
    }
    Ok(())
}

/// One capacity's keys and its verifier's creation code.
struct ClaimKey {
    capacity: u32,
    verifier: Vec<u8>,
    record: KeyRecord,
}

/// The keys of every capacity in `dir` (`tick-N.pk`, `tick-N.vk`, what the settler's `key_dir`
/// holds): reused when present and matching, otherwise made with OS randomness.
fn claim_keys(dir: &Path, capacities: &[u32]) -> anyhow::Result<Vec<ClaimKey>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    capacities
        .iter()
        .map(|&capacity| {
            let (vk, reused) = ensure_key_pair(dir, capacity)?;
            let pk_path = dir.join(format!("tick-{capacity}.pk"));
            let vk_path = dir.join(format!("tick-{capacity}.vk"));
            let verifier = shale_circuits::solc::compile_verifier(&vk)
                .context("compiling the Solidity verifier with solc-js (run scripts/setup.sh)")?;
            Ok(ClaimKey {
                capacity,
                verifier,
                record: KeyRecord {
                    capacity,
                    proving_key_keccak256: keccak_file(&pk_path)?,
                    verifying_key_keccak256: keccak_file(&vk_path)?,
                    proving_key: std::fs::canonicalize(&pk_path)?,
                    reused,
                },
            })
        })
        .collect()
}

/// The verifying key of `capacity` in `dir`, and whether the pair was there already.
fn ensure_key_pair(dir: &Path, capacity: u32) -> anyhow::Result<(VerifyingKey, bool)> {
    let pk_path = dir.join(format!("tick-{capacity}.pk"));
    let vk_path = dir.join(format!("tick-{capacity}.vk"));
    let mismatch = |why: &str| {
        anyhow::anyhow!(
            "the keys of capacity {capacity} in {}: {why}; move the folder's keys away or \
             choose another --keys folder",
            dir.display()
        )
    };
    if pk_path.exists() {
        let pk =
            ProvingKey::read(&pk_path).with_context(|| format!("reading {}", pk_path.display()))?;
        if pk.capacity() != capacity as usize {
            return Err(mismatch(&format!(
                "{} is a key for capacity {}",
                pk_path.display(),
                pk.capacity()
            )));
        }
        let vk = pk.verifying_key();
        if vk_path.exists() {
            let written = VerifyingKey::read(&vk_path)
                .with_context(|| format!("reading {}", vk_path.display()))?;
            if written.capacity() != vk.capacity() || written.inner() != vk.inner() {
                return Err(mismatch(&format!(
                    "{} is not the verifying key of {}",
                    vk_path.display(),
                    pk_path.display()
                )));
            }
        } else {
            vk.write(&vk_path)
                .with_context(|| format!("writing {}", vk_path.display()))?;
        }
        return Ok((vk, true));
    }
    if vk_path.exists() {
        return Err(mismatch(&format!(
            "{} has no proving key beside it",
            vk_path.display()
        )));
    }
    let (pk, vk) = shale_circuits::setup_with_os_rng(capacity as usize)
        .with_context(|| format!("the Groth16 set-up for capacity {capacity}"))?;
    pk.write(&pk_path)
        .with_context(|| format!("writing {}", pk_path.display()))?;
    vk.write(&vk_path)
        .with_context(|| format!("writing {}", vk_path.display()))?;
    Ok((vk, false))
}

fn keccak_file(path: &Path) -> anyhow::Result<B256> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = alloy_primitives::Keccak256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize())
}

/// The most the deployment may cost, as the node estimates it.
struct Cost {
    gas: u64,
    max_fee_per_gas: u128,
    total: U256,
}

/// A plain, read-only connection to the node (no marketplace exists yet to connect to).
struct Node {
    url: String,
    endpoint: String,
    provider: DynProvider,
}

impl Node {
    fn connect(rpc_url: &str) -> anyhow::Result<Self> {
        let url: reqwest::Url = rpc_url.trim().parse().map_err(|e| {
            ChainError::InvalidInput(format!("the RPC URL is not a URL ({e}); check --rpc-url"))
        })?;
        let http = reqwest::Client::builder()
            .timeout(RPC_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building an HTTP client")?;
        Ok(Self {
            url: url.to_string(),
            endpoint: Marketplace::redact_url(rpc_url),
            provider: ProviderBuilder::new().connect_reqwest(http, url).erased(),
        })
    }

    /// An RPC failure as the rest of Shale reports it (exit 3 when the node is unreachable),
    /// with the URL, which may hold an API key, cut to its endpoint.
    fn err(&self, e: alloy::transports::TransportError) -> ChainError {
        let scrub = |s: String| s.replace(&self.url, &self.endpoint);
        match e {
            alloy::transports::RpcError::Transport(kind) => ChainError::Unreachable {
                url: self.endpoint.clone(),
                reason: scrub(kind.to_string()),
            },
            other => ChainError::Rpc(scrub(other.to_string())),
        }
    }

    async fn chain_id(&self) -> Result<u64, ChainError> {
        self.provider.get_chain_id().await.map_err(|e| self.err(e))
    }

    async fn balance(&self, who: Address) -> Result<U256, ChainError> {
        self.provider
            .get_balance(who)
            .await
            .map_err(|e| self.err(e))
    }

    async fn block_number(&self) -> Result<u64, ChainError> {
        self.provider
            .get_block_number()
            .await
            .map_err(|e| self.err(e))
    }

    /// The gas of every creation (the marketplace's with stand-in verifier addresses: its
    /// constructor only checks they are not zero) at the fee cap the transactions will carry.
    async fn estimate(
        &self,
        from: Address,
        keys: &[ClaimKey],
        req: &DeployRequest,
    ) -> anyhow::Result<Cost> {
        let policy = FeePolicy::default();
        let mut gas = 0u64;
        for key in keys {
            let tx = TransactionRequest::default()
                .with_from(from)
                .with_deploy_code(Bytes::from(key.verifier.clone()));
            let estimate = self
                .provider
                .estimate_gas(tx)
                .await
                .map_err(|e| self.err(e))
                .with_context(|| format!("estimating the verifier of capacity {}", key.capacity))?;
            gas = gas.saturating_add(policy.gas_limit(estimate));
        }
        let stand_ins: Vec<Address> = (1..=keys.len())
            .map(|i| Address::left_padding_from(&(i as u64).to_be_bytes()))
            .collect();
        let estimate = bindings::Marketplace::deploy_builder(
            &self.provider,
            req.capacities.clone(),
            stand_ins,
            req.claim_window_secs,
        )
        .from(from)
        .estimate_gas()
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replace(&self.url, &self.endpoint)))
        .context("estimating the marketplace's creation")?;
        gas = gas.saturating_add(policy.gas_limit(estimate));
        let fees = self
            .provider
            .estimate_eip1559_fees()
            .await
            .map_err(|e| self.err(e))
            .context("estimating the fee per gas")?;
        let max_fee_per_gas = policy.max_fee(fees.max_fee_per_gas);
        Ok(Cost {
            gas,
            max_fee_per_gas,
            total: U256::from(gas) * U256::from(max_fee_per_gas),
        })
    }

    /// The first block after `before` with the contract's code: its creation block. A node that
    /// keeps no state history answers only for the latest; then `before + 1`, still a block no
    /// event of the contract precedes.
    async fn creation_block(&self, contract: Address, before: u64) -> u64 {
        let latest = self.block_number().await.unwrap_or(before + 1);
        for block in (before + 1)..=latest.min(before + 1000) {
            match self.provider.get_code_at(contract).number(block).await {
                Ok(code) if !code.is_empty() => return block,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(error = %self.err(e), block, "no state history");
                    break;
                }
            }
        }
        before + 1
    }
}

async fn deploy_marketplace(
    rpc_url: &str,
    signer: PrivateKeySigner,
    req: &DeployRequest,
    verifiers: &[Address],
) -> anyhow::Result<Address> {
    let address = devnet::deploy_with_claim_window(
        rpc_url,
        signer,
        &req.capacities,
        verifiers,
        req.claim_window_secs,
    )
    .await
    .context("deploying the marketplace (the verifiers above are deployed; run again to retry)")?;
    Ok(address)
}

/// Writes `path` with `mode`; never over an existing file unless `force`.
fn write_new(path: &Path, contents: &[u8], mode: u32, force: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).with_context(|| {
        format!(
            "writing {} (its contents are printed below)",
            path.display()
        )
    })?;
    file.write_all(contents)?;
    Ok(())
}

/// The client config: the chain and the marketplace (the RPC URL may carry an API key, hence
/// mode 0600).
fn client_toml(req: &DeployRequest, chain_id: u64, marketplace: Address) -> anyhow::Result<String> {
    let config = ClientConfig {
        rpc_url: Some(req.rpc_url.clone()),
        marketplace: Some(AnyAddress(marketplace)),
        ..ClientConfig::default()
    };
    Ok(format!(
        "# Written by `shale deploy --chain {}`: the marketplace on chain id {chain_id} ({}).\n\
         # Use it with SHALE_CONFIG=<this file>, or copy it to ~/.config/shale/config.toml; add\n\
         # keystore = \"/path/to/wallet.json\" for the key that signs orders.\n{}",
        req.chain.name(),
        to_f4(marketplace, Network::of_chain(chain_id)),
        toml::to_string(&config)?
    ))
}

/// A TOML string literal.
fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// The SP's config skeleton: everything `shale deploy` knows filled in, every choice only the
/// SP can make marked `FILL-IN`. Until the provider address is filled in the file does not
/// load, so no command acts on a half-written config.
pub(crate) fn gateway_toml(
    req: &DeployRequest,
    chain_id: u64,
    marketplace: Address,
    keys_dir: &Path,
) -> String {
    let network = Network::of_chain(chain_id);
    let capacities = req
        .capacities
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"# Written by `shale deploy --chain {chain}` (chain id {chain_id}): an SP config skeleton for
# this marketplace. Complete every line marked FILL-IN, then `shale sp register --config FILE`
# and `shale gateway --config FILE`. Every field is documented in gateway/gateway.example.toml
# (installed as /usr/share/doc/shale/gateway.example.toml).

# Where SSH clients connect; open this port in the firewall.
listen = "0.0.0.0:2222"
host_key = "/var/lib/shale/host_ed25519"
state_dir = "/var/lib/shale"

[chain]
rpc_url = {rpc_url}
# {marketplace_f4}
marketplace = "{marketplace:#x}"
# FILL-IN: this SP's address (0x… or {prefix}410f…), whose key signs claims and registration
# (SHALE_KEYSTORE, or keystore in [sp]). It must hold FIL for gas and order collateral.
provider = "FILL-IN-provider-address"

[containers]
# FILL-IN (optional): containerd socket, namespace, image; the defaults suit a Debian host.

[containers.datasets]
# FILL-IN: dataset id -> its Filecoin piece (`shale sp commp FILE` prints the CID), e.g.
# mnist = {{ piece_cid = "baga6ea4seaq...", source = "/srv/filecoin/unsealed/mnist.car" }}

[sp]
# FILL-IN: the public host:port clients dial (registered on chain).
endpoint = "FILL-IN.invalid:2222"

# FILL-IN: what you offer and its price; uncomment and edit.
# [sp.offer]
# cpus = 8
# memory = "32GiB"
# disk = "100GiB"
# max_disk = "500GiB"
# gpu_model = ""
# gpu_count = 0
# price_per_hour = "0.36FIL"   # a whole number of wei per second (this is 10^14)
# price_per_gib = "0.001FIL"

[sp.settler]
# The proving keys `shale deploy` made (tick-N.pk per capacity). On the SP's machine: copy them
# there, check them against the keccak256 hashes in deployment.json, and change this path.
key_dir = {key_dir}
capacities = [{capacities}]
"#,
        chain = req.chain.name(),
        rpc_url = quoted(&req.rpc_url),
        marketplace_f4 = to_f4(marketplace, network),
        prefix = network.prefix(),
        key_dir = quoted(&keys_dir.display().to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spconfig::SpConfig;

    fn request(out: &Path) -> DeployRequest {
        DeployRequest {
            rpc_url: "https://user:secret@api.calibration.node.glif.io/rpc/v1".into(),
            chain: Chain::Calibration,
            capacities: vec![16, 64],
            claim_window_secs: 86_400,
            keys_dir: None,
            out_dir: out.to_path_buf(),
            force: false,
            yes: false,
            keystore: None,
        }
    }

    #[test]
    fn a_chain_id_mismatch_and_mainnet_without_yes_are_refused_in_words() {
        let err = check_chain(Chain::Calibration, 31337, "http://127.0.0.1:8545", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "--chain calibration expects chain id 314159, but http://127.0.0.1:8545 is chain 31337"
            ),
            "{err}"
        );
        let err = check_chain(Chain::Mainnet, 314, "x", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--yes") && err.contains("real FIL"), "{err}");
        check_chain(Chain::Mainnet, 314, "x", true).unwrap();
        check_chain(Chain::Dev, 31337, "x", false).unwrap();
    }

    #[test]
    fn the_command_line_takes_a_list_of_capacities_and_the_global_node_and_keystore() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from([
            "shale",
            "deploy",
            "--rpc-url",
            "http://node:1234",
            "--keystore",
            "/k.json",
            "--chain",
            "calibration",
            "--capacities",
            "1,16",
        ])
        .unwrap();
        let crate::Command::Deploy(args) = cli.command else {
            panic!("not the deploy command");
        };
        let req = args.request(&cli.chain).unwrap();
        assert_eq!(req.rpc_url, "http://node:1234");
        assert_eq!(req.capacities, vec![1, 16]);
        assert_eq!(req.chain.id(), 314_159);
        assert_eq!(req.keystore.as_deref(), Some(Path::new("/k.json")));
        assert_eq!(req.claim_window_secs, devnet::DEFAULT_CLAIM_WINDOW_SECS);
        assert!(!req.force && !req.yes);
        assert!(crate::Cli::try_parse_from(["shale", "deploy", "--chain", "goerli"]).is_err());
    }

    #[test]
    fn capacities_must_be_nonzero_distinct_and_present() {
        check_capacities(&[1, 16, 256]).unwrap();
        for bad in [&[][..], &[0][..], &[16, 64, 16][..]] {
            assert!(check_capacities(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_gateway_skeleton_loads_only_once_its_provider_is_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path());
        let market: Address = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
            .parse()
            .unwrap();
        let keys = dir.path().join("keys dir \"quoted\"");
        let text = gateway_toml(&req, 314_159, market, &keys);
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, &text).unwrap();
        let err = format!("{:#}", SpConfig::load(&path).unwrap_err());
        assert!(err.contains("FILL-IN-provider-address"), "{err}");

        let filled = text.replace(
            "FILL-IN-provider-address",
            "t410fl663emkwpcx6zm3h6aznsp3ef5sbqcvdf5mfrna",
        );
        std::fs::write(&path, filled).unwrap();
        let config = SpConfig::load(&path).unwrap();
        assert_eq!(config.gateway.chain.marketplace, market);
        assert_eq!(config.gateway.chain.rpc_url, req.rpc_url);
        let settler = config.sp.settler.as_ref().unwrap();
        assert_eq!(settler.key_dir.as_deref(), Some(keys.as_path()));
        assert_eq!(settler.capacities, vec![16, 64]);
        // The offer stays the SP's to write: registering says so.
        assert!(config.offer().is_err());
    }

    #[test]
    fn the_client_config_loads_and_names_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path());
        let market: Address = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
            .parse()
            .unwrap();
        let path = dir.path().join(CLIENT_TOML);
        std::fs::write(&path, client_toml(&req, 314_159, market).unwrap()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("chain id 314159"), "{text}");
        assert!(
            text.contains("t410fl663emkwpcx6zm3h6aznsp3ef5sbqcvdf5mfrna"),
            "{text}"
        );
        let config = ClientConfig::load(&path).unwrap();
        assert_eq!(config.rpc_url.as_deref(), Some(req.rpc_url.as_str()));
        assert_eq!(config.marketplace.map(Address::from), Some(market));
    }

    #[test]
    fn existing_files_are_not_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLIENT_TOML);
        std::fs::write(&path, "mine").unwrap();
        let err = refuse_existing(std::slice::from_ref(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--force"), "{err}");
        assert!(write_new(&path, b"new", 0o600, false).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine");
        write_new(&path, b"new", 0o600, true).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
    fn keys_are_reused_when_they_match_and_refused_when_they_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (made, reused) = ensure_key_pair(dir.path(), 1).unwrap();
        assert!(!reused);
        let (again, reused) = ensure_key_pair(dir.path(), 1).unwrap();
        assert!(reused);
        assert!(made.inner() == again.inner());
        // Another set-up's verifying key beside this proving key.
        let (_, other) = shale_circuits::setup_from_seed(1, 9).unwrap();
        other.write(&dir.path().join("tick-1.vk")).unwrap();
        let err = ensure_key_pair(dir.path(), 1).unwrap_err().to_string();
        assert!(err.contains("is not the verifying key"), "{err}");
        // A proving key under another capacity's name.
        std::fs::rename(dir.path().join("tick-1.pk"), dir.path().join("tick-2.pk")).unwrap();
        let err = ensure_key_pair(dir.path(), 2).unwrap_err().to_string();
        assert!(err.contains("capacity 1"), "{err}");
    }
}
