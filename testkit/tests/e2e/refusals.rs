//! An agent the server refuses hears why, over both transports: a certificate from another CA
//! is refused in the TLS handshake, a certificate without a node identity at registration. Each
//! side logs a line naming the refusal and its cause; the agent counts it in
//! `edge_tunnel_agent_reconnects_total{reason="refused"}` and backs off as for any failure.
//!
//! The tests run on a current-thread runtime so that the log capture (a thread-local
//! subscriber) sees every task of the server and the agent.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_tunnel_testkit::{TestCluster, TestPki, metric_value};
use tunnel_core::{CloseCause, Connector, Initiator, SessionConfig, TransportChoice, proto};

/// Log lines written by the code under test, without colour codes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) until a captured line contains every one of `parts`; returns it.
    async fn line_with(&self, parts: &[&str]) -> String {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(line) = self
                    .text()
                    .lines()
                    .find(|l| parts.iter().all(|p| l.contains(p)))
                {
                    return line.to_owned();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no log line with {parts:?} in:\n{}", self.text()))
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

async fn certificate_from_another_ca(transport: TransportChoice) {
    let capture = Capture::default();
    let _log = capture.install();
    let pki = TestPki::new(&[("node-a", &[])]);
    let foreign = pki.foreign(&["node-a"]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    let mut config = cluster.agent_config_over("node-a", transport);
    let (_, crt, key) = &foreign.agents[0];
    config.tls_cert_file = Some(crt.clone());
    config.tls_private_key_file = Some(key.clone());
    let agent = cluster.spawn_agent(config);

    let line = capture
        .line_with(&["refused by the server", "cause=refused"])
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(cluster.registry.is_empty());
    // Counted under its own reason, and retried with backoff (the agent keeps running).
    let text = edge_tunnel_testkit::metrics().render();
    assert!(
        metric_value(
            &text,
            "edge_tunnel_agent_reconnects_total",
            &[("reason", "refused")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_agent_reconnects_total",
            &[("reason", "transport")]
        ),
        0.0,
        "a refusal is not a transport failure:\n{text}"
    );
    // The server says it too, with the transport it came over.
    capture
        .line_with(&["agent rejected", "cause=refused", transport.as_str()])
        .await;
    agent.stop().await.unwrap();
}

async fn identity_the_server_rejects(transport: TransportChoice) {
    let capture = Capture::default();
    let _log = capture.install();
    let pki = TestPki::new(&[("node-a", &[])]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    // Signed by the right CA, but `system:node:` without the `system:nodes` organisation is no
    // node identity: TLS passes, registration does not.
    let files = &cluster.pki.tunnel;
    let ca_key = rcgen::KeyPair::from_pem(&read(&files.ca_key)).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read(&files.ca_cert), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "system:node:node-a");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let identity =
        tunnel_core::Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .unwrap();
    let roots = tunnel_core::tls::roots_from_pem(read(&files.ca_cert).as_bytes(), "ca").unwrap();
    let tls = tunnel_core::tls::client_config(identity, roots, &[]).unwrap();
    let connector = Connector::new(tls, SessionConfig::default(), transport).unwrap();

    let err = connector
        .connect(cluster.tunnel_addr, "localhost", proto::Register::default())
        .await
        .expect_err("no node identity");
    let reason = err.reason();
    assert_eq!(reason.cause, CloseCause::Refused, "{err}");
    assert_eq!(reason.initiator, Initiator::Remote, "{err}");
    assert!(reason.is_refused_by_peer());
    assert!(err.to_string().contains("system:nodes"), "{err}");
    let line = capture
        .line_with(&["agent rejected", "cause=refused", "system:nodes"])
        .await;
    assert!(line.contains(transport.as_str()), "{line}");
    assert!(cluster.registry.is_empty());
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

edge_tunnel_testkit::conformance!(
    current_thread: certificate_from_another_ca,
    identity_the_server_rejects
);
