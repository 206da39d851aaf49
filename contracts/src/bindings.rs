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

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    ProviderRegistry,
    "artifacts/ProviderRegistry.json"
);

/// TEST ONLY: the stand-in claim verifier of the forge and Rust tests (`contracts/test/`), and
/// the doubles of FEVM's `call_actor_id` precompile and of the market and miner actors.
/// A "proof" is valid when its first word is keccak256 of the six public inputs; none of these
/// may ever be deployed to a real chain.
pub mod test_only {
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        TestTickVerifier,
        "artifacts/test-only/TestTickVerifier.json"
    );

    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        CallActorByIdDouble,
        "artifacts/test-only/CallActorByIdDouble.json"
    );

    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        FilecoinActorDouble,
        "artifacts/test-only/FilecoinActorDouble.json"
    );
}
