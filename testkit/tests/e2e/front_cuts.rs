//! How the HTTP front ends what it carries, over both transports: a stream the tunnel cut
//! (its target reset it, or the agent's link went) reaches a CONNECT client, a Host client
//! mid-response and an upgraded exec as a TCP reset, never a clean FIN; a client that leaves
//! before the agent answers counts as `client_gone`; an open whose session is replaced while it
//! waits moves to the new session; a stalled request body ends in 408 and frees the node's
//! stream; a Host that is no DNS name is named in the 400.

use std::io::ErrorKind;
use std::time::Duration;

use edge_tunnel_testkit::client::{self, Upgrade};
use edge_tunnel_testkit::target::Blackhole;
use edge_tunnel_testkit::{AgentHandle, TestCluster, TestPki, kind_of, metric_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_core::{CloseCause, Connector, NodeRef, PortSet, TransportChoice, proto};

/// Every wait of these tests: a liveness bound, not a timing assertion.
const BOUND: Duration = Duration::from_secs(10);

/// How the tunnel cuts a stream in a test.
#[derive(Debug, Clone, Copy)]
enum Cutter {
    /// The target resets its connection; the agent resets the stream.
    TargetReset,
    /// The server closes the agent's session under the stream.
    LinkClosed,
}

/// A cluster with one agent for node-a that may dial `port` on loopback.
async fn cluster_for(
    transport: TransportChoice,
    port: u16,
    tweak: impl FnOnce(&mut tunnel_server::ServerConfig),
) -> (TestCluster, AgentHandle) {
    let cluster =
        TestCluster::start_with(TestPki::new(&[("node-a", &[])]), port, 10255, tweak).await;
    let mut config = cluster.agent_config_over("node-a", transport);
    config.allowed_ports = Some(PortSet::new([port]));
    config.localhost_proxy_ports = config.allowed_ports.clone();
    let (agent, _) = cluster.start_agent(config).await;
    assert_eq!(cluster.transport_of("node-a"), kind_of(transport));
    (cluster, agent)
}

fn session_of(cluster: &TestCluster) -> tunnel_core::ServerSession {
    cluster
        .registry
        .lookup(&NodeRef::Name("node-a".into()))
        .expect("node-a has an agent")
        .0
}

async fn accept(listener: &TcpListener) -> TcpStream {
    tokio::time::timeout(BOUND, listener.accept())
        .await
        .expect("the agent dials the target")
        .unwrap()
        .0
}

/// Reads until `io` holds `want` (bounded); returns what was read.
async fn read_until<R: AsyncReadExt + Unpin>(io: &mut R, want: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        while !got.windows(want.len()).any(|w| w == want) {
            let n = io.read(&mut buf).await.expect("read before the cut");
            assert!(n > 0, "ended before {want:?}: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {want:?} in {got:?}"));
    got
}

/// Reads to the end: the error that ended the stream (None for a clean end).
async fn read_to_end<R: AsyncReadExt + Unpin>(io: &mut R) -> Option<ErrorKind> {
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(e.kind()),
            }
        }
    })
    .await
    .expect("the stream ends")
}

/// Cuts the stream to `target`; returns the target when it stays open (only the link went).
fn cut(how: Cutter, cluster: &TestCluster, target: TcpStream) -> Option<TcpStream> {
    match how {
        Cutter::TargetReset => {
            target.set_zero_linger().unwrap();
            None
        }
        Cutter::LinkClosed => {
            session_of(cluster).close(CloseCause::Shutdown);
            Some(target)
        }
    }
}

async fn a_cut_connect_tunnel_resets_its_client(transport: TransportChoice) {
    for how in [Cutter::LinkClosed, Cutter::TargetReset] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cluster, _agent) = cluster_for(transport, port, |_| {}).await;
        let authority = format!("node-a:{port}");

        // A tunnel that ends normally ends with a FIN.
        let mut whole = client::connect_via(cluster.insecure_addr, &authority)
            .await
            .unwrap();
        let mut target = accept(&listener).await;
        target.write_all(b"bye").await.unwrap();
        target.shutdown().await.unwrap();
        read_until(&mut whole, b"bye").await;
        whole.shutdown().await.unwrap();
        assert_eq!(
            read_to_end(&mut whole).await,
            None,
            "{how:?}: a whole tunnel"
        );
        drop(target);

        let mut tunnel = client::connect_via(cluster.insecure_addr, &authority)
            .await
            .unwrap();
        let mut target = accept(&listener).await;
        target.write_all(b"hello").await.unwrap();
        read_until(&mut tunnel, b"hello").await;
        let _target = cut(how, &cluster, target);
        assert_eq!(
            read_to_end(&mut tunnel).await,
            Some(ErrorKind::ConnectionReset),
            "{how:?}: a cut CONNECT tunnel"
        );
    }
}

async fn a_cut_response_resets_its_host_client(transport: TransportChoice) {
    for how in [Cutter::TargetReset, Cutter::LinkClosed] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cluster, _agent) = cluster_for(transport, port, |_| {}).await;
        // A followed log: chunked, one line so far.
        let mut client = TcpStream::connect(cluster.insecure_addr).await.unwrap();
        client
            .write_all(format!("GET /containerLogs/ns/pod/c?follow=true HTTP/1.1\r\nHost: node-a:{port}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut target = accept(&listener).await;
        read_until(&mut target, b"\r\n\r\n").await;
        target
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nline1\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, b"line1\n").await;
        let _target = cut(how, &cluster, target);
        assert_eq!(
            read_to_end(&mut client).await,
            Some(ErrorKind::ConnectionReset),
            "{how:?}: a cut response"
        );
    }
}

async fn a_cut_exec_resets_its_client(transport: TransportChoice) {
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let (_agent, _) = cluster
        .start_agent(cluster.agent_config_over("node-a", transport))
        .await;
    let host = format!("node-a:{}", kubelet.http_addr.port());
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let mut io = client::exec_upgrade(&mut sender, &host, Upgrade::Spdy)
        .await
        .unwrap();
    io.write_all(b"echo me").await.unwrap();
    read_until(&mut io, b"echo me").await;
    session_of(&cluster).close(CloseCause::Shutdown);
    assert_eq!(
        read_to_end(&mut io).await,
        Some(ErrorKind::ConnectionReset),
        "a cut exec"
    );
}

fn http_streams(text: &str, result: &str) -> f64 {
    metric_value(
        text,
        "edge_tunnel_server_streams_total",
        &[("front", "http"), ("result", result)],
    )
}

async fn a_host_client_that_leaves_before_the_answer_counts_as_client_gone(
    transport: TransportChoice,
) {
    let hole = Blackhole::start().await.unwrap();
    let (cluster, _agent) = cluster_for(transport, hole.addr.port(), |c| {
        c.session.open_timeout = Duration::from_secs(60);
    })
    .await;
    let before = cluster.scrape().await;
    let pending = metric_value(&before, "edge_tunnel_server_pending_opens", &[]);
    let mut client = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    client
        .write_all(
            format!(
                "GET /metrics HTTP/1.1\r\nHost: node-a:{}\r\n\r\n",
                hole.addr.port()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    cluster
        .scrape_until("the open waits on the agent", |m| {
            metric_value(m, "edge_tunnel_server_pending_opens", &[]) == pending + 1.0
        })
        .await;
    drop(client);
    cluster
        .scrape_until("the open is withdrawn as client_gone", |m| {
            http_streams(m, "client_gone") == http_streams(&before, "client_gone") + 1.0
                && metric_value(m, "edge_tunnel_server_pending_opens", &[]) == pending
        })
        .await;
    let after = cluster.scrape().await;
    assert_eq!(
        http_streams(&after, "ok"),
        http_streams(&before, "ok"),
        "a request whose client left is not ok:\n{after}"
    );
}

/// An agent that registers for node-a and never answers an open.
async fn silent_agent(
    cluster: &TestCluster,
    transport: TransportChoice,
) -> tunnel_core::AgentSession {
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let (crt, key) = cluster.pki.agent("node-a");
    let identity = tunnel_core::Identity::from_pem(&read(&crt), &read(&key)).unwrap();
    let roots = tunnel_core::tls::roots_from_pem(&read(&cluster.pki.tunnel.ca_cert), "ca").unwrap();
    let tls = tunnel_core::tls::client_config(identity, roots, &[]).unwrap();
    let connector = Connector::new(tls, tunnel_core::SessionConfig::default(), transport).unwrap();
    let register = proto::Register {
        node_name: "node-a".into(),
        ..Default::default()
    };
    connector
        .connect(cluster.tunnel_addr, "localhost", register)
        .await
        .unwrap()
}

async fn an_open_waiting_on_a_replaced_session_moves_to_the_new_one(transport: TransportChoice) {
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |c| {
        c.session.open_timeout = Duration::from_secs(60);
    })
    .await;
    let silent = silent_agent(&cluster, transport).await;
    cluster.registry.wait_for("node-a").await;
    let old = session_of(&cluster).id();
    let before = cluster.scrape().await;
    let pending = metric_value(&before, "edge_tunnel_server_pending_opens", &[]);

    let proxy = cluster.insecure_addr;
    let host = format!("node-a:{}", kubelet.http_addr.port());
    let request = tokio::spawn(async move {
        let tcp = TcpStream::connect(proxy).await.unwrap();
        let mut sender = client::http1(tcp).await.unwrap();
        client::get(&mut sender, &host, "/pods").await
    });
    cluster
        .scrape_until("the open waits on the silent agent", |m| {
            metric_value(m, "edge_tunnel_server_pending_opens", &[]) == pending + 1.0
        })
        .await;
    // The node's agent comes back as a new process; the silent one's link then ends.
    let _agent = cluster.spawn_agent(cluster.agent_config_over("node-a", transport));
    tokio::time::timeout(BOUND, cluster.registry.wait_for_new("node-a", old))
        .await
        .expect("the new agent registers");
    silent.close(CloseCause::Shutdown);
    let (status, body) = tokio::time::timeout(BOUND, request)
        .await
        .expect("the request is answered")
        .unwrap()
        .unwrap();
    assert_eq!(
        status,
        200,
        "answered through the new session: {}",
        String::from_utf8_lossy(&body)
    );
}

async fn a_stalled_request_body_gets_408_and_frees_the_stream(transport: TransportChoice) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (cluster, _agent) = cluster_for(transport, port, |c| {
        c.request_body_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    client
        .write_all(format!("POST /upload HTTP/1.1\r\nHost: node-a:{port}\r\nContent-Length: 100\r\n\r\n0123456789").as_bytes())
        .await
        .unwrap();
    // The target waits for the whole body, as an upload endpoint does.
    let mut target = accept(&listener).await;
    read_until(&mut target, b"0123456789").await;
    assert_eq!(session_of(&cluster).open_streams(), 1);

    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, client.read_to_end(&mut answer))
        .await
        .expect("the front answers a stalled body")
        .expect("408 then a clean end");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains("request body stalled"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "{answer}");
    // The stream is reset, not finished: the target sees the agent's reset.
    assert_eq!(
        read_to_end(&mut target).await,
        Some(ErrorKind::ConnectionReset),
        "the agent's side of a stalled upload"
    );
    let session = session_of(&cluster);
    tokio::time::timeout(BOUND, async {
        while session.open_streams() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the node's stream slot is released");
}

edge_tunnel_testkit::conformance!(
    a_cut_response_resets_its_host_client,
    a_host_client_that_leaves_before_the_answer_counts_as_client_gone,
    an_open_waiting_on_a_replaced_session_moves_to_the_new_one,
    a_stalled_request_body_gets_408_and_frees_the_stream,
    a_cut_connect_tunnel_resets_its_client,
    a_cut_exec_resets_its_client,
);

/// Not a transport matter: the front answers before any stream opens.
#[tokio::test]
async fn a_host_that_is_no_dns_name_is_named_in_the_answer() {
    let cluster = TestCluster::start(TestPki::new(&[("node-a", &[])]), 10250, 10255).await;
    for (host, shown) in [
        (&b"n\xc3\xb6de-a:10255"[..], "\"nöde-a:10255\""),
        (&b"node_a:10255"[..], "\"node_a:10255\""),
    ] {
        let mut client = TcpStream::connect(cluster.insecure_addr).await.unwrap();
        let mut req = b"GET /pods HTTP/1.1\r\nHost: ".to_vec();
        req.extend_from_slice(host);
        req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        client.write_all(&req).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(BOUND, client.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            answer.contains(&format!("Host is not a valid DNS name: {shown}")),
            "{answer}"
        );
    }
}
