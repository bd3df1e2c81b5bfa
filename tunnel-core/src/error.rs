//! Errors by fault domain: the peer broke the protocol, the target refused, the link failed, or
//! the local configuration is wrong. Callers branch on predicates and [`Refusal`], never on text.

use std::fmt;
use std::io;

use crate::proto::{self, DecodeError};

/// Why an agent did not connect a stream: the typed answer it sends to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The agent's allowlist does not name the target.
    Forbidden,
    /// The target actively refused the connection.
    Refused,
    /// The target could not be reached.
    Unreachable,
    /// The dial did not complete in time.
    Timeout,
}

impl Refusal {
    /// A stable, lowercase label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forbidden => "forbidden",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
        }
    }

    /// The wire code.
    pub fn to_proto(self) -> proto::OpenResult {
        match self {
            Self::Forbidden => proto::OpenResult::Forbidden,
            Self::Refused => proto::OpenResult::Refused,
            Self::Unreachable => proto::OpenResult::Unreachable,
            Self::Timeout => proto::OpenResult::Timeout,
        }
    }

    /// Classifies a failed local dial.
    pub fn from_io(err: &io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::TimedOut => Self::Timeout,
            _ => Self::Unreachable,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the server could not open a stream to a target through an agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The agent answered with a refusal.
    #[error("agent refused {target}: {refusal}{}", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Refused {
        /// The typed reason.
        refusal: Refusal,
        /// The agent's one-line explanation.
        detail: String,
        /// What was asked for.
        target: crate::route::Target,
    },
    /// The agent did not answer within the open timeout.
    #[error("agent did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The session is draining or closed: no new streams.
    #[error("session closed: {0}")]
    SessionClosed(String),
    /// The agent's link already carries as many streams as it may (`max_streams`).
    #[error("the agent's link carries its limit of {0} streams")]
    Busy(u32),
    /// The agent's answer broke the protocol.
    #[error("bad answer from agent: {0}")]
    Protocol(#[from] DecodeError),
    /// The transport failed while opening.
    #[error("transport: {0}")]
    Io(#[from] io::Error),
}

impl OpenError {
    /// The agent's refusal, or the equivalent for failures on our side (a timeout is a timeout; a
    /// lost session is unreachable).
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::Refused { refusal, .. } => *refusal,
            Self::Timeout(_) => Refusal::Timeout,
            _ => Refusal::Unreachable,
        }
    }

    /// True when the agent explicitly refused; false for transport and protocol failures.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

/// A failure of the agent link as a whole: handshake, identity, control channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The peer's certificate does not carry a usable node identity.
    #[error("peer identity: {0}")]
    Identity(#[from] crate::tls::IdentityError),
    /// The peer broke the control protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] crate::control::ControlError),
    /// A frame could not be decoded.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// A step of the handshake did not finish in time.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// QUIC connection failure.
    #[error("quic: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// QUIC could not start the connection (bad address, bad server name, endpoint closed).
    #[error("quic connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// Socket IO.
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

impl SessionError {
    /// True when the fault lies with the peer (bad identity, protocol violation); false for
    /// network and local failures that a retry may fix.
    pub fn is_peer(&self) -> bool {
        matches!(
            self,
            Self::Identity(_) | Self::Protocol(_) | Self::Decode(_)
        )
    }
}

impl From<quinn::WriteError> for SessionError {
    fn from(e: quinn::WriteError) -> Self {
        Self::Io(e.into())
    }
}

impl From<quinn::ReadExactError> for SessionError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => Self::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream finished early",
            )),
            quinn::ReadExactError::ReadError(e) => Self::Io(e.into()),
        }
    }
}

/// A TLS configuration that cannot be built from the given material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No certificate found in PEM input.
    #[error("no certificate in {0}")]
    NoCertificate(&'static str),
    /// No private key found in PEM input.
    #[error("no private key in {0}")]
    NoKey(&'static str),
    /// PEM could not be parsed.
    #[error("invalid PEM in {what}: {source}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// rustls rejected the configuration (key does not match, unsupported algorithm).
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration is unusable for QUIC (needs TLS 1.3).
    #[error("quic tls: {0}")]
    Quic(String),
    /// A value is out of range.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The knob.
        what: &'static str,
        /// The reason.
        why: String,
    },
}
