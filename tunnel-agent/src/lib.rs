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
pub mod dialer;
mod forward;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, info, info_span, warn};
use tunnel_core::{AgentSession, LinkState, QuicConnector, proto};

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
        let mut meta = JoinSet::new();
        let (meta_stop_tx, mut meta_stop) = watch::channel(false);
        if config.meta_port != 0 {
            let addr = SocketAddr::new(config.meta_bind_address, config.meta_port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Bind { addr, source })?;
            let state = tunnel_core::meta::MetaState {
                ready: ready.clone(),
                metrics: config.metrics.clone(),
            };
            meta.spawn(tunnel_core::meta::serve(listener, state, async move {
                let _ = meta_stop.wait_for(|s| *s).await.map(|_| ());
            }));
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
        // Sessions whose server sent go-away: kept until they close, so their open streams
        // finish while we move to another replica.
        let mut draining: Vec<Arc<AgentSession>> = Vec::new();
        'outer: loop {
            draining.retain(|s| !matches!(s.state(), LinkState::Closed { .. }));
            let attempt = tokio::select! {
                r = dialer.connect(&register) => r,
                () = &mut shutdown => break 'outer,
            };
            match attempt {
                Ok(session) => {
                    let connected_at = tokio::time::Instant::now();
                    metrics::counter!("edge_tunnel_agent_connects_total", "result" => "ok")
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
                    metrics::gauge!("edge_tunnel_agent_session_up").set(1.0);
                    let session = Arc::new(session);
                    let span = info_span!("session", server.addr = %session.remote_addr());
                    let end = serve_session(&shared, &session, &mut streams, &mut shutdown)
                        .instrument(span)
                        .await;
                    ready.store(false, Ordering::Release);
                    metrics::gauge!("edge_tunnel_agent_session_up").set(0.0);
                    status.send_replace(AgentStatus::Disconnected);
                    match end {
                        SessionEnd::Shutdown => {
                            session.go_away("agent shutting down", shared.config.drain_timeout);
                            draining.push(session);
                            break 'outer;
                        }
                        SessionEnd::Lost(reason) => {
                            warn!(%reason, "session lost; reconnecting");
                            // Only a session that lasted resets the backoff: two agents with
                            // one certificate, replacing each other, must not flap every second.
                            if connected_at.elapsed() >= STABLE_SESSION {
                                failures = 0;
                            }
                        }
                        SessionEnd::Draining(reason) => {
                            // The server is leaving: its open streams go on while we move.
                            info!(%reason, "server sent go-away; reconnecting");
                            metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => "go_away").increment(1);
                            draining.push(session);
                            continue 'outer;
                        }
                    }
                    metrics::counter!("edge_tunnel_agent_reconnects_total", "reason" => "lost")
                        .increment(1);
                }
                Err(e) => {
                    metrics::counter!("edge_tunnel_agent_connects_total", "result" => "error")
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
        // Let open streams finish, within the drain timeout.
        let drain = async { while streams.join_next().await.is_some() {} };
        if tokio::time::timeout(shared.config.drain_timeout, drain)
            .await
            .is_err()
        {
            warn!("drain timeout reached; closing the remaining streams");
        }
        streams.shutdown().await;
        for session in draining {
            session.close("agent shutting down");
        }
        let _ = meta_stop_tx.send(true);
        meta.shutdown().await;
        info!("tunnel agent stopped");
        Ok(())
    }
}

/// A session that lasted this long counts as healthy for the reconnect backoff.
const STABLE_SESSION: std::time::Duration = std::time::Duration::from_secs(30);

enum SessionEnd {
    Shutdown,
    Lost(String),
    Draining(String),
}

async fn serve_session(
    shared: &Arc<Shared>,
    session: &Arc<AgentSession>,
    streams: &mut JoinSet<()>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> SessionEnd {
    loop {
        tokio::select! {
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
                Err(e) => return SessionEnd::Lost(e.to_string()),
            },
            state = session.draining() => match state {
                LinkState::Draining { reason } => return SessionEnd::Draining(reason),
                LinkState::Closed { reason } => return SessionEnd::Lost(reason),
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
