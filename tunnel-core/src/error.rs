//! Errors by fault domain: the peer broke the protocol, the target refused, the link failed, or
//! the local configuration is wrong. Callers branch on predicates and [`Refusal`], never on text.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;

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
    /// The stream asks for something the link has not negotiated (compression).
    Unsupported,
    /// Peer links: the replica asked holds no agent for the node (the asker tries another).
    NoAgent,
    /// Peer links: the replica's agent for the node is leaving it (its link drains or just
    /// closed), on its way to another replica: the asker waits for it there.
    Leaving,
}

impl Refusal {
    /// A stable, lowercase label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forbidden => "forbidden",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Unsupported => "unsupported",
            Self::NoAgent => "no_agent",
            Self::Leaving => "leaving",
        }
    }

    /// The wire code.
    pub fn to_proto(self) -> proto::OpenResult {
        match self {
            Self::Forbidden => proto::OpenResult::Forbidden,
            Self::Refused => proto::OpenResult::Refused,
            Self::Unreachable => proto::OpenResult::Unreachable,
            Self::Timeout => proto::OpenResult::Timeout,
            Self::Unsupported => proto::OpenResult::Unsupported,
            Self::NoAgent => proto::OpenResult::NoAgent,
            Self::Leaving => proto::OpenResult::Leaving,
        }
    }

    /// The refusal a wire code carries: `Ok(None)` for OK, an error for a code that is no
    /// answer at all (unspecified or unknown).
    pub fn from_proto(code: i32) -> Result<Option<Self>, DecodeError> {
        match proto::OpenResult::try_from(code) {
            Ok(proto::OpenResult::Ok) => Ok(None),
            Ok(proto::OpenResult::Forbidden) => Ok(Some(Self::Forbidden)),
            Ok(proto::OpenResult::Refused) => Ok(Some(Self::Refused)),
            Ok(proto::OpenResult::Unreachable) => Ok(Some(Self::Unreachable)),
            Ok(proto::OpenResult::Timeout) => Ok(Some(Self::Timeout)),
            Ok(proto::OpenResult::Unsupported) => Ok(Some(Self::Unsupported)),
            Ok(proto::OpenResult::NoAgent) => Ok(Some(Self::NoAgent)),
            Ok(proto::OpenResult::Leaving) => Ok(Some(Self::Leaving)),
            Ok(proto::OpenResult::Unspecified) | Err(_) => {
                Err(DecodeError::Invalid("unknown open result"))
            }
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
    /// The link is draining or closed: no new streams.
    #[error("link {0}")]
    LinkClosed(CloseReason),
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
    /// lost link is unreachable).
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

/// Who ended (or drained) a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Initiator {
    /// This side.
    Local,
    /// The other end of the link.
    Remote,
}

/// Why a link ended or drains. Stable labels ([`as_str`](Self::as_str)) for logs and metrics;
/// distinct QUIC close codes and wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCause {
    /// The drain announced by a go-away ended.
    GoAway,
    /// A ping went unanswered past its deadline.
    PingDeadline,
    /// Nothing arrived within the transport's idle timeout.
    IdleTimeout,
    /// A newer session of the same agent took over.
    Replaced,
    /// The initiator is shutting down.
    Shutdown,
    /// A protocol violation.
    Protocol,
    /// The initiator refuses the other end: certificate, identity or TLS failure.
    Refused,
    /// The transport failed underneath (connection reset or lost).
    Transport,
    /// The handshake or registration did not finish in time.
    HandshakeTimeout,
    /// The agent already holds a session to this replica and wants one to another
    /// (`--server-redundancy`): registration refused, try another replica.
    AlreadyConnected,
}

impl CloseCause {
    /// Every cause, for metrics that list each label from the start.
    pub const ALL: [Self; 10] = [
        Self::GoAway,
        Self::PingDeadline,
        Self::IdleTimeout,
        Self::Replaced,
        Self::Shutdown,
        Self::Protocol,
        Self::Refused,
        Self::Transport,
        Self::HandshakeTimeout,
        Self::AlreadyConnected,
    ];

    /// A stable, lowercase label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GoAway => "go_away",
            Self::PingDeadline => "ping_deadline",
            Self::IdleTimeout => "idle_timeout",
            Self::Replaced => "replaced",
            Self::Shutdown => "shutdown",
            Self::Protocol => "protocol",
            Self::Refused => "refused",
            Self::Transport => "transport",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::AlreadyConnected => "already_connected",
        }
    }

    /// The wire value.
    pub fn to_proto(self) -> proto::CloseCause {
        match self {
            Self::GoAway => proto::CloseCause::GoAway,
            Self::PingDeadline => proto::CloseCause::PingDeadline,
            Self::IdleTimeout => proto::CloseCause::IdleTimeout,
            Self::Replaced => proto::CloseCause::Replaced,
            Self::Shutdown => proto::CloseCause::Shutdown,
            Self::Protocol => proto::CloseCause::Protocol,
            Self::Refused => proto::CloseCause::Refused,
            Self::Transport => proto::CloseCause::Transport,
            Self::HandshakeTimeout => proto::CloseCause::HandshakeTimeout,
            Self::AlreadyConnected => proto::CloseCause::AlreadyConnected,
        }
    }

    /// The cause a wire value names; unknown values (a newer peer) read as a transport failure.
    pub fn from_proto(value: i32) -> Self {
        match proto::CloseCause::try_from(value) {
            Ok(proto::CloseCause::GoAway) => Self::GoAway,
            Ok(proto::CloseCause::PingDeadline) => Self::PingDeadline,
            Ok(proto::CloseCause::IdleTimeout) => Self::IdleTimeout,
            Ok(proto::CloseCause::Replaced) => Self::Replaced,
            Ok(proto::CloseCause::Shutdown) => Self::Shutdown,
            Ok(proto::CloseCause::Protocol) => Self::Protocol,
            Ok(proto::CloseCause::Refused) => Self::Refused,
            Ok(proto::CloseCause::HandshakeTimeout) => Self::HandshakeTimeout,
            Ok(proto::CloseCause::AlreadyConnected) => Self::AlreadyConnected,
            Ok(proto::CloseCause::Transport | proto::CloseCause::Unspecified) | Err(_) => {
                Self::Transport
            }
        }
    }

    /// The QUIC application close code (the wire value, so both transports agree).
    pub(crate) fn code(self) -> u32 {
        // Small positive enum values: the cast cannot truncate.
        self.to_proto() as u32
    }

    fn describe(self) -> &'static str {
        match self {
            Self::GoAway => "drain after go-away ended",
            Self::PingDeadline => "ping deadline passed",
            Self::IdleTimeout => "idle timeout",
            Self::Replaced => "replaced by a newer session",
            Self::Shutdown => "shutting down",
            Self::Protocol => "protocol violation",
            Self::Refused => "refused",
            Self::Transport => "transport error",
            Self::HandshakeTimeout => "handshake timed out",
            Self::AlreadyConnected => "already connected to this replica",
        }
    }
}

impl fmt::Display for CloseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why a link ended or drains, and who decided it, with the error underneath when there is one
/// (a TLS alert, a gRPC status, the peer's close detail).
#[derive(Debug, Clone)]
pub struct CloseReason {
    /// Why.
    pub cause: CloseCause,
    /// Who.
    pub initiator: Initiator,
    source: Option<Arc<dyn StdError + Send + Sync>>,
    /// The peer answered with a QUIC stateless reset.
    stateless_reset: bool,
}

impl CloseReason {
    /// A reason decided on this side.
    pub fn local(cause: CloseCause) -> Self {
        Self {
            cause,
            initiator: Initiator::Local,
            source: None,
            stateless_reset: false,
        }
    }

    /// A reason the other end decided.
    pub fn remote(cause: CloseCause) -> Self {
        Self {
            cause,
            initiator: Initiator::Remote,
            source: None,
            stateless_reset: false,
        }
    }

    /// The same, with the error underneath.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The same, with the peer's one-line detail (its close message) as the source.
    pub(crate) fn with_detail(self, detail: &str) -> Self {
        if detail.is_empty() {
            return self;
        }
        self.with_source(PeerDetail(detail.chars().take(200).collect()))
    }

    /// The same, marked as the peer's QUIC stateless reset.
    pub(crate) fn by_stateless_reset(mut self) -> Self {
        self.stateless_reset = true;
        self
    }

    /// True when the peer ended the link with a QUIC stateless reset: it is up and reachable
    /// now, and holds nothing of this link (a server that restarted). Connecting again at
    /// once finds it.
    pub fn is_stateless_reset(&self) -> bool {
        self.stateless_reset
    }

    /// True when the other end refused this side (its certificate or identity).
    pub fn is_refused_by_peer(&self) -> bool {
        self.cause == CloseCause::Refused && self.initiator == Initiator::Remote
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.initiator {
            Initiator::Local => write!(f, "{}", self.cause)?,
            Initiator::Remote => write!(f, "{} by the peer", self.cause)?,
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl StdError for CloseReason {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// What the peer said when it closed, kept for the operator; never branched on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PeerDetail(String);

/// Who refused whom, if the TLS error `e` is a refusal of a certificate (ours, by the peer's
/// alert; or the peer's, by our verifier). Other TLS failures (ALPN, versions, a record that
/// does not decrypt mid-session) are protocol failures, not refusals.
pub(crate) fn tls_refusal(e: &rustls::Error) -> Option<Initiator> {
    match e {
        rustls::Error::AlertReceived(alert) if refusal_alert(*alert) => Some(Initiator::Remote),
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            Some(Initiator::Local)
        }
        _ => None,
    }
}

/// Alerts by which a peer refuses a certificate (a bad signature is a decrypt error; a
/// handshake failure is how some stacks say "no acceptable certificate").
pub(crate) fn refusal_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::DecryptError
            | A::HandshakeFailure
            | A::CertificateRequired
    )
}

/// The TLS alert or error somewhere in `err`'s chain, if any: how a TLS refusal reaches us
/// through tonic, hyper and `io::Error` (whose `source()` skips the error it wraps).
pub(crate) fn tls_error_in<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = e.source();
    }
    None
}

/// A failure of the agent link as a whole: handshake, identity, control channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The link ended, or was refused, for this reason.
    #[error("{0}")]
    Closed(CloseReason),
    /// The peer's certificate does not carry a usable node identity.
    #[error("peer identity: {0}")]
    Identity(#[from] crate::tls::IdentityError),
    /// A frame could not be decoded.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// A step of a stream's set-up did not finish in time.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// The server withdrew the stream before the agent answered (its client left).
    #[error("the server withdrew the stream")]
    Withdrawn,
    /// The server asked for something this link has not negotiated; the stream was refused.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// Socket IO, or a transport that could not start (bad address or server name).
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

impl SessionError {
    /// Why the link ended or never came up, as a typed cause with its initiator.
    pub fn reason(&self) -> CloseReason {
        match self {
            Self::Closed(r) => r.clone(),
            Self::Identity(_) => CloseReason::local(CloseCause::Refused),
            Self::Decode(_) | Self::Unsupported(_) => CloseReason::local(CloseCause::Protocol),
            Self::Withdrawn => CloseReason::remote(CloseCause::Transport),
            Self::Timeout(_) => CloseReason::local(CloseCause::HandshakeTimeout),
            Self::Io(_) => CloseReason::local(CloseCause::Transport),
        }
    }

    /// True when the fault lies with the peer's identity or protocol (a refusal either way, a
    /// protocol violation); false for network and local failures that a retry may fix.
    pub fn is_peer(&self) -> bool {
        let reason = self.reason();
        matches!(reason.cause, CloseCause::Refused | CloseCause::Protocol)
    }
}

impl From<CloseReason> for SessionError {
    fn from(r: CloseReason) -> Self {
        Self::Closed(r)
    }
}

impl From<crate::control::ControlError> for CloseReason {
    fn from(e: crate::control::ControlError) -> Self {
        use crate::control::ControlError;
        let cause = match e {
            ControlError::PingTimeout { .. } => CloseCause::PingDeadline,
            ControlError::RegisterTimeout => CloseCause::HandshakeTimeout,
            _ => CloseCause::Protocol,
        };
        Self::local(cause).with_source(e)
    }
}

impl From<crate::control::ControlError> for SessionError {
    fn from(e: crate::control::ControlError) -> Self {
        Self::Closed(e.into())
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
    /// The TLS configuration is unusable for QUIC (needs a TLS 1.3 cipher suite).
    #[error("quic tls: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The system has no randomness to draw a key from.
    #[error("no randomness for {0}")]
    Randomness(&'static str),
    /// A value is out of range.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The knob.
        what: &'static str,
        /// The reason.
        why: String,
    },
}
