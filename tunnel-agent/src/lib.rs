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
mod reconnect;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_core::{
    AgentSession, CloseCause, CloseReason, Connector, Initiator, LinkState, TransportChoice,
    TransportKind, proto,
};
use tunnel_process::drain;
use tunnel_process::meta::{MetaServer, MetaState};

use crate::connector::{ConnectError, ServerConnector};
use crate::reconnect::Reconnect;

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
    /// Bounds the agent's refused-stream lines: a server that asks again and again for a
    /// forbidden port must not flood the node's log.
    pub(crate) refusals: tunnel_process::throttle::LogThrottle,
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
        let ready = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Slots::new(config.server_redundancy, status, ready.clone()));
        let drain_timeout = config.drain_timeout;
        let redundancy = config.server_redundancy;
        let first = Links::prepare(config, slots).await?;
        let others: Vec<Links> = (1..redundancy).map(|slot| first.slot(slot)).collect();
        let mut all = vec![first];
        all.extend(others);
        let meta = all[0].start_meta(ready).await?;
        // The slots connect, serve and reconnect side by side on this task until the
        // shutdown (the streams they carry run on tasks of their own).
        let (stop, stopped) = watch::channel(false);
        let slots = all.iter_mut().map(|links| {
            let mut stopped = stopped.clone();
            async move {
                links
                    .run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await;
                // Their open streams get the drain, all slots' at once.
                drain::join_set(&mut links.streams, drain_timeout).await;
            }
        });
        let running = futures_util::future::join_all(slots);
        let stopping = async {
            shutdown.await;
            let _ = stop.send(true);
        };
        tokio::join!(running, stopping);
        if let Some(meta) = meta {
            meta.stop().await;
        }
        info!("tunnel agent stopped");
        Ok(())
    }
}

/// What the agent's slots share (one per session kept at once, `--server-redundancy`): whom
/// each is connected to, which makes the agent's status (the first slot connected) and its
/// readiness (any slot connected), and which replicas another slot must not register with.
#[derive(Debug)]
struct Slots {
    connected: std::sync::Mutex<Vec<Option<AgentStatus>>>,
    status: watch::Sender<AgentStatus>,
    ready: Arc<AtomicBool>,
}

impl Slots {
    fn new(n: usize, status: watch::Sender<AgentStatus>, ready: Arc<AtomicBool>) -> Self {
        Self {
            connected: std::sync::Mutex::new(vec![None; n]),
            status,
            ready,
        }
    }

    /// Slot `slot` is now `state` (`None`: not connected).
    fn set(&self, slot: usize, state: Option<AgentStatus>) {
        let mut connected = self
            .connected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = connected.get_mut(slot) {
            *entry = state;
        }
        let first = connected.iter().flatten().next().cloned();
        self.ready.store(first.is_some(), Ordering::Release);
        self.status
            .send_replace(first.unwrap_or(AgentStatus::Disconnected));
    }

    /// The server ids the other slots are connected to.
    fn others(&self, slot: usize) -> Vec<String> {
        let connected = self
            .connected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        connected
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != slot)
            .filter_map(|(_, state)| match state {
                Some(AgentStatus::Connected { server_id, .. }) => Some(server_id.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The agent at work: its links to the server one after the other, the streams they carry,
/// and when to connect again.
struct Links {
    shared: Arc<Shared>,
    server: ServerConnector,
    register: proto::Register,
    slots: Arc<Slots>,
    /// Which of the agent's slots this is (0 unless `--server-redundancy` is more than 1).
    slot: usize,
    /// Every stream's task, and every retired session's, so that shutdown drains them.
    streams: JoinSet<()>,
    reconnect: Reconnect,
    /// Sessions whose link is not closed on our side: the one served and those retiring.
    live: Arc<AtomicUsize>,
}

/// Counts a session in [`Links::live`] while it is held; goes with the session to its
/// retirement.
struct LiveSession(Arc<AtomicUsize>);

impl LiveSession {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::AcqRel);
        Self(live.clone())
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What happens after a session.
enum Next {
    /// Serve this session now (`auto` found QUIC again).
    Serve(AgentSession),
    /// Connect again, after this delay (none: at once).
    Connect(Option<Duration>),
    /// The agent stops.
    Stop,
}

type Shutdown<'a, F> = Pin<&'a mut F>;

impl Links {
    /// Validates the configuration and loads what connecting needs: the certificate, the
    /// connector, the claims to register with, the allowlist.
    async fn prepare(config: AgentConfig, slots: Arc<Slots>) -> Result<Self, AgentError> {
        let loaded = certs::load(&config).await?;
        let reconnect = Reconnect::new(config.backoff.clone());
        let connector = Connector::new(loaded.client, config.session.clone(), config.transport)
            .map_err(|e| match e {
                tunnel_core::BindError::Config(source) => ConfigError::Tls {
                    flag: "--tls-cert-file",
                    source,
                },
                other => ConfigError::Invalid {
                    what: "the tunnel's connector",
                    why: other.to_string(),
                },
            })?;
        let server = ServerConnector::new(
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
            // Tells the server that a session from before this process is dead.
            instance_id: rand::random::<u64>() | 1,
            live_sessions: 0,
            capabilities: vec![proto::Capability::PortPolicy.into()],
            connected_server_ids: Vec::new(),
        };
        info!(
            node = %loaded.identity.node_name,
            node.ips = ?loaded.dial_ips,
            server = %config.server_address,
            transport = config.transport.as_str(),
            server_redundancy = config.server_redundancy,
            "tunnel agent starting"
        );
        // Every reason is a series from the start, so that a rate over it works before the
        // first reconnect.
        for cause in CloseCause::ALL
            .iter()
            .map(|c| c.as_str())
            .chain([QUIC_RETURN])
        {
            metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => cause).increment(0);
        }
        Ok(Self {
            shared: Arc::new(Shared {
                allowlist: Allowlist::new(
                    loaded.dial_ips,
                    config.allowed_ports.clone(),
                    config.localhost_proxy_ports.clone(),
                ),
                refusals: tunnel_process::throttle::LogThrottle::default(),
                config,
            }),
            server,
            register,
            slots,
            slot: 0,
            streams: JoinSet::new(),
            reconnect,
            live: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Another slot beside this one: the same configuration, certificate and connector, its
    /// own sessions, reconnect state and instance id (to the servers, each slot is an agent
    /// process of its own).
    fn slot(&self, slot: usize) -> Self {
        Self {
            shared: self.shared.clone(),
            server: self.server.clone(),
            register: proto::Register {
                instance_id: rand::random::<u64>() | 1,
                ..self.register.clone()
            },
            slots: self.slots.clone(),
            slot,
            streams: JoinSet::new(),
            reconnect: Reconnect::new(self.shared.config.backoff.clone()),
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// What we register with now: the claims, and how many sessions this process still serves
    /// (none: the server may reset what it still holds of ours at once).
    fn claims(&self) -> proto::Register {
        let live = self.live.load(Ordering::Acquire);
        proto::Register {
            live_sessions: u32::try_from(live).unwrap_or(u32::MAX),
            connected_server_ids: self.slots.others(self.slot),
            ..self.register.clone()
        }
    }

    /// The meta endpoints (`/healthz`, `/readyz`, `/metrics`), unless `--meta-port` is 0.
    async fn start_meta(&self, ready: Arc<AtomicBool>) -> Result<Option<MetaServer>, AgentError> {
        let config = &self.shared.config;
        if config.meta_port == 0 {
            return Ok(None);
        }
        let addr = SocketAddr::new(config.meta_bind_address, config.meta_port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Bind { addr, source })?;
        let state = MetaState {
            ready,
            metrics: config.metrics.clone(),
            pages: Vec::new(),
        };
        Ok(Some(MetaServer::spawn(listener, state)))
    }

    /// Connects, serves, and connects again, until `shutdown` resolves.
    async fn run(&mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut next = Next::Connect(None);
        loop {
            next = match next {
                Next::Stop => return,
                Next::Serve(session) => self.serve(session, &mut shutdown).await,
                Next::Connect(delay) => {
                    if let Some(delay) = delay {
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = shutdown.as_mut() => return,
                        }
                    }
                    let claims = self.claims();
                    let started = tokio::time::Instant::now();
                    let connect = async {
                        match self.reconnect.attempt_timeout() {
                            Some(limit) => {
                                tokio::time::timeout(limit, self.server.connect(&claims))
                                    .await
                                    .unwrap_or(Err(ConnectError::Attempt(limit)))
                            }
                            None => self.server.connect(&claims).await,
                        }
                    };
                    let attempt = tokio::select! {
                        r = connect => r,
                        () = shutdown.as_mut() => return,
                    };
                    match attempt {
                        Ok(session) => {
                            self.reconnect.connected(started.elapsed());
                            Next::Serve(session)
                        }
                        Err(e) => Next::Connect(Some(self.connect_failed(&e))),
                    }
                }
            };
        }
    }

    /// Says why no session came up, counts it under its cause, and returns the backoff.
    fn connect_failed(&mut self, e: &ConnectError) -> Duration {
        let reason = e.reason();
        let cause = reason.cause.as_str();
        metrics::counter!("edge_tunnel_agent_connects_total", "result" => "error", "transport" => "none")
            .increment(1);
        metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => cause).increment(1);
        match (reason.cause, reason.initiator) {
            // Another slot holds a session to the replica the load balancer chose: the next
            // attempt may land elsewhere.
            (CloseCause::AlreadyConnected, _) => debug!(
                slot = self.slot,
                "the load balancer chose a replica another session holds; trying again"
            ),
            (CloseCause::Refused, Initiator::Remote) => warn!(
                cause = %cause,
                error = %e,
                "refused by the server: check the agent certificate (its CA must be the server's --client-ca-file)"
            ),
            (CloseCause::Refused, Initiator::Local) => warn!(
                cause = %cause,
                error = %e,
                "refused the server's certificate: check --ca-file and --server-name"
            ),
            _ => warn!(cause = %cause, error = %e, "cannot reach the server"),
        }
        self.reconnect.failed(rand::random::<f64>())
    }

    /// Serves one session until it ends, then decides what comes next.
    async fn serve<F: Future<Output = ()>>(
        &mut self,
        session: AgentSession,
        shutdown: &mut Shutdown<'_, F>,
    ) -> Next {
        self.connected(&session);
        let live = LiveSession::new(&self.live);
        let transport = session.transport().as_str();
        let up = metrics::gauge!("edge_tunnel_agent_session_up", "transport" => transport);
        up.increment(1.0);
        let session = Arc::new(session);
        let span = info_span!("session", server.addr = %session.remote_addr(), transport);
        let quic_return = QuicReturn {
            server: &self.server,
            register: self.claims(),
        };
        let end = serve_session(
            &self.shared,
            &session,
            quic_return,
            &mut self.streams,
            shutdown,
        )
        .instrument(span)
        .await;
        up.decrement(1.0);
        let unit = rand::random::<f64>();
        match end {
            SessionEnd::Moved(newer) => {
                info!(
                    from = transport,
                    to = %newer.transport(),
                    "moved to a QUIC session; the old one finishes its open streams"
                );
                metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => QUIC_RETURN)
                    .increment(1);
                retire(
                    &mut self.streams,
                    &self.shared,
                    (session, live),
                    Retirement::Moved,
                );
                Next::Serve(*newer)
            }
            SessionEnd::Shutdown => {
                self.disconnected();
                retire(
                    &mut self.streams,
                    &self.shared,
                    (session, live),
                    Retirement::ShuttingDown,
                );
                Next::Stop
            }
            SessionEnd::Lost(reason) => {
                // Our side of the link is closed: the server may reset what it holds of it.
                drop(live);
                self.disconnected();
                metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => reason.cause.as_str())
                    .increment(1);
                let delay = if reason.is_stateless_reset() {
                    Some(self.reconnect.reset_by_server(unit))
                } else {
                    self.reconnect.ended(reason.cause, false, unit)
                };
                warn!(
                    cause = %reason.cause.as_str(),
                    closed_by = closed_by(reason.initiator),
                    %reason,
                    retry_in = ?delay.unwrap_or_default(),
                    // Short attempts while a link that worked is recovered.
                    attempt_timeout = ?self.reconnect.attempt_timeout(),
                    "session lost; reconnecting"
                );
                Next::Connect(delay)
            }
            SessionEnd::Draining(reason) => {
                self.disconnected();
                metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => reason.cause.as_str())
                    .increment(1);
                // The server is leaving: its open streams go on while we move.
                info!(cause = %reason.cause.as_str(), "server sent go-away; reconnecting");
                retire(
                    &mut self.streams,
                    &self.shared,
                    (session, live),
                    Retirement::ServerLeaving,
                );
                Next::Connect(self.reconnect.ended(reason.cause, true, unit))
            }
        }
    }

    fn connected(&mut self, session: &AgentSession) {
        metrics::counter!(
            "edge_tunnel_agent_connects_total",
            "result" => "ok",
            "transport" => session.transport().as_str()
        )
        .increment(1);
        let pushed = session.port_policy().borrow().clone();
        let serving = self.shared.allowlist.effective(pushed.as_deref());
        info!(
            node = session.node_name(),
            server.id = session.server_id(),
            server.addr = %session.remote_addr(),
            transport = %session.transport(),
            server.ports = pushed.map(tracing::field::display),
            serving = %serving,
            "connected"
        );
        self.slots.set(
            self.slot,
            Some(AgentStatus::Connected {
                node_name: session.node_name().to_owned(),
                server_id: session.server_id().to_owned(),
                server: session.remote_addr(),
            }),
        );
    }

    fn disconnected(&self) {
        self.slots.set(self.slot, None);
    }
}

/// The reconnect reason when `auto` moves from gRPC back to QUIC.
const QUIC_RETURN: &str = "quic_return";

fn closed_by(initiator: Initiator) -> &'static str {
    match initiator {
        Initiator::Local => "agent",
        Initiator::Remote => "server",
    }
}

enum SessionEnd {
    Shutdown,
    Lost(CloseReason),
    Draining(CloseReason),
    /// `auto` found QUIC again while serving over gRPC: this session is the successor.
    Moved(Box<AgentSession>),
}

/// What serving over gRPC needs to try QUIC again (the QUIC return).
struct QuicReturn<'a> {
    server: &'a ServerConnector,
    /// Our claims, counting the gRPC session as live: the server retires it gently.
    register: proto::Register,
}

type Attempt<'a> = Pin<Box<dyn Future<Output = Result<AgentSession, ConnectError>> + Send + 'a>>;

impl<'a> QuicReturn<'a> {
    /// Whether `auto` should look for QUIC again while on `current`.
    fn wanted(&self, current: TransportKind) -> bool {
        self.server.choice() == TransportChoice::Auto && current == TransportKind::Grpc
    }

    fn attempt(&self) -> Attempt<'a> {
        let (server, register) = (self.server, self.register.clone());
        Box::pin(async move { server.connect_over(TransportChoice::Quic, &register).await })
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
/// before it heard (a stream or request may cross the go-away on the wire) until the link
/// closes. The server closes it once its side of the streams is done, by when every byte has
/// arrived; a close from here could cut bytes in flight, so the agent closes it itself only
/// after its drain timeout (a server that never does, or one on another replica), or, when
/// shutting down, once it is idle.
fn retire(
    streams: &mut JoinSet<()>,
    shared: &Arc<Shared>,
    (session, live): (Arc<AgentSession>, LiveSession),
    why: Retirement,
) {
    let drain = shared.config.drain_timeout;
    let (deadline, close_when_idle) = match why {
        Retirement::Moved => {
            session.go_away(CloseCause::Replaced, drain);
            (Some(drain), false)
        }
        Retirement::ShuttingDown => {
            session.go_away(CloseCause::Shutdown, drain);
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
                            let ports = session.port_policy().borrow().clone();
                            open.spawn(forward::serve(shared.clone(), incoming, ports).in_current_span());
                        }
                        Err(_) => break,
                    },
                    _ = session.closed() => break,
                    // Shutting down: nothing more will be asked of this link once it is idle.
                    () = session.idle(), if close_when_idle => {
                        session.close(CloseCause::Shutdown);
                        break;
                    }
                    () = &mut expiry => {
                        warn!(open = session.open_streams(), "old session still open after the drain timeout; closing it");
                        session.close(CloseCause::GoAway);
                        break;
                    }
                    Some(_) = open.join_next(), if !open.is_empty() => {}
                }
            }
            // The streams of a closed link end with it; the close itself must reach the server
            // before the process may exit.
            while open.join_next().await.is_some() {}
            drop(live);
            session.finished().await;
        }
        .in_current_span(),
    );
}

/// `end`, unless shutdown comes first (an in-flight QUIC attempt must not delay it).
async fn until_shutdown<F: Future<Output = ()>>(
    shutdown: &mut Shutdown<'_, F>,
    end: impl Future<Output = SessionEnd>,
) -> SessionEnd {
    tokio::select! {
        end = end => end,
        () = shutdown.as_mut() => SessionEnd::Shutdown,
    }
}

async fn serve_session<F: Future<Output = ()>>(
    shared: &Arc<Shared>,
    session: &Arc<AgentSession>,
    quic_return: QuicReturn<'_>,
    streams: &mut JoinSet<()>,
    shutdown: &mut Shutdown<'_, F>,
) -> SessionEnd {
    // With `auto` over gRPC: every `quic_retry_interval`, one QUIC attempt in the background.
    let returning = quic_return.wanted(session.transport());
    let interval = shared.config.quic_retry_interval;
    let retry = tokio::time::sleep(interval);
    let mut retry = std::pin::pin!(retry);
    let mut attempt: Option<Attempt<'_>> = None;
    loop {
        tokio::select! {
            () = retry.as_mut(), if returning && attempt.is_none() => attempt = Some(quic_return.attempt()),
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
                    let ports = session.port_policy().borrow().clone();
                    streams.spawn(
                        async move {
                            forward::serve(shared, incoming, ports).await;
                            drop(session);
                        }
                        .in_current_span(),
                    );
                }
                Err(e) => return until_shutdown(shutdown, unless_moved(attempt, SessionEnd::Lost(e.reason()))).await,
            },
            state = session.draining() => match state {
                LinkState::Draining(reason) => {
                    return until_shutdown(shutdown, unless_moved(attempt, SessionEnd::Draining(reason))).await;
                }
                LinkState::Closed(reason) => {
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
