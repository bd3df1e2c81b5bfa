//! An in-process cluster: a tunnel server and agents on loopback, ports from :0.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tunnel_agent::{Agent, AgentConfig, AgentError, AgentStatus};
use tunnel_core::TransportChoice;
use tunnel_core::{NodeRef, PortSet, TransportKind};
use tunnel_server::{Registry, Server, ServerConfig, ServerError};

use crate::pki::TestPki;

/// A running server.
#[derive(Debug)]
pub struct TestCluster {
    /// Certificates.
    pub pki: TestPki,
    /// Tunnel (UDP) address.
    pub tunnel_addr: SocketAddr,
    /// TLS front.
    pub secure_addr: SocketAddr,
    /// HTTP front.
    pub insecure_addr: SocketAddr,
    /// The egress front's mutual-TLS port, when the configuration asks for it.
    pub connect_addr: Option<SocketAddr>,
    /// Meta server.
    pub meta_addr: SocketAddr,
    /// The embedded DNS responder (UDP and TCP), when the configuration asks for it.
    pub dns_addr: Option<SocketAddr>,
    /// The node records as the server publishes them, when it makes any.
    pub dns_records: Option<tunnel_server::dns::RecordsRx>,
    /// The server's agent registry.
    pub registry: Arc<Registry>,
    /// Ports the test agents serve (dialed on loopback).
    pub ports: PortSet,
    /// The server's port configuration.
    served: Arc<tunnel_server::ports::Ports>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    config: ServerConfig,
    _exclusive: tokio::sync::OwnedMutexGuard<()>,
}

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    /// The agent's status.
    pub status: watch::Receiver<AgentStatus>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), AgentError>>>,
}

impl AgentHandle {
    /// Stops the agent and waits for it.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await.expect("agent task"),
            None => Ok(()),
        }
    }

    /// Waits for the agent's task to end on its own (a startup error, for instance).
    pub async fn join(mut self) -> Result<(), AgentError> {
        match self.task.take() {
            Some(t) => t.await.expect("agent task"),
            None => Ok(()),
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl TestCluster {
    /// Starts a server whose TLS front targets `kubelet_port` and whose HTTP front defaults to
    /// `read_only_port`.
    pub async fn start(pki: TestPki, kubelet_port: u16, read_only_port: u16) -> Self {
        Self::start_with(pki, kubelet_port, read_only_port, |_| {}).await
    }

    /// The configuration of a test server: everything on 127.0.0.1 with ports from the
    /// kernel, certificates from `pki`, and the kubelet's two ports served on the node's
    /// loopback (where the test services listen).
    pub fn server_config(pki: &TestPki, kubelet_port: u16, read_only_port: u16) -> ServerConfig {
        ServerConfig {
            meta_bind_address: "127.0.0.1".parse().expect("ip"),
            bind_address: "127.0.0.1".parse().expect("ip"),
            tunnel_port: 0,
            secure_port: 0,
            insecure_port: 0,
            meta_port: 0,
            tls_cert_file: Some(pki.tunnel.server_cert.clone()),
            tls_private_key_file: Some(pki.tunnel.server_key.clone()),
            client_ca_file: Some(pki.tunnel.ca_cert.clone()),
            server_id: "test-server".into(),
            // Nothing balances load in front of a test server.
            shutdown_delay: std::time::Duration::ZERO,
            kubelet_port,
            kubelet_read_only_port: read_only_port,
            metrics: Some(crate::metrics()),
            ports: Some(loopback_ports(
                &PortSet::new([kubelet_port, read_only_port]),
                kubelet_port,
                read_only_port,
            )),
            ..ServerConfig::default()
        }
    }

    /// As [`start`](Self::start), with a hook to adjust the server configuration.
    pub async fn start_with(
        pki: TestPki,
        kubelet_port: u16,
        read_only_port: u16,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        crate::init_tracing();
        let exclusive = crate::exclusive().await;
        let mut config = Self::server_config(&pki, kubelet_port, read_only_port);
        tweak(&mut config);
        if config.config_dir.is_some() {
            config.ports = None;
        }
        let server = Server::bind(config.clone()).await.expect("server binds");
        let (tunnel_addr, secure_addr, insecure_addr) = (
            server.tunnel_addr(),
            server.secure_addr(),
            server.insecure_addr(),
        );
        let meta_addr = server.meta_addr().expect("meta runs");
        // A restart binds the same ports, as a restarted pod behind its Service would.
        config.tunnel_port = tunnel_addr.port();
        config.secure_port = secure_addr.port();
        config.insecure_port = insecure_addr.port();
        config.meta_port = meta_addr.port();
        let connect_addr = server.connect_addr();
        if let Some(addr) = connect_addr {
            config.connect_port = Some(addr.port());
        }
        let dns_addr = server.dns_addr();
        if dns_addr.is_some() {
            config.dns.listen = dns_addr;
        }
        let dns_records = server.dns_records();
        let registry = server.registry();
        let served = server.ports();
        let (tx, task) = spawn_server(server);
        Self {
            served,
            pki,
            tunnel_addr,
            secure_addr,
            insecure_addr,
            connect_addr,
            meta_addr,
            dns_addr,
            dns_records,
            registry,
            ports: PortSet::new([kubelet_port, read_only_port]),
            shutdown: Some(tx),
            task: Some(task),
            config,
            _exclusive: exclusive,
        }
    }

    /// A cluster for `nodes` whose fronts target a fresh fake kubelet serving the first node:
    /// the TLS front its HTTPS port, the HTTP front (by default) its read-only port.
    pub async fn with_kubelet(
        nodes: &[(&str, &[std::net::IpAddr])],
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> (Self, crate::FakeKubelet) {
        let pki = TestPki::new(nodes);
        let kubelet = crate::FakeKubelet::start(nodes[0].0, pki.kubelet_tls())
            .await
            .expect("fake kubelet starts");
        let cluster = Self::start_with(
            pki,
            kubelet.https_addr.port(),
            kubelet.http_addr.port(),
            tweak,
        )
        .await;
        (cluster, kubelet)
    }

    /// An agent configuration for `node` (certificate from the test PKI) that serves the
    /// cluster's ports on loopback.
    pub fn agent_config(&self, node: &str) -> AgentConfig {
        let (crt, key) = self.pki.agent(node);
        AgentConfig {
            server_address: self.tunnel_addr.to_string(),
            server_name: Some("localhost".into()),
            node_name: node.into(),
            tls_cert_file: Some(crt),
            tls_private_key_file: Some(key),
            ca_file: Some(self.pki.tunnel.ca_cert.clone()),
            meta_port: 0,
            allowed_ports: Some(self.ports.clone()),
            localhost_proxy_ports: Some(self.ports.clone()),
            metrics: Some(crate::metrics()),
            ..AgentConfig::default()
        }
    }

    /// As [`agent_config`](Self::agent_config), using only `transport`.
    pub fn agent_config_over(&self, node: &str, transport: TransportChoice) -> AgentConfig {
        let mut config = self.agent_config(node);
        config.transport = transport;
        config
    }

    /// The transport the server carries `node` over now (panics when `node` has no agent).
    pub fn transport_of(&self, node: &str) -> TransportKind {
        let (session, _) = self
            .registry
            .lookup(&NodeRef::Name(node.into()))
            .unwrap_or_else(|| panic!("{node} has no agent"));
        session.transport()
    }

    /// Starts an agent without waiting for it to connect.
    pub fn spawn_agent(&self, config: AgentConfig) -> AgentHandle {
        let agent = Agent::new(config);
        let status = agent.status();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        AgentHandle {
            status,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts an agent and waits until the server has registered it; returns the handle and
    /// the node name the server registered.
    pub async fn start_agent(&self, config: AgentConfig) -> (AgentHandle, String) {
        let mut handle = self.spawn_agent(config);
        let node = {
            let status = handle
                .status
                .wait_for(|s| matches!(s, AgentStatus::Connected { .. }))
                .await
                .expect("agent running");
            match &*status {
                AgentStatus::Connected { node_name, .. } => node_name.clone(),
                AgentStatus::Disconnected => unreachable!("waited for connected"),
            }
        };
        self.registry.wait_for(&node).await;
        (handle, node)
    }

    /// GET `path` on the server's meta port; panics unless it answers 200.
    async fn meta_get(&self, path: &str) -> bytes::Bytes {
        let tcp = tokio::net::TcpStream::connect(self.meta_addr)
            .await
            .expect("meta");
        let mut sender = crate::client::http1(tcp).await.expect("meta http");
        let (status, body) = crate::client::get(&mut sender, "meta", path)
            .await
            .expect("meta answer");
        assert_eq!(status, 200, "meta {path}");
        body
    }

    /// The server's `/config` meta page: the port configuration in force and the last reload.
    pub async fn config_page(&self) -> serde_json::Value {
        serde_json::from_slice(&self.meta_get("/config").await).expect("config page is JSON")
    }

    /// The server's `/dns` meta page: where the node records come from and what they are.
    pub async fn dns_page(&self) -> serde_json::Value {
        serde_json::from_slice(&self.meta_get("/dns").await).expect("dns page is JSON")
    }

    /// Reads `/config` until `ok` holds of it, for at most 10 s (a reload follows a file
    /// change within about 100 ms, or the 5 s poll); panics with the last page otherwise.
    pub async fn wait_config(&self, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let page = self.config_page().await;
            if ok(&page) {
                return page;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the configuration never became what the test waits for: {page:#}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    /// The server's `/metrics` text.
    pub async fn scrape(&self) -> String {
        String::from_utf8_lossy(&self.meta_get("/metrics").await).into_owned()
    }

    /// Scrapes the server's metrics until `ok` holds of them, for at most 10 s (a liveness
    /// bound, not a timing assertion); returns the text that satisfied it. Panics with `what`
    /// and the last text otherwise.
    pub async fn scrape_until(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = self.scrape().await;
            if ok(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} did not happen; metrics:\n{text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (with its drain) and starts a new one on the same ports; agents
    /// reconnect on their own.
    pub async fn restart(&mut self) {
        self.shutdown_server().await;
        // quinn's endpoint task lets go of the UDP socket just after the server returns; retry
        // the bind for a bounded time rather than guess how long that takes.
        let mut attempts = 0;
        let server = loop {
            match Server::bind(self.config.clone()).await {
                Ok(s) => break s,
                Err(e) if attempts < 250 => {
                    attempts += 1;
                    tracing::debug!(error = %e, "port not yet free");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("server binds again: {e}"),
            }
        };
        self.registry = server.registry();
        self.served = server.ports();
        self.dns_records = server.dns_records();
        let (tx, task) = spawn_server(server);
        self.shutdown = Some(tx);
        self.task = Some(task);
    }

    /// Serves `ports` too (on the node's loopback, as `localhost-proxy-ports`), on the running
    /// server and on any it restarts as.
    pub fn serve_ports(&mut self, ports: impl IntoIterator<Item = u16>) {
        let current = self.served.current();
        let wanted = current.localhost_proxy_ports().union(&PortSet::new(ports));
        let config = loopback_ports(
            &wanted,
            self.config.kubelet_port,
            self.config.kubelet_read_only_port,
        );
        self.served.set(config.clone());
        if self.config.config_dir.is_none() {
            self.config.ports = Some(config);
        }
    }

    /// Stops the server (drain included) and waits for it; the cluster stays for inspection.
    pub async fn shutdown_server(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server ran");
        }
    }

    /// Asks the server to stop without waiting for its drain to end.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the server (drain included) and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server ran");
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

type ServerTask = (oneshot::Sender<()>, JoinHandle<Result<(), ServerError>>);

fn spawn_server(server: Server) -> ServerTask {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (tx, task)
}

/// A port configuration that serves `ports` on the node's loopback.
fn loopback_ports(
    ports: &PortSet,
    kubelet: u16,
    kubelet_read_only: u16,
) -> tunnel_core::PortConfig {
    let list = ports.to_string();
    tunnel_core::PortConfig::parse(
        [(
            tunnel_core::route::config::LOCALHOST_PROXY_PORTS,
            list.as_str(),
        )],
        tunnel_core::route::config::FixedPorts {
            kubelet,
            kubelet_read_only,
            ..Default::default()
        },
    )
    .expect("a list of ports parses")
}
