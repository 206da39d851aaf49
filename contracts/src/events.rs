//! Typed marketplace events and a log-polling watcher that streams them.
//!
//! Polling `eth_getLogs` works against every JSON-RPC endpoint (FEVM gateways rarely offer
//! subscriptions), and a restart resumes from a block number without gaps.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider as _};
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEventInterface;
use futures::Stream;
use tracing::warn;

use crate::bindings::Marketplace::MarketplaceEvents as Raw;
use crate::bindings::ProviderRegistry::ProviderRegistryEvents as RegRaw;
use crate::error::ChainError;

/// Most blocks asked for in one `eth_getLogs` (public endpoints cap the range).
const MAX_BLOCK_RANGE: u64 = 2_000;

/// Everything the marketplace announces, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarketEvent {
    ProviderRegistered {
        provider: Address,
        endpoint: String,
        ssh_host_key: String,
    },
    ProviderUpdated {
        provider: Address,
        endpoint: String,
        ssh_host_key: String,
    },
    ProviderWithdrawn {
        provider: Address,
    },
    DatasetAdded {
        provider: Address,
        dataset_id: String,
    },
    DatasetRemoved {
        provider: Address,
        dataset_id: String,
    },
    /// An image entered the provider's catalog, pinned to `digest` (SHA-256 of its manifest).
    ImageAdded {
        provider: Address,
        name: String,
        digest: [u8; 32],
    },
    ImageRemoved {
        provider: Address,
        name: String,
    },
    /// The provider set the Filecoin miner (actor id) its datasets' deals must be stored with.
    MinerSet {
        provider: Address,
        miner_id: u64,
    },
    /// A dataset's deal was found in Filecoin's storage market with the dataset's piece CID,
    /// stored with the provider's miner.
    DealChecked {
        provider: Address,
        dataset_id: String,
        deal_id: u64,
        miner_id: u64,
        padded_size: u64,
    },
    /// The registries the provider lets clients bring their own images from (empty: none).
    ClientImageRegistriesSet {
        provider: Address,
        hosts: Vec<String>,
    },
    /// The provider recorded that it verified the dataset's bytes against its piece CID.
    DatasetVerified {
        provider: Address,
        dataset_id: String,
        verified_at: u64,
    },
    OrderCreated {
        order_id: u64,
        client: Address,
        provider: Address,
        escrow: U256,
        collateral: U256,
        dataset: Option<String>,
    },
    OrderAccepted {
        order_id: u64,
        provider: Address,
        collateral: U256,
        expires_at: u64,
    },
    OrderCancelled {
        order_id: u64,
        by: Address,
        refund: U256,
    },
    /// The provider declined the Pending order; an `OrderCancelled` follows.
    OrderDeclined {
        order_id: u64,
        reason: String,
    },
    OrderToppedUp {
        order_id: u64,
        amount: U256,
        escrow: U256,
    },
    OrderTerminated {
        order_id: u64,
        by: Address,
        ended_at: u64,
    },
    Claimed {
        order_id: u64,
        head: [u8; 32],
        seconds: u64,
        bytes_in: u64,
        bytes_out: u64,
        amount: U256,
        escrow_left: U256,
    },
    OrderSettled {
        order_id: u64,
        refund: U256,
        collateral_returned: U256,
        collateral_slashed: U256,
    },
    Rated {
        order_id: u64,
        provider: Address,
        stars: u8,
        review: String,
    },
    PaymentDeferred {
        to: Address,
        amount: U256,
    },
    Withdrawn {
        to: Address,
        amount: U256,
    },
    /// The client's acknowledgment of the order's cumulative usage was recorded.
    Acknowledged {
        order_id: u64,
        head: [u8; 32],
        seconds: u64,
        bytes_in: u64,
        bytes_out: u64,
    },
    /// A last batch ran past the lease's end and was paid up to the end.
    ClaimTrimmed {
        order_id: u64,
        proven_seconds: u64,
        paid_seconds: u64,
    },
    /// A batch proved more bytes than max(acknowledged, allowance) still covered: `paid_bytes`
    /// of its `proven_bytes` were paid, the rest is forfeited for good.
    BytesTrimmed {
        order_id: u64,
        proven_bytes: u128,
        paid_bytes: u128,
    },
}

impl MarketEvent {
    /// The order the event is about, if any.
    pub fn order_id(&self) -> Option<u64> {
        match self {
            Self::OrderCreated { order_id, .. }
            | Self::OrderAccepted { order_id, .. }
            | Self::OrderCancelled { order_id, .. }
            | Self::OrderDeclined { order_id, .. }
            | Self::OrderToppedUp { order_id, .. }
            | Self::OrderTerminated { order_id, .. }
            | Self::Claimed { order_id, .. }
            | Self::OrderSettled { order_id, .. }
            | Self::Rated { order_id, .. }
            | Self::Acknowledged { order_id, .. }
            | Self::ClaimTrimmed { order_id, .. }
            | Self::BytesTrimmed { order_id, .. } => Some(*order_id),
            _ => None,
        }
    }

    fn from_registry(raw: RegRaw) -> Self {
        match raw {
            RegRaw::ProviderRegistered(e) => Self::ProviderRegistered {
                provider: e.provider,
                endpoint: e.endpoint,
                ssh_host_key: e.sshHostKey,
            },
            RegRaw::ProviderUpdated(e) => Self::ProviderUpdated {
                provider: e.provider,
                endpoint: e.endpoint,
                ssh_host_key: e.sshHostKey,
            },
            RegRaw::ProviderWithdrawn(e) => Self::ProviderWithdrawn {
                provider: e.provider,
            },
            RegRaw::DatasetAdded(e) => Self::DatasetAdded {
                provider: e.provider,
                dataset_id: e.datasetId,
            },
            RegRaw::DatasetRemoved(e) => Self::DatasetRemoved {
                provider: e.provider,
                dataset_id: e.datasetId,
            },
            RegRaw::ImageAdded(e) => Self::ImageAdded {
                provider: e.provider,
                name: e.name,
                digest: e.digest.0,
            },
            RegRaw::ImageRemoved(e) => Self::ImageRemoved {
                provider: e.provider,
                name: e.name,
            },
            RegRaw::MinerSet(e) => Self::MinerSet {
                provider: e.provider,
                miner_id: e.minerId,
            },
            RegRaw::DealChecked(e) => Self::DealChecked {
                provider: e.provider,
                dataset_id: e.datasetId,
                deal_id: e.dealId,
                miner_id: e.minerId,
                padded_size: e.paddedSize,
            },
            RegRaw::DatasetVerified(e) => Self::DatasetVerified {
                provider: e.provider,
                dataset_id: e.datasetId,
                verified_at: e.verifiedAt,
            },
            RegRaw::ClientImageRegistriesSet(e) => Self::ClientImageRegistriesSet {
                provider: e.provider,
                hosts: e.hosts,
            },
        }
    }

    fn from_raw(raw: Raw) -> Result<Self, ChainError> {
        let id = |v: U256| crate::types::u64_of(v, "order id");
        Ok(match raw {
            Raw::OrderCreated(e) => Self::OrderCreated {
                order_id: id(e.orderId)?,
                client: e.client,
                provider: e.provider,
                escrow: e.escrow,
                collateral: e.collateral,
                dataset: (!e.datasetId.is_empty()).then_some(e.datasetId),
            },
            Raw::OrderAccepted(e) => Self::OrderAccepted {
                order_id: id(e.orderId)?,
                provider: e.provider,
                collateral: e.collateral,
                expires_at: e.expiresAt,
            },
            Raw::OrderCancelled(e) => Self::OrderCancelled {
                order_id: id(e.orderId)?,
                by: e.by,
                refund: e.refund,
            },
            Raw::OrderDeclined(e) => Self::OrderDeclined {
                order_id: id(e.orderId)?,
                reason: e.reason,
            },
            Raw::OrderToppedUp(e) => Self::OrderToppedUp {
                order_id: id(e.orderId)?,
                amount: e.amount,
                escrow: e.escrow,
            },
            Raw::OrderTerminated(e) => Self::OrderTerminated {
                order_id: id(e.orderId)?,
                by: e.by,
                ended_at: e.endedAt,
            },
            Raw::Claimed(e) => Self::Claimed {
                order_id: id(e.orderId)?,
                head: e.head.0,
                seconds: e.seconds_,
                bytes_in: e.bytesIn,
                bytes_out: e.bytesOut,
                amount: e.amount,
                escrow_left: e.escrowLeft,
            },
            Raw::OrderSettled(e) => Self::OrderSettled {
                order_id: id(e.orderId)?,
                refund: e.refund,
                collateral_returned: e.collateralReturned,
                collateral_slashed: e.collateralSlashed,
            },
            Raw::Rated(e) => Self::Rated {
                order_id: id(e.orderId)?,
                provider: e.provider,
                stars: e.stars,
                review: e.review,
            },
            Raw::PaymentDeferred(e) => Self::PaymentDeferred {
                to: e.to,
                amount: e.amount,
            },
            Raw::Withdrawn(e) => Self::Withdrawn {
                to: e.to,
                amount: e.amount,
            },
            Raw::Acknowledged(e) => Self::Acknowledged {
                order_id: id(e.orderId)?,
                head: e.head.0,
                seconds: e.seconds_,
                bytes_in: e.bytesIn,
                bytes_out: e.bytesOut,
            },
            Raw::ClaimTrimmed(e) => Self::ClaimTrimmed {
                order_id: id(e.orderId)?,
                proven_seconds: e.provenSeconds,
                paid_seconds: e.paidSeconds,
            },
            // Both are below 2^65 (sums of two u64 byte counts); saturation never triggers.
            Raw::BytesTrimmed(e) => Self::BytesTrimmed {
                order_id: id(e.orderId)?,
                proven_bytes: e.provenBytes.saturating_to(),
                paid_bytes: e.paidBytes.saturating_to(),
            },
        })
    }
}

/// The stream [`crate::Marketplace::watch`] returns. It never ends by itself; drop it to stop.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<MarketEvent, ChainError>> + Send>>;

/// Polls the logs of the marketplace and its registry, block range by block range.
pub(crate) struct Watcher {
    provider: DynProvider,
    rpc_url: String,
    address: Address,
    registry: Address,
    next_block: u64,
    interval: Duration,
    buffer: VecDeque<MarketEvent>,
}

impl Watcher {
    pub(crate) fn new(
        provider: DynProvider,
        rpc_url: String,
        address: Address,
        registry: Address,
        next_block: u64,
        interval: Duration,
    ) -> Self {
        Self {
            provider,
            rpc_url,
            address,
            registry,
            next_block,
            interval,
            buffer: VecDeque::new(),
        }
    }

    pub(crate) fn into_stream(self) -> EventStream {
        Box::pin(futures::stream::unfold(self, |mut w| async move {
            loop {
                if let Some(event) = w.buffer.pop_front() {
                    return Some((Ok(event), w));
                }
                match w.poll().await {
                    Ok(true) => {}
                    Ok(false) => tokio::time::sleep(w.interval).await,
                    Err(e) => {
                        // Report the outage once per poll and keep going: the caller decides
                        // whether to wait or give up.
                        tokio::time::sleep(w.interval).await;
                        return Some((Err(e), w));
                    }
                }
            }
        }))
    }

    /// Fetches the logs of the next block range; returns whether there were new blocks.
    async fn poll(&mut self) -> Result<bool, ChainError> {
        let rpc_err = |e| ChainError::from_rpc(&self.rpc_url, e);
        let latest = self.provider.get_block_number().await.map_err(rpc_err)?;
        if latest < self.next_block {
            return Ok(false);
        }
        let to = latest.min(self.next_block + MAX_BLOCK_RANGE - 1);
        let filter = Filter::new()
            .address(vec![self.address, self.registry])
            .from_block(self.next_block)
            .to_block(to);
        let logs = self.provider.get_logs(&filter).await.map_err(rpc_err)?;
        for log in logs {
            let decoded = if log.address() == self.registry {
                RegRaw::decode_log(&log.inner).map(|d| Ok(MarketEvent::from_registry(d.data)))
            } else {
                Raw::decode_log(&log.inner).map(|d| MarketEvent::from_raw(d.data))
            };
            match decoded {
                Ok(event) => self.buffer.push_back(event?),
                // An event this client does not know (newer contract): skip it, loudly.
                Err(e) => {
                    warn!(block = ?log.block_number, error = %e, "undecodable marketplace log")
                }
            }
        }
        self.next_block = to + 1;
        Ok(true)
    }
}
