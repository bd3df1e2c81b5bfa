//! Real clients through the tunnel: curl and kubectl, as operators and the apiserver use them.
//! `.ci/run` installs both; a missing tool fails the test with a message saying so.

use std::process::Output;

use edge_tunnel_testkit::{FakeKubelet, TestCluster};
use tokio::process::Command;

async fn run(cmd: &mut Command, tool: &str) -> Output {
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("{tool} not runnable ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "{tool} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn setup() -> (TestCluster, FakeKubelet, edge_tunnel_testkit::AgentHandle) {
    let (cluster, kubelet) = TestCluster::with_kubelet(&[("node-a", &[])], |_| {}).await;
    let (agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    (cluster, kubelet, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_mtls_through_the_tls_front() {
    let (cluster, kubelet, _agent) = setup().await;
    let out = run(
        Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--max-time", "20"])
            .args(cluster.pki.curl_apiserver_args())
            .arg("--connect-to")
            .arg(format!(
                "node-a:10250:127.0.0.1:{}",
                cluster.secure_addr.port()
            ))
            .arg("https://node-a:10250/metrics"),
        "curl",
    )
    .await;
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("kubelet_running_pods{node=\"node-a\"} 12"),
        "{body}"
    );
    assert_eq!(
        kubelet.client_subjects(),
        vec!["kube-apiserver-kubelet-client".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_http_front_as_a_proxy() {
    let (cluster, kubelet, _agent) = setup().await;
    let out = run(
        Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--fail",
                "--max-time",
                "20",
                "--proxy",
            ])
            .arg(format!("http://{}", cluster.insecure_addr))
            .arg(format!("http://node-a:{}/pods", kubelet.http_addr.port())),
        "curl",
    )
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"node\":\"node-a\""));
    // An unknown node: curl sees the 503 and its one-line reason.
    let out = Command::new("curl")
        .args([
            "--silent",
            "--max-time",
            "20",
            "--write-out",
            "\n%{http_code}",
            "--proxy",
        ])
        .arg(format!("http://{}", cluster.insecure_addr))
        .arg("http://node-zz/pods")
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "edge-tunnel: no agent connected for node node-zz: check that edge-tunnel-agent runs on that node and is connected (its log says why not)\n\n503"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_raw_through_the_tls_front() {
    let (cluster, kubelet, _agent) = setup().await;
    let kubeconfig = cluster.pki.dir().join("kubeconfig");
    cluster
        .pki
        .write_kubeconfig(
            &kubeconfig,
            &format!("https://127.0.0.1:{}", cluster.secure_addr.port()),
            "node-a",
        )
        .unwrap();
    for (path, want) in [
        ("/metrics", "kubelet_running_pods{node=\"node-a\"} 12"),
        ("/pods", "\"kind\":\"PodList\""),
        (
            "/containerLogs/default/web-1/app",
            "log of /containerLogs/default/web-1/app on node-a",
        ),
    ] {
        let out = run(
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["--request-timeout", "20s", "get", "--raw", path]),
            "kubectl",
        )
        .await;
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.contains(want), "{path}: {body}");
    }
    assert!(
        kubelet
            .client_subjects()
            .iter()
            .all(|s| s == "kube-apiserver-kubelet-client")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_with_the_http_front_as_proxy_url() {
    let (cluster, kubelet, _agent) = setup().await;
    let kubeconfig = cluster.pki.dir().join("kubeconfig-proxy");
    cluster
        .pki
        .write_proxy_kubeconfig(
            &kubeconfig,
            &format!("https://node-a:{}", kubelet.https_addr.port()),
            &format!("http://{}", cluster.insecure_addr),
        )
        .unwrap();
    let out = run(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--request-timeout", "20s", "get", "--raw", "/pods"]),
        "kubectl",
    )
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"node\":\"node-a\""));
    let text = cluster.scrape().await;
    // kubectl may open more than one connection; each went through CONNECT.
    let connects = edge_tunnel_testkit::metric_value(
        &text,
        "edge_tunnel_server_streams_total",
        &[("front", "connect"), ("result", "ok")],
    );
    assert!(
        connects >= 1.0,
        "the request went through CONNECT ({connects})"
    );
}
