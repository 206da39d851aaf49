//! Why a step of a pull failed, and which failures are worth another try.

use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};

use crate::ctd::error_chain;
use crate::ProvisionError;

/// Why one step of a pull failed, before it is named with the registry and the reference.
#[derive(Debug)]
pub(super) enum Failure {
    /// Worth another try: connection refused or reset, a timeout, HTTP 429 or 5xx.
    Transient(String),
    /// HTTP 401: the credentials (or their absence) were refused.
    Unauthorized,
    /// HTTP 404: no such repository, tag, manifest or blob.
    NotFound(String),
    /// Another refusal by the registry (403 and other 4xx).
    Refused(String),
    /// Bytes that do not hash to the digest they were asked for.
    Mismatch { expected: String, actual: String },
    /// A manifest, index or config we cannot use.
    Invalid(String),
    /// containerd failed.
    Store(ProvisionError),
}

impl Failure {
    pub(super) fn is_transient(&self) -> bool {
        matches!(self, Failure::Transient(_))
    }
}

impl From<ProvisionError> for Failure {
    fn from(e: ProvisionError) -> Self {
        Failure::Store(e)
    }
}

/// Sorts `oci-client`'s errors into what the caller can act on.
pub(super) fn classify(e: OciDistributionError) -> Failure {
    match e {
        OciDistributionError::RequestError(re) => Failure::Transient(error_chain(&re)),
        OciDistributionError::IoError(io) => classify_io(io),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => Failure::Unauthorized,
        OciDistributionError::ServerError { code, message, .. } => match code {
            401 => Failure::Unauthorized,
            404 => Failure::NotFound(format!("HTTP 404 {}", message.trim())),
            429 | 500..=599 => Failure::Transient(format!("HTTP {code} {}", message.trim())),
            _ => Failure::Refused(format!("HTTP {code} {}", message.trim())),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let text = envelope
                .errors
                .iter()
                .map(|e| format!("{:?}: {}", e.code, e.message))
                .collect::<Vec<_>>()
                .join("; ");
            match envelope.errors.first().map(|e| &e.code) {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NotFound,
                ) => Failure::NotFound(format!("HTTP 404 {text}")),
                Some(OciErrorCode::Unauthorized) => Failure::Unauthorized,
                Some(OciErrorCode::Toomanyrequests) => {
                    Failure::Transient(format!("HTTP 429 {text}"))
                }
                Some(OciErrorCode::Denied) => Failure::Refused(format!("HTTP 403 {text}")),
                _ => Failure::Refused(text),
            }
        }
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            Failure::Mismatch { expected, actual }
        }
        other => Failure::Invalid(other.to_string()),
    }
}

/// A failed read of a blob's body: `oci-client`'s verifying stream reports a digest mismatch
/// as an I/O error that carries the [`DigestError`]; anything else is the connection breaking.
pub(super) fn classify_io(io: std::io::Error) -> Failure {
    if let Some(DigestError::VerificationError { expected, actual }) =
        io.get_ref().and_then(|e| e.downcast_ref::<DigestError>())
    {
        return Failure::Mismatch {
            expected: expected.clone(),
            actual: actual.clone(),
        };
    }
    Failure::Transient(error_chain(&io))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_sort_into_retried_and_final() {
        let server = |code: u16| OciDistributionError::ServerError {
            code,
            url: "http://r/v2/x".into(),
            message: "m".into(),
        };
        for code in [429, 500, 502, 503, 504] {
            assert!(classify(server(code)).is_transient(), "{code}");
        }
        assert!(matches!(classify(server(401)), Failure::Unauthorized));
        assert!(matches!(classify(server(404)), Failure::NotFound(_)));
        assert!(matches!(classify(server(403)), Failure::Refused(_)));
        let unauthorized = OciDistributionError::UnauthorizedError { url: "u".into() };
        assert!(matches!(classify(unauthorized), Failure::Unauthorized));
        let mismatch = std::io::Error::other(DigestError::VerificationError {
            expected: "sha256:a".into(),
            actual: "sha256:b".into(),
        });
        assert!(matches!(classify_io(mismatch), Failure::Mismatch { .. }));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(classify_io(reset).is_transient());
    }
}
