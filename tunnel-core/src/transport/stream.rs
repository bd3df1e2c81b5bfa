//! One proxied connection, whatever transport carries it.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::link::BoxFuture;

/// What a transport's stream offers beyond bytes both ways: implemented by a QUIC stream pair
/// and a gRPC `Stream` call.
pub(crate) trait StreamIo:
    AsyncRead + AsyncWrite + Send + Sync + Unpin + fmt::Debug
{
    /// The transport's id of the stream, for logs.
    fn id(&self) -> u64;

    /// Ends the stream abruptly both ways: the peer sees a reset, not a clean end.
    fn abort(&mut self);

    /// Resolves when the peer has acknowledged what was written before the shutdown: true, or
    /// false on `timeout` or when the peer stopped reading instead.
    fn delivered(&self, timeout: Duration) -> BoxFuture<'_, bool>;
}

/// One proxied connection: bytes both ways, half-close by `shutdown`.
///
/// A QUIC stream or a gRPC `Stream` call behind one type; the transport is reached through one
/// indirect call per poll, which is nothing beside the syscalls a poll leads to.
#[derive(Debug)]
pub struct TunnelStream {
    io: Box<dyn StreamIo>,
    // Keeps the stream counted in its link's open streams until it is dropped.
    _count: StreamCount,
}

impl TunnelStream {
    pub(crate) fn new(io: Box<dyn StreamIo>, count: StreamCount) -> Self {
        Self { io, _count: count }
    }

    /// The transport's id of the stream, for logs.
    pub fn id(&self) -> u64 {
        self.io.id()
    }

    /// Waits (at most `timeout`) until the peer has acknowledged everything written before the
    /// shutdown, so that closing the link right after loses no tail. Returns false on timeout
    /// or when the peer stopped reading instead.
    pub async fn delivered(&self, timeout: Duration) -> bool {
        self.io.delivered(timeout).await
    }

    /// Ends the stream abruptly in both directions, so the peer sees an error rather than a
    /// clean end of data. For use after a failure on the other leg of the copy.
    pub fn abort(&mut self) {
        self.io.abort();
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// One count in a link's open streams, held by the stream (or the opening that becomes one).
#[derive(Debug)]
pub(crate) struct StreamCount(watch::Sender<usize>);

impl StreamCount {
    pub(crate) fn new(streams: &watch::Sender<usize>) -> Self {
        streams.send_modify(|n| *n += 1);
        Self(streams.clone())
    }

    /// A count, unless `limit` streams are open already (checked and taken under one lock).
    pub(crate) fn try_new(streams: &watch::Sender<usize>, limit: usize) -> Option<Self> {
        let taken = streams.send_if_modified(|n| {
            let room = *n < limit;
            if room {
                *n += 1;
            }
            room
        });
        taken.then(|| Self(streams.clone()))
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}
