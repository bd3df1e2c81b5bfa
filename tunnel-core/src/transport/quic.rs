//! The QUIC transport (quinn): the agent dials; its first bidirectional stream is the control
//! channel; the server opens one bidirectional stream per proxied connection, writes the
//! stream-open header, reads the agent's answer, then both sides move raw bytes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use quinn::VarInt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tracing::{debug, debug_span, warn};

use super::link::{
    self, Acceptor, BoxFuture, ControlChannel, Incoming, Link, Opener, Opening, Registrant,
    RequestRead, Requested, Welcome,
};
use super::session::{AgentParts, ReplicaIdentity, ReplicaSession, ServerParts, answer_to_result};
use super::stream::StreamIo;
use super::{AgentSession, BindError, Server, ServerSession, SessionConfig, TransportKind};
use crate::error::{CloseCause, CloseReason, ConfigError, OpenError, SessionError};
use crate::proto::{self, DecodeError, MAX_CONTROL_LEN, MAX_OPEN_LEN, OpenRequest};
use crate::route::PortPolicy;
use crate::tls::{ALPN_QUIC, AgentIdentity};
use tokio::sync::watch;

/// Stream reset code after a local failure (the other leg of the copy failed).
const RESET_ABORTED: u32 = 1;

fn transport_config(config: &SessionConfig, accept_streams: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(accept_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(config.stream_window))
        .receive_window(VarInt::from_u32(config.connection_window))
        .send_window(u64::from(config.connection_window))
        .keep_alive_interval(Some(config.keep_alive))
        .max_idle_timeout(quinn::IdleTimeout::try_from(config.idle_timeout).ok())
        .datagram_receive_buffer_size(None);
    t
}

/// Socket buffer asked for each QUIC UDP socket. The kernel's default (208 KiB) overflows
/// under one busy stream: the bench lost 1 % of its packets to it, each loss a congestion
/// event that halves the window; at 4 MiB it lost none.
const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Binds a UDP socket for QUIC with [`UDP_SOCKET_BUFFER`] each way. The kernel caps the size
/// at `net.core.rmem_max`/`wmem_max`; a cap far below it is worth a warning, since it costs
/// packets under load rather than failing. `dual_stack`: an IPv6 socket also reaches IPv4
/// (IPv4-mapped) peers whatever `net.ipv6.bindv6only` says, as quinn's own client sockets do.
fn bind_udp(addr: SocketAddr, dual_stack: bool) -> std::io::Result<std::net::UdpSocket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() && dual_stack {
        sock.set_only_v6(false)?;
    }
    sock.bind(&addr.into())?;
    let _ = sock.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_SOCKET_BUFFER);
    // Linux reports twice what it grants (the other half is its bookkeeping).
    let granted = sock.recv_buffer_size().unwrap_or(0) / 2;
    if granted < UDP_SOCKET_BUFFER / 4 {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            warn!(
                granted,
                wanted = UDP_SOCKET_BUFFER,
                "UDP socket buffer capped by the kernel: QUIC will lose packets under load; set net.core.rmem_max and net.core.wmem_max to 4194304"
            );
        });
    }
    Ok(sock.into())
}

/// A quinn endpoint on `socket` (from [`bind_udp`]), driven by the current tokio runtime.
fn endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    socket: std::net::UdpSocket,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("QUIC needs a tokio runtime"))?;
    quinn::Endpoint::new(config, server, socket, runtime)
}

/// The server's QUIC endpoint for agents.
#[derive(Debug)]
pub struct QuicListener {
    endpoint: quinn::Endpoint,
    config: Arc<SessionConfig>,
    welcome: Welcome,
    /// Whether replicas' certificates make peer links (else they are refused).
    replicas: bool,
}

impl QuicListener {
    /// Binds UDP `addr`. `tls` must require client certificates (see [`crate::tls::server_config`]).
    /// Stateless resets use a random key: see [`bind_with_reset_secret`](Self::bind_with_reset_secret)
    /// for one that survives a restart.
    pub fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        config: SessionConfig,
        server_id: &str,
    ) -> Result<Self, BindError> {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| ConfigError::Randomness("the stateless reset key"))?;
        Self::bind_with_reset_secret(addr, tls, config, server_id, &key)
    }

    /// As [`bind`](Self::bind), with the stateless-reset key derived from `secret`. A server
    /// that restarts with the same secret (say, derived from its private key) answers packets
    /// of its predecessor's connections with a reset the agents accept, so they reconnect at
    /// once instead of waiting out their idle timeout (30 s) for a server that crashed.
    pub fn bind_with_reset_secret(
        addr: SocketAddr,
        mut tls: rustls::ServerConfig,
        config: SessionConfig,
        server_id: &str,
        secret: &[u8],
    ) -> Result<Self, BindError> {
        if tls.alpn_protocols.is_empty() {
            tls.alpn_protocols = vec![ALPN_QUIC.to_vec()];
        }
        // 0-RTT data could be replayed; agents gain nothing from it.
        tls.max_early_data_size = 0;
        let crypto = QuicServerConfig::try_from(Arc::new(tls)).map_err(ConfigError::Quic)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        // The agent opens only the control stream; the server opens the rest.
        server.transport_config(Arc::new(transport_config(&config, 1)));
        let derive =
            |label: &[u8]| ring::digest::digest(&ring::digest::SHA256, &[label, secret].concat());
        let reset_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            derive(b"edge-tunnel stateless reset v1\0").as_ref(),
        );
        // The id check is a filter against noise, not a secret (ids are seen on the wire), so
        // its key is derived apart from the reset key.
        let cid_digest = derive(b"edge-tunnel connection ids v1\0");
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        // Connection ids carry a check keyed the same way: a successor must accept its
        // predecessor's ids as well-formed, or it drops their packets without the reset.
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&cid_digest.as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        // quinn sends at most one reset per 20 ms by default: 5,000 agents of a crashed server
        // would need minutes to hear it (bench: half of them back after 24 s). Random noise
        // mostly fails the id check, and a reset is always smaller than what incited it (no
        // amplification); someone replaying a seen id can make us send at most 10,000 a second.
        endpoint_config.min_reset_interval(Duration::from_micros(100));
        let endpoint = endpoint(endpoint_config, Some(server), bind_udp(addr, false)?)?;
        Ok(Self {
            endpoint,
            config: Arc::new(config),
            welcome: Welcome::new(server_id),
            replicas: false,
        })
    }

    /// Tells every agent `ports` at registration, and each change of it later (agents that do
    /// not understand policies are told nothing).
    pub(crate) fn with_port_policy(mut self, ports: Option<watch::Receiver<PortPolicy>>) -> Self {
        self.welcome.ports = ports;
        self
    }

    /// Takes peer links from other replicas too (certificates with the replica mark); without
    /// this, such a certificate is refused like any that names no node.
    pub(crate) fn with_replicas(mut self, replicas: bool) -> Self {
        self.replicas = replicas;
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next agent knocking; `None` once the listener is closed.
    pub async fn accept(&self) -> Option<PendingSession> {
        let incoming = self.endpoint.accept().await?;
        Some(PendingSession {
            incoming,
            config: self.config.clone(),
            welcome: self.welcome.clone(),
            replicas: self.replicas,
        })
    }

    /// Stops accepting and closes every link, for `cause`.
    pub fn close(&self, cause: CloseCause) {
        self.endpoint
            .close(VarInt::from_u32(cause.code()), cause.as_str().as_bytes());
    }

    /// Resolves when every link of this endpoint is gone.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// An agent's connection attempt, before the handshake.
#[derive(Debug)]
pub struct PendingSession {
    incoming: quinn::Incoming,
    config: Arc<SessionConfig>,
    welcome: Welcome,
    replicas: bool,
}

/// What a QUIC handshake and registration produced: an agent's session, or a peer link
/// another replica dialed (only on a listener that takes them).
#[derive(Debug)]
#[non_exhaustive]
pub enum Accepted {
    /// An agent, for the node its certificate names.
    Agent(ServerSession),
    /// Another replica's peer link.
    Replica(ReplicaSession),
}

impl PendingSession {
    /// Where the attempt comes from.
    pub fn remote_addr(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Turns the agent away at once (QUIC CONNECTION_REFUSED), so that it retries elsewhere
    /// rather than waiting for a handshake timeout: for a draining server.
    pub fn refuse(self) {
        self.incoming.refuse();
    }

    /// Completes TLS, takes the node identity from the client certificate, and runs the
    /// registration. The node name comes from the certificate only; a differing claim is logged.
    /// A replica's certificate makes a peer link when the listener takes them.
    pub async fn establish(self) -> Result<Accepted, SessionError> {
        let remote = self.incoming.remote_address();
        let config = self.config;
        let connecting = self.incoming.accept().map_err(|e| reason_of(&e))?;
        let conn = tokio::time::timeout(config.handshake_timeout, connecting)
            .await
            .map_err(|_| CloseReason::local(CloseCause::HandshakeTimeout))?
            .map_err(|e| reason_of(&e))?;
        let identity = match peer_identity(&conn, self.replicas) {
            Ok(identity) => identity,
            Err(e) => {
                close(&conn, CloseCause::Refused, &e.to_string());
                return Err(e.into());
            }
        };
        let (registrant, span) = match &identity {
            Some(identity) => (
                Registrant::Agent(identity),
                debug_span!("session", agent.id = %identity.node_name, peer.addr = %remote, transport = "quic"),
            ),
            None => (
                Registrant::Replica,
                debug_span!("peer", peer.addr = %remote, transport = "quic"),
            ),
        };
        let control =
            match tokio::time::timeout(config.control.register_timeout, conn.accept_bi()).await {
                Ok(Ok((send, recv))) => QuicControl::new(conn.clone(), send, recv),
                Ok(Err(e)) => return Err(reason_of(&e).into()),
                Err(_) => {
                    close(&conn, CloseCause::HandshakeTimeout, "no control stream");
                    return Err(CloseReason::local(CloseCause::HandshakeTimeout).into());
                }
            };
        // The agent opens only the control stream; the server's commands are go-aways.
        let (claims, link) =
            link::accept_agent(control, registrant, &self.welcome, &config, 4, span).await?;
        let opener = Box::new(QuicOpener {
            conn,
            timeout: config.open_timeout,
        });
        let transport = TransportKind::Quic;
        Ok(match identity {
            Some(identity) => Accepted::Agent(ServerSession::new(ServerParts {
                identity,
                claims,
                remote,
                transport,
                config,
                opener,
                link,
            })),
            None => Accepted::Replica(ServerSession::new(ServerParts {
                identity: ReplicaIdentity {
                    server_id: claims.node_name.clone(),
                },
                claims,
                remote,
                transport,
                config: Arc::new(config.for_peer_links()),
                opener,
                link,
            })),
        })
    }
}

/// The agent's identity from its certificate, or `None` for a replica's certificate where
/// `replicas` allows those.
fn peer_identity(
    conn: &quinn::Connection,
    replicas: bool,
) -> Result<Option<AgentIdentity>, crate::tls::IdentityError> {
    let chain = conn.peer_identity().and_then(|any| {
        any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()
    });
    let chain = chain.as_deref().map(Vec::as_slice);
    match AgentIdentity::from_chain(chain) {
        Err(crate::tls::IdentityError::ReplicaCertificate) if replicas => Ok(None),
        other => other.map(Some),
    }
}

/// The agent's side of QUIC: connects to servers.
#[derive(Debug, Clone)]
pub(crate) struct QuicConnector {
    client: quinn::ClientConfig,
    config: Arc<SessionConfig>,
}

impl QuicConnector {
    /// A connector presenting the client certificate in `tls`.
    pub(crate) fn new(
        mut tls: rustls::ClientConfig,
        config: SessionConfig,
    ) -> Result<Self, BindError> {
        if tls.alpn_protocols.is_empty() {
            tls.alpn_protocols = vec![ALPN_QUIC.to_vec()];
        }
        let crypto = QuicClientConfig::try_from(Arc::new(tls)).map_err(ConfigError::Quic)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport_config(&config, config.max_streams)));
        Ok(Self {
            client,
            config: Arc::new(config),
        })
    }

    /// Connects to `server` and registers with `register`'s claims. Each link gets its own
    /// UDP socket, so a reconnect after a NAT rebinding starts clean.
    pub(crate) async fn connect(
        &self,
        server: Server<'_>,
        register: proto::Register,
    ) -> Result<AgentSession, SessionError> {
        let bind: SocketAddr = if server.addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = endpoint(
            quinn::EndpointConfig::default(),
            None,
            bind_udp(bind, true)?,
        )?;
        let config = self.config.clone();
        let connecting = endpoint
            .connect_with(self.client.clone(), server.addr, server.name)
            .map_err(std::io::Error::other)?;
        let conn = tokio::time::timeout(config.handshake_timeout, connecting)
            .await
            .map_err(|_| CloseReason::local(CloseCause::HandshakeTimeout))?
            .map_err(|e| reason_of(&e))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| reason_of(&e))?;
        let channel = QuicControl::new(conn.clone(), send, recv);
        let control = crate::control::Control::agent(link::now(), config.control.clone(), register);
        let acceptor = QuicAcceptor {
            conn,
            _endpoint: endpoint,
        };
        let parts = AgentParts::new(server.addr, TransportKind::Quic, config, acceptor);
        AgentSession::register(channel, control, parts).await
    }
}

fn close(conn: &quinn::Connection, cause: CloseCause, detail: &str) {
    let detail: String = detail.chars().take(100).collect();
    conn.close(VarInt::from_u32(cause.code()), detail.as_bytes());
}

/// Why a QUIC connection ended, as a typed reason. TLS alerts (crypto error codes) are
/// refusals: ours when we raised them, the peer's when it did.
fn reason_of(e: &quinn::ConnectionError) -> CloseReason {
    use quinn::ConnectionError as E;
    // TLS alerts travel as crypto error codes (0x100 + alert); only some are refusals.
    let is_refusal = |code: quinn::TransportErrorCode| {
        let code = u64::from(code);
        (0x100..0x200).contains(&code)
            && u8::try_from(code - 0x100).is_ok_and(|alert| {
                crate::error::refusal_alert(rustls::AlertDescription::from(alert))
            })
    };
    match e {
        E::ApplicationClosed(close) => {
            let cause = u32::try_from(close.error_code.into_inner())
                .ok()
                .and_then(|c| i32::try_from(c).ok())
                .map_or(CloseCause::Transport, CloseCause::from_proto);
            CloseReason::remote(cause).with_detail(&String::from_utf8_lossy(&close.reason))
        }
        E::ConnectionClosed(close) => {
            let code = close.error_code;
            let cause = if is_refusal(code) {
                CloseCause::Refused
            } else if code == quinn::TransportErrorCode::CONNECTION_REFUSED {
                // What a draining server answers to new connections.
                CloseCause::Shutdown
            } else if code == quinn::TransportErrorCode::NO_ERROR {
                CloseCause::Transport
            } else {
                CloseCause::Protocol
            };
            CloseReason::remote(cause).with_source(e.clone())
        }
        E::TransportError(te) => {
            let cause = if is_refusal(te.code) {
                CloseCause::Refused
            } else {
                CloseCause::Protocol
            };
            CloseReason::local(cause).with_source(e.clone())
        }
        E::VersionMismatch => CloseReason::remote(CloseCause::Refused).with_source(e.clone()),
        E::Reset => CloseReason::remote(CloseCause::Transport)
            .with_source(e.clone())
            .by_stateless_reset(),
        E::TimedOut => CloseReason::local(CloseCause::IdleTimeout),
        // Only the endpoint's close (a server shutting down) closes a link under its driver.
        E::LocallyClosed => CloseReason::local(CloseCause::Shutdown),
        E::CidsExhausted => CloseReason::local(CloseCause::Transport).with_source(e.clone()),
    }
}

fn write_reason(e: quinn::WriteError) -> CloseReason {
    match e {
        quinn::WriteError::ConnectionLost(e) => reason_of(&e),
        other => CloseReason::remote(CloseCause::Protocol).with_source(other),
    }
}

fn read_reason(e: quinn::ReadError) -> CloseReason {
    match e {
        quinn::ReadError::ConnectionLost(e) => reason_of(&e),
        other => CloseReason::remote(CloseCause::Protocol).with_source(other),
    }
}

/// The control stream: frames of [`proto::Control`] both ways.
struct QuicControl {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
    out: BytesMut,
}

impl QuicControl {
    fn new(conn: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            conn,
            send,
            recv,
            buf: BytesMut::with_capacity(256),
            out: BytesMut::with_capacity(256),
        }
    }
}

impl ControlChannel for QuicControl {
    const CLOSE_MESSAGE: bool = false;

    async fn send(&mut self, msg: proto::Control) -> Result<(), CloseReason> {
        proto::encode_frame(&msg, &mut self.out)
            .map_err(|e| CloseReason::local(CloseCause::Protocol).with_source(e))?;
        let result = self.send.write_all(&self.out).await;
        self.out.clear();
        result.map_err(write_reason)
    }

    async fn recv(&mut self) -> Result<proto::Control, CloseReason> {
        loop {
            match proto::decode_frame::<proto::Control>(&self.buf, MAX_CONTROL_LEN) {
                Ok((msg, used)) => {
                    self.buf.advance(used);
                    return Ok(msg);
                }
                Err(e) if e.is_incomplete() => {}
                Err(e) => return Err(CloseReason::local(CloseCause::Protocol).with_source(e)),
            }
            // Cancel-safe (quinn's word): a chunk is taken only when the read completes.
            match self.recv.read_chunk(MAX_CONTROL_LEN, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return Err(CloseReason::remote(CloseCause::Protocol)
                        .with_detail("control stream ended"));
                }
                Err(e) => return Err(read_reason(e)),
            }
        }
    }

    async fn finish(&mut self, reason: &CloseReason) {
        let detail = std::error::Error::source(reason)
            .map(ToString::to_string)
            .unwrap_or_default();
        // A no-op when the connection is closed already (the peer's close, an idle timeout).
        close(&self.conn, reason.cause, &detail);
        // What an operator needs to tell a lossy path from a slow peer.
        let stats = self.conn.stats();
        debug!(
            %reason,
            rtt = ?stats.path.rtt,
            path_mtu = stats.path.current_mtu,
            sent_packets = stats.path.sent_packets,
            lost_packets = stats.path.lost_packets,
            congestion_events = stats.path.congestion_events,
            black_holes = stats.path.black_holes_detected,
            "quic link ended"
        );
    }
}

/// Reads exactly one frame from a stream, nothing past it.
async fn read_frame<M: prost::Message + Default>(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<M, SessionError> {
    let io = |e: quinn::ReadExactError| match e {
        quinn::ReadExactError::FinishedEarly(_) => SessionError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "stream finished early",
        )),
        quinn::ReadExactError::ReadError(e) => SessionError::Io(e.into()),
    };
    let mut prefix = [0u8; proto::FRAME_HEADER_LEN];
    recv.read_exact(&mut prefix).await.map_err(io)?;
    let len = proto::frame_len(&prefix, limit)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(io)?;
    Ok(M::decode(&body[..]).map_err(DecodeError::from)?)
}

async fn write_frame<M: prost::Message>(
    send: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), SessionError> {
    let frame = proto::frame(msg)?;
    send.write_all(&frame)
        .await
        .map_err(|e| SessionError::Io(e.into()))
}

/// The server's way to open streams: one native bidirectional stream each, its first frame
/// the stream-open header, answered by the agent's reply frame.
#[derive(Debug)]
struct QuicOpener {
    conn: quinn::Connection,
    /// Time from opening to the agent's answer.
    timeout: Duration,
}

impl Opener for QuicOpener {
    fn open<'a>(&'a self, link: &'a Link, request: &'a OpenRequest) -> Opening<'a> {
        Box::pin(async move {
            let timeout = self.timeout;
            let deadline = tokio::time::Instant::now() + timeout;
            let opened = tokio::time::timeout_at(deadline, self.conn.open_bi())
                .await
                .map_err(|_| OpenError::Timeout(timeout))?;
            // The connection is gone: the driver knows why (our own close included).
            let Ok((send, recv)) = opened else {
                return Err(OpenError::LinkClosed(link.closed().await));
            };
            let mut stream = QuicStream { send, recv };
            let header = proto::frame(&request.to_proto())?;
            let exchange = async {
                stream
                    .send
                    .write_all(&header)
                    .await
                    .map_err(|e| OpenError::Io(e.into()))?;
                read_frame::<proto::StreamOpenReply>(&mut stream.recv, MAX_OPEN_LEN)
                    .await
                    .map_err(|e| match e {
                        SessionError::Decode(d) => OpenError::Protocol(d),
                        other => OpenError::Io(std::io::Error::other(other)),
                    })
            };
            let result = match tokio::time::timeout_at(deadline, exchange).await {
                Ok(Ok(reply)) => answer_to_result(&reply, request),
                Ok(Err(e)) => Err(e),
                // The agent may still be dialing; the reset tells it to drop the result.
                Err(_) => Err(OpenError::Timeout(timeout)),
            };
            match result {
                Ok(()) => Ok(Box::new(stream) as Box<dyn StreamIo>),
                // A refusal ends the stream from the agent's side already.
                Err(e @ OpenError::Refused { .. }) => Err(e),
                // The link went while we waited: say why, as the driver knows it.
                Err(_) if self.conn.close_reason().is_some() => {
                    Err(OpenError::LinkClosed(link.closed().await))
                }
                Err(e) => {
                    stream.abort();
                    Err(e)
                }
            }
        })
    }
}

/// The agent's way to take the streams the server opens.
#[derive(Debug)]
struct QuicAcceptor {
    conn: quinn::Connection,
    // Owns the UDP socket of this link.
    _endpoint: quinn::Endpoint,
}

impl Acceptor for QuicAcceptor {
    fn accept(&self) -> BoxFuture<'_, Result<Box<dyn Incoming>, SessionError>> {
        Box::pin(async move {
            let (send, recv) = self.conn.accept_bi().await.map_err(|e| reason_of(&e))?;
            Ok(Box::new(QuicStream { send, recv }) as Box<dyn Incoming>)
        })
    }
}

/// A native QUIC stream pair: first as the agent's incoming stream, then as the proxied one.
#[derive(Debug)]
struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Incoming for QuicStream {
    fn read_request(mut self: Box<Self>, timeout: Duration) -> RequestRead {
        Box::pin(async move {
            let header = tokio::time::timeout(
                timeout,
                read_frame::<proto::StreamOpen>(&mut self.recv, MAX_OPEN_LEN),
            )
            .await
            .map_err(|_| SessionError::Timeout("stream header"))
            .and_then(|r| r)
            .and_then(|m| Ok(OpenRequest::from_proto(m)?));
            match header {
                Ok(request) => Ok((request, self as Box<dyn Requested>)),
                Err(e) => {
                    self.abort();
                    Err(e)
                }
            }
        })
    }
}

impl Requested for QuicStream {
    fn withdrawn(&mut self) -> BoxFuture<'_, ()> {
        // The server stops reading (or resets) a stream it no longer waits for.
        Box::pin(async move {
            let _ = self.send.stopped().await;
        })
    }

    fn accept(mut self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn StreamIo>, SessionError>> {
        Box::pin(async move {
            let reply = proto::StreamOpenReply {
                result: proto::OpenResult::Ok.into(),
                detail: String::new(),
            };
            write_frame(&mut self.send, &reply).await?;
            Ok(self as Box<dyn StreamIo>)
        })
    }

    fn refuse(
        mut self: Box<Self>,
        reply: proto::StreamOpenReply,
    ) -> BoxFuture<'static, Result<(), SessionError>> {
        Box::pin(async move {
            write_frame(&mut self.send, &reply).await?;
            // Finishing (rather than dropping) makes the reply reach the server intact.
            let _ = self.send.finish();
            Ok(())
        })
    }
}

impl StreamIo for QuicStream {
    fn id(&self) -> u64 {
        self.send.id().index()
    }

    fn abort(&mut self) {
        let code = VarInt::from_u32(RESET_ABORTED);
        // Already finished or reset: nothing left to abort.
        let _ = self.send.reset(code);
        let _ = self.recv.stop(code);
    }

    fn delivered(&self, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            matches!(
                tokio::time::timeout(timeout, self.send.stopped()).await,
                Ok(Ok(None))
            )
        })
    }
}

impl tokio::io::AsyncRead for QuicStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for QuicStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        tokio::io::AsyncWrite::poll_write(std::pin::Pin::new(&mut self.get_mut().send), cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.get_mut().send), cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut self.get_mut().send), cx)
    }
}
