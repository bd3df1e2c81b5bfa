//! The bytes of one proxied connection over a `Stream` call, and the agent's request ticket.

use std::future::Future;
use std::pin::Pin;
use std::sync::PoisonError;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
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
    inbound: Streaming<proto::Chunk>,
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
    /// Agent side: the request stream of the `Stream` call.
    Request(PollSender<proto::Chunk>),
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
            inbound,
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
            Outbound::Request(tx) => tx.close(),
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
            match Pin::new(&mut self.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.pending = chunk.data,
                Poll::Ready(Some(Err(status))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        status.message().to_owned(),
                    )));
                }
                Poll::Ready(None) => self.read_done = true,
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
            Outbound::Request(tx) => tx.poll_reserve(cx).map(|r| r.is_ok()),
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
            reply: None,
        };
        let sent = match &mut self.outbound {
            Outbound::Response(tx) => tx.send_item(Ok(chunk)).is_ok(),
            Outbound::Request(tx) => tx.send_item(chunk).is_ok(),
        };
        if !sent {
            return Poll::Ready(Err(closed()));
        }
        Poll::Ready(Ok(buf.len()))
    }

    pub(crate) fn shutdown(&mut self) {
        match &mut self.outbound {
            Outbound::Response(tx) => tx.close(),
            Outbound::Request(tx) => tx.close(),
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
