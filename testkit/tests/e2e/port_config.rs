//! The server's port configuration, as operators run it: ConfigMap `edge-tunnel-server-cfg`
//! mounted as a directory and changed live. The "node" is node-a with IP 127.0.0.3 (its
//! certificate's IP SAN); its services listen on 127.0.0.3 or, for a localhost-only service,
//! on 127.0.0.1. The server's fronts listen on 127.0.0.1.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use edge_tunnel_testkit::client::{self, timed_get};
use edge_tunnel_testkit::{
    ConfigMapDir, FakeKubelet, TestCluster, TestPki, free_port_on, metric_value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tunnel_core::TransportChoice;

const NODE_IP: &str = "127.0.0.3";

fn node_ip() -> IpAddr {
    NODE_IP.parse().expect("ip")
}

/// A cluster following `config`, and node-a's agent (IP 127.0.0.3) without port flags: the
/// server's configuration decides what it dials.
async fn setup(config: &ConfigMapDir) -> (TestCluster, edge_tunnel_testkit::AgentHandle) {
    let pki = TestPki::new(&[("node-a", &[node_ip()])]);
    let dir = config.path().to_owned();
    let cluster =
        TestCluster::start_with(pki, 10250, 10255, move |c| c.config_dir = Some(dir)).await;
    let mut agent = cluster.agent_config_over("node-a", TransportChoice::Quic);
    agent.allowed_ports = None;
    agent.localhost_proxy_ports = None;
    let (handle, _) = cluster.start_agent(agent).await;
    (cluster, handle)
}

fn reloads(text: &str, result: &str) -> f64 {
    metric_value(
        text,
        "edge_tunnel_server_config_reloads_total",
        &[("result", result)],
    )
}

/// A plain HTTP service on `addr`: the fake kubelet's read-only listener.
async fn http_service(addr: SocketAddr) -> FakeKubelet {
    let pki = TestPki::new(&[("node-a", &[])]);
    FakeKubelet::start_on("node-a", pki.kubelet_tls(), (addr.ip(), 0).into(), addr)
        .await
        .expect("service listens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_added_to_http_proxy_ports_is_served_and_removed_is_refused() {
    let service = http_service((node_ip(), 0).into()).await;
    let port = service.http_addr.port();
    let config = ConfigMapDir::new(&[("http-proxy-ports", "9051")]);
    let (cluster, _agent) = setup(&config).await;
    let host = format!("node-a:{port}");

    let (status, _) = timed_get(cluster.insecure_addr, &host, "/pods").await;
    assert_eq!(status, 403, "not in the configuration yet");

    let written = Instant::now();
    config.write(&[("http-proxy-ports", &format!(" 9051 , {port}"))]);
    cluster
        .wait_config(|p| p["in_force"]["http-proxy-ports"] == format!("9051,{port}"))
        .await;
    println!(
        "figure: config change in force after {:?}",
        written.elapsed()
    );
    let (status, _) = timed_get(cluster.insecure_addr, &host, "/pods").await;
    assert_eq!(status, 200, "dialed on the node's IP");

    config.write(&[("http-proxy-ports", "9051")]);
    cluster
        .wait_config(|p| p["in_force"]["http-proxy-ports"] == "9051")
        .await;
    let (status, _) = timed_get(cluster.insecure_addr, &host, "/pods").await;
    assert_eq!(status, 403);
    assert_eq!(reloads(&cluster.scrape().await, "ok"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_localhost_only_service_is_reachable_only_while_in_localhost_proxy_ports() {
    // Bound to the node's loopback only: nothing answers on the node's IP at that port.
    let service = http_service("127.0.0.1:0".parse().expect("addr")).await;
    let port = service.http_addr.port();
    let config = ConfigMapDir::new(&[("http-proxy-ports", &port.to_string())]);
    let (cluster, _agent) = setup(&config).await;
    let host = format!("node-a:{port}");

    let (status, _) = timed_get(cluster.insecure_addr, &host, "/pods").await;
    assert_eq!(
        status, 502,
        "the agent dials 127.0.0.3, where nothing listens"
    );

    config.write(&[
        ("http-proxy-ports", &port.to_string()),
        ("localhost-proxy-ports", &format!("10250, 10255, {port}")),
    ]);
    cluster
        .wait_config(|p| {
            p["agent_policy"]["loopback_ports"]
                .as_array()
                .is_some_and(|a| a.contains(&port.into()))
        })
        .await;
    // The agent hears of the change over its control channel; the server sends it at once.
    client::until_status(cluster.insecure_addr, &host, "/pods", 200).await;

    config.write(&[("http-proxy-ports", &port.to_string())]);
    cluster
        .wait_config(|p| p["in_force"]["localhost-proxy-ports"] == "10250,10255,10266,10267")
        .await;
    client::until_status(cluster.insecure_addr, &host, "/pods", 502).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_and_a_vanished_directory_keep_the_last_good_config() {
    let config = ConfigMapDir::new(&[("http-proxy-ports", "9100")]);
    let (cluster, _agent) = setup(&config).await;
    let good = cluster.config_page().await;
    assert_eq!(good["in_force"]["http-proxy-ports"], "9100");
    assert_eq!(good["source"], config.path().display().to_string());

    let bad: [(&[(&str, &str)], &str); 5] = [
        (
            &[("http-proxy-ports", "9100, 91o1")],
            "http-proxy-ports: invalid port \"91o1\"",
        ),
        (
            &[("http-proxy-ports", "9100, 9100")],
            "http-proxy-ports: port 9100 is listed twice",
        ),
        (
            &[("https-proxy-ports", "70000")],
            "https-proxy-ports: invalid port \"70000\"",
        ),
        (
            &[("dnat-ports-pair", "9051=10263")],
            "dnat-ports-pair: pair \"9051=10263\" targets port 10263",
        ),
        (
            &[("http-proxy-ports", "9052"), ("https-proxy-ports", "9052")],
            "port 9052 is also in https-proxy-ports",
        ),
    ];
    for (i, (values, why)) in bad.iter().enumerate() {
        config.write(values);
        let page = cluster
            .wait_config(|p| {
                p["last_reload"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(why))
            })
            .await;
        assert_eq!(page["in_force"], good["in_force"], "{why}");
        let text = cluster.scrape().await;
        assert_eq!(reloads(&text, "error"), (i + 1) as f64);
        assert_eq!(
            metric_value(
                &text,
                "edge_tunnel_server_config_last_reload_successful",
                &[]
            ),
            0.0
        );
        // Still served as before.
        let (status, _) = timed_get(cluster.insecure_addr, "node-a:9100", "/").await;
        assert_ne!(status, 403, "{why}");
    }

    // The directory goes (a deleted volume, an operator's mistake): reported, nothing changes.
    let path = config.path().to_owned();
    let moved = path.with_extension("moved");
    std::fs::rename(&path, &moved).expect("move away");
    let page = cluster
        .wait_config(|p| {
            p["last_reload"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot read --config-dir"))
        })
        .await;
    assert_eq!(page["in_force"], good["in_force"]);
    // Back, with a good value: followed again (the poll finds it; the watch is made again).
    std::fs::rename(&moved, &path).expect("move back");
    config.write(&[("http-proxy-ports", "9100, 9101")]);
    cluster
        .wait_config(|p| p["in_force"]["http-proxy-ports"] == "9100,9101")
        .await;
    let page = cluster.config_page().await;
    assert_eq!(page["last_reload"]["result"], "ok");
    assert_eq!(
        metric_value(
            &cluster.scrape().await,
            "edge_tunnel_server_config_last_reload_successful",
            &[]
        ),
        1.0
    );
}

#[tokio::test]
async fn the_server_does_not_start_on_a_bad_config_and_says_which_key() {
    let config = ConfigMapDir::new(&[("localhost-proxy-ports", "10250;10255")]);
    let pki = TestPki::new(&[("node-a", &[])]);
    let err = tunnel_server::Server::bind(tunnel_server::ServerConfig {
        config_dir: Some(config.path().to_owned()),
        ports: None,
        ..TestCluster::server_config(&pki, 10250, 10255)
    })
    .await
    .expect_err("a bad value refuses the start");
    assert!(
        err.to_string().ends_with(
            "localhost-proxy-ports: invalid port \"10250;10255\": a number from 1 to 65535"
        ),
        "{err}"
    );
}

/// curl to `https://node-a:PORT/pods` sent to the server's https-proxy listener (SNI node-a).
async fn curl_https(cluster: &TestCluster, port: u16) -> std::process::Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "10"])
        .args(cluster.pki.curl_apiserver_args())
        .arg("--resolve")
        .arg(format!("node-a:{port}:127.0.0.1"))
        .arg(format!("https://node-a:{port}/pods"))
        .output()
        .await
        .expect("curl runs; .ci/run installs it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_proxy_port_is_reached_by_sni_and_its_listener_follows_the_config() {
    let port = free_port_on(&[NODE_IP, "127.0.0.1"]);
    let pki = TestPki::new(&[("node-a", &[node_ip()])]);
    // The node's TLS service, on the node's IP; TLS passes through the tunnel untouched.
    let service = FakeKubelet::start_on(
        "node-a",
        pki.kubelet_tls(),
        (node_ip(), port).into(),
        (node_ip(), 0).into(),
    )
    .await
    .expect("service listens");
    let config = ConfigMapDir::new(&[("https-proxy-ports", &port.to_string())]);
    let dir = config.path().to_owned();
    let cluster =
        TestCluster::start_with(pki, 10250, 10255, move |c| c.config_dir = Some(dir)).await;
    let mut agent = cluster.agent_config_over("node-a", TransportChoice::Quic);
    agent.allowed_ports = None;
    agent.localhost_proxy_ports = None;
    let (_agent, _) = cluster.start_agent(agent).await;

    let out = curl_https(&cluster, port).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"node\":\"node-a\""));
    assert_eq!(service.client_subjects(), ["kube-apiserver-kubelet-client"]);

    // A connection in flight when the port leaves the configuration goes on to its end.
    let in_flight = client::tls_connect(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "node-a",
        cluster.pki.apiserver_tls(),
    )
    .await
    .expect("TLS through the listener");
    config.write(&[("https-proxy-ports", "")]);
    cluster
        .wait_config(|p| p["in_force"]["https-proxy-ports"] == "")
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "the listener of a removed port still accepts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sender = client::http1(in_flight)
        .await
        .expect("HTTP over the old connection");
    let (status, body) = client::get(&mut sender, &format!("node-a:{port}"), "/pods")
        .await
        .expect("the in-flight connection still works");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("node-a"));

    // Back in the configuration: listening again.
    let listed = port.to_string();
    config.write(&[("https-proxy-ports", &listed)]);
    cluster
        .wait_config(|p| p["in_force"]["https-proxy-ports"] == listed.as_str())
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = curl_https(&cluster, port).await;
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = cluster.scrape().await;
    assert_eq!(
        metric_value(&text, "edge_tunnel_server_https_proxy_listeners", &[]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dnat_pair_is_plain_http_through_the_http_front() {
    let service = http_service((node_ip(), 0).into()).await;
    let port = service.http_addr.port();
    // The pair's target must be the HTTP front's port, known once it is bound: start with
    // nothing, then write the pair.
    let config = ConfigMapDir::new(&[]);
    let (cluster, _agent) = setup(&config).await;
    let front = cluster.insecure_addr.port();
    config.write(&[("dnat-ports-pair", &format!("{port}={}", front + 1))]);
    cluster
        .wait_config(|p| {
            p["last_reload"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("a pair must target the HTTP front port"))
        })
        .await;
    config.write(&[("dnat-ports-pair", &format!("{port}={front}"))]);
    cluster
        .wait_config(|p| p["in_force"]["dnat-ports-pair"] == format!("{port}={front}"))
        .await;
    // Through the front as an HTTP proxy would send it, and as CONNECT.
    let (status, _) = timed_get(cluster.insecure_addr, &format!("node-a:{port}"), "/pods").await;
    assert_eq!(status, 200);
    let mut tunnel = client::connect_via(cluster.insecure_addr, &format!("{NODE_IP}:{port}"))
        .await
        .expect("CONNECT by the node's IP");
    tunnel
        .write_all(
            format!("GET /pods HTTP/1.1\r\nHost: node-a:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("request");
    let mut answer = String::new();
    tunnel.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
