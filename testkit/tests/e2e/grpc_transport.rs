//! Transport choice: `auto` falls back to gRPC when the server offers no QUIC. (Everything
//! else runs over both transports in `through_tunnel.rs`, the conformance suite.)

use edge_tunnel_testkit::TestCluster;
use edge_tunnel_testkit::client;
use http::StatusCode;
use tokio::net::TcpStream;
use tunnel_core::TransportChoice;
use tunnel_core::{NodeRef, TransportKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_grpc_when_the_server_has_no_quic() {
    let (cluster, _kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |c| {
        c.transports = "grpc".parse().unwrap();
    })
    .await;
    let config = cluster.agent_config("node-a");
    assert_eq!(config.transport, TransportChoice::Auto);
    let (_agent, _) = cluster.start_agent(config).await;
    let (session, _) = cluster
        .registry
        .lookup(&NodeRef::Name("node-a".into()))
        .unwrap();
    assert_eq!(session.transport(), TransportKind::Grpc);
    let tcp = TcpStream::connect(cluster.insecure_addr).await.unwrap();
    let mut sender = client::http1(tcp).await.unwrap();
    let (status, body) = client::get(&mut sender, "node-a", "/pods").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("\"node\":\"node-a\""));
}
