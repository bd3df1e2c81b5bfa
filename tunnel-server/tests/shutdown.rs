//! A server stopped while clients hold long-lived connections through every front (an upgraded
//! exec through the HTTP front, CONNECT tunnels, a TLS passthrough) is gone within its drain
//! timeout, and so is everything its fronts started: the clients' connections end and the
//! agent sees its streams end. Once as a process stopped by SIGTERM, once in-process over each
//! transport. In-process, one tunnel's client never reads: the front task that serves it is
//! stuck writing to that client, where the closed session cannot reach it, so its stream is
//! released only because the task has an owner that ends it.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tunnel_core::{
    AgentSession, Connector, NodeRef, SessionConfig, TransportChoice, TunnelStream, proto, tls,
};
use tunnel_server::pki::PkiFiles;
use tunnel_server::{Server, ServerConfig, Transports};

/// Short: every connection here outlives it, so each stop waits it out.
const DRAIN: Duration = Duration::from_secs(1);
/// What a stop may take past the drain: closing the sessions, the agents' acknowledgement of
/// the QUIC close (the server waits 2 s at most) and the process's exit.
const MARGIN: Duration = Duration::from_secs(5);

/// The node port of each kind of stream, as the fake agent tells them apart. The agent dials
/// nothing, so no port is ever bound.
const KUBELET_PORT: u16 = 10250;
const UPGRADE_PORT: u16 = 10255;
const CONNECT_PORT: u16 = 9100;
const FLOOD_PORT: u16 = 9101;

/// The server's port configuration: the test's ports besides the kubelet's.
fn served() -> tunnel_core::PortConfig {
    tunnel_core::PortConfig::parse(
        [("http-proxy-ports", "9100, 9101")],
        tunnel_core::route::config::FixedPorts::default(),
    )
    .expect("ports")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Quic,
    Grpc,
}

fn pki(dir: &Path) -> PkiFiles {
    tunnel_server::pki::init(&tunnel_server::pki::PkiRequest {
        out: dir.to_owned(),
        server_sans: vec!["localhost".into()],
        agents: vec![tunnel_server::pki::AgentSpec {
            node: "node-a".into(),
            ips: vec![],
        }],
        validity_days: 1,
    })
    .expect("test PKI")
}

fn agent_tls(pki: &PkiFiles) -> rustls::ClientConfig {
    let (_, crt, key) = &pki.agents[0];
    let read = |p: &Path| std::fs::read(p).expect("PKI file");
    tls::client_config(
        tls::Identity::from_pem(&read(crt), &read(key)).expect("agent identity"),
        tls::roots_from_pem(&read(&pki.ca_cert), "ca").expect("CA"),
        &[],
    )
    .expect("agent TLS")
}

/// Registers as node-a and serves streams as [`serve_stream`] does; each stream's port is sent
/// on `ended` when the stream ends.
async fn fake_agent(pki: &PkiFiles, addr: SocketAddr, transport: Transport) -> FakeAgent {
    let tls = agent_tls(pki);
    let config = SessionConfig::default();
    let register = proto::Register::default();
    let choice = match transport {
        Transport::Quic => TransportChoice::Quic,
        Transport::Grpc => TransportChoice::Grpc,
    };
    let session = Connector::new(tls, config, choice)
        .expect("connector")
        .connect(addr, "localhost", register)
        .await
        .expect("agent registers");
    assert_eq!(session.node_name(), "node-a");
    let (ended_tx, ended) = mpsc::channel(8);
    let mut task = JoinSet::new();
    task.spawn(accept_streams(session, ended_tx));
    FakeAgent { ended, _task: task }
}

struct FakeAgent {
    ended: mpsc::Receiver<u16>,
    _task: JoinSet<()>,
}

impl FakeAgent {
    /// Waits (bounded) until streams to each of `ports` have ended.
    async fn streams_ended(&mut self, ports: &[u16]) {
        let mut ended = Vec::new();
        while ended.len() < ports.len() {
            let port = tokio::time::timeout(MARGIN, self.ended.recv())
                .await
                .unwrap_or_else(|_| panic!("agent streams still open; ended: {ended:?}"))
                .expect("agent running");
            ended.push(port);
        }
        ended.sort_unstable();
        let mut want = ports.to_vec();
        want.sort_unstable();
        assert_eq!(ended, want, "the agent's streams that ended");
    }
}

async fn accept_streams(session: AgentSession, ended: mpsc::Sender<u16>) {
    let mut streams = JoinSet::new();
    while let Ok(incoming) = session.accept().await {
        let ended = ended.clone();
        streams.spawn(async move {
            let requested = incoming.read_request().await.expect("stream header");
            let port = requested.request().target.port;
            let stream = requested.accept().await.expect("stream accepted");
            serve_stream(port, stream).await;
            let _ = ended.send(port).await;
        });
    }
    while streams.join_next().await.is_some() {}
}

/// A stream to [`UPGRADE_PORT`] is answered `101` as the kubelet answers exec, then echoed; one
/// to [`FLOOD_PORT`] gets bytes until every buffer on the way is full; any other is echoed from
/// its first byte. Each until the stream ends.
async fn serve_stream(port: u16, mut stream: TunnelStream) {
    if port == FLOOD_PORT {
        let chunk = [0u8; 64 * 1024];
        while stream.write_all(&chunk).await.is_ok() {}
        return;
    }
    if port == UPGRADE_PORT {
        let head = read_head(&mut stream).await;
        assert!(head.contains("upgrade: SPDY/3.1"), "{head}");
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: SPDY/3.1\r\n\r\n",
            )
            .await
            .expect("101 written");
    }
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

/// An HTTP head, read a byte at a time so that what follows its blank line stays unread.
async fn read_head<IO: AsyncReadExt + Unpin>(io: &mut IO) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "no end of head: {head:?}");
        head.push(io.read_u8().await.expect("read head"));
    }
    String::from_utf8(head).expect("text head")
}

/// Sends `head` to the HTTP front and returns the connection once the answer starts with
/// `status`. The front answers 503 until the registry holds the agent, which it may do a
/// moment after the agent's handshake returns.
async fn http_exchange(front: SocketAddr, head: &str, status: &str) -> TcpStream {
    let deadline = tokio::time::Instant::now() + MARGIN;
    loop {
        let mut tcp = TcpStream::connect(front).await.expect("HTTP front");
        tcp.write_all(head.as_bytes()).await.expect("request");
        let answer = read_head(&mut tcp).await;
        if answer.starts_with(status) {
            return tcp;
        }
        assert!(
            answer.starts_with("HTTP/1.1 503") && tokio::time::Instant::now() < deadline,
            "expected {status}: {answer}"
        );
    }
}

/// A CONNECT tunnel to `port` on node-a through the HTTP front.
async fn connect(http: SocketAddr, port: u16) -> TcpStream {
    let authority = format!("node-a:{port}");
    let head = format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n");
    http_exchange(http, &head, "HTTP/1.1 200").await
}

/// A ClientHello for SNI node-a: all the TLS front reads before it passes the bytes through.
fn client_hello(pki: &PkiFiles) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("node-a").expect("name");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(agent_tls(pki)), name).expect("TLS client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("ClientHello");
    hello
}

async fn echoes(tcp: &mut TcpStream, bytes: &[u8]) {
    tcp.write_all(bytes).await.expect("write");
    let mut back = vec![0u8; bytes.len()];
    tcp.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, bytes);
}

/// The long-lived connections: three shown to carry bytes both ways, and a CONNECT tunnel
/// whose client never reads. Its front task stalls writing to the client, where the end of
/// the agent's stream does not reach it: only its owner can end it.
async fn open_connections(
    pki: &PkiFiles,
    http: SocketAddr,
    tls: SocketAddr,
) -> [(&'static str, TcpStream); 4] {
    let mut exec = http_exchange(
        http,
        &format!(
            "POST /exec/default/pod-1/app?command=cat HTTP/1.1\r\nhost: node-a:{UPGRADE_PORT}\r\n\
             connection: Upgrade\r\nupgrade: SPDY/3.1\r\n\r\n"
        ),
        "HTTP/1.1 101",
    )
    .await;
    echoes(&mut exec, b"exec").await;
    let mut tunnel = connect(http, CONNECT_PORT).await;
    echoes(&mut tunnel, b"tunnel").await;
    let stalled = connect(http, FLOOD_PORT).await;
    let mut passthrough = TcpStream::connect(tls).await.expect("TLS front");
    echoes(&mut passthrough, &client_hello(pki)).await;
    [
        ("upgrade", exec),
        ("CONNECT", tunnel),
        ("stalled CONNECT", stalled),
        ("TLS passthrough", passthrough),
    ]
}

/// Each client sees its connection end, after what was in flight: end of stream or a reset,
/// within the margin.
async fn connections_end(clients: [(&'static str, TcpStream); 4]) {
    for (what, mut tcp) in clients {
        let mut rest = Vec::new();
        match tokio::time::timeout(MARGIN, tcp.read_to_end(&mut rest)).await {
            Ok(_) => {}
            Err(_) => panic!("{what}: connection still open after the server stopped"),
        }
    }
}

const ALL_PORTS: [u16; 4] = [UPGRADE_PORT, CONNECT_PORT, FLOOD_PORT, KUBELET_PORT];

/// The addresses the binary logs when it listens: `name=ADDR` fields of one line.
fn logged_addr(line: &str, name: &str) -> SocketAddr {
    let field = format!(" {name}=");
    let start = line
        .find(&field)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + field.len();
    let len = line[start..].find(' ').unwrap_or(line.len() - start);
    line[start..start + len].parse().expect("address")
}

/// Starts the binary; returns it with its tunnel (QUIC), TLS front and HTTP front addresses,
/// and the task that keeps reading its log (a full pipe would stall the server).
async fn start_binary(pki: &PkiFiles, config: &Path) -> (Child, [SocketAddr; 3], JoinSet<()>) {
    std::fs::write(config.join("http-proxy-ports"), "9100, 9101").expect("config file");
    let mut child = common::server_command(pki, 0)
        .args(["--drain-timeout-seconds", &DRAIN.as_secs().to_string()])
        // No load balancer to wait for.
        .args(["--shutdown-delay-seconds", "0"])
        .arg("--config-dir")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tunnel-server binary");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (listening_tx, listening) = oneshot::channel();
    let mut log = JoinSet::new();
    log.spawn(async move {
        let mut listening_tx = Some(listening_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("tunnel server listening")
                && let Some(tx) = listening_tx.take()
            {
                let _ = tx.send(line);
            }
        }
    });
    let line = tokio::time::timeout(Duration::from_secs(20), listening)
        .await
        .expect("the server listens")
        .expect("the server logs where it listens");
    let addrs = [
        logged_addr(&line, "tunnel"),
        logged_addr(&line, "secure"),
        logged_addr(&line, "insecure"),
    ];
    (child, addrs, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_upgrades_tunnels_and_passthroughs_within_the_drain() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(dir.path());
    let config = dir.path().join("edge-tunnel-server-cfg");
    std::fs::create_dir(&config).expect("config dir");
    let (mut server, [tunnel, tls_front, http_front], _log) = start_binary(&pki, &config).await;
    let mut agent = fake_agent(&pki, tunnel, Transport::Quic).await;
    let clients = open_connections(&pki, http_front, tls_front).await;

    let pid = server.id().expect("server running").to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(kill.success(), "SIGTERM sent");
    let status = tokio::time::timeout(DRAIN + MARGIN, server.wait())
        .await
        .expect("the server exits within its drain timeout and a margin")
        .expect("exit status");
    assert!(status.success(), "a drained stop exits cleanly: {status}");
    connections_end(clients).await;
    agent.streams_ended(&ALL_PORTS).await;
}

async fn run_returns_within_the_drain_and_leaves_no_stream_open(transport: Transport) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(dir.path());
    let localhost = "127.0.0.1".parse().expect("ip");
    let server = Server::bind(ServerConfig {
        bind_address: localhost,
        meta_bind_address: localhost,
        tunnel_port: 0,
        secure_port: 0,
        insecure_port: 0,
        meta_port: 0,
        tls_cert_file: Some(pki.server_cert.clone()),
        tls_private_key_file: Some(pki.server_key.clone()),
        client_ca_file: Some(pki.ca_cert.clone()),
        server_id: "shutdown-test".into(),
        transports: Transports {
            quic: transport == Transport::Quic,
            grpc: transport == Transport::Grpc,
        },
        drain_timeout: DRAIN,
        ports: Some(served()),
        ..ServerConfig::default()
    })
    .await
    .expect("server binds");
    let (tunnel, tls_front, http_front) = (
        server.tunnel_addr(),
        server.secure_addr(),
        server.insecure_addr(),
    );
    let registry = server.registry();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut run = JoinSet::new();
    run.spawn(server.run(async move {
        let _ = stopped.await;
    }));

    let mut agent = fake_agent(&pki, tunnel, transport).await;
    registry.wait_for("node-a").await;
    let (session, _) = registry
        .lookup(&NodeRef::Name("node-a".into()))
        .expect("node-a registered");
    let clients = open_connections(&pki, http_front, tls_front).await;
    assert_eq!(session.open_streams(), ALL_PORTS.len());

    stop.send(()).expect("server running");
    tokio::time::timeout(DRAIN + MARGIN, run.join_next())
        .await
        .expect("run returns within the drain timeout and a margin")
        .expect("run was spawned")
        .expect("run did not panic")
        .expect("run ends without error");
    // Each front task held a stream; none is left to hold one when `run` returns, the stalled
    // one included, while its client still reads nothing.
    assert_eq!(
        session.open_streams(),
        0,
        "a front task outlived the server's run"
    );
    agent.streams_ended(&ALL_PORTS).await;
    connections_end(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_within_the_drain_over_quic() {
    run_returns_within_the_drain_and_leaves_no_stream_open(Transport::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_within_the_drain_over_grpc() {
    run_returns_within_the_drain_and_leaves_no_stream_open(Transport::Grpc).await;
}
