//! A local chain for development and tests: a real `anvil` process on a free port, its
//! deterministic dev accounts as signers, and deployment of the marketplace.
//!
//! `shale dev up` and every crate's integration tests start one with [`Devnet::start`]; the
//! process is killed when the [`Devnet`] is dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::{Provider as _, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use tracing::{debug, info};

use crate::bindings::{test_only::TestTickVerifier, Marketplace as abi};
use crate::error::ChainError;

/// How long anvil may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a devnet could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevnetError {
    #[error("anvil was not found: install it with scripts/setup.sh (into .tools/bin), put it on PATH, or set SHALE_ANVIL")]
    AnvilNotFound,
    #[error("could not start anvil at {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("anvil did not report a listening address within {0:?}")]
    StartTimeout(Duration),
    #[error("anvil exited before it listened; its output was:\n{0}")]
    Exited(String),
    #[error("anvil printed an unusable private key: {0}")]
    BadKey(String),
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// Settings of a devnet; the defaults suit tests.
#[derive(Debug, Clone)]
pub struct DevnetOptions {
    /// Number of funded dev accounts (anvil's deterministic mnemonic).
    pub accounts: usize,
    /// Ether per account.
    pub balance_eth: u64,
    /// Mine a block every this many seconds; `None` mines one per transaction.
    pub block_time_secs: Option<u64>,
    /// Chain id (anvil's default, 31337).
    pub chain_id: u64,
    /// Listen on this port; 0 lets the OS pick a free one.
    pub port: u16,
    /// Explicit anvil binary; otherwise `SHALE_ANVIL`, PATH, then `<repo>/.tools/bin/anvil`.
    pub anvil: Option<PathBuf>,
}

impl Default for DevnetOptions {
    fn default() -> Self {
        Self {
            accounts: 10,
            balance_eth: 10_000,
            block_time_secs: None,
            chain_id: 31337,
            port: 0,
            anvil: None,
        }
    }
}

/// A running anvil. Dropping it kills the process.
pub struct Devnet {
    child: Child,
    rpc_url: String,
    port: u16,
    signers: Vec<PrivateKeySigner>,
    chain_id: u64,
}

impl std::fmt::Debug for Devnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devnet")
            .field("rpc_url", &self.rpc_url)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Devnet {
    /// Starts anvil with the default options on a free port.
    pub async fn start() -> Result<Self, DevnetError> {
        Self::start_with(DevnetOptions::default()).await
    }

    /// Starts anvil with `options` and waits until it listens.
    pub async fn start_with(options: DevnetOptions) -> Result<Self, DevnetError> {
        let anvil = match &options.anvil {
            Some(path) => path.clone(),
            None => find_anvil().ok_or(DevnetError::AnvilNotFound)?,
        };
        let mut cmd = Command::new(&anvil);
        cmd.args(["--host", "127.0.0.1", "--port"])
            .arg(options.port.to_string())
            .arg("--accounts")
            .arg(options.accounts.to_string())
            .arg("--balance")
            .arg(options.balance_eth.to_string())
            .arg("--chain-id")
            .arg(options.chain_id.to_string());
        if let Some(secs) = options.block_time_secs {
            cmd.arg("--block-time").arg(secs.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| DevnetError::Spawn {
                path: anvil.clone(),
                source,
            })?;

        // anvil prints its keys, then "Listening on HOST:PORT". A thread reads that banner and
        // then keeps draining stdout so that anvil never blocks on a full pipe.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel::<Result<(u16, Vec<String>), String>>();
        std::thread::Builder::new()
            .name("anvil-stdout".into())
            .spawn(move || read_banner(stdout, tx))
            .map_err(|source| DevnetError::Spawn {
                path: anvil.clone(),
                source,
            })?;
        let banner = tokio::task::spawn_blocking(move || rx.recv_timeout(START_TIMEOUT))
            .await
            .ok()
            .and_then(|r| r.ok());
        let (port, keys) = match banner {
            Some(Ok(found)) => found,
            Some(Err(output)) => {
                kill(&mut child);
                return Err(DevnetError::Exited(output));
            }
            None => {
                kill(&mut child);
                return Err(DevnetError::StartTimeout(START_TIMEOUT));
            }
        };
        let mut signers = Vec::with_capacity(keys.len());
        for key in keys {
            match key.parse::<PrivateKeySigner>() {
                Ok(signer) => signers.push(signer),
                Err(_) => {
                    kill(&mut child);
                    return Err(DevnetError::BadKey(key));
                }
            }
        }
        let rpc_url = format!("http://127.0.0.1:{port}");
        info!(%rpc_url, pid = child.id(), "devnet started");
        Ok(Self {
            child,
            rpc_url,
            port,
            signers,
            chain_id: options.chain_id,
        })
    }

    /// The JSON-RPC URL (`http://127.0.0.1:PORT`).
    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    /// The port anvil listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// The funded dev accounts, in anvil's order (account 0 is the usual deployer).
    pub fn signers(&self) -> &[PrivateKeySigner] {
        &self.signers
    }

    /// Dev account `index` as a signer. Panics when the devnet has fewer accounts.
    pub fn signer(&self, index: usize) -> PrivateKeySigner {
        self.signers[index].clone()
    }

    /// Moves the chain's clock forward by `secs` and mines a block, so that the next
    /// transaction sees the new time.
    pub async fn advance_time(&self, secs: u64) -> Result<(), ChainError> {
        let provider = self.read_provider()?;
        let err = |e| ChainError::from_rpc(&self.rpc_url, e);
        let _: serde_json::Value = provider
            .raw_request("evm_increaseTime".into(), (secs,))
            .await
            .map_err(err)?;
        let _: serde_json::Value = provider
            .raw_request("evm_mine".into(), ())
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Deploys the test-only claim verifier (see [`crate::bindings::test_only`]) from account 0.
    pub async fn deploy_test_verifier(&self) -> Result<Address, ChainError> {
        deploy_test_verifier(&self.rpc_url, self.signer(0)).await
    }

    /// Deploys the marketplace from account 0 with the given verifier per batch capacity.
    pub async fn deploy_marketplace(
        &self,
        batch_capacities: &[u32],
        verifiers: &[Address],
    ) -> Result<Address, ChainError> {
        deploy(&self.rpc_url, self.signer(0), batch_capacities, verifiers).await
    }

    /// Deploys the test-only verifier for each capacity and a marketplace using them: the
    /// one-call set-up of a test.
    pub async fn deploy_marketplace_with_test_verifier(
        &self,
        batch_capacities: &[u32],
    ) -> Result<Address, ChainError> {
        let verifier = self.deploy_test_verifier().await?;
        let verifiers = vec![verifier; batch_capacities.len()];
        self.deploy_marketplace(batch_capacities, &verifiers).await
    }

    /// The marketplace at `market`, signing as dev account `account`.
    pub async fn marketplace_as(
        &self,
        market: Address,
        account: usize,
    ) -> Result<crate::Marketplace, ChainError> {
        crate::Marketplace::connect(&self.rpc_url, market, Some(self.signer(account))).await
    }

    fn read_provider(&self) -> Result<impl alloy::providers::Provider, ChainError> {
        let url = self
            .rpc_url
            .parse()
            .map_err(|e| ChainError::InvalidInput(format!("bad RPC URL: {e}")))?;
        Ok(ProviderBuilder::new().connect_http(url))
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        debug!(pid = self.child.id(), "stopping devnet");
        kill(&mut self.child);
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads anvil's banner: the private keys and the listening port. Sends `Err(output)` when
/// stdout closes before the port was printed (anvil failed to start).
fn read_banner(
    stdout: std::process::ChildStdout,
    tx: mpsc::Sender<Result<(u16, Vec<String>), String>>,
) {
    let mut reader = BufReader::new(stdout);
    let mut seen = String::new();
    let mut keys = Vec::new();
    let mut in_keys = false;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => {
                let _ = tx.send(Err(seen));
                return;
            }
            Ok(_) => {}
        }
        seen.push_str(&line);
        let text = line.trim();
        if text == "Private Keys" {
            in_keys = true;
        } else if in_keys && text.starts_with('(') {
            if let Some(key) = text.split_whitespace().nth(1) {
                keys.push(key.to_string());
            }
        } else if text == "Wallet" {
            in_keys = false;
        } else if let Some(addr) = text.strip_prefix("Listening on ") {
            let port = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
            match port {
                Some(port) => {
                    let _ = tx.send(Ok((port, std::mem::take(&mut keys))));
                    break;
                }
                None => {
                    let _ = tx.send(Err(seen));
                    return;
                }
            }
        }
    }
    // Drain the rest so anvil never blocks writing its per-transaction log.
    let mut sink = std::io::sink();
    let _ = std::io::copy(&mut reader, &mut sink);
}

/// Where anvil is: `SHALE_ANVIL`, then `PATH`, then `.tools/bin/anvil` (where
/// `scripts/setup.sh` installs it) in the folder of the running binary or one above it (a
/// checkout's `target/…/shale`, or an install laid out as `PREFIX/bin/shale` beside
/// `PREFIX/.tools`), then in the working directory or one above it. Never through the folder
/// this crate was built in: a binary runs after its checkout is gone.
pub fn find_anvil() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SHALE_ANVIL") {
        return Some(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("anvil");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let mut starts = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        starts.push(dir);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    for start in starts {
        for dir in start.ancestors() {
            let candidate = dir.join(".tools/bin/anvil");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Deploys the marketplace with `signer`, one verifier per batch capacity; returns its address.
/// The verifier set is fixed for the contract's lifetime.
/// How long after a lease ends the provider may still claim, unless the deployer chooses
/// otherwise: a day.
pub const DEFAULT_CLAIM_WINDOW_SECS: u64 = 86_400;

pub async fn deploy(
    rpc_url: &str,
    signer: PrivateKeySigner,
    batch_capacities: &[u32],
    verifiers: &[Address],
) -> Result<Address, ChainError> {
    deploy_with_claim_window(
        rpc_url,
        signer,
        batch_capacities,
        verifiers,
        DEFAULT_CLAIM_WINDOW_SECS,
    )
    .await
}

/// Like [`deploy`], with the claim window (seconds after a lease's end during which the
/// provider may still claim) chosen by the deployer.
pub async fn deploy_with_claim_window(
    rpc_url: &str,
    signer: PrivateKeySigner,
    batch_capacities: &[u32],
    verifiers: &[Address],
    claim_window_secs: u64,
) -> Result<Address, ChainError> {
    if batch_capacities.len() != verifiers.len() {
        return Err(ChainError::InvalidInput(format!(
            "{} batch capacities but {} verifiers",
            batch_capacities.len(),
            verifiers.len()
        )));
    }
    let provider = signing_provider(rpc_url, signer)?;
    let address = abi::deploy_builder(
        &provider,
        batch_capacities.to_vec(),
        verifiers.to_vec(),
        claim_window_secs,
    )
    .deploy()
    .await
    .map_err(|e| ChainError::from_contract(rpc_url, Address::ZERO, e))?;
    info!(%address, capacities = ?batch_capacities, "marketplace deployed");
    Ok(address)
}

/// Deploys the test-only verifier. Never use it on a real chain: it accepts hash "proofs".
pub async fn deploy_test_verifier(
    rpc_url: &str,
    signer: PrivateKeySigner,
) -> Result<Address, ChainError> {
    let provider = signing_provider(rpc_url, signer)?;
    TestTickVerifier::deploy_builder(&provider)
        .deploy()
        .await
        .map_err(|e| ChainError::from_contract(rpc_url, Address::ZERO, e))
}

/// Deploys raw creation bytecode (e.g. a Groth16 verifier the circuits crate generated and
/// compiled) and returns the new contract's address.
pub async fn deploy_bytecode(
    rpc_url: &str,
    signer: PrivateKeySigner,
    creation_code: Bytes,
) -> Result<Address, ChainError> {
    use alloy::network::TransactionBuilder;
    let provider = signing_provider(rpc_url, signer)?;
    let tx = alloy::rpc::types::TransactionRequest::default()
        .with_deploy_code(creation_code)
        .with_value(U256::ZERO);
    let receipt = provider
        .send_transaction(tx)
        .await
        .map_err(|e| ChainError::from_rpc(rpc_url, e))?
        .get_receipt()
        .await
        .map_err(|e| ChainError::Rpc(e.to_string()))?;
    succeeded(receipt, "contract creation reverted")?
        .contract_address
        .ok_or_else(|| ChainError::Decode("deployment receipt has no contract address".into()))
}

/// `receipt` if its transaction succeeded, else `TxReverted` with `reason`.
pub(crate) fn succeeded(
    receipt: alloy::rpc::types::TransactionReceipt,
    reason: &str,
) -> Result<alloy::rpc::types::TransactionReceipt, ChainError> {
    if receipt.status() {
        return Ok(receipt);
    }
    Err(ChainError::TxReverted {
        tx: receipt.transaction_hash,
        reason: reason.into(),
    })
}

fn signing_provider(
    rpc_url: &str,
    signer: PrivateKeySigner,
) -> Result<alloy::providers::DynProvider, ChainError> {
    let url = rpc_url
        .parse()
        .map_err(|e| ChainError::InvalidInput(format!("bad RPC URL {rpc_url:?}: {e}")))?;
    Ok(crate::client::signing_provider(
        signer,
        alloy::transports::http::reqwest::Client::new(),
        url,
        crate::FeePolicy::default(),
    ))
}
