//! Several replicas, each agent on one of them: a request for any node through any replica
//! reaches that node (forwarded over a peer link when its agent is elsewhere), an agent that
//! moves is found again, and a node no replica holds is a 503. Each node's service listens on
//! the node's own IP (127.0.0.x) and answers with the node's name, so a request that reached
//! the wrong node would show.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use edge_tunnel_testkit::tools::{dnsmasq, free_udp_tcp_port, program};
use edge_tunnel_testkit::{TestPki, client, free_port_on, metric_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tunnel_agent::{Agent, AgentConfig, AgentStatus};
use tunnel_core::route::config::{FixedPorts, LOCALHOST_PROXY_PORTS};
use tunnel_core::{PortConfig, PortSet, TransportChoice};
use tunnel_server::config::PeerConfig;
use tunnel_server::{Registry, Server, ServerConfig};

/// The port each node's service listens on, on the node's IP.
fn node_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 20 + u8::try_from(i).expect("few nodes")])
}

fn node_name(i: usize) -> String {
    format!("edge-{i}")
}

/// A service on `ip:port` that answers every request with `name` and closes; `GET /follow`
/// gets a followed log instead: a line every 100 ms, chunked, until the client leaves.
async fn node_service(ip: IpAddr, port: u16, name: String) -> JoinHandle<()> {
    let listener = TcpListener::bind((ip, port))
        .await
        .expect("node service binds");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /follow ") {
                    let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                    if tcp.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for n in 0u64.. {
                        let line = format!("{name} line {n}\n");
                        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                        if tcp.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
            });
        }
    })
}

/// `n` edge nodes: their certificates (node `i` named `edge-i` at 127.0.0.2i), and each
/// node's service on one port free on all their IPs. Returns the PKI, the port and the
/// services' tasks.
async fn edge_nodes(n: usize) -> (TestPki, u16, Vec<JoinHandle<()>>) {
    let nodes: Vec<(String, Vec<IpAddr>)> =
        (0..n).map(|i| (node_name(i), vec![node_ip(i)])).collect();
    let refs: Vec<(&str, &[IpAddr])> = nodes
        .iter()
        .map(|(name, ips)| (name.as_str(), ips.as_slice()))
        .collect();
    let pki = TestPki::new(&refs);
    let ips: Vec<String> = (0..n).map(|i| node_ip(i).to_string()).collect();
    let port = free_port_on(&ips.iter().map(String::as_str).collect::<Vec<_>>());
    let mut services = Vec::new();
    for i in 0..n {
        services.push(node_service(node_ip(i), port, node_name(i)).await);
    }
    (pki, port, services)
}

/// A replica running in this process.
struct Replica {
    id: String,
    tunnel: SocketAddr,
    http: SocketAddr,
    registry: Arc<Registry>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

/// `n` replicas whose tunnel ports are one another's `--peers` (each finds itself in the list).
async fn replicas(pki: &TestPki, n: usize, port: u16) -> Vec<Replica> {
    let tunnel_ports: Vec<u16> = (0..n).map(|_| free_udp_tcp_port()).collect();
    let mut out = Vec::new();
    for i in 0..n {
        out.push(start_replica(pki, i, &tunnel_ports, port).await);
    }
    out
}

/// Replica `i` of those at `tunnel_ports` (all of them its `--peers`), its nodes' service on
/// `port`.
async fn start_replica(pki: &TestPki, i: usize, tunnel_ports: &[u16], port: u16) -> Replica {
    let peers: Vec<String> = tunnel_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let peers = PeerConfig {
        peers,
        dns_name: None,
        dns_server: None,
    };
    let loopback = "127.0.0.1".parse().expect("ip");
    start_replica_on(
        pki,
        i,
        SocketAddr::new(loopback, tunnel_ports[i]),
        peers,
        port,
    )
    .await
}

/// Replica `i` listening on `tunnel`'s address (its fronts there too), with `peers`.
async fn start_replica_on(
    pki: &TestPki,
    i: usize,
    tunnel: SocketAddr,
    peers: PeerConfig,
    port: u16,
) -> Replica {
    let config = ServerConfig {
        bind_address: tunnel.ip(),
        meta_bind_address: "127.0.0.1".parse().expect("ip"),
        tunnel_port: tunnel.port(),
        secure_port: 0,
        insecure_port: 0,
        meta_port: 0,
        tls_cert_file: Some(pki.tunnel.server_cert.clone()),
        tls_private_key_file: Some(pki.tunnel.server_key.clone()),
        client_ca_file: Some(pki.tunnel.ca_cert.clone()),
        server_id: format!("replica-{i}"),
        shutdown_delay: Duration::ZERO,
        kubelet_port: port,
        kubelet_read_only_port: port,
        metrics: Some(edge_tunnel_testkit::metrics()),
        // The service is on the node's IP, not its loopback.
        ports: Some(
            PortConfig::parse(
                [(LOCALHOST_PROXY_PORTS, "")],
                FixedPorts {
                    kubelet: port,
                    kubelet_read_only: port,
                    ..FixedPorts::default()
                },
            )
            .expect("port config"),
        ),
        peers,
        ..ServerConfig::default()
    };
    let server = Server::bind(config).await.expect("replica binds");
    let (stop, stopped) = oneshot::channel::<()>();
    Replica {
        id: format!("replica-{i}"),
        tunnel: server.tunnel_addr(),
        http: server.insecure_addr(),
        registry: server.registry(),
        stop: Some(stop),
        task: tokio::spawn(async move {
            let _ = server
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        }),
    }
}

/// An agent for node `i` dialing `server` over `transport`, its node's service on `port`.
fn agent_config(
    pki: &TestPki,
    i: usize,
    server: SocketAddr,
    port: u16,
    transport: TransportChoice,
) -> AgentConfig {
    let (crt, key) = pki.agent(&node_name(i));
    AgentConfig {
        server_address: server.to_string(),
        server_name: Some("localhost".into()),
        node_name: node_name(i),
        node_ips: vec![node_ip(i)],
        tls_cert_file: Some(crt),
        tls_private_key_file: Some(key),
        ca_file: Some(pki.tunnel.ca_cert.clone()),
        meta_port: 0,
        allowed_ports: Some(PortSet::new([port])),
        localhost_proxy_ports: Some(PortSet::default()),
        transport,
        metrics: Some(edge_tunnel_testkit::metrics()),
        ..AgentConfig::default()
    }
}

struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningAgent {
    /// Starts an agent and waits until it is connected (to `expect_server`, when given).
    async fn start(config: AgentConfig, expect_server: Option<&str>) -> Self {
        let agent = Agent::new(config);
        let mut status = agent.status();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = agent
                .run(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        tokio::time::timeout(
            Duration::from_secs(20),
            status.wait_for(|s| matches!(s, AgentStatus::Connected { server_id, .. } if expect_server.is_none_or(|e| e == server_id))),
        )
        .await
        .expect("agent connects in time")
        .expect("agent runs");
        Self {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// What the HTTP front of `front` answers for node `node` on `port`, or how the exchange failed.
async fn try_ask(front: SocketAddr, node: &str, port: u16) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(front)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut sender = client::http1(tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(20),
        client::get(&mut sender, &format!("{node}:{port}"), "/"),
    )
    .await
    .map_err(|_| "no answer in 20 s".to_owned())?
    .map_err(|e| format!("response: {e}"))?;
    Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
}

/// What the HTTP front of `front` answers for node `node` on `port`: status and body.
async fn ask(front: SocketAddr, node: &str, port: u16) -> (u16, String) {
    try_ask(front, node, port)
        .await
        .unwrap_or_else(|e| panic!("{node} through {front}: {e}"))
}

/// Waits until every replica has a peer link from each other one.
async fn linked(replicas: &[Replica]) {
    links_up(replicas.len() * (replicas.len() - 1)).await;
}

/// Waits until the replicas of this process have dialed `want` peer links together.
async fn links_up(want: usize) {
    let want = want as f64;
    let metrics = edge_tunnel_testkit::metrics();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = metrics.render();
        // One process: every replica's gauge is the same series; the sum of the
        // per-replica sets is not, so count the links each side reports instead.
        let out = metric_value(
            &text,
            "edge_tunnel_server_peer_links",
            &[("direction", "out")],
        );
        if out >= want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "peer links up: {out} of {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_serves_any_node_and_follows_an_agent_that_moved() {
    edge_tunnel_testkit::init_tracing();
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    const NODES: usize = 6;
    let (pki, port, services) = edge_nodes(NODES).await;
    let replicas = replicas(&pki, 3, port).await;
    linked(&replicas).await;

    // Node i's agent on replica i % 3, over QUIC and gRPC in turn.
    let mut agents = Vec::new();
    for i in 0..NODES {
        let home = &replicas[i % 3];
        let transport = if i % 2 == 0 {
            TransportChoice::Quic
        } else {
            TransportChoice::Grpc
        };
        let config = agent_config(&pki, i, home.tunnel, port, transport);
        agents.push(Some(RunningAgent::start(config, Some(&home.id)).await));
        home.registry.wait_for(&node_name(i)).await;
    }

    for replica in &replicas {
        for i in 0..NODES {
            let (status, body) = ask(replica.http, &node_name(i), port).await;
            assert_eq!(
                (status, body.as_str()),
                (200, node_name(i).as_str()),
                "node {i} through {}",
                replica.id
            );
        }
        // By IP too: the holding replica maps it through the agent's certificate.
        let (status, body) = ask(replica.http, &node_ip(4).to_string(), port).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "edge-4"),
            "by IP through {}",
            replica.id
        );
    }
    let text = edge_tunnel_testkit::metrics().render();
    // Each replica holds 2 of the 6 nodes: 4 of every 6 requests (and the IP one on two
    // replicas) were forwarded.
    assert!(
        metric_value(
            &text,
            "edge_tunnel_server_peer_forwards_total",
            &[("result", "ok")]
        ) >= 14.0,
        "{text}"
    );

    // No replica holds it: 503, from every replica.
    for replica in &replicas {
        let (status, _) = ask(replica.http, "edge-nowhere", port).await;
        assert_eq!(status, 503, "unknown node through {}", replica.id);
    }

    // Node 0 moves from replica 0 to replica 1. Replica 2 remembers replica 0 as its holder:
    // that answer is stale now, and replica 2 must find the node on replica 1.
    agents[0].take().expect("agent 0").stop().await;
    replicas[0].registry.wait_gone(&node_name(0)).await;
    let config = agent_config(&pki, 0, replicas[1].tunnel, port, TransportChoice::Quic);
    agents[0] = Some(RunningAgent::start(config, Some(&replicas[1].id)).await);
    // The agent hears it is registered just before the replica's registry has it.
    replicas[1].registry.wait_for(&node_name(0)).await;
    for replica in &replicas {
        let (status, body) = ask(replica.http, &node_name(0), port).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "edge-0"),
            "the moved node through {}",
            replica.id
        );
    }

    for agent in agents.into_iter().flatten() {
        agent.stop().await;
    }
    drop(replicas);
    for service in services {
        service.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_later_is_found_and_serves_the_others_nodes() {
    edge_tunnel_testkit::init_tracing();
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    let (pki, port, services) = edge_nodes(1).await;
    // Three replicas listed everywhere; the third not started yet.
    let tunnel_ports: Vec<u16> = (0..3).map(|_| free_udp_tcp_port()).collect();
    let first = start_replica(&pki, 0, &tunnel_ports, port).await;
    let second = start_replica(&pki, 1, &tunnel_ports, port).await;
    links_up(2).await;
    let config = agent_config(&pki, 0, first.tunnel, port, TransportChoice::Quic);
    let agent = RunningAgent::start(config, Some(&first.id)).await;
    first.registry.wait_for(&node_name(0)).await;
    let (status, body) = ask(second.http, &node_name(0), port).await;
    assert_eq!((status, body.as_str()), (200, "edge-0"));

    // The first replicas have been failing to reach the third for a while (backing off).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = tokio::time::Instant::now();
    let third = start_replica(&pki, 2, &tunnel_ports, port).await;
    // Used as soon as the holder's link to it is up: the request is forwarded to the first.
    let deadline = started + Duration::from_secs(10);
    loop {
        let (status, body) = ask(third.http, &node_name(0), port).await;
        if status == 200 {
            assert_eq!(body, "edge-0");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new replica serves the first one's node within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "a replica started later served another's node after {:?}",
        started.elapsed()
    );
    agent.stop().await;
    drop((first, second, third));
    for service in services {
        service.abort();
    }
}

/// haproxy (`mode tcp`, round robin, health-checked) in front of the replicas' TCP tunnel
/// ports, as a cloud load balancer in front of the Deployment. Killed on drop.
struct Haproxy {
    addr: SocketAddr,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

/// One haproxy frontend: its backends, and for each the meta address whose `/readyz` says
/// whether it takes new connections (else the backend's own port is checked).
struct Frontend<'a> {
    backends: &'a [SocketAddr],
    ready: Option<&'a [SocketAddr]>,
}

impl Haproxy {
    async fn start(backends: &[SocketAddr]) -> Self {
        let (lb, _) = Self::start_with(
            Frontend {
                backends,
                ready: None,
            },
            None,
        )
        .await;
        lb
    }

    /// A TCP frontend for `tunnel` and, with `fronts`, a second one whose address is returned.
    async fn start_with(
        tunnel: Frontend<'_>,
        fronts: Option<Frontend<'_>>,
    ) -> (Self, Option<SocketAddr>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::from(
            "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  option redispatch\n  retries 3\n",
        );
        let mut ports = Vec::new();
        for (name, frontend) in [("tunnel", Some(tunnel)), ("fronts", fronts)] {
            let Some(frontend) = frontend else { continue };
            let port = free_port_on(&["127.0.0.1"]);
            ports.push(port);
            config += &format!(
                "frontend {name}\n  bind 127.0.0.1:{port}\n  default_backend {name}\nbackend {name}\n  balance roundrobin\n"
            );
            if frontend.ready.is_some() {
                config += "  option httpchk GET /readyz\n";
            }
            for (i, addr) in frontend.backends.iter().enumerate() {
                let check = match frontend.ready {
                    Some(meta) => format!("check port {}", meta[i].port()),
                    None => "check".into(),
                };
                config += &format!("  server r{i} {addr} {check} inter 200ms fall 1 rise 1\n");
            }
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = tokio::process::Command::new(program("haproxy"))
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy runs (scripts/test installs it)");
        let addrs: Vec<SocketAddr> = ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        for addr in &addrs {
            let mut up = false;
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(up, "haproxy does not listen on {addr}");
        }
        let lb = Self {
            addr: addrs[0],
            child,
            _dir: dir,
        };
        (lb, addrs.get(1).copied())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A replica as its own `tunnel-server` process, so that it can be killed (SIGKILL: nothing
/// is closed gracefully, as when a pod's node dies).
struct ReplicaProcess {
    id: String,
    tunnel: SocketAddr,
    http: SocketAddr,
    meta: SocketAddr,
    child: tokio::process::Child,
    /// What it was started with, to start it again.
    args: Vec<std::ffi::OsString>,
    _dir: tempfile::TempDir,
}

/// `tunnel-server` with `args`, its log level from `REPLICA_LOG` (default warn).
fn spawn_replica(args: &[std::ffi::OsString]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_testkit-server"))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("REPLICA_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .kill_on_drop(true)
        .spawn()
        .expect("tunnel-server runs")
}

impl ReplicaProcess {
    /// Kills it with SIGKILL (nothing is closed gracefully, as when a pod's node dies) and
    /// waits until it is gone.
    async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }

    /// Sends it `signal` (`TERM`, `STOP`…).
    async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let sent = tokio::process::Command::new(program("kill"))
            .args([&format!("-{signal}"), &pid])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "SIG{signal} sent to {}", self.id);
    }

    /// Kills it and starts it again with the same flags, ports and certificate.
    async fn restart(&mut self) {
        self.kill().await;
        self.child = spawn_replica(&self.args);
        self.wait_ready().await;
    }

    /// `n` replica processes, each with the others (and itself) as `--peers`, the service
    /// `port` dialed on the node's IP.
    async fn start_all(pki: &TestPki, n: usize, port: u16, extra: &[&str]) -> Vec<Self> {
        let tunnel_ports: Vec<u16> = (0..n).map(|_| free_udp_tcp_port()).collect();
        let peers = tunnel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut out = Vec::new();
        for (i, tunnel_port) in tunnel_ports.into_iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            // The ConfigMap as mounted: no localhost-proxy ports, so `port` is the node's.
            std::fs::write(dir.path().join(LOCALHOST_PROXY_PORTS), "").expect("config dir");
            let (http, meta) = (free_port_on(&["127.0.0.1"]), free_port_on(&["127.0.0.1"]));
            let id = format!("replica-{i}");
            let mut args: Vec<std::ffi::OsString> = Vec::new();
            let mut add =
                |list: &[&std::ffi::OsStr]| args.extend(list.iter().map(|a| a.to_os_string()));
            let (tunnel_s, http_s, meta_s, port_s) = (
                tunnel_port.to_string(),
                http.to_string(),
                meta.to_string(),
                port.to_string(),
            );
            for pair in [
                ["--bind-address", "127.0.0.1"],
                ["--secure-port", "0"],
                ["--tunnel-port", &tunnel_s],
                ["--insecure-port", &http_s],
                ["--meta-port", &meta_s],
                ["--kubelet-port", &port_s],
                ["--kubelet-read-only-port", &port_s],
                ["--server-id", &id],
                ["--peers", &peers],
            ] {
                add(&[pair[0].as_ref(), pair[1].as_ref()]);
            }
            add(&[
                "--tls-cert-file".as_ref(),
                pki.tunnel.server_cert.as_os_str(),
            ]);
            add(&[
                "--tls-private-key-file".as_ref(),
                pki.tunnel.server_key.as_os_str(),
            ]);
            add(&["--client-ca-file".as_ref(), pki.tunnel.ca_cert.as_os_str()]);
            add(&["--config-dir".as_ref(), dir.path().as_os_str()]);
            for arg in extra {
                add(&[arg.as_ref()]);
            }
            let child = spawn_replica(&args);
            out.push(Self {
                id,
                tunnel: SocketAddr::from(([127, 0, 0, 1], tunnel_port)),
                http: SocketAddr::from(([127, 0, 0, 1], http)),
                meta: SocketAddr::from(([127, 0, 0, 1], meta)),
                child,
                args,
                _dir: dir,
            });
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for replica in &out {
            replica.wait_ready().await;
            // Linked from every other replica: it can forward to each.
            while replica.peers_in().await < (n - 1) as f64 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} has its peers",
                    replica.id
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        out
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(tcp) = tokio::net::TcpStream::connect(self.meta).await
                && let Ok(mut sender) = client::http1(tcp).await
                && let Ok((status, _)) = client::get(&mut sender, "meta", "/readyz").await
                && status == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} not ready", self.id);
    }

    async fn scrape(&self) -> String {
        let tcp = tokio::net::TcpStream::connect(self.meta)
            .await
            .expect("meta accepts");
        let mut sender = client::http1(tcp).await.expect("http/1");
        let (_, body) = client::get(&mut sender, "meta", "/metrics")
            .await
            .expect("metrics");
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Agents this replica holds now.
    async fn agents(&self) -> f64 {
        metric_value(&self.scrape().await, "edge_tunnel_server_sessions", &[])
    }

    /// Peer links other replicas dialed to this one.
    async fn peers_in(&self) -> f64 {
        metric_value(
            &self.scrape().await,
            "edge_tunnel_server_peer_links",
            &[("direction", "in")],
        )
    }
}

/// nginx's stream module in front of the replicas' UDP tunnel ports, hashing each client's
/// address and port to a replica: a cloud load balancer for QUIC. Killed on drop.
struct Nginx {
    addr: SocketAddr,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(backends: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_udp_tcp_port();
        let servers: String = backends
            .iter()
            .map(|addr| format!("    server {addr};\n"))
            .collect();
        let config = format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nmaster_process off;\npid {pid};\nerror_log stderr warn;\nevents {{ worker_connections 4096; }}\nstream {{\n  upstream replicas {{\n    hash $remote_addr$remote_port consistent;\n{servers}  }}\n  server {{\n    listen 127.0.0.1:{port} udp;\n    proxy_pass replicas;\n    proxy_timeout 1h;\n  }}\n}}\n",
            pid = dir.path().join("nginx.pid").display()
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config).expect("write nginx.conf");
        let child = tokio::process::Command::new(program("nginx"))
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(&path)
            .kill_on_drop(true)
            .spawn()
            .expect("nginx runs (scripts/test installs it with its stream module)");
        let pid = dir.path().join("nginx.pid");
        for _ in 0..100 {
            if pid.exists() {
                return Self {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    child,
                    _dir: dir,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nginx did not start");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The replicas' tunnel ports.
fn tunnels(replicas: &[ReplicaProcess]) -> Vec<SocketAddr> {
    replicas.iter().map(|r| r.tunnel).collect()
}

/// The replicas' HTTP fronts.
fn fronts(replicas: &[ReplicaProcess]) -> Vec<SocketAddr> {
    replicas.iter().map(|r| r.http).collect()
}

/// Every node answers through every replica of `http_fronts`.
async fn all_served(http_fronts: &[SocketAddr], nodes: usize, port: u16) {
    for front in http_fronts {
        for i in 0..nodes {
            let (status, body) = ask(*front, &node_name(i), port).await;
            assert_eq!(
                (status, body.as_str()),
                (200, node_name(i).as_str()),
                "node {i} through {front}"
            );
        }
    }
}

/// Agents the replicas hold, by replica.
async fn held(replicas: &[ReplicaProcess]) -> Vec<f64> {
    let mut out = Vec::new();
    for replica in replicas {
        out.push(replica.agents().await);
    }
    out
}

/// Waits until `replicas` hold `want` agent sessions together, `within` at most; returns
/// how they are spread and how long it took.
async fn until_held(
    replicas: &[ReplicaProcess],
    want: usize,
    within: Duration,
) -> (Vec<f64>, Duration) {
    let started = tokio::time::Instant::now();
    loop {
        let spread = held(replicas).await;
        if spread.iter().sum::<f64>() >= want as f64 {
            return (spread, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "{want} agent sessions held within {within:?}: {spread:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Agents for nodes `0..n`, each connected (through `server`, a load balancer) before the
/// next starts, with `redundancy` sessions each.
async fn start_agents(
    pki: &TestPki,
    n: usize,
    server: SocketAddr,
    port: u16,
    transport: TransportChoice,
    redundancy: usize,
) -> Vec<RunningAgent> {
    let mut agents = Vec::new();
    for i in 0..n {
        let mut config = agent_config(pki, i, server, port, transport);
        config.server_redundancy = redundancy;
        agents.push(RunningAgent::start(config, None).await);
    }
    agents
}

async fn stop_agents(agents: Vec<RunningAgent>) {
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_every_node_answers_through_every_replica_and_survives_losing_one() {
    edge_tunnel_testkit::init_tracing();
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    const NODES: usize = 30;
    let (pki, port, services) = edge_nodes(NODES).await;
    let mut replicas = ReplicaProcess::start_all(&pki, 3, port, &[]).await;
    let lb = Haproxy::start(&tunnels(&replicas)).await;

    // The agents know only the load balancer; gRPC, since haproxy carries TCP.
    let agents = start_agents(&pki, NODES, lb.addr, port, TransportChoice::Grpc, 1).await;
    let (spread, _) = until_held(&replicas, NODES, Duration::from_secs(20)).await;
    println!("agents per replica through haproxy: {spread:?}");
    assert_eq!(spread.iter().sum::<f64>(), NODES as f64, "{spread:?}");
    assert!(
        spread.iter().all(|n| *n > 0.0),
        "round robin reaches every replica: {spread:?}"
    );
    all_served(&fronts(&replicas), NODES, port).await;

    // One replica is killed. Its agents come back through the load balancer to the others,
    // and every node answers through both again.
    let mut dead = replicas.remove(1);
    let lost = dead.agents().await;
    dead.kill().await;
    let (_, back) = until_held(&replicas, NODES, Duration::from_secs(30)).await;
    println!("{lost} agents of the killed replica held again by the others after {back:?}");
    all_served(&fronts(&replicas), NODES, port).await;

    stop_agents(agents).await;
    drop(lb);
    drop(replicas);
    for service in services {
        service.abort();
    }
}

/// How a followed log ended, as its client saw it.
#[derive(Debug)]
struct Followed {
    lines: usize,
    /// When its last byte came, or `None` while it was still running at the end.
    ended: Option<tokio::time::Instant>,
}

/// Follows `/follow` of `node` through `front` until it ends or `until`.
async fn follow(
    front: SocketAddr,
    node: String,
    port: u16,
    until: tokio::time::Instant,
) -> Followed {
    let mut tcp = tokio::net::TcpStream::connect(front)
        .await
        .expect("front accepts");
    let request = format!("GET /follow HTTP/1.1\r\nHost: {node}:{port}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("request");
    let mut lines = 0;
    let mut buf = [0u8; 4096];
    let mut last = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout_at(until, tcp.read(&mut buf)).await {
            Err(_) => return Followed { lines, ended: None },
            Ok(Ok(0) | Err(_)) => {
                return Followed {
                    lines,
                    ended: Some(last),
                };
            }
            Ok(Ok(n)) => {
                lines += buf[..n].iter().filter(|b| **b == b'\n').count();
                last = tokio::time::Instant::now();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_replica_behind_haproxy_without_failing_a_request() {
    edge_tunnel_testkit::init_tracing();
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    const NODES: usize = 12;
    const DRAIN: Duration = Duration::from_secs(4);
    const DELAY: Duration = Duration::from_secs(1);
    let (pki, port, services) = edge_nodes(NODES).await;
    let drain = DRAIN.as_secs().to_string();
    // haproxy checks /readyz every 200 ms: a second of not ready takes the replica out.
    let replicas = [
        "--drain-timeout-seconds",
        &drain,
        "--shutdown-delay-seconds",
        "1",
    ];
    let mut replicas = ReplicaProcess::start_all(&pki, 3, port, &replicas).await;
    let (tunnels, http_fronts) = (tunnels(&replicas), fronts(&replicas));
    let metas: Vec<SocketAddr> = replicas.iter().map(|r| r.meta).collect();
    // The load balancer sends agents to the tunnel ports, clients to the HTTP fronts of the
    // replicas whose /readyz says so.
    let (lb, front) = Haproxy::start_with(
        Frontend {
            backends: &tunnels,
            ready: None,
        },
        Some(Frontend {
            backends: &http_fronts,
            ready: Some(&metas),
        }),
    )
    .await;
    let front = front.expect("fronts frontend");
    let agents = start_agents(&pki, NODES, lb.addr, port, TransportChoice::Grpc, 1).await;
    until_held(&replicas, NODES, Duration::from_secs(20)).await;
    all_served(&[front], NODES, port).await;

    // 10 followed logs, and 200 short requests a second (2,000 at most, 10 s at most).
    let end = tokio::time::Instant::now() + Duration::from_secs(14);
    let followers: Vec<_> = (0..10)
        .map(|i| tokio::spawn(follow(front, node_name(i), port, end)))
        .collect();
    let load = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut sent = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut requests = tokio::task::JoinSet::new();
        let stop = tokio::time::Instant::now() + Duration::from_secs(10);
        while sent < 2_000 && tokio::time::Instant::now() < stop {
            tick.tick().await;
            let i = sent % NODES;
            sent += 1;
            let at = tokio::time::Instant::now();
            requests.spawn(async move { (i, at, try_ask(front, &node_name(i), port).await) });
        }
        while let Some(done) = requests.join_next().await {
            let (i, at, answer) = done.expect("request task");
            match answer {
                Ok((200, body)) if body == node_name(i) => {}
                other => failures.push(format!("{} sent at {at:?}: {other:?}", node_name(i))),
            }
        }
        (sent, failures)
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut leaving = replicas.remove(1);
    let held_before = leaving.agents().await;
    let sigterm = tokio::time::Instant::now();
    leaving.signal("TERM").await;
    let exit = tokio::time::timeout(
        DELAY + DRAIN + Duration::from_secs(10),
        leaving.child.wait(),
    )
    .await
    .expect("the drained replica exits after its drain")
    .expect("wait");
    let exited_after = sigterm.elapsed();
    assert!(exit.success(), "the drained replica exits 0: {exit:?}");

    let (sent, failures) = load.await.expect("load task");
    let mut ended = Vec::new();
    for follower in followers {
        let followed = follower.await.expect("follower task");
        assert!(followed.lines > 0, "a follower got lines: {followed:?}");
        if let Some(at) = followed.ended {
            ended.push(at.duration_since(sigterm));
        }
    }
    println!(
        "drain: replica held {held_before} agents, exited 0 after {exited_after:?}; {sent} requests, {} failed; {} of 10 followed logs ended, after {ended:?}",
        failures.len(),
        ended.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the drain: {failures:?}"
    );
    // A log through the leaving replica runs until its drain deadline, then ends: never
    // before, never long after (no hang).
    for at in &ended {
        assert!(
            *at >= DELAY + DRAIN - Duration::from_millis(500)
                && *at <= DELAY + DRAIN + Duration::from_secs(3),
            "a followed log ended {at:?} after SIGTERM (delay {DELAY:?}, drain {DRAIN:?})"
        );
    }
    // Every agent is held by the two replicas left.
    assert_eq!(held(&replicas).await.iter().sum::<f64>(), NODES as f64);

    for agent in agents {
        agent.stop().await;
    }
    drop(lb);
    drop(replicas);
    for service in services {
        service.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_server_redundancy_2_a_replica_lost_loses_no_node() {
    edge_tunnel_testkit::init_tracing();
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    const NODES: usize = 12;
    let (pki, port, services) = edge_nodes(NODES).await;
    let mut replicas = ReplicaProcess::start_all(&pki, 3, port, &[]).await;
    let lb = Haproxy::start(&tunnels(&replicas)).await;

    // Two sessions per agent, each to a different replica, both through the load balancer.
    // A replica holds one session per node: 2 × NODES in all means two replicas each.
    let agents = start_agents(&pki, NODES, lb.addr, port, TransportChoice::Grpc, 2).await;
    let (spread, _) = until_held(&replicas, 2 * NODES, Duration::from_secs(30)).await;
    println!("sessions per replica with redundancy 2: {spread:?}");
    all_served(&fronts(&replicas), NODES, port).await;

    // A replica freezes (SIGSTOP): it closes nothing, so no agent notices or connects again
    // (the ping deadline is 25 s away). Every node answers through the two others all the
    // same, over the session it already holds there.
    let frozen = replicas.remove(1);
    frozen.signal("STOP").await;
    let lost = tokio::time::Instant::now();
    all_served(&fronts(&replicas), NODES, port).await;
    println!(
        "every node answered through the two replicas left within {:?} of losing the third",
        lost.elapsed()
    );
    assert!(
        lost.elapsed() < Duration::from_secs(20),
        "served before any agent could have noticed the frozen replica"
    );

    stop_agents(agents).await;
    drop((lb, frozen, replicas));
    for service in services {
        service.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_udp_hashing_quic_agents_answer_through_every_replica_and_move_when_one_dies()
{
    edge_tunnel_testkit::init_tracing();
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    const NODES: usize = 30;
    let (pki, port, services) = edge_nodes(NODES).await;
    let mut replicas = ReplicaProcess::start_all(&pki, 3, port, &[]).await;
    let lb = Nginx::start(&tunnels(&replicas)).await;

    // QUIC only: the agents know only nginx's UDP port.
    let agents = start_agents(&pki, NODES, lb.addr, port, TransportChoice::Quic, 1).await;
    let (spread, _) = until_held(&replicas, NODES, Duration::from_secs(20)).await;
    println!("QUIC agents per replica through nginx: {spread:?}");
    assert!(
        spread.iter().all(|n| *n > 0.0),
        "the hash reaches every replica: {spread:?}"
    );
    all_served(&fronts(&replicas), NODES, port).await;

    // A replica dies. Nothing tells its QUIC agents: the next keep-alive (5 s) goes through
    // nginx to another replica, whose stateless reset (the key follows the shared private
    // key) sends the agent to connect again at once.
    let mut dead = replicas.remove(1);
    let lost = dead.agents().await;
    dead.kill().await;
    let (_, back) = until_held(&replicas, NODES, Duration::from_secs(20)).await;
    println!("{lost} QUIC agents of the killed replica held by the others after {back:?}");
    all_served(&fronts(&replicas), NODES, port).await;

    stop_agents(agents).await;
    drop(lb);
    drop(replicas);
    for service in services {
        service.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_links_to_a_restarted_replica_are_made_again() {
    edge_tunnel_testkit::init_tracing();
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    let (pki, port, services) = edge_nodes(1).await;
    let mut replicas = ReplicaProcess::start_all(&pki, 3, port, &[]).await;
    let config = agent_config(&pki, 0, replicas[0].tunnel, port, TransportChoice::Quic);
    let agent = RunningAgent::start(config, Some(&replicas[0].id)).await;
    let (status, _) = ask(replicas[2].http, &node_name(0), port).await;
    assert_eq!(status, 200);

    // The third replica dies and comes back on the same ports: every link to and from it is
    // cut. The others' links to it are made again (their old ones hear a stateless reset),
    // and it forwards to the node's replica again.
    let started = tokio::time::Instant::now();
    replicas[2].restart().await;
    let deadline = started + Duration::from_secs(15);
    while replicas[2].peers_in().await < 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted replica is linked from both others again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relinked = started.elapsed();
    let (status, body) = ask(replicas[2].http, &node_name(0), port).await;
    assert_eq!((status, body.as_str()), (200, "edge-0"));
    // Its own links to the others are made too (each counts the links it accepted).
    for replica in &replicas[..2] {
        assert_eq!(
            replica.peers_in().await,
            2.0,
            "{} is linked from both others",
            replica.id
        );
    }
    println!("a restarted replica was linked again after {relinked:?}");
    agent.stop().await;
    drop(replicas);
    for service in services {
        service.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_find_each_other_by_a_dns_name() {
    edge_tunnel_testkit::init_tracing();
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    let (pki, port, services) = edge_nodes(1).await;
    // Three replicas on one port of three addresses, as pods behind a headless Service.
    let ips: Vec<IpAddr> = (1..=3).map(|n| IpAddr::from([127, 0, 0, n])).collect();
    let texts: Vec<String> = ips.iter().map(ToString::to_string).collect();
    let tunnel_port = free_port_on(&texts.iter().map(String::as_str).collect::<Vec<_>>());
    let records: Vec<String> = ips
        .iter()
        .map(|ip| format!("--host-record=replicas.test,{ip}"))
        .collect();
    let (_dns, dns_server) = dnsmasq(&records).await;
    let mut replicas = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let peers = PeerConfig {
            peers: Vec::new(),
            dns_name: Some("replicas.test".into()),
            dns_server: Some(dns_server),
        };
        let tunnel = SocketAddr::new(*ip, tunnel_port);
        replicas.push(start_replica_on(&pki, i, tunnel, peers, port).await);
    }
    links_up(6).await;
    let config = agent_config(&pki, 0, replicas[0].tunnel, port, TransportChoice::Quic);
    let agent = RunningAgent::start(config, Some(&replicas[0].id)).await;
    replicas[0].registry.wait_for(&node_name(0)).await;
    for replica in &replicas {
        let (status, body) = ask(replica.http, &node_name(0), port).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "edge-0"),
            "through {}",
            replica.id
        );
    }
    agent.stop().await;
    drop(replicas);
    for service in services {
        service.abort();
    }
}
