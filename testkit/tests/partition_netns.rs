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

use edge_tunnel_testkit::{TestCluster, client};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;
use tunnel_core::TransportChoice;

/// Set in the copy of a test that runs inside the namespace.
const INSIDE: &str = "EDGE_TUNNEL_TEST_IN_NETNS";

async fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} not runnable ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed (this test needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespace however the test ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// Runs test `name` of this binary again inside a new namespace, and checks that it passed.
async fn in_namespace(name: &str) {
    let ns = Netns(format!("edge-tunnel-part-{}", std::process::id()));
    run("ip", &["netns", "add", &ns.0]).await;
    run(
        "ip",
        &["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"],
    )
    .await;
    let exe = std::env::current_exe().expect("test binary");
    let exe = exe.to_str().expect("utf-8 path");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, exe, "--exact", name, "--nocapture"])
        .env(INSIDE, "1")
        .output()
        .await
        .expect("run the test inside the namespace");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for line in text.lines().filter(|l| l.starts_with("figure:")) {
        eprintln!("{line}");
    }
    assert!(out.status.success(), "inside the namespace:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
}

/// The iptables rules that cut the tunnel port both ways (`op`: -A adds, -D removes).
async fn partition(op: &str, port: u16) {
    let port = port.to_string();
    for proto in ["udp", "tcp"] {
        for side in ["--dport", "--sport"] {
            let args = [
                "-w", "5", op, "INPUT", "-p", proto, side, &port, "-j", "DROP",
            ];
            run("iptables", &args).await;
        }
    }
}

/// One GET through the HTTP front: its status and how long the answer took.
async fn timed_get(cluster: &TestCluster, host: &str) -> (u16, Duration) {
    let started = Instant::now();
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(30),
        client::get(&mut sender, host, "/pods"),
    )
    .await
    .expect("an answer, whatever it is")
    .unwrap();
    (status.as_u16(), started.elapsed())
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
        assert_eq!(timed_get(&cluster, &host(node)).await.0, 200);
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
                let started = Instant::now();
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut sender = client::http1(tcp).await.unwrap();
                let (status, _) = client::get(&mut sender, &host, "/pods").await.unwrap();
                (status.as_u16(), started.elapsed())
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
            let (status, _) = timed_get(&cluster, &host(node)).await;
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
    if std::env::var_os(INSIDE).is_some() {
        partitioned(TransportChoice::Quic).await;
    } else {
        in_namespace("quic_partition_costs_seconds_not_timeouts").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_partition_costs_seconds_not_timeouts() {
    if std::env::var_os(INSIDE).is_some() {
        partitioned(TransportChoice::Grpc).await;
    } else {
        in_namespace("grpc_partition_costs_seconds_not_timeouts").await;
    }
}
