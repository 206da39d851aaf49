//! Domain types of the marketplace, converted from the raw ABI structs of [`crate::bindings`].
//!
//! Money is integer wei ([`U256`]); times are unix seconds of the chain's clock.

use alloy::primitives::{Address, Bytes, B256, U256};

use crate::bindings::{Marketplace as abi, ProviderRegistry as reg_abi};
use crate::error::ChainError;

/// Lifecycle of an order on chain.
///
/// `Ended` covers a termination by either side and a natural expiry: the contract reports an
/// Active order whose `acceptedAt + maxDuration` has passed as Ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum OrderState {
    /// Created and paid; waiting for the provider to accept.
    Pending,
    /// Accepted: the lease runs.
    Active,
    /// Terminated or expired; the provider may still claim usage up to the end time.
    Ended,
    /// Never accepted; the escrow went back to the client.
    Cancelled,
}

impl OrderState {
    pub(crate) fn from_abi(raw: u8) -> Result<Self, ChainError> {
        match raw {
            0 => Ok(Self::Pending),
            1 => Ok(Self::Active),
            2 => Ok(Self::Ended),
            3 => Ok(Self::Cancelled),
            other => Err(ChainError::Decode(format!("unknown order state {other}"))),
        }
    }

    /// The state in lower-case words, as error messages use it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Ended => "ended",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for OrderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An order as the contract reports it (with its effective state at the block read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: u64,
    pub client: Address,
    pub provider: Address,
    /// SHA-256 of the client's SSH public key blob (see [`crate::key_fingerprint`]).
    pub key_fingerprint: [u8; 32],
    pub cpus: u32,
    pub memory_mib: u64,
    /// Disk the order's container may write (root filesystem changes and `/work`), in MiB.
    pub disk_mib: u64,
    pub gpus: u32,
    /// Dataset id of the provider's registry entry, mounted read-only into the lease.
    pub dataset: Option<String>,
    /// SHA-256 of the OCI manifest or index of the image the order runs (one of the provider's
    /// catalog digests, see [`Image`]); `None`: the provider's built-in default (the contract
    /// allows it only while the provider lists no images).
    pub image_digest: Option<[u8; 32]>,
    /// Where the client's own image is pulled from (`HOST/PATH`, as
    /// `image_repository@image_digest`); `None` for a catalog image.
    pub image_repository: Option<String>,
    pub price_per_second: U256,
    pub price_per_gib: U256,
    pub max_duration_secs: u64,
    /// What is left of the client's escrow.
    pub escrow: U256,
    /// Collateral the provider posts to accept (posted once Active).
    pub collateral: U256,
    pub state: OrderState,
    pub created_at: u64,
    /// Seconds after `created_at` from which the client may cancel an unaccepted order.
    pub accept_timeout_secs: u64,
    pub accepted_at: Option<u64>,
    /// Termination time, or expiry time for an expired order.
    pub ended_at: Option<u64>,
    /// Who terminated or cancelled; `None` for expiry or while live.
    pub ended_by: Option<Address>,
    pub claimed_seconds: u64,
    pub claimed_bytes: u128,
    /// The client's acknowledgment key (EIP-712 signer of usage), if the order has one.
    pub ack_signer: Option<Address>,
    /// Bytes the provider may be paid for without an acknowledgment.
    pub byte_allowance: u64,
    /// The largest acknowledged cumulative bytes (in + out) the contract recorded.
    pub acked_bytes: u128,
    /// The tick-chain head of that acknowledgment.
    pub acked_head: [u8; 32],
    /// Total paid to the provider by claims.
    pub paid: U256,
    /// Last paid tick-chain commitment (all zero before the first claim).
    pub head: [u8; 32],
    /// True once the escrow and collateral were paid out (settled or cancelled).
    pub settled: bool,
    pub rated: bool,
}

impl Order {
    /// When the lease expires by itself (`accepted_at + max_duration`); `None` until accepted.
    pub fn expires_at(&self) -> Option<u64> {
        self.accepted_at
            .map(|at| at.saturating_add(self.max_duration_secs))
    }

    /// True when the lease may serve a session at unix time `now`: accepted, not terminated,
    /// not expired. The escrow left is the meter's business, not this check's.
    pub fn is_live_at(&self, now: u64) -> bool {
        match (self.state, self.expires_at()) {
            (OrderState::Active, Some(expiry)) => now < expiry,
            _ => false,
        }
    }

    /// The most bytes (in + out, cumulative) the contract pays the provider for: the larger of
    /// the acknowledged total and the allowance. Claimed bytes past it are forfeited.
    pub fn bytes_bound(&self) -> u128 {
        self.acked_bytes.max(u128::from(self.byte_allowance))
    }

    /// Seconds of lease time the provider may still claim at unix time `now`.
    pub fn claimable_seconds_at(&self, now: u64) -> u64 {
        let Some(accepted) = self.accepted_at else {
            return 0;
        };
        if self.state == OrderState::Cancelled || self.settled {
            return 0;
        }
        let mut end = self.ended_at.unwrap_or(now).min(now);
        if let Some(expiry) = self.expires_at() {
            end = end.min(expiry);
        }
        end.saturating_sub(accepted)
            .saturating_sub(self.claimed_seconds)
    }

    pub(crate) fn from_abi(raw: abi::Order) -> Result<Self, ChainError> {
        let id = u64_of(raw.id, "order id")?;
        let opt_time = |t: u64| (t != 0).then_some(t);
        let terms = raw.terms;
        Ok(Self {
            id,
            client: raw.client,
            provider: raw.provider,
            key_fingerprint: terms.keyFingerprint.0,
            cpus: terms.cpus,
            memory_mib: terms.memoryMiB,
            disk_mib: terms.diskMiB,
            gpus: terms.gpus,
            dataset: (!terms.datasetId.is_empty()).then_some(terms.datasetId),
            image_digest: (terms.imageDigest != B256::ZERO).then_some(terms.imageDigest.0),
            image_repository: (!terms.imageRepository.is_empty()).then_some(terms.imageRepository),
            price_per_second: terms.pricePerSecond,
            price_per_gib: terms.pricePerGiB,
            max_duration_secs: terms.maxDuration,
            escrow: raw.escrow,
            collateral: terms.collateral,
            state: OrderState::from_abi(raw.state)?,
            created_at: raw.createdAt,
            accept_timeout_secs: terms.acceptTimeout,
            accepted_at: opt_time(raw.acceptedAt),
            ended_at: opt_time(raw.endedAt),
            ended_by: (raw.endedBy != Address::ZERO).then_some(raw.endedBy),
            claimed_seconds: raw.claimedSeconds,
            claimed_bytes: raw.claimedBytes.to::<u128>(),
            ack_signer: (terms.ackSigner != Address::ZERO).then_some(terms.ackSigner),
            byte_allowance: terms.byteAllowance,
            acked_bytes: raw.ackedBytes.to::<u128>(),
            acked_head: raw.ackedHead.0,
            paid: raw.paid,
            head: raw.head.0,
            settled: raw.settled,
            rated: raw.rated,
        })
    }
}

/// What a client asks for. The escrow is paid with the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub provider: Address,
    /// SHA-256 of the SSH public key the client will log in with.
    pub key_fingerprint: [u8; 32],
    pub cpus: u32,
    pub memory_mib: u64,
    /// Disk in MiB: more than 0 and at most the offer's `max_disk_mib`, or the contract refuses.
    pub disk_mib: u64,
    pub gpus: u32,
    pub dataset: Option<String>,
    /// Digest of the provider's catalog image the order runs ([`Image::digest`]); `None` (0 on
    /// chain) only for a provider that lists no images. See [`Provider::default_image`].
    /// With `image_repository`, the digest of the client's own image.
    pub image_digest: Option<[u8; 32]>,
    /// The client brings its own image, pulled from this repository (`HOST/PATH`) by digest on
    /// a registry the provider allows ([`Provider::client_image_registries`]).
    pub image_repository: Option<String>,
    pub price_per_second: U256,
    pub price_per_gib: U256,
    pub max_duration_secs: u64,
    /// Paid into escrow with the transaction.
    pub escrow: U256,
    /// Collateral the provider must post to accept, e.g. a fraction of the escrow.
    pub collateral: U256,
    /// Seconds after creation from which the client may cancel if the provider did not accept.
    pub accept_timeout_secs: u64,
    /// The client's acknowledgment key for this order (its payment tunnel signs usage with
    /// it); none: bytes are paid only up to the allowance.
    pub ack_signer: Option<Address>,
    /// Bytes the provider may be paid for without an acknowledgment.
    pub byte_allowance: u64,
}

/// The byte allowance an order gets unless the client says otherwise: enough for logins,
/// receipts and small copies made without the tunnel, small next to any escrow.
pub const DEFAULT_BYTE_ALLOWANCE: u64 = 64 << 20;

/// The contract's tariff rule for one batch: `seconds * pricePerSecond + floor((bytesIn +
/// bytesOut) * pricePerGiB / 2^30)`. Prices are at most 2^128 - 1 (the contract refuses more), so
/// the sum stays below 2^195 and cannot overflow.
pub(crate) fn batch_price(
    price_per_second: U256,
    price_per_gib: U256,
    seconds: u64,
    bytes_in: u64,
    bytes_out: u64,
) -> U256 {
    let bytes = U256::from(bytes_in) + U256::from(bytes_out);
    U256::from(seconds) * price_per_second + ((bytes * price_per_gib) >> 30)
}

impl NewOrder {
    /// An order for `provider`'s current offer and tariff (its default disk and default image
    /// included), with the given escrow and duration; collateral defaults to a tenth of the
    /// escrow and the accept timeout to ten minutes.
    pub fn for_offer(
        provider: &Provider,
        key_fingerprint: [u8; 32],
        escrow: U256,
        max_duration_secs: u64,
    ) -> Self {
        Self {
            provider: provider.address,
            key_fingerprint,
            cpus: provider.offer.cpus,
            memory_mib: provider.offer.memory_mib,
            disk_mib: provider.offer.disk_mib,
            gpus: provider.offer.gpu_count,
            dataset: None,
            image_digest: provider.default_image().map(|i| i.digest),
            image_repository: None,
            price_per_second: provider.offer.price_per_second,
            price_per_gib: provider.offer.price_per_gib,
            max_duration_secs,
            escrow,
            collateral: escrow / U256::from(10),
            accept_timeout_secs: 600,
            ack_signer: None,
            byte_allowance: DEFAULT_BYTE_ALLOWANCE,
        }
    }

    pub(crate) fn terms(&self) -> abi::Terms {
        abi::Terms {
            keyFingerprint: B256::from(self.key_fingerprint),
            ackSigner: self.ack_signer.unwrap_or(Address::ZERO),
            byteAllowance: self.byte_allowance,
            cpus: self.cpus,
            memoryMiB: self.memory_mib,
            diskMiB: self.disk_mib,
            gpus: self.gpus,
            datasetId: self.dataset.clone().unwrap_or_default(),
            imageDigest: B256::from(self.image_digest.unwrap_or_default()),
            pricePerSecond: self.price_per_second,
            pricePerGiB: self.price_per_gib,
            maxDuration: self.max_duration_secs,
            collateral: self.collateral,
            acceptTimeout: self.accept_timeout_secs,
            imageRepository: self.image_repository.clone().unwrap_or_default(),
        }
    }
}

/// Resources and tariff a provider offers. Prices are integer wei.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Offer {
    pub cpus: u32,
    pub memory_mib: u64,
    /// Disk an order gets when it asks for no size, in MiB; never 0.
    pub disk_mib: u64,
    /// The most disk one order may ask for, in MiB; at least `disk_mib`.
    pub max_disk_mib: u64,
    /// Empty when the offer has no GPU.
    pub gpu_model: String,
    pub gpu_count: u32,
    pub price_per_second: U256,
    pub price_per_gib: U256,
}

impl Offer {
    pub(crate) fn to_abi(&self) -> reg_abi::Offer {
        reg_abi::Offer {
            cpus: self.cpus,
            memoryMiB: self.memory_mib,
            diskMiB: self.disk_mib,
            maxDiskMiB: self.max_disk_mib,
            gpuModel: self.gpu_model.clone(),
            gpuCount: self.gpu_count,
            pricePerSecond: self.price_per_second,
            pricePerGiB: self.price_per_gib,
        }
    }

    fn from_abi(raw: reg_abi::Offer) -> Self {
        Self {
            cpus: raw.cpus,
            memory_mib: raw.memoryMiB,
            disk_mib: raw.diskMiB,
            max_disk_mib: raw.maxDiskMiB,
            gpu_model: raw.gpuModel,
            gpu_count: raw.gpuCount,
            price_per_second: raw.pricePerSecond,
            price_per_gib: raw.pricePerGiB,
        }
    }
}

/// A dataset a provider stores on Filecoin and mounts read-only into leases.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dataset {
    /// Provider-chosen id, unique per provider; orders name it.
    pub id: String,
    /// Filecoin piece CID, when known.
    pub piece_cid: Option<String>,
    /// Filecoin storage deal id, when known. On FEVM the registry checked it when the dataset
    /// was listed: the deal stores `piece_cid` with the provider's miner.
    pub deal_id: Option<u64>,
    pub size_bytes: u64,
    pub description: String,
    /// When the provider last recorded on chain that it verified the bytes it serves against
    /// `piece_cid` (unix seconds); read from the chain, never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<u64>,
}

impl Dataset {
    pub(crate) fn to_abi(&self) -> reg_abi::Dataset {
        reg_abi::Dataset {
            id: self.id.clone(),
            pieceCid: self.piece_cid.clone().unwrap_or_default(),
            dealId: self.deal_id.unwrap_or(0),
            sizeBytes: self.size_bytes,
            description: self.description.clone(),
        }
    }

    pub(crate) fn from_abi(raw: reg_abi::Dataset) -> Self {
        Self {
            id: raw.id,
            piece_cid: (!raw.pieceCid.is_empty()).then_some(raw.pieceCid),
            deal_id: (raw.dealId != 0).then_some(raw.dealId),
            size_bytes: raw.sizeBytes,
            description: raw.description,
            verified_at: None,
        }
    }

    pub(crate) fn verified_at(mut self, at: Option<u64>) -> Self {
        self.verified_at = at;
        self
    }
}

/// An OCI image a provider runs orders from, pinned by the SHA-256 digest of its manifest or
/// index (what a registry serves for `REPO@sha256:<hex>`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Image {
    /// Provider-chosen name, unique per provider (at most 128 bytes); `default` is the one the
    /// CLI picks when the client names none.
    pub name: String,
    pub digest: [u8; 32],
    pub description: String,
    /// Built for the provider's GPUs (CUDA user space and the like).
    pub gpu_ready: bool,
    /// Approximate size on disk; 0 when unknown.
    pub size_bytes: u64,
}

/// The name [`Provider::default_image`] looks for first.
pub const DEFAULT_IMAGE_NAME: &str = "default";

impl Image {
    /// The digest in OCI's text form, `sha256:<64 hex>`.
    pub fn digest_text(&self) -> String {
        format_image_digest(&self.digest)
    }

    pub(crate) fn to_abi(&self) -> reg_abi::Image {
        reg_abi::Image {
            name: self.name.clone(),
            digest: B256::from(self.digest),
            description: self.description.clone(),
            gpuReady: self.gpu_ready,
            sizeBytes: self.size_bytes,
        }
    }

    pub(crate) fn from_abi(raw: reg_abi::Image) -> Self {
        Self {
            name: raw.name,
            digest: raw.digest.0,
            description: raw.description,
            gpu_ready: raw.gpuReady,
            size_bytes: raw.sizeBytes,
        }
    }
}

/// `sha256:<64 lowercase hex>`, OCI's text form of an image digest.
pub fn format_image_digest(digest: &[u8; 32]) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses OCI's `sha256:<64 hex>` (upper or lower case hex) into the 32 bytes the contract
/// stores. Other algorithms (`sha512:`) and malformed text are refused.
pub fn parse_image_digest(text: &str) -> Result<[u8; 32], ChainError> {
    let bad = |why: &str| ChainError::InvalidInput(format!("image digest {text:?}: {why}"));
    let hex = text
        .trim()
        .strip_prefix("sha256:")
        .ok_or_else(|| bad("expected sha256:<64 hex digits>"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("expected 64 hex digits after sha256:"));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad("not hex"))?;
    }
    if out == [0u8; 32] {
        return Err(bad("the zero digest names no image"));
    }
    Ok(out)
}

/// A provider's registry entry with its datasets, image catalog and rating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub address: Address,
    /// Gateway endpoint, `host:port`.
    pub endpoint: String,
    /// The gateway's SSH host public key, OpenSSH format (`ssh-ed25519 AAAA...`): clients write
    /// their `known_hosts` entry from it.
    pub ssh_host_key: String,
    pub offer: Offer,
    /// False once withdrawn: no new orders can name it.
    pub active: bool,
    pub registered_at: u64,
    pub datasets: Vec<Dataset>,
    /// The images orders may run (in the contract's order, which a removal reshuffles).
    pub images: Vec<Image>,
    pub rating: Rating,
    /// The Filecoin miner (actor id) the provider's datasets' deals are stored with, once set.
    pub miner_id: Option<u64>,
    /// Registry hosts (`host[:port]`) clients may bring their own images from; empty: none.
    pub client_image_registries: Vec<String>,
}

/// A provider's rating from clients of ended orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rating {
    pub count: u64,
    /// Sum of all stars (1 to 5 each).
    pub sum: u64,
    /// What the rated orders paid in all, in wei: each rating counts by what its order paid.
    pub weight: U256,
    /// Sum of stars times what each rated order paid.
    pub weighted_stars: U256,
}

impl Rating {
    /// Average in hundredths of a star, weighted by what each rated order paid and floored
    /// like the contract's `ratingWeightedStars * 100 / ratingWeight` (4.666... stars reads 466); `None` when nobody
    /// rated yet.
    pub fn average_centistars(&self) -> Option<u64> {
        if self.count == 0 || self.weight.is_zero() {
            return None;
        }
        let avg = self.weighted_stars * U256::from(100) / self.weight;
        Some(avg.saturating_to::<u64>())
    }
}

impl Provider {
    /// The image an order runs when the client names none: the catalog entry named `default`,
    /// else the first entry; `None` when the catalog is empty (the order then carries 0, the
    /// provider's built-in default).
    pub fn default_image(&self) -> Option<&Image> {
        self.images
            .iter()
            .find(|i| i.name == DEFAULT_IMAGE_NAME)
            .or_else(|| self.images.first())
    }

    /// The catalog entry named `name`.
    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.iter().find(|i| i.name == name)
    }

    /// The catalog entry whose digest is `digest`.
    pub fn image_by_digest(&self, digest: &[u8; 32]) -> Option<&Image> {
        self.images.iter().find(|i| &i.digest == digest)
    }

    pub(crate) fn from_abi(
        raw: reg_abi::Provider,
        datasets: Vec<Dataset>,
        images: Vec<Image>,
    ) -> Self {
        Self {
            address: raw.owner,
            endpoint: raw.endpoint,
            ssh_host_key: raw.sshHostKey,
            offer: Offer::from_abi(raw.offer),
            active: raw.active,
            registered_at: raw.registeredAt,
            datasets,
            images,
            rating: Rating {
                count: raw.ratingCount,
                sum: raw.ratingSum,
                weight: raw.ratingWeight,
                weighted_stars: raw.ratingWeightedStars,
            },
            miner_id: None,
            client_image_registries: Vec::new(),
        }
    }

    pub(crate) fn with_miner(mut self, miner_id: Option<u64>) -> Self {
        self.miner_id = miner_id;
        self
    }

    pub(crate) fn with_client_image_registries(mut self, hosts: Vec<String>) -> Self {
        self.client_image_registries = hosts;
        self
    }

    /// Whether a client may bring an image from `repository` (`HOST/PATH`): the contract's rule.
    pub fn allows_client_image(&self, repository: &str) -> bool {
        self.client_image_registries.iter().any(|host| {
            repository
                .strip_prefix(host.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|path| !path.is_empty())
        })
    }
}

/// One proven batch of ticks to be paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub order_id: u64,
    /// Which verifier checks the proof: the batch capacity of the circuit that produced it.
    pub batch_capacity: u32,
    /// Tick-chain commitment after the batch (a BN254 scalar, big-endian).
    pub next_head: [u8; 32],
    pub seconds: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// 256-byte Groth16 proof (see `ITickVerifier`).
    pub proof: Bytes,
    /// The client's newest acknowledgment, recorded in the same transaction; needed once the
    /// order's paid bytes pass its allowance.
    pub ack: Option<SignedAck>,
}

/// An acknowledgment with its 65-byte signature, as the client's tunnel sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedAck {
    pub ack: crate::ack::Acknowledgment,
    pub signature: Bytes,
}

impl SignedAck {
    pub(crate) fn to_abi(&self) -> abi::Acknowledgment {
        abi::Acknowledgment {
            orderId: self.ack.orderId,
            head: self.ack.head,
            leaseSeconds: self.ack.seconds,
            bytesIn: self.ack.bytesIn,
            bytesOut: self.ack.bytesOut,
        }
    }
}

/// What a mined transaction cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxReceipt {
    pub tx_hash: B256,
    pub block_number: u64,
    pub gas_used: u64,
    /// `gas_used * effective_gas_price`, in wei: what the sender paid for the transaction.
    pub fee: U256,
}

/// The receipt of a paid claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimReceipt {
    pub tx: TxReceipt,
    pub gas_used: u64,
    /// Wei paid to the provider for this batch.
    pub amount: U256,
    pub escrow_left: U256,
}

/// SHA-256 of an SSH public key blob: the order's `key_fingerprint`, the same digest
/// `ssh-keygen -lf` prints (there in unpadded base64 after `SHA256:`).
pub fn key_fingerprint(key_blob: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key_blob).into()
}

/// Fingerprint of an OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
pub fn key_fingerprint_openssh(line: &str) -> Result<[u8; 32], ChainError> {
    use base64::Engine;
    let mut fields = line.split_whitespace();
    let (Some(_kind), Some(b64)) = (fields.next(), fields.next()) else {
        return Err(ChainError::InvalidInput(
            "an OpenSSH public key line looks like `ssh-ed25519 AAAA... comment`".into(),
        ));
    };
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| ChainError::InvalidInput(format!("SSH public key is not base64: {e}")))?;
    Ok(key_fingerprint(&blob))
}

/// The fingerprint as `ssh-keygen -lf` prints it: `SHA256:` + unpadded base64.
pub fn format_fingerprint(fingerprint: &[u8; 32]) -> String {
    use base64::Engine;
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(fingerprint)
    )
}

pub(crate) fn u64_of(value: U256, what: &str) -> Result<u64, ChainError> {
    u64::try_from(value).map_err(|_| ChainError::Decode(format!("{what} {value} exceeds u64")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_price_floors_the_byte_charge_like_the_contract() {
        let (pps, ppg) = (U256::from(1_000_003u64), U256::from(7_000_000_001u64));
        let gib = 1u64 << 30;
        assert_eq!(
            batch_price(pps, ppg, 0, gib - 1, 0),
            U256::from(6_999_999_994u64)
        );
        assert_eq!(batch_price(pps, ppg, 0, 0, 1), U256::from(6u64));
        assert_eq!(batch_price(pps, ppg, 0, gib / 2, gib / 2), ppg);
        assert_eq!(batch_price(pps, ppg, 2, 0, 0), U256::from(2_000_006u64));
        // The largest batch at the largest prices is priced, not wrapped.
        let max = U256::from(u128::MAX);
        let all = u64::MAX;
        let expected = U256::from(all) * max + ((U256::from(all) * U256::from(2u8) * max) >> 30);
        assert_eq!(batch_price(max, max, all, all, all), expected);
    }

    fn active_order(accepted_at: u64, max: u64) -> Order {
        Order {
            id: 1,
            client: Address::ZERO,
            provider: Address::ZERO,
            key_fingerprint: [1; 32],
            cpus: 1,
            memory_mib: 512,
            disk_mib: 1024,
            gpus: 0,
            dataset: None,
            image_digest: None,
            image_repository: None,
            price_per_second: U256::from(1),
            price_per_gib: U256::ZERO,
            max_duration_secs: max,
            escrow: U256::from(100),
            collateral: U256::ZERO,
            state: OrderState::Active,
            created_at: accepted_at - 5,
            accept_timeout_secs: 60,
            accepted_at: Some(accepted_at),
            ended_at: None,
            ended_by: None,
            claimed_seconds: 0,
            claimed_bytes: 0,
            ack_signer: None,
            byte_allowance: 0,
            acked_bytes: 0,
            acked_head: [0; 32],
            paid: U256::ZERO,
            head: [0; 32],
            settled: false,
            rated: false,
        }
    }

    #[test]
    fn order_is_live_until_its_expiry_second() {
        let order = active_order(1_000, 60);
        assert_eq!(order.expires_at(), Some(1_060));
        assert!(order.is_live_at(1_000));
        assert!(order.is_live_at(1_059));
        assert!(!order.is_live_at(1_060));
    }

    #[test]
    fn pending_and_ended_orders_are_not_live() {
        let mut order = active_order(1_000, 60);
        order.state = OrderState::Pending;
        order.accepted_at = None;
        assert!(!order.is_live_at(1_001));
        assert_eq!(order.expires_at(), None);
        order.state = OrderState::Ended;
        order.accepted_at = Some(1_000);
        assert!(!order.is_live_at(1_001));
    }

    #[test]
    fn claimable_seconds_stop_at_termination_and_subtract_claims() {
        let mut order = active_order(1_000, 60);
        assert_eq!(order.claimable_seconds_at(1_030), 30);
        assert_eq!(order.claimable_seconds_at(5_000), 60);
        order.state = OrderState::Ended;
        order.ended_at = Some(1_020);
        order.claimed_seconds = 5;
        assert_eq!(order.claimable_seconds_at(1_050), 15);
        order.settled = true;
        assert_eq!(order.claimable_seconds_at(1_050), 0);
    }

    #[test]
    fn rating_average_is_floored_hundredths() {
        // Three ratings (5, 5, 4 stars) from orders that paid 1, 1 and 1: 4.666… stars.
        let rating = Rating {
            count: 3,
            sum: 14,
            weight: U256::from(3),
            weighted_stars: U256::from(14),
        };
        assert_eq!(rating.average_centistars(), Some(466));
        // The same stars where the 4-star order paid eight times as much: 4.2 stars.
        let weighted = Rating {
            weight: U256::from(10),
            weighted_stars: U256::from(5 + 5 + 4 * 8),
            ..rating
        };
        assert_eq!(weighted.average_centistars(), Some(420));
        assert_eq!(Rating::default().average_centistars(), None);
    }

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        // A key made with `ssh-keygen -t ed25519`; `ssh-keygen -lf` printed the expected line.
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILpbI6zHCqIRA4Rgyh8OHoWol7YJ57KPTCrSIlgfr2xe test";
        let fp = key_fingerprint_openssh(line).unwrap();
        assert_eq!(format_fingerprint(&fp), EXPECTED_FINGERPRINT);
        assert!(key_fingerprint_openssh("ssh-ed25519 not-base64!").is_err());
        assert!(key_fingerprint_openssh("").is_err());
    }

    const EXPECTED_FINGERPRINT: &str = "SHA256:9YvCCHXrldA++tbPkGp5YZXn0sVMbaYi42lnPtGI63Y";

    #[test]
    fn image_digests_round_trip_through_the_oci_text_form() {
        let text = "sha256:0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789abcdef";
        let digest = parse_image_digest(text).unwrap();
        assert_eq!(digest[0], 0x01);
        assert_eq!(digest[31], 0xef);
        assert_eq!(format_image_digest(&digest), text.to_lowercase());
        for bad in [
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha512:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:0123",
            "sha256:zz23456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(parse_image_digest(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn the_default_image_is_the_one_named_default_else_the_first() {
        let image = |name: &str, b: u8| Image {
            name: name.into(),
            digest: [b; 32],
            description: String::new(),
            gpu_ready: false,
            size_bytes: 0,
        };
        let mut provider = Provider {
            address: Address::ZERO,
            endpoint: "sp:22".into(),
            ssh_host_key: "ssh-ed25519 AAAA".into(),
            offer: Offer {
                cpus: 1,
                memory_mib: 1,
                disk_mib: 32,
                max_disk_mib: 32,
                gpu_model: String::new(),
                gpu_count: 0,
                price_per_second: U256::ZERO,
                price_per_gib: U256::ZERO,
            },
            active: true,
            registered_at: 0,
            datasets: vec![],
            images: vec![],
            rating: Rating::default(),
            miner_id: None,
            client_image_registries: Vec::new(),
        };
        assert!(provider.default_image().is_none());
        let order = NewOrder::for_offer(&provider, [1; 32], U256::from(1), 60);
        assert_eq!(order.image_digest, None);
        assert_eq!(order.terms().imageDigest, B256::ZERO);
        provider.images = vec![image("pytorch", 1), image("default", 2)];
        assert_eq!(provider.default_image().unwrap().name, "default");
        let order = NewOrder::for_offer(&provider, [1; 32], U256::from(1), 60);
        assert_eq!(order.image_digest, Some([2; 32]));
        provider.images.pop();
        assert_eq!(provider.default_image().unwrap().name, "pytorch");
        assert_eq!(provider.image_by_digest(&[1; 32]).unwrap().name, "pytorch");
    }
}
