//! What the HTTP front wraps around hyper's two connections of an exchange, so that an end
//! keeps its meaning across the proxy: the client's socket resets when the tunnel cut its
//! answer (a FIN would pass a cut log or download for a whole one), the tunnel stream resets
//! when the client's request body stalled, and a stalled body ends after a bounded idle time
//! instead of holding one of the node's streams for the copy's hour.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tunnel_core::TunnelStream;

/// A flag shared by a connection and what decides how it must end: set, the connection ends
/// with a reset when it goes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cut(Arc<AtomicBool>);

impl Cut {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub(crate) fn clear(&self) {
        self.0.store(false, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The client's TCP connection, as hyper's server (and after an upgrade, the copy) uses it.
/// Dropped while its [`Cut`] is set, it closes with SO_LINGER 0: the client reads a reset.
#[derive(Debug)]
pub(crate) struct ClientIo {
    tcp: TcpStream,
    cut: Cut,
}

impl ClientIo {
    pub(crate) fn new(tcp: TcpStream, cut: Cut) -> Self {
        Self { tcp, cut }
    }

    /// The flag that decides how this connection ends.
    pub(crate) fn cut(&self) -> &Cut {
        &self.cut
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if self.cut.is_set() {
            // Fails only on a socket already gone, which sent what it could.
            let _ = self.tcp.set_zero_linger();
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// An upstream response body: when it fails (the tunnel stream reset, the link lost), it sets
/// the client connection's [`Cut`] before hyper hears of it, so that the connection hyper then
/// drops ends with a reset.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    inner: Incoming,
    cut: Cut,
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, cut: Cut) -> Self {
        Self { inner, cut }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Err(_)) = &frame {
            this.cut.set();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a client's request body did not reach the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestBodyError {
    #[error("request body stalled: no data for {0:?}")]
    Stalled(Duration),
    #[error("request body: {0}")]
    Client(#[source] hyper::Error),
}

/// A client's request body on its way upstream, with an idle timeout between frames: a body
/// that stops for longer fails, and the tunnel stream it was going to is reset (its [`Cut`]).
#[derive(Debug)]
pub(crate) struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    /// Armed at the first wait for the client, re-armed at the first wait after each frame.
    idle: Option<Pin<Box<Sleep>>>,
    /// A frame went out since the timer was armed: the next wait starts it afresh. Counted
    /// from the wait, not from the frame, so that time spent with the upstream not taking
    /// the body (its flow control) never counts as the client's stall.
    rearm: bool,
    upstream: Cut,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, timeout: Duration, upstream: Cut) -> Self {
        Self {
            inner,
            timeout,
            idle: None,
            rearm: false,
            upstream,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.rearm = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.upstream.set();
                Poll::Ready(Some(Err(RequestBodyError::Client(e))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.timeout;
                let idle = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if std::mem::take(&mut this.rearm) {
                    idle.as_mut().reset(Instant::now() + timeout);
                }
                ready!(idle.as_mut().poll(cx));
                // Set before hyper's client sees the error and drops the stream.
                this.upstream.set();
                Poll::Ready(Some(Err(RequestBodyError::Stalled(timeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The stall behind a failed upstream request, if a stall it was.
pub(crate) fn stalled(err: &hyper::Error) -> Option<Duration> {
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(RequestBodyError::Stalled(t)) = e.downcast_ref() {
            return Some(*t);
        }
        source = e.source();
    }
    None
}

/// A tunnel stream under hyper's client. Dropped while its [`Cut`] is set, it resets the
/// stream, so that the agent drops its side at once rather than reading a clean end.
#[derive(Debug)]
pub(crate) struct UpstreamIo {
    pub(crate) stream: TunnelStream,
    cut: Cut,
}

impl UpstreamIo {
    pub(crate) fn new(stream: TunnelStream, cut: Cut) -> Self {
        Self { stream, cut }
    }
}

impl Drop for UpstreamIo {
    fn drop(&mut self) {
        if self.cut.is_set() {
            self.stream.abort();
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
