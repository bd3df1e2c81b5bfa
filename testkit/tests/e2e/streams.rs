//! Streams of one agent are independent: a reader that stopped holds up no other stream, and
//! a client that leaves before the agent answered leaves no dial behind, on either side.
//! Conformance: each test runs over QUIC and over gRPC.

use std::time::Duration;

use edge_tunnel_testkit::client;
use edge_tunnel_testkit::target::{Blackhole, Source, fetch};
use edge_tunnel_testkit::{TestCluster, TestPki, kind_of, metric_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_core::PortSet;
use tunnel_core::TransportChoice;

const MIB: u64 = 1024 * 1024;

/// Polls the server's metrics until `ok` holds, for at most 10 s (a liveness bound, not a
/// timing assertion: every wait here normally ends in milliseconds).
async fn eventually(cluster: &TestCluster, what: &str, ok: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = cluster.scrape().await;
        if ok(&text) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen; metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_stopped_reader_does_not_hold_up_ten_other_streams(transport: TransportChoice) {
    let source = Source::start().await.unwrap();
    let mut cluster = TestCluster::start(TestPki::new(&[("node-a", &[])]), 10250, 10255).await;
    cluster.serve_ports([source.addr.port()]);
    let mut config = cluster.agent_config_over("node-a", transport);
    config.allowed_ports = Some(PortSet::new([source.addr.port()]));
    config.localhost_proxy_ports = config.allowed_ports.clone();
    let (_agent, _) = cluster.start_agent(config).await;
    assert_eq!(cluster.transport_of("node-a"), kind_of(transport));
    let authority = format!("node-a:{}", source.addr.port());

    // One stream asks for 1 GiB and never reads: every buffer on its path fills, its stream
    // window included.
    let mut stalled = client::connect_via(cluster.insecure_addr, &authority)
        .await
        .unwrap();
    stalled.write_u64(1 << 30).await.unwrap();
    let mut last = 0;
    let mut unchanged = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while unchanged < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled stream never filled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = source.written(0);
        unchanged = if now == last && now > 0 {
            unchanged + 1
        } else {
            0
        };
        last = now;
    }
    let window = u64::from(tunnel_core::SessionConfig::default().stream_window);
    assert!(
        (window..1 << 30).contains(&last),
        "stalled at {last} bytes: more than a stream window in flight, far from done"
    );

    // Ten more streams on the same agent each move 4 MiB to the end.
    let mut others = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let authority = authority.clone();
        let proxy = cluster.insecure_addr;
        others.spawn(async move {
            let mut io = client::connect_via(proxy, &authority).await?;
            fetch(&mut io, 4 * MIB).await
        });
    }
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        let mut done = Vec::new();
        while let Some(r) = others.join_next().await {
            done.push(r.unwrap().unwrap());
        }
        done
    })
    .await
    .expect("the other streams finish while one reader is stopped");
    assert_eq!(finished, vec![4 * MIB; 10]);
    assert_eq!(source.written(0), last, "the stalled reader stayed stalled");

    // The stalled stream was held back, not broken: it flows again once read.
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < 2 * window {
        let n = stalled.read(&mut buf).await.unwrap();
        assert!(n > 0, "stalled stream ended early");
        got += n as u64;
    }
}

async fn a_client_that_leaves_before_the_answer_leaves_no_dial_behind(transport: TransportChoice) {
    let hole = Blackhole::start().await.unwrap();
    let open_timeout = Duration::from_secs(60);
    // The TLS front's kubelet port is the black hole too.
    let cluster = TestCluster::start_with(
        TestPki::new(&[("node-a", &[])]),
        hole.addr.port(),
        10255,
        |c| c.session.open_timeout = open_timeout,
    )
    .await;
    let mut config = cluster.agent_config_over("node-a", transport);
    config.allowed_ports = Some(PortSet::new([hole.addr.port()]));
    config.localhost_proxy_ports = config.allowed_ports.clone();
    // Without the withdrawal, a dial would hang here for 50 s.
    config.dial_timeout = Duration::from_secs(50);
    config.session.open_timeout = open_timeout;
    let (_agent, _) = cluster.start_agent(config).await;
    assert_eq!(cluster.transport_of("node-a"), kind_of(transport));

    let (proxy, secure, apiserver) = (
        cluster.insecure_addr,
        cluster.secure_addr,
        cluster.pki.apiserver_tls(),
    );
    let authority = format!("node-a:{}", hole.addr.port());
    for (round, front) in ["CONNECT on the HTTP front", "TLS front"]
        .into_iter()
        .enumerate()
    {
        let client = if round == 0 {
            let authority = authority.clone();
            tokio::spawn(async move {
                let _ = client::connect_via(proxy, &authority).await;
            })
        } else {
            let apiserver = apiserver.clone();
            tokio::spawn(async move {
                let _ = client::tls_connect(secure, "node-a", apiserver).await;
            })
        };
        eventually(
            &cluster,
            &format!("{front}: the dial reaches the agent"),
            |m| {
                metric_value(m, "edge_tunnel_agent_dials_in_progress", &[]) == 1.0
                    && metric_value(m, "edge_tunnel_server_pending_opens", &[]) == 1.0
            },
        )
        .await;
        // The client leaves: its connection closes with the task.
        client.abort();
        let cancelled = (round + 1) as f64;
        eventually(&cluster, &format!("{front}: the dial is withdrawn"), |m| {
            metric_value(m, "edge_tunnel_agent_dials_in_progress", &[]) == 0.0
                && metric_value(m, "edge_tunnel_server_pending_opens", &[]) == 0.0
                && metric_value(
                    m,
                    "edge_tunnel_agent_streams_total",
                    &[("result", "cancelled")],
                ) == cancelled
        })
        .await;
    }
    // Nothing was answered late: no stream call came for a withdrawn dial.
    let text = cluster.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_server_grpc_stream_calls_refused_total",
            &[]
        ),
        0.0,
        "{text}"
    );
}

async fn an_agent_link_carries_at_most_max_streams(transport: TransportChoice) {
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |c| {
        c.session.max_streams = 3;
    })
    .await;
    let (_agent, _) = cluster
        .start_agent(cluster.agent_config_over("node-a", transport))
        .await;
    let host = format!("node-a:{}", kubelet.http_addr.port());
    let mut held = Vec::new();
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(cluster.insecure_addr)
            .await
            .unwrap();
        let mut sender = client::http1(tcp).await.unwrap();
        held.push(
            client::exec_upgrade(&mut sender, &host, client::Upgrade::Spdy)
                .await
                .unwrap(),
        );
    }
    let get = || async {
        let tcp = tokio::net::TcpStream::connect(cluster.insecure_addr)
            .await
            .unwrap();
        let mut sender = client::http1(tcp).await.unwrap();
        let (status, body) = client::get(&mut sender, &host, "/healthz").await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, body) = get().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("limit of 3 streams"), "{body}");
    // One ends: there is room again.
    client::echo_exact(held.pop().unwrap(), b"bye").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get().await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a stream ended: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

edge_tunnel_testkit::conformance!(
    an_agent_link_carries_at_most_max_streams,
    a_stopped_reader_does_not_hold_up_ten_other_streams,
    a_client_that_leaves_before_the_answer_leaves_no_dial_behind,
);
