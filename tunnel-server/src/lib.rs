//! # tunnel-server
//!
//! The cloud side of edge-tunnel. Agents dial in on the tunnel port (QUIC, mutual TLS; the node
//! name comes from the agent's certificate). Clients reach nodes through the fronts:
//!
//! * **10263, TLS passthrough**: the ClientHello's SNI names the node; the connection goes to
//!   its kubelet (10250). TLS is never terminated.
//! * **10264, HTTP**: the Host header, an absolute-form target or `CONNECT host:port` names the
//!   node (by name, or by an IP from its agent's certificate) and the port (default 10255).
//! * **10265, meta** (loopback): `/healthz`, `/readyz`, `/metrics`.
//!
//! [`run`] serves until its shutdown future resolves, then drains: go-away to every agent, no
//! new client connections, open streams may finish within the drain timeout.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
mod front;
pub mod pki;
pub mod registry;
mod tunnel;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};
use tunnel_core::{BindError, CloseCause, Listener, ListenerConfig};
use tunnel_process::drain;
use tunnel_process::files::{TlsFiles, TlsPaths};
use tunnel_process::meta::{MetaServer, MetaState};

pub use config::{ConfigError, ServerConfig};
pub use registry::Registry;
pub use tunnel_core::Transports;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is incomplete or its files are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A server whose listeners are bound, ready to [`run`](Self::run).
#[derive(Debug)]
pub struct Server {
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    tunnel: Listener,
    secure: TcpListener,
    insecure: TcpListener,
    meta: Option<TcpListener>,
}

/// Reads the TLS files once and builds the tunnel port's configuration. Returns the key bytes
/// too: the QUIC reset secret derives from them.
async fn tls_config(config: &ServerConfig) -> Result<(rustls::ServerConfig, Vec<u8>), ConfigError> {
    config.validate()?;
    let files = TlsFiles::load(TlsPaths {
        cert: config.tls_cert_file.as_deref(),
        key: config.tls_private_key_file.as_deref(),
        ca: config.client_ca_file.as_deref(),
        ca_flag: "--client-ca-file",
    })
    .await?;
    let tls = tunnel_core::tls::server_config(
        files.identity()?,
        files.roots()?,
        &[tunnel_core::tls::ALPN_QUIC],
    )
    .map_err(|source| ConfigError::Tls {
        flag: "--tls-cert-file",
        source,
    })?;
    Ok((tls, files.key))
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}

/// Binds the tunnel listener: QUIC on UDP and gRPC on TCP at one port number. `key` is the
/// private key's bytes, as read for TLS: the QUIC reset key follows it, so a restarted (or
/// sibling) replica can tell the agents of a crashed one to reconnect now rather than after
/// their idle timeout.
async fn bind_tunnel(
    config: &ServerConfig,
    tls: rustls::ServerConfig,
    key: Vec<u8>,
) -> Result<Listener, ServerError> {
    let addr = config.addr(config.tunnel_port);
    let listener = ListenerConfig {
        session: config.session.clone(),
        server_id: config.server_id.clone(),
        transports: config.transports,
        reset_secret: Some(key),
    };
    Listener::bind(addr, tls, listener)
        .await
        .map_err(|e| match e {
            BindError::Config(source) => ServerError::Config(ConfigError::Tls {
                flag: "--tls-cert-file",
                source,
            }),
            BindError::Io(source) => ServerError::Bind {
                what: "--tunnel-port (UDP and TCP)",
                addr,
                source,
            },
            other => ServerError::Bind {
                what: "--tunnel-port (UDP and TCP)",
                addr,
                source: std::io::Error::other(other),
            },
        })
}

impl Server {
    /// Loads the TLS files and binds every listener. Port 0 picks a free port (see the
    /// `*_addr` methods).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let (tls, key) = tls_config(&config).await?;
        let tunnel = bind_tunnel(&config, tls, key).await?;
        let secure = bind_tcp("--secure-port", config.addr(config.secure_port)).await?;
        let insecure = bind_tcp("--insecure-port", config.addr(config.insecure_port)).await?;
        let meta = Some(
            bind_tcp(
                "--meta-port",
                SocketAddr::new(config.meta_bind_address, config.meta_port),
            )
            .await?,
        );
        Ok(Self {
            config: Arc::new(config),
            registry: Arc::new(Registry::default()),
            tunnel,
            secure,
            insecure,
            meta,
        })
    }

    /// The tunnel listeners' address (UDP for QUIC, TCP for gRPC: the same port number).
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel.local_addr()
    }

    /// The TLS front's address.
    pub fn secure_addr(&self) -> SocketAddr {
        self.secure
            .local_addr()
            .unwrap_or_else(|_| self.config.addr(self.config.secure_port))
    }

    /// The HTTP front's address.
    pub fn insecure_addr(&self) -> SocketAddr {
        self.insecure
            .local_addr()
            .unwrap_or_else(|_| self.config.addr(self.config.insecure_port))
    }

    /// The meta server's address, when it runs.
    pub fn meta_addr(&self) -> Option<SocketAddr> {
        self.meta.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The agent registry (to watch agents come and go).
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Self {
            config,
            registry,
            tunnel,
            secure,
            insecure,
            meta,
        } = self;
        // Stop: drain (no new agents or clients). Cut: the drain is over, end what is left.
        let (stop_tx, stop) = watch::channel(false);
        let (cut_tx, cut) = watch::channel(false);
        let ready = Arc::new(AtomicBool::new(true));
        let fronts = Arc::new(front::Fronts::new(registry.clone(), config.clone()));
        info!(
            tunnel = %tunnel.local_addr(),
            quic = config.transports.quic,
            grpc = config.transports.grpc,
            secure = %Addr(secure.local_addr()),
            insecure = %Addr(insecure.local_addr()),
            server.id = %config.server_id,
            "tunnel server listening"
        );

        let mut tasks = JoinSet::new();
        let (close_tunnel, close) = tokio::sync::oneshot::channel();
        let agents = tokio::spawn(tunnel::serve(
            tunnel,
            registry.clone(),
            stop.clone(),
            close,
            config.drain_timeout,
        ));
        tasks.spawn(front::serve_tcp(
            secure,
            fronts.clone(),
            stop.clone(),
            cut.clone(),
            front::sni::handle,
        ));
        tasks.spawn(front::serve_tcp(
            insecure,
            fronts.clone(),
            stop.clone(),
            cut.clone(),
            front::http::handle,
        ));
        // The meta server outlives the drain so that probes and scrapes see it.
        let meta = meta.map(|listener| {
            MetaServer::spawn(
                listener,
                MetaState {
                    ready: ready.clone(),
                    metrics: config.metrics.clone(),
                },
            )
        });

        shutdown.await;
        info!(drain = ?config.drain_timeout, agents = registry.len(), "shutting down: draining");
        ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        for session in registry.sessions() {
            session.go_away(CloseCause::Shutdown, config.drain_timeout);
        }
        drain::within(config.drain_timeout, fronts.idle()).await;
        let _ = cut_tx.send(true);
        for session in registry.sessions() {
            session.close(CloseCause::Shutdown);
        }
        // The tunnel's task closes the listener and ends once its links have.
        let _ = close_tunnel.send(());
        if let Err(e) = agents.await {
            warn!(error = %e, "the tunnel listener's task failed");
        }
        // The fronts end their connections' tasks as soon as they hear the cut; nothing is
        // left running when `run` returns.
        drain::join_set(&mut tasks, CUT_GRACE).await;
        if let Some(meta) = meta {
            meta.stop().await;
        }
        info!("tunnel server stopped");
        Ok(())
    }
}

/// A listener's address for the log: the address, or why it has none.
struct Addr(std::io::Result<SocketAddr>);

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(addr) => addr.fmt(f),
            Err(e) => write!(f, "unknown ({e})"),
        }
    }
}

/// How long the fronts get, once the drain is over, to end the tasks of their connections.
const CUT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds and serves `config` until `shutdown` resolves.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::bind(config).await?.run(shutdown).await
}

/// Resolves when the stop flag turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard returned by wait_for is not Send; drop it here rather than in the caller's select.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
