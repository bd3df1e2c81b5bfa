//! `--transport auto` on a network that drops UDP: the agent comes up over gRPC and serves;
//! when UDP comes back it moves to QUIC at its next retry, and a stream open across the move
//! finishes intact on the old session.
//!
//! The test makes its own network namespace (`ip netns`, root) and runs itself inside it, so
//! its iptables rules touch nothing else on the machine. `.ci/run` installs iproute2 and
//! iptables.

use std::time::Duration;

use edge_tunnel_testkit::client::{self, Upgrade, pattern};
use edge_tunnel_testkit::{TestCluster, metric_value, netns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnel_agent::Backoff;
use tunnel_core::TransportChoice;
use tunnel_core::{NodeRef, TransportKind};

const TEST: &str = "auto_runs_over_grpc_while_udp_is_dropped_and_moves_back_to_quic";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_runs_over_grpc_while_udp_is_dropped_and_moves_back_to_quic() {
    if netns::inside() {
        inside().await;
    } else {
        netns::in_namespace(module_path!(), TEST).await;
    }
}

/// Runs in the namespace: its loopback is ours alone.
async fn inside() {
    let udp = |op| ["-w", "5", op, "INPUT", "-p", "udp", "-j", "DROP"];
    netns::run("iptables", &udp("-A")).await;

    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let mut config = cluster.agent_config("node-a");
    assert_eq!(config.transport, TransportChoice::Auto);
    config.quic_retry_interval = Duration::from_secs(1);
    config.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        ..Backoff::default()
    };
    let (_agent, _) = cluster.start_agent(config).await;
    assert_eq!(cluster.transport_of("node-a"), TransportKind::Grpc);
    let (old, _) = cluster
        .registry
        .lookup(&NodeRef::Name("node-a".into()))
        .unwrap();

    // Serving over gRPC: an exec stream opens and echoes.
    let host = format!("node-a:{}", kubelet.http_addr.port());
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let mut io = client::exec_upgrade(&mut sender, &host, Upgrade::Spdy)
        .await
        .unwrap();
    let hello = pattern(64 * 1024, 7);
    io.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    io.read_exact(&mut back).await.unwrap();
    assert!(back == hello, "echo over gRPC");

    // UDP is back: the agent's next QUIC attempt succeeds and takes over.
    netns::run("iptables", &udp("-D")).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        cluster.registry.wait_for_new("node-a", old.id()),
    )
    .await
    .expect("the agent moves to QUIC when it retries");
    assert_eq!(cluster.transport_of("node-a"), TransportKind::Quic);

    // The gRPC session stays while its stream is open, and the stream still works.
    assert!(!old.state().is_closed(), "{:?}", old.state());
    client::echo_exact(&mut io, &pattern(256 * 1024, 8)).await;
    drop(io);
    drop(sender);
    // With its last stream done, the old session goes.
    tokio::time::timeout(Duration::from_secs(10), old.closed())
        .await
        .expect("the old session closes once its streams are done");

    // New requests go over QUIC.
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let (status, body) = client::get(&mut sender, "node-a", "/pods").await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("\"node\":\"node-a\""));
    let text = cluster.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_agent_reconnects_total",
            &[("reason", "quic_return")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_server_sessions",
            &[("transport", "grpc")]
        ),
        0.0,
        "{text}"
    );
}
