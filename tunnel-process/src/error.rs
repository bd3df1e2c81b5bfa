//! The configuration error both binaries report.

use std::path::PathBuf;

/// A configuration that cannot run: a flag missing or out of range, a file unreadable, TLS
/// material unusable. Each variant names the flag at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required flag is missing.
    #[error("{flag} is required")]
    Missing {
        /// The flag, as typed on the command line.
        flag: &'static str,
    },
    /// A file could not be read.
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        /// The flag naming the file.
        flag: &'static str,
        /// The path.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS material is unusable.
    #[error("{flag}: {source}")]
    Tls {
        /// The flag naming the file at fault.
        flag: &'static str,
        /// What is wrong.
        #[source]
        source: tunnel_core::ConfigError,
    },
    /// The certificate does not name a node.
    #[error("--tls-cert-file: {0}")]
    Identity(#[from] tunnel_core::tls::IdentityError),
    /// A value is out of range or inconsistent.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The knob.
        what: &'static str,
        /// The reason.
        why: String,
    },
}
