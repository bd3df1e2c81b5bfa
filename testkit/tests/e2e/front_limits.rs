//! What the HTTP front does with clients that misbehave or try to steer it: heads over the
//! limit, a thousand clients trickling their heads, headers that name another destination.

use std::time::{Duration, Instant};

use edge_tunnel_testkit::client::timed_get;
use edge_tunnel_testkit::{FakeKubelet, TestCluster, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

async fn answer_to(front: std::net::SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(front).await.expect("front");
    tcp.write_all(request).await.expect("request");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_gets_431() {
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let (_agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let host = format!("node-a:{}", kubelet.http_addr.port());
    // Just under the limit: served.
    let fits = format!(
        "GET /pods HTTP/1.1\r\nHost: {host}\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(30 * 1024)
    );
    let answer = answer_to(cluster.insecure_addr, fits.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.80}");
    let over = format!(
        "GET /pods HTTP/1.1\r\nHost: {host}\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let answer = answer_to(cluster.insecure_addr, over.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_clients_are_closed_at_the_header_timeout_while_others_are_served() {
    const SLOW: usize = 1000;
    let header_timeout = Duration::from_secs(2);
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |c| {
        c.header_timeout = header_timeout;
    })
    .await;
    let (_agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let front = cluster.insecure_addr;
    let host = format!("node-a:{}", kubelet.http_addr.port());

    let started = Instant::now();
    let mut slow = JoinSet::new();
    for _ in 0..SLOW {
        let mut tcp = TcpStream::connect(front).await.expect("connect");
        slow.spawn(async move {
            // A byte at a time, one a second: the head never completes.
            let head = b"GET /pods HTTP/1.1\r\nHost: node-a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa";
            let opened = Instant::now();
            for byte in head {
                if tcp.write_all(&[*byte]).await.is_err() {
                    return opened.elapsed();
                }
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await {
                    // Closed (with or without a 408 first).
                    Ok(Ok(0) | Err(_)) => return opened.elapsed(),
                    Ok(Ok(_)) => {}
                    Err(_) => {}
                }
            }
            Duration::MAX
        });
    }
    println!(
        "figure: {SLOW} slow clients connected in {:?}",
        started.elapsed()
    );
    // While they trickle, a good client is served at once.
    for _ in 0..3 {
        let (status, took) = timed_get(front, &host, "/pods").await;
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_secs(1),
            "a good request took {took:?}"
        );
        println!("figure: good request among {SLOW} slow clients served in {took:?}");
    }
    let mut longest = Duration::ZERO;
    while let Some(held) = slow.join_next().await {
        let held = held.expect("slow client task");
        assert!(
            held < header_timeout + Duration::from_secs(3),
            "a slow client held its connection for {held:?}"
        );
        // Closed by the timeout, not turned away at once.
        assert!(
            held >= header_timeout - Duration::from_millis(200),
            "closed after {held:?}"
        );
        longest = longest.max(held);
    }
    println!(
        "figure: the longest slow client was closed after {longest:?} (header timeout {header_timeout:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_name_another_destination_are_ignored() {
    let pki = TestPki::new(&[("node-a", &[]), ("node-b", &[])]);
    let kubelet_a = FakeKubelet::start("node-a", pki.kubelet_tls())
        .await
        .expect("kubelet a");
    let kubelet_b = FakeKubelet::start("node-b", pki.kubelet_tls())
        .await
        .expect("kubelet b");
    let (pa, pb) = (kubelet_a.http_addr.port(), kubelet_b.http_addr.port());
    let mut cluster = TestCluster::start(pki, kubelet_a.https_addr.port(), pa).await;
    cluster.serve_ports([pb]);
    let (_a, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let mut config_b = cluster.agent_config("node-b");
    config_b.allowed_ports = Some(tunnel_core::PortSet::new([pb]));
    config_b.localhost_proxy_ports = config_b.allowed_ports.clone();
    let (_b, _) = cluster.start_agent(config_b).await;

    let steering = [
        format!("X-Forwarded-Host: node-b:{pb}"),
        "Forwarded: for=10.0.0.1;host=node-b".to_owned(),
        format!("X-Original-URL: http://node-b:{pb}/pods"),
        format!("X-Rewrite-URL: http://node-b:{pb}/pods"),
        "X-Real-IP: 127.0.0.1".to_owned(),
        format!("Proxy-Host: node-b:{pb}"),
        format!("X-Host: node-b:{pb}"),
    ];
    for header in &steering {
        let request = format!(
            "GET /pods HTTP/1.1\r\nHost: node-a:{pa}\r\n{header}\r\nConnection: close\r\n\r\n"
        );
        let answer = answer_to(cluster.insecure_addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{header}: {answer:.80}");
        assert!(
            answer.contains("\"node\":\"node-a\""),
            "{header} steered the request: {answer}"
        );
    }
    // An absolute-form target names the destination; a Host that disagrees does not win.
    let request = format!(
        "GET http://node-a:{pa}/pods HTTP/1.1\r\nHost: node-b:{pb}\r\nConnection: close\r\n\r\n"
    );
    let answer = answer_to(cluster.insecure_addr, request.as_bytes()).await;
    assert!(answer.contains("\"node\":\"node-a\""), "{answer}");
}
