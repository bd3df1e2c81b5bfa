//! A dead agent costs clients at most a few seconds, over both transports.
//!
//! The agents here are real `tunnel-agent` processes (the `testkit-agent` binary runs the same
//! program), killed with SIGKILL: a crash sends nothing to the server, so only the restarted
//! agent's registration (a new instance id) or a liveness probe can tell the server that the
//! old link is dead.

use std::process::Stdio;
use std::time::Duration;

use edge_tunnel_testkit::client;
use edge_tunnel_testkit::{FakeKubelet, TestCluster, conformance};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tunnel_core::{LinkState, NodeRef, TransportChoice};

/// Starts the agent program for `node` as a child process (killed when dropped).
fn agent_process(cluster: &TestCluster, node: &str, transport: TransportChoice) -> Child {
    let (crt, key) = cluster.pki.agent(node);
    let ports = cluster.ports.to_string();
    Command::new(env!("CARGO_BIN_EXE_testkit-agent"))
        .arg("--server-address")
        .arg(cluster.tunnel_addr.to_string())
        .args(["--server-name", "localhost", "--node-name", node])
        .arg("--tls-cert-file")
        .arg(crt)
        .arg("--tls-private-key-file")
        .arg(key)
        .arg("--ca-file")
        .arg(&cluster.pki.tunnel.ca_cert)
        .args(["--meta-port", "0", "--transport", transport.as_str()])
        .args(["--allowed-ports", &ports, "--localhost-proxy-ports", &ports])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the testkit-agent binary")
}

/// The id of `node`'s session once the server has registered one other than `old`.
async fn registered(cluster: &TestCluster, node: &str, old: Option<u64>) -> u64 {
    let wait = async {
        match old {
            Some(old) => cluster.registry.wait_for_new(node, old).await,
            None => cluster.registry.wait_for(node).await,
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("the agent registers");
    let (session, _) = cluster
        .registry
        .lookup(&NodeRef::Name(node.into()))
        .expect("registered");
    session.id()
}

/// Sends a GET for `/pods` on `io` and reads until the answer's status line is in.
async fn get_pods<IO: AsyncRead + tokio::io::AsyncWrite + Unpin>(io: &mut IO, node: &str) {
    io.write_all(format!("GET /pods HTTP/1.1\r\nHost: {node}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0, "the answer ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
}

/// Reads `io` in the background until it ends; yields when, and whether it was a reset.
fn watch_end<IO: AsyncRead + Unpin + Send + 'static>(
    mut io: IO,
) -> tokio::task::JoinHandle<(Instant, std::io::Result<()>)> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => return (Instant::now(), Ok(())),
                Ok(_) => {}
                Err(e) => return (Instant::now(), Err(e)),
            }
        }
    })
}

/// An agent killed and restarted: its old streams end within a second of the new session's
/// registration (no request needed to find the old link dead), and a request sent in between
/// gets its answer within 3 s.
async fn a_restarted_agent_ends_the_old_streams_at_once(transport: TransportChoice) {
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let first = agent_process(&cluster, "node-a", transport);
    let old = registered(&cluster, "node-a", None).await;

    // Two idle streams of the old session: a CONNECT tunnel and a TLS-front connection.
    let (mut tunnel, mut tls) = open_streams(&cluster, &kubelet).await;
    get_pods(&mut tunnel, "node-a").await;
    get_pods(&mut tls, "node-a").await;
    let tunnel_end = watch_end(tunnel);
    let tls_end = watch_end(tls);

    kill(first).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = agent_process(&cluster, "node-a", transport);
    let new = registered(&cluster, "node-a", Some(old)).await;
    let registered_at = Instant::now();
    for (what, end) in [("CONNECT tunnel", tunnel_end), ("TLS front", tls_end)] {
        let (at, how) = tokio::time::timeout(Duration::from_secs(10), end)
            .await
            .unwrap_or_else(|_| panic!("the {what} of the dead agent is still open"))
            .unwrap();
        let late = at.saturating_duration_since(registered_at);
        eprintln!("figure: {transport:?} {what} reset {late:?} after the new registration");
        assert!(
            late <= Duration::from_secs(1),
            "the {what} ended {late:?} after the new session registered"
        );
        // Cut, not finished: the client must not take it for a whole answer.
        let err = how.expect_err("a reset, not a clean end");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{what}: {err}"
        );
    }

    // Killed again; a request sent 0.3 s later, while the dead session is still registered,
    // is answered within 3 s: 503, or success through the next agent.
    kill(second).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let host = format!("node-a:{}", kubelet.http_addr.port());
    let request = {
        let (front, host) = (cluster.insecure_addr, host.clone());
        tokio::spawn(async move { client::timed_get(front, &host, "/pods").await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _third = agent_process(&cluster, "node-a", transport);
    let (status, took) = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("an answer")
        .unwrap();
    eprintln!("figure: {transport:?} request sent 0.3 s after the kill: {status} in {took:?}");
    assert!(matches!(status, 200 | 503), "status {status}");
    assert!(
        took <= Duration::from_secs(3),
        "the request waited {took:?} for a {status}"
    );
    // And the node serves through the restarted agent.
    registered(&cluster, "node-a", Some(new)).await;
    let (status, _) = client::timed_get(cluster.insecure_addr, &host, "/pods").await;
    assert_eq!(status, 200);
}

/// A second agent process for a node whose first one still runs (a DaemonSet update with a
/// surge, two agents with one certificate): the first answers the server's check, so its
/// session is retired, not cut, and its open stream goes on.
async fn a_live_predecessor_is_retired_not_cut(transport: TransportChoice) {
    let (cluster, _kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let _first = agent_process(&cluster, "node-a", transport);
    let old = registered(&cluster, "node-a", None).await;
    let (old_session, _) = cluster
        .registry
        .lookup(&NodeRef::Name("node-a".into()))
        .unwrap();
    let (mut tunnel, _tls) = open_streams(&cluster, &_kubelet).await;
    get_pods(&mut tunnel, "node-a").await;

    let _second = agent_process(&cluster, "node-a", transport);
    registered(&cluster, "node-a", Some(old)).await;
    // The check answered: go-away, and the old session drains.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(old_session.state(), LinkState::Draining(_)) {
            assert!(
                !old_session.state().is_closed(),
                "{:?}",
                old_session.state()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the old session is retired");
    // Its stream still serves.
    get_pods(&mut tunnel, "node-a").await;
    assert!(!old_session.state().is_closed());
}

async fn kill(mut agent: Child) {
    agent.kill().await.expect("SIGKILL");
}

async fn open_streams(
    cluster: &TestCluster,
    kubelet: &FakeKubelet,
) -> (TcpStream, tokio_rustls::client::TlsStream<TcpStream>) {
    let authority = format!("node-a:{}", kubelet.http_addr.port());
    let tunnel = client::connect_via(cluster.insecure_addr, &authority)
        .await
        .unwrap();
    let tls = client::tls_connect(cluster.secure_addr, "node-a", cluster.pki.apiserver_tls())
        .await
        .unwrap();
    (tunnel, tls)
}

conformance!(
    a_restarted_agent_ends_the_old_streams_at_once,
    a_live_predecessor_is_retired_not_cut
);
