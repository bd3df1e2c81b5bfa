//! The QUIC transport (quinn): the agent dials; its first bidirectional stream is the control
//! channel; the server opens one bidirectional stream per proxied connection, writes the
//! stream-open header, reads the agent's answer, then both sides move raw bytes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use quinn::VarInt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, debug_span, info, warn};

use super::session::{AgentConn, Command, Link, LocalClose, RequestedInner, ServerConn};
use super::{AgentSession, LinkState, RequestedStream, ServerSession, SessionConfig, TunnelStream};
use crate::control::{Control, ControlError, Event};
use crate::error::{ConfigError, OpenError, Refusal, SessionError};
use crate::proto::{self, DecodeError, MAX_CONTROL_LEN, MAX_OPEN_LEN, OpenRequest};
use crate::tls::{ALPN_QUIC, AgentIdentity};

/// Connection close codes, so that each side's logs say who ended the link and why.
pub(crate) const CLOSE_BY_SERVER: u32 = 0;
pub(crate) const CLOSE_BY_AGENT: u32 = 0;
const CLOSE_PROTOCOL: u32 = 1;
const CLOSE_DEAD_PEER: u32 = 2;

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
    server_id: Arc<str>,
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
            .map_err(|_| ConfigError::Quic("no randomness for the stateless reset key".into()))?;
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
        let crypto = QuicServerConfig::try_from(Arc::new(tls))
            .map_err(|e| ConfigError::Quic(e.to_string()))?;
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
            server_id: server_id.into(),
        })
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
            server_id: self.server_id.clone(),
        })
    }

    /// Stops accepting and closes every link.
    pub fn close(&self, reason: &str) {
        self.endpoint
            .close(VarInt::from_u32(CLOSE_BY_SERVER), reason.as_bytes());
    }

    /// Resolves when every link of this endpoint is gone.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// Why a listener or connector could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The TLS configuration does not fit QUIC.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The UDP socket could not be bound.
    #[error("bind: {0}")]
    Io(#[from] std::io::Error),
}

/// An agent's connection attempt, before the handshake.
#[derive(Debug)]
pub struct PendingSession {
    incoming: quinn::Incoming,
    config: Arc<SessionConfig>,
    server_id: Arc<str>,
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
    pub async fn establish(self) -> Result<ServerSession, SessionError> {
        let remote = self.incoming.remote_address();
        let config = self.config;
        let conn = tokio::time::timeout(config.handshake_timeout, self.incoming.accept()?)
            .await
            .map_err(|_| SessionError::Timeout("quic handshake"))??;
        let identity = peer_identity(&conn)?;
        let span = debug_span!("session", agent.id = %identity.node_name, peer.addr = %remote);
        let result = async {
            let (send, recv) =
                tokio::time::timeout(config.control.register_timeout, conn.accept_bi())
                    .await
                    .map_err(|_| SessionError::Timeout("control stream"))??;
            let mut io = ControlIo::new(send, recv);
            let mut control = Control::server(now(), config.control.clone());
            let claims = match io.until_event(&mut control).await? {
                Event::RegisterReceived(r) => r,
                other => {
                    return Err(SessionError::Protocol(ControlError::Unexpected {
                        message: event_name(&other),
                        state: "await-register",
                    }));
                }
            };
            if claims.node_name != identity.node_name && !claims.node_name.is_empty() {
                warn!(
                    agent.claimed = %claims.node_name,
                    "agent claims another node name; using its certificate's"
                );
            }
            control.accept_registration(
                now(),
                proto::Registered {
                    node_name: identity.node_name.clone(),
                    server_id: self.server_id.to_string(),
                },
            )?;
            io.flush(&mut control).await?;
            let link = spawn_driver(control, io, conn.clone(), span.clone());
            Ok(ServerSession::new(
                identity,
                claims,
                remote,
                config.clone(),
                ServerConn::Quic(conn.clone()),
                link,
            ))
        }
        .instrument(span.clone())
        .await;
        if let Err(e) = &result {
            close(
                &conn,
                if e.is_peer() {
                    CLOSE_PROTOCOL
                } else {
                    CLOSE_DEAD_PEER
                },
                &e.to_string(),
            );
        }
        result
    }
}

fn peer_identity(conn: &quinn::Connection) -> Result<AgentIdentity, SessionError> {
    let chain = conn.peer_identity().and_then(|any| {
        any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()
    });
    Ok(AgentIdentity::from_chain(
        chain.as_deref().map(Vec::as_slice),
    )?)
}

/// The agent's side: dials servers.
#[derive(Debug, Clone)]
pub struct QuicConnector {
    client: quinn::ClientConfig,
    config: Arc<SessionConfig>,
}

impl QuicConnector {
    /// A connector presenting the client certificate in `tls`.
    pub fn new(mut tls: rustls::ClientConfig, config: SessionConfig) -> Result<Self, BindError> {
        if tls.alpn_protocols.is_empty() {
            tls.alpn_protocols = vec![ALPN_QUIC.to_vec()];
        }
        let crypto = QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| ConfigError::Quic(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport_config(&config, config.max_streams)));
        Ok(Self {
            client,
            config: Arc::new(config),
        })
    }

    /// Dials `addr`, verifying the server as `server_name`, and registers with `register`'s
    /// claims. Each link gets its own UDP socket, so a reconnect after a NAT rebinding starts
    /// clean.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        register: proto::Register,
    ) -> Result<AgentSession, SessionError> {
        let bind: SocketAddr = if addr.is_ipv4() {
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
        let connecting = endpoint.connect_with(self.client.clone(), addr, server_name)?;
        let conn = tokio::time::timeout(config.handshake_timeout, connecting)
            .await
            .map_err(|_| SessionError::Timeout("quic handshake"))??;
        let span = debug_span!("session", peer.addr = %addr);
        let result = async {
            let (send, recv) = conn.open_bi().await?;
            let mut io = ControlIo::new(send, recv);
            let mut control = Control::agent(now(), config.control.clone(), register);
            let registered = match io.until_event(&mut control).await? {
                Event::Registered(r) => r,
                other => {
                    return Err(SessionError::Protocol(ControlError::Unexpected {
                        message: event_name(&other),
                        state: "await-registered",
                    }));
                }
            };
            let link = spawn_driver(control, io, conn.clone(), span.clone());
            Ok((registered, link))
        }
        .instrument(span.clone())
        .await;
        match result {
            Ok((registered, link)) => Ok(AgentSession::new(
                registered,
                addr,
                config,
                AgentConn::Quic {
                    conn,
                    _endpoint: endpoint,
                },
                link,
            )),
            Err(e) => {
                close(&conn, CLOSE_PROTOCOL, &e.to_string());
                Err(e)
            }
        }
    }
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::RegisterReceived(_) => "register",
        Event::Registered(_) => "registered",
        Event::GoAway { .. } => "go-away",
        Event::Dial(_) => "dial",
        Event::Cancel(_) => "cancel",
    }
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

pub(crate) fn close(conn: &quinn::Connection, code: u32, reason: &str) {
    let reason: String = reason.chars().take(100).collect();
    conn.close(VarInt::from_u32(code), reason.as_bytes());
}

/// The control stream's bytes, framed.
struct ControlIo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
    out: BytesMut,
}

impl ControlIo {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: BytesMut::with_capacity(256),
            out: BytesMut::with_capacity(256),
        }
    }

    /// Writes every queued message. Bounded in time by the caller's deadlines: the control
    /// stream's window is far larger than what a live peer leaves unread.
    async fn flush(&mut self, control: &mut Control) -> Result<(), SessionError> {
        while let Some(msg) = control.poll_transmit() {
            proto::encode_frame(&msg, &mut self.out)?;
        }
        if !self.out.is_empty() {
            self.send.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Feeds every complete frame in the buffer to `control`.
    fn feed(&mut self, control: &mut Control) -> Result<(), SessionError> {
        loop {
            match proto::decode_frame::<proto::Control>(&self.buf, MAX_CONTROL_LEN) {
                Ok((msg, used)) => {
                    self.buf.advance(used);
                    control.handle_message(now(), msg)?;
                }
                Err(e) if e.is_incomplete() => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads one chunk; an end of stream is an error (the control stream lives as long as the
    /// link).
    async fn read(&mut self) -> Result<(), SessionError> {
        if self.recv.read_buf(&mut self.buf).await? == 0 {
            return Err(SessionError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "control stream ended",
            )));
        }
        Ok(())
    }

    /// Drives `control` until it reports an event (the handshake steps), honouring its deadlines.
    async fn until_event(&mut self, control: &mut Control) -> Result<Event, SessionError> {
        loop {
            self.flush(control).await?;
            if let Some(ev) = control.poll_event() {
                return Ok(ev);
            }
            let deadline = control.poll_timeout();
            tokio::select! {
                r = self.read() => { r?; self.feed(control)?; }
                () = sleep_until(deadline) => control.handle_timeout(now())?,
            }
        }
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn spawn_driver(
    control: Control,
    io: ControlIo,
    conn: quinn::Connection,
    span: tracing::Span,
) -> Link {
    Link::spawn(4, span, |rx, state, local_close| {
        drive(control, io, conn, rx, state, local_close)
    })
}

/// One task per link: control messages in and out, pings, go-away, and the link's end.
async fn drive(
    mut control: Control,
    mut io: ControlIo,
    conn: quinn::Connection,
    mut commands: mpsc::Receiver<Command>,
    state: watch::Sender<LinkState>,
    local_close: LocalClose,
) {
    let result: Result<(), SessionError> = async {
        loop {
            io.flush(&mut control).await?;
            while let Some(ev) = control.poll_event() {
                if let Event::GoAway { reason, drain } = ev {
                    info!(%reason, ?drain, "peer sent go-away");
                    state.send_replace(LinkState::Draining { reason });
                }
            }
            let deadline = control.poll_timeout();
            tokio::select! {
                r = io.read() => { r?; io.feed(&mut control)?; }
                () = sleep_until(deadline) => control.handle_timeout(now())?,
                cmd = commands.recv() => match cmd {
                    Some(Command::GoAway { reason, drain }) => {
                        control.go_away(reason.clone(), drain);
                        state.send_replace(LinkState::Draining { reason });
                    }
                    // Dials and cancels are the gRPC transport's; QUIC opens streams directly.
                    Some(Command::Dial(_) | Command::Cancel(_)) => {}
                    Some(Command::Close) | None => return Ok(()),
                },
                e = conn.closed() => return Err(e.into()),
            }
        }
    }
    .await;
    let local = Link::local_reason(&local_close);
    let reason = match (&result, conn.close_reason()) {
        (_, Some(quinn::ConnectionError::LocallyClosed)) if local.is_some() => {
            local.unwrap_or_default()
        }
        (_, Some(quinn::ConnectionError::ApplicationClosed(close))) => {
            format!("closed by peer: {}", String::from_utf8_lossy(&close.reason))
        }
        (Ok(()), _) => "closed".to_owned(),
        (Err(e), _) => {
            let code = match e {
                SessionError::Protocol(ControlError::PingTimeout { .. }) => CLOSE_DEAD_PEER,
                e if e.is_peer() => CLOSE_PROTOCOL,
                _ => CLOSE_DEAD_PEER,
            };
            close(&conn, code, &e.to_string());
            e.to_string()
        }
    };
    // What an operator needs to tell a lossy path from a slow peer.
    let stats = conn.stats();
    debug!(
        %reason,
        rtt = ?stats.path.rtt,
        path_mtu = stats.path.current_mtu,
        sent_packets = stats.path.sent_packets,
        lost_packets = stats.path.lost_packets,
        congestion_events = stats.path.congestion_events,
        black_holes = stats.path.black_holes_detected,
        "link ended"
    );
    state.send_replace(LinkState::Closed { reason });
}

/// Reads exactly one frame from a stream, nothing past it.
async fn read_frame<M: prost::Message + Default>(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<M, SessionError> {
    let mut prefix = [0u8; proto::FRAME_HEADER_LEN];
    recv.read_exact(&mut prefix).await?;
    let len = proto::frame_len(&prefix, limit)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(M::decode(&body[..]).map_err(DecodeError::from)?)
}

pub(crate) async fn open(
    conn: &quinn::Connection,
    request: &OpenRequest,
    config: &SessionConfig,
    count: super::session::StreamGuard,
) -> Result<TunnelStream, OpenError> {
    let timeout = config.open_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut send, mut recv) = tokio::time::timeout_at(deadline, conn.open_bi())
        .await
        .map_err(|_| OpenError::Timeout(timeout))?
        .map_err(|e| OpenError::SessionClosed(e.to_string()))?;
    let header = proto::frame(&request.to_proto())?;
    let exchange = async {
        send.write_all(&header)
            .await
            .map_err(|e| OpenError::Io(e.into()))?;
        read_frame::<proto::StreamOpenReply>(&mut recv, MAX_OPEN_LEN)
            .await
            .map_err(|e| match e {
                SessionError::Decode(d) => OpenError::Protocol(d),
                other => OpenError::Io(std::io::Error::other(other)),
            })
    };
    let reply = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => {
            abort(&mut send, &mut recv);
            return Err(e);
        }
        Err(_) => {
            // The agent may still be dialing; the reset tells it to drop the result.
            abort(&mut send, &mut recv);
            return Err(OpenError::Timeout(timeout));
        }
    };
    let refusal = match proto::OpenResult::try_from(reply.result) {
        Ok(proto::OpenResult::Ok) => return Ok(TunnelStream::quic(send, recv, count)),
        Ok(proto::OpenResult::Forbidden) => Refusal::Forbidden,
        Ok(proto::OpenResult::Refused) => Refusal::Refused,
        Ok(proto::OpenResult::Timeout) => Refusal::Timeout,
        Ok(proto::OpenResult::Unreachable) => Refusal::Unreachable,
        Ok(proto::OpenResult::Unspecified) | Err(_) => {
            abort(&mut send, &mut recv);
            return Err(OpenError::Protocol(DecodeError::Invalid(
                "unknown open result",
            )));
        }
    };
    Err(OpenError::Refused {
        refusal,
        detail: reply.detail.chars().take(200).collect(),
        target: request.target,
    })
}

fn abort(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) {
    let code = VarInt::from_u32(1);
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

pub(crate) async fn read_request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    timeout: Duration,
    guard: super::session::StreamGuard,
) -> Result<RequestedStream, SessionError> {
    let header = tokio::time::timeout(
        timeout,
        read_frame::<proto::StreamOpen>(&mut recv, MAX_OPEN_LEN),
    )
    .await
    .map_err(|_| SessionError::Timeout("stream header"))
    .and_then(|r| r)
    .and_then(|m| Ok(OpenRequest::from_proto(m)?));
    match header {
        Ok(request) => Ok(RequestedStream {
            request,
            inner: RequestedInner::Quic { send, recv },
            guard,
        }),
        Err(e) => {
            abort(&mut send, &mut recv);
            Err(e)
        }
    }
}

pub(crate) async fn write_reply(
    send: &mut quinn::SendStream,
    reply: &proto::StreamOpenReply,
) -> Result<(), SessionError> {
    let frame = proto::frame(reply)?;
    send.write_all(&frame).await?;
    Ok(())
}
