//! Identity and the agent's allowlist: who an agent is comes from its certificate only, agents
//! without a valid certificate are refused, and an agent never dials what it does not allow,
//! even when the server asks.

use std::net::IpAddr;
use std::sync::Arc;

use edge_tunnel_testkit::{TestCluster, TestPki, client, metric_value};
use http::StatusCode;
use tokio::net::TcpStream;
use tunnel_core::{
    Connector, OpenError, OpenRequest, PortSet, QuicListener, Refusal, SessionConfig, Target,
    TargetHost, TransportChoice, proto,
};

fn read(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_is_registered_under_its_certificate_name_whatever_it_claims() {
    let pki = TestPki::new(&[("node-a", &[])]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    let mut config = cluster.agent_config("node-a");
    config.node_name = "node-b".into();
    let (_agent, node) = cluster.start_agent(config).await;
    assert_eq!(node, "node-a");
    let (session, _) = cluster
        .registry
        .lookup(&tunnel_core::NodeRef::Name("node-a".into()))
        .expect("registered as node-a");
    assert_eq!(
        session.claims().node_name,
        "node-b",
        "the claim is kept for logs only"
    );
    assert!(
        cluster
            .registry
            .lookup(&tunnel_core::NodeRef::Name("node-b".into()))
            .is_none()
    );
    assert_eq!(cluster.registry.len(), 1);

    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let (status, _) = client::get(&mut sender, "node-b", "/pods").await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

fn client_tls(roots_pem: &[u8], id: Option<tunnel_core::Identity>) -> rustls::ClientConfig {
    let roots = tunnel_core::tls::roots_from_pem(roots_pem, "ca").unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(tunnel_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match id {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![tunnel_core::tls::ALPN_QUIC.to_vec()];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_a_certificate_or_from_another_ca_are_refused() {
    let pki = TestPki::new(&[("node-a", &[])]);
    let foreign = pki.foreign(&["node-a"]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    let ca = read(&cluster.pki.tunnel.ca_cert);
    let register = proto::Register {
        node_name: "node-a".into(),
        ..Default::default()
    };

    let no_cert = Connector::new(
        client_tls(&ca, None),
        SessionConfig::default(),
        TransportChoice::Quic,
    )
    .unwrap();
    let err = no_cert
        .connect(cluster.tunnel_addr, "localhost", register.clone())
        .await
        .expect_err("no client certificate");
    assert!(!err.to_string().is_empty());

    let (_, crt, key) = &foreign.agents[0];
    let other_ca = tunnel_core::Identity::from_pem(&read(crt), &read(key)).unwrap();
    let wrong_ca = Connector::new(
        client_tls(&ca, Some(other_ca)),
        SessionConfig::default(),
        TransportChoice::Quic,
    )
    .unwrap();
    wrong_ca
        .connect(cluster.tunnel_addr, "localhost", register.clone())
        .await
        .expect_err("certificate from another CA");
    assert!(cluster.registry.is_empty());

    // The same connector code with the right certificate gets in: the refusals above are about
    // the certificates, not the client.
    let (crt, key) = cluster.pki.agent("node-a");
    let good = tunnel_core::Identity::from_pem(&read(&crt), &read(&key)).unwrap();
    let ok = Connector::new(
        client_tls(&ca, Some(good)),
        SessionConfig::default(),
        TransportChoice::Quic,
    )
    .unwrap();
    let session = ok
        .connect(cluster.tunnel_addr, "localhost", register)
        .await
        .unwrap();
    assert_eq!(session.node_name(), "node-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_forbidden_targets_from_a_hostile_server_without_dialing() {
    let _exclusive = edge_tunnel_testkit::exclusive().await;
    let pki = TestPki::new(&[("node-a", &["127.0.0.2".parse::<IpAddr>().unwrap()])]);
    // A scripted server: the library's own listener, driven by the test, asking for targets
    // that no honest server would.
    let tls = tunnel_core::tls::server_config(
        tunnel_core::Identity::from_pem(
            &read(&pki.tunnel.server_cert),
            &read(&pki.tunnel.server_key),
        )
        .unwrap(),
        tunnel_core::tls::roots_from_pem(&read(&pki.tunnel.ca_cert), "ca").unwrap(),
        &[tunnel_core::tls::ALPN_QUIC],
    )
    .unwrap();
    let listener = Arc::new(
        QuicListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            SessionConfig::default(),
            "hostile",
        )
        .unwrap(),
    );

    // Targets the agent must not reach, each with a listener that would see the dial.
    let forbidden_lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forbidden_ip = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let allowed = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    for l in [&forbidden_lo, &forbidden_ip, &allowed] {
        l.set_nonblocking(true).unwrap();
    }
    let (p_lo, p_ip, p_ok) = (
        forbidden_lo.local_addr().unwrap().port(),
        forbidden_ip.local_addr().unwrap().port(),
        allowed.local_addr().unwrap().port(),
    );

    let (crt, key) = pki.agent("node-a");
    let config = tunnel_agent::AgentConfig {
        server_address: listener.local_addr().unwrap().to_string(),
        server_name: Some("localhost".into()),
        tls_cert_file: Some(crt),
        tls_private_key_file: Some(key),
        ca_file: Some(pki.tunnel.ca_cert.clone()),
        meta_port: 0,
        allowed_ports: Some(PortSet::new([p_ok])),
        localhost_proxy_ports: Some(PortSet::default()),
        metrics: Some(edge_tunnel_testkit::metrics()),
        ..Default::default()
    };
    let agent = tokio::spawn(tunnel_agent::run(config, std::future::pending()));
    let tunnel_core::transport::Accepted::Agent(session) =
        listener.accept().await.unwrap().establish().await.unwrap()
    else {
        panic!("an agent's certificate makes an agent session")
    };
    assert_eq!(session.identity().node_name, "node-a");

    let forbidden_before = metric_value(
        &edge_tunnel_testkit::metrics().render(),
        "edge_tunnel_agent_streams_total",
        &[("result", "forbidden")],
    );
    let hostile = [
        Target {
            host: TargetHost::Loopback,
            port: p_lo,
        },
        Target {
            host: TargetHost::Node,
            port: p_ip,
        },
        Target {
            host: TargetHost::NodeIp("127.0.0.2".parse().unwrap()),
            port: p_ip,
        },
        // An allowed port, but not on this node.
        Target {
            host: TargetHost::NodeIp("127.0.0.3".parse().unwrap()),
            port: p_ok,
        },
        Target {
            host: TargetHost::Loopback,
            port: p_ok,
        },
        Target {
            host: TargetHost::NodeIp("169.254.169.254".parse().unwrap()),
            port: 80,
        },
    ];
    for (i, target) in hostile.iter().enumerate() {
        match session.open(&OpenRequest::new(*target, i as u64)).await {
            Err(OpenError::Refused { refusal, .. }) => {
                assert_eq!(refusal, Refusal::Forbidden, "{target}")
            }
            other => panic!("{target}: expected a forbidden refusal, got {other:?}"),
        }
    }
    // The refusal comes after the decision, so a dial would already sit in a backlog.
    for l in [&forbidden_lo, &forbidden_ip, &allowed] {
        assert_eq!(
            l.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "no dial may happen"
        );
    }
    let forbidden_after = metric_value(
        &edge_tunnel_testkit::metrics().render(),
        "edge_tunnel_agent_streams_total",
        &[("result", "forbidden")],
    );
    assert_eq!(forbidden_after - forbidden_before, hostile.len() as f64);

    // What the agent allows does get through: the test above could have failed.
    let target = Target {
        host: TargetHost::Node,
        port: p_ok,
    };
    let _stream = session.open(&OpenRequest::new(target, 99)).await.unwrap();
    allowed.set_nonblocking(false).unwrap();
    let (_, peer) = allowed.accept().unwrap();
    assert!(peer.ip().is_loopback());
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_agent_certificate_is_refused() {
    let pki = TestPki::new(&[("node-a", &[])]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    // Signed by the right CA, for the right node, but no longer valid.
    let (cert_pem, key_pem) = expired_agent_certificate(&cluster.pki, "node-a");
    let expired = tunnel_core::Identity::from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap();

    let ca = read(&cluster.pki.tunnel.ca_cert);
    let connector = Connector::new(
        client_tls(&ca, Some(expired)),
        SessionConfig::default(),
        TransportChoice::Quic,
    )
    .unwrap();
    let register = proto::Register::default();
    connector
        .connect(cluster.tunnel_addr, "localhost", register)
        .await
        .expect_err("an expired certificate must not get a session");
    assert!(cluster.registry.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_ip_claimed_twice_stays_with_its_first_owner() {
    let ip: IpAddr = "127.0.0.2".parse().unwrap();
    let pki = TestPki::new(&[("node-a", &[ip]), ("node-b", &[ip])]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    let (agent_a, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let (_agent_b, _) = cluster.start_agent(cluster.agent_config("node-b")).await;
    let owner = |cluster: &TestCluster| {
        cluster
            .registry
            .lookup(&tunnel_core::NodeRef::Ip(ip))
            .map(|(s, _)| s.identity().node_name.clone())
    };
    // node-b's certificate cannot take node-a's address over.
    assert_eq!(owner(&cluster).as_deref(), Some("node-a"));
    let conflicts = metric_value(
        &cluster.scrape().await,
        "edge_tunnel_server_ip_conflicts_total",
        &[],
    );
    assert_eq!(conflicts, 1.0);
    // When node-a leaves, the address goes to the remaining claimant rather than nowhere.
    agent_a.stop().await.unwrap();
    cluster.registry.wait_gone("node-a").await;
    assert_eq!(owner(&cluster).as_deref(), Some("node-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_to_start_with_an_expired_certificate_and_says_why() {
    let pki = TestPki::new(&[("node-a", &[])]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    let (cert_pem, key_pem) = expired_agent_certificate(&cluster.pki, "node-a");
    let dir = cluster.pki.dir().join("expired");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("node-a.crt"), cert_pem).unwrap();
    std::fs::write(dir.join("node-a.key"), key_pem).unwrap();

    let mut config = cluster.agent_config("node-a");
    config.tls_cert_file = Some(dir.join("node-a.crt"));
    config.tls_private_key_file = Some(dir.join("node-a.key"));
    let err = cluster
        .spawn_agent(config)
        .join()
        .await
        .expect_err("must not start");
    let msg = err.to_string();
    assert!(
        msg.contains("--tls-cert-file") && msg.contains("renew"),
        "{msg}"
    );
    assert!(cluster.registry.is_empty());
}

/// A client certificate for `node`, signed by the tunnel CA, that expired in 2021: right CA,
/// right node, wrong time. Returns (certificate PEM, key PEM).
fn expired_agent_certificate(pki: &TestPki, node: &str) -> (String, String) {
    let pem = |p: &std::path::Path| String::from_utf8(read(p)).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&pem(&pki.tunnel.ca_key)).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&pem(&pki.tunnel.ca_cert), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![node.to_owned()]).unwrap();
    // The name only as a DNS SAN, so nothing but the dates can make it fail.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_certificate_never_registers_as_a_node() {
    // The server certificate of `pki init` carries client authentication and the replica mark,
    // so that replicas can authenticate to each other with it. Its DNS SAN (`localhost`) must
    // still never make it an agent of a node of that name.
    let pki = TestPki::new(&[("node-a", &[])]);
    let cluster = TestCluster::start(pki, 10250, 10255).await;
    let ca = read(&cluster.pki.tunnel.ca_cert);
    let register = proto::Register {
        node_name: "localhost".into(),
        ..Default::default()
    };
    for transport in [TransportChoice::Quic, TransportChoice::Grpc] {
        let replica = tunnel_core::Identity::from_pem(
            &read(&cluster.pki.tunnel.server_cert),
            &read(&cluster.pki.tunnel.server_key),
        )
        .unwrap();
        let connector = Connector::new(
            client_tls(&ca, Some(replica)),
            SessionConfig::default(),
            transport,
        )
        .unwrap();
        let err = connector
            .connect(cluster.tunnel_addr, "localhost", register.clone())
            .await
            .expect_err("a replica's certificate registers as no node");
        assert!(!err.to_string().is_empty(), "{transport:?}");
    }
    assert!(cluster.registry.is_empty());
    let metrics = cluster.scrape().await;
    assert!(
        metric_value(
            &metrics,
            "edge_tunnel_server_handshakes_total",
            &[("result", "rejected"), ("cause", "refused")]
        ) >= 2.0,
        "{metrics}"
    );
}
