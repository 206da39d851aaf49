//! The typed marketplace client: reads orders and providers, sends the transactions of both
//! sides, and watches the contract's events.

use std::sync::Arc;
use std::time::Duration;

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, PendingTransactionError, Provider as _, ProviderBuilder};
use alloy::rpc::types::TransactionReceipt;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use alloy::transports::http::reqwest;
use futures::StreamExt;
use tracing::{debug, instrument};

use crate::bindings::Marketplace as abi;
use crate::bindings::ProviderRegistry as reg;
use crate::error::ChainError;
use crate::events::{EventStream, Watcher};
use crate::fees::{FeePolicy, PolicyGasFiller};
use crate::types::{
    u64_of, ClaimReceipt, ClaimRequest, Dataset, Image, NewOrder, Offer, Order, Provider,
    SignedAck, TxReceipt,
};

/// How long one RPC request may take before the endpoint counts as unreachable.
const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for a sent transaction to be mined.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default pause between two polls of the event watcher.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A connection to one deployed `Marketplace` contract, optionally with a signing key.
///
/// Cheap to clone: clones share the HTTP connection pool.
#[derive(Clone)]
pub struct Marketplace {
    rpc_url: String,
    address: Address,
    sender: Option<Address>,
    provider: DynProvider,
    contract: abi::MarketplaceInstance<DynProvider>,
    /// The provider registry the marketplace deployed (`Marketplace.registry()`).
    registry: reg::ProviderRegistryInstance<DynProvider>,
    poll_interval: Duration,
    /// Serialises sending (not mining): the nonce of each transaction is read from the node's
    /// pending count, which is only right when no other send of this signer is in flight.
    send_lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Marketplace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Marketplace")
            .field("rpc_url", &Self::redact_url(&self.rpc_url))
            .field("address", &self.address)
            .field("registry", self.registry.address())
            .field("sender", &self.sender)
            .finish()
    }
}

impl Marketplace {
    /// The longest reason (bytes of UTF-8) [`Marketplace::decline`] may give: the contract's
    /// `MAX_DECLINE_REASON`.
    pub const MAX_DECLINE_REASON: usize = 200;

    /// Connects to the marketplace at `address` through the JSON-RPC endpoint `rpc_url`.
    /// Without a signer the client can only read and watch.
    ///
    /// Checks that the endpoint answers and that a contract is deployed at `address`, so a wrong
    /// URL or address fails here rather than at the first order.
    pub async fn connect(
        rpc_url: &str,
        address: Address,
        signer: Option<PrivateKeySigner>,
    ) -> Result<Self, ChainError> {
        Self::connect_with_fees(rpc_url, address, signer, FeePolicy::default()).await
    }

    /// Like [`Marketplace::connect`], with the gas and fee headroom of `fees` on every
    /// transaction this client sends.
    pub async fn connect_with_fees(
        rpc_url: &str,
        address: Address,
        signer: Option<PrivateKeySigner>,
        fees: FeePolicy,
    ) -> Result<Self, ChainError> {
        let url: reqwest::Url = rpc_url.parse().map_err(|e| {
            // Not even an unparseable URL is repeated: it may still hold a key.
            ChainError::InvalidInput(format!("the RPC URL is not a URL ({e}); check rpc_url"))
        })?;
        let http = reqwest::Client::builder()
            .timeout(RPC_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ChainError::Rpc(format!("cannot build an HTTP client: {e}")))?;
        let sender = signer.as_ref().map(|s| s.address());
        let provider = match signer {
            Some(signer) => signing_provider(signer, http, url, fees),
            None => ProviderBuilder::new().connect_reqwest(http, url).erased(),
        };
        let code = provider
            .get_code_at(address)
            .await
            .map_err(|e| scrub(ChainError::from_rpc(rpc_url, e)))?;
        if code.is_empty() {
            return Err(ChainError::NoContract(address));
        }
        let contract = abi::new(address, provider.clone());
        let registry = contract
            .registry()
            .call()
            .await
            .map_err(|e| scrub(ChainError::from_contract(rpc_url, address, e)))?;
        let registry = reg::new(registry, provider.clone());
        Ok(Self {
            rpc_url: rpc_url.to_string(),
            address,
            sender,
            provider,
            contract,
            registry,
            poll_interval: DEFAULT_POLL_INTERVAL,
            send_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Sets how often [`Marketplace::watch`] polls the node for new blocks.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The contract's address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// The address of the provider registry the marketplace deployed and orders from.
    pub fn registry_address(&self) -> Address {
        *self.registry.address()
    }

    /// Which orders this client's order ids name: `CHAIN_ID:MARKETPLACE`. Order 1 of another
    /// chain or marketplace is another order; whatever is keyed by order ids outside the chain
    /// (containers, disks) is keyed by this too.
    pub async fn scope(&self) -> Result<String, ChainError> {
        let chain_id = self.chain_id().await?;
        Ok(format!("{chain_id}:{:#x}", self.address))
    }

    /// The chain's id (part of every EIP-712 acknowledgment's domain).
    pub async fn chain_id(&self) -> Result<u64, ChainError> {
        self.provider
            .get_chain_id()
            .await
            .map_err(|e| self.rpc_err(e))
    }

    /// The address transactions are sent from, when the client has a signer.
    pub fn sender(&self) -> Option<Address> {
        self.sender
    }

    /// The JSON-RPC endpoint, whole: it may carry an API key, so log [`Marketplace::endpoint`]
    /// instead.
    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    /// The JSON-RPC endpoint as logs and errors may show it (see [`Marketplace::redact_url`]).
    pub fn endpoint(&self) -> String {
        Self::redact_url(&self.rpc_url)
    }

    /// `url` as it may be logged or shown: `scheme://host[:port]` only. Hosted RPC endpoints
    /// carry their API keys as `user:password@`, a path segment or a query string, and logs
    /// and error messages travel further than the config file they came from.
    pub fn redact_url(url: &str) -> String {
        match reqwest::Url::parse(url.trim()) {
            Ok(u) => match (u.host_str(), u.port()) {
                (Some(host), Some(port)) => format!("{}://{host}:{port}", u.scheme()),
                (Some(host), None) => format!("{}://{host}", u.scheme()),
                (None, _) => format!("{}://(no host)", u.scheme()),
            },
            Err(_) => "(an RPC URL that does not parse, not shown)".into(),
        }
    }

    /// The underlying alloy provider, for calls this client does not wrap.
    pub fn rpc(&self) -> &DynProvider {
        &self.provider
    }

    // ------------------------------------------------------------------ reads

    /// The latest block number.
    pub async fn block_number(&self) -> Result<u64, ChainError> {
        self.provider
            .get_block_number()
            .await
            .map_err(|e| self.rpc_err(e))
    }

    /// The timestamp of the latest block: the clock the contract judges leases by.
    pub async fn chain_time(&self) -> Result<u64, ChainError> {
        let block = self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await
            .map_err(|e| self.rpc_err(e))?
            .ok_or_else(|| ChainError::Decode("the node has no latest block".into()))?;
        Ok(block.header.timestamp)
    }

    /// Balance of an address in wei.
    pub async fn balance_of(&self, who: Address) -> Result<U256, ChainError> {
        self.provider
            .get_balance(who)
            .await
            .map_err(|e| self.rpc_err(e))
    }

    /// Reads an order; its state is the effective one (an expired lease reads as Ended).
    #[instrument(skip(self), fields(order = id))]
    pub async fn order(&self, id: u64) -> Result<Order, ChainError> {
        let raw = self
            .contract
            .getOrder(U256::from(id))
            .call()
            .await
            .map_err(|e| self.call_err(e))?;
        Order::from_abi(raw)
    }

    /// How many orders were ever created (ids run from 1 to this).
    pub async fn order_count(&self) -> Result<u64, ChainError> {
        let n = self
            .contract
            .orderCount()
            .call()
            .await
            .map_err(|e| self.call_err(e))?;
        u64_of(n, "order count")
    }

    /// A provider's entry with its datasets, image catalog and rating (one call).
    #[instrument(skip(self))]
    pub async fn provider(&self, address: Address) -> Result<Provider, ChainError> {
        let raw = self
            .registry
            .getProvider(address)
            .call()
            .await
            .map_err(|e| self.registry_call_err(e))?;
        let verified_at = self
            .registry
            .verifiedAt(address)
            .call()
            .await
            .map_err(|e| self.registry_call_err(e))?;
        let miner_id = self
            .registry
            .minerOf(address)
            .call()
            .await
            .map_err(|e| self.registry_call_err(e))?;
        let datasets = raw
            .datasets
            .into_iter()
            .zip(verified_at.into_iter().chain(std::iter::repeat(0)))
            .map(|(d, at)| Dataset::from_abi(d).verified_at((at != 0).then_some(at)))
            .collect();
        let client_registries = self
            .registry
            .clientImageRegistries(address)
            .call()
            .await
            .map_err(|e| self.registry_call_err(e))?;
        Ok(Provider::from_abi(
            raw._0,
            datasets,
            raw.images.into_iter().map(Image::from_abi).collect(),
        )
        .with_miner((miner_id != 0).then_some(miner_id))
        .with_client_image_registries(client_registries))
    }

    /// Every registered provider, withdrawn ones included (see [`Provider::active`]).
    pub async fn providers(&self) -> Result<Vec<Provider>, ChainError> {
        let addresses = self
            .registry
            .providerAddresses()
            .call()
            .await
            .map_err(|e| self.registry_call_err(e))?;
        let mut out = Vec::with_capacity(addresses.len());
        for address in addresses {
            out.push(self.provider(address).await?);
        }
        Ok(out)
    }

    /// What a batch would cost under an order's tariff: the contract's rule
    /// `seconds * pricePerSecond + floor((bytesIn + bytesOut) * pricePerGiB / 2^30)` applied to
    /// the prices `getOrder` returns (the contract has no `quote` view: its size limit).
    pub async fn quote(
        &self,
        order_id: u64,
        seconds: u64,
        bytes_in: u64,
        bytes_out: u64,
    ) -> Result<U256, ChainError> {
        let order = self.order(order_id).await?;
        Ok(crate::types::batch_price(
            order.price_per_second,
            order.price_per_gib,
            seconds,
            bytes_in,
            bytes_out,
        ))
    }

    /// Records the client's acknowledgment of an order's usage (anyone may send it).
    pub async fn acknowledge(&self, signed: &SignedAck) -> Result<TxReceipt, ChainError> {
        let order = u64_of(signed.ack.orderId, "order id")?;
        let call =
            self.contract
                .acknowledge(U256::from(order), signed.to_abi(), signed.signature.clone());
        self.submit(call).await.map(tx_receipt)
    }

    /// Bytes (in + out) the provider may still be paid for now: up to the larger of the
    /// acknowledged total and the allowance.
    pub async fn claimable_bytes(&self, order_id: u64) -> Result<u128, ChainError> {
        let order = self.order(order_id).await?;
        Ok(order.bytes_bound().saturating_sub(order.claimed_bytes))
    }

    /// Seconds of lease time the provider may claim right now: from `getOrder` and the latest
    /// block's time (the contract has no view of its own: its size limit).
    pub async fn claimable_seconds(&self, order_id: u64) -> Result<u64, ChainError> {
        let order = self.order(order_id).await?;
        let now = self.chain_time().await?;
        Ok(order.claimable_seconds_at(now))
    }

    /// The order key the contract checks a claim's proof against (public input 0): the order id
    /// bound to this deployment, `keccak256(abi.encode(chainid, marketplace, orderId)) mod r`.
    /// `shale_circuits::OrderKey` computes the same off chain.
    pub async fn order_key(&self, order_id: u64) -> Result<U256, ChainError> {
        self.contract
            .orderKey(U256::from(order_id))
            .call()
            .await
            .map_err(|e| self.call_err(e))
    }

    /// Payments that could not be pushed to `who` and wait for [`Marketplace::withdraw_owed`].
    pub async fn owed(&self, who: Address) -> Result<U256, ChainError> {
        self.contract
            .owed(who)
            .call()
            .await
            .map_err(|e| self.call_err(e))
    }

    /// The batch capacities the deployment has verifiers for.
    pub async fn batch_capacities(&self) -> Result<Vec<u32>, ChainError> {
        self.contract
            .supportedCapacities()
            .call()
            .await
            .map_err(|e| self.call_err(e))
    }

    // ------------------------------------------------------------------ provider side

    /// Registers the signer as a provider (or re-activates a withdrawn one).
    #[instrument(skip(self, ssh_host_key, offer, datasets))]
    pub async fn register_provider(
        &self,
        endpoint: &str,
        ssh_host_key: &str,
        offer: &Offer,
        datasets: &[Dataset],
    ) -> Result<TxReceipt, ChainError> {
        let datasets: Vec<_> = datasets.iter().map(Dataset::to_abi).collect();
        let call = self.registry.registerProvider(
            endpoint.to_string(),
            ssh_host_key.trim().to_string(),
            offer.to_abi(),
            datasets,
        );
        self.submit(call).await.map(tx_receipt)
    }

    /// Replaces the signer's endpoint, host key and offer.
    #[instrument(skip(self, ssh_host_key, offer))]
    pub async fn update_provider(
        &self,
        endpoint: &str,
        ssh_host_key: &str,
        offer: &Offer,
    ) -> Result<TxReceipt, ChainError> {
        let call = self.registry.updateProvider(
            endpoint.to_string(),
            ssh_host_key.trim().to_string(),
            offer.to_abi(),
        );
        self.submit(call).await.map(tx_receipt)
    }

    /// Withdraws the signer's offer: no new orders; live ones continue.
    pub async fn withdraw_provider(&self) -> Result<TxReceipt, ChainError> {
        self.submit(self.registry.withdrawProvider())
            .await
            .map(tx_receipt)
    }

    /// Sets the Filecoin miner (actor id: 1234 for `f01234`) whose deals the signer's datasets
    /// may name. FEVM only: the miner must list the signer's f410 address as its owner, worker or
    /// a control address.
    pub async fn set_miner(&self, miner_id: u64) -> Result<TxReceipt, ChainError> {
        self.submit(self.registry.setMiner(miner_id))
            .await
            .map(tx_receipt)
    }

    /// Lets clients bring their own images from `hosts` (`host[:port]`); empty: none. Replaces
    /// the signer's list.
    pub async fn set_client_image_registries(
        &self,
        hosts: &[String],
    ) -> Result<TxReceipt, ChainError> {
        self.submit(self.registry.setClientImageRegistries(hosts.to_vec()))
            .await
            .map(tx_receipt)
    }

    /// Records on chain that the signer verified, now, the bytes it serves for `dataset_ids`
    /// against their piece CIDs.
    pub async fn mark_verified(&self, dataset_ids: &[String]) -> Result<TxReceipt, ChainError> {
        self.submit(self.registry.markVerified(dataset_ids.to_vec()))
            .await
            .map(tx_receipt)
    }

    /// Adds a dataset to the signer's provider entry. A dataset that names a deal is checked
    /// against Filecoin's storage market (FEVM only; elsewhere it is refused).
    pub async fn add_dataset(&self, dataset: &Dataset) -> Result<TxReceipt, ChainError> {
        self.submit(self.registry.addDataset(dataset.to_abi()))
            .await
            .map(tx_receipt)
    }

    /// Removes a dataset from the signer's provider entry.
    pub async fn remove_dataset(&self, dataset_id: &str) -> Result<TxReceipt, ChainError> {
        self.submit(self.registry.removeDataset(dataset_id.to_string()))
            .await
            .map(tx_receipt)
    }

    /// Adds an image to the signer's catalog. A name already listed is refused: remove it first
    /// to pin it to another digest.
    pub async fn add_image(&self, image: &Image) -> Result<TxReceipt, ChainError> {
        self.submit(self.registry.addImage(image.to_abi()))
            .await
            .map(tx_receipt)
    }

    /// Removes an image from the signer's catalog; orders that already name it keep its digest.
    pub async fn remove_image(&self, name: &str) -> Result<TxReceipt, ChainError> {
        self.submit(self.registry.removeImage(name.to_string()))
            .await
            .map(tx_receipt)
    }

    /// Makes the signer's on-chain catalog list exactly `images`, with `images[0]` as the
    /// catalog's default ([`Provider::default_image`]: the entry named `default`, else the first).
    /// Entries missing from `images` or pinned to another digest are removed, new ones added;
    /// those already listed with the same digest are left alone (a changed description alone is
    /// not republished). When the default would come out wrong (the chain has no notion of one:
    /// it is the first entry, and a removal moves the last entry into the gap), the catalog is
    /// cleared and added again in order. Returns the receipts of the transactions sent, none when
    /// the chain already matches.
    pub async fn sync_images(&self, images: &[Image]) -> Result<Vec<TxReceipt>, ChainError> {
        let me = self
            .sender()
            .ok_or_else(|| ChainError::InvalidInput("syncing images needs a signer".into()))?;
        let listed = self.provider(me).await?.images;
        let mut receipts = Vec::new();
        for old in &listed {
            if !images
                .iter()
                .any(|i| i.name == old.name && i.digest == old.digest)
            {
                receipts.push(self.remove_image(&old.name).await?);
            }
        }
        for new in images {
            if !listed
                .iter()
                .any(|i| i.name == new.name && i.digest == new.digest)
            {
                receipts.push(self.add_image(new).await?);
            }
        }
        let Some(wanted) = images.first() else {
            return Ok(receipts);
        };
        let now = self.provider(me).await?;
        if now.default_image().map(|i| &i.name) != Some(&wanted.name) {
            for old in &now.images {
                receipts.push(self.remove_image(&old.name).await?);
            }
            for new in images {
                receipts.push(self.add_image(new).await?);
            }
        }
        Ok(receipts)
    }

    /// Accepts a pending order, posting the collateral it states.
    #[instrument(skip(self), fields(order = id))]
    pub async fn accept(&self, id: u64) -> Result<TxReceipt, ChainError> {
        let order = self.order(id).await?;
        let call = self.contract.accept(U256::from(id)).value(order.collateral);
        self.submit(call).await.map(tx_receipt)
    }

    /// Claims one proven batch of usage; pays the provider out of the escrow.
    #[instrument(skip(self, claim), fields(order = claim.order_id, seconds = claim.seconds))]
    pub async fn claim(&self, claim: &ClaimRequest) -> Result<ClaimReceipt, ChainError> {
        let call = match &claim.ack {
            None => self
                .contract
                .claim(
                    U256::from(claim.order_id),
                    claim.batch_capacity,
                    claim.next_head.into(),
                    claim.seconds,
                    claim.bytes_in,
                    claim.bytes_out,
                    claim.proof.clone(),
                )
                .clear_decoder(),
            Some(signed) => self
                .contract
                .claimWithAck(
                    U256::from(claim.order_id),
                    claim.batch_capacity,
                    claim.next_head.into(),
                    claim.seconds,
                    claim.bytes_in,
                    claim.bytes_out,
                    claim.proof.clone(),
                    signed.to_abi(),
                    signed.signature.clone(),
                )
                .clear_decoder(),
        };
        // The fee policy's gas headroom keeps the verifier's pairing check from being starved
        // (see `fees`).
        let receipt = self.submit(call).await?;
        let paid = receipt
            .inner
            .logs()
            .iter()
            .find_map(|log| abi::Claimed::decode_log(&log.inner).ok())
            .ok_or_else(|| ChainError::Decode("claim receipt has no Claimed event".into()))?;
        let tx = tx_receipt(receipt);
        Ok(ClaimReceipt {
            tx,
            gas_used: tx.gas_used,
            amount: paid.amount,
            escrow_left: paid.escrowLeft,
        })
    }

    // ------------------------------------------------------------------ client side

    /// Creates an order, paying its escrow; returns the new order id.
    pub async fn create_order(&self, order: &NewOrder) -> Result<u64, ChainError> {
        self.create_order_tx(order).await.map(|(id, _)| id)
    }

    /// Like [`Marketplace::create_order`], also returning what the transaction cost.
    #[instrument(skip(self, order), fields(provider = %order.provider))]
    pub async fn create_order_tx(&self, order: &NewOrder) -> Result<(u64, TxReceipt), ChainError> {
        if order.escrow.is_zero() {
            return Err(ChainError::InvalidInput(
                "an order needs a non-zero escrow".into(),
            ));
        }
        let call = self
            .contract
            .createOrder(order.provider, order.terms())
            .value(order.escrow);
        let receipt = self.submit(call).await?;
        let created = receipt
            .inner
            .logs()
            .iter()
            .find_map(|log| abi::OrderCreated::decode_log(&log.inner).ok())
            .ok_or_else(|| ChainError::Decode("order receipt has no OrderCreated event".into()))?;
        let id = u64_of(created.orderId, "order id")?;
        debug!(order = id, "order created");
        Ok((id, tx_receipt(receipt)))
    }

    /// Adds `amount` wei to a live order's escrow.
    #[instrument(skip(self), fields(order = id))]
    pub async fn top_up(&self, id: u64, amount: U256) -> Result<TxReceipt, ChainError> {
        let call = self.contract.topUp(U256::from(id)).value(amount);
        self.submit(call).await.map(tx_receipt)
    }

    /// Cancels a pending order with a full refund (the client after the accept timeout, the
    /// provider at any time to decline).
    #[instrument(skip(self), fields(order = id))]
    pub async fn cancel(&self, id: u64) -> Result<TxReceipt, ChainError> {
        self.submit(self.contract.cancel(U256::from(id)))
            .await
            .map(tx_receipt)
    }

    /// Declines a Pending order as its provider, saying why (at most
    /// [`Marketplace::MAX_DECLINE_REASON`] bytes): the client gets the whole escrow back, as with
    /// [`Marketplace::cancel`], and can read the reason with [`Marketplace::decline_reason`].
    #[instrument(skip(self, reason), fields(order = id))]
    pub async fn decline(&self, id: u64, reason: &str) -> Result<TxReceipt, ChainError> {
        if reason.len() > Self::MAX_DECLINE_REASON {
            return Err(ChainError::InvalidInput(format!(
                "a decline reason is at most {} bytes, this one has {}",
                Self::MAX_DECLINE_REASON,
                reason.len()
            )));
        }
        self.submit(self.contract.decline(U256::from(id), reason.to_owned()))
            .await
            .map(tx_receipt)
    }

    /// Why the provider declined order `id`: `None` unless it was declined (a Pending order, an
    /// accepted one, or one cancelled by `cancel` has no reason).
    ///
    /// The reason lives only in the `OrderDeclined` log. The order's `endedAt` says when it was
    /// declined, so the log is looked up in the blocks of that second alone (found by a binary
    /// search over block timestamps), never by scanning the chain.
    pub async fn decline_reason(&self, id: u64) -> Result<Option<String>, ChainError> {
        let order = self.order(id).await?;
        let (Some(at), Some(by)) = (order.ended_at, order.ended_by) else {
            return Ok(None);
        };
        if order.state != crate::OrderState::Cancelled || by != order.provider {
            return Ok(None);
        }
        let latest = self
            .provider
            .get_block_number()
            .await
            .map_err(|e| self.rpc_err(e))?;
        let first = self.first_block_at_or_after(at, latest).await?;
        let last = self
            .first_block_at_or_after(at + 1, latest)
            .await?
            .saturating_sub(1)
            .max(first);
        let filter = alloy::rpc::types::Filter::new()
            .address(self.address)
            .event_signature(abi::OrderDeclined::SIGNATURE_HASH)
            .topic1(U256::from(id))
            .from_block(first)
            .to_block(last);
        let logs = self
            .provider
            .get_logs(&filter)
            .await
            .map_err(|e| self.rpc_err(e))?;
        match logs.last() {
            None => Ok(None),
            Some(log) => {
                let event = abi::OrderDeclined::decode_log(&log.inner)
                    .map_err(|e| ChainError::Decode(format!("OrderDeclined log: {e}")))?;
                Ok(Some(event.data.reason))
            }
        }
    }

    /// The lowest block number in `0..=latest` whose timestamp is at least `time` (`latest + 1`
    /// when none is): block timestamps never decrease, so a binary search finds it.
    async fn first_block_at_or_after(&self, time: u64, latest: u64) -> Result<u64, ChainError> {
        let (mut lo, mut hi) = (0u64, latest + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let block = self
                .provider
                .get_block_by_number(alloy::eips::BlockNumberOrTag::Number(mid))
                .await
                .map_err(|e| self.rpc_err(e))?
                .ok_or_else(|| ChainError::Decode(format!("the node has no block {mid}")))?;
            if block.header.timestamp >= time {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }

    /// Terminates a live order (either side).
    #[instrument(skip(self), fields(order = id))]
    pub async fn terminate(&self, id: u64) -> Result<TxReceipt, ChainError> {
        self.submit(self.contract.terminate(U256::from(id)))
            .await
            .map(tx_receipt)
    }

    /// Pays out an ended order: escrow left to the client, collateral to the provider.
    #[instrument(skip(self), fields(order = id))]
    pub async fn settle(&self, id: u64) -> Result<TxReceipt, ChainError> {
        self.submit(self.contract.settle(U256::from(id)))
            .await
            .map(tx_receipt)
    }

    /// Rates the provider of an ended order: 1 to 5 stars and a review of at most 280 bytes.
    #[instrument(skip(self, review), fields(order = id))]
    pub async fn rate(&self, id: u64, stars: u8, review: &str) -> Result<TxReceipt, ChainError> {
        self.submit(
            self.contract
                .rate(U256::from(id), stars, review.to_string()),
        )
        .await
        .map(tx_receipt)
    }

    /// Pulls payments that could not be pushed to the signer.
    pub async fn withdraw_owed(&self) -> Result<TxReceipt, ChainError> {
        self.submit(self.contract.withdraw()).await.map(tx_receipt)
    }

    // ------------------------------------------------------------------ events

    /// Watches the contract's events from the next block on.
    pub async fn watch(&self) -> Result<EventStream, ChainError> {
        let from = self.block_number().await? + 1;
        Ok(self.watch_from(from))
    }

    /// Watches the contract's events from block `from_block` on (to catch up after a restart).
    /// The stream never ends; an outage yields an `Err` item and the watcher keeps polling.
    pub fn watch_from(&self, from_block: u64) -> EventStream {
        Watcher::new(
            self.provider.clone(),
            self.rpc_url.clone(),
            self.address,
            self.registry_address(),
            from_block,
            self.poll_interval,
        )
        .into_stream()
        .map(|item| item.map_err(scrub))
        .boxed()
    }

    // ------------------------------------------------------------------ plumbing

    /// Sends a transaction and waits for it to be mined. A call that would revert fails in gas
    /// estimation with the contract's reason; one that reverts on chain anyway is replayed at
    /// its block to recover the reason.
    async fn submit<D: CallDecoder + Unpin>(
        &self,
        call: CallBuilder<&DynProvider, D>,
    ) -> Result<TransactionReceipt, ChainError> {
        if self.sender.is_none() {
            return Err(ChainError::ReadOnly);
        }
        let sent = {
            let _sending = self.send_lock.lock().await;
            call.send().await
        };
        let pending = match sent {
            Ok(pending) => pending,
            Err(e) => return Err(self.explain_send_error(&call, e).await),
        };
        let tx = *pending.tx_hash();
        let receipt = pending
            .with_timeout(Some(RECEIPT_TIMEOUT))
            .get_receipt()
            .await
            .map_err(|e| match e {
                PendingTransactionError::TransportError(e) => self.rpc_err(e),
                other => scrub(ChainError::Rpc(format!(
                    "waiting for transaction {tx}: {other}"
                ))),
            })?;
        if receipt.status() {
            debug!(%tx, gas = receipt.gas_used, "transaction mined");
            return Ok(receipt);
        }
        let mut replay = call.into_transaction_request();
        replay.set_from(self.sender.unwrap_or_default());
        let block = receipt.block_number.unwrap_or_default();
        let reason = match self.provider.call(replay).block(block.into()).await {
            Err(e) => match self.rpc_err(e) {
                ChainError::Reverted { reason, .. } => reason,
                other => format!("reason unknown ({other})"),
            },
            Ok(_) => "reason unknown (the replay succeeded)".into(),
        };
        Err(ChainError::TxReverted { tx, reason })
    }

    /// Some nodes (Lotus for FEVM among them) answer a failing gas estimate with a message but
    /// without the revert data; `eth_call` of the same transaction usually carries it.
    async fn explain_send_error<D: CallDecoder + Unpin>(
        &self,
        call: &CallBuilder<&DynProvider, D>,
        e: alloy::contract::Error,
    ) -> ChainError {
        let err = self.call_err(e);
        if !matches!(err, ChainError::Rpc(_)) {
            return err;
        }
        let mut request = call.as_ref().clone();
        request.set_from(self.sender.unwrap_or_default());
        match self.provider.call(request).await {
            Err(e) => match self.rpc_err(e) {
                reverted @ ChainError::Reverted { .. } => reverted,
                _ => err,
            },
            Ok(_) => err,
        }
    }

    fn rpc_err(&self, e: alloy::transports::TransportError) -> ChainError {
        scrub(ChainError::from_rpc(&self.rpc_url, e))
    }

    fn call_err(&self, e: alloy::contract::Error) -> ChainError {
        scrub(ChainError::from_contract(&self.rpc_url, self.address, e))
    }

    fn registry_call_err(&self, e: alloy::contract::Error) -> ChainError {
        scrub(ChainError::from_contract(
            &self.rpc_url,
            self.registry_address(),
            e,
        ))
    }
}

/// `err` with every URL in it redacted ([`Marketplace::redact_url`]): the transport's messages
/// repeat the request's URL (reqwest's "... for url (...)"), key and all.
fn scrub(err: ChainError) -> ChainError {
    match err {
        ChainError::Unreachable { url, reason } => ChainError::Unreachable {
            url: Marketplace::redact_url(&url),
            reason: redact_urls_in(&reason),
        },
        ChainError::Rpc(text) => ChainError::Rpc(redact_urls_in(&text)),
        ChainError::Decode(text) => ChainError::Decode(redact_urls_in(&text)),
        ChainError::InvalidInput(text) => ChainError::InvalidInput(redact_urls_in(&text)),
        other => other,
    }
}

/// `text` with each `scheme://…` in it (up to white space, a quote, `)` or `>`)
/// replaced by its redacted form.
fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The scheme: the letters just before "://".
        let scheme_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>'))
            .map_or(rest.len(), |i| at + i);
        // Punctuation after a URL ends the sentence, not the URL.
        let end = at + rest[at..end].trim_end_matches(['.', ',', ';', ':']).len();
        out.push_str(&rest[..scheme_start]);
        if scheme_start == at {
            // No scheme: not a URL, keep the text.
            out.push_str(&rest[at..end]);
        } else {
            out.push_str(&Marketplace::redact_url(&rest[scheme_start..end]));
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A provider builder that signs with `signer`, estimates gas and fees with `fees`' headroom, and
/// reads each nonce from the node's pending transaction count.
///
/// Not alloy's default cached nonce manager: it reserves a nonce before gas estimation, so a call
/// that the contract refuses (estimation fails, nothing is sent) would leave a nonce gap and
/// every later transaction of the signer would wait in the pool forever.
pub(crate) fn signing_provider(
    signer: PrivateKeySigner,
    http: reqwest::Client,
    url: reqwest::Url,
    fees: FeePolicy,
) -> DynProvider {
    ProviderBuilder::new()
        .disable_recommended_fillers()
        .filler(PolicyGasFiller::new(fees))
        .with_simple_nonce_management()
        .fetch_chain_id()
        .wallet(EthereumWallet::from(signer))
        .connect_reqwest(http, url)
        .erased()
}

fn tx_receipt(receipt: TransactionReceipt) -> TxReceipt {
    TxReceipt {
        tx_hash: receipt.transaction_hash,
        block_number: receipt.block_number.unwrap_or_default(),
        gas_used: receipt.gas_used,
        fee: U256::from(receipt.gas_used) * U256::from(receipt.effective_gas_price),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_rpc_url_keeps_only_scheme_host_and_port() {
        let cases = [
            ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
            (
                "https://user:s3cret@rpc.example.io/v1",
                "https://rpc.example.io",
            ),
            (
                "https://api.node.glif.io/rpc/v1?token=s3cret",
                "https://api.node.glif.io",
            ),
            (
                "https://filecoin.infura.io/v3/s3cretkey",
                "https://filecoin.infura.io",
            ),
            (
                "wss://rpc.example.io:8443/ws/s3cret",
                "wss://rpc.example.io:8443",
            ),
            ("http://[::1]:8545/s3cret", "http://[::1]:8545"),
            // The default port is implied by the scheme.
            (
                "https://rpc.example.io:443/k/s3cret",
                "https://rpc.example.io",
            ),
        ];
        for (url, shown) in cases {
            assert_eq!(Marketplace::redact_url(url), shown, "{url}");
        }
        let garbled = Marketplace::redact_url("not a url s3cret");
        assert!(!garbled.contains("s3cret"), "{garbled}");
    }

    #[test]
    fn urls_inside_error_messages_are_redacted() {
        let text =
            "error sending request for url (https://u:s3cret@rpc.example.io/v3/s3cret?k=s3cret) \
                    after http://10.0.0.1:8545/s3cret, then \"wss://h/s3cret\"; see file:///tmp/x";
        let clean = redact_urls_in(text);
        assert!(!clean.contains("s3cret"), "{clean}");
        assert!(
            clean.starts_with("error sending request for url (https://rpc.example.io) after http://10.0.0.1:8545, then \"wss://h\""),
            "{clean}"
        );
        assert_eq!(redact_urls_in("no url here"), "no url here");
        assert_eq!(redact_urls_in("odd ://x"), "odd ://x");
    }

    #[test]
    fn chain_errors_lose_their_keys() {
        let err = scrub(ChainError::Unreachable {
            url: "https://rpc.example.io/v1/s3cret".into(),
            reason: "error sending request for url (https://rpc.example.io/v1/s3cret)".into(),
        });
        let text = err.to_string();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("https://rpc.example.io"), "{text}");
        assert!(err.is_outage());
    }
}
