//! TEST ONLY: Filecoin's storage market and miner actors on a plain-EVM devnet.
//!
//! On FEVM the registry checks a dataset's deal through the `call_actor_id` precompile and the
//! market actor (f05). anvil has neither, so tests install doubles with `anvil_setCode` at the
//! addresses the registry calls: the precompile's (`0xfe00…05`) and each actor's masked-id
//! address (`0xff00…` + the 8-byte actor id). The registry's code is the code that runs on FEVM;
//! only what answers it is a double (`contracts/test/FilecoinActorsDouble.sol`).

use alloy::primitives::{Address, Bytes};
use alloy::providers::{DynProvider, Provider as _};

use crate::bindings::test_only::{CallActorByIdDouble, FilecoinActorDouble};
use crate::devnet::Devnet;
use crate::error::ChainError;

/// FEVM's `call_actor_id` precompile.
pub const CALL_ACTOR_ID: Address = Address::new([
    0xfe, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5,
]);

/// The storage market actor's id (f05).
pub const MARKET_ACTOR_ID: u64 = 5;

/// The EVM address of actor `id` (`0xff`, eleven zero bytes, the id big-endian).
pub fn actor_address(id: u64) -> Address {
    let mut bytes = [0u8; 20];
    bytes[0] = 0xff;
    bytes[12..].copy_from_slice(&id.to_be_bytes());
    Address::new(bytes)
}

/// The installed doubles; deals and miners are added through it.
pub struct FilecoinDouble {
    provider: DynProvider,
    rpc_url: String,
}

impl FilecoinDouble {
    /// Installs the precompile and market actor doubles on `devnet`; deals and miners are
    /// written by dev account 0.
    pub async fn install(devnet: &Devnet) -> Result<Self, ChainError> {
        let rpc_url = devnet.rpc_url().to_string();
        let url = rpc_url
            .parse()
            .map_err(|e| ChainError::InvalidInput(format!("bad RPC URL: {e}")))?;
        let provider = crate::client::signing_provider(
            devnet.signer(0),
            alloy::transports::http::reqwest::Client::new(),
            url,
            crate::FeePolicy::default(),
        );
        let double = Self { provider, rpc_url };
        double
            .set_code(CALL_ACTOR_ID, &CallActorByIdDouble::DEPLOYED_BYTECODE)
            .await?;
        double
            .set_code(
                actor_address(MARKET_ACTOR_ID),
                &FilecoinActorDouble::DEPLOYED_BYTECODE,
            )
            .await?;
        Ok(double)
    }

    /// Publishes deal `deal_id` of `piece_cid` (a binary CIDv1) with miner `miner_id`.
    pub async fn add_deal(
        &self,
        deal_id: u64,
        piece_cid: &[u8],
        padded_size: u64,
        miner_id: u64,
    ) -> Result<(), ChainError> {
        let market = FilecoinActorDouble::new(actor_address(MARKET_ACTOR_ID), &self.provider);
        let call = market.setDeal(
            deal_id,
            Bytes::copy_from_slice(piece_cid),
            padded_size,
            miner_id,
        );
        self.mine(call.send().await).await
    }

    /// Creates miner `miner_id` (if new) with `controller` as one of its control addresses.
    pub async fn add_miner(&self, miner_id: u64, controller: Address) -> Result<(), ChainError> {
        let address = actor_address(miner_id);
        let code = self
            .provider
            .get_code_at(address)
            .await
            .map_err(|e| ChainError::from_rpc(&self.rpc_url, e))?;
        if code.is_empty() {
            self.set_code(address, &FilecoinActorDouble::DEPLOYED_BYTECODE)
                .await?;
        }
        let miner = FilecoinActorDouble::new(address, &self.provider);
        self.mine(miner.setController(controller, true).send().await)
            .await
    }

    async fn set_code(&self, at: Address, code: &Bytes) -> Result<(), ChainError> {
        let _: serde_json::Value = self
            .provider
            .raw_request("anvil_setCode".into(), (at, code))
            .await
            .map_err(|e| ChainError::from_rpc(&self.rpc_url, e))?;
        Ok(())
    }

    async fn mine(
        &self,
        sent: Result<
            alloy::providers::PendingTransactionBuilder<alloy::network::Ethereum>,
            alloy::contract::Error,
        >,
    ) -> Result<(), ChainError> {
        let receipt = sent
            .map_err(|e| ChainError::from_contract(&self.rpc_url, Address::ZERO, e))?
            .get_receipt()
            .await
            .map_err(|e| ChainError::Rpc(e.to_string()))?;
        crate::devnet::succeeded(receipt, "the Filecoin double refused the set-up").map(|_| ())
    }
}
