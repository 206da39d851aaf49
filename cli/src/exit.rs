//! Exit codes scripts can rely on, and the mapping from errors to them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other failure (the message says what) |
//! | 2 | bad command line (clap's usage errors) |
//! | 3 | the chain RPC endpoint is unreachable (an outage: retry later) |
//! | 4 | the marketplace refused the transaction (the message says why) |
//! | 5 | no such order or provider |
//! | 6 | timed out waiting (e.g. the provider did not accept in time) |
//! | 7 | receipts do not match what the provider claimed |
//! | 8 | ssh or scp failed |

use shale_contracts::ChainError;

/// Failures the binary reports with a specific exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Waited for something that did not happen in time.
    #[error("{0}")]
    TimedOut(String),
    /// The provider's receipts do not add up to what it claimed.
    #[error("{0}")]
    ReceiptsMismatch(String),
    /// The stock ssh/scp client failed.
    #[error("{0}")]
    Ssh(String),
}

/// The exit code for an error, from the first classified cause in its chain.
pub fn code_of(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return match f {
                Failure::TimedOut(_) => 6,
                Failure::ReceiptsMismatch(_) => 7,
                Failure::Ssh(_) => 8,
            };
        }
        if let Some(c) = cause.downcast_ref::<ChainError>() {
            return match c {
                ChainError::Unreachable { .. } => 3,
                ChainError::Reverted { .. } | ChainError::TxReverted { .. } => 4,
                ChainError::OrderNotFound(_) | ChainError::ProviderNotFound(_) => 5,
                _ => 1,
            };
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn causes_deep_in_the_chain_pick_the_code() {
        let err = Err::<(), _>(ChainError::OrderNotFound(4))
            .context("showing order 4")
            .unwrap_err();
        assert_eq!(code_of(&err), 5);
        let err = anyhow::Error::new(Failure::ReceiptsMismatch("x".into())).context("verifying");
        assert_eq!(code_of(&err), 7);
        let err = Err::<(), _>(ChainError::Unreachable {
            url: "http://x".into(),
            reason: "refused".into(),
        })
        .context("listing")
        .unwrap_err();
        assert_eq!(code_of(&err), 3);
        assert_eq!(code_of(&anyhow::anyhow!("plain")), 1);
    }
}
