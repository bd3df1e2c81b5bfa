//! Every refused or failed stream is visible at the default level (warn): one line per event
//! in the front that refused it (TLS, HTTP, CONNECT) and in the agent when it refused or failed
//! the dial, naming node, front, result, status and port; a flood is rate-limited and the next
//! line says how many were dropped. A TLS client the front cannot serve reads a fatal alert
//! that says why, then a clean close.
//!
//! Current-thread runtime: the log capture is the thread's subscriber.

use std::time::Duration;

use edge_tunnel_testkit::client;
use edge_tunnel_testkit::logs::LogCapture;
use edge_tunnel_testkit::{TestCluster, TestPki, kind_of};
use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_core::{PortSet, TransportChoice};

const BOUND: Duration = Duration::from_secs(10);

/// A loopback port where nothing listens.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// The alert a TLS handshake with SNI `name` through the TLS front ends with.
async fn alert_for(cluster: &TestCluster, name: &str) -> Option<rustls::Error> {
    let err = tokio::time::timeout(
        BOUND,
        client::tls_connect(cluster.secure_addr, name, cluster.pki.apiserver_tls()),
    )
    .await
    .expect("the front answers")
    .expect_err("the front cannot serve it");
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned()
}

/// Sends a raw request to the HTTP front; the status line of its answer.
async fn http_status(cluster: &TestCluster, request: &str) -> String {
    let mut tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, tcp.read_to_end(&mut answer))
        .await
        .expect("the front answers")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

/// Waits for the one line with `parts`, and checks that it is the only one.
async fn once(capture: &LogCapture, parts: &[&str]) -> String {
    let line = capture.line_with(parts).await;
    assert!(line.contains("WARN"), "{line}");
    let all = capture.lines_with(parts);
    assert_eq!(all.len(), 1, "one line per event for {parts:?}: {all:#?}");
    line
}

async fn each_refusal_is_one_line_at_the_default_level(transport: TransportChoice) {
    let capture = LogCapture::default();
    let _log = capture.install("warn");
    // The TLS front's kubelet port has nothing listening: the agent's dial is refused.
    let refused = closed_port().await;
    let forbidden = closed_port().await;
    let mut cluster = TestCluster::start(TestPki::new(&[("node-a", &[])]), refused, 10255).await;
    let mut config = cluster.agent_config_over("node-a", transport);
    config.allowed_ports = Some(PortSet::new([refused]));
    config.localhost_proxy_ports = config.allowed_ports.clone();
    let (_agent, _) = cluster.start_agent(config).await;
    assert_eq!(cluster.transport_of("node-a"), kind_of(transport));
    let server_line = "client stream refused";

    // TLS: an unknown node, and an agent whose dial fails; each with its alert.
    assert_eq!(
        alert_for(&cluster, "node-x").await,
        Some(rustls::Error::AlertReceived(
            AlertDescription::UnrecognisedName
        ))
    );
    once(
        &capture,
        &[
            server_line,
            "front=\"tls\"",
            "node=node-x",
            "result=\"no_agent\"",
        ],
    )
    .await;
    assert_eq!(
        alert_for(&cluster, "node-a").await,
        Some(rustls::Error::AlertReceived(
            AlertDescription::InternalError
        ))
    );
    let port = format!("port={refused}");
    once(
        &capture,
        &[
            server_line,
            "front=\"tls\"",
            "node=node-a",
            "result=\"refused\"",
            &port,
        ],
    )
    .await;
    once(&capture, &["refused a stream", "result=\"refused\"", &port]).await;

    // TLS: no ClientHello at all: decode_error, then a clean close (not a reset).
    let mut tcp = TcpStream::connect(cluster.secure_addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: node-a\r\n\r\n")
        .await
        .unwrap();
    let mut alert = Vec::new();
    tokio::time::timeout(BOUND, tcp.read_to_end(&mut alert))
        .await
        .expect("the front closes")
        .expect("a clean close after the alert");
    assert_eq!(alert, [21, 3, 3, 0, 2, 2, 50], "a fatal decode_error alert");
    once(
        &capture,
        &[server_line, "front=\"tls\"", "result=\"bad_request\""],
    )
    .await;

    // HTTP: no agent (503), the agent's dial refused (502), no Host (400).
    assert_eq!(
        http_status(
            &cluster,
            "GET / HTTP/1.1\r\nHost: node-x:10255\r\nConnection: close\r\n\r\n"
        )
        .await,
        "HTTP/1.1 503 Service Unavailable"
    );
    once(
        &capture,
        &[
            server_line,
            "front=\"http\"",
            "node=node-x",
            "result=\"no_agent\"",
            "status=503",
            "port=10255",
        ],
    )
    .await;
    let request = format!("GET / HTTP/1.1\r\nHost: node-a:{refused}\r\nConnection: close\r\n\r\n");
    assert_eq!(
        http_status(&cluster, &request).await,
        "HTTP/1.1 502 Bad Gateway"
    );
    once(
        &capture,
        &[
            server_line,
            "front=\"http\"",
            "result=\"refused\"",
            "status=502",
            &port,
        ],
    )
    .await;
    assert_eq!(
        capture
            .lines_with(&["refused a stream", "result=\"refused\"", &port])
            .len(),
        2,
        "the agent's second refused dial"
    );
    assert_eq!(
        http_status(&cluster, "GET / HTTP/1.0\r\n\r\n").await,
        "HTTP/1.0 400 Bad Request"
    );
    once(
        &capture,
        &[
            server_line,
            "front=\"http\"",
            "result=\"bad_request\"",
            "status=400",
        ],
    )
    .await;

    // CONNECT: a port the server does not serve: refused there, the agent never hears of it.
    let err = client::connect_via(cluster.insecure_addr, &format!("node-a:{forbidden}"))
        .await
        .expect_err("not served");
    assert!(err.to_string().contains("403"), "{err}");
    let port = format!("port={forbidden}");
    once(
        &capture,
        &[
            server_line,
            "front=\"connect\"",
            "result=\"port_not_served\"",
            "status=403",
            &port,
        ],
    )
    .await;
    assert!(
        capture.lines_with(&["refused a stream", &port]).is_empty(),
        "no dial was asked of the agent"
    );

    // CONNECT: a port the server serves and the agent's flags leave out.
    cluster.serve_ports([forbidden]);
    let err = client::connect_via(cluster.insecure_addr, &format!("node-a:{forbidden}"))
        .await
        .expect_err("forbidden");
    assert!(err.to_string().contains("502"), "{err}");
    once(
        &capture,
        &[
            server_line,
            "front=\"connect\"",
            "result=\"forbidden\"",
            "status=502",
            &port,
        ],
    )
    .await;
    once(
        &capture,
        &["refused a stream", "result=\"forbidden\"", &port],
    )
    .await;
}

async fn a_flood_of_refusals_is_rate_limited_with_a_count(transport: TransportChoice) {
    let capture = LogCapture::default();
    let _log = capture.install("warn");
    let cluster = TestCluster::start(TestPki::new(&[("node-a", &[])]), 10250, 10255).await;
    let (_agent, _) = cluster
        .start_agent(cluster.agent_config_over("node-a", transport))
        .await;
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let flood = 500;
    for _ in 0..flood {
        let (status, _) = client::get(&mut sender, "node-x:10255", "/").await.unwrap();
        assert_eq!(status, 503);
    }
    let during = capture.lines_with(&["client stream refused", "node=node-x"]);
    assert!(
        (20..flood / 4).contains(&during.len()),
        "{} lines for {flood} refusals",
        during.len()
    );
    // One token comes back every 100 ms: the next refusal after that is written, with the
    // count of those dropped before it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, _) = client::get(&mut sender, "node-x:10255", "/").await.unwrap();
    assert_eq!(status, 503);
    let lines = capture.lines_with(&["client stream refused", "node=node-x"]);
    let last = lines.last().unwrap();
    assert!(last.contains("suppressed="), "{last}");
    // Every refusal is a line or counted on a later one.
    let suppressed: usize = lines
        .iter()
        .filter_map(|l| l.split("suppressed=").nth(1))
        .map(|n| {
            n.split_whitespace()
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(lines.len() + suppressed, flood + 1, "{lines:#?}");
}

edge_tunnel_testkit::conformance!(
    current_thread: each_refusal_is_one_line_at_the_default_level,
    a_flood_of_refusals_is_rate_limited_with_a_count,
);
