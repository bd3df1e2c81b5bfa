//! The egress front, as kube-apiserver's `EgressSelectorConfiguration` uses it
//! (`proxyProtocol: HTTPConnect` for the `cluster` egress): a Unix socket, and a TCP port with
//! mutual TLS. kube-apiserver writes `CONNECT <addr> HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`,
//! wants a 200 with nothing behind it, then speaks TLS to the kubelet through the tunnel.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_tunnel_testkit::{FakeKubelet, TestCluster, TestPki, metric_value};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Command;

const NODE_IP: &str = "127.0.0.3";

struct Setup {
    cluster: TestCluster,
    kubelet: FakeKubelet,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    _agent: edge_tunnel_testkit::AgentHandle,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("egress.sock");
    let uds = socket.clone();
    let ip: IpAddr = NODE_IP.parse().expect("ip");
    let pki = TestPki::new(&[("node-a", &[ip])]);
    let kubelet = FakeKubelet::start("node-a", pki.kubelet_tls())
        .await
        .expect("fake kubelet");
    let apiserver_ca = pki.kubelet.ca_cert.clone();
    let cluster = TestCluster::start_with(
        pki,
        kubelet.https_addr.port(),
        kubelet.http_addr.port(),
        move |c| {
            c.connect_uds = Some(uds);
            c.connect_port = Some(0);
            c.connect_client_ca_file = Some(apiserver_ca);
            c.sniff_timeout = Duration::from_secs(1);
        },
    )
    .await;
    // kube-apiserver's client certificate is signed by the CA the kubelets trust; the egress
    // port is told that CA (not the agents').
    assert!(
        cluster.connect_addr.is_some(),
        "the mutual-TLS port listens"
    );
    let (agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    Setup {
        cluster,
        kubelet,
        socket,
        _dir: dir,
        _agent: agent,
    }
}

/// Reads a response head, byte by byte so that nothing after it is taken.
async fn read_head<IO: AsyncRead + Unpin>(io: &mut IO) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), io.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
        assert!(head.len() < 4096, "head too long");
    }
    String::from_utf8(head).expect("text head")
}

/// What kube-apiserver sends, byte for byte, and the head it reads back.
async fn apiserver_connect(socket: &Path, addr: &str) -> (UnixStream, String) {
    let mut unix = UnixStream::connect(socket).await.expect("egress socket");
    unix.write_all(format!("CONNECT {addr} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .expect("CONNECT");
    let head = read_head(&mut unix).await;
    (unix, head)
}

/// GET `path` as kube-apiserver does toward a kubelet: TLS with its client certificate,
/// verifying the kubelet's certificate for `node`.
async fn kubelet_get<IO>(io: IO, cluster: &TestCluster, node: &str, path: &str) -> String
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let connector = tokio_rustls::TlsConnector::from(cluster.pki.apiserver_tls());
    let name = ServerName::try_from(node.to_owned()).expect("name");
    let mut tls = connector
        .connect(name, io)
        .await
        .expect("TLS to the kubelet");
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {node}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_reaches_a_kubelet_over_the_unix_socket_by_ip_and_by_name() {
    let s = setup().await;
    let port = s.kubelet.https_addr.port();
    for target in [format!("{NODE_IP}:{port}"), format!("node-a:{port}")] {
        let (unix, head) = apiserver_connect(&s.socket, &target).await;
        // Exactly this: kube-apiserver refuses bytes buffered behind the head.
        assert_eq!(
            head, "HTTP/1.1 200 Connection established\r\n\r\n",
            "{target}"
        );
        let answer = kubelet_get(unix, &s.cluster, "node-a", "/pods").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
        assert!(answer.contains("\"node\":\"node-a\""), "{target}: {answer}");
    }
    assert!(
        s.kubelet
            .client_subjects()
            .iter()
            .all(|c| c == "kube-apiserver-kubelet-client")
    );
    let text = s.cluster.scrape().await;
    assert_eq!(
        metric_value(
            &text,
            "edge_tunnel_server_streams_total",
            &[("front", "egress"), ("result", "ok")]
        ),
        2.0
    );
    // The socket is for kube-apiserver (root, or the socket's group) alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&s.socket).expect("socket").permissions(),
    );
    assert_eq!(mode & 0o777, 0o660);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_front_refuses_as_the_other_fronts_do_and_asks_no_agent() {
    let s = setup().await;
    let agent_streams = |text: &str| metric_value(text, "edge_tunnel_agent_streams_total", &[]);
    let before = agent_streams(&s.cluster.scrape().await);
    let http = s.kubelet.http_addr.port();
    let cases: [(String, &str, &str); 6] = [
        (
            format!("CONNECT node-zz:{http} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            "HTTP/1.1 503 Service Unavailable",
            "no agent connected for node node-zz",
        ),
        (
            "CONNECT node-a:2379 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".into(),
            "HTTP/1.1 403 Forbidden",
            "port 2379 is not served",
        ),
        (
            format!("CONNECT 10.9.9.9:{http} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            "HTTP/1.1 503 Service Unavailable",
            "no connected agent has this IP in its certificate",
        ),
        (
            format!("GET /pods HTTP/1.1\r\nHost: node-a:{http}\r\n\r\n"),
            "HTTP/1.1 405 Method Not Allowed",
            "speaks CONNECT only",
        ),
        (
            format!(
                "CONNECT node-a:{http} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(20_000)
            ),
            "HTTP/1.1 431 Request Header Fields Too Large",
            "larger than 16384 bytes",
        ),
        (
            "\u{16}\u{3}\u{1}garbage\r\n\r\n".into(),
            "HTTP/1.1 400 Bad Request",
            "cannot tell the node",
        ),
    ];
    for (request, status, why) in cases {
        let mut unix = UnixStream::connect(&s.socket).await.expect("egress socket");
        unix.write_all(request.as_bytes()).await.expect("request");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), unix.read_to_string(&mut answer))
            .await
            .expect("answered and closed")
            .expect("read");
        assert!(answer.starts_with(status), "{request:.60}: {answer}");
        assert!(answer.contains(why), "{request:.60}: {answer}");
    }
    // A client that says nothing is closed at the sniff timeout with 408.
    let mut silent = UnixStream::connect(&s.socket).await.expect("egress socket");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_string(&mut answer))
        .await
        .expect("closed at the sniff timeout")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // None of that reached the agent.
    assert_eq!(agent_streams(&s.cluster.scrape().await), before);
}

/// Runs curl; returns its exit status, stdout and stderr.
async fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl runs; .ci/run installs it");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_mutual_tls_port_with_the_apiservers_certificate_only() {
    let s = setup().await;
    let connect = s.cluster.connect_addr.expect("egress port");
    let (crt, key) = s.cluster.pki.apiserver_client();
    let proxy = format!("https://127.0.0.1:{}", connect.port());
    let target = format!("http://node-a:{}/pods", s.kubelet.http_addr.port());
    let ca = path(&s.cluster.pki.tunnel.ca_cert);
    let (ok, body, err) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        ca,
        "--proxy-cert",
        path(&crt),
        "--proxy-key",
        path(&key),
        "--proxytunnel",
        &target,
    ])
    .await;
    assert!(ok, "{err}");
    assert!(body.contains("\"node\":\"node-a\""), "{body}");

    // Without a client certificate, or with an agent's (another CA): no tunnel.
    let (ok, _, err) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        ca,
        "--proxytunnel",
        &target,
    ])
    .await;
    assert!(!ok, "no client certificate: {err}");
    let (agent_crt, agent_key) = s.cluster.pki.agent("node-a");
    let (ok, _, err) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        ca,
        "--proxy-cert",
        path(&agent_crt),
        "--proxy-key",
        path(&agent_key),
        "--proxytunnel",
        &target,
    ])
    .await;
    assert!(!ok, "an agent's certificate opens nothing here: {err}");
}

/// A TCP port that forwards to `socket` (socat), for clients that cannot speak to a Unix
/// socket proxy themselves (curl's proxy options do not apply to `--unix-socket`).
struct Bridge {
    _socat: tokio::process::Child,
    addr: SocketAddr,
}

async fn bridge(socket: &Path) -> Bridge {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("socat")
        .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("UNIX-CONNECT:{}", path(socket)))
        .kill_on_drop(true)
        .spawn()
        .expect("socat runs; .ci/run installs it");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Bridge {
                _socat: child,
                addr,
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("socat never listened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_kubectl_through_the_unix_socket() {
    let s = setup().await;
    let bridge = bridge(&s.socket).await;
    let proxy = format!("http://{}", bridge.addr);
    let (ok, body, err) = curl(&[
        "--proxytunnel",
        "--proxy",
        &proxy,
        &format!("http://node-a:{}/pods", s.kubelet.http_addr.port()),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(body.contains("\"node\":\"node-a\""), "{body}");

    // kubectl, as the apiserver would reach a kubelet: https through the CONNECT tunnel.
    let kubeconfig = s.cluster.pki.dir().join("kubeconfig-egress");
    s.cluster
        .pki
        .write_proxy_kubeconfig(
            &kubeconfig,
            &format!("https://node-a:{}", s.kubelet.https_addr.port()),
            &proxy,
        )
        .expect("kubeconfig");
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--request-timeout", "20s", "get", "--raw", "/pods"])
        .output()
        .await
        .expect("kubectl runs; .ci/run installs it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"node\":\"node-a\""));
    drop(bridge);
}
