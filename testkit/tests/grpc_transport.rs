//! The same tunnel over the gRPC transport: through both fronts, refusals, and `auto` falling
//! back to gRPC when the server offers no QUIC.

use bytes::Bytes;
use edge_tunnel_testkit::TestCluster;
use edge_tunnel_testkit::client::{self, Upgrade, pattern};
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::net::TcpStream;
use tunnel_agent::dialer::TransportChoice;
use tunnel_core::{NodeRef, TransportKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_logs_follow_upgrades_echo_and_refusals_are_typed() {
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let mut config = cluster.agent_config("node-a");
    config.transport = TransportChoice::Grpc;
    let (_agent, _) = cluster.start_agent(config).await;
    let (session, _) = cluster
        .registry
        .lookup(&NodeRef::Name("node-a".into()))
        .unwrap();
    assert_eq!(session.transport(), TransportKind::Grpc);

    // A followed log, line by line, through the TLS front.
    let tls = client::tls_connect(cluster.secure_addr, "node-a", cluster.pki.apiserver_tls())
        .await
        .unwrap();
    let mut sender = client::http1(tls).await.unwrap();
    let req = http::Request::get("/containerLogs/default/web-1/app?follow=true")
        .header("host", "node-a:10250")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp_fut = sender.send_request(req);
    let feed = kubelet.next_log_feed().await.unwrap();
    let mut body = resp_fut.await.unwrap().into_body();
    for i in 0..3 {
        let line = format!("line {i}\n");
        feed.lines.send(Bytes::from(line.clone())).await.unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            line.as_bytes()
        );
    }

    // Both upgrades through the HTTP front, 1 MiB each way, half-close.
    let host = format!("node-a:{}", kubelet.http_addr.port());
    for (kind, seed) in [(Upgrade::WebSocket, 5), (Upgrade::Spdy, 6)] {
        let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
        let mut sender = client::http1(tcp).await.unwrap();
        let io = client::exec_upgrade(&mut sender, &host, kind)
            .await
            .unwrap();
        client::echo_exact(io, &pattern(1024 * 1024, seed)).await;
    }

    // 100 sequential requests on one connection, and a forbidden port.
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    for i in 0..100 {
        let (status, _) = client::get(&mut sender, &host, "/healthz").await.unwrap();
        assert_eq!(status, StatusCode::OK, "request {i}");
    }
    let (status, body) = client::get(&mut sender, "node-a:22", "/").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("forbidden"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_grpc_when_the_server_has_no_quic() {
    let (cluster, _kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |c| {
        c.transports = "grpc".parse().unwrap();
    })
    .await;
    let config = cluster.agent_config("node-a");
    assert_eq!(config.transport, TransportChoice::Auto);
    let (_agent, _) = cluster.start_agent(config).await;
    let (session, _) = cluster
        .registry
        .lookup(&NodeRef::Name("node-a".into()))
        .unwrap();
    assert_eq!(session.transport(), TransportKind::Grpc);
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let (status, body) = client::get(&mut sender, "node-a", "/pods").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("\"node\":\"node-a\""));
}
