//! Shale's SSH gateway: a client with nothing but OpenSSH runs `ssh 42@sp.example` and lands in
//! order 42's container.
//!
//! The path of a connection: [`gateway`] accepts, [`connection`] authenticates against the order
//! on chain ([`orders`], [`admission`]), [`session_channel`] and [`forward`] run each channel in
//! the order's container through metered pumps, [`leases`] knows every live session so that
//! [`watcher`] can warn and end them when the order ends or its escrow runs out ([`billing`]).
//! [`quality`] measures what the client really gets, [`traffic`] counts what its container moves
//! on its own network (which [`watcher`] also keeps repaired), [`metrics`] and [`metrics_http`]
//! export it. [`lease_events`] tells the rest of the process of every lease metered and every
//! order ended, which is how the settler (crate `shale-settler`, wired by `shale gateway`) claims
//! the ledger's ticks without the gateway knowing of it. What they all share is [`shared`]; every
//! task they spawn is tracked by [`tasks`], which is how the gateway shuts down as one.

pub mod ack_channel;
pub mod ack_policy;
pub mod admission;
pub mod algorithms;
pub mod billing;
pub mod chain_standing;
pub mod config;
pub mod connection;
pub mod forward;
pub mod gateway;
pub mod hostkey;
pub mod lease_events;
pub mod lease_start;
pub mod leases;
pub mod login;
pub mod metrics;
pub mod metrics_http;
pub mod orders;
pub mod policy;
pub mod preauth;
pub mod quality;
pub mod ratelimit;
pub mod repeated;
pub mod session_channel;
pub mod shared;
pub mod tasks;
pub mod traffic;
pub mod watcher;

pub use config::GatewayConfig;
pub use gateway::{Gateway, GatewayError};
pub use lease_events::LeaseEvent;
pub use shared::Shared;
pub use tasks::Tasks;

/// Seconds since the Unix epoch, the chain's clock.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
