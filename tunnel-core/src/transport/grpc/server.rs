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
use tracing::{Instrument, debug, debug_span, warn};

use super::stream::{GrpcStream, Outbound};
use super::{ALPN_H2, CHUNKS_IN_FLIGHT, ControlIo, Out, STREAM_ID_KEY, now, spawn_driver};
use crate::control::{Control, Event};
use crate::proto::{
    self,
    tunnel_server::{Tunnel, TunnelServer},
};
use crate::tls::AgentIdentity;
use crate::transport::SessionConfig;
use crate::transport::session::{Command, DriverTask};

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

/// A dial's waiting opener, and its link's end signal (the paired call must end with the link).
type Waiter = (oneshot::Sender<Answer>, CancellationToken);

/// The agent's call paired with the dial, or why it could not be (its first chunk was late or
/// malformed): the opener reports that, not a lost link.
type Answer = Result<Paired, crate::error::OpenError>;

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

struct Shared {
    config: Arc<SessionConfig>,
    server_id: String,
    sessions: mpsc::Sender<crate::transport::ServerSession>,
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

struct Service(Arc<Shared>, Registrations);

/// Registrations in progress (each bounded by the registration timeout). Owned by the listener
/// too, so that they end with it instead of outliving it.
type Registrations = Arc<Mutex<tokio::task::JoinSet<()>>>;

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
        let registration =
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
                // Every open sends a dial and perhaps a cancel, and at most `max_streams` opens
                // run at once: room for all, so a cancel (sent from a drop, without waiting) is
                // never lost to a full queue.
                let capacity = 2 * shared.config.max_streams as usize + 16;
                let link = spawn_driver(control, io, None, closed.clone(), capacity, tracing::Span::current());
                let conn = GrpcServerConn { shared: shared.clone(), node: identity.node_name.clone(), closed };
                let session = crate::transport::ServerSession::new(
                    identity,
                    claims,
                    remote,
                    shared.config.clone(),
                    crate::transport::session::ServerConn::Grpc(conn),
                    link,
                );
                let _ = shared.sessions.send(session).await;
            }
            .instrument(span);
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

/// Tells the opener why the agent's answer is unusable (it came later than `late`, or broke the
/// protocol) and returns the status that ends the call, saying `why`.
fn bad_reply(waiter: oneshot::Sender<Answer>, late: Option<Duration>, why: &str) -> Status {
    use crate::error::OpenError;
    refused_stream_call("bad_reply");
    let (error, status) = match late {
        Some(timeout) => (OpenError::Timeout(timeout), Status::deadline_exceeded(why)),
        None => (
            OpenError::Protocol(proto::DecodeError::Invalid("malformed answer to a dial")),
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
    count: crate::transport::session::StreamGuard,
) -> Result<crate::transport::TunnelStream, crate::error::OpenError> {
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
        tokio::select! {
            answer = answer => answer.map_err(|_| OpenError::SessionClosed("link closed".into()))?,
            // An answer can no longer come: fail now rather than at the open timeout.
            () = conn.closed.cancelled() => Err(OpenError::SessionClosed("link closed".into())),
        }
    };
    let paired = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| OpenError::Timeout(timeout))??;
    guard.armed = false;
    let refusal = match proto::OpenResult::try_from(paired.reply.result) {
        Ok(proto::OpenResult::Ok) => {
            return Ok(crate::transport::TunnelStream::grpc(paired.stream, count));
        }
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
    sessions: mpsc::Receiver<crate::transport::ServerSession>,
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

impl GrpcListener {
    /// Binds TCP `addr`. HTTP/2 settings: stream and connection windows from `config` (sized
    /// for 100 Mbit/s × 100 ms per stream, bounded per agent), at most `max_streams` calls at
    /// once per agent (plus the control call), keepalive every `keep_alive`.
    pub async fn bind(
        addr: SocketAddr,
        mut tls: rustls::ServerConfig,
        config: SessionConfig,
        server_id: &str,
    ) -> Result<Self, crate::transport::quic::BindError> {
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
        let registrations = Registrations::default();
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
                            let Ok(Ok(mut io)) = tokio::time::timeout(handshake, acceptor.accept(tcp)).await else { return };
                            io.get_mut().1.set_buffer_limit(Some(super::TLS_SEND_LIMIT));
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

    /// The next registered agent session.
    pub async fn accept(&mut self) -> Option<crate::transport::ServerSession> {
        self.sessions.recv().await
    }
}
