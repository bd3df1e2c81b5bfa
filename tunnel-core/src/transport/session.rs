//! Session handles over any transport: what the server and the agent hold for one agent link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{SessionConfig, TransportKind, TunnelStream, quic};
use crate::error::{OpenError, Refusal, SessionError};
use crate::proto::{self, OpenRequest};
use crate::tls::AgentIdentity;

/// Where a link stands, as its driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Registered and serving.
    Active,
    /// A go-away was sent or received: no new streams.
    Draining {
        /// Why.
        reason: String,
    },
    /// The link is gone.
    Closed {
        /// Why.
        reason: String,
    },
}

/// Requests from handles to the link's driver.
#[derive(Debug)]
pub(crate) enum Command {
    GoAway {
        reason: String,
        drain: Duration,
    },
    /// gRPC: ask the agent to dial.
    Dial(proto::DialRequest),
    /// gRPC: withdraw a dial.
    Cancel(u64),
    /// End the link (gRPC: end the control call).
    Close,
}

/// The driver task of a link; aborted when the last handle goes.
#[derive(Debug)]
pub(crate) struct DriverTask(pub(crate) JoinHandle<()>);

impl Drop for DriverTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The parts every link has, whatever its transport.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) state: watch::Receiver<LinkState>,
    /// Why this side closed the link, for the driver to report.
    pub(crate) local_close: LocalClose,
    /// Streams open on the link (agent: from accept on, dials in progress included).
    pub(crate) streams: watch::Sender<usize>,
    pub(crate) _driver: DriverTask,
}

/// One opening waiting for the agent's answer, in `edge_tunnel_server_pending_dials`; it
/// leaves the gauge however the opening ends, the opener dropping it included.
struct PendingDial(metrics::Gauge);

impl PendingDial {
    fn new(transport: TransportKind) -> Self {
        let gauge =
            metrics::gauge!("edge_tunnel_server_pending_dials", "transport" => transport.as_str());
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for PendingDial {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// One count in a link's open streams, held by the stream (or the dial that becomes one).
#[derive(Debug)]
pub(crate) struct StreamGuard(watch::Sender<usize>);

impl StreamGuard {
    fn new(streams: &watch::Sender<usize>) -> Self {
        streams.send_modify(|n| *n += 1);
        Self(streams.clone())
    }

    /// A count, unless `limit` streams are open already (checked and taken under one lock).
    fn try_new(streams: &watch::Sender<usize>, limit: usize) -> Option<Self> {
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

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Why this side closed a link, for its driver to report.
pub(crate) type LocalClose = Arc<std::sync::Mutex<Option<String>>>;

impl Link {
    /// Starts a link's driver task: `driver` gets the command queue (`capacity` deep), the
    /// state to publish and the slot where handles note why they closed the link.
    pub(crate) fn spawn<F>(
        capacity: usize,
        span: tracing::Span,
        driver: impl FnOnce(mpsc::Receiver<Command>, watch::Sender<LinkState>, LocalClose) -> F,
    ) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        use tracing::Instrument;
        let (commands, rx) = mpsc::channel(capacity);
        let (state_tx, state) = watch::channel(LinkState::Active);
        let local_close = LocalClose::default();
        let task = tokio::spawn(driver(rx, state_tx, local_close.clone()).instrument(span));
        Self {
            commands,
            state,
            local_close,
            streams: watch::Sender::new(0),
            _driver: DriverTask(task),
        }
    }

    /// Why this side closed the link, if it did.
    pub(crate) fn local_reason(local_close: &LocalClose) -> Option<String> {
        local_close
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn go_away(&self, reason: &str, drain: Duration) {
        // A full queue means a go-away is already on its way; a closed one, that the link is gone.
        let _ = self.commands.try_send(Command::GoAway {
            reason: reason.to_owned(),
            drain,
        });
    }

    fn note_close(&self, reason: &str) {
        let mut slot = self
            .local_close
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.get_or_insert_with(|| reason.to_owned());
    }

    fn current(&self) -> LinkState {
        self.state.borrow().clone()
    }

    fn open_streams(&self) -> usize {
        *self.streams.borrow()
    }

    /// Resolves when no stream is open, or the link is closed.
    async fn idle(&self) {
        let mut streams = self.streams.subscribe();
        let mut state = self.state.clone();
        tokio::select! {
            // The sender lives in `self`: this wait ends only by its predicate.
            _ = streams.wait_for(|n| *n == 0) => {}
            _ = state.wait_for(|s| matches!(s, LinkState::Closed { .. })) => {}
        }
    }

    async fn wait_for(&self, pred: impl Fn(&LinkState) -> bool) -> LinkState {
        let mut rx = self.state.clone();
        match rx.wait_for(|s| pred(s)).await {
            Ok(s) => s.clone(),
            Err(_) => LinkState::Closed {
                reason: "driver gone".into(),
            },
        }
    }
}

#[derive(Debug)]
pub(crate) enum ServerConn {
    Quic(quinn::Connection),
    Grpc(super::grpc::GrpcServerConn),
}

#[derive(Debug)]
struct ServerShared {
    id: u64,
    identity: AgentIdentity,
    claims: proto::Register,
    remote: SocketAddr,
    config: Arc<SessionConfig>,
    conn: ServerConn,
    link: Link,
    trace_ids: AtomicU64,
}

/// The server's handle on one agent link. Cheap to clone; the link lives while a handle does.
#[derive(Debug, Clone)]
pub struct ServerSession {
    shared: Arc<ServerShared>,
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

impl ServerSession {
    pub(crate) fn new(
        identity: AgentIdentity,
        claims: proto::Register,
        remote: SocketAddr,
        config: Arc<SessionConfig>,
        conn: ServerConn,
        link: Link,
    ) -> Self {
        let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: Arc::new(ServerShared {
                id,
                identity,
                claims,
                remote,
                config,
                conn,
                link,
                trace_ids: AtomicU64::new(id << 32),
            }),
        }
    }

    /// Unique within this process; tells a replaced session from its successor.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The agent's identity, from its certificate.
    pub fn identity(&self) -> &AgentIdentity {
        &self.shared.identity
    }

    /// What the agent claimed when registering (for logs only; never trusted).
    pub fn claims(&self) -> &proto::Register {
        &self.shared.claims
    }

    /// The agent's address as seen by the server.
    pub fn remote_addr(&self) -> SocketAddr {
        self.shared.remote
    }

    /// The transport of this link.
    pub fn transport(&self) -> TransportKind {
        match self.shared.conn {
            ServerConn::Quic(_) => TransportKind::Quic,
            ServerConn::Grpc(_) => TransportKind::Grpc,
        }
    }

    /// The link's state now.
    pub fn state(&self) -> LinkState {
        self.shared.link.current()
    }

    /// Opens a stream to `request`'s target. Resolves when the agent has answered: with the
    /// stream, or with its typed refusal.
    pub async fn open(&self, request: &OpenRequest) -> Result<TunnelStream, OpenError> {
        match self.shared.link.current() {
            LinkState::Active => {}
            LinkState::Draining { reason } | LinkState::Closed { reason } => {
                return Err(OpenError::SessionClosed(reason));
            }
        }
        let limit = self.shared.config.max_streams;
        let guard = StreamGuard::try_new(&self.shared.link.streams, limit as usize)
            .ok_or(OpenError::Busy(limit))?;
        let _pending = PendingDial::new(self.transport());
        match &self.shared.conn {
            ServerConn::Quic(conn) => quic::open(conn, request, &self.shared.config, guard).await,
            ServerConn::Grpc(conn) => {
                super::grpc::open(
                    conn,
                    &self.shared.link.commands,
                    request,
                    &self.shared.config,
                    guard,
                )
                .await
            }
        }
    }

    /// Streams open on this link now, openings in progress included.
    pub fn open_streams(&self) -> usize {
        self.shared.link.open_streams()
    }

    /// Resolves when no stream is open on this link (at once if none is), or when it closes.
    pub async fn idle(&self) {
        self.shared.link.idle().await;
    }

    /// A fresh trace id for a stream of this session.
    pub fn next_trace_id(&self) -> u64 {
        self.shared.trace_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the agent to move away: no new streams here, existing ones may run for `drain`.
    pub fn go_away(&self, reason: &str, drain: Duration) {
        self.shared.link.go_away(reason, drain);
    }

    /// Closes the link now; open streams fail.
    pub fn close(&self, reason: &str) {
        self.shared.link.note_close(reason);
        match &self.shared.conn {
            ServerConn::Quic(conn) => quic::close(conn, quic::CLOSE_BY_SERVER, reason),
            ServerConn::Grpc(_) => {
                let _ = self.shared.link.commands.try_send(Command::Close);
            }
        }
    }

    /// Resolves when the link is closed, with the reason.
    pub async fn closed(&self) -> String {
        match self
            .shared
            .link
            .wait_for(|s| matches!(s, LinkState::Closed { .. }))
            .await
        {
            LinkState::Closed { reason } => reason,
            other => format!("{other:?}"),
        }
    }
}

#[derive(Debug)]
pub(crate) enum AgentConn {
    Quic {
        conn: quinn::Connection,
        // Owns the UDP socket of this link.
        _endpoint: quinn::Endpoint,
    },
    Grpc {
        client: super::grpc::AgentCalls,
        dials: super::grpc::DialQueue,
    },
}

/// The agent's handle on its link to a server.
#[derive(Debug)]
pub struct AgentSession {
    registered: proto::Registered,
    remote: SocketAddr,
    config: Arc<SessionConfig>,
    conn: AgentConn,
    link: Link,
}

impl AgentSession {
    pub(crate) fn new(
        registered: proto::Registered,
        remote: SocketAddr,
        config: Arc<SessionConfig>,
        conn: AgentConn,
        link: Link,
    ) -> Self {
        Self {
            registered,
            remote,
            config,
            conn,
            link,
        }
    }

    /// The node name the server registered us under (from our certificate).
    pub fn node_name(&self) -> &str {
        &self.registered.node_name
    }

    /// The server replica's id.
    pub fn server_id(&self) -> &str {
        &self.registered.server_id
    }

    /// The server's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The transport of this link.
    pub fn transport(&self) -> TransportKind {
        match self.conn {
            AgentConn::Quic { .. } => TransportKind::Quic,
            AgentConn::Grpc { .. } => TransportKind::Grpc,
        }
    }

    /// The link's state now.
    pub fn state(&self) -> LinkState {
        self.link.current()
    }

    /// Streams open on this link now, dials in progress included.
    pub fn open_streams(&self) -> usize {
        self.link.open_streams()
    }

    /// Resolves when no stream is open on this link (at once if none is), or when it closes.
    pub async fn idle(&self) {
        self.link.idle().await;
    }

    /// The next stream the server opens. Returns quickly: the header is read by
    /// [`IncomingStream::read_request`], so that a slow stream never holds up the others.
    pub async fn accept(&self) -> Result<IncomingStream, SessionError> {
        match &self.conn {
            AgentConn::Quic { conn, .. } => {
                let (send, recv) = conn.accept_bi().await?;
                Ok(IncomingStream {
                    inner: IncomingInner::Quic { send, recv },
                    header_timeout: self.config.header_timeout,
                    guard: StreamGuard::new(&self.link.streams),
                })
            }
            AgentConn::Grpc { client, dials } => {
                let Some((request, ticket)) = dials.lock().await.recv().await else {
                    return Err(SessionError::Io(std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "link closed",
                    )));
                };
                Ok(IncomingStream {
                    inner: IncomingInner::Grpc {
                        request,
                        ticket,
                        client: client.clone(),
                    },
                    header_timeout: self.config.header_timeout,
                    guard: StreamGuard::new(&self.link.streams),
                })
            }
        }
    }

    /// Resolves when the server sent a go-away or the link closed, with the reason.
    pub async fn draining(&self) -> LinkState {
        self.link.wait_for(|s| *s != LinkState::Active).await
    }

    /// Resolves when the link is closed, with the reason.
    pub async fn closed(&self) -> String {
        match self
            .link
            .wait_for(|s| matches!(s, LinkState::Closed { .. }))
            .await
        {
            LinkState::Closed { reason } => reason,
            other => format!("{other:?}"),
        }
    }

    /// Tells the server we are leaving, then closes the link after `drain`... or at once when
    /// `drain` is zero.
    pub fn go_away(&self, reason: &str, drain: Duration) {
        self.link.go_away(reason, drain);
    }

    /// Closes the link now.
    pub fn close(&self, reason: &str) {
        self.link.note_close(reason);
        match &self.conn {
            AgentConn::Quic { conn, .. } => quic::close(conn, quic::CLOSE_BY_AGENT, reason),
            AgentConn::Grpc { .. } => {
                let _ = self.link.commands.try_send(Command::Close);
            }
        }
    }
}

#[derive(Debug)]
enum IncomingInner {
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Grpc {
        request: proto::DialRequest,
        ticket: super::grpc::DialTicket,
        client: super::grpc::AgentCalls,
    },
}

/// A stream the server opened, before its header is read.
#[derive(Debug)]
pub struct IncomingStream {
    inner: IncomingInner,
    header_timeout: Duration,
    guard: StreamGuard,
}

impl IncomingStream {
    /// Reads and validates the stream-open header. A malformed or late header resets the
    /// stream and is reported as an error.
    pub async fn read_request(self) -> Result<RequestedStream, SessionError> {
        match self.inner {
            IncomingInner::Quic { send, recv } => {
                quic::read_request(send, recv, self.header_timeout, self.guard).await
            }
            IncomingInner::Grpc {
                request,
                ticket,
                client,
            } => {
                let open = request
                    .open
                    .ok_or(proto::DecodeError::Invalid("dial without target"))?;
                Ok(RequestedStream {
                    request: OpenRequest::from_proto(open)?,
                    inner: RequestedInner::Grpc {
                        id: request.stream_id,
                        ticket,
                        client,
                    },
                    guard: self.guard,
                })
            }
        }
    }
}

#[derive(Debug)]
pub(crate) enum RequestedInner {
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    Grpc {
        id: u64,
        ticket: super::grpc::DialTicket,
        client: super::grpc::AgentCalls,
    },
}

/// A stream whose target is known; the agent accepts it after dialing, or refuses it.
#[derive(Debug)]
pub struct RequestedStream {
    pub(crate) request: OpenRequest,
    pub(crate) inner: RequestedInner,
    pub(crate) guard: StreamGuard,
}

impl RequestedStream {
    /// What the server asks for.
    pub fn request(&self) -> &OpenRequest {
        &self.request
    }

    /// Resolves when the server has withdrawn this stream before our answer (its client left,
    /// or it gave up waiting), or the link is gone: a dial in progress can stop.
    pub async fn withdrawn(&mut self) {
        match &mut self.inner {
            RequestedInner::Quic { send, .. } => {
                // The server stops reading (or resets) a stream it no longer waits for.
                let _ = send.stopped().await;
            }
            RequestedInner::Grpc { ticket, .. } => ticket.withdrawn().await,
        }
    }

    /// Answers OK; the returned stream carries the proxied bytes.
    pub async fn accept(self) -> Result<TunnelStream, SessionError> {
        let reply = proto::StreamOpenReply {
            result: proto::OpenResult::Ok.into(),
            detail: String::new(),
        };
        match self.inner {
            RequestedInner::Quic { mut send, recv } => {
                quic::write_reply(&mut send, &reply).await?;
                Ok(TunnelStream::quic(send, recv, self.guard))
            }
            RequestedInner::Grpc {
                id,
                mut ticket,
                client,
            } => {
                // The server withdrew the dial (its client left): answer nothing.
                if ticket.is_withdrawn() {
                    return Err(SessionError::Timeout("dial cancelled by the server"));
                }
                let stream = super::grpc::answer(&client, id, reply).await?;
                Ok(TunnelStream::grpc(stream, self.guard))
            }
        }
    }

    /// Answers with a typed refusal and a one-line detail (no secrets: the client may see it).
    pub async fn refuse(self, refusal: Refusal, detail: &str) -> Result<(), SessionError> {
        let reply = proto::StreamOpenReply {
            result: refusal.to_proto().into(),
            detail: detail.chars().take(200).collect(),
        };
        match self.inner {
            RequestedInner::Quic { mut send, recv } => {
                quic::write_reply(&mut send, &reply).await?;
                drop(recv);
                // Finishing (rather than dropping) makes the reply reach the server intact.
                let _ = send.finish();
                Ok(())
            }
            RequestedInner::Grpc { id, client, .. } => {
                let mut stream = super::grpc::answer(&client, id, reply).await?;
                stream.shutdown();
                Ok(())
            }
        }
    }
}
