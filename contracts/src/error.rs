//! Errors of the chain client: a caller can tell an outage (retry later) from a refusal by the
//! contract (explain it to the user) from a missing order or provider.

use alloy::contract::Error as ContractError;
use alloy::primitives::{Address, Bytes, B256};
use alloy::sol_types::SolInterface;
use alloy::transports::{RpcError, TransportErrorKind};

use crate::bindings::Marketplace::MarketplaceErrors as E;
use crate::bindings::ProviderRegistry::ProviderRegistryErrors as R;
use crate::types::OrderState;

/// Everything that can go wrong talking to the marketplace.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The RPC endpoint did not answer (connection refused, timeout, HTTP error): an outage,
    /// not a verdict about the order. Retry later.
    #[error("the chain RPC endpoint {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },

    /// The contract has no order with this id.
    #[error("order {0} does not exist")]
    OrderNotFound(u64),

    /// No provider registered under this address.
    #[error("no provider is registered at {0}")]
    ProviderNotFound(Address),

    /// The contract refused the call; `reason` says why in words (e.g. "order 42 is not active
    /// (it is ended)"), `error` is the decoded custom error when it was one of the marketplace's
    /// or its provider registry's.
    #[error("the marketplace refused: {reason}")]
    Reverted {
        reason: String,
        error: Option<Box<Refusal>>,
    },

    /// A transaction was mined but reverted (it passed simulation, then lost a race).
    #[error("transaction {tx} reverted on chain: {reason}")]
    TxReverted { tx: B256, reason: String },

    /// No contract code at the configured marketplace address (wrong address or wrong chain).
    #[error(
        "there is no marketplace contract at {0} on this chain; check the address and the RPC URL"
    )]
    NoContract(Address),

    /// A state-changing call on a client connected without a signer.
    #[error(
        "this marketplace client has no signing key; connect with a signer to send transactions"
    )]
    ReadOnly,

    /// The caller passed something the contract would refuse or cannot represent.
    #[error("{0}")]
    InvalidInput(String),

    /// The node answered with an error that is neither an outage nor a revert.
    #[error("the chain RPC endpoint returned an error: {0}")]
    Rpc(String),

    /// The node answered with data this client does not understand (version mismatch?).
    #[error("unexpected data from the chain: {0}")]
    Decode(String),
}

/// A decoded custom error: the marketplace's own, or its provider registry's (which the
/// marketplace passes on when an order names an unknown provider, dataset or image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Marketplace(E),
    Registry(R),
}

impl ChainError {
    /// True when the error means the chain could not be reached; callers treat it as an outage.
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    /// The decoded custom error of a revert, when it is one of the marketplace's.
    pub fn contract_error(&self) -> Option<&E> {
        match self {
            Self::Reverted { error: Some(e), .. } => match e.as_ref() {
                Refusal::Marketplace(e) => Some(e),
                Refusal::Registry(_) => None,
            },
            _ => None,
        }
    }

    /// The decoded custom error of a revert, when it is one of the provider registry's.
    pub fn registry_error(&self) -> Option<&R> {
        match self {
            Self::Reverted { error: Some(e), .. } => match e.as_ref() {
                Refusal::Registry(e) => Some(e),
                Refusal::Marketplace(_) => None,
            },
            _ => None,
        }
    }

    /// Classifies an RPC failure (the transport layer's error type).
    pub(crate) fn from_rpc(url: &str, err: RpcError<TransportErrorKind>) -> Self {
        match err {
            RpcError::ErrorResp(payload) => match payload.as_revert_data() {
                Some(data) => Self::from_revert_data(&data),
                None => Self::Rpc(payload.to_string()),
            },
            RpcError::Transport(kind) => Self::Unreachable {
                url: url.to_string(),
                reason: kind.to_string(),
            },
            RpcError::NullResp => Self::Rpc("the node returned null".into()),
            RpcError::DeserError { err, .. } => Self::Decode(err.to_string()),
            other => Self::Rpc(other.to_string()),
        }
    }

    /// Classifies a failed contract call or transaction.
    pub(crate) fn from_contract(url: &str, address: Address, err: ContractError) -> Self {
        match err {
            ContractError::TransportError(e) => Self::from_rpc(url, e),
            ContractError::PendingTransactionError(e) => Self::Rpc(e.to_string()),
            // `0x` from a view: nothing is deployed at the address.
            ContractError::ZeroData(..) => Self::NoContract(address),
            other => Self::Decode(other.to_string()),
        }
    }

    /// Turns revert data into words, mapping "not found" errors to their own variants.
    pub(crate) fn from_revert_data(data: &Bytes) -> Self {
        if let Ok(e) = R::abi_decode(data) {
            return match e {
                R::ProviderNotFound(e) => Self::ProviderNotFound(e.provider),
                e => Self::reverted(describe_registry(&e), Some(Refusal::Registry(e))),
            };
        }
        match E::abi_decode(data) {
            Ok(E::OrderNotFound(e)) => match u64::try_from(e.orderId) {
                Ok(id) => Self::OrderNotFound(id),
                Err(_) => Self::reverted(
                    describe(&E::OrderNotFound(e.clone())),
                    Some(Refusal::Marketplace(E::OrderNotFound(e))),
                ),
            },
            Ok(e) => Self::reverted(describe(&e), Some(Refusal::Marketplace(e))),
            Err(_) => Self::reverted(describe_builtin(data), None),
        }
    }

    fn reverted(reason: String, error: Option<Refusal>) -> Self {
        Self::Reverted {
            reason,
            error: error.map(Box::new),
        }
    }
}

fn state(raw: u8) -> String {
    OrderState::from_abi(raw)
        .map(|s| s.to_string())
        .unwrap_or_else(|_| format!("in unknown state {raw}"))
}

/// Solidity's built-in reverts: `Error(string)` from `require`, `Panic(uint256)` from checked
/// arithmetic, and anything else as hex.
fn describe_builtin(data: &Bytes) -> String {
    use alloy::sol_types::{GenericContractError, SolInterface};
    match GenericContractError::abi_decode(data) {
        Ok(GenericContractError::Revert(r)) => r.reason,
        Ok(GenericContractError::Panic(p)) => match p.kind() {
            Some(kind) => format!("arithmetic or assertion failure: {kind}"),
            None => format!("panic code {}", p.code),
        },
        Err(_) if data.is_empty() => "reverted without a reason".into(),
        Err(_) => format!("reverted with unknown error data {data}"),
    }
}

/// One sentence per custom error of the marketplace, in the words a user reads.
pub fn describe(error: &E) -> String {
    match error {
        E::VerifierConfigMismatch(e) => format!(
            "{} batch capacities but {} verifiers were given",
            e.capacities, e.verifiers
        ),
        E::InvalidVerifier(e) => format!(
            "the verifier for batch capacity {} is missing, zero or given twice",
            e.capacity
        ),
        E::OrderNotFound(e) => format!("order {} does not exist", e.orderId),
        E::NotClient(e) => format!("{} is not the client of order {}", e.caller, e.orderId),
        E::NotProvider(e) => format!("{} is not the provider of order {}", e.caller, e.orderId),
        E::NotParty(e) => format!(
            "{} is neither the client nor the provider of order {}",
            e.caller, e.orderId
        ),
        E::OrderNotPending(e) => format!(
            "order {} is not pending (it is {})",
            e.orderId,
            state(e.state)
        ),
        E::OrderNotActive(e) => format!(
            "order {} is not active (it is {})",
            e.orderId,
            state(e.state)
        ),
        E::OrderNotEnded(e) => format!(
            "order {} has not ended (it is {})",
            e.orderId,
            state(e.state)
        ),
        E::AcceptTimeoutNotReached(e) => format!(
            "order {} may be cancelled from unix time {} (the provider still has time to accept)",
            e.orderId, e.cancellableAt
        ),
        E::WrongCollateral(e) => format!(
            "order {} needs exactly {} wei of collateral, {} was sent",
            e.orderId, e.required, e.sent
        ),
        E::ZeroEscrow(_) => "an order needs a non-zero escrow".into(),
        E::ZeroDuration(_) => "an order needs a non-zero maximum duration".into(),
        E::DurationTooLong(e) => format!(
            "a duration of {} s is longer than the {} s an order may ask for",
            e.duration, e.max
        ),
        E::ZeroFingerprint(_) => "an order needs the fingerprint of an SSH key".into(),
        E::DiskTooSmall(e) => format!(
            "a disk of {} MiB is too small: an order needs at least {} MiB",
            e.diskMiB, e.minDiskMiB
        ),
        E::DiskTooLarge(e) => format!(
            "a disk of {} MiB is more than the {} MiB the provider offers per order",
            e.diskMiB, e.maxDiskMiB
        ),
        E::ZeroAmount(_) => "the amount must not be zero".into(),
        E::AmountTooLarge(e) => format!(
            "{} wei is more than an order's escrow can hold (2^128 - 1 wei)",
            e.amount
        ),
        E::UnknownBatchCapacity(e) => format!(
            "this marketplace has no verifier for batch capacity {}",
            e.capacity
        ),
        E::HeadOutOfField(e) => format!(
            "the tick commitment {} is not a BN254 scalar",
            e.head
        ),
        E::CommitmentAlreadyPaid(e) => format!(
            "tick commitment {} of order {} was already paid",
            e.head, e.orderId
        ),
        E::InvalidProof(e) => format!("the proof of the claim for order {} does not verify", e.orderId),
        E::ClaimExceedsLeaseTime(e) => format!(
            "the claim for order {} would bring claimed time to {} s, but the lease has run only {} s",
            e.orderId, e.claimedSeconds, e.allowedSeconds
        ),
        E::ClaimExceedsEscrow(e) => format!(
            "the claim for order {} costs {} wei but only {} wei of escrow is left",
            e.orderId, e.amount, e.escrowLeft
        ),
        E::AlreadySettled(e) => format!("order {} is already settled", e.orderId),
        E::ClaimWindowOpen(e) => format!(
            "order {} can be settled from unix time {} (the provider may still claim until then)",
            e.orderId, e.settleableAt
        ),
        E::AlreadyRated(e) => format!("order {} was already rated", e.orderId),
        E::InvalidStars(e) => format!("a rating is 1 to 5 stars, not {}", e.stars),
        E::NothingOwed(e) => format!("nothing is owed to {}", e.account),
        E::TransferFailed(e) => format!("sending {} wei to {} failed", e.amount, e.to),
        E::Reentrancy(_) => "reentrant call refused".into(),
        E::TooLong(e) => format!("{} is {} bytes long, at most {} are allowed", e.field, e.length, e.max),
        E::AcceptTimeoutPassed(e) => format!(
            "order {} could only be accepted before unix time {}",
            e.orderId, e.acceptDeadline
        ),
        E::ZeroAcceptTimeout(_) => "an order needs a non-zero accept timeout".into(),
        E::SelfOrder(e) => format!("{} cannot order from itself", e.provider),
        E::PriceTooHigh(e) => format!(
            "a price of {} wei is above the {} wei the marketplace can charge",
            e.price, e.max
        ),
        E::InvalidClaimWindow(e) => format!("a claim window of {} s is not allowed", e.claimWindow),
        E::AckForAnotherOrder(e) => format!(
            "the acknowledgment is for order {}, not order {}",
            e.ackOrderId, e.orderId
        ),
        E::NoAckSigner(e) => format!("order {} has no acknowledgment key", e.orderId),
        E::InvalidAckSignature(e) => format!(
            "the acknowledgment of order {} is not signed by its key {} (recovered {})",
            e.orderId, e.ackSigner, e.recovered
        ),
        E::AckOlderThanRecorded(e) => format!(
            "the acknowledgment of order {} covers {} bytes, less than the {} already recorded",
            e.orderId, e.ackBytes, e.recordedBytes
        ),
        E::NothingPaid(e) => format!("order {} paid its provider nothing, so it cannot be rated", e.orderId),
    }
}

/// One sentence per custom error of the provider registry, in the words a user reads.
pub fn describe_registry(error: &R) -> String {
    match error {
        R::ProviderNotFound(e) => format!("no provider is registered at {}", e.provider),
        R::AlreadyRegistered(e) => format!("{} is already a registered provider", e.provider),
        R::ProviderInactive(e) => format!("provider {} has withdrawn its offer", e.provider),
        R::EmptyField(e) => format!("{} must not be empty", e.field),
        R::TooLong(e) => format!(
            "{} is {} bytes long, at most {} are allowed",
            e.field, e.length, e.max
        ),
        R::InvalidOfferDisk(e) => format!(
            "an offer's disk must be at least 32 MiB and at most its maximum per order, not {} \
             MiB with a maximum of {} MiB",
            e.diskMiB, e.maxDiskMiB
        ),
        R::TooManyDatasets(e) => format!("a provider may list at most {} datasets", e.max),
        R::DatasetExists(e) => format!(
            "provider {} already lists dataset {:?}",
            e.provider, e.datasetId
        ),
        R::UnknownDataset(e) => format!(
            "provider {} does not serve dataset {:?}",
            e.provider, e.datasetId
        ),
        R::TooManyImages(e) => format!("a provider may list at most {} images", e.max),
        R::ImageExists(e) => format!(
            "provider {} already lists image {:?} (remove it first to pin it to another digest)",
            e.provider, e.name
        ),
        R::UnknownImage(e) => format!("provider {} lists no image {:?}", e.provider, e.name),
        R::UnknownImageDigest(e) if e.digest.is_zero() => format!(
            "provider {} lists images: the order must name one of their digests",
            e.provider
        ),
        R::UnknownImageDigest(e) => format!(
            "provider {} lists no image with digest {}",
            e.provider,
            crate::types::format_image_digest(&e.digest.0)
        ),
        R::ClientImagesNotAllowed(e) => format!(
            "provider {} lets no client bring its own image: pick one of its catalog (shale images)",
            e.provider
        ),
        R::RegistryNotAllowed(e) => format!(
            "provider {} does not let clients bring images from {:?}: see the registries it allows \
             in `shale images`",
            e.provider, e.imageRepository
        ),
        R::InvalidImageRepository(e) => format!(
            "{:?} is not an image repository (HOST/PATH, without tag or digest) or registry host",
            e.value
        ),
        R::TooManyClientRegistries(e) => format!(
            "a provider may let clients bring images from at most {} registries",
            e.max
        ),
        R::NotMarketplace(e) => format!(
            "{} is not the marketplace: only it writes ratings",
            e.caller
        ),
        R::NotMinerController(e) => format!(
            "{} is not the owner, worker or a control address of miner f0{}: add its f410 address \
             as a control address of the miner first",
            e.provider, e.minerId
        ),
        R::NoMiner(e) => format!(
            "provider {} has set no Filecoin miner: set it (`shale sp miner f0…`) before listing a \
             dataset with a deal",
            e.provider
        ),
        R::DealPieceMismatch(e) => format!(
            "deal {} stores piece {}, not the dataset's piece {}",
            e.dealId, e.dealPieceCid, e.datasetPieceCid
        ),
        R::DealProviderMismatch(e) => format!(
            "deal {} is stored with miner f0{}, not with this provider's miner f0{}",
            e.dealId, e.dealMiner, e.providerMiner
        ),
        R::FilecoinUnavailable(_) => "this chain has no Filecoin actors (it is not FEVM), so a \
             dataset's deal cannot be checked: list it without a deal id"
            .into(),
        R::ActorCallFailed(e)
            if e.exitCode == alloy::primitives::I256::try_from(17).unwrap_or_default() =>
        {
            format!(
                "Filecoin actor f0{} knows no such deal or entry (exit code 17, not found)",
                e.actorId
            )
        }
        R::ActorCallFailed(e) => format!(
            "the call to Filecoin actor f0{} (method {}) failed with exit code {}",
            e.actorId, e.method, e.exitCode
        ),
        R::MalformedActorReturn(e) => format!(
            "Filecoin actor f0{} answered method {} with data that is not what it returns",
            e.actorId, e.method
        ),
    }
}
