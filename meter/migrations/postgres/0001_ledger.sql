-- The meter's ledger (PostgreSQL). Integers are BIGINT (64-bit signed); wei amounts are decimal
-- TEXT because they exceed 64 bits; chain heads are 32-byte BYTEA.

-- One row per closed tick; (order_id, seq) is the chain position and can never repeat.
CREATE TABLE ticks (
    order_id       BIGINT  NOT NULL,
    seq            BIGINT  NOT NULL CHECK (seq >= 0),
    started_at_ms  BIGINT  NOT NULL,
    seconds        BIGINT  NOT NULL CHECK (seconds >= 0),
    bytes_in       BIGINT  NOT NULL CHECK (bytes_in >= 0),
    bytes_out      BIGINT  NOT NULL CHECK (bytes_out >= 0),
    charge_wei     TEXT    NOT NULL,
    prev_head      BYTEA   NOT NULL CHECK (octet_length(prev_head) = 32),
    head           BYTEA   NOT NULL CHECK (octet_length(head) = 32),
    recorded_at_ms BIGINT  NOT NULL,
    PRIMARY KEY (order_id, seq)
);

-- SSH sessions of an order: who connected, how long, what they moved.
CREATE TABLE sessions (
    session_id    TEXT    PRIMARY KEY,
    order_id      BIGINT  NOT NULL,
    peer          TEXT    NOT NULL,
    started_at_ms BIGINT  NOT NULL,
    ended_at_ms   BIGINT,
    bytes_in      BIGINT  NOT NULL DEFAULT 0,
    bytes_out     BIGINT  NOT NULL DEFAULT 0,
    channels      BIGINT  NOT NULL DEFAULT 0,
    outcome       TEXT
);
CREATE INDEX sessions_by_order ON sessions (order_id, started_at_ms);

-- Claims of batches of ticks on chain, from first proposal to confirmation or failure.
CREATE TABLE claims (
    claim_id      BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id      BIGINT  NOT NULL,
    first_seq     BIGINT  NOT NULL,
    last_seq      BIGINT  NOT NULL CHECK (last_seq >= first_seq),
    prev_head     BYTEA   NOT NULL CHECK (octet_length(prev_head) = 32),
    head          BYTEA   NOT NULL CHECK (octet_length(head) = 32),
    seconds       BIGINT  NOT NULL,
    bytes_in      BIGINT  NOT NULL,
    bytes_out     BIGINT  NOT NULL,
    amount_wei    TEXT    NOT NULL,
    tx_hash       TEXT,
    status        TEXT    NOT NULL CHECK (status IN ('pending', 'submitted', 'confirmed', 'failed')),
    created_at_ms BIGINT  NOT NULL,
    updated_at_ms BIGINT  NOT NULL
);
CREATE INDEX claims_by_order ON claims (order_id, status, last_seq);

-- Session-quality probe readings, one row per reading (JSON of the typed reading).
CREATE TABLE probe_readings (
    reading_id    BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id      BIGINT  NOT NULL,
    session_id    TEXT,
    probe         TEXT    NOT NULL,
    taken_at_ms   BIGINT  NOT NULL,
    reading       TEXT    NOT NULL
);
CREATE INDEX probe_readings_by_order ON probe_readings (order_id, taken_at_ms);
