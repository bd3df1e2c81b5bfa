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

pub mod grpc;
pub mod quic;
mod session;

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::control::ControlConfig;

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

/// One proxied connection: bytes both ways, half-close by `shutdown`.
#[derive(Debug)]
pub struct TunnelStream {
    inner: StreamInner,
    // Keeps the stream counted in its link's open streams until it is dropped.
    _count: session::StreamGuard,
}

#[derive(Debug)]
enum StreamInner {
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    // Boxed: a gRPC stream is several times the size of a QUIC one.
    Grpc(Box<grpc::GrpcStream>),
}

/// Application error code carried by a stream reset after a local failure.
const RESET_ABORTED: u32 = 1;

impl TunnelStream {
    pub(crate) fn quic(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        count: session::StreamGuard,
    ) -> Self {
        Self {
            inner: StreamInner::Quic { send, recv },
            _count: count,
        }
    }

    pub(crate) fn grpc(stream: grpc::GrpcStream, count: session::StreamGuard) -> Self {
        Self {
            inner: StreamInner::Grpc(Box::new(stream)),
            _count: count,
        }
    }

    /// The transport's id of the stream, for logs.
    pub fn id(&self) -> u64 {
        match &self.inner {
            StreamInner::Quic { send, .. } => send.id().index(),
            StreamInner::Grpc(s) => s.id,
        }
    }

    /// Waits (at most `timeout`) until the peer has acknowledged everything written before the
    /// shutdown, so that closing the link right after loses no tail. Returns false on timeout
    /// or when the peer stopped reading instead.
    pub async fn delivered(&self, timeout: Duration) -> bool {
        match &self.inner {
            StreamInner::Quic { send, .. } => {
                matches!(
                    tokio::time::timeout(timeout, send.stopped()).await,
                    Ok(Ok(None))
                )
            }
            // HTTP/2 acknowledges nothing per stream; the connection outlives the call.
            StreamInner::Grpc(_) => true,
        }
    }

    /// Ends the stream abruptly in both directions, so the peer sees an error rather than a
    /// clean end of data. For use after a failure on the other leg of the copy.
    pub fn abort(&mut self) {
        match &mut self.inner {
            StreamInner::Quic { send, recv } => {
                let code = quinn::VarInt::from_u32(RESET_ABORTED);
                // Already finished or reset: nothing left to abort.
                let _ = send.reset(code);
                let _ = recv.stop(code);
            }
            StreamInner::Grpc(s) => s.abort(),
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            StreamInner::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
            StreamInner::Grpc(s) => s.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            StreamInner::Quic { send, .. } => AsyncWrite::poll_write(Pin::new(send), cx, buf),
            StreamInner::Grpc(s) => s.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            StreamInner::Quic { send, .. } => AsyncWrite::poll_flush(Pin::new(send), cx),
            StreamInner::Grpc(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            StreamInner::Quic { send, .. } => AsyncWrite::poll_shutdown(Pin::new(send), cx),
            StreamInner::Grpc(s) => {
                s.shutdown();
                Poll::Ready(Ok(()))
            }
        }
    }
}

pub use grpc::{GrpcConnector, GrpcListener};
pub use quic::{PendingSession, QuicConnector, QuicListener};
pub use session::{AgentSession, IncomingStream, LinkState, RequestedStream, ServerSession};
