//! Shale's meter: what an order used, what it costs, and a durable, verifiable record of it.
//!
//! The path through this crate follows the bytes:
//!
//! - [`counter`]: per-channel byte counters on the data path ([`ChannelCounter`]), summed per
//!   session and order; [`Metered`] wraps a pump's stream so the gateway never calls the meter
//!   from protocol code.
//! - [`tariff`]: integer prices in wei and the rounding rule shared with the contract.
//! - [`tick`]: [`Tick`]s and the per-order Poseidon hash chain ([`TickChain`]), and the
//!   client-side check [`verify_receipts`].
//! - [`ledger`]: the durable SQL store (SQLite or PostgreSQL) of ticks, sessions, claims and
//!   probe readings; a tick is stored before it counts.
//! - [`lease`]: [`Meter`] and [`LeaseMeter`], the per-order task that closes a tick every
//!   interval and keeps the running totals the gateway's payment policy reads.
//! - [`probe`]: session-quality probes run inside the container.

pub mod counter;
mod error;
pub mod lease;
pub mod ledger;
pub mod metered;
pub mod probe;
pub mod tariff;
pub mod tick;
pub mod wei;

pub use counter::{ByteCount, ChannelCounter, OrderCounter, SessionCounter};
pub use error::MeterError;
pub use lease::{LeaseMeter, LeaseSpec, Meter, MeterConfig, MeterTotals};
pub use ledger::Ledger;
pub use metered::{Metered, Side};
pub use tariff::{Tariff, Usage};
pub use tick::{verify_receipts, ChainHead, Head, Tick, TickChain, TickFields};
