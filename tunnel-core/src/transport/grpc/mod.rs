//! The gRPC transport (tonic over HTTP/2 and TLS/TCP), for networks that block UDP.
//!
//! The agent holds one long-lived `Control` call, the link's control channel; to open a stream
//! the server sends a `StreamRequest` on it; the agent dials the target and answers by opening
//! a `Stream` call whose metadata carries the stream id and whose first chunk carries the typed
//! answer. The server pairs the call with the waiting
//! opener. Each proxied connection is one HTTP/2 stream with its own flow control; nothing is
//! multiplexed inside a call.

mod agent;
pub(crate) mod codec;
mod server;
pub mod service;
mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Status, Streaming};
use tracing::debug;

use super::link::ControlChannel;
use crate::control::ControlError;
use crate::error::{CloseCause, CloseReason, Initiator, tls_error_in, tls_refusal};
use crate::proto;

pub(crate) use agent::GrpcConnector;
pub use server::GrpcListener;
use stream::RequestTicket;

/// Metadata key of a `Stream` call: which stream request it answers.
pub const STREAM_ID_KEY: &str = "x-edge-tunnel-stream-id";
/// ALPN of the gRPC transport.
pub const ALPN_H2: &[u8] = b"h2";

/// Items queued per direction of a proxied connection, each at most one copy-loop chunk: up
/// to 512 KiB per direction of a busy stream, in addition to HTTP/2's stream window.
const CHUNKS_IN_FLIGHT: usize = 8;

/// HTTP/2 frame size each side announces: above a chunk of the copy loop (64 KiB) plus its
/// gRPC and protobuf headers, so that a chunk leaves in one DATA frame, which TLS seals in one
/// write of several records. At the protocol's default (16 KiB) a chunk took several frames
/// whose records straddled the frame boundaries, and a `writev` per record.
const GRPC_MAX_FRAME: u32 = 128 * 1024;

/// What rustls may hold of sealed records not yet written. At its default (64 KiB) a frame of
/// one 64 KiB chunk did not fit whole, and its last bytes took a second `writev` each time.
/// Nothing waits in it here: each write is flushed to the socket before the next is taken.
const TLS_SEND_LIMIT: usize = 256 * 1024;

/// How long a side that closes waits for the peer to end its half of the control call, so
/// that its `Close` message is read rather than cut by a reset.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The `Control` call's messages, in and out, for either side: the link's control channel.
struct GrpcControl {
    inbound: Streaming<proto::Control>,
    /// `None` once this side has ended its half.
    out: Option<Out>,
    send_timeout: Duration,
    /// Agent side: where the server's stream requests go.
    requests: Option<Requests>,
    /// Cancelled when the link ends (at the start of `finish`, or when the driver is dropped):
    /// the link's `Stream` calls end with it (they share an HTTP/2 connection that may
    /// outlive the link), as cut streams.
    closed: CancellationToken,
    _closed: DropGuard,
}

enum Out {
    Server(mpsc::Sender<Result<proto::Control, Status>>),
    Agent(mpsc::Sender<proto::Control>),
}

impl GrpcControl {
    fn new(
        inbound: Streaming<proto::Control>,
        out: Out,
        send_timeout: Duration,
        requests: Option<Requests>,
        closed: &CancellationToken,
    ) -> Self {
        Self {
            inbound,
            out: Some(out),
            send_timeout,
            requests,
            closed: closed.clone(),
            _closed: closed.clone().drop_guard(),
        }
    }
}

impl ControlChannel for GrpcControl {
    const CLOSE_MESSAGE: bool = true;

    async fn send(&mut self, msg: proto::Control) -> Result<(), CloseReason> {
        let sent = match &self.out {
            Some(Out::Server(tx)) => tokio::time::timeout(self.send_timeout, tx.send(Ok(msg)))
                .await
                .map(|r| r.is_ok()),
            Some(Out::Agent(tx)) => tokio::time::timeout(self.send_timeout, tx.send(msg))
                .await
                .map(|r| r.is_ok()),
            None => Ok(false),
        };
        match sent {
            Ok(true) => Ok(()),
            Ok(false) => {
                Err(CloseReason::remote(CloseCause::Transport).with_detail("control call ended"))
            }
            // The peer reads nothing: as dead as one that answers no ping.
            Err(_) => Err(CloseReason::local(CloseCause::PingDeadline)
                .with_detail("control message not taken within the ping timeout")),
        }
    }

    async fn recv(&mut self) -> Result<proto::Control, CloseReason> {
        match self.inbound.message().await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => {
                Err(CloseReason::remote(CloseCause::Transport).with_detail("control call ended"))
            }
            Err(status) => Err(status_reason(status)),
        }
    }

    fn stream_requested(&mut self, request: proto::StreamRequest) -> Result<(), CloseReason> {
        match &self.requests {
            Some(requests) => requests.push(request),
            None => Err(ControlError::Unexpected {
                message: "stream-request",
                state: "server",
            }
            .into()),
        }
    }

    fn stream_cancelled(&mut self, stream_id: u64) {
        if let Some(requests) = &self.requests {
            requests.cancel(stream_id);
        }
    }

    async fn finish(&mut self, reason: &CloseReason) {
        // The link's streams are cut now, before the peer can react to our end: a peer that
        // ends its halves of them cleanly must not make them look finished.
        self.closed.cancel();
        // Ending our half lets the peer's driver end too.
        self.out = None;
        if reason.initiator == Initiator::Local {
            let _ = tokio::time::timeout(CLOSE_WAIT, async {
                while let Ok(Some(_)) = self.inbound.message().await {}
            })
            .await;
        }
        // Requests not yet answered are withdrawn with the link: their tickets see the senders go.
        if let Some(requests) = &self.requests {
            requests.clear();
        }
        debug!(%reason, "grpc link ended");
    }
}

/// A gRPC status as a typed reason. A TLS failure anywhere in its chain is a refusal (the
/// peer's when it sent the alert); otherwise the code says whose fault it was.
fn status_reason(status: Status) -> CloseReason {
    use tonic::Code;
    if let Some(tls) = tls_error_in(&status) {
        let reason = match tls_refusal(tls) {
            Some(Initiator::Remote) => CloseReason::remote(CloseCause::Refused),
            Some(Initiator::Local) => CloseReason::local(CloseCause::Refused),
            None => CloseReason::local(CloseCause::Protocol),
        };
        return reason.with_source(status);
    }
    if let Some(lost) = connection_lost(&status) {
        return CloseReason::remote(CloseCause::Transport).with_source(lost);
    }
    let cause = match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => CloseCause::Refused,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Internal => CloseCause::Protocol,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::NotFound
        | Code::AlreadyExists
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Unavailable => CloseCause::Transport,
    };
    CloseReason::remote(cause).with_source(status)
}

/// The connection under a call ended under it: said in words an operator reads, not as the h2
/// error that carried it.
#[derive(Debug, thiserror::Error)]
enum ConnectionLost {
    #[error("the connection ended without a goodbye (the peer died, or the path was cut)")]
    Ended,
    #[error("connection reset by the peer")]
    Reset,
    #[error("connection error: {0}")]
    Other(String),
}

/// The I/O failure under `status`, if that is what ended the call.
fn connection_lost(status: &Status) -> Option<ConnectionLost> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(error) = cause {
        // h2 keeps its I/O error to itself (no `source`).
        let io = error.downcast_ref::<std::io::Error>().or_else(|| {
            error
                .downcast_ref::<h2::Error>()
                .and_then(h2::Error::get_io)
        });
        if let Some(io) = io {
            use std::io::ErrorKind as K;
            return Some(match io.kind() {
                K::UnexpectedEof => ConnectionLost::Ended,
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ConnectionLost::Reset,
                _ => ConnectionLost::Other(io.to_string()),
            });
        }
        cause = error.source();
    }
    None
}

type Cancels = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// Agent side: where the driver hands the server's stream requests, and how it withdraws them.
#[derive(Clone)]
struct Requests {
    queue: mpsc::Sender<(proto::StreamRequest, RequestTicket)>,
    /// Requests not yet answered, by stream id; each entry leaves with its [`RequestTicket`].
    /// At most [`MAX_OUTSTANDING_REQUESTS`].
    cancels: Cancels,
}

/// Agent side: more unanswered requests than this is a server gone wrong, and ends the link. A
/// bound on memory (about 100 bytes each), not the stream limit: over gRPC the server's
/// `max_streams` governs, and an agent configured lower must not drop its link for it.
const MAX_OUTSTANDING_REQUESTS: usize = 65_536;

impl Requests {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<()>>> {
        self.cancels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, request: proto::StreamRequest) -> Result<(), CloseReason> {
        let (tx, rx) = oneshot::channel();
        {
            let mut cancels = self.lock();
            // More requests outstanding than allowed, or an id reused while its request is
            // open: the server breaks the protocol.
            if cancels.len() >= MAX_OUTSTANDING_REQUESTS || cancels.contains_key(&request.stream_id)
            {
                return Err(ControlError::Flood.into());
            }
            cancels.insert(request.stream_id, tx);
        }
        let ticket = RequestTicket::new(request.stream_id, rx, self.cancels.clone());
        // The queue holds as many as the table: a full queue cannot happen; still no blocking
        // of the driver if it did.
        self.queue
            .try_send((request, ticket))
            .map_err(|_| ControlError::Flood.into())
    }

    fn cancel(&self, stream_id: u64) {
        if let Some(tx) = self.lock().remove(&stream_id) {
            let _ = tx.send(());
        }
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_io(kind: std::io::ErrorKind) -> Status {
        let mut status = Status::unknown("h2 protocol error: error reading a body from connection");
        status.set_source(Arc::new(std::io::Error::from(kind)));
        status
    }

    #[test]
    fn a_dead_peer_reads_as_a_lost_connection_not_an_h2_error() {
        let reason = status_reason(with_io(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(reason.cause, CloseCause::Transport);
        assert_eq!(
            reason.to_string(),
            "transport error by the peer: the connection ended without a goodbye (the peer died, or the path was cut)"
        );
        let reason = status_reason(with_io(std::io::ErrorKind::ConnectionReset));
        assert!(
            reason.to_string().ends_with("connection reset by the peer"),
            "{reason}"
        );
        // Without an I/O error underneath, the status speaks for itself.
        let reason = status_reason(Status::internal("bad frame"));
        assert_eq!(reason.cause, CloseCause::Protocol);
    }
}
