//! The gRPC transport (tonic over HTTP/2 and TLS/TCP), for networks that block UDP.
//!
//! The agent holds one long-lived `Control` call; the server sends a `DialRequest` on it; the
//! agent dials and answers by opening a `Stream` call whose metadata carries the stream id and
//! whose first chunk carries the typed answer. The server pairs the call with the waiting
//! opener. Each proxied connection is one HTTP/2 stream with its own flow control; nothing is
//! multiplexed inside a call.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, PollSender, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, debug_span, info, warn};

use super::session::{Command, DriverTask, Link};
use super::{LinkState, SessionConfig};
use crate::control::{Control, ControlError, Event};
use crate::error::SessionError;
use crate::proto::{
    self,
    tunnel_client::TunnelClient,
    tunnel_server::{Tunnel, TunnelServer},
};
use crate::tls::AgentIdentity;

/// Metadata key of a `Stream` call: which dial it answers.
pub const STREAM_ID_KEY: &str = "x-edge-tunnel-stream-id";
/// ALPN of the gRPC transport.
pub const ALPN_H2: &[u8] = b"h2";

/// Items queued per direction of a proxied connection (each at most one copy-buffer chunk).
const CHUNKS_IN_FLIGHT: usize = 8;

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// A TLS connection from an agent, with the identity its certificate proves.
pub(crate) struct PeerIo {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

/// What tonic hands each call about its connection.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    identity: Result<AgentIdentity, crate::tls::IdentityError>,
    remote: SocketAddr,
}

impl tonic::transport::server::Connected for PeerIo {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A proxied connection's bytes over one gRPC call.
#[derive(Debug)]
pub(crate) struct GrpcStream {
    pub(crate) id: u64,
    inbound: Streaming<proto::Chunk>,
    pending: Bytes,
    outbound: Outbound,
    read_done: bool,
    /// Fires when the link's control call ends: the calls of a closed link must not outlive
    /// it (they share the HTTP/2 connection, which tonic keeps for other links' calls too).
    link_closed: Pin<Box<WaitForCancellationFutureOwned>>,
}

/// The agent's way to open `Stream` calls on its link, and the signal that the link ended.
#[derive(Debug, Clone)]
pub(crate) struct AgentCalls {
    client: TunnelClient<tonic::transport::Channel>,
    closed: CancellationToken,
}

#[derive(Debug)]
enum Outbound {
    /// Server side: the response stream of the `Stream` call.
    Response(PollSender<Result<proto::Chunk, Status>>),
    /// Agent side: the request stream of the `Stream` call.
    Request(PollSender<proto::Chunk>),
}

impl GrpcStream {
    fn new(
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
            link_closed: Box::pin(closed.clone().cancelled_owned()),
        }
    }

    /// Aborts the stream when its link has ended.
    fn check_link(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if self.link_closed.as_mut().poll(cx).is_ready() {
            self.abort();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "tunnel link closed",
            ));
        }
        Ok(())
    }

    pub(crate) fn abort(&mut self) {
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

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check_link(cx)?;
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
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check_link(cx)?;
        let closed = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let chunk = proto::Chunk {
            data: Bytes::copy_from_slice(buf),
            reply: None,
        };
        match &mut self.outbound {
            Outbound::Response(tx) => {
                std::task::ready!(tx.poll_reserve(cx)).map_err(|_| closed())?;
                tx.send_item(Ok(chunk)).map_err(|_| closed())?;
            }
            Outbound::Request(tx) => {
                std::task::ready!(tx.poll_reserve(cx)).map_err(|_| closed())?;
                tx.send_item(chunk).map_err(|_| closed())?;
            }
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

/// A dial waiting for its `Stream` call.
struct Paired {
    reply: proto::StreamOpenReply,
    stream: GrpcStream,
}

/// A dial's waiting opener, and its link's end signal (the paired call must end with the link).
type Waiter = (oneshot::Sender<Paired>, CancellationToken);

#[derive(Default)]
struct Pending {
    waiting: Mutex<HashMap<(String, u64), Waiter>>,
}

impl Pending {
    fn insert(
        &self,
        node: &str,
        id: u64,
        link_closed: CancellationToken,
    ) -> oneshot::Receiver<Paired> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert((node.to_owned(), id), (tx, link_closed));
        rx
    }
    fn take(&self, node: &str, id: u64) -> Option<Waiter> {
        self.lock().remove(&(node.to_owned(), id))
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u64), Waiter>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// Dials not yet answered, by stream id; each entry leaves with its [`DialTicket`].
    cancels: Cancels,
    /// The most dials the server may have outstanding at once (its stream limit).
    limit: usize,
}

/// The agent's claim on one dial: tells whether the server withdrew it, and frees its slot
/// in the cancel table when dropped (answered, refused or abandoned).
#[derive(Debug)]
pub(crate) struct DialTicket {
    id: u64,
    cancelled: oneshot::Receiver<()>,
    /// The receiver has resolved (a oneshot must not be polled again after that).
    done: bool,
    cancels: Cancels,
}

impl DialTicket {
    /// True when the server withdrew the dial or the link is gone.
    pub(crate) fn is_withdrawn(&mut self) -> bool {
        if !self.done {
            self.done = !matches!(
                self.cancelled.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            );
        }
        self.done
    }

    /// Resolves when the server withdraws the dial or the link goes.
    pub(crate) async fn withdrawn(&mut self) {
        if !self.done {
            let _ = (&mut self.cancelled).await;
            self.done = true;
        }
    }
}

impl Drop for DialTicket {
    fn drop(&mut self) {
        self.cancels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

fn spawn_driver(
    control: Control,
    io: ControlIo,
    agent: Option<AgentDials>,
    closed: CancellationToken,
    span: tracing::Span,
) -> Link {
    let (commands, rx) = mpsc::channel(64);
    let (state_tx, state) = watch::channel(LinkState::Active);
    let local_close = Arc::new(Mutex::new(None));
    let driver = drive(control, io, rx, state_tx, agent, local_close.clone());
    let task = tokio::spawn(
        async move {
            // Dropped with the driver, aborted or not: the link's calls end with it.
            let _cancel = closed.drop_guard();
            driver.await;
        }
        .instrument(span),
    );
    Link {
        commands,
        state,
        local_close,
        streams: watch::Sender::new(0),
        _driver: DriverTask(task),
    }
}

async fn drive(
    mut control: Control,
    mut io: ControlIo,
    mut commands: mpsc::Receiver<Command>,
    state: watch::Sender<LinkState>,
    agent: Option<AgentDials>,
    local_close: Arc<Mutex<Option<String>>>,
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
                            if cancels.len() >= a.limit || cancels.contains_key(&request.stream_id)
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
    let local = local_close
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let reason = match (result, local) {
        (_, Some(local)) => local,
        (Ok(()), None) => "closed".to_owned(),
        (Err(e), None) => e.to_string(),
    };
    debug!(%reason, "link ended");
    state.send_replace(LinkState::Closed { reason });
}

struct Shared {
    config: Arc<SessionConfig>,
    server_id: String,
    sessions: mpsc::Sender<super::ServerSession>,
    pending: Pending,
    ids: AtomicU64,
}

/// The server's handle for opening streams on one gRPC link.
#[derive(Clone)]
pub(crate) struct GrpcServerConn {
    shared: Arc<Shared>,
    node: String,
    /// Cancelled when the link's driver ends.
    closed: CancellationToken,
}

impl std::fmt::Debug for GrpcServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServerConn")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

struct Service(Arc<Shared>);

fn peer(extensions: &tonic::Extensions) -> Result<(AgentIdentity, SocketAddr), Status> {
    let info = extensions
        .get::<PeerInfo>()
        .ok_or_else(|| Status::internal("connection without peer info"))?;
    let identity = info
        .identity
        .clone()
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    Ok((identity, info.remote))
}

#[tonic::async_trait]
impl Tunnel for Service {
    type ControlStream = ReceiverStream<Result<proto::Control, Status>>;
    type StreamStream = ReceiverStream<Result<proto::Chunk, Status>>;

    async fn control(
        &self,
        request: Request<Streaming<proto::Control>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let (identity, remote) = peer(request.extensions())?;
        let inbound = request.into_inner();
        let (out_tx, out_rx) = mpsc::channel(16);
        let shared = self.0.clone();
        let span = debug_span!("session", agent.id = %identity.node_name, peer.addr = %remote, transport = "grpc");
        // Registration runs beside the call: our answer travels in the response stream, which
        // starts flowing only once this handler has returned it.
        tokio::spawn(
            async move {
                let mut io = ControlIo { inbound, out: Out::Server(out_tx), send_timeout: shared.config.control.ping_timeout };
                let mut control = Control::server(now(), shared.config.control.clone());
                let claims = match tokio::time::timeout(shared.config.control.register_timeout, io.until_event(&mut control)).await {
                    Ok(Ok(Event::RegisterReceived(r))) => r,
                    Ok(Ok(_)) | Err(_) => {
                        debug!("agent did not register");
                        return;
                    }
                    Ok(Err(e)) => {
                        debug!(error = %e, "registration failed");
                        return;
                    }
                };
                if claims.node_name != identity.node_name && !claims.node_name.is_empty() {
                    warn!(agent.claimed = %claims.node_name, "agent claims another node name; using its certificate's");
                }
                let registered = proto::Registered { node_name: identity.node_name.clone(), server_id: shared.server_id.clone() };
                if control.accept_registration(now(), registered).is_err() || io.flush(&mut control).await.is_err() {
                    return;
                }
                let closed = CancellationToken::new();
                let link = spawn_driver(control, io, None, closed.clone(), tracing::Span::current());
                let conn = GrpcServerConn { shared: shared.clone(), node: identity.node_name.clone(), closed };
                let session = super::ServerSession::new(
                    identity,
                    claims,
                    remote,
                    shared.config.clone(),
                    super::session::ServerConn::Grpc(conn),
                    link,
                );
                let _ = shared.sessions.send(session).await;
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn stream(
        &self,
        request: Request<Streaming<proto::Chunk>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (identity, _) = peer(request.extensions())?;
        let id = request
            .metadata()
            .get(STREAM_ID_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let Some(id) = id else {
            refused_stream_call("bad_id");
            return Err(Status::invalid_argument("missing or malformed stream id"));
        };
        // Keyed by the certificate's node: an agent can only answer dials sent to it.
        let Some((waiter, link_closed)) = self.0.pending.take(&identity.node_name, id) else {
            refused_stream_call("unknown_id");
            debug!(agent.id = %identity.node_name, stream.id = id, "unknown, duplicate or late stream id");
            return Err(Status::not_found("unknown, duplicate or late stream id"));
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.0.config.header_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no reply chunk"))?
            .map_err(|s| Status::invalid_argument(s.message().to_owned()))?
            .ok_or_else(|| Status::invalid_argument("stream call without a reply"))?;
        let reply = first
            .reply
            .ok_or_else(|| Status::invalid_argument("first chunk without a reply"))?;
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let mut stream = GrpcStream::new(
            id,
            inbound,
            Outbound::Response(PollSender::new(tx)),
            &link_closed,
        );
        stream.pending = first.data;
        if waiter.send(Paired { reply, stream }).is_err() {
            refused_stream_call("abandoned");
            return Err(Status::cancelled("the client is gone"));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Counts a `Stream` call the server refused: `bad_id` (no usable stream id), `unknown_id`
/// (unknown, duplicate, late, or another node's), `abandoned` (the opener left meanwhile).
fn refused_stream_call(reason: &'static str) {
    metrics::counter!("edge_tunnel_server_grpc_stream_calls_refused_total", "reason" => reason)
        .increment(1);
}

/// Withdraws a dial whose opener went away before the agent answered.
struct DialGuard<'a> {
    conn: &'a GrpcServerConn,
    commands: &'a mpsc::Sender<Command>,
    id: u64,
    armed: bool,
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.shared.pending.take(&self.conn.node, self.id);
            let _ = self.commands.try_send(Command::Cancel(self.id));
        }
    }
}

pub(crate) async fn open(
    conn: &GrpcServerConn,
    commands: &mpsc::Sender<Command>,
    request: &proto::OpenRequest,
    config: &SessionConfig,
) -> Result<super::TunnelStream, crate::error::OpenError> {
    use crate::error::{OpenError, Refusal};
    let timeout = config.open_timeout;
    let id = conn.shared.ids.fetch_add(1, Ordering::Relaxed);
    let answer = conn
        .shared
        .pending
        .insert(&conn.node, id, conn.closed.clone());
    let mut guard = DialGuard {
        conn,
        commands,
        id,
        armed: true,
    };
    let dial = proto::DialRequest {
        stream_id: id,
        open: Some(request.to_proto()),
    };
    let exchange = async {
        commands
            .send(Command::Dial(dial))
            .await
            .map_err(|_| OpenError::SessionClosed("link closed".into()))?;
        answer
            .await
            .map_err(|_| OpenError::SessionClosed("link closed".into()))
    };
    let paired = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| OpenError::Timeout(timeout))??;
    guard.armed = false;
    let refusal = match proto::OpenResult::try_from(paired.reply.result) {
        Ok(proto::OpenResult::Ok) => return Ok(super::TunnelStream::grpc(paired.stream)),
        Ok(proto::OpenResult::Forbidden) => Refusal::Forbidden,
        Ok(proto::OpenResult::Refused) => Refusal::Refused,
        Ok(proto::OpenResult::Timeout) => Refusal::Timeout,
        Ok(proto::OpenResult::Unreachable) => Refusal::Unreachable,
        Ok(proto::OpenResult::Unspecified) | Err(_) => {
            return Err(OpenError::Protocol(proto::DecodeError::Invalid(
                "unknown open result",
            )));
        }
    };
    Err(OpenError::Refused {
        refusal,
        detail: paired.reply.detail.chars().take(200).collect(),
        target: request.target,
    })
}

/// The server's TCP endpoint for agents over gRPC.
pub struct GrpcListener {
    local: SocketAddr,
    sessions: mpsc::Receiver<super::ServerSession>,
    _serve: DriverTask,
}

impl std::fmt::Debug for GrpcListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl GrpcListener {
    /// Binds TCP `addr`. HTTP/2 settings: stream and connection windows from `config` (sized
    /// for 100 Mbit/s × 100 ms per stream, bounded per agent), at most `max_streams` calls at
    /// once per agent (plus the control call), keepalive every `keep_alive`.
    pub async fn bind(
        addr: SocketAddr,
        mut tls: rustls::ServerConfig,
        config: SessionConfig,
        server_id: &str,
    ) -> Result<Self, super::quic::BindError> {
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let config = Arc::new(config);
        let (sessions_tx, sessions) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            config: config.clone(),
            server_id: server_id.to_owned(),
            sessions: sessions_tx,
            pending: Pending::default(),
            ids: AtomicU64::new(1),
        });
        let (conn_tx, conn_rx) = mpsc::channel::<Result<PeerIo, std::io::Error>>(64);
        let handshake = config.handshake_timeout;
        let accept = async move {
            let mut handshakes = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, remote)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        let acceptor = acceptor.clone();
                        let conn_tx = conn_tx.clone();
                        handshakes.spawn(async move {
                            let Ok(Ok(io)) = tokio::time::timeout(handshake, acceptor.accept(tcp)).await else { return };
                            let identity = AgentIdentity::from_chain(io.get_ref().1.peer_certificates());
                            let _ = conn_tx.send(Ok(PeerIo { io, info: PeerInfo { identity, remote } })).await;
                        });
                    }
                    Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
                }
            }
        };
        let server = tonic::transport::Server::builder()
            .initial_stream_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window)
            .max_concurrent_streams(config.max_streams.saturating_add(1))
            .http2_keepalive_interval(Some(config.keep_alive))
            .http2_keepalive_timeout(Some(config.idle_timeout))
            .add_service(TunnelServer::new(Service(shared)))
            .serve_with_incoming(ReceiverStream::new(conn_rx));
        let task = tokio::spawn(async move {
            tokio::select! {
                () = accept => {}
                r = server => if let Err(e) = r { warn!(error = %e, "gRPC server ended"); },
            }
        });
        Ok(Self {
            local,
            sessions,
            _serve: DriverTask(task),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next registered agent session.
    pub async fn accept(&mut self) -> Option<super::ServerSession> {
        self.sessions.recv().await
    }
}

/// The agent's side of the gRPC transport.
#[derive(Debug, Clone)]
pub struct GrpcConnector {
    tls: Arc<rustls::ClientConfig>,
    config: Arc<SessionConfig>,
}

/// A dial the server asked for, and the signal that it was withdrawn.
pub(crate) type DialQueue = tokio::sync::Mutex<mpsc::Receiver<(proto::DialRequest, DialTicket)>>;

impl GrpcConnector {
    /// A connector presenting the client certificate in `tls`.
    pub fn new(mut tls: rustls::ClientConfig, config: SessionConfig) -> Self {
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        Self {
            tls: Arc::new(tls),
            config: Arc::new(config),
        }
    }

    /// Dials `addr` over TLS/TCP, verifying the server as `server_name`, and registers.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        register: proto::Register,
    ) -> Result<super::AgentSession, SessionError> {
        let config = self.config.clone();
        let io_err =
            |e: &dyn std::fmt::Display| SessionError::Io(std::io::Error::other(e.to_string()));
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| io_err(&e))?
            .initial_stream_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window)
            .http2_keep_alive_interval(config.keep_alive)
            .keep_alive_timeout(config.idle_timeout)
            .keep_alive_while_idle(true)
            .connect_timeout(config.handshake_timeout);
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| io_err(&e))?;
        let tls = self.tls.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (tls, name) = (tls.clone(), name.clone());
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let io = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        });
        let channel = tokio::time::timeout(
            config.handshake_timeout,
            endpoint.connect_with_connector(connector),
        )
        .await
        .map_err(|_| SessionError::Timeout("grpc connect"))?
        .map_err(|e| io_err(&e))?;
        let mut client = TunnelClient::new(channel);
        let (out_tx, out_rx) = mpsc::channel(16);
        let mut control = Control::agent(now(), config.control.clone(), register);
        while let Some(msg) = control.poll_transmit() {
            out_tx.try_send(msg).map_err(|e| io_err(&e))?;
        }
        let inbound = tokio::time::timeout(
            config.control.register_timeout,
            client.control(ReceiverStream::new(out_rx)),
        )
        .await
        .map_err(|_| SessionError::Timeout("control call"))?
        .map_err(|s| io_err(&s.message()))?
        .into_inner();
        let mut io = ControlIo {
            inbound,
            out: Out::Agent(out_tx),
            send_timeout: config.control.ping_timeout,
        };
        let span = debug_span!("session", peer.addr = %addr, transport = "grpc");
        let Event::Registered(registered) = io.until_event(&mut control).await? else {
            return Err(SessionError::Protocol(ControlError::Unexpected {
                message: "event",
                state: "await-registered",
            }));
        };
        let (dials_tx, dials_rx) = mpsc::channel(config.max_streams as usize);
        let agent = AgentDials {
            dials: dials_tx,
            cancels: Arc::new(Mutex::new(HashMap::new())),
            limit: config.max_streams as usize,
        };
        let closed = CancellationToken::new();
        let link = spawn_driver(control, io, Some(agent), closed.clone(), span);
        Ok(super::AgentSession::new(
            registered,
            addr,
            config,
            super::session::AgentConn::Grpc {
                client: AgentCalls { client, closed },
                dials: tokio::sync::Mutex::new(dials_rx),
            },
            link,
        ))
    }
}

/// Agent side: answers a dial by opening its `Stream` call, the answer in the first chunk.
pub(crate) async fn answer(
    calls: &AgentCalls,
    stream_id: u64,
    reply: proto::StreamOpenReply,
) -> Result<GrpcStream, SessionError> {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tx.try_send(proto::Chunk {
        data: Bytes::new(),
        reply: Some(reply),
    })
    .map_err(|_| SessionError::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe)))?;
    let mut request = Request::new(ReceiverStream::new(rx));
    let id = tonic::metadata::MetadataValue::try_from(stream_id.to_string())
        .map_err(|e| SessionError::Io(std::io::Error::other(e.to_string())))?;
    request.metadata_mut().insert(STREAM_ID_KEY, id);
    let inbound = calls
        .client
        .clone()
        .stream(request)
        .await
        .map_err(|s| SessionError::Io(std::io::Error::other(s.message().to_owned())))?
        .into_inner();
    Ok(GrpcStream::new(
        stream_id,
        inbound,
        Outbound::Request(PollSender::new(tx)),
        &calls.closed,
    ))
}
