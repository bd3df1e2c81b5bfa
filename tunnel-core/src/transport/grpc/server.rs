//! The server side: the TLS endpoint agents call, the `Tunnel` service, and opening streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, PollSender};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, debug_span, warn};

use super::service::tunnel_server::{Tunnel, TunnelServer};
use super::stream::{GrpcStream, Outbound};
use super::{ALPN_H2, CHUNKS_IN_FLIGHT, GrpcControl, Out, STREAM_ID_KEY};
use crate::error::{CloseCause, CloseReason, OpenError, SessionError};
use crate::proto::{self, OpenRequest};
use crate::tls::AgentIdentity;
use crate::transport::link::{self, Command, DriverTask, Link, Opener, Opening, Welcome};
use crate::transport::session::{ServerParts, answer_to_result};
use crate::transport::stream::StreamIo;
use crate::transport::{BindError, HandshakeError, ServerSession, SessionConfig, TransportKind};

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
    // Without these h2 sees an IO that cannot gather, copies the first KiB of every DATA frame
    // into its own buffer and writes the frame in two calls: two TLS writes per chunk.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What the `Stream` call hands the waiting opener: the agent's answer and, on success, the stream.
struct Paired {
    reply: proto::StreamOpenReply,
    stream: GrpcStream,
}

/// A stream request's waiting opener, and its link's end signal (the paired call must end with the link).
type Waiter = (oneshot::Sender<Answer>, CancellationToken);

/// The agent's call paired with the request, or why it could not be (its first chunk was late or
/// malformed): the opener reports that, not a lost link.
type Answer = Result<Paired, OpenError>;

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
    ) -> oneshot::Receiver<Answer> {
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

/// What the listener hands out: a registered session, or an agent that did not become one.
type Accepted = Result<ServerSession, HandshakeError>;

struct ListenerState {
    config: Arc<SessionConfig>,
    welcome: Welcome,
    sessions: mpsc::Sender<Accepted>,
    pending: Pending,
    ids: AtomicU64,
}

impl ListenerState {
    /// Reports an agent that did not become a session.
    async fn rejected(&self, remote: SocketAddr, error: SessionError) {
        let failure = HandshakeError {
            remote,
            transport: TransportKind::Grpc,
            error,
        };
        let _ = self.sessions.send(Err(failure)).await;
    }
}

/// The server's way to open streams on one gRPC link: a request on the control call, answered
/// by the agent's `Stream` call.
pub(crate) struct GrpcOpener {
    shared: Arc<ListenerState>,
    node: String,
    /// Cancelled when the link's driver ends.
    closed: CancellationToken,
}

impl std::fmt::Debug for GrpcOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcOpener")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

struct Service(Arc<ListenerState>, Registrations);

/// Registrations in progress (each bounded by the registration timeout). Owned by the listener
/// too, so that they end with it instead of outliving it.
type Registrations = Arc<Mutex<tokio::task::JoinSet<()>>>;

fn peer(extensions: &tonic::Extensions) -> Result<&PeerInfo, Status> {
    extensions
        .get::<PeerInfo>()
        .ok_or_else(|| Status::internal("connection without peer info"))
}

#[tonic::async_trait]
impl Tunnel for Service {
    type ControlStream = ReceiverStream<Result<proto::Control, Status>>;
    type StreamStream = ReceiverStream<Result<proto::Chunk, Status>>;

    async fn control(
        &self,
        request: Request<Streaming<proto::Control>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let info = peer(request.extensions())?.clone();
        let identity = match info.identity {
            Ok(identity) => identity,
            Err(e) => {
                let status = Status::unauthenticated(e.to_string());
                self.0.rejected(info.remote, e.into()).await;
                return Err(status);
            }
        };
        let inbound = request.into_inner();
        let (out_tx, out_rx) = mpsc::channel(16);
        let span = debug_span!("session", agent.id = %identity.node_name, peer.addr = %info.remote, transport = "grpc");
        // Registration runs beside the call: our answer travels in the response stream, which
        // starts flowing only once this handler has returned it.
        let registration = register(self.0.clone(), identity, info.remote, inbound, out_tx, span);
        {
            let mut tasks = self.1.lock().unwrap_or_else(PoisonError::into_inner);
            while tasks.try_join_next().is_some() {}
            tasks.spawn(registration);
        }
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }

    async fn stream(
        &self,
        request: Request<Streaming<proto::Chunk>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let identity = peer(request.extensions())?
            .identity
            .clone()
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let id = request
            .metadata()
            .get(STREAM_ID_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let Some(id) = id else {
            refused_stream_call("bad_id");
            return Err(Status::invalid_argument("missing or malformed stream id"));
        };
        // Keyed by the certificate's node: an agent can only answer requests sent to it.
        let Some((waiter, link_closed)) = self.0.pending.take(&identity.node_name, id) else {
            refused_stream_call("unknown_id");
            debug!(agent.id = %identity.node_name, stream.id = id, "unknown, duplicate or late stream id");
            return Err(Status::not_found("unknown, duplicate or late stream id"));
        };
        let mut inbound = request.into_inner();
        let timeout = self.0.config.header_timeout;
        let first = match tokio::time::timeout(timeout, inbound.message()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Err(status)) => return Err(bad_reply(waiter, None, status.message())),
            Ok(Ok(None)) => return Err(bad_reply(waiter, None, "stream call without a reply")),
            Err(_) => return Err(bad_reply(waiter, Some(timeout), "no reply chunk")),
        };
        let Some(reply) = first.reply else {
            return Err(bad_reply(waiter, None, "first chunk without a reply"));
        };
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let mut stream = GrpcStream::new(
            id,
            inbound,
            Outbound::Response(PollSender::new(tx)),
            &link_closed,
        );
        stream.pending = first.data;
        if waiter.send(Ok(Paired { reply, stream })).is_err() {
            refused_stream_call("abandoned");
            return Err(Status::cancelled("the client is gone"));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Registers the agent on its `Control` call and hands the session to the listener (or the
/// failure, closed with its cause).
async fn register(
    shared: Arc<ListenerState>,
    identity: AgentIdentity,
    remote: SocketAddr,
    inbound: Streaming<proto::Control>,
    out: mpsc::Sender<Result<proto::Control, Status>>,
    span: tracing::Span,
) {
    let closed = CancellationToken::new();
    let control = GrpcControl::new(
        inbound,
        Out::Server(out),
        shared.config.control.ping_timeout,
        None,
        &closed,
    );
    // Every open sends a request and perhaps a cancel, and at most `max_streams` opens run at
    // once: room for all, so a cancel (sent from a drop, without waiting) is never lost to a
    // full queue.
    let capacity = 2 * shared.config.max_streams as usize + 16;
    let accepted = link::accept_agent(
        control,
        link::Registrant::Agent(&identity),
        &shared.welcome,
        &shared.config,
        capacity,
        span,
    )
    .await;
    let (claims, link) = match accepted {
        Ok(registered) => registered,
        Err(reason) => return shared.rejected(remote, reason.into()).await,
    };
    let opener = GrpcOpener {
        shared: shared.clone(),
        node: identity.node_name.clone(),
        closed,
    };
    let session = ServerSession::new(ServerParts {
        identity,
        claims,
        remote,
        transport: TransportKind::Grpc,
        config: shared.config.clone(),
        opener: Box::new(opener),
        link,
    });
    let _ = shared.sessions.send(Ok(session)).await;
}

/// Tells the opener why the agent's answer is unusable (it came later than `late`, or broke the
/// protocol) and returns the status that ends the call, saying `why`.
fn bad_reply(waiter: oneshot::Sender<Answer>, late: Option<Duration>, why: &str) -> Status {
    refused_stream_call("bad_reply");
    let (error, status) = match late {
        Some(timeout) => (OpenError::Timeout(timeout), Status::deadline_exceeded(why)),
        None => (
            OpenError::Protocol(proto::DecodeError::Invalid(
                "malformed answer to a stream request",
            )),
            Status::invalid_argument(why),
        ),
    };
    let _ = waiter.send(Err(error));
    status
}

/// Counts a `Stream` call the server refused: `bad_id` (no usable stream id), `unknown_id`
/// (unknown, duplicate, late, or another node's), `bad_reply` (its first chunk was late or
/// carried no answer), `abandoned` (the opener left meanwhile).
fn refused_stream_call(reason: &'static str) {
    metrics::counter!("edge_tunnel_server_grpc_stream_calls_refused_total", "reason" => reason)
        .increment(1);
}

/// Withdraws a stream request whose opener went away before the agent answered.
struct RequestGuard<'a> {
    opener: &'a GrpcOpener,
    commands: &'a mpsc::Sender<Command>,
    id: u64,
    armed: bool,
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.opener.shared.pending.take(&self.opener.node, self.id);
            let _ = self.commands.try_send(Command::Cancel(self.id));
        }
    }
}

impl Opener for GrpcOpener {
    fn open<'a>(&'a self, link: &'a Link, request: &'a OpenRequest) -> Opening<'a> {
        Box::pin(async move {
            let timeout = self.shared.config.open_timeout;
            let id = self.shared.ids.fetch_add(1, Ordering::Relaxed);
            let answer = self
                .shared
                .pending
                .insert(&self.node, id, self.closed.clone());
            let mut guard = RequestGuard {
                opener: self,
                commands: &link.commands,
                id,
                armed: true,
            };
            let stream_request = proto::StreamRequest {
                stream_id: id,
                open: Some(request.to_proto()),
            };
            let exchange = async {
                if link
                    .commands
                    .send(Command::Request(stream_request))
                    .await
                    .is_err()
                {
                    return Err(OpenError::LinkClosed(link.closed().await));
                }
                tokio::select! {
                    answer = answer => match answer {
                        Ok(answer) => answer,
                        Err(_) => Err(OpenError::LinkClosed(link.closed().await)),
                    },
                    // An answer can no longer come: fail now rather than at the open timeout.
                    () = self.closed.cancelled() => Err(OpenError::LinkClosed(link.closed().await)),
                }
            };
            let paired = tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| OpenError::Timeout(timeout))??;
            guard.armed = false;
            answer_to_result(&paired.reply, request)?;
            Ok(Box::new(paired.stream) as Box<dyn StreamIo>)
        })
    }
}

/// The server's TCP endpoint for agents over gRPC.
pub struct GrpcListener {
    local: SocketAddr,
    sessions: mpsc::Receiver<Accepted>,
    _serve: DriverTask,
    _registrations: Registrations,
}

impl std::fmt::Debug for GrpcListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// Completes TLS on an agent's TCP connection and hands it to the gRPC server, or reports
/// the failure (a refused certificate, a handshake that timed out).
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
    conns: mpsc::Sender<Result<PeerIo, std::io::Error>>,
    shared: Arc<ListenerState>,
) {
    let error = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(mut io)) => {
            io.get_mut().1.set_buffer_limit(Some(super::TLS_SEND_LIMIT));
            let identity = AgentIdentity::from_chain(io.get_ref().1.peer_certificates());
            let info = PeerInfo { identity, remote };
            let _ = conns.send(Ok(PeerIo { io, info })).await;
            return;
        }
        Ok(Err(e)) => {
            let cause = match crate::error::tls_error_in(&e).map(crate::error::tls_refusal) {
                Some(Some(_)) => CloseCause::Refused,
                Some(None) => CloseCause::Protocol,
                None => CloseCause::Transport,
            };
            SessionError::Closed(CloseReason::local(cause).with_source(e))
        }
        Err(_) => SessionError::Closed(CloseReason::local(CloseCause::HandshakeTimeout)),
    };
    shared.rejected(remote, error).await;
}

impl GrpcListener {
    /// Binds TCP `addr`. HTTP/2 settings: stream and connection windows from `config` (sized
    /// for 100 Mbit/s × 100 ms per stream, bounded per agent), at most `max_streams` calls at
    /// once per agent (plus the control call), keepalive every `keep_alive`.
    pub async fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        config: SessionConfig,
        server_id: &str,
    ) -> Result<Self, BindError> {
        Self::bind_welcoming(addr, tls, config, Welcome::new(server_id)).await
    }

    /// As [`bind`](Self::bind), telling agents `welcome` (the server id and port policy).
    pub(crate) async fn bind_welcoming(
        addr: SocketAddr,
        mut tls: rustls::ServerConfig,
        config: SessionConfig,
        welcome: Welcome,
    ) -> Result<Self, BindError> {
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let config = Arc::new(config);
        let (sessions_tx, sessions) = mpsc::channel(64);
        let shared = Arc::new(ListenerState {
            config: config.clone(),
            welcome,
            sessions: sessions_tx,
            pending: Pending::default(),
            ids: AtomicU64::new(1),
        });
        let registrations = Registrations::default();
        let (conn_tx, conn_rx) = mpsc::channel::<Result<PeerIo, std::io::Error>>(64);
        let handshake_timeout = config.handshake_timeout;
        let accept_shared = shared.clone();
        let accept = async move {
            let mut handshakes = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let (tcp, remote) = match accepted {
                            Ok(accepted) => accepted,
                            Err(e) => {
                                // Out of file descriptors and the like: pause rather than spin.
                                warn!(error = %e, "gRPC accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        let _ = tcp.set_nodelay(true);
                        handshakes.spawn(handshake(acceptor.clone(), tcp, remote, handshake_timeout, conn_tx.clone(), accept_shared.clone()));
                    }
                    Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
                }
            }
        };
        let server = tonic::transport::Server::builder()
            .initial_stream_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window)
            .max_frame_size(super::GRPC_MAX_FRAME)
            .max_concurrent_streams(config.max_streams.saturating_add(1))
            .http2_keepalive_interval(Some(config.keep_alive))
            .http2_keepalive_timeout(Some(config.idle_timeout))
            .add_service(TunnelServer::new(Service(shared, registrations.clone())))
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
            _registrations: registrations,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next agent: a registered session, or one that failed its handshake or registration
    /// (for the caller to log and count). `None` once the listener is gone.
    pub async fn accept(&mut self) -> Option<Result<ServerSession, HandshakeError>> {
        self.sessions.recv().await
    }
}
