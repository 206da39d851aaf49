//! One policy for gas and fees on every transaction Shale sends.
//!
//! Filecoin's Lotus answers `eth_estimateGas` for the state it has, and FEVM execution costs
//! move between that estimate and inclusion (its gas model charges for actor state it reads,
//! and blocks come every 30 s): estimates need headroom. A pairing check starved of gas makes a
//! verifier return false rather than revert, so a claim would fail as "invalid proof" after
//! paying for most of its verification. EIP-1559 fees are estimated from the node's fee
//! history, and the cap gets headroom too so one epoch's base-fee rise does not strand a
//! transaction in the pool.

use alloy::network::{Ethereum, TransactionBuilder};
use alloy::providers::fillers::{FillerControlFlow, GasFillable, GasFiller, TxFiller};
use alloy::providers::{Provider, SendableTx};
use alloy::transports::TransportResult;
use serde::{Deserialize, Serialize};

/// How much is added to the node's estimates, in percent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeePolicy {
    /// Added to `eth_estimateGas`'s gas limit (unused gas is not paid for).
    pub gas_headroom_percent: u32,
    /// Added to the estimated EIP-1559 `maxFeePerGas` (only the base fee actually charged is
    /// paid, so the headroom costs nothing unless the base fee rises).
    pub fee_headroom_percent: u32,
}

impl Default for FeePolicy {
    fn default() -> Self {
        Self {
            gas_headroom_percent: 25,
            fee_headroom_percent: 25,
        }
    }
}

impl FeePolicy {
    /// `gas` with the policy's headroom.
    pub fn gas_limit(&self, estimate: u64) -> u64 {
        with_headroom(estimate.into(), self.gas_headroom_percent) as u64
    }

    /// A fee cap with the policy's headroom.
    pub fn max_fee(&self, estimate: u128) -> u128 {
        with_headroom(estimate, self.fee_headroom_percent)
    }
}

fn with_headroom(value: u128, percent: u32) -> u128 {
    value.saturating_add(value.saturating_mul(u128::from(percent)) / 100)
}

/// alloy's gas filler with [`FeePolicy`] applied to what it estimated (a limit or fee the
/// caller set stays as set).
#[derive(Clone, Debug, Default)]
pub(crate) struct PolicyGasFiller {
    inner: GasFiller,
    policy: FeePolicy,
}

impl PolicyGasFiller {
    pub(crate) fn new(policy: FeePolicy) -> Self {
        Self {
            inner: GasFiller::default(),
            policy,
        }
    }
}

/// What was estimated, and which parts the caller left to estimation.
#[derive(Debug)]
pub(crate) struct PolicyFillable {
    estimated: GasFillable,
    limit_estimated: bool,
    fees_estimated: bool,
}

impl TxFiller<Ethereum> for PolicyGasFiller {
    type Fillable = PolicyFillable;

    fn status(
        &self,
        tx: &<Ethereum as alloy::network::Network>::TransactionRequest,
    ) -> FillerControlFlow {
        TxFiller::<Ethereum>::status(&self.inner, tx)
    }

    fn fill_sync(&self, _tx: &mut SendableTx<Ethereum>) {}

    async fn prepare<P: Provider<Ethereum>>(
        &self,
        provider: &P,
        tx: &<Ethereum as alloy::network::Network>::TransactionRequest,
    ) -> TransportResult<Self::Fillable> {
        let limit_estimated = tx.gas_limit().is_none();
        let fees_estimated = tx.max_fee_per_gas().is_none() && tx.gas_price().is_none();
        let estimated = TxFiller::<Ethereum>::prepare(&self.inner, provider, tx).await?;
        Ok(PolicyFillable {
            estimated,
            limit_estimated,
            fees_estimated,
        })
    }

    async fn fill(
        &self,
        fillable: Self::Fillable,
        tx: SendableTx<Ethereum>,
    ) -> TransportResult<SendableTx<Ethereum>> {
        let p = &self.policy;
        let estimated = match fillable.estimated {
            GasFillable::Legacy {
                gas_limit,
                gas_price,
            } => GasFillable::Legacy {
                gas_limit: if fillable.limit_estimated {
                    p.gas_limit(gas_limit)
                } else {
                    gas_limit
                },
                // A legacy price is paid in full: no headroom on it.
                gas_price,
            },
            GasFillable::Eip1559 {
                gas_limit,
                mut estimate,
            } => {
                if fillable.fees_estimated {
                    estimate.max_fee_per_gas = p.max_fee(estimate.max_fee_per_gas);
                }
                GasFillable::Eip1559 {
                    gas_limit: if fillable.limit_estimated {
                        p.gas_limit(gas_limit)
                    } else {
                        gas_limit
                    },
                    estimate,
                }
            }
        };
        TxFiller::<Ethereum>::fill(&self.inner, estimated, tx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_is_added_in_percent_and_saturates() {
        let p = FeePolicy::default();
        assert_eq!(p.gas_limit(100_000), 125_000);
        assert_eq!(p.max_fee(1_000_000_000), 1_250_000_000);
        let none = FeePolicy {
            gas_headroom_percent: 0,
            fee_headroom_percent: 0,
        };
        assert_eq!(none.gas_limit(21_000), 21_000);
        assert_eq!(p.max_fee(u128::MAX), u128::MAX);
    }

    #[test]
    fn the_policy_reads_from_config_with_defaults() {
        let p: FeePolicy = toml::from_str("gas_headroom_percent = 40").unwrap();
        assert_eq!(p.gas_headroom_percent, 40);
        assert_eq!(p.fee_headroom_percent, 25);
        assert!(toml::from_str::<FeePolicy>("gas_headroom = 40").is_err());
    }
}
