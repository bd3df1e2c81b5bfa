//! The library's front door: one [`Listener`] and one [`Connector`] for every transport, chosen
//! by configuration (QUIC, gRPC, or both / `auto`), as the binaries use them.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::debug;

use super::grpc::{GrpcConnector, GrpcListener};
use super::link::Welcome;
use super::quic::{Accepted, PendingSession, QuicConnector, QuicListener};
use super::{
    AgentSession, BindError, HandshakeError, ReplicaSession, Server, ServerSession, SessionConfig,
    TransportKind,
};
use crate::error::{CloseCause, SessionError};
use crate::proto;
use crate::route::PortPolicy;
use tokio::sync::{mpsc, watch};

/// The transports a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transports {
    /// QUIC on UDP.
    pub quic: bool,
    /// gRPC over TLS/TCP, for agents whose network blocks UDP.
    pub grpc: bool,
}

impl Default for Transports {
    fn default() -> Self {
        Self {
            quic: true,
            grpc: true,
        }
    }
}

impl std::str::FromStr for Transports {
    type Err = crate::error::ConfigError;

    /// `quic,grpc`, `quic` or `grpc`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: String| crate::error::ConfigError::Invalid {
            what: "transports",
            why,
        };
        let mut t = Self {
            quic: false,
            grpc: false,
        };
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "quic" => t.quic = true,
                "grpc" => t.grpc = true,
                other => return Err(invalid(format!("unknown transport {other:?} (quic, grpc)"))),
            }
        }
        if !t.quic && !t.grpc {
            return Err(invalid("at least one transport is needed".into()));
        }
        Ok(t)
    }
}

/// How a [`Listener`] runs.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Settings of every link.
    pub session: SessionConfig,
    /// This server's id, told to agents at registration.
    pub server_id: String,
    /// Which transports to serve (both by default, on one port number: UDP and TCP).
    pub transports: Transports,
    /// What QUIC's stateless-reset key is derived from. A server restarted with the same
    /// secret (its private key's bytes, say) tells the agents of its predecessor to reconnect
    /// at once instead of after their idle timeout. `None`: a random key.
    pub reset_secret: Option<Vec<u8>>,
    /// Which ports of its node each agent may dial: told to every agent at registration, and
    /// every change of it later, to agents that understand policies. `None`: agents follow
    /// their own flags alone.
    pub port_policy: Option<watch::Receiver<PortPolicy>>,
    /// Where peer links go: with a sender, QUIC takes links from other replicas (certificates
    /// with [`crate::tls::REPLICA_URI`]) and hands each over here; one that finds the queue
    /// full is closed (`busy`), and the replica dials again. Without one, a replica's
    /// certificate is refused as naming no node. gRPC never takes peer links.
    pub replicas: Option<mpsc::Sender<ReplicaSession>>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            server_id: "edge-tunnel-server".into(),
            transports: Transports::default(),
            reset_secret: None,
            port_policy: None,
            replicas: None,
        }
    }
}

/// The server's endpoint for agents: QUIC on UDP and gRPC on TCP at one port number.
#[derive(Debug)]
pub struct Listener {
    quic: Option<QuicListener>,
    grpc: Option<GrpcListener>,
    addr: SocketAddr,
    /// QUIC handshakes and registrations in progress.
    handshakes: JoinSet<Result<Accepted, HandshakeError>>,
    replicas: Option<mpsc::Sender<ReplicaSession>>,
    draining: bool,
}

/// Tries at picking a port free on both UDP and TCP when asked for port 0.
const PORT_PICKS: usize = 16;

impl Listener {
    /// Binds `addr` with the transports `config` asks for. `tls` must require client
    /// certificates (see [`crate::tls::server_config`]). With port 0 the kernel picks the TCP
    /// port and the same UDP port is tried; a taken one means another pick.
    pub async fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        config: ListenerConfig,
    ) -> Result<Self, BindError> {
        let want = config.transports;
        if !want.quic && !want.grpc {
            return Err(crate::error::ConfigError::Invalid {
                what: "transports",
                why: "at least one of QUIC and gRPC".into(),
            }
            .into());
        }
        let picks = if addr.port() == 0 && want.quic && want.grpc {
            PORT_PICKS
        } else {
            1
        };
        let mut last = None;
        for _ in 0..picks {
            let grpc = match want.grpc {
                true => Some(
                    GrpcListener::bind_welcoming(
                        addr,
                        tls.clone(),
                        config.session.clone(),
                        Welcome {
                            server_id: config.server_id.as_str().into(),
                            ports: config.port_policy.clone(),
                        },
                    )
                    .await?,
                ),
                false => None,
            };
            let port = grpc.as_ref().map_or(addr.port(), |g| g.local_addr().port());
            let quic = match want.quic {
                true => match bind_quic(SocketAddr::new(addr.ip(), port), &tls, &config) {
                    Ok(quic) => Some(quic),
                    Err(BindError::Io(e))
                        if picks > 1 && e.kind() == std::io::ErrorKind::AddrInUse =>
                    {
                        last = Some(e);
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                false => None,
            };
            let addr = match (&quic, &grpc) {
                (Some(q), _) => q.local_addr()?,
                (None, Some(g)) => g.local_addr(),
                (None, None) => addr,
            };
            return Ok(Self {
                quic,
                grpc,
                addr,
                handshakes: JoinSet::new(),
                replicas: config.replicas.clone(),
                draining: false,
            });
        }
        Err(BindError::Io(
            last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()),
        ))
    }

    /// The bound address (UDP for QUIC and TCP for gRPC: the same port number).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next agent: a registered session, or one that failed its handshake or registration
    /// (for the caller to log and count; nothing is logged here). `None` once no transport is
    /// left to listen on. QUIC handshakes progress only while this is awaited: call it in a
    /// loop of its own, not after connecting an agent from the same task.
    pub async fn accept(&mut self) -> Option<Result<ServerSession, HandshakeError>> {
        loop {
            if self.quic.is_none() && self.grpc.is_none() && self.handshakes.is_empty() {
                return None;
            }
            tokio::select! {
                pending = accept_quic(self.quic.as_ref()) => match pending {
                    // Agents move to another replica (or wait for the restart) at once.
                    Some(pending) if self.draining => pending.refuse(),
                    Some(pending) => {
                        self.handshakes.spawn(establish(pending));
                    }
                    None => self.quic = None,
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    // A panicked handshake is one agent fewer, not the listener's end.
                    match done {
                        Ok(Ok(Accepted::Agent(session))) => return Some(Ok(session)),
                        Ok(Ok(Accepted::Replica(peer))) => self.hand_over(peer),
                        Ok(Err(failure)) => return Some(Err(failure)),
                        Err(_) => {}
                    }
                }
                accepted = accept_grpc(self.grpc.as_mut()) => match accepted {
                    Some(accepted) => return Some(accepted),
                    None => self.grpc = None,
                },
            }
        }
    }

    /// Gives a peer link to whoever serves them; closed when nobody takes it now.
    fn hand_over(&self, peer: ReplicaSession) {
        let refused = match &self.replicas {
            Some(replicas) => replicas.try_send(peer).err().map(|e| match e {
                mpsc::error::TrySendError::Full(peer) | mpsc::error::TrySendError::Closed(peer) => {
                    peer
                }
            }),
            None => Some(peer),
        };
        if let Some(peer) = refused {
            debug!(peer.addr = %peer.remote_addr(), "peer link not taken: closing it");
            peer.close(CloseCause::Refused);
        }
    }

    /// Stops taking new agents: new QUIC connections are refused (so that agents move to
    /// another replica at once), the TCP listener is closed. QUIC handshakes in progress
    /// finish; gRPC ones end with the TCP listener.
    pub fn stop_accepting(&mut self) {
        self.draining = true;
        self.grpc = None;
    }

    /// Closes every QUIC link at once, for `cause`, and waits (at most `timeout`) for the
    /// agents to acknowledge. gRPC links end with their sessions.
    pub async fn close(&mut self, cause: CloseCause, timeout: Duration) -> bool {
        self.handshakes.shutdown().await;
        let Some(quic) = &self.quic else {
            return true;
        };
        quic.close(cause);
        tokio::time::timeout(timeout, quic.wait_idle())
            .await
            .is_ok()
    }
}

fn bind_quic(
    addr: SocketAddr,
    tls: &rustls::ServerConfig,
    config: &ListenerConfig,
) -> Result<QuicListener, BindError> {
    let (session, id) = (config.session.clone(), config.server_id.as_str());
    let replicas = config.replicas.is_some();
    let quic = match &config.reset_secret {
        Some(secret) => {
            QuicListener::bind_with_reset_secret(addr, tls.clone(), session, id, secret)
        }
        None => QuicListener::bind(addr, tls.clone(), session, id),
    };
    quic.map(|q| {
        q.with_port_policy(config.port_policy.clone())
            .with_replicas(replicas)
    })
}

async fn accept_quic(quic: Option<&QuicListener>) -> Option<PendingSession> {
    match quic {
        Some(quic) => quic.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_grpc(
    grpc: Option<&mut GrpcListener>,
) -> Option<Result<ServerSession, HandshakeError>> {
    match grpc {
        Some(grpc) => grpc.accept().await,
        None => std::future::pending().await,
    }
}

async fn establish(pending: PendingSession) -> Result<Accepted, HandshakeError> {
    let remote = pending.remote_addr();
    pending.establish().await.map_err(|error| HandshakeError {
        remote,
        transport: TransportKind::Quic,
        error,
    })
}

/// Which transport an agent uses to reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// QUIC first; gRPC over TLS/TCP when no QUIC session is up within [`QUIC_FIRST`].
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// gRPC only (networks that block UDP).
    Grpc,
}

impl TransportChoice {
    /// Lowercase label, as the flag takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Quic => "quic",
            Self::Grpc => "grpc",
        }
    }
}

impl std::str::FromStr for TransportChoice {
    type Err = crate::error::ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Quic),
            "grpc" => Ok(Self::Grpc),
            other => Err(crate::error::ConfigError::Invalid {
                what: "transport",
                why: format!("unknown transport {other:?} (auto, quic, grpc)"),
            }),
        }
    }
}

/// How long `auto` gives QUIC before it tries gRPC on the same address.
pub const QUIC_FIRST: Duration = Duration::from_secs(3);

/// The agent's side: connects to a server over the configured transport.
#[derive(Debug, Clone)]
pub struct Connector {
    quic: QuicConnector,
    grpc: GrpcConnector,
    choice: TransportChoice,
}

impl Connector {
    /// A connector presenting the client certificate in `tls`, over `choice`.
    pub fn new(
        tls: rustls::ClientConfig,
        config: SessionConfig,
        choice: TransportChoice,
    ) -> Result<Self, BindError> {
        Ok(Self {
            quic: QuicConnector::new(tls.clone(), config.clone())?,
            grpc: GrpcConnector::new(tls, config),
            choice,
        })
    }

    /// The configured choice.
    pub fn choice(&self) -> TransportChoice {
        self.choice
    }

    /// Connects to `addr`, verifying the server as `server_name`, and registers with
    /// `register`'s claims (the server takes the node name from our certificate).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        register: proto::Register,
    ) -> Result<AgentSession, SessionError> {
        self.connect_over(self.choice, addr, server_name, register)
            .await
    }

    /// As [`connect`](Self::connect), over `choice` rather than the configured one (`auto`
    /// tries QUIC again this way while it runs over gRPC).
    pub async fn connect_over(
        &self,
        choice: TransportChoice,
        addr: SocketAddr,
        server_name: &str,
        register: proto::Register,
    ) -> Result<AgentSession, SessionError> {
        let server = Server {
            addr,
            name: server_name,
        };
        match choice {
            TransportChoice::Quic => self.quic.connect(server, register).await,
            TransportChoice::Grpc => self.grpc.connect(server, register).await,
            TransportChoice::Auto => {
                let quic = self.quic.connect(server, register.clone());
                match tokio::time::timeout(QUIC_FIRST, quic).await {
                    Ok(Ok(session)) => return Ok(session),
                    Ok(Err(e)) => debug!(%addr, error = %e, "QUIC failed; trying gRPC"),
                    Err(_) => debug!(%addr, "no QUIC session within {QUIC_FIRST:?}; trying gRPC"),
                }
                self.grpc.connect(server, register).await
            }
        }
    }
}
