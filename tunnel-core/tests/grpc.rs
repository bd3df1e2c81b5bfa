//! The gRPC transport end to end on loopback: registration, a proxied connection with
//! half-close, a typed refusal, and the refusal of `Stream` calls that answer no open stream request,
//! through tonic over TLS/TCP.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};
use tunnel_core::copy::{CopyConfig, copy_bidirectional};
use tunnel_core::transport::grpc::service::tunnel_client::TunnelClient;
use tunnel_core::transport::grpc::{ALPN_H2, STREAM_ID_KEY};
use tunnel_core::{
    Connector, GrpcListener, OpenError, OpenRequest, Refusal, SessionConfig, Target, TargetHost,
    TransportChoice, TransportKind, proto, tls,
};

mod common;

use common::{Pki, pki};

async fn listen(pki: &Pki) -> GrpcListener {
    let server_tls = tls::server_config(pki.server.clone(), pki.roots(), &[]).unwrap();
    GrpcListener::bind(
        "127.0.0.1:0".parse().unwrap(),
        server_tls,
        SessionConfig::default(),
        "s1",
    )
    .await
    .unwrap()
}

/// A TCP echo server with half-close; returns its port.
async fn echo_server() -> u16 {
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
    echo_port
}

/// An agent (node-a, claiming "claimed") that proxies streams to `echo_port` and refuses
/// every other target as forbidden.
fn spawn_agent(pki: &Pki, addr: SocketAddr, echo_port: u16) -> JoinHandle<()> {
    let client_tls = tls::client_config(pki.agent.clone(), pki.roots(), &[]).unwrap();
    let connector =
        Connector::new(client_tls, SessionConfig::default(), TransportChoice::Grpc).unwrap();
    let register = proto::Register {
        node_name: "claimed".into(),
        ..Default::default()
    };
    tokio::spawn(async move {
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
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_connection_over_grpc_echoes_with_half_close_and_refusals_are_typed() {
    let pki = pki();
    let mut listener = listen(&pki).await;
    let addr = listener.local_addr();
    let echo_port = echo_server().await;
    let agent = spawn_agent(&pki, addr, echo_port);

    let session = listener.accept().await.unwrap().unwrap();
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

/// The process-wide metrics recorder, installed once however many tests share the process.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
}

/// The value of `edge_tunnel_server_grpc_stream_calls_refused_total{reason}` (0 if absent).
fn refused(reason: &str) -> u64 {
    let series =
        format!("edge_tunnel_server_grpc_stream_calls_refused_total{{reason=\"{reason}\"}} ");
    recorder()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |value| value.trim().parse().unwrap())
}

/// A bare tonic client on its own TLS connection to the listener, with node-a's certificate.
async fn raw_client(pki: &Pki, addr: SocketAddr) -> TunnelClient<Channel> {
    let client_tls = tls::client_config(pki.agent.clone(), pki.roots(), &[ALPN_H2]).unwrap();
    let client_tls = Arc::new(client_tls);
    let connector = tower::service_fn(move |_: Uri| {
        let client_tls = client_tls.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let io = tokio_rustls::TlsConnector::from(client_tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap();
    TunnelClient::new(channel)
}

/// Opens a `Stream` call carrying `id` (none: no metadata) and a well-formed "ok" answer;
/// returns the status it was refused with.
async fn stream_call(client: &mut TunnelClient<Channel>, id: Option<&str>) -> tonic::Status {
    let answer = proto::Chunk {
        data: bytes::Bytes::new(),
        reply: Some(proto::StreamOpenReply {
            result: proto::OpenResult::Ok.into(),
            detail: String::new(),
        }),
        reset: false,
    };
    let mut request = tonic::Request::new(tokio_stream::iter(vec![answer]));
    if let Some(id) = id {
        request
            .metadata_mut()
            .insert(STREAM_ID_KEY, id.parse().unwrap());
    }
    match client.stream(request).await {
        Ok(_) => panic!("a stream call with id {id:?} was accepted"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_calls_with_a_missing_malformed_unknown_or_used_id_are_refused_and_counted() {
    let (bad_before, unknown_before) = (refused("bad_id"), refused("unknown_id"));
    let pki = pki();
    let mut listener = listen(&pki).await;
    let addr = listener.local_addr();
    let echo_port = echo_server().await;
    let agent = spawn_agent(&pki, addr, echo_port);
    let session = listener.accept().await.unwrap().unwrap();

    // The first stream request of a listener is stream id 1; once paired, the id is used up.
    let target = Target {
        host: TargetHost::Loopback,
        port: echo_port,
    };
    let mut stream = session.open(&OpenRequest::new(target, 1)).await.unwrap();

    let mut client = raw_client(&pki, addr).await;
    let status = stream_call(&mut client, None).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = stream_call(&mut client, Some("abc")).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = stream_call(&mut client, Some("987654")).await;
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let status = stream_call(&mut client, Some("1")).await;
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    assert_eq!(refused("bad_id") - bad_before, 2);
    assert_eq!(refused("unknown_id") - unknown_before, 2);

    // The refused duplicate left the paired stream alone.
    stream.write_all(b"still mine").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"still mine");
    agent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_a_reply_fails_the_open_as_a_protocol_error_and_is_counted() {
    let before = refused("bad_reply");
    let pki = pki();
    let mut listener = listen(&pki).await;
    let addr = listener.local_addr();
    // An agent that registers and takes stream requests but never answers them itself.
    let client_tls = tls::client_config(pki.agent.clone(), pki.roots(), &[]).unwrap();
    let connector =
        Connector::new(client_tls, SessionConfig::default(), TransportChoice::Grpc).unwrap();
    let silent = tokio::spawn(async move {
        let session = connector
            .connect(addr, "localhost", proto::Register::default())
            .await
            .unwrap();
        let mut held = Vec::new();
        while let Ok(incoming) = session.accept().await {
            held.push(incoming);
        }
    });
    let session = listener.accept().await.unwrap().unwrap();
    let target = Target {
        host: TargetHost::Loopback,
        port: 10250,
    };
    let open = tokio::spawn(async move { session.open(&OpenRequest::new(target, 1)).await });

    // The first stream request of a listener is stream id 1; answer it with a chunk that carries no reply.
    let mut client = raw_client(&pki, addr).await;
    let mut tries = 0;
    let status = loop {
        tries += 1;
        assert!(tries < 500, "the request never became pending");
        let mut request = tonic::Request::new(tokio_stream::iter(vec![proto::Chunk {
            data: bytes::Bytes::from_static(b"no answer"),
            reply: None,
            reset: false,
        }]));
        request
            .metadata_mut()
            .insert(STREAM_ID_KEY, "1".parse().unwrap());
        match client.stream(request).await {
            // The request may not be pending yet: try again.
            Err(status) if status.code() == tonic::Code::NotFound => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(status) => break status,
            Ok(_) => panic!("an answer without a reply was accepted"),
        }
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    match open.await.unwrap() {
        Err(OpenError::Protocol(_)) => {}
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(refused("bad_reply") - before, 1);
    silent.abort();
}
