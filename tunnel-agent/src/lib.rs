//! # tunnel-agent
//!
//! The edge side of edge-tunnel: one per node. It dials out to the server (QUIC, mutual TLS),
//! keeps the link up across weak networks (keepalive, ping, reconnect with jittered backoff),
//! and serves the streams the server opens, dialing only its own node's addresses and loopback,
//! on allowed ports. Everything else gets a typed refusal and no dial.
#![forbid(unsafe_code)]

pub mod allowlist;
pub mod certs;
pub mod cli;
pub mod config;
pub mod connector;
mod forward;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_core::{AgentSession, LinkState, QuicConnector, TransportKind, proto};
use tunnel_process::drain;
use tunnel_process::meta::{MetaServer, MetaState};

use tunnel_core::TransportChoice;

pub use allowlist::Allowlist;
pub use config::{AgentConfig, Backoff, ConfigError};

/// Where the agent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    /// No session (starting, or waiting to reconnect).
    Disconnected,
    /// Registered with a server.
    Connected {
        /// The node name the server registered us under.
        node_name: String,
        /// The server replica's id.
        server_id: String,
        /// The server's address.
        server: SocketAddr,
    },
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration or its files are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The meta listener could not be bound.
    #[error("cannot listen on --meta-port {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) struct Shared {
    pub(crate) config: AgentConfig,
    pub(crate) allowlist: Allowlist,
}

/// An agent ready to run.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    status: watch::Sender<AgentStatus>,
}

impl Agent {
    /// An agent for `config` (validated when it runs).
    pub fn new(config: AgentConfig) -> Self {
        Self {
            config,
            status: watch::Sender::new(AgentStatus::Disconnected),
        }
    }

    /// Watches the agent's status.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown` resolves: connect, serve, reconnect. Returns an error only for
    /// problems a restart would not fix (configuration, files).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let Self { config, status } = self;
        config.validate()?;
        let loaded = certs::load(&config).await?;
        let quic =
            QuicConnector::new(loaded.client.clone(), config.session.clone()).map_err(|e| {
                ConfigError::Invalid {
                    what: "TLS configuration for QUIC",
                    why: e.to_string(),
                }
            })?;
        let connector = dialer::Connectors {
            quic,
            grpc: tunnel_core::GrpcConnector::new(loaded.client, config.session.clone()),
            choice: config.transport,
        };
        let dialer = dialer::ServerDialer::new(
            &config.server_address,
            config.server_name.as_deref(),
            connector,
        )?;
        let register = proto::Register {
            node_name: if config.node_name.is_empty() {
                loaded.identity.node_name.clone()
            } else {
                config.node_name.clone()
            },
            node_ips: loaded.dial_ips.iter().map(ToString::to_string).collect(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let ready = Arc::new(AtomicBool::new(false));
        let mut meta = None;
        if config.meta_port != 0 {
            let addr = SocketAddr::new(config.meta_bind_address, config.meta_port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Bind { addr, source })?;
            let state = MetaState {
                ready: ready.clone(),
                metrics: config.metrics.clone(),
            };
            meta = Some(MetaServer::spawn(listener, state));
        }
        let shared = Arc::new(Shared {
            allowlist: Allowlist::new(
                loaded.dial_ips.clone(),
                config.allowed_ports.clone(),
                config.localhost_proxy_ports.clone(),
            ),
            config,
        });
        info!(
            node = %loaded.identity.node_name,
            node.ips = ?loaded.dial_ips,
            server = %shared.config.server_address,
            "tunnel agent starting"
        );

        let mut streams = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut failures: u32 = 0;
        // A session that came up while another was serving (QUIC found again): served next.
        let mut next: Option<AgentSession> = None;
        'outer: loop {
            let attempt = match next.take() {
                Some(session) => Ok(session),
                None => tokio::select! {
                    r = dialer.connect(&register) => r,
                    () = &mut shutdown => break 'outer,
                },
            };
            match attempt {
                Ok(session) => {
                    let connected_at = tokio::time::Instant::now();
                    let transport = session.transport().as_str();
                    metrics::counter!("edge_tunnel_agent_connects_total", "result" => "ok", "transport" => transport)
                        .increment(1);
                    info!(
                        node = session.node_name(),
                        server.id = session.server_id(),
                        server.addr = %session.remote_addr(),
                        transport = %session.transport(),
                        "connected"
                    );
                    status.send_replace(AgentStatus::Connected {
                        node_name: session.node_name().to_owned(),
                        server_id: session.server_id().to_owned(),
                        server: session.remote_addr(),
                    });
                    ready.store(true, Ordering::Release);
                    let up =
                        metrics::gauge!("edge_tunnel_agent_session_up", "transport" => transport);
                    up.set(1.0);
                    let session = Arc::new(session);
                    let span =
                        info_span!("session", server.addr = %session.remote_addr(), transport);
                    let end = serve_session(
                        &shared,
                        &session,
                        Upgrade {
                            dialer: &dialer,
                            register: &register,
                        },
                        &mut streams,
                        &mut shutdown,
                    )
                    .instrument(span)
                    .await;
                    up.set(0.0);
                    if !matches!(end, SessionEnd::Moved(_)) {
                        ready.store(false, Ordering::Release);
                        status.send_replace(AgentStatus::Disconnected);
                    }
                    match end {
                        SessionEnd::Moved(newer) => {
                            info!(
                                from = transport,
                                to = %newer.transport(),
                                "moved to a QUIC session; the old one finishes its open streams"
                            );
                            metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => "quic_again").increment(1);
                            retire(&mut streams, &shared, session, Retirement::Moved);
                            next = Some(*newer);
                            continue 'outer;
                        }
                        SessionEnd::Shutdown => {
                            retire(&mut streams, &shared, session, Retirement::ShuttingDown);
                            break 'outer;
                        }
                        SessionEnd::Lost(reason) => {
                            warn!(%reason, "session lost; reconnecting");
                            // Only a session that lasted resets the backoff: two agents with
                            // one certificate, replacing each other, must not flap every second.
                            if connected_at.elapsed() >= STABLE_SESSION {
                                failures = 0;
                            }
                            metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => "lost")
                                .increment(1);
                        }
                        SessionEnd::Draining(reason) => {
                            // The server is leaving: its open streams go on while we move.
                            info!(%reason, "server sent go-away; reconnecting");
                            metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => "go_away").increment(1);
                            retire(&mut streams, &shared, session, Retirement::ServerLeaving);
                            // After a session that lasted, move at once. A short one (another
                            // agent with our certificate keeps replacing us) backs off instead,
                            // so that two such agents do not take turns at full speed.
                            if connected_at.elapsed() >= STABLE_SESSION {
                                failures = 0;
                                continue 'outer;
                            }
                        }
                    }
                }
                Err(e) => {
                    metrics::counter!("edge_tunnel_agent_connects_total", "result" => "error", "transport" => "none")
                        .increment(1);
                    if e.is_peer() {
                        warn!(error = %e, "server rejected the agent; check the certificate and CA");
                    } else {
                        warn!(error = %e, "cannot reach the server");
                    }
                }
            }
            let delay = shared.config.backoff.delay(failures, rand::random::<f64>());
            failures = failures.saturating_add(1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut shutdown => break 'outer,
            }
        }
        // Let open streams finish, within the drain timeout. Aborting the rest drops the
        // sessions they hold, which closes those links.
        drain::join_set(&mut streams, shared.config.drain_timeout).await;
        if let Some(meta) = meta {
            meta.stop().await;
        }
        info!("tunnel agent stopped");
        Ok(())
    }
}

/// A session that lasted this long counts as healthy for the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);

enum SessionEnd {
    Shutdown,
    Lost(String),
    Draining(String),
    /// `auto` found QUIC again while serving over gRPC: this session is the successor.
    Moved(Box<AgentSession>),
}

/// What serving over gRPC needs to try QUIC again.
struct Upgrade<'a> {
    dialer: &'a dialer::ServerDialer,
    register: &'a proto::Register,
}

type Attempt<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<AgentSession, dialer::DialError>> + Send + 'a>>;

impl<'a> Upgrade<'a> {
    /// Whether `auto` should look for QUIC again while on `current`.
    fn wanted(&self, current: TransportKind) -> bool {
        self.dialer.choice() == TransportChoice::Auto && current == TransportKind::Grpc
    }

    fn attempt(&self) -> Attempt<'a> {
        let (dialer, register) = (self.dialer, self.register);
        Box::pin(async move { dialer.connect_over(TransportChoice::Quic, register).await })
    }
}

/// How a session ended, unless a QUIC attempt in flight succeeds: the server retires the gRPC
/// session that the new QUIC one replaces, so the go-away may arrive before our own
/// registration answer does. The attempt is bounded by the handshake timeout.
async fn unless_moved(attempt: Option<Attempt<'_>>, end: SessionEnd) -> SessionEnd {
    match attempt {
        Some(attempt) => match attempt.await {
            Ok(newer) => SessionEnd::Moved(Box::new(newer)),
            Err(e) => {
                debug!(error = %e, "QUIC attempt failed");
                end
            }
        },
        None => end,
    }
}

/// Why a session is retired, which says who ends it.
#[derive(Debug, Clone, Copy)]
enum Retirement {
    /// A newer session took over (QUIC found again): go-away, then the server closes it.
    Moved,
    /// The agent stops: go-away, and close it as soon as it is idle.
    ShuttingDown,
    /// The server sent go-away: it closes the session after its own drain.
    ServerLeaving,
}

/// Retires `session` in a task of `streams` (so shutdown waits for it): tells the server we
/// are leaving (unless it is the one leaving), and goes on serving what the server opened
/// before it heard (a stream or dial may cross the go-away on the wire) until the link closes.
/// The server closes it once its side of the streams is done, by when every byte has arrived;
/// a close from here could cut bytes in flight, so the agent closes it itself only after its
/// drain timeout (a server that never does, or one on another replica), or, when shutting
/// down, once it is idle.
fn retire(
    streams: &mut JoinSet<()>,
    shared: &Arc<Shared>,
    session: Arc<AgentSession>,
    why: Retirement,
) {
    let drain = shared.config.drain_timeout;
    let (deadline, close_when_idle) = match why {
        Retirement::Moved => {
            session.go_away("agent moved to another session", drain);
            (Some(drain), false)
        }
        Retirement::ShuttingDown => {
            session.go_away("agent shutting down", drain);
            (Some(drain), true)
        }
        Retirement::ServerLeaving => (None, false),
    };
    let shared = shared.clone();
    streams.spawn(
        async move {
            let expiry = async {
                match deadline {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let mut expiry = std::pin::pin!(expiry);
            let mut open = JoinSet::new();
            loop {
                tokio::select! {
                    incoming = session.accept() => match incoming {
                        Ok(incoming) => {
                            open.spawn(forward::serve(shared.clone(), incoming).in_current_span());
                        }
                        Err(_) => break,
                    },
                    _ = session.closed() => break,
                    // Shutting down: nothing more will be asked of this link once it is idle.
                    () = session.idle(), if close_when_idle => {
                        session.close("agent shutting down");
                        break;
                    }
                    () = &mut expiry => {
                        warn!(open = session.open_streams(), "old session still open after the drain timeout; closing it");
                        session.close("agent drain timeout");
                        break;
                    }
                    Some(_) = open.join_next(), if !open.is_empty() => {}
                }
            }
            // The streams of a closed link end with it.
            while open.join_next().await.is_some() {}
        }
        .in_current_span(),
    );
}

/// `end`, unless shutdown comes first (an in-flight QUIC attempt must not delay it).
async fn until_shutdown(
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    end: impl Future<Output = SessionEnd>,
) -> SessionEnd {
    tokio::select! {
        end = end => end,
        () = shutdown.as_mut() => SessionEnd::Shutdown,
    }
}

async fn serve_session(
    shared: &Arc<Shared>,
    session: &Arc<AgentSession>,
    upgrade: Upgrade<'_>,
    streams: &mut JoinSet<()>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> SessionEnd {
    // With `auto` over gRPC: every `quic_retry_interval`, one QUIC attempt in the background.
    let upgrading = upgrade.wanted(session.transport());
    let interval = shared.config.quic_retry_interval;
    let retry = tokio::time::sleep(interval);
    let mut retry = std::pin::pin!(retry);
    let mut attempt: Option<Attempt<'_>> = None;
    loop {
        tokio::select! {
            () = retry.as_mut(), if upgrading && attempt.is_none() => attempt = Some(upgrade.attempt()),
            done = async { attempt.as_mut().expect("guarded by is_some").await }, if attempt.is_some() => {
                attempt = None;
                match done {
                    Ok(newer) => return SessionEnd::Moved(Box::new(newer)),
                    Err(e) => {
                        debug!(error = %e, "QUIC still unavailable; staying on gRPC");
                        retry.as_mut().reset(tokio::time::Instant::now() + interval);
                    }
                }
            },
            incoming = session.accept() => match incoming {
                Ok(incoming) => {
                    let shared = shared.clone();
                    // Each stream holds the session, so a draining link lives until its
                    // streams end.
                    let session = session.clone();
                    streams.spawn(
                        async move {
                            forward::serve(shared, incoming).await;
                            drop(session);
                        }
                        .in_current_span(),
                    );
                }
                Err(e) => return until_shutdown(shutdown, unless_moved(attempt, SessionEnd::Lost(e.to_string()))).await,
            },
            state = session.draining() => match state {
                LinkState::Draining { reason } => {
                    return until_shutdown(shutdown, unless_moved(attempt, SessionEnd::Draining(reason))).await;
                }
                LinkState::Closed { reason } => {
                    return until_shutdown(shutdown, unless_moved(attempt, SessionEnd::Lost(reason))).await;
                }
                LinkState::Active => {}
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            () = shutdown.as_mut() => return SessionEnd::Shutdown,
        }
    }
}

/// Runs an agent for `config` until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    Agent::new(config).run(shutdown).await
}
