//! # tunnel-core
//!
//! A multiplexed reverse tunnel. An agent behind NAT connects out to a server over mutual TLS;
//! the server then opens streams *back* through that link toward targets on the agent's node,
//! one QUIC stream (or one HTTP/2 stream of a gRPC link, where UDP is blocked) per proxied
//! connection.
//!
//! ```text
//!  client ──▶ server ──▶ ServerSession::open(target) ════ one stream ════▶ AgentSession::accept
//!                                                                          │ check the target
//!                                                                          ▼
//!                                                        accept (dial it) or refuse (typed)
//! ```
//!
//! The front door is a [`Listener`] on the server and a [`Connector`] on the agent, the same
//! for both transports (chosen by configuration):
//!
//! ```no_run
//! # async fn example(server_tls: rustls::ServerConfig, agent_tls: rustls::ClientConfig)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! use tunnel_core::*;
//!
//! // Server: agents connect here (QUIC on UDP and gRPC on TCP, one port number). It completes
//! // their handshakes while it is asked for them, so accept in a task of its own.
//! let mut listener = Listener::bind("0.0.0.0:10262".parse()?, server_tls, ListenerConfig::default()).await?;
//! let accepting = tokio::spawn(async move { listener.accept().await });
//! // Agent (on the edge node): connect out over QUIC, or gRPC when UDP is blocked.
//! let connector = Connector::new(agent_tls, SessionConfig::default(), TransportChoice::Auto)?;
//! let agent = connector.connect("203.0.113.7:10262".parse()?, "tunnel.example", proto::Register::default()).await?;
//!
//! // The server opens a stream to a port on the agent's node...
//! let server = accepting.await?.ok_or("listener closed")??;
//! let target = Target { host: TargetHost::Loopback, port: 8080 };
//! let opening = tokio::spawn(async move { server.open(&OpenRequest::new(target, 1)).await });
//! // ...and the agent decides: dial it and accept, or refuse with a typed answer.
//! let requested = agent.accept().await?.read_request().await?;
//! let at_agent = requested.accept().await?; // copy between it and the dialed target
//! let at_server = opening.await??; // copy between it and the client
//! # drop((at_agent, at_server));
//! # Ok(()) }
//! ```
//!
//! * [`transport`]: the listener and connector, sessions and streams; one link driver for every
//!   transport, typed close causes ([`CloseReason`]).
//! * [`control`]: the sans-IO control channel (register, ping/pong, go-away, close).
//! * [`proto`]: the wire messages and their bounded framing.
//! * [`tls`]: rustls builders (ring provider, passed explicitly) and the node identity carried by
//!   an agent certificate.
//! * [`route`], [`sniff`]: who and where a client wants, from SNI, Host or CONNECT.
//! * [`copy`]: the bidirectional copy loop with half-close and idle timeout.
//!
//! The library installs no global state: no crypto provider, no tracing subscriber, no
//! metrics recorder, no signal handler.
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

pub use route::{NodeRef, PortConfig, PortPolicy, PortSet, Target, TargetHost};
pub use tls::{AgentIdentity, Identity};
pub use transport::{
    AgentSession, BindError, Connector, GrpcListener, HandshakeError, IncomingStream, LinkState,
    Listener, ListenerConfig, QuicListener, ReplicaIdentity, ReplicaSession, RequestedStream,
    ServerSession, SessionConfig, TransportChoice, TransportKind, Transports, TunnelStream,
};
