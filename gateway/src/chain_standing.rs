//! The broker's view of an order: what the chain allows, read by the privileged side itself.

use alloy_primitives::Address;
use futures::future::BoxFuture;
use shale_broker::{Admission, AdmissionError, Standing};
use shale_contracts::{ChainError, Marketplace};

use crate::admission::{admit_order, Refusal};
use crate::lease_start::lease_spec;
use crate::login::OrderId;

/// Reads an order's standing for the broker with the same rules the gateway admits a login by,
/// and shapes its container the way the gateway asks for it ([`lease_spec`]), so an honest SSH
/// process is never refused and a lying one gets nothing the terms did not pay for.
pub struct ChainStanding {
    market: Marketplace,
    provider: Address,
}

impl ChainStanding {
    /// Orders of `provider` on `market`.
    pub fn new(market: Marketplace, provider: Address) -> Self {
        Self { market, provider }
    }
}

impl Admission for ChainStanding {
    fn standing(&self, order: u64) -> BoxFuture<'_, Result<Standing, AdmissionError>> {
        Box::pin(async move {
            let found = match self.market.order(order).await {
                Ok(found) => found,
                Err(ChainError::OrderNotFound(_)) => {
                    return Ok(Standing::NotLive(
                        Refusal::UnknownOrder(OrderId(order)).to_string(),
                    ))
                }
                Err(e) => {
                    return Err(AdmissionError {
                        order,
                        reason: e.to_string(),
                    })
                }
            };
            Ok(
                match admit_order(&found, self.provider, crate::unix_now()) {
                    Ok(()) => Standing::Live(lease_spec(&found)),
                    Err(refusal) => Standing::NotLive(refusal.to_string()),
                },
            )
        })
    }
}
