//! The gRPC transport end to end on loopback: registration, a proxied connection with
//! half-close, and a typed refusal, through tonic over TLS/TCP.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel_core::copy::{CopyConfig, copy_bidirectional};
use tunnel_core::{
    GrpcConnector, GrpcListener, OpenError, OpenRequest, Refusal, SessionConfig, Target,
    TargetHost, TransportKind, proto, tls,
};

struct Pki {
    ca: String,
    server: tls::Identity,
    agent: tls::Identity,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let issue = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.distinguished_name = DistinguishedName::new();
        let cert = p.signed_by(&key, &issuer).unwrap();
        tls::Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    };
    Pki {
        server: issue("localhost"),
        agent: issue("node-a"),
        ca: ca_pem,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_connection_over_grpc_echoes_with_half_close_and_refusals_are_typed() {
    let pki = pki();
    let roots = || tls::roots_from_pem(pki.ca.as_bytes(), "ca").unwrap();
    let server_tls = tls::server_config(pki.server.clone(), roots(), &[]).unwrap();
    let mut listener = GrpcListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        server_tls,
        SessionConfig::default(),
        "s1",
    )
    .await
    .unwrap();
    let addr = listener.local_addr();

    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });

    let client_tls = tls::client_config(pki.agent.clone(), roots(), &[]).unwrap();
    let connector = GrpcConnector::new(client_tls, SessionConfig::default());
    let register = proto::Register {
        node_name: "claimed".into(),
        ..Default::default()
    };
    let agent = tokio::spawn(async move {
        let session = connector
            .connect(addr, "localhost", register)
            .await
            .unwrap();
        assert_eq!(session.node_name(), "node-a");
        assert_eq!(session.transport(), TransportKind::Grpc);
        while let Ok(incoming) = session.accept().await {
            tokio::spawn(async move {
                let requested = incoming.read_request().await.unwrap();
                if requested.request().target.port != echo_port {
                    requested
                        .refuse(Refusal::Forbidden, "not allowed")
                        .await
                        .unwrap();
                    return;
                }
                let mut tcp = TcpStream::connect(("127.0.0.1", echo_port)).await.unwrap();
                let mut stream = requested.accept().await.unwrap();
                copy_bidirectional(&mut stream, &mut tcp, &CopyConfig::default())
                    .await
                    .unwrap();
            });
        }
    });

    let session = listener.accept().await.unwrap();
    assert_eq!(session.identity().node_name, "node-a");
    assert_eq!(session.claims().node_name, "claimed");
    assert_eq!(session.transport(), TransportKind::Grpc);

    let target = Target {
        host: TargetHost::Loopback,
        port: echo_port,
    };
    let mut stream = session.open(&OpenRequest::new(target, 1)).await.unwrap();
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut stream);
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let ((), n) = tokio::join!(write, r.read_to_end(&mut got));
    n.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");

    let forbidden = Target {
        host: TargetHost::Loopback,
        port: 22,
    };
    match session.open(&OpenRequest::new(forbidden, 2)).await {
        Err(OpenError::Refused {
            refusal: Refusal::Forbidden,
            detail,
            ..
        }) => assert_eq!(detail, "not allowed"),
        other => panic!("expected a forbidden refusal, got {other:?}"),
    }
    agent.abort();
}
