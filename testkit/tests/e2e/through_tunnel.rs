//! End to end through the tunnel: real server, real agent, fake kubelet, clients as the
//! apiserver and Prometheus are. Loopback only; ports from :0.
//!
//! The conformance suite: every test runs once per transport (`quic::*` and `grpc::*`), so
//! users get the same behaviour whichever transport carries them.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_tunnel_testkit::client::{self, Upgrade, pattern};
use edge_tunnel_testkit::{AgentHandle, FakeKubelet, TestCluster, TestPki, kind_of, metric_value};
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_core::TransportChoice;

const MIB: usize = 1024 * 1024;

struct Setup {
    cluster: TestCluster,
    kubelet: FakeKubelet,
    _agent: AgentHandle,
}

async fn setup(transport: TransportChoice) -> Setup {
    let ip: IpAddr = "127.0.0.2".parse().unwrap();
    let (cluster, kubelet) =
        TestCluster::with_kubelet(&[("node-a", &[ip]), ("node-b", &[])], |_| {}).await;
    let (agent, node) = cluster
        .start_agent(cluster.agent_config_over("node-a", transport))
        .await;
    assert_eq!(node, "node-a");
    assert_eq!(cluster.transport_of("node-a"), kind_of(transport));
    Setup {
        cluster,
        kubelet,
        _agent: agent,
    }
}

async fn followed_log_arrives_line_by_line_through_the_tls_front(transport: TransportChoice) {
    let s = setup(transport).await;
    let tls = client::tls_connect(
        s.cluster.secure_addr,
        "node-a",
        s.cluster.pki.apiserver_tls(),
    )
    .await
    .unwrap();
    let mut sender = client::http1(tls).await.unwrap();
    let req = http::Request::get("/containerLogs/default/web-1/app?follow=true")
        .header("host", "node-a:10250")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp_fut = sender.send_request(req);
    let feed = s.kubelet.next_log_feed().await.unwrap();
    assert_eq!(feed.path, "/containerLogs/default/web-1/app");
    let resp = resp_fut.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Each line must reach the client before the next one is written.
    for i in 0..5 {
        let line = format!("2026-11-22T05:00:0{i}Z line {i}\n");
        feed.lines.send(Bytes::from(line.clone())).await.unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), line.as_bytes());
    }
    drop(feed);
    assert!(
        body.frame().await.is_none(),
        "log ends when the writer does"
    );
    // The kubelet authenticated the apiserver's certificate, not the tunnel's.
    assert_eq!(
        s.kubelet.client_subjects(),
        vec!["kube-apiserver-kubelet-client".to_owned()]
    );
}

async fn both_upgrades_through_the_tls_front_echo_1mib_with_half_close(transport: TransportChoice) {
    let s = setup(transport).await;
    for (kind, seed) in [(Upgrade::WebSocket, 1), (Upgrade::Spdy, 2)] {
        let tls = client::tls_connect(
            s.cluster.secure_addr,
            "node-a",
            s.cluster.pki.apiserver_tls(),
        )
        .await
        .unwrap();
        let mut sender = client::http1(tls).await.unwrap();
        let io = client::exec_upgrade(&mut sender, "node-a:10250", kind)
            .await
            .unwrap();
        client::echo_exact(io, &pattern(MIB, seed)).await;
    }
    // Each exec was authenticated by the kubelet as the apiserver, never as the tunnel.
    assert_eq!(
        s.kubelet.client_subjects(),
        vec!["kube-apiserver-kubelet-client".to_owned(); 2]
    );
}

async fn both_upgrades_through_the_http_front_echo_1mib_with_half_close(
    transport: TransportChoice,
) {
    let s = setup(transport).await;
    let host = format!("node-a:{}", s.kubelet.http_addr.port());
    for (kind, seed) in [(Upgrade::WebSocket, 3), (Upgrade::Spdy, 4)] {
        let tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
        let mut sender = client::http1(tcp).await.unwrap();
        let io = client::exec_upgrade(&mut sender, &host, kind)
            .await
            .unwrap();
        client::echo_exact(io, &pattern(MIB, seed)).await;
    }
}

async fn http_front_routes_by_host_by_node_ip_by_absolute_form_and_connect(
    transport: TransportChoice,
) {
    let s = setup(transport).await;
    let port = s.kubelet.http_addr.port();
    let tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    // Host without a port: the read-only port.
    let (status, body) = client::get(&mut sender, "node-a", "/pods").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        std::str::from_utf8(&body)
            .unwrap()
            .contains("\"node\":\"node-a\"")
    );
    // The node's IP (from its certificate) names the node as well.
    let (status, body) = client::get(&mut sender, &format!("127.0.0.2:{port}"), "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        std::str::from_utf8(&body)
            .unwrap()
            .contains("kubelet_running_pods{node=\"node-a\"} 12")
    );

    // Absolute-form, as an HTTP proxy client sends it.
    let mut tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
    tcp.write_all(format!("GET http://node-a:{port}/healthz HTTP/1.1\r\nHost: node-a:{port}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("ok"), "{reply}");

    // CONNECT, as kube-apiserver's egress selector and curl -p speak it; then TLS inside.
    let mut tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
    let https = s.kubelet.https_addr.port();
    tcp.write_all(
        format!("CONNECT node-a:{https} HTTP/1.1\r\nHost: node-a:{https}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 1024, "response head too long");
        head.push(tcp.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let name = rustls_pki_types::ServerName::try_from("node-a").unwrap();
    let tls = tokio_rustls::TlsConnector::from(s.cluster.pki.apiserver_tls())
        .connect(name, tcp)
        .await
        .unwrap();
    let mut sender = client::http1(tls).await.unwrap();
    let (status, _) = client::get(&mut sender, "node-a", "/healthz")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

async fn keep_alive_requests_naming_different_nodes_reach_their_own_node(
    transport: TransportChoice,
) {
    let pki = TestPki::new(&[("node-a", &[]), ("node-b", &[])]);
    let kubelet_a = FakeKubelet::start("node-a", pki.kubelet_tls())
        .await
        .unwrap();
    let kubelet_b = FakeKubelet::start("node-b", pki.kubelet_tls())
        .await
        .unwrap();
    let mut cluster =
        TestCluster::start(pki, kubelet_a.https_addr.port(), kubelet_a.http_addr.port()).await;
    let (pa, pb) = (kubelet_a.http_addr.port(), kubelet_b.http_addr.port());
    cluster.serve_ports([pb]);
    let mut config_b = cluster.agent_config_over("node-b", transport);
    config_b.allowed_ports = Some(tunnel_core::PortSet::new([pb]));
    config_b.localhost_proxy_ports = Some(tunnel_core::PortSet::new([pb]));
    let (_a, _) = cluster
        .start_agent(cluster.agent_config_over("node-a", transport))
        .await;
    let (_b, _) = cluster.start_agent(config_b).await;
    assert_eq!(cluster.transport_of("node-a"), kind_of(transport));
    assert_eq!(cluster.transport_of("node-b"), kind_of(transport));

    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    for (host, want) in [
        (format!("node-a:{pa}"), "node-a"),
        (format!("node-b:{pb}"), "node-b"),
        (format!("node-b:{pb}"), "node-b"),
        (format!("node-a:{pa}"), "node-a"),
    ] {
        let (status, body) = client::get(&mut sender, &host, "/pods").await.unwrap();
        assert_eq!(status, 200, "{host}");
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(&format!("\"node\":\"{want}\"")),
            "{host} answered {body}"
        );
    }
    // node-b's agent refuses node-a's port: each agent serves only what it allows.
    let (status, body) = client::get(&mut sender, &format!("node-b:{pa}"), "/pods")
        .await
        .unwrap();
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
}

async fn thousand_sequential_requests_on_one_connection(transport: TransportChoice) {
    let s = setup(transport).await;
    let host = format!("node-a:{}", s.kubelet.http_addr.port());
    let tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    for i in 0..1000 {
        let (status, body) = client::get(&mut sender, &host, "/healthz").await.unwrap();
        assert_eq!(
            (status, &body[..]),
            (StatusCode::OK, &b"ok"[..]),
            "request {i}"
        );
    }
    // And 1,000 on fresh connections: a stream each.
    let before = metric_value(
        &s.cluster.scrape().await,
        "edge_tunnel_server_streams_total",
        &[("front", "http"), ("result", "ok")],
    );
    for i in 0..1000 {
        let tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
        let mut sender = client::http1(tcp).await.unwrap();
        let (status, _) = client::get(&mut sender, &host, "/healthz").await.unwrap();
        assert_eq!(status, StatusCode::OK, "connection {i}");
    }
    let after = metric_value(
        &s.cluster.scrape().await,
        "edge_tunnel_server_streams_total",
        &[("front", "http"), ("result", "ok")],
    );
    assert_eq!(after - before, 1000.0);
}

async fn two_hundred_concurrent_streams_through_one_agent(transport: TransportChoice) {
    let s = setup(transport).await;
    let host = format!("node-a:{}", s.kubelet.http_addr.port());
    // Every stream is upgraded and open before any of them sends: 200 at once for certain.
    let mut ios = Vec::new();
    for _ in 0..200 {
        let tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
        let mut sender = client::http1(tcp).await.unwrap();
        ios.push(
            client::exec_upgrade(&mut sender, &host, Upgrade::Spdy)
                .await
                .unwrap(),
        );
    }
    let text = s.cluster.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_server_streams_open",
            &[("front", "http")]
        ),
        200.0
    );
    let mut tasks = tokio::task::JoinSet::new();
    for (i, io) in ios.into_iter().enumerate() {
        tasks.spawn(async move { client::echo_exact(io, &pattern(16 * 1024, i as u8)).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

async fn unknown_node_gets_503_within_a_second_and_tls_front_closes(transport: TransportChoice) {
    let s = setup(transport).await;
    let tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let started = Instant::now();
    let (status, body) = client::get(&mut sender, "node-zz", "/pods").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(
        body,
        "edge-tunnel: no agent connected for node node-zz: check that edge-tunnel-agent runs on that node and is connected (its log says why not)\n"
    );
    // The connection stays usable for the next request.
    let (status, _) = client::get(&mut sender, "node-a", "/healthz")
        .await
        .unwrap();
    assert_eq!(status, 200);

    let before = metric_value(
        &s.cluster.scrape().await,
        "edge_tunnel_server_streams_total",
        &[("front", "tls"), ("result", "no_agent")],
    );
    let err = client::tls_connect(
        s.cluster.secure_addr,
        "node-zz",
        s.cluster.pki.apiserver_tls(),
    )
    .await;
    assert!(err.is_err(), "TLS to an unknown node must fail");
    let after = metric_value(
        &s.cluster.scrape().await,
        "edge_tunnel_server_streams_total",
        &[("front", "tls"), ("result", "no_agent")],
    );
    assert_eq!(after - before, 1.0);
}

async fn refusals_map_to_502_and_bad_requests_to_400(transport: TransportChoice) {
    let mut s = setup(transport).await;
    let tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    // A port the server's configuration does not serve: 403 from the server, no agent asked.
    let (status, body) = client::get(&mut sender, "node-a:22", "/").await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "edge-tunnel: port 22 is not served: add it to http-proxy-ports, https-proxy-ports, dnat-ports-pair or localhost-proxy-ports of ConfigMap edge-tunnel-server-cfg\n"
    );
    // Served by the server, but the agent's own flags leave it out: the agent refuses, the
    // client reads why.
    s.cluster.serve_ports([22]);
    let (status, body) = client::get(&mut sender, "node-a:22", "/").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&body).contains("forbidden"),
        "{body:?}"
    );
    // An allowed port where nothing listens: refused by the target.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    drop(sender);
    s.cluster.serve_ports([closed]);
    let mut config = s.cluster.agent_config_over("node-b", transport);
    config.allowed_ports = Some(tunnel_core::PortSet::new([closed]));
    config.localhost_proxy_ports = Some(tunnel_core::PortSet::new([closed]));
    let (_b, _) = s.cluster.start_agent(config).await;
    let tcp = TcpStream::connect(s.cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let (status, body) = client::get(&mut sender, &format!("node-b:{closed}"), "/")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&body).contains("refused"),
        "{body:?}"
    );
    let (status, _) = client::get(&mut sender, "not_a_node", "/").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

edge_tunnel_testkit::conformance!(
    followed_log_arrives_line_by_line_through_the_tls_front,
    both_upgrades_through_the_tls_front_echo_1mib_with_half_close,
    both_upgrades_through_the_http_front_echo_1mib_with_half_close,
    http_front_routes_by_host_by_node_ip_by_absolute_form_and_connect,
    keep_alive_requests_naming_different_nodes_reach_their_own_node,
    thousand_sequential_requests_on_one_connection,
    two_hundred_concurrent_streams_through_one_agent,
    unknown_node_gets_503_within_a_second_and_tls_front_closes,
    refusals_map_to_502_and_bad_requests_to_400,
);
