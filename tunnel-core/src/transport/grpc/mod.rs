//! The gRPC transport (tonic over HTTP/2 and TLS/TCP), for networks that block UDP.
//!
//! The agent holds one long-lived `Control` call; the server sends a `DialRequest` on it; the
//! agent dials and answers by opening a `Stream` call whose metadata carries the stream id and
//! whose first chunk carries the typed answer. The server pairs the call with the waiting
//! opener. Each proxied connection is one HTTP/2 stream with its own flow control; nothing is
//! multiplexed inside a call.

mod agent;
pub(crate) mod codec;
mod server;
mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::{debug, info};

use super::LinkState;
use super::session::{Command, Link, LocalClose};
use crate::control::{Control, ControlError, Event};
use crate::error::SessionError;
use crate::proto;

pub use agent::GrpcConnector;
pub(crate) use agent::{DialQueue, answer};
pub use server::GrpcListener;
pub(crate) use server::{GrpcServerConn, open};
pub(crate) use stream::{AgentCalls, DialTicket, GrpcStream};

/// Metadata key of a `Stream` call: which dial it answers.
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

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The control call's messages, in and out, for either side.
struct ControlIo {
    inbound: Streaming<proto::Control>,
    out: Out,
    send_timeout: Duration,
}

enum Out {
    Server(mpsc::Sender<Result<proto::Control, Status>>),
    Agent(mpsc::Sender<proto::Control>),
}

impl ControlIo {
    async fn flush(&mut self, control: &mut Control) -> Result<(), SessionError> {
        while let Some(msg) = control.poll_transmit() {
            let sent = match &self.out {
                Out::Server(tx) => tokio::time::timeout(self.send_timeout, tx.send(Ok(msg)))
                    .await
                    .map(|r| r.is_ok()),
                Out::Agent(tx) => tokio::time::timeout(self.send_timeout, tx.send(msg))
                    .await
                    .map(|r| r.is_ok()),
            };
            match sent {
                Ok(true) => {}
                Ok(false) => {
                    return Err(SessionError::Io(std::io::Error::from(
                        std::io::ErrorKind::BrokenPipe,
                    )));
                }
                Err(_) => return Err(SessionError::Timeout("control send")),
            }
        }
        Ok(())
    }

    async fn read(&mut self) -> Result<proto::Control, SessionError> {
        match self.inbound.message().await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(SessionError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "control call ended",
            ))),
            Err(status) => Err(SessionError::Io(std::io::Error::other(
                status.message().to_owned(),
            ))),
        }
    }

    async fn until_event(&mut self, control: &mut Control) -> Result<Event, SessionError> {
        loop {
            self.flush(control).await?;
            if let Some(ev) = control.poll_event() {
                return Ok(ev);
            }
            let deadline = control.poll_timeout();
            tokio::select! {
                m = self.read() => control.handle_message(now(), m?)?,
                () = sleep_until(deadline) => control.handle_timeout(now())?,
            }
        }
    }
}

type Cancels = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// Where the agent's driver hands dial requests, and how it withdraws them.
#[derive(Clone)]
struct AgentDials {
    dials: mpsc::Sender<(proto::DialRequest, DialTicket)>,
    /// Dials not yet answered, by stream id; each entry leaves with its [`DialTicket`]. At most
    /// [`MAX_OUTSTANDING_DIALS`].
    cancels: Cancels,
}

/// Agent side: more unanswered dials than this is a server gone wrong, and ends the link. A
/// bound on memory (about 100 bytes each), not the stream limit: over gRPC the server's
/// `max_streams` governs, and an agent configured lower must not drop its link for it.
pub(crate) const MAX_OUTSTANDING_DIALS: usize = 65_536;

fn spawn_driver(
    control: Control,
    io: ControlIo,
    agent: Option<AgentDials>,
    closed: CancellationToken,
    commands_capacity: usize,
    span: tracing::Span,
) -> Link {
    Link::spawn(
        commands_capacity,
        span,
        |rx, state, local_close| async move {
            // Dropped with the driver, aborted or not: the link's calls end with it.
            let _cancel = closed.drop_guard();
            drive(control, io, rx, state, agent, local_close).await;
        },
    )
}

async fn drive(
    mut control: Control,
    mut io: ControlIo,
    mut commands: mpsc::Receiver<Command>,
    state: watch::Sender<LinkState>,
    agent: Option<AgentDials>,
    local_close: LocalClose,
) {
    let result: Result<(), SessionError> = async {
        loop {
            io.flush(&mut control).await?;
            while let Some(ev) = control.poll_event() {
                match (ev, &agent) {
                    (Event::GoAway { reason, drain }, _) => {
                        info!(%reason, ?drain, "peer sent go-away");
                        state.send_replace(LinkState::Draining { reason });
                    }
                    (Event::Dial(request), Some(a)) => {
                        let (tx, rx) = oneshot::channel();
                        {
                            let mut cancels =
                                a.cancels.lock().unwrap_or_else(PoisonError::into_inner);
                            // More dials outstanding than streams allowed, or an id reused
                            // while its dial is open: the server breaks the protocol.
                            if cancels.len() >= MAX_OUTSTANDING_DIALS
                                || cancels.contains_key(&request.stream_id)
                            {
                                return Err(SessionError::Protocol(ControlError::Flood));
                            }
                            cancels.insert(request.stream_id, tx);
                        }
                        let ticket = DialTicket {
                            id: request.stream_id,
                            cancelled: rx,
                            done: false,
                            cancels: a.cancels.clone(),
                        };
                        // Bounded by `limit` above, so a full queue cannot happen; still no
                        // blocking of the driver if it did.
                        if a.dials.try_send((request, ticket)).is_err() {
                            return Err(SessionError::Protocol(ControlError::Flood));
                        }
                    }
                    (Event::Cancel(id), Some(a)) => {
                        if let Some(tx) = a
                            .cancels
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&id)
                        {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
            }
            let deadline = control.poll_timeout();
            tokio::select! {
                m = io.read() => control.handle_message(now(), m?)?,
                () = sleep_until(deadline) => control.handle_timeout(now())?,
                cmd = commands.recv() => match cmd {
                    Some(Command::GoAway { reason, drain }) => {
                        control.go_away(reason.clone(), drain);
                        state.send_replace(LinkState::Draining { reason });
                    }
                    Some(Command::Dial(request)) => control.dial(request)?,
                    Some(Command::Cancel(id)) => control.cancel(id),
                    Some(Command::Close) | None => return Ok(()),
                },
            }
        }
    }
    .await;
    let reason = match (result, Link::local_reason(&local_close)) {
        (_, Some(local)) => local,
        (Ok(()), None) => "closed".to_owned(),
        (Err(e), None) => e.to_string(),
    };
    debug!(%reason, "link ended");
    // Dials not yet answered are withdrawn with the link: their tickets see the senders go.
    if let Some(a) = &agent {
        a.cancels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
    state.send_replace(LinkState::Closed { reason });
}
