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
//!
//! # Wiring it into a gateway
//!
//! ```no_run
//! # async fn wire(ssh_channel: tokio::io::DuplexStream, container_stdio: tokio::io::DuplexStream)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use alloy_primitives::U256;
//! use shale_meter::{Deployment, LeaseSpec, Ledger, Meter, MeterConfig, Metered, Side, Tariff};
//!
//! // Once, at start-up: the ledger (SQLite file in the state directory unless the config
//! // names a postgres://… URL) and the meter of one marketplace's orders (chain id and
//! // contract address, which every tick chain is bound to).
//! let config = MeterConfig::default();
//! let ledger: Ledger = config.open_ledger(std::path::Path::new("/var/lib/shale")).await?;
//! let deployment = Deployment::new(314, [0x5f; 20]);
//! let meter = Meter::new(ledger.clone(), deployment, &config)?;
//!
//! // When an order's lease starts (or on restart, for every live lease): bill from now on,
//! // continuing the order's stored chain.
//! let tariff = Tariff::new(U256::from(1_000_000_000u64), U256::from(10u64.pow(15)))?;
//! let lease = meter.start_lease(LeaseSpec { order: 42, tariff, max_seconds: Some(3600) }).await?;
//!
//! // Per SSH session and channel: counters, and one metered end of each pump.
//! let session = lease.open_session();
//! ledger.record_session_start("sess-1", 42, "203.0.113.7:50122", shale_meter::ledger::now_ms()).await?;
//! let channel = session.open_channel();
//! let mut client_end = Metered::new(ssh_channel, channel, Side::Client);
//! let mut container_end = container_stdio;
//! tokio::io::copy_bidirectional(&mut client_end, &mut container_end).await?;
//! ledger
//!     .record_session_end("sess-1", shale_meter::ledger::now_ms(), session.bytes(),
//!                         session.channels_opened(), "closed")
//!     .await?;
//!
//! // Payment policy: what is owed against the escrow, and how long the rest lasts.
//! let totals = lease.totals();
//! let escrow_left = U256::from(5u64) * U256::from(10u64.pow(18));
//! let funds = escrow_left.saturating_sub(totals.owed());
//! let _seconds_left = lease.tariff().seconds_covered(funds, totals.recent_bytes_per_second);
//!
//! // Lease end: a final partial tick.
//! meter.end_lease(42).await?;
//!
//! // Receipts (`ssh 42@host -s shale-receipts`): JSON lines onto the channel.
//! let mut out = tokio::io::sink();
//! ledger.write_receipts(42, &mut out).await?;
//! # Ok(()) }
//! ```

pub mod ack;
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
pub use tick::{
    verify_receipts, ChainHead, Deployment, Head, OrderKey, Tick, TickChain, TickFields,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>(_: &T) {}

    fn assert_send_sync<T: Send + Sync>() {}

    /// The gateway shares these across tasks and awaits these futures inside spawned tasks.
    #[tokio::test]
    async fn handles_are_send_and_sync_and_futures_are_send() {
        assert_send_sync::<Meter>();
        assert_send_sync::<LeaseMeter>();
        assert_send_sync::<Ledger>();
        assert_send_sync::<ChannelCounter>();
        assert_send_sync::<SessionCounter>();
        assert_send_sync::<OrderCounter>();
        assert_send_sync::<Metered<tokio::io::DuplexStream>>();

        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_sqlite(&dir.path().join("l.db")).await.unwrap();
        let deployment = Deployment::new(31337, [0x5f; 20]);
        let meter = Meter::new(ledger.clone(), deployment, &MeterConfig::default()).unwrap();
        let tariff = Tariff::new(1u64.try_into().unwrap(), 1u64.try_into().unwrap()).unwrap();
        let start = meter.start_lease(LeaseSpec {
            order: 1,
            tariff,
            max_seconds: None,
        });
        is_send(&start);
        let lease = start.await.unwrap();
        let (mut out, _peer) = tokio::io::duplex(64);
        let receipts = ledger.write_receipts(1, &mut out);
        is_send(&receipts);
        drop(receipts);
        let stop = lease.stop();
        is_send(&stop);
        stop.await.unwrap();
        let end = meter.end_lease(1);
        is_send(&end);
        assert_eq!(end.await.unwrap(), None);
    }
}
