//! # tunnel-core
//!
//! A multiplexed reverse tunnel. An agent behind NAT dials out to a server over mutual TLS;
//! the server then opens streams *back* through that link toward targets on the agent's node.
//!
//! ```text
//!  client ──▶ server front ──▶ ServerSession::open(target) ════ one QUIC stream ════▶ agent
//!                                                                   │ allowlist check │
//!                                                                   ▼                 ▼
//!                                                     StreamOpenReply   dial 127.0.0.1 / node IP
//! ```
//!
//! * [`transport`]: sessions and streams, one transport stream per proxied connection (QUIC).
//! * [`control`]: the sans-IO control channel (register, ping/pong, go-away).
//! * [`proto`]: the wire messages and their bounded framing.
//! * [`tls`]: rustls builders (ring provider, passed explicitly) and the node identity carried by
//!   an agent certificate.
//! * [`route`], [`sniff`]: who and where a client wants, from SNI, Host or CONNECT.
//! * [`copy`]: the bidirectional copy loop with half-close and idle timeout.
//!
//! The library installs no global state: no crypto provider, no tracing subscriber, no
//! metrics recorder.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod control;
pub mod copy;
pub mod error;
pub mod proto;
pub mod route;
pub mod sniff;
pub mod tls;
pub mod transport;

pub use error::{
    CloseCause, CloseReason, ConfigError, Initiator, OpenError, Refusal, SessionError,
};
pub use proto::OpenRequest;
pub use route::{NodeRef, PortSet, Target, TargetHost};
pub use tls::{AgentIdentity, Identity};
pub use transport::{
    AgentSession, BindError, Connector, GrpcConnector, GrpcListener, HandshakeError,
    IncomingStream, LinkState, Listener, ListenerConfig, QuicConnector, QuicListener,
    RequestedStream, ServerSession, SessionConfig, TransportChoice, TransportKind, Transports,
    TunnelStream,
};
