//! Shale's marketplace on chain: the Solidity contracts (`contracts/src/*.sol`, tested with
//! forge), their alloy bindings, and the typed client the gateway and the CLI use.
//!
//! - [`Marketplace`]: connect to a deployed marketplace, read orders and providers, send the
//!   transactions of clients and providers, [`Marketplace::watch`] its events.
//! - [`devnet`]: a real local `anvil` with funded dev accounts, and deployment.
//! - [`ChainError`]: an outage, a refusal by the contract (in words), or a missing order.
//! - [`filecoin_address`]: the `0x…` and `f410f…`/`t410f…` spellings of one account.
//!
//! Money is integer wei ([`U256`]) throughout; the contract documents its rounding rules.

pub mod ack;
pub mod bindings;
mod client;
pub mod devnet;
mod error;
mod events;
pub mod fees;
pub mod filecoin_address;
pub mod filecoin_double;
mod types;

pub use alloy::primitives::{Address, Bytes, B256, U256};
pub use alloy::signers::local::PrivateKeySigner;
pub use client::Marketplace;
pub use error::{describe, describe_registry, ChainError, Refusal};
pub use events::{EventStream, MarketEvent};
pub use fees::FeePolicy;
pub use filecoin_address::{AddressError, AnyAddress, Network};
pub use types::{
    format_fingerprint, format_image_digest, key_fingerprint, key_fingerprint_openssh,
    parse_image_digest, ClaimReceipt, ClaimRequest, Dataset, Image, NewOrder, Offer, Order,
    OrderState, Provider, Rating, SignedAck, TxReceipt, DEFAULT_BYTE_ALLOWANCE, DEFAULT_IMAGE_NAME,
};
