//! A real Prometheus scrapes a real node-exporter that sits behind an agent, through the HTTP
//! front as its `proxy_url`, as users move their monitoring to the cloud. The exporter's port
//! comes and goes in `http-proxy-ports` (live reload); Prometheus' own `up` follows, and a
//! stream in flight across the reloads is untouched. `.ci/run` installs both programs
//! (Debian `prometheus`, `prometheus-node-exporter`); a missing one fails the test.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use edge_tunnel_testkit::client;
use edge_tunnel_testkit::{ConfigMapDir, TestCluster, TestPki, free_port_on, metric_value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tunnel_core::TransportChoice;

/// The node's address: its certificate's IP SAN; the exporter listens there only.
const NODE_IP: &str = "127.0.0.3";

fn spawn(program: &str, args: &[String]) -> Child {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program} not runnable ({e}); `scripts/test --install-only` installs it")
        })
}

async fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `/-/ready`: Prometheus listens before its storage is open and answers 503 until it is.
async fn wait_ready(prometheus: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tcp = TcpStream::connect(prometheus).await.expect("prometheus");
        let mut sender = client::http1(tcp).await.expect("HTTP");
        let (status, _) = client::get(&mut sender, "prometheus", "/-/ready")
            .await
            .expect("readiness");
        if status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "prometheus not ready: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of an instant query's single sample, `None` while the result is empty.
async fn query(prometheus: SocketAddr, expr: &str) -> Option<f64> {
    let tcp = TcpStream::connect(prometheus).await.expect("prometheus");
    let mut sender = client::http1(tcp).await.expect("HTTP");
    let path = format!("/api/v1/query?query={}", encode(expr));
    let (status, body) = client::get(&mut sender, "prometheus", &path)
        .await
        .expect("query");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["status"], "success", "{json}");
    let sample = json["data"]["result"].as_array()?.first()?.clone();
    sample["value"][1].as_str()?.parse().ok()
}

fn encode(expr: &str) -> String {
    expr.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Queries until `ok` holds of `expr`'s value, for at most `within`; returns how long it took.
async fn until(
    prometheus: SocketAddr,
    expr: &str,
    within: Duration,
    ok: impl Fn(Option<f64>) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let value = query(prometheus, expr).await;
        if ok(value) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{expr} is still {value:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request on the long-lived tunnel; the body of its 200.
async fn metrics_over(tunnel: &mut TcpStream, host: &str) -> String {
    tunnel
        .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .expect("request on the tunnel");
    let mut reader = BufReader::new(tunnel);
    let mut status = String::new();
    reader.read_line(&mut status).await.expect("status line");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("header");
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if line == "transfer-encoding: chunked" {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).await.expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("hex size");
            let mut chunk = vec![0u8; size + 2];
            reader.read_exact(&mut chunk).await.expect("chunk");
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        let mut rest = vec![0u8; length.expect("a length or chunks")];
        reader.read_exact(&mut rest).await.expect("body");
        body = rest;
    }
    String::from_utf8(body).expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_node_exporter_through_the_front_while_its_port_comes_and_goes() {
    let ip: IpAddr = NODE_IP.parse().expect("ip");
    let exporter_port = free_port_on(&[NODE_IP]);
    let exporter = SocketAddr::new(ip, exporter_port);
    let _exporter = spawn(
        "prometheus-node-exporter",
        &[
            format!("--web.listen-address={exporter}"),
            "--collector.disable-defaults".into(),
            "--collector.cpu".into(),
            "--web.disable-exporter-metrics".into(),
            "--log.level=warn".into(),
        ],
    );
    wait_listening(exporter, "node-exporter").await;

    let config = ConfigMapDir::new(&[("http-proxy-ports", &exporter_port.to_string())]);
    let dir = config.path().to_owned();
    let cluster =
        TestCluster::start_with(TestPki::new(&[("node-a", &[ip])]), 10250, 10255, move |c| {
            c.config_dir = Some(dir)
        })
        .await;
    // As deployed: no port flags on the agent, the server's configuration decides.
    let mut agent = cluster.agent_config_over("node-a", TransportChoice::Quic);
    agent.allowed_ports = None;
    agent.localhost_proxy_ports = None;
    let (_agent, _) = cluster.start_agent(agent).await;

    let work = tempfile::tempdir().expect("temp dir");
    let prometheus = SocketAddr::from(([127, 0, 0, 1], free_port_on(&["127.0.0.1"])));
    let target = format!("node-a:{exporter_port}");
    let yaml = format!(
        "global: {{scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}}\n\
         scrape_configs:\n  - job_name: node\n    proxy_url: http://{}\n    static_configs: [{{targets: ['{target}']}}]\n",
        cluster.insecure_addr
    );
    let file = work.path().join("prometheus.yml");
    std::fs::write(&file, yaml).expect("prometheus config");
    let _prometheus = spawn(
        "prometheus",
        &[
            format!("--config.file={}", file.display()),
            format!("--storage.tsdb.path={}", work.path().join("tsdb").display()),
            format!("--web.listen-address={prometheus}"),
            "--log.level=warn".into(),
        ],
    );
    wait_listening(prometheus, "prometheus").await;
    wait_ready(prometheus).await;
    // Prometheus scrapes its first time about 6 s after it starts.
    let first = until(prometheus, "up", Duration::from_secs(30), |v| {
        v == Some(1.0)
    })
    .await;
    println!("figure: Prometheus' first successful scrape through the front after {first:?}");
    until(
        prometheus,
        "count(node_cpu_seconds_total)",
        Duration::from_secs(10),
        |v| v.is_some_and(|n| n > 0.0),
    )
    .await;

    // A stream in flight across both reloads: a CONNECT tunnel to the exporter.
    let mut tunnel = client::connect_via(cluster.insecure_addr, &target)
        .await
        .expect("CONNECT to the exporter");
    assert!(
        metrics_over(&mut tunnel, &target)
            .await
            .contains("node_cpu_seconds_total")
    );

    // The port leaves the configuration: the next scrapes get 403 and `up` goes to 0.
    let written = Instant::now();
    config.write(&[("http-proxy-ports", "")]);
    cluster
        .wait_config(|p| p["in_force"]["http-proxy-ports"] == "")
        .await;
    until(prometheus, "up", Duration::from_secs(10), |v| {
        v == Some(0.0)
    })
    .await;
    println!(
        "figure: port removed -> Prometheus sees up 0 after {:?}",
        written.elapsed()
    );
    // ...while the tunnel opened before goes on.
    assert!(
        metrics_over(&mut tunnel, &target)
            .await
            .contains("node_cpu_seconds_total")
    );
    let (status, _) = client::timed_get(cluster.insecure_addr, &target, "/metrics").await;
    assert_eq!(status, 403, "a new request for the removed port");

    // Back: `up` is 1 again.
    let written = Instant::now();
    config.write(&[("http-proxy-ports", &format!(" {exporter_port} "))]);
    until(prometheus, "up", Duration::from_secs(10), |v| {
        v == Some(1.0)
    })
    .await;
    println!(
        "figure: port added back -> Prometheus sees up 1 after {:?}",
        written.elapsed()
    );
    assert!(
        metrics_over(&mut tunnel, &target)
            .await
            .contains("node_cpu_seconds_total")
    );

    let text = cluster.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_server_config_reloads_total",
            &[("result", "ok")]
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_server_config_reloads_total",
            &[("result", "error")]
        ),
        0.0
    );
    // Refused scrapes were counted as such, and never reached the agent.
    assert!(
        metric_value(
            &text,
            "edge_tunnel_server_streams_total",
            &[("front", "http"), ("result", "port_not_served")]
        ) >= 1.0
    );
}
