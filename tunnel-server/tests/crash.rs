//! A server that crashes (SIGKILL: no close reaches the agents) and comes back on the same port
//! tells the agents of its predecessor to reconnect at once: its stateless-reset key follows
//! its private key, so the reset for an unknown connection is one the agents accept. Without
//! it an agent would wait out its idle timeout (60 s here) for a server that is gone.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Child;
use tunnel_core::{Connector, SessionConfig, TransportChoice, proto, tls};

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

fn start(pki: &tunnel_server::pki::PkiFiles, port: u16) -> Child {
    common::server_command(pki, port)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("tunnel-server binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_a_crashed_server_hear_a_reset_from_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tunnel_server::pki::init(&tunnel_server::pki::PkiRequest {
        out: dir.path().to_owned(),
        server_sans: vec!["localhost".into()],
        agents: vec![tunnel_server::pki::AgentSpec {
            node: "node-a".into(),
            ips: vec![],
        }],
        validity_days: 1,
    })
    .unwrap();
    let port = free_udp_port();
    let mut server = start(&pki, port);

    let (_, crt, key) = &pki.agents[0];
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let client = tls::client_config(
        tls::Identity::from_pem(&read(crt), &read(key)).unwrap(),
        tls::roots_from_pem(&read(&pki.ca_cert), "ca").unwrap(),
        &[tls::ALPN_QUIC],
    )
    .unwrap();
    // Slow liveness on purpose: only a reset can end this session quickly.
    let mut config = SessionConfig {
        idle_timeout: Duration::from_secs(60),
        ..SessionConfig::default()
    };
    config.control.ping_interval = Duration::from_secs(60);
    config.control.ping_timeout = Duration::from_secs(60);
    let connector = Connector::new(client, config, TransportChoice::Quic).unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let session = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match connector
                .connect(addr, "localhost", proto::Register::default())
                .await
            {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "server never came up: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    assert_eq!(session.node_name(), "node-a");

    server.kill().await.unwrap();
    let _successor = start(&pki, port);
    // The agent's next keepalive (every 5 s) reaches the successor, which answers with a
    // stateless reset.
    let reason = tokio::time::timeout(Duration::from_secs(20), session.closed())
        .await
        .expect("the agent learns of the crash long before its 60 s idle timeout");
    // A reset from the successor, not the idle timeout.
    assert_eq!(reason.cause, tunnel_core::CloseCause::Transport, "{reason}");
    assert_eq!(reason.initiator, tunnel_core::Initiator::Remote, "{reason}");
}
