//! The durable ledger: ticks, sessions, claims and probe readings in SQL.
//!
//! SQLite (one file under the gateway's state directory, WAL mode, `synchronous=FULL`) is the
//! default; PostgreSQL serves SPs whose gateways share one ledger. Both sit behind one
//! [`Ledger`] through sqlx's `Any` driver: the queries are written once, in the SQL both accept
//! (`$N` placeholders, `BIGINT`, `RETURNING`), and only the versioned migrations differ
//! (`migrations/sqlite`, `migrations/postgres`).
//!
//! Integers are stored as signed 64-bit; values above 2^63-1 are refused with
//! [`MeterError::OutOfRange`] rather than wrapped. Wei amounts are decimal text, heads 32 bytes.

use crate::counter::ByteCount;
use crate::probe::Reading;
use crate::tariff::Usage;
use crate::tick::{ChainHead, Deployment, Head, Tick};
use crate::MeterError;
use alloy_primitives::U256;
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Which database a ledger lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A local SQLite file.
    Sqlite,
    /// A PostgreSQL server, possibly shared by several gateways.
    Postgres,
}

/// The meter's durable store. Cheap to clone (a connection pool).
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: AnyPool,
    backend: Backend,
}

/// What a live session has moved so far, for [`Ledger::checkpoint_sessions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCheckpoint {
    /// The gateway's id for the session.
    pub session_id: String,
    /// Bytes both ways over its channels so far.
    pub bytes: ByteCount,
    /// Channels it has opened so far.
    pub channels: u64,
}

/// One SSH session of an order, as recorded for receipts and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The gateway's id for the session.
    pub session_id: String,
    /// The order the session belongs to.
    pub order: u64,
    /// The client's address as the gateway saw it.
    pub peer: String,
    /// Unix milliseconds when the session was accepted.
    pub started_at_ms: u64,
    /// Unix milliseconds when it ended; `None` while open (or if the gateway crashed).
    pub ended_at_ms: Option<u64>,
    /// Bytes from the client over the session's channels.
    pub bytes_in: u64,
    /// Bytes to the client over the session's channels.
    pub bytes_out: u64,
    /// Channels the session opened.
    pub channels: u64,
    /// How the session ended (e.g. `closed`, `escrow_exhausted`, `lease_ended`).
    pub outcome: Option<String>,
}

/// Where a claim is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimStatus {
    /// Proposed (proof being built), not yet sent.
    Pending,
    /// Transaction sent, not yet confirmed.
    Submitted,
    /// Paid on chain: its ticks are claimed.
    Confirmed,
    /// Rejected or abandoned: its ticks are unclaimed again.
    Failed,
}

impl ClaimStatus {
    fn as_str(self) -> &'static str {
        match self {
            ClaimStatus::Pending => "pending",
            ClaimStatus::Submitted => "submitted",
            ClaimStatus::Confirmed => "confirmed",
            ClaimStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<ClaimStatus> {
        Some(match text {
            "pending" => ClaimStatus::Pending,
            "submitted" => ClaimStatus::Submitted,
            "confirmed" => ClaimStatus::Confirmed,
            "failed" => ClaimStatus::Failed,
            _ => return None,
        })
    }
}

/// A claim to record: which ticks, for how much, in which state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewClaim {
    /// The order.
    pub order: u64,
    /// First tick seq of the batch.
    pub first_seq: u64,
    /// Last tick seq of the batch (inclusive).
    pub last_seq: u64,
    /// What the claim asks for, in wei (the tariff's charge of the batch totals).
    pub amount: U256,
    /// The transaction hash, once sent.
    pub tx_hash: Option<String>,
    /// The initial status.
    pub status: ClaimStatus,
}

/// A recorded claim, with the chain heads and totals taken from the stored ticks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    /// The ledger's id for the claim.
    pub claim_id: i64,
    /// The order.
    pub order: u64,
    /// First tick seq of the batch.
    pub first_seq: u64,
    /// Last tick seq of the batch (inclusive).
    pub last_seq: u64,
    /// The head before the batch (what the contract must have stored).
    pub prev_head: Head,
    /// The head after the batch.
    pub head: Head,
    /// The batch's totals.
    pub usage: Usage,
    /// Wei asked for.
    #[serde(with = "crate::wei")]
    pub amount: U256,
    /// The transaction hash, once sent.
    pub tx_hash: Option<String>,
    /// Where the claim is.
    pub status: ClaimStatus,
    /// Unix milliseconds of creation.
    pub created_at_ms: u64,
    /// Unix milliseconds of the last status change.
    pub updated_at_ms: u64,
}

/// One stored probe reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// The order.
    pub order: u64,
    /// The session the probe ran in, if any.
    pub session_id: Option<String>,
    /// The probe's name.
    pub probe: String,
    /// Unix milliseconds when the probe ran.
    pub taken_at_ms: u64,
    /// What it read.
    pub reading: Reading,
}

/// A client's acknowledgment of an order's cumulative usage, with its EIP-712 signature (the
/// gateway checks the signer before it is stored; the ledger keeps it for the settler's claims
/// and the receipts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    /// The order.
    pub order: u64,
    /// The tick-chain head the client checked up to.
    pub head: Head,
    /// Cumulative leased seconds acknowledged.
    pub seconds: u64,
    /// Cumulative bytes into the container acknowledged.
    pub bytes_in: u64,
    /// Cumulative bytes out of the container acknowledged.
    pub bytes_out: u64,
    /// `r ‖ s ‖ v`, 65 bytes, as `0x`-prefixed hex.
    pub signature: String,
    /// Unix milliseconds when the gateway received it.
    pub received_at_ms: u64,
}

/// One line of an order's receipts, as streamed to the client in JSON lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Receipt {
    /// A tick of the order's chain, in seq order.
    Tick(Tick),
    /// An SSH session of the order.
    Session(SessionRecord),
    /// A claim of a batch of ticks.
    Claim(ClaimRecord),
    /// A session-quality reading.
    Probe(ProbeRecord),
    /// An acknowledgment the client's tunnel signed.
    Ack(AckRecord),
}

/// Ticks fetched per query when streaming receipts, to bound memory on long leases.
const RECEIPT_PAGE: i64 = 1000;

// Column lists as macros so queries stay `&'static str` (sqlx refuses runtime-built SQL, and
// static statements are cached as prepared statements).
macro_rules! tick_columns {
    () => {
        "order_id, seq, started_at_ms, seconds, bytes_in, bytes_out, charge_wei, prev_head, head"
    };
}

macro_rules! claim_columns {
    () => {
        "claim_id, order_id, first_seq, last_seq, prev_head, head, seconds, bytes_in, bytes_out, \
         amount_wei, tx_hash, status, created_at_ms, updated_at_ms"
    };
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `url` and brings its schema up to date.
    ///
    /// `sqlite://PATH` (a file, created if missing, switched to WAL mode) or
    /// `postgres://USER@HOST:PORT/DB`.
    pub async fn open(url: &str) -> Result<Ledger, MeterError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(MeterError::UnsupportedUrl(url.to_string()));
        };
        let url = match backend {
            // Create the file on first use unless the caller chose a mode.
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                // SQLite writes one at a time anyway; a few connections serve concurrent reads.
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // A tick is money: a commit must survive power loss, not just a crash.
                        conn.execute("PRAGMA synchronous = FULL").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        if backend == Backend::Sqlite {
            // WAL lets readers (receipts, metrics) run beside the meter's writes; the mode is
            // stored in the file, so setting it once here covers every connection.
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
                .fetch_one(&pool)
                .await?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(%mode, "SQLite ledger could not switch to WAL mode");
            }
        }
        let migrator = match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        migrator.run(&pool).await?;
        tracing::debug!(?backend, "ledger open");
        Ok(Ledger { pool, backend })
    }

    /// Opens (creating if needed) a SQLite ledger file.
    pub async fn open_sqlite(path: &Path) -> Result<Ledger, MeterError> {
        let text = path.to_string_lossy();
        // The URL parser percent-decodes the path, so encode what it would misread.
        let mut encoded = String::with_capacity(text.len());
        for c in text.chars() {
            match c {
                '%' => encoded.push_str("%25"),
                '?' => encoded.push_str("%3F"),
                '#' => encoded.push_str("%23"),
                c => encoded.push(c),
            }
        }
        Ledger::open(&format!("sqlite://{encoded}")).await
    }

    /// Which database this ledger is in.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Begins a transaction that reads and then writes. On SQLite it takes the write lock at
    /// once (`BEGIN IMMEDIATE`, waiting out a busy writer): a deferred transaction that read
    /// first cannot upgrade once another connection (the meter, the settler) has committed
    /// since, and fails at once with "database is locked" whatever the busy timeout.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, MeterError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores `tick` if, and only if, it continues the order's stored chain: seq 0 from the
    /// genesis head, or the seq after the stored last tick with that tick's head as its
    /// `prev_head`. The check and the insert are one statement, so concurrent writers of the
    /// same order cannot both succeed; a committed tick is durable when this returns.
    ///
    /// The tick's head must hash under its order's key on `deployment`, the marketplace whose
    /// orders this ledger meters.
    #[tracing::instrument(level = "debug", skip_all, fields(order = tick.order, seq = tick.seq), err)]
    pub async fn append_tick(
        &self,
        deployment: &Deployment,
        tick: &Tick,
    ) -> Result<(), MeterError> {
        if !tick.head_is_valid(deployment) {
            return Err(MeterError::HeadMismatch {
                order: tick.order,
                seq: tick.seq,
            });
        }
        let conflict = |stored_last_seq| MeterError::ChainConflict {
            order: tick.order,
            seq: tick.seq,
            stored_last_seq,
        };
        if tick.seq == 0 && !tick.prev_head.is_genesis() {
            let stored = self.chain_head(tick.order).await?.map(|h| h.seq);
            return Err(conflict(stored));
        }
        let result = sqlx::query(
            "INSERT INTO ticks (order_id, seq, started_at_ms, seconds, bytes_in, bytes_out, \
                                charge_wei, prev_head, head, recorded_at_ms) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 \
             WHERE $2 = 0 OR EXISTS ( \
                 SELECT 1 FROM ticks WHERE order_id = $1 AND seq = $2 - 1 AND head = $8)",
        )
        .bind(int("order", tick.order)?)
        .bind(int("seq", tick.seq)?)
        .bind(int("started_at_ms", tick.started_at_ms)?)
        .bind(int("seconds", tick.seconds)?)
        .bind(int("bytes_in", tick.bytes_in)?)
        .bind(int("bytes_out", tick.bytes_out)?)
        .bind(tick.charge.to_string())
        .bind(tick.prev_head.0.to_vec())
        .bind(tick.head.0.to_vec())
        .bind(int("recorded_at_ms", now_ms())?)
        .execute(&self.pool)
        .await;
        match result {
            Ok(done) if done.rows_affected() == 1 => Ok(()),
            Ok(_) => {
                let stored = self.chain_head(tick.order).await?.map(|h| h.seq);
                Err(conflict(stored))
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                let stored = self.chain_head(tick.order).await?.map(|h| h.seq);
                Err(conflict(stored))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The last stored seq and head of `order`, or `None` before its first tick.
    pub async fn chain_head(&self, order: u64) -> Result<Option<ChainHead>, MeterError> {
        let row = sqlx::query(
            "SELECT seq, head FROM ticks WHERE order_id = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(int("order", order)?)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(ChainHead {
                seq: uint(order, &r, "seq")?,
                head: head(order, &r, "head")?,
            })
        })
        .transpose()
    }

    /// The stored tick `seq` of `order`, if any.
    pub async fn tick(&self, order: u64, seq: u64) -> Result<Option<Tick>, MeterError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            tick_columns!(),
            " FROM ticks WHERE order_id = $1 AND seq = $2"
        ))
        .bind(int("order", order)?)
        .bind(int("seq", seq)?)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| tick_from_row(order, &r)).transpose()
    }

    /// The stored ticks of `order` with `first <= seq <= last`, in seq order.
    pub async fn ticks(&self, order: u64, first: u64, last: u64) -> Result<Vec<Tick>, MeterError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            tick_columns!(),
            " FROM ticks WHERE order_id = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq"
        ))
        .bind(int("order", order)?)
        .bind(int("first seq", first)?)
        .bind(int("last seq", last.min(i64::MAX as u64))?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| tick_from_row(order, r)).collect()
    }

    /// Up to `limit` ticks of `order` after seq `after` (from seq 0 if `None`), in seq order.
    pub async fn ticks_after(
        &self,
        order: u64,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Tick>, MeterError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            tick_columns!(),
            " FROM ticks WHERE order_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(int("order", order)?)
        .bind(after.map_or(Ok(-1), |s| int("seq", s))?)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| tick_from_row(order, r)).collect()
    }

    /// The seq of the last tick covered by a confirmed claim, if any.
    pub async fn last_claimed_seq(&self, order: u64) -> Result<Option<u64>, MeterError> {
        let row = sqlx::query(
            "SELECT MAX(last_seq) AS last_seq FROM claims \
             WHERE order_id = $1 AND status = 'confirmed'",
        )
        .bind(int("order", order)?)
        .fetch_one(&self.pool)
        .await?;
        let last: Option<i64> = row.try_get("last_seq")?;
        last.map(|v| to_u64(order, "last_seq", v)).transpose()
    }

    /// Ticks of `order` not covered by a confirmed claim (pending or submitted claims are not
    /// paid yet, so their ticks still count as unclaimed), in seq order.
    pub async fn unclaimed_ticks(&self, order: u64) -> Result<Vec<Tick>, MeterError> {
        let after = self.last_claimed_seq(order).await?;
        let first = after.map_or(0, |s| s + 1);
        self.ticks(order, first, u64::MAX).await
    }

    /// Totals of `order`'s ticks up to and including seq `last`: a prefix of the chain, which
    /// never changes once stored.
    pub async fn usage_through(&self, order: u64, last: u64) -> Result<Usage, MeterError> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(seconds), 0) AS BIGINT) AS seconds, \
                    CAST(COALESCE(SUM(bytes_in), 0) AS BIGINT) AS bytes_in, \
                    CAST(COALESCE(SUM(bytes_out), 0) AS BIGINT) AS bytes_out \
             FROM ticks WHERE order_id = $1 AND seq <= $2",
        )
        .bind(int("order", order)?)
        .bind(int("seq", last)?)
        .fetch_one(&self.pool)
        .await?;
        Ok(Usage {
            seconds: uint(order, &row, "seconds")?,
            bytes_in: uint(order, &row, "bytes_in")?,
            bytes_out: uint(order, &row, "bytes_out")?,
        })
    }

    /// Totals and count of `order`'s ticks after seq `after` (all ticks if `None`).
    pub async fn usage_after(
        &self,
        order: u64,
        after: Option<u64>,
    ) -> Result<(Usage, u64), MeterError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, \
                    CAST(COALESCE(SUM(seconds), 0) AS BIGINT) AS seconds, \
                    CAST(COALESCE(SUM(bytes_in), 0) AS BIGINT) AS bytes_in, \
                    CAST(COALESCE(SUM(bytes_out), 0) AS BIGINT) AS bytes_out \
             FROM ticks WHERE order_id = $1 AND seq > $2",
        )
        .bind(int("order", order)?)
        .bind(after.map_or(Ok(-1), |s| int("seq", s))?)
        .fetch_one(&self.pool)
        .await?;
        Ok((
            Usage {
                seconds: uint(order, &row, "seconds")?,
                bytes_in: uint(order, &row, "bytes_in")?,
                bytes_out: uint(order, &row, "bytes_out")?,
            },
            uint(order, &row, "n")?,
        ))
    }

    /// Totals of `order`'s ticks not covered by a confirmed claim.
    pub async fn unclaimed_usage(&self, order: u64) -> Result<Usage, MeterError> {
        let after = self.last_claimed_seq(order).await?;
        Ok(self.usage_after(order, after).await?.0)
    }

    /// Records that a session of `order` started.
    #[tracing::instrument(level = "debug", skip(self), err)]
    pub async fn record_session_start(
        &self,
        session_id: &str,
        order: u64,
        peer: &str,
        started_at_ms: u64,
    ) -> Result<(), MeterError> {
        sqlx::query(
            "INSERT INTO sessions (session_id, order_id, peer, started_at_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(session_id.to_string())
        .bind(int("order", order)?)
        .bind(peer.to_string())
        .bind(int("started_at_ms", started_at_ms)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records how a session ended and what it moved (e.g. from
    /// [`crate::SessionCounter::bytes`] and [`crate::SessionCounter::channels_opened`]).
    #[tracing::instrument(level = "debug", skip(self, bytes), err)]
    pub async fn record_session_end(
        &self,
        session_id: &str,
        ended_at_ms: u64,
        bytes: ByteCount,
        channels: u64,
        outcome: &str,
    ) -> Result<(), MeterError> {
        let done = sqlx::query(
            "UPDATE sessions SET ended_at_ms = $2, bytes_in = $3, bytes_out = $4, \
                                 channels = $5, outcome = $6 \
             WHERE session_id = $1",
        )
        .bind(session_id.to_string())
        .bind(int("ended_at_ms", ended_at_ms)?)
        .bind(int("bytes_in", bytes.bytes_in)?)
        .bind(int("bytes_out", bytes.bytes_out)?)
        .bind(int("channels", channels)?)
        .bind(outcome.to_string())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(MeterError::UnknownSession(session_id.to_string()));
        }
        Ok(())
    }

    /// Writes what each live session has moved so far, and that it was alive at `now_ms`; after
    /// a crash, [`Ledger::close_interrupted_sessions`] ends each at its last checkpoint.
    #[tracing::instrument(level = "debug", skip_all, fields(sessions = live.len()), err)]
    pub async fn checkpoint_sessions(
        &self,
        now_ms: u64,
        live: &[SessionCheckpoint],
    ) -> Result<(), MeterError> {
        if live.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for s in live {
            sqlx::query(
                "UPDATE sessions SET bytes_in = $2, bytes_out = $3, channels = $4, \
                                     last_seen_ms = $5 \
                 WHERE session_id = $1 AND ended_at_ms IS NULL",
            )
            .bind(s.session_id.clone())
            .bind(int("bytes_in", s.bytes.bytes_in)?)
            .bind(int("bytes_out", s.bytes.bytes_out)?)
            .bind(int("channels", s.channels)?)
            .bind(int("last_seen_ms", now_ms)?)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Ends every session still open in the ledger: a gateway starting calls this before it
    /// serves anyone, so these are the sessions of a gateway process that died without closing
    /// them. Each ends at its last checkpoint (or its start) with the bytes it had then, and
    /// `outcome`. Returns how many it closed.
    #[tracing::instrument(level = "debug", skip(self), err)]
    pub async fn close_interrupted_sessions(&self, outcome: &str) -> Result<u64, MeterError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE sessions SET ended_at_ms = COALESCE(last_seen_ms, started_at_ms), \
                                 outcome = $1 \
             WHERE ended_at_ms IS NULL",
        )
        .bind(outcome.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// The sessions of `order`, oldest first.
    pub async fn sessions(&self, order: u64) -> Result<Vec<SessionRecord>, MeterError> {
        let rows = sqlx::query(
            "SELECT session_id, order_id, peer, started_at_ms, ended_at_ms, bytes_in, \
                    bytes_out, channels, outcome \
             FROM sessions WHERE order_id = $1 ORDER BY started_at_ms, session_id",
        )
        .bind(int("order", order)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let ended: Option<i64> = r.try_get("ended_at_ms")?;
                Ok(SessionRecord {
                    session_id: r.try_get("session_id")?,
                    order: uint(order, r, "order_id")?,
                    peer: r.try_get("peer")?,
                    started_at_ms: uint(order, r, "started_at_ms")?,
                    ended_at_ms: ended.map(|v| to_u64(order, "ended_at_ms", v)).transpose()?,
                    bytes_in: uint(order, r, "bytes_in")?,
                    bytes_out: uint(order, r, "bytes_out")?,
                    channels: uint(order, r, "channels")?,
                    outcome: r.try_get("outcome")?,
                })
            })
            .collect()
    }

    /// Records a claim of the stored ticks `first_seq..=last_seq`; the heads and totals are
    /// taken from those ticks, which must all be stored.
    #[tracing::instrument(level = "debug", skip_all, fields(order = claim.order, first = claim.first_seq, last = claim.last_seq), err)]
    pub async fn record_claim(&self, claim: &NewClaim) -> Result<ClaimRecord, MeterError> {
        let order = claim.order;
        let mismatch = |detail: String| MeterError::ClaimMismatch { order, detail };
        if claim.last_seq < claim.first_seq {
            return Err(mismatch(format!(
                "last seq {} is before first seq {}",
                claim.last_seq, claim.first_seq
            )));
        }
        let first = self
            .tick(order, claim.first_seq)
            .await?
            .ok_or_else(|| mismatch(format!("tick {} is not stored", claim.first_seq)))?;
        let last = self
            .tick(order, claim.last_seq)
            .await?
            .ok_or_else(|| mismatch(format!("tick {} is not stored", claim.last_seq)))?;
        let before = claim.first_seq.checked_sub(1);
        let (through_last, n_last) = self.usage_after(order, Some(claim.last_seq)).await?;
        let (from_first, n_first) = self.usage_after(order, before).await?;
        // Stored chains are contiguous (append_tick guarantees it), so the count is a check on
        // the ledger rather than on the caller.
        if n_first - n_last != claim.last_seq - claim.first_seq + 1 {
            return Err(mismatch("the stored ticks in the range have gaps".into()));
        }
        let usage = Usage {
            seconds: from_first.seconds - through_last.seconds,
            bytes_in: from_first.bytes_in - through_last.bytes_in,
            bytes_out: from_first.bytes_out - through_last.bytes_out,
        };
        let now = now_ms();
        let row = sqlx::query(concat!(
            "INSERT INTO claims (order_id, first_seq, last_seq, prev_head, head, seconds, \
                                 bytes_in, bytes_out, amount_wei, tx_hash, status, \
                                 created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) RETURNING ",
            claim_columns!()
        ))
        .bind(int("order", order)?)
        .bind(int("first seq", claim.first_seq)?)
        .bind(int("last seq", claim.last_seq)?)
        .bind(first.prev_head.0.to_vec())
        .bind(last.head.0.to_vec())
        .bind(int("seconds", usage.seconds)?)
        .bind(int("bytes_in", usage.bytes_in)?)
        .bind(int("bytes_out", usage.bytes_out)?)
        .bind(claim.amount.to_string())
        .bind(claim.tx_hash.clone())
        .bind(claim.status.as_str().to_string())
        .bind(int("created_at_ms", now)?)
        .fetch_one(&self.pool)
        .await?;
        claim_from_row(order, &row)
    }

    /// Moves claim `claim_id` to `status`, setting its transaction hash if one is given.
    #[tracing::instrument(level = "debug", skip(self), err)]
    pub async fn set_claim_status(
        &self,
        claim_id: i64,
        status: ClaimStatus,
        tx_hash: Option<&str>,
    ) -> Result<(), MeterError> {
        let done = sqlx::query(
            "UPDATE claims SET status = $2, tx_hash = COALESCE($3, tx_hash), updated_at_ms = $4 \
             WHERE claim_id = $1",
        )
        .bind(claim_id)
        .bind(status.as_str().to_string())
        .bind(tx_hash.map(str::to_string))
        .bind(int("updated_at_ms", now_ms())?)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(MeterError::UnknownClaim(claim_id));
        }
        Ok(())
    }

    /// The claims of `order`, oldest first.
    pub async fn claims(&self, order: u64) -> Result<Vec<ClaimRecord>, MeterError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            claim_columns!(),
            " FROM claims WHERE order_id = $1 ORDER BY claim_id"
        ))
        .bind(int("order", order)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| claim_from_row(order, r)).collect()
    }

    /// Stores the readings of one probe run.
    pub async fn record_probe(
        &self,
        order: u64,
        session_id: Option<&str>,
        probe: &str,
        taken_at_ms: u64,
        readings: &[Reading],
    ) -> Result<(), MeterError> {
        let mut tx = self.pool.begin().await?;
        for reading in readings {
            let json = serde_json::to_string(reading).map_err(|source| MeterError::Encode {
                what: "probe reading",
                source,
            })?;
            sqlx::query(
                "INSERT INTO probe_readings (order_id, session_id, probe, taken_at_ms, reading) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(int("order", order)?)
            .bind(session_id.map(str::to_string))
            .bind(probe.to_string())
            .bind(int("taken_at_ms", taken_at_ms)?)
            .bind(json)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The probe readings of `order`, oldest first.
    pub async fn probe_readings(&self, order: u64) -> Result<Vec<ProbeRecord>, MeterError> {
        let rows = sqlx::query(
            "SELECT session_id, probe, taken_at_ms, reading FROM probe_readings \
             WHERE order_id = $1 ORDER BY taken_at_ms, reading_id",
        )
        .bind(int("order", order)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let json: String = r.try_get("reading")?;
                let reading = serde_json::from_str(&json).map_err(|e| MeterError::CorruptRow {
                    order,
                    detail: format!("probe reading {json:?}: {e}"),
                })?;
                Ok(ProbeRecord {
                    order,
                    session_id: r.try_get("session_id")?,
                    probe: r.try_get("probe")?,
                    taken_at_ms: uint(order, r, "taken_at_ms")?,
                    reading,
                })
            })
            .collect()
    }

    /// Stores an acknowledgment whose signature the caller has checked. One below the newest
    /// stored (in seconds or either byte total) is refused: totals are cumulative.
    pub async fn record_ack(&self, ack: &AckRecord) -> Result<(), MeterError> {
        let signature = decode_signature(ack.order, &ack.signature)?;
        let mut tx = self.begin_write().await?;
        let newest = sqlx::query(
            "SELECT seconds, bytes_in, bytes_out FROM acknowledgments WHERE order_id = $1 \
             ORDER BY ack_id DESC LIMIT 1",
        )
        .bind(int("order", ack.order)?)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(r) = newest {
            let (s, i, o) = (
                uint(ack.order, &r, "seconds")?,
                uint(ack.order, &r, "bytes_in")?,
                uint(ack.order, &r, "bytes_out")?,
            );
            if ack.seconds < s || ack.bytes_in < i || ack.bytes_out < o {
                return Err(MeterError::StaleAck {
                    order: ack.order,
                    detail: format!(
                        "{} s, {} B in, {} B out is below the acknowledged {s} s, {i} B in, {o} B out",
                        ack.seconds, ack.bytes_in, ack.bytes_out
                    ),
                });
            }
        }
        sqlx::query(
            "INSERT INTO acknowledgments (order_id, head, seconds, bytes_in, bytes_out, \
                                          signature, received_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(int("order", ack.order)?)
        .bind(ack.head.0.to_vec())
        .bind(int("seconds", ack.seconds)?)
        .bind(int("bytes_in", ack.bytes_in)?)
        .bind(int("bytes_out", ack.bytes_out)?)
        .bind(signature)
        .bind(int("received_at_ms", ack.received_at_ms)?)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The newest acknowledgment of `order`, if its client sent any.
    pub async fn latest_ack(&self, order: u64) -> Result<Option<AckRecord>, MeterError> {
        let row = sqlx::query(
            "SELECT head, seconds, bytes_in, bytes_out, signature, received_at_ms \
             FROM acknowledgments WHERE order_id = $1 ORDER BY ack_id DESC LIMIT 1",
        )
        .bind(int("order", order)?)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| ack_from_row(order, &r)).transpose()
    }

    /// The whole record of `order` in memory: sessions, ticks in seq order, claims, probe
    /// readings. For long leases prefer [`Ledger::write_receipts`], which streams.
    pub async fn receipts(&self, order: u64) -> Result<Vec<Receipt>, MeterError> {
        let mut out: Vec<Receipt> = self
            .sessions(order)
            .await?
            .into_iter()
            .map(Receipt::Session)
            .collect();
        let mut after = None;
        loop {
            let page = self.ticks_after(order, after, RECEIPT_PAGE as u32).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            out.extend(page.into_iter().map(Receipt::Tick));
        }
        out.extend(self.claims(order).await?.into_iter().map(Receipt::Claim));
        out.extend(
            self.probe_readings(order)
                .await?
                .into_iter()
                .map(Receipt::Probe),
        );
        out.extend(self.latest_ack(order).await?.map(Receipt::Ack));
        Ok(out)
    }

    /// Writes `order`'s receipts to `out` as JSON lines (one [`Receipt`] per line: sessions,
    /// then ticks in seq order, then claims and probe readings), paging through the ticks so
    /// memory stays bounded. Returns the number of lines written. Flushes, does not shut down.
    #[tracing::instrument(level = "debug", skip(self, out), err)]
    pub async fn write_receipts<W: AsyncWrite + Unpin>(
        &self,
        order: u64,
        out: &mut W,
    ) -> Result<u64, WriteReceiptsError> {
        let mut lines = 0u64;
        let mut buf = Vec::with_capacity(64 * 1024);
        for s in self.sessions(order).await? {
            push_line(&mut buf, &Receipt::Session(s))?;
            lines += 1;
        }
        let mut after = None;
        loop {
            let page = self.ticks_after(order, after, RECEIPT_PAGE as u32).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            for t in page {
                push_line(&mut buf, &Receipt::Tick(t))?;
                lines += 1;
            }
            out.write_all(&buf).await?;
            buf.clear();
        }
        for c in self.claims(order).await? {
            push_line(&mut buf, &Receipt::Claim(c))?;
            lines += 1;
        }
        for p in self.probe_readings(order).await? {
            push_line(&mut buf, &Receipt::Probe(p))?;
            lines += 1;
        }
        if let Some(a) = self.latest_ack(order).await? {
            push_line(&mut buf, &Receipt::Ack(a))?;
            lines += 1;
        }
        out.write_all(&buf).await?;
        out.flush().await?;
        Ok(lines)
    }
}

/// Why streaming receipts stopped: the ledger, or the writer (e.g. the client went away).
#[derive(Debug, thiserror::Error)]
pub enum WriteReceiptsError {
    /// Reading the ledger failed.
    #[error(transparent)]
    Ledger(#[from] MeterError),
    /// Writing to the output failed.
    #[error("writing receipts failed: {0}")]
    Io(#[from] std::io::Error),
}

impl From<sqlx::Error> for WriteReceiptsError {
    fn from(e: sqlx::Error) -> Self {
        WriteReceiptsError::Ledger(e.into())
    }
}

fn push_line(buf: &mut Vec<u8>, receipt: &Receipt) -> Result<(), MeterError> {
    serde_json::to_writer(&mut *buf, receipt).map_err(|source| MeterError::Encode {
        what: "receipt",
        source,
    })?;
    buf.push(b'\n');
    Ok(())
}

/// Unix milliseconds now (wall clock, for records; durations use the monotonic clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A u64 as the ledger's BIGINT, refusing values that would wrap negative.
fn int(field: &'static str, value: u64) -> Result<i64, MeterError> {
    i64::try_from(value).map_err(|_| MeterError::OutOfRange { field, value })
}

fn to_u64(order: u64, column: &str, value: i64) -> Result<u64, MeterError> {
    u64::try_from(value).map_err(|_| MeterError::CorruptRow {
        order,
        detail: format!("{column} is negative ({value})"),
    })
}

fn uint(order: u64, row: &AnyRow, column: &str) -> Result<u64, MeterError> {
    let v: i64 = row.try_get(column)?;
    to_u64(order, column, v)
}

fn head(order: u64, row: &AnyRow, column: &str) -> Result<Head, MeterError> {
    let bytes: Vec<u8> = row.try_get(column)?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| MeterError::CorruptRow {
            order,
            detail: format!("{column} has {} bytes, not 32", b.len()),
        })?;
    Ok(Head(arr))
}

fn wei(order: u64, row: &AnyRow, column: &str) -> Result<U256, MeterError> {
    let text: String = row.try_get(column)?;
    crate::wei::parse(&text).map_err(|detail| MeterError::CorruptRow { order, detail })
}

fn decode_signature(order: u64, hex_text: &str) -> Result<Vec<u8>, MeterError> {
    let digits = hex_text.strip_prefix("0x").unwrap_or(hex_text);
    match alloy_primitives::hex::decode(digits) {
        Ok(b) if b.len() == 65 => Ok(b),
        _ => Err(MeterError::StaleAck {
            order,
            detail: "the signature is not 65 bytes of hex".into(),
        }),
    }
}

fn ack_from_row(order: u64, r: &AnyRow) -> Result<AckRecord, MeterError> {
    let signature: Vec<u8> = r.try_get("signature")?;
    Ok(AckRecord {
        order,
        head: head(order, r, "head")?,
        seconds: uint(order, r, "seconds")?,
        bytes_in: uint(order, r, "bytes_in")?,
        bytes_out: uint(order, r, "bytes_out")?,
        signature: format!(
            "0x{}",
            signature
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
        received_at_ms: uint(order, r, "received_at_ms")?,
    })
}

fn tick_from_row(order: u64, r: &AnyRow) -> Result<Tick, MeterError> {
    Ok(Tick {
        order: uint(order, r, "order_id")?,
        seq: uint(order, r, "seq")?,
        started_at_ms: uint(order, r, "started_at_ms")?,
        seconds: uint(order, r, "seconds")?,
        bytes_in: uint(order, r, "bytes_in")?,
        bytes_out: uint(order, r, "bytes_out")?,
        charge: wei(order, r, "charge_wei")?,
        prev_head: head(order, r, "prev_head")?,
        head: head(order, r, "head")?,
    })
}

fn claim_from_row(order: u64, r: &AnyRow) -> Result<ClaimRecord, MeterError> {
    let status: String = r.try_get("status")?;
    Ok(ClaimRecord {
        claim_id: r.try_get("claim_id")?,
        order: uint(order, r, "order_id")?,
        first_seq: uint(order, r, "first_seq")?,
        last_seq: uint(order, r, "last_seq")?,
        prev_head: head(order, r, "prev_head")?,
        head: head(order, r, "head")?,
        usage: Usage {
            seconds: uint(order, r, "seconds")?,
            bytes_in: uint(order, r, "bytes_in")?,
            bytes_out: uint(order, r, "bytes_out")?,
        },
        amount: wei(order, r, "amount_wei")?,
        tx_hash: r.try_get("tx_hash")?,
        status: ClaimStatus::parse(&status).ok_or_else(|| MeterError::CorruptRow {
            order,
            detail: format!("unknown claim status {status:?}"),
        })?,
        created_at_ms: uint(order, r, "created_at_ms")?,
        updated_at_ms: uint(order, r, "updated_at_ms")?,
    })
}
