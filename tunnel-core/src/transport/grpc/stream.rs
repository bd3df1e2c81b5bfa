//! The bytes of one proxied connection over a `Stream` call, and the agent's request ticket.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, PollSender, WaitForCancellationFutureOwned};
use tonic::{Status, Streaming};

use super::Cancels;
use super::service::tunnel_client::TunnelClient;
use crate::proto;
use crate::transport::link::BoxFuture;
use crate::transport::stream::StreamIo;

/// A proxied connection's bytes over one gRPC call.
#[derive(Debug)]
pub(crate) struct GrpcStream {
    pub(crate) id: u64,
    /// `None` once an aborted agent-side call handed it to its request half ([`Abort`]).
    inbound: Option<Streaming<proto::Chunk>>,
    pub(super) pending: Bytes,
    outbound: Outbound,
    read_done: bool,
    /// Cancelled when the link's control call ends: the calls of a closed link must not
    /// outlive it (they share the HTTP/2 connection, which tonic keeps for other links' calls).
    link: CancellationToken,
    /// The same, as a future, polled only where the stream is about to wait: polling it
    /// takes the token's lock, which every stream of the link shares.
    link_closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

/// The agent's way to open `Stream` calls on its link, and the signal that the link ended.
#[derive(Debug, Clone)]
pub(crate) struct AgentCalls {
    pub(super) client: TunnelClient<tonic::transport::Channel>,
    pub(super) closed: CancellationToken,
}

#[derive(Debug)]
pub(super) enum Outbound {
    /// Server side: the response stream of the `Stream` call.
    Response(PollSender<Result<proto::Chunk, Status>>),
    /// Agent side: the request stream of the `Stream` call, and how to abort it.
    Request(PollSender<proto::Chunk>, Arc<Abort>),
}

/// How an agent-side stream aborts its call: the request half sends a `reset` chunk, then
/// waits (a second at most) for the server to end its half before it ends its own, so that
/// the call ends without an HTTP/2 reset. A reset would do harm: h2 drops data frames still
/// queued when a stream is reset (the `reset` chunk among them), and a server reads a
/// cancelled request body as a clean end (hyper turns RST_STREAM(CANCEL) into end of stream).
#[derive(Debug, Default)]
pub(super) struct Abort {
    requested: AtomicBool,
    /// The stream's response half, handed over at the abort.
    inbound: Mutex<Option<Box<Streaming<proto::Chunk>>>>,
}

/// How long an aborted call waits for the server's end before it ends its own half anyway
/// (an older server does not know the `reset` chunk and ends nothing).
const ABORT_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum Chunks {
    Open,
    /// The `reset` chunk is out; the server's half is read to its end, and discarded.
    Aborting {
        inbound: Option<Box<Streaming<proto::Chunk>>>,
        deadline: Pin<Box<tokio::time::Sleep>>,
    },
    Ended,
}

/// The agent's half of a `Stream` call: the chunks the stream writes, then its end; or, once
/// aborted, a `reset` chunk and the end. The abort is checked on every poll: an abort while
/// the queue is full (the call is polled again as soon as it can send) takes effect then,
/// ahead of the chunks still queued.
#[derive(Debug)]
pub(super) struct RequestChunks {
    rx: mpsc::Receiver<proto::Chunk>,
    abort: Arc<Abort>,
    state: Chunks,
}

impl RequestChunks {
    pub(super) fn new(rx: mpsc::Receiver<proto::Chunk>, abort: Arc<Abort>) -> Self {
        Self {
            rx,
            abort,
            state: Chunks::Open,
        }
    }
}

impl Stream for RequestChunks {
    type Item = proto::Chunk;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match &mut this.state {
            Chunks::Ended => Poll::Ready(None),
            Chunks::Open if this.abort.requested.load(Ordering::Acquire) => {
                let inbound = this
                    .abort
                    .inbound
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                this.state = Chunks::Aborting {
                    inbound,
                    deadline: Box::pin(tokio::time::sleep(ABORT_WAIT)),
                };
                Poll::Ready(Some(proto::Chunk {
                    reset: true,
                    ..proto::Chunk::default()
                }))
            }
            Chunks::Open => this.rx.poll_recv(cx),
            Chunks::Aborting { inbound, deadline } => {
                if deadline.as_mut().poll(cx).is_ready() {
                    this.state = Chunks::Ended;
                    return Poll::Ready(None);
                }
                while let Some(half) = inbound {
                    match Pin::new(&mut **half).poll_next(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(_)) | None) => *inbound = None,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                this.state = Chunks::Ended;
                Poll::Ready(None)
            }
        }
    }
}

impl GrpcStream {
    pub(super) fn new(
        id: u64,
        inbound: Streaming<proto::Chunk>,
        outbound: Outbound,
        closed: &CancellationToken,
    ) -> Self {
        Self {
            id,
            inbound: Some(inbound),
            pending: Bytes::new(),
            outbound,
            read_done: false,
            link: closed.clone(),
            link_closed: Box::pin(closed.clone().cancelled_owned()),
        }
    }

    /// Aborts the stream when its link has ended; before waiting, also arranges to be woken
    /// when it does (`waiting`).
    fn check_link(&mut self, cx: &mut Context<'_>, waiting: bool) -> std::io::Result<()> {
        let ended = if waiting {
            self.link_closed.as_mut().poll(cx).is_ready()
        } else {
            self.link.is_cancelled()
        };
        if ended {
            self.abort_outbound();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "tunnel link closed",
            ));
        }
        Ok(())
    }

    fn abort_outbound(&mut self) {
        match &mut self.outbound {
            Outbound::Response(tx) => {
                if let Some(tx) = tx.get_ref() {
                    let _ = tx.try_send(Err(Status::aborted("peer connection failed")));
                }
                tx.close();
            }
            Outbound::Request(tx, abort) => {
                if let Some(inbound) = self.inbound.take() {
                    *abort.inbound.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(Box::new(inbound));
                }
                abort.requested.store(true, Ordering::Release);
                // Wakes the call if it waits for a chunk; a full queue means it is about to
                // be polled anyway.
                if let Some(sender) = tx.get_ref() {
                    let _ = sender.try_send(proto::Chunk::default());
                }
                tx.close();
            }
        }
    }

    fn read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if self.read_done {
                return Poll::Ready(Ok(()));
            }
            let Some(inbound) = self.inbound.as_mut() else {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "stream aborted",
                )));
            };
            match Pin::new(inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) if chunk.reset => {
                    self.abort_outbound();
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "the agent reset the stream",
                    )));
                }
                Poll::Ready(Some(Ok(chunk))) => self.pending = chunk.data,
                Poll::Ready(Some(Err(status))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        status.message().to_owned(),
                    )));
                }
                // The call ended with the link: a cut, however cleanly the peer ended its half.
                Poll::Ready(None) => {
                    self.check_link(cx, false)?;
                    self.read_done = true;
                }
                // Everything that arrived has been read; only now may a closed link end the
                // stream, so that a retired link's last bytes are not thrown away.
                Poll::Pending => {
                    self.check_link(cx, true)?;
                    return Poll::Pending;
                }
            }
        }
    }

    fn write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.check_link(cx, false)?;
        let closed = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        // Reserve first: a chunk copied before a full queue would be copied again on the retry.
        let reserved = match &mut self.outbound {
            Outbound::Response(tx) => tx.poll_reserve(cx).map(|r| r.is_ok()),
            Outbound::Request(tx, _) => tx.poll_reserve(cx).map(|r| r.is_ok()),
        };
        if reserved.is_pending() {
            self.check_link(cx, true)?;
            return Poll::Pending;
        }
        if reserved == Poll::Ready(false) {
            return Poll::Ready(Err(closed()));
        }
        let chunk = proto::Chunk {
            data: Bytes::copy_from_slice(buf),
            ..proto::Chunk::default()
        };
        let sent = match &mut self.outbound {
            Outbound::Response(tx) => tx.send_item(Ok(chunk)).is_ok(),
            Outbound::Request(tx, _) => tx.send_item(chunk).is_ok(),
        };
        if !sent {
            return Poll::Ready(Err(closed()));
        }
        Poll::Ready(Ok(buf.len()))
    }

    pub(crate) fn shutdown(&mut self) {
        match &mut self.outbound {
            Outbound::Response(tx) => tx.close(),
            Outbound::Request(tx, _) => tx.close(),
        }
    }
}

impl StreamIo for GrpcStream {
    fn id(&self) -> u64 {
        self.id
    }

    fn abort(&mut self) {
        self.abort_outbound();
    }

    // HTTP/2 acknowledges nothing per stream; the connection outlives the call.
    fn delivered(&self, _timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(true))
    }
}

impl AsyncRead for GrpcStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().read(cx, buf)
    }
}

impl AsyncWrite for GrpcStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().shutdown();
        Poll::Ready(Ok(()))
    }
}

/// The agent's claim on one stream request: tells whether the server withdrew it, and frees
/// its slot in the cancel table when dropped (answered, refused or abandoned).
#[derive(Debug)]
pub(crate) struct RequestTicket {
    id: u64,
    cancelled: oneshot::Receiver<()>,
    /// The receiver has resolved (a oneshot must not be polled again after that).
    done: bool,
    cancels: Cancels,
}

impl RequestTicket {
    pub(super) fn new(id: u64, cancelled: oneshot::Receiver<()>, cancels: Cancels) -> Self {
        Self {
            id,
            cancelled,
            done: false,
            cancels,
        }
    }

    /// True when the server withdrew the request or the link is gone.
    pub(crate) fn is_withdrawn(&mut self) -> bool {
        if !self.done {
            self.done = !matches!(
                self.cancelled.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            );
        }
        self.done
    }

    /// Resolves when the server withdraws the request or the link goes.
    pub(crate) async fn withdrawn(&mut self) {
        if !self.done {
            let _ = (&mut self.cancelled).await;
            self.done = true;
        }
    }
}

impl Drop for RequestTicket {
    fn drop(&mut self) {
        self.cancels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}
