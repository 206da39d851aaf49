//! The gateway's untrusted inputs as fuzz targets, one module each, each with a `run(&[u8])`
//! that panics where one of its invariants breaks.
//!
//! `fuzz/` wraps each in libFuzzer (`scripts/fuzz.sh`: coverage-guided, nightly, long runs).
//! CI runs each over its committed corpus (`fuzz/corpus/<target>/`) and a fixed number of
//! deterministic [`mutate`]d variants of it (`tests/bounded.rs`): not a search, but every
//! target's code and invariants run in every build, on stable Rust.

pub mod ack_request;
pub mod config;
pub mod login;
pub mod mutate;
pub mod receipts;
pub mod ssh_server;

/// A target's entry: one input in, a panic if an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/Cargo.toml` and `fuzz/corpus/` name them.
pub const TARGETS: [(&str, Target); 5] = [
    ("login", login::run),
    ("config", config::run),
    ("ack_request", ack_request::run),
    ("receipts", receipts::run),
    ("ssh_server", ssh_server::run),
];
