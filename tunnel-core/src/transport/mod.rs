//! The transport-neutral session API.
//!
//! An agent link is a session. The server opens streams on it toward a [`Target`]; the agent
//! accepts them, checks the target and dials it (or refuses with a typed [`Refusal`]). Each
//! proxied connection is one transport stream with its own flow control: a native QUIC stream
//! here, one HTTP/2 stream in the gRPC transport. Embedders see [`ServerSession`],
//! [`AgentSession`] and [`TunnelStream`], never the transport underneath.
//!
//! [`Target`]: crate::route::Target
//! [`Refusal`]: crate::error::Refusal

mod endpoint;
pub mod grpc;
mod link;
pub mod quic;
mod session;
mod stream;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::control::ControlConfig;
use crate::error::{ConfigError, SessionError};

pub use endpoint::{Connector, Listener, ListenerConfig, QUIC_FIRST, TransportChoice, Transports};
pub use grpc::GrpcListener;
pub use link::LinkState;
pub use quic::{Accepted, PendingSession, QuicListener};
pub use session::{
    AgentSession, IncomingStream, ReplicaIdentity, ReplicaSession, RequestedStream, ServerSession,
};
pub use stream::TunnelStream;

/// Which transport carries a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    /// QUIC over UDP.
    Quic,
    /// gRPC over HTTP/2, TLS and TCP.
    Grpc,
}

impl TransportKind {
    /// Lowercase label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Grpc => "grpc",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of an agent link, shared by both ends. Each knob says its unit, default and memory
/// cost.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Control-channel timing (ping 15 s, pong timeout 10 s, registration 10 s).
    pub control: ControlConfig,
    /// Time for the transport handshake (TLS included). Default 10 s.
    pub handshake_timeout: Duration,
    /// Server: time from opening a stream to the agent's answer. Longer than the agent's dial
    /// timeout, so that a slow target yields the agent's typed `timeout`. Default 15 s.
    pub open_timeout: Duration,
    /// Agent: time for the server to send the stream-open header. Default 10 s.
    pub header_timeout: Duration,
    /// Most streams the server may have open to one agent at once. Default 1,000.
    pub max_streams: u32,
    /// Receive window per stream, bytes. 2 MiB keeps 100 Mbit/s flowing at 100 ms RTT
    /// (bandwidth × RTT = 1.25 MB) with headroom.
    pub stream_window: u32,
    /// Receive window per link, bytes: the most one agent's streams can have in flight toward
    /// us together, which bounds the memory an agent can make us buffer. Default 16 MiB.
    pub connection_window: u32,
    /// Transport keepalive, so NAT bindings on the edge stay open. Default 5 s.
    pub keep_alive: Duration,
    /// The link is dead after this long without any packet. Default 30 s.
    pub idle_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            control: ControlConfig::default(),
            handshake_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(15),
            header_timeout: Duration::from_secs(10),
            max_streams: 1_000,
            stream_window: 2 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

impl SessionConfig {
    /// The settings of a peer link between replicas: as these, with room for 16 times the
    /// streams and 4 times the link's receive window, since one peer link carries the
    /// forwarded streams of every node the dialing replica holds (each node is still bounded
    /// by its own agent link's).
    pub fn for_peer_links(&self) -> Self {
        Self {
            max_streams: self.max_streams.saturating_mul(16),
            connection_window: self.connection_window.saturating_mul(4),
            ..self.clone()
        }
    }
}

/// The server an agent connects to: its address, and the name its certificate must carry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Server<'a> {
    pub(crate) addr: SocketAddr,
    pub(crate) name: &'a str,
}

/// Why a listener or connector could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The TLS configuration does not fit the transport.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The socket could not be bound.
    #[error("bind: {0}")]
    Io(#[from] std::io::Error),
}

/// An agent that knocked and did not become a session: a refused certificate, an identity the
/// server rejects, a handshake or registration that failed or timed out.
#[derive(Debug, thiserror::Error)]
#[error("agent at {remote} over {transport}: {error}")]
pub struct HandshakeError {
    /// Where it came from.
    pub remote: SocketAddr,
    /// Over which transport.
    pub transport: TransportKind,
    /// What went wrong; [`SessionError::reason`] gives the typed cause.
    #[source]
    pub error: SessionError,
}
