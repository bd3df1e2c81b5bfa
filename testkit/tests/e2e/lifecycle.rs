//! Sessions over time: agents come back after a server restart, a vanished agent is
//! unregistered, a draining server lets open streams finish while refusing new ones, and agents
//! reach a server on IPv6.

use std::time::Duration;

use edge_tunnel_testkit::client::{self, Upgrade, pattern};
use edge_tunnel_testkit::{TestCluster, TestPki};
use http::StatusCode;
use tokio::net::TcpStream;
use tunnel_agent::{AgentConfig, Backoff};
use tunnel_core::TransportChoice;
use tunnel_core::TransportKind;

fn fast_reconnect(mut config: AgentConfig) -> AgentConfig {
    config.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        ..Backoff::default()
    };
    config
}

async fn get_pods(cluster: &TestCluster, node: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let (status, body) = client::get(&mut sender, node, "/pods").await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_again_after_the_server_restarts() {
    let (mut cluster, _kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |c| {
        c.drain_timeout = Duration::from_millis(200);
    })
    .await;
    let (agent, _) = cluster
        .start_agent(fast_reconnect(cluster.agent_config("node-a")))
        .await;
    assert_eq!(get_pods(&cluster, "node-a").await.0, StatusCode::OK);

    for round in 0..3 {
        cluster.restart().await;
        cluster.registry.wait_for("node-a").await;
        let (status, body) = get_pods(&cluster, "node-a").await;
        assert_eq!(status, StatusCode::OK, "round {round}: {body}");
        assert!(body.contains("\"node\":\"node-a\""));
    }
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_agent_is_unregistered_and_its_node_answers_503() {
    let pki = TestPki::new(&[("node-a", &[])]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    let (agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    agent.stop().await.unwrap();
    cluster.registry.wait_gone("node-a").await;
    let (status, body) = get_pods(&cluster, "node-a").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_agent_replaces_its_old_session() {
    let (cluster, _kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let (_first, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let (old, _) = cluster
        .registry
        .lookup(&tunnel_core::NodeRef::Name("node-a".into()))
        .unwrap();
    // A second agent with the same certificate: the newer session wins, the old one is closed.
    let _second = cluster.spawn_agent(cluster.agent_config("node-a"));
    cluster.registry.wait_for_new("node-a", old.id()).await;
    let reason = old.closed().await;
    assert_eq!(reason.cause, tunnel_core::CloseCause::Replaced, "{reason}");
    assert_eq!(reason.initiator, tunnel_core::Initiator::Local, "{reason}");
    assert_eq!(cluster.registry.len(), 1);
    assert_eq!(get_pods(&cluster, "node-a").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_server_lets_open_streams_finish_and_refuses_new_connections() {
    let (mut cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |c| {
        c.drain_timeout = Duration::from_secs(20);
    })
    .await;
    let (_agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let host = format!("node-a:{}", kubelet.http_addr.port());
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let mut io = client::exec_upgrade(&mut sender, &host, Upgrade::Spdy)
        .await
        .unwrap();
    let (session, _) = cluster
        .registry
        .lookup(&tunnel_core::NodeRef::Name("node-a".into()))
        .unwrap();

    cluster.begin_shutdown();
    // The agent hears the go-away: the link drains.
    tokio::time::timeout(Duration::from_secs(10), async {
        while matches!(session.state(), tunnel_core::LinkState::Active) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("go-away reaches the session");
    // New connections are refused once the fronts stop accepting.
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match TcpStream::connect(cluster.insecure_addr).await {
                Err(_) => break,
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "the HTTP front must stop accepting while draining"
    );
    // The open exec stream still works end to end, half-close included.
    client::echo_exact(&mut io, &pattern(256 * 1024, 9)).await;
    drop(io);
    drop(sender);
    tokio::time::timeout(Duration::from_secs(15), cluster.shutdown_server())
        .await
        .expect("the drain ends once the last stream is done, before its deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_resolves_the_server_name_with_hickory() {
    let (cluster, _kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let mut config = cluster.agent_config("node-a");
    // A name, not an address: resolved (hosts file, then DNS), every address tried.
    config.server_address = format!("localhost:{}", cluster.tunnel_addr.port());
    config.server_name = None;
    let (_agent, node) = cluster.start_agent(config).await;
    assert_eq!(node, "node-a");
    assert_eq!(get_pods(&cluster, "node-a").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_gives_504_not_a_hang() {
    let pki = TestPki::new(&[("node-a", &[])]);
    let cluster = TestCluster::start_with(pki, 10250, 10255, |c| {
        c.session.open_timeout = Duration::from_millis(300);
    })
    .await;
    // A stalled agent: registers, accepts streams, never answers them.
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let (crt, key) = cluster.pki.agent("node-a");
    let tls = tunnel_core::tls::client_config(
        tunnel_core::Identity::from_pem(&read(&crt), &read(&key)).unwrap(),
        tunnel_core::tls::roots_from_pem(&read(&cluster.pki.tunnel.ca_cert), "ca").unwrap(),
        &[tunnel_core::tls::ALPN_QUIC],
    )
    .unwrap();
    let connector = tunnel_core::Connector::new(
        tls,
        tunnel_core::SessionConfig::default(),
        TransportChoice::Quic,
    )
    .unwrap();
    let session = connector
        .connect(
            cluster.tunnel_addr,
            "localhost",
            tunnel_core::proto::Register::default(),
        )
        .await
        .unwrap();
    cluster.registry.wait_for("node-a").await;
    let held = tokio::spawn(async move {
        let mut streams = Vec::new();
        while let Ok(s) = session.accept().await {
            streams.push(s);
        }
    });
    let (status, body) = get_pods(&cluster, "node-a").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(body.contains("did not answer"), "{body}");
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_meta_reports_ready_only_while_a_session_is_up() {
    let pki = TestPki::new(&[("node-a", &[])]);
    let mut cluster = TestCluster::start_with(pki, 10250, 10255, |c| {
        c.drain_timeout = Duration::from_millis(100);
    })
    .await;
    let meta_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut config = cluster.agent_config("node-a");
    config.meta_port = meta_port;
    let (agent, _) = cluster.start_agent(config).await;
    let meta = |path: &'static str| async move {
        let tcp = TcpStream::connect(("127.0.0.1", meta_port)).await.unwrap();
        let mut sender = client::http1(tcp).await.unwrap();
        let (status, body) = client::get(&mut sender, "meta", path).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    assert_eq!(meta("/healthz").await.0, StatusCode::OK);
    assert_eq!(meta("/readyz").await.0, StatusCode::OK);
    let (status, text) = meta("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        edge_tunnel_testkit::metric_value(
            &text,
            "edge_tunnel_agent_session_up",
            &[("transport", "quic")]
        ),
        1.0,
        "{text}"
    );

    // The server goes away for good: the agent is alive but not ready.
    let mut status_rx = agent.status.clone();
    cluster.shutdown_server().await;
    status_rx
        .wait_for(|s| *s == tunnel_agent::AgentStatus::Disconnected)
        .await
        .unwrap();
    assert_eq!(meta("/healthz").await.0, StatusCode::OK);
    assert_eq!(meta("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reach_a_server_on_ipv6_over_both_transports() {
    let (cluster, _kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |c| {
        c.bind_address = "::1".parse().expect("ip");
    })
    .await;
    assert!(cluster.tunnel_addr.is_ipv6() && cluster.insecure_addr.is_ipv6());
    for (choice, kind) in [
        (TransportChoice::Quic, TransportKind::Quic),
        (TransportChoice::Grpc, TransportKind::Grpc),
    ] {
        let (agent, _) = cluster
            .start_agent(cluster.agent_config_over("node-a", choice))
            .await;
        assert_eq!(cluster.transport_of("node-a"), kind);
        let (status, body) = get_pods(&cluster, "node-a").await;
        assert_eq!(status, StatusCode::OK, "{kind:?}: {body}");
        assert!(body.contains("\"node\":\"node-a\""), "{kind:?}: {body}");
        agent.stop().await.unwrap();
        cluster.registry.wait_gone("node-a").await;
    }
}
