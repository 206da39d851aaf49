-- When a live session's bytes were last written: the gateway checkpoints every live session
-- once a tick interval, so that a session whose gateway died (kill -9, OOM) is closed at its
-- next start with the bytes and time it had reached, not left open for ever.
ALTER TABLE sessions ADD COLUMN last_seen_ms BIGINT;
