//! What can go wrong setting up or checking trust.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("{path} is not what strata wrote there: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("not a strata join token (expected strata1.<64 hex>.<32 hex>, as `strata serve` prints it)")]
    BadToken,
    #[error("cannot make a certificate: {0}")]
    Certificate(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("enrolment refused: {0}")]
    Refused(String),
}

impl TrustError {
    pub(crate) fn file(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::File { path: path.to_path_buf(), source }
    }
}

impl From<rcgen::Error> for TrustError {
    fn from(e: rcgen::Error) -> Self {
        Self::Certificate(e.to_string())
    }
}

impl From<rustls::Error> for TrustError {
    fn from(e: rustls::Error) -> Self {
        Self::Tls(e.to_string())
    }
}
