//! Who may enter: the rules that turn an order read from chain and an offered key into "come in" or
//! a refusal the user can read on their terminal.

use alloy_primitives::Address;
use russh::keys::{HashAlg, PublicKey};
use shale_contracts::{Order, OrderState};

use crate::login::{MalformedLogin, OrderId};

/// Why a client was not let in, or was put out. The `Display` text is what the user sees on
/// their terminal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The username is not an order id.
    #[error(transparent)]
    Malformed(#[from] MalformedLogin),
    /// No order with this id exists on the marketplace.
    #[error("order {0} does not exist on the marketplace")]
    UnknownOrder(OrderId),
    /// The order was placed with another provider.
    #[error("order {0} was placed with another provider, not this one")]
    OtherProvider(OrderId),
    /// The provider has not accepted the order yet.
    #[error("order {0} is not accepted yet: wait for the provider to accept it")]
    NotAccepted(OrderId),
    /// The client cancelled the order before it was accepted.
    #[error("order {0} was cancelled")]
    Cancelled(OrderId),
    /// The lease was terminated or ran to its end.
    #[error("order {0} has ended")]
    Ended(OrderId),
    /// The escrow cannot pay for more time.
    #[error("order {0} is out of escrow: top it up with `shale order top-up {0}`")]
    EscrowExhausted(OrderId),
    /// The offered key is not the order's key.
    #[error("this key is not the key of order {order} (the order expects {expected})")]
    WrongKey {
        /// The order.
        order: OrderId,
        /// The fingerprint the order names, as `ssh-keygen -lf` prints it.
        expected: String,
    },
    /// The chain cannot be read and the order is not in the cache.
    #[error("the marketplace cannot be reached right now, so order {0} cannot be checked; try again shortly")]
    ChainUnavailable(OrderId),
    /// Too many failed attempts from this address, and this login would need a chain lookup.
    #[error("too many failed logins from your address: the gateway will not look up orders it has not seen from there for a minute; try again then")]
    RateLimited,
    /// The order already has as many sessions as it may.
    #[error("order {order} already has {limit} open sessions, the most it may have at once; close one (or run fewer in parallel) and try again")]
    SessionCap {
        /// The order.
        order: OrderId,
        /// The configured cap.
        limit: usize,
    },
    /// Usage cannot be recorded, so none may be incurred.
    #[error(
        "the provider cannot record usage right now, so it cannot let you in; try again shortly"
    )]
    LedgerUnavailable,
    /// The gateway is shutting down.
    #[error("the gateway is restarting; reconnect in a moment")]
    ShuttingDown,
    /// The order's network lost its rules or link and could not be restored, so the provisioner
    /// stopped the container rather than leave it open; a new login starts it again.
    #[error("order {order}'s container was stopped because its network could not be restored ({reason}); its files are kept, reconnect to start it again")]
    NetworkLost {
        /// The order.
        order: OrderId,
        /// What the provisioner said.
        reason: String,
    },
}

impl Refusal {
    /// A short, stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed_login",
            Refusal::UnknownOrder(_) => "unknown_order",
            Refusal::OtherProvider(_) => "other_provider",
            Refusal::NotAccepted(_) => "not_accepted",
            Refusal::Cancelled(_) => "cancelled",
            Refusal::Ended(_) => "ended",
            Refusal::EscrowExhausted(_) => "escrow_exhausted",
            Refusal::WrongKey { .. } => "wrong_key",
            Refusal::ChainUnavailable(_) => "chain_unavailable",
            Refusal::RateLimited => "rate_limited",
            Refusal::SessionCap { .. } => "session_cap",
            Refusal::LedgerUnavailable => "ledger_unavailable",
            Refusal::ShuttingDown => "shutting_down",
            Refusal::NetworkLost { .. } => "network_lost",
        }
    }
}

/// Checks that `order` may be served by `provider` at unix time `now`, whatever key is offered.
pub fn admit_order(order: &Order, provider: Address, now: u64) -> Result<(), Refusal> {
    let id = OrderId(order.id);
    if order.provider != provider {
        return Err(Refusal::OtherProvider(id));
    }
    match order.state {
        OrderState::Pending => return Err(Refusal::NotAccepted(id)),
        OrderState::Cancelled => return Err(Refusal::Cancelled(id)),
        OrderState::Ended => return Err(Refusal::Ended(id)),
        OrderState::Active => {}
    }
    if order.expires_at().is_some_and(|end| now >= end) {
        return Err(Refusal::Ended(id));
    }
    if order.escrow.is_zero() {
        return Err(Refusal::EscrowExhausted(id));
    }
    Ok(())
}

/// The SHA-256 digest of a public key blob: what the order stores and `ssh-keygen -lf` prints.
pub fn key_digest(key: &PublicKey) -> [u8; 32] {
    let fp = key.fingerprint(HashAlg::Sha256);
    let mut out = [0u8; 32];
    out.copy_from_slice(fp.as_bytes());
    out
}

/// Checks that `key` is the key the order was placed with.
pub fn admit_key(order: &Order, key: &PublicKey) -> Result<(), Refusal> {
    if key_digest(key) == order.key_fingerprint {
        Ok(())
    } else {
        Err(wrong_key(order))
    }
}

/// The refusal for a key that is not `order`'s, naming the fingerprint the order expects.
pub fn wrong_key(order: &Order) -> Refusal {
    Refusal::WrongKey {
        order: OrderId(order.id),
        expected: format_fingerprint(&order.key_fingerprint),
    }
}

/// Formats a SHA-256 key digest the way OpenSSH does: `SHA256:` and unpadded base64.
pub fn format_fingerprint(digest: &[u8; 32]) -> String {
    use russh::keys::ssh_key::Fingerprint;
    Fingerprint::Sha256(*digest).to_string()
}
