-- The client's EIP-712 acknowledgments of an order's cumulative usage, as its payment tunnel
-- signed them. Totals only grow: a newer acknowledgment is never below an older one.
CREATE TABLE acknowledgments (
    ack_id         INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id       BIGINT  NOT NULL,
    head           BLOB   NOT NULL CHECK (length(head) = 32),
    seconds        BIGINT  NOT NULL CHECK (seconds >= 0),
    bytes_in       BIGINT  NOT NULL CHECK (bytes_in >= 0),
    bytes_out      BIGINT  NOT NULL CHECK (bytes_out >= 0),
    signature      BLOB   NOT NULL CHECK (length(signature) = 65),
    received_at_ms BIGINT  NOT NULL
);
CREATE INDEX acknowledgments_by_order ON acknowledgments (order_id, ack_id);
