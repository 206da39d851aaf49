//! The meter's error type: one variant per thing a caller can act on.

use thiserror::Error;

/// Everything that can go wrong while metering, storing or verifying usage.
#[derive(Debug, Error)]
pub enum MeterError {
    /// A price is too large for the meter's overflow-free arithmetic (see [`crate::Tariff`]).
    #[error("invalid tariff: {0}")]
    InvalidTariff(String),

    /// A configuration value is out of its allowed range.
    #[error("invalid meter configuration: {0}")]
    InvalidConfig(String),

    /// A running total no longer fits its integer type. Real leases are many orders of magnitude
    /// below this; seeing it means a corrupted counter or ledger.
    #[error("{what} overflowed while adding usage")]
    Overflow {
        /// Which total overflowed.
        what: &'static str,
    },

    /// A value does not fit the ledger's signed 64-bit integer columns.
    #[error("{field} = {value} is larger than the ledger can store (at most 2^63-1)")]
    OutOfRange {
        /// The field that was being stored.
        field: &'static str,
        /// Its value.
        value: u64,
    },

    /// The ledger URL names a database the meter does not support.
    #[error("unsupported ledger URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),

    /// The ledger database failed (connection lost, disk full, lock timeout). Retrying later may work.
    #[error("ledger database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Applying the ledger's schema migrations failed.
    #[error("ledger migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),

    /// A tick does not continue the order's stored chain: its seq is not the next one, or its
    /// previous head is not the stored head. Another meter is writing this order, or the tick
    /// was built from a stale chain; the stored chain is left untouched.
    #[error(
        "tick {seq} of order {order} does not continue the stored chain \
         (stored last seq: {stored_last_seq:?}); is another gateway metering this order?"
    )]
    ChainConflict {
        /// The order.
        order: u64,
        /// The seq of the rejected tick.
        seq: u64,
        /// The last seq stored for the order, if any.
        stored_last_seq: Option<u64>,
    },

    /// A tick's head is not the hash of its previous head and fields.
    #[error("acknowledgment of order {order} refused: {detail}")]
    StaleAck { order: u64, detail: String },

    #[error("tick {seq} of order {order} carries a head that is not the hash of its fields")]
    HeadMismatch {
        /// The order.
        order: u64,
        /// The tick's seq.
        seq: u64,
    },

    /// A tick log does not form one unbroken chain (gap, repeat, other order, wrong head).
    #[error("receipts do not verify at seq {seq}: {reason}")]
    ReceiptsInvalid {
        /// The first seq at which the log breaks.
        seq: u64,
        /// What is wrong there.
        reason: String,
    },

    /// A stored row cannot be decoded (a value was edited by hand or the schema is foreign).
    #[error("ledger row for order {order} is corrupt: {detail}")]
    CorruptRow {
        /// The order the row belongs to.
        order: u64,
        /// What could not be decoded.
        detail: String,
    },

    /// A claim refers to ticks the ledger does not hold, or to heads that differ from them.
    #[error("claim for order {order} does not match the stored ticks: {detail}")]
    ClaimMismatch {
        /// The order.
        order: u64,
        /// What differs.
        detail: String,
    },

    /// No session with this id was recorded as started.
    #[error("no session {0:?} was recorded as started")]
    UnknownSession(String),

    /// No claim with this id exists.
    #[error("no claim with id {0}")]
    UnknownClaim(i64),

    /// The order already has a running lease meter in this process.
    #[error("order {order} is already being metered")]
    LeaseActive {
        /// The order.
        order: u64,
    },

    /// The lease meter has already stopped (lease end, cap reached or a chain conflict).
    #[error("the meter of order {order} has stopped")]
    LeaseStopped {
        /// The order.
        order: u64,
    },

    /// A probe's output could not be understood.
    #[error("probe {probe}: cannot read its output: {detail}")]
    ProbeOutput {
        /// The probe's name.
        probe: &'static str,
        /// What was wrong with the output.
        detail: String,
    },

    /// A probe's command could not be run in the container.
    #[error("probe {probe}: cannot run its command: {detail}")]
    ProbeExec {
        /// The probe's name.
        probe: &'static str,
        /// Why the command did not run.
        detail: String,
    },

    /// A value could not be serialized for storage.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}
