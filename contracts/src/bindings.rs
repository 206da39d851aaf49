//! alloy bindings generated from the committed solc-js artifacts (`scripts/build-contracts.sh`).
//!
//! Nothing here is hand-written ABI: `sol!` reads the ABI and the creation bytecode from the
//! JSON artifacts, so a rebuilt contract changes these types at the next `cargo build`.

#![allow(missing_docs, clippy::too_many_arguments)]

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    Marketplace,
    "artifacts/Marketplace.json"
);

/// TEST ONLY: the stand-in claim verifier of the forge and Rust tests (`contracts/test/`).
/// A "proof" is valid when its first word is keccak256 of the six public inputs; it must never
/// be deployed to a real chain.
pub mod test_only {
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        TestTickVerifier,
        "artifacts/test-only/TestTickVerifier.json"
    );
}
