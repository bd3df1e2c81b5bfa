//! # tunnel-server
//!
//! The cloud side of edge-tunnel. Agents dial in on the tunnel port (QUIC, mutual TLS; the node
//! name comes from the agent's certificate). Clients reach nodes through the fronts:
//!
//! * **10263, TLS passthrough**: the ClientHello's SNI names the node; the connection goes to
//!   its kubelet (10250). TLS is never terminated.
//! * **10264, HTTP**: the Host header, an absolute-form target or `CONNECT host:port` names the
//!   node (by name, or by an IP from its agent's certificate) and the port (default 10255).
//! * **10265, meta** (loopback): `/healthz`, `/readyz`, `/metrics`, `/config`, `/dns`.
//!
//! Cluster DNS ([`dns`], [`cluster`]): the node records (edge node names → the tunnel
//! Service) made from the Kubernetes Nodes or the connected agents, written to the ConfigMap
//! CoreDNS reads, a hosts file, and answered by an embedded DNS responder.
//!
//! [`run`] serves until its shutdown future resolves, then drains: go-away to every agent, no
//! new client connections, open streams may finish within the drain timeout.
#![forbid(unsafe_code)]

pub mod cli;
pub mod cluster;
pub mod config;
pub mod dns;
mod front;
mod peers;
pub mod pki;
pub mod ports;
pub mod registry;
mod tunnel;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};
use tunnel_core::route::config::FixedPorts;
use tunnel_core::{BindError, CloseCause, Listener, ListenerConfig};
use tunnel_core::{PortConfig, PortPolicy, PortSet};
use tunnel_process::drain;
use tunnel_process::files::{TlsFiles, TlsPaths};
use tunnel_process::meta::{MetaPage, MetaServer, MetaState};

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
    /// The port configuration (`--config-dir`) cannot be read or is invalid.
    #[error(transparent)]
    Ports(#[from] ports::ConfigDirError),
    /// The Kubernetes client could not be made.
    #[error(transparent)]
    Kubernetes(#[from] cluster::ClusterError),
    /// The embedded DNS responder could not start.
    #[error(transparent)]
    Dns(#[from] dns::ResponderError),
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
    ports: Arc<ports::Ports>,
    /// What the startup read of `--config-dir` found, for its follower to compare with.
    config_dir: Option<(PathBuf, ports::Snapshot)>,
    rules: ports::Rules,
    tunnel: Listener,
    secure: TcpListener,
    insecure: TcpListener,
    https_proxies: BTreeMap<u16, TcpListener>,
    egress: Egress,
    meta: Option<TcpListener>,
    dns: dns::Setup,
    peers: peers::Setup,
}

/// The egress front's listeners, when configured.
#[derive(Default)]
struct Egress {
    unix: Option<(UnixListener, PathBuf)>,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("unix", &self.unix.as_ref().map(|u| &u.1))
            .field("tls", &self.tls.as_ref().map(|t| t.0.local_addr().ok()))
            .finish()
    }
}

/// Reads the server's certificate and key with the CA bundle named by `ca_flag` (whose
/// clients it verifies), and builds a server configuration offering `alpn`.
async fn server_tls(
    config: &ServerConfig,
    ca: Option<&std::path::Path>,
    ca_flag: &'static str,
    alpn: &[&[u8]],
) -> Result<(rustls::ServerConfig, TlsFiles), ConfigError> {
    let files = TlsFiles::load(TlsPaths {
        cert: config.tls_cert_file.as_deref(),
        key: config.tls_private_key_file.as_deref(),
        ca,
        ca_flag,
    })
    .await?;
    let tls = tunnel_core::tls::server_config(files.identity()?, files.roots()?, alpn).map_err(
        |source| ConfigError::Tls {
            flag: ca_flag,
            source,
        },
    )?;
    Ok((tls, files))
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
    policy: watch::Receiver<PortPolicy>,
    replicas: Option<tokio::sync::mpsc::Sender<tunnel_core::ReplicaSession>>,
) -> Result<Listener, ServerError> {
    let addr = config.addr(config.tunnel_port);
    let listener = ListenerConfig {
        session: config.session.clone(),
        server_id: config.server_id.clone(),
        transports: config.transports,
        reset_secret: Some(key),
        port_policy: Some(policy),
        replicas,
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

/// Whether two PEM bundles hold a certificate in common.
fn shares_a_certificate(a: &[u8], b: &[u8]) -> bool {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let b: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(b).flatten().collect();
    CertificateDer::pem_slice_iter(a)
        .flatten()
        .any(|cert| b.contains(&cert))
}

/// Binds the egress front's listeners that the configuration asks for.
async fn bind_egress(config: &ServerConfig, agent_ca: &[u8]) -> Result<Egress, ServerError> {
    let mut egress = Egress::default();
    if let Some(path) = &config.connect_uds {
        let bind_error = |source| ServerError::Bind {
            what: "--connect-uds",
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        };
        // A socket left by a process that died is in the way; anything else there is not ours
        // to remove.
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type())
        {
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        let listener = UnixListener::bind(path).map_err(|source| {
            ServerError::Config(ConfigError::Invalid {
                what: "--connect-uds",
                why: format!("cannot listen on {}: {source}", path.display()),
            })
        })?;
        // kube-apiserver runs as root or in the socket's group.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))
            .map_err(bind_error)?;
        egress.unix = Some((listener, path.clone()));
    }
    if let Some(port) = config.connect_port {
        let (tls, files) = server_tls(
            config,
            config.connect_client_ca_file.as_deref(),
            "--connect-client-ca-file",
            &[b"http/1.1"],
        )
        .await?;
        // An agent's certificate must never open streams to other nodes.
        if shares_a_certificate(&files.ca, agent_ca) {
            return Err(ConfigError::Invalid {
                what: "--connect-client-ca-file",
                why: "it holds a CA of --client-ca-file: agents could open streams to any node; use the CA of kube-apiserver's client certificate".into(),
            }
            .into());
        }
        let listener = bind_tcp("--connect-port", config.addr(port)).await?;
        egress.tls = Some((listener, tokio_rustls::TlsAcceptor::from(Arc::new(tls))));
    }
    Ok(egress)
}

impl Server {
    /// Loads the TLS files and binds every listener. Port 0 picks a free port (see the
    /// `*_addr` methods).
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        config.validate()?;
        let (tls, files) = server_tls(
            &config,
            config.client_ca_file.as_deref(),
            "--client-ca-file",
            &[tunnel_core::tls::ALPN_QUIC],
        )
        .await?;
        let secure = bind_tcp("--secure-port", config.addr(config.secure_port)).await?;
        let insecure = bind_tcp("--insecure-port", config.addr(config.insecure_port)).await?;
        let fixed = FixedPorts {
            http_front: insecure
                .local_addr()
                .map_or(config.insecure_port, |a| a.port()),
            kubelet: config.kubelet_port,
            kubelet_read_only: config.kubelet_read_only_port,
        };
        let rules = ports::Rules {
            fixed,
            reserved: PortSet::new(
                [
                    secure.local_addr().map_or(config.secure_port, |a| a.port()),
                    fixed.http_front,
                    config.tunnel_port,
                    config.meta_port,
                    config.connect_port.unwrap_or(0),
                ]
                .into_iter()
                .filter(|p| *p != 0),
            ),
        };
        let (ports, config_dir) = match &config.config_dir {
            Some(dir) => {
                let (ports, snapshot) = ports::load(dir, &rules)?;
                (ports, Some((dir.clone(), snapshot)))
            }
            None => {
                let given = config.ports.clone().unwrap_or(PortConfig::new(fixed));
                (ports::Ports::new(given, None), None)
            }
        };
        let ports = Arc::new(ports);
        let (peers, replicas) = peers::Setup::prepare(&config, &files, config.tunnel_port)?;
        // The QUIC reset secret derives from the key's bytes.
        let tunnel = bind_tunnel(&config, tls, files.key.clone(), ports.policy(), replicas).await?;
        let https_proxies = front::proxies::bind_all(config.bind_address, &ports.current())
            .await
            .map_err(|(port, source)| ServerError::Bind {
                what: "https-proxy-ports",
                addr: config.addr(port),
                source,
            })?;
        let egress = bind_egress(&config, &files.ca).await?;
        let dns = dns::Setup::prepare(&config).await?;
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
            ports,
            config_dir,
            rules,
            tunnel,
            secure,
            insecure,
            https_proxies,
            egress,
            meta,
            dns,
            peers,
        })
    }

    /// The port configuration in force (to follow it, or to change it without a config
    /// directory).
    pub fn ports(&self) -> Arc<ports::Ports> {
        self.ports.clone()
    }

    /// The egress front's mutual-TLS address, when it listens.
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.egress
            .tls
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
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

    /// The embedded DNS responder's address (UDP and TCP), when it runs.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.addr()
    }

    /// Follows the node records as published (what every DNS sink writes), when there are
    /// any.
    pub fn dns_records(&self) -> Option<dns::RecordsRx> {
        self.dns.records()
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
            ports,
            config_dir,
            rules,
            tunnel,
            secure,
            insecure,
            https_proxies,
            egress,
            meta,
            dns: dns_setup,
            peers,
        } = self;
        // Stop: drain (no new agents or clients). Cut: the drain is over, end what is left.
        let (stop_tx, stop) = watch::channel(false);
        let (cut_tx, cut) = watch::channel(false);
        let ready = Arc::new(AtomicBool::new(true));
        let mut tasks = JoinSet::new();
        // Peer links outlive the drain (streams forwarded to our agents finish with it).
        let peers = peers.start(&mut tasks, &config, &registry, &ports, &cut);
        let fronts = Arc::new(front::Fronts::new(
            registry.clone(),
            config.clone(),
            ports.clone(),
            peers.clone(),
        ));
        info!(
            tunnel = %tunnel.local_addr(),
            quic = config.transports.quic,
            grpc = config.transports.grpc,
            secure = %Addr(secure.local_addr()),
            insecure = %Addr(insecure.local_addr()),
            server.id = %config.server_id,
            "tunnel server listening"
        );

        let front_ports = cluster::FrontPorts {
            secure: secure.local_addr().map_or(config.secure_port, |a| a.port()),
            insecure: insecure
                .local_addr()
                .map_or(config.insecure_port, |a| a.port()),
            connect: egress
                .tls
                .as_ref()
                .and_then(|(l, _)| l.local_addr().ok())
                .map(|a| a.port()),
        };
        let (close_tunnel, close) = tokio::sync::oneshot::channel();
        let agents = tokio::spawn(tunnel::serve(
            tunnel,
            registry.clone(),
            stop.clone(),
            close,
            config.drain_timeout,
        ));
        let kubelet_port = config.kubelet_port;
        tasks.spawn(front::serve_front(
            secure,
            fronts.clone(),
            stop.clone(),
            stop.clone(),
            cut.clone(),
            move |f, tcp, peer, admission| {
                front::sni::handle(f, tcp, peer, admission, kubelet_port)
            },
        ));
        tasks.spawn(front::serve_front(
            insecure,
            fronts.clone(),
            stop.clone(),
            stop.clone(),
            cut.clone(),
            front::http::handle,
        ));
        tasks.spawn(front::proxies::serve(
            fronts.clone(),
            https_proxies,
            ports.subscribe(),
            stop.clone(),
            cut.clone(),
        ));
        let uds_path = egress.unix.as_ref().map(|(_, p)| p.clone());
        if let Some((listener, path)) = egress.unix {
            info!(path = %path.display(), "egress front (CONNECT) listening on a Unix socket");
            tasks.spawn(front::serve_front(
                listener,
                fronts.clone(),
                stop.clone(),
                stop.clone(),
                cut.clone(),
                front::connect::handle_unix,
            ));
        }
        if let Some((listener, acceptor)) = egress.tls {
            info!(addr = %Addr(listener.local_addr()), "egress front (CONNECT, mutual TLS) listening");
            tasks.spawn(front::serve_front(
                listener,
                fronts.clone(),
                stop.clone(),
                stop.clone(),
                cut.clone(),
                move |f, tcp, peer, admission| {
                    front::connect::handle_tls(f, tcp, peer, admission, acceptor.clone())
                },
            ));
        }
        if let Some((dir, snapshot)) = config_dir {
            tasks.spawn(ports::follow(
                dir,
                rules,
                ports.clone(),
                snapshot,
                stop.clone(),
            ));
        }
        let (dns_page, responder) =
            dns_setup.start(&mut tasks, &config, &registry, &ports, front_ports, &stop);
        // The meta server outlives the drain so that probes and scrapes see it.
        let meta = meta.map(|listener| {
            MetaServer::spawn(
                listener,
                MetaState {
                    ready: ready.clone(),
                    metrics: config.metrics.clone(),
                    pages: [MetaPage {
                        path: "/config",
                        render: {
                            let ports = ports.clone();
                            Arc::new(move || ports.page())
                        },
                    }]
                    .into_iter()
                    .chain(dns_page)
                    .collect(),
                },
            )
        });

        shutdown.await;
        ready.store(false, Ordering::Release);
        if !config.shutdown_delay.is_zero() {
            info!(delay = ?config.shutdown_delay, "shutting down: not ready, still serving while load balancers take this replica out");
            tokio::time::sleep(config.shutdown_delay).await;
        }
        info!(drain = ?config.drain_timeout, agents = registry.len(), "shutting down: draining");
        let _ = stop_tx.send(true);
        for session in registry.sessions() {
            session.go_away(CloseCause::Shutdown, config.drain_timeout);
        }
        // The fronts' streams, and those other replicas forwarded to our agents.
        let idle = async {
            fronts.idle().await;
            if let Some(peers) = &peers {
                peers.idle().await;
            }
        };
        drain::within(config.drain_timeout, idle).await;
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
        if let Some(path) = uds_path {
            let _ = std::fs::remove_file(path);
        }
        if let Some(responder) = responder {
            responder.stop().await;
        }
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
