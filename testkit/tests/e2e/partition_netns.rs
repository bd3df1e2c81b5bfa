//! A silent partition between the agents and the server, at the default liveness and reconnect
//! settings, over both transports: no request waits more than 3 s on a dead link (an open
//! without an answer probes it), the server notices an idle agent within 10 s, and after the
//! heal every node serves again within 5 s (the agents recover with short attempts, not a
//! long backoff).
//!
//! The test makes its own network namespace (`ip netns`, root) and runs itself inside it, so
//! that its iptables rules (every packet to or from the tunnel port dropped, UDP and TCP)
//! touch nothing else on the machine. `.ci/run` installs iproute2 and iptables.

use std::time::Duration;

use edge_tunnel_testkit::{TestCluster, client, netns};
use tokio::time::Instant;
use tunnel_core::TransportChoice;

/// Runs test `name` inside its own namespace and passes on the figures it printed.
async fn outside(name: &str) {
    let text = netns::in_namespace(module_path!(), name).await;
    for line in text.lines().filter(|l| l.starts_with("figure:")) {
        eprintln!("{line}");
    }
}

/// The iptables rules that cut the tunnel port both ways (`op`: -A adds, -D removes).
async fn partition(op: &str, port: u16) {
    let port = port.to_string();
    for proto in ["udp", "tcp"] {
        for side in ["--dport", "--sport"] {
            let args = [
                "-w", "5", op, "INPUT", "-p", proto, side, &port, "-j", "DROP",
            ];
            netns::run("iptables", &args).await;
        }
    }
}

/// Runs in the namespace: node-a stays idle through the partition, node-b gets a request every
/// second.
async fn partitioned(transport: TransportChoice) {
    let nodes: &[(&str, &[std::net::IpAddr])] = &[("node-a", &[]), ("node-b", &[])];
    let (cluster, kubelet) = TestCluster::with_kubelet(nodes, |_| {}).await;
    // Default liveness and backoff settings: what a deployment runs with.
    let (_a, _) = cluster
        .start_agent(cluster.agent_config_over("node-a", transport))
        .await;
    let (_b, _) = cluster
        .start_agent(cluster.agent_config_over("node-b", transport))
        .await;
    let host = |node: &str| format!("{node}:{}", kubelet.http_addr.port());
    for node in ["node-a", "node-b"] {
        assert_eq!(
            client::timed_get(cluster.insecure_addr, &host(node), "/pods")
                .await
                .0,
            200
        );
    }

    partition("-A", cluster.tunnel_addr.port()).await;
    let cut = Instant::now();
    // Requests for node-b while its link is silent: none waits more than 3 s.
    let requests = {
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let (addr, host) = (cluster.insecure_addr, host("node-b"));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(cut + Duration::from_millis(500 + i * 1000)).await;
                client::timed_get(addr, &host, "/pods").await
            }));
        }
        tasks
    };
    // The idle node-a: the server finds it dead within 10 s.
    tokio::time::timeout(
        Duration::from_secs(10),
        cluster.registry.wait_gone("node-a"),
    )
    .await
    .unwrap_or_else(|_| panic!("node-a still registered {:?} after the cut", cut.elapsed()));
    eprintln!(
        "figure: {transport:?} idle agent dropped {:?} after the cut",
        cut.elapsed()
    );
    for (i, task) in requests.into_iter().enumerate() {
        let (status, took) = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("an answer")
            .unwrap();
        eprintln!("figure: {transport:?} request {i} during the cut: {status} in {took:?}");
        assert_eq!(status, 503, "request {i}");
        assert!(
            took <= Duration::from_secs(3),
            "request {i} waited {took:?} for its 503"
        );
    }
    assert!(cluster.registry.is_empty());

    // Heal 12 s after the cut: both nodes serve again within 5 s.
    tokio::time::sleep_until(cut + Duration::from_secs(12)).await;
    partition("-D", cluster.tunnel_addr.port()).await;
    let healed = Instant::now();
    for node in ["node-a", "node-b"] {
        loop {
            let (status, _) = client::timed_get(cluster.insecure_addr, &host(node), "/pods").await;
            if status == 200 {
                break;
            }
            assert!(
                healed.elapsed() <= Duration::from_secs(5),
                "{node} not serving {:?} after the heal (last status {status})",
                healed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "figure: {transport:?} both nodes serving {:?} after the heal",
        healed.elapsed()
    );
    assert!(
        healed.elapsed() <= Duration::from_secs(5),
        "serving again only {:?} after the heal",
        healed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_partition_costs_seconds_not_timeouts() {
    if netns::inside() {
        partitioned(TransportChoice::Quic).await;
    } else {
        outside("quic_partition_costs_seconds_not_timeouts").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_partition_costs_seconds_not_timeouts() {
    if netns::inside() {
        partitioned(TransportChoice::Grpc).await;
    } else {
        outside("grpc_partition_costs_seconds_not_timeouts").await;
    }
}
