//! yurt-tunnel's iptables mode: the kubelet-bound traffic of the server's host is DNAT'd to
//! the fronts, and each connection goes where it was headed (`SO_ORIGINAL_DST`): the IP names
//! the node (through its agent's certificate), the port is kept, whatever SNI or Host say.
//!
//! The test makes its own network namespace (`ip netns`, root) and runs itself inside it, so
//! its iptables rules touch nothing else on the machine.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use edge_tunnel_testkit::{TestCluster, metric_value, netns};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEST: &str = "connections_dnated_to_the_fronts_go_where_they_were_headed";
const NODE_IP: &str = "10.99.0.5";
/// An address that is no node's: a Service VIP, as kube-proxy translates it when the server
/// runs on the host network.
const SERVICE_IP: &str = "10.99.0.9";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dnated_to_the_fronts_go_where_they_were_headed() {
    if netns::inside() {
        inside().await;
    } else {
        netns::in_namespace(module_path!(), TEST).await;
    }
}

async fn dnat(from: &str, port: u16, to: SocketAddr) {
    let port = port.to_string();
    let to = to.to_string();
    netns::run(
        "iptables",
        &[
            "-w",
            "5",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            from,
            "--dport",
            &port,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
    )
    .await;
}

/// Runs in the namespace: its loopback and its NAT table are ours alone.
async fn inside() {
    // The node's address and a Service VIP, as the server's host would route them (here: to
    // itself).
    for ip in [NODE_IP, SERVICE_IP] {
        netns::run("ip", &["addr", "add", &format!("{ip}/32"), "dev", "lo"]).await;
    }
    let ip: IpAddr = NODE_IP.parse().expect("ip");
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[ip])], |_| {}).await;
    let (_agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let (https, http) = (kubelet.https_addr.port(), kubelet.http_addr.port());
    for from in [NODE_IP, SERVICE_IP] {
        dnat(from, http, cluster.insecure_addr).await;
        dnat(from, https, cluster.secure_addr).await;
    }

    // Plain HTTP: a Host that names another node does not steer a DNAT'd connection.
    let mut tcp = TcpStream::connect((ip, http))
        .await
        .expect("DNAT'd connect");
    tcp.write_all(b"GET /pods HTTP/1.1\r\nHost: node-zz:1\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"node\":\"node-a\""), "{answer}");

    // TLS by IP, as kube-apiserver dials a kubelet by InternalIP: no SNI. The handshake reaches
    // the kubelet itself (whose certificate names the node, not the IP: the client's check of
    // that name is what fails, not our front, which would answer unrecognized_name).
    let tcp = TcpStream::connect((ip, https))
        .await
        .expect("DNAT'd connect");
    let connector = tokio_rustls::TlsConnector::from(cluster.pki.apiserver_tls());
    let err = connector
        .connect(ServerName::IpAddress(ip.into()), tcp)
        .await
        .expect_err("the kubelet's certificate does not name the IP");
    let err = err.to_string();
    assert!(err.contains("certificate not valid for name"), "{err}");
    // The same with a verifier that trusts the kubelet whatever its name: a full exchange.
    let tcp = TcpStream::connect((ip, https))
        .await
        .expect("DNAT'd connect");
    let connector = tokio_rustls::TlsConnector::from(any_name(&cluster));
    let mut tls = connector
        .connect(ServerName::IpAddress(ip.into()), tcp)
        .await
        .expect("TLS to the kubelet through the DNAT");
    tls.write_all(b"GET /pods HTTP/1.1\r\nHost: node-a\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("\"node\":\"node-a\""), "{answer}");

    // Translated from an address that is no node's (a Service VIP): routed by what the client
    // says, as any other connection.
    let service: IpAddr = SERVICE_IP.parse().expect("ip");
    let mut tcp = TcpStream::connect((service, http))
        .await
        .expect("DNAT'd connect");
    tcp.write_all(
        format!("GET /pods HTTP/1.1\r\nHost: node-a:{http}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("request");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    assert!(
        answer.contains("\"node\":\"node-a\""),
        "routed by Host: {answer}"
    );
    let tcp = TcpStream::connect((service, https))
        .await
        .expect("DNAT'd connect");
    let connector = tokio_rustls::TlsConnector::from(cluster.pki.apiserver_tls());
    connector
        .connect(ServerName::try_from("node-a").expect("name"), tcp)
        .await
        .expect("routed by SNI to node-a's kubelet, whose certificate names node-a");

    let text = cluster.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_server_streams_total",
            &[("front", "tls"), ("result", "ok")]
        ),
        3.0
    );
}

/// The apiserver's client identity, with a server verifier that checks the kubelet's chain and
/// signature but not its name.
fn any_name(cluster: &TestCluster) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);
    impl rustls::client::danger::ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &rustls_pki_types::CertificateDer<'_>,
            intermediates: &[rustls_pki_types::CertificateDer<'_>],
            _name: &ServerName<'_>,
            ocsp: &[u8],
            now: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            let name = ServerName::try_from("node-a").expect("name");
            self.0
                .verify_server_cert(end_entity, intermediates, &name, ocsp, now)
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    let roots = tunnel_core::tls::roots_from_pem(
        &std::fs::read(&cluster.pki.kubelet.ca_cert).expect("ca"),
        "ca",
    )
    .expect("roots");
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        tunnel_core::tls::provider(),
    )
    .build()
    .expect("verifier");
    let (crt, key) = cluster.pki.apiserver_client();
    let id = tunnel_core::Identity::from_pem(
        &std::fs::read(crt).expect("cert"),
        &std::fs::read(key).expect("key"),
    )
    .expect("identity");
    let mut config = rustls::ClientConfig::builder_with_provider(tunnel_core::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyName(verifier)))
        .with_client_auth_cert(id.chain, id.key)
        .expect("client cert");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}
