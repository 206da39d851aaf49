//! The shared harness of Shale's end-to-end tests: real anvil with the marketplace deployed, real
//! containerd with the default image, the gateway on a free port, and the stock OpenSSH binaries.
//!
//! Every test builds its own [`Stack`] (its own chain, containerd namespace, state directory and
//! gateway), so tests run in parallel without seeing each other. A containerd named by
//! `SHALE_CONTAINERD_SOCKET` (as `scripts/test.sh` starts one) is shared; otherwise each stack
//! starts its own and stops it on drop.
//!
//! A stack may also run the settler with the real Groth16 verifier on chain ([`keys`]); the
//! client's side can be the real `shale` binary with its payment tunnel ([`client`]); and
//! [`dishonest`] is what an SP that cheats can do with its own ledger and key. [`outage`] takes
//! the chain away from the gateway (and [`Stack::kill_containerd`] the container runtime) to
//! test how it holds up.

pub mod client;
pub mod dishonest;
pub mod internet;
pub mod keys;
pub mod outage;
pub mod registry;
pub mod ssh;
pub mod stack;

pub use ssh::{ClientKey, SshOutput};
pub use stack::{OrderOptions, Stack, StackOptions, DATASET, DATASET_TEXT};
