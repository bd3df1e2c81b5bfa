//! The server against a fake Kubernetes API server (`edge_tunnel_testkit::fake_kube`): node
//! records made from the Nodes and the tunnel Service, the ConfigMap CoreDNS reads them from
//! and the Service's ports, asserted on the wire: the fake records every request, and the
//! writes are compared byte for byte. Edge nodes carry `alibabacloud.com/is-edge-worker=true`
//! and resolve to the Service's ClusterIP 10.96.0.7; cloud nodes to their InternalIP, else
//! their ExternalIP.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use edge_tunnel_testkit::fake_kube::{FakeKube, Kind, Recorded};
use edge_tunnel_testkit::{TestCluster, TestPki, free_port_on, metric_value};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::time::Instant;
use tunnel_core::PortConfig;
use tunnel_core::route::config::FixedPorts;
use tunnel_server::ServerConfig;
use tunnel_server::config::KubeSource;

const NS: &str = "kube-system";
const SERVICE: &str = "x-tunnel-server-internal-svc";
const CONFIGMAP: &str = "edge-tunnel-nodes";
const SERVICE_IP: &str = "10.96.0.7";
const EDGE_LABEL: &str = "alibabacloud.com/is-edge-worker";
const KUBELET: u16 = 10250;
const KUBELET_READ_ONLY: u16 = 10255;
/// Longer than a write's wait for its batch (200 ms) plus the pause between two writes
/// (1 s): a write still due has happened by then.
const QUIET: Duration = Duration::from_millis(2500);
/// How long a wait for the server may take before the test fails (a liveness bound).
const WAIT: Duration = Duration::from_secs(15);
/// How long the server may take to come back to an API server that was down: two of the
/// watcher's backoffs, 30 s at most each.
const RECOVERY: Duration = Duration::from_secs(75);

fn node(name: &str, edge: bool, addresses: &[(&str, &str)]) -> Value {
    let labels = if edge {
        json!({ EDGE_LABEL: "true", "kubernetes.io/hostname": name })
    } else {
        json!({ "kubernetes.io/hostname": name })
    };
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(kind, address)| json!({ "type": kind, "address": address }))
        .collect();
    json!({
        "metadata": { "name": name, "labels": labels },
        "spec": {},
        "status": { "addresses": addresses },
    })
}

/// The tunnel Service, with `ports`.
fn service(ports: Value) -> Value {
    json!({
        "metadata": { "name": SERVICE, "namespace": NS },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": SERVICE_IP,
            "clusterIPs": [SERVICE_IP],
            "selector": { "app": "edge-tunnel-server" },
            "ports": ports,
        },
    })
}

/// A port someone else added to the tunnel Service: the server keeps it.
const FOREIGN: (u16, &str, u16) = (10265, "metrics", 10265);

/// Ports the configuration no longer matches: the kubelet's to the wrong front, one the
/// server once managed (`http-9999`), one of someone else's on a port number the server may
/// need (9100), and one of someone else's that stays ([`FOREIGN`]).
fn stale_ports() -> Value {
    json!([
        { "name": "https", "port": KUBELET, "protocol": "TCP", "targetPort": 10263 },
        { "name": "http-9999", "port": 9999, "protocol": "TCP", "targetPort": 10264 },
        { "name": "node-exporter", "port": 9100, "protocol": "TCP", "targetPort": 9100 },
        { "name": FOREIGN.1, "port": FOREIGN.0, "protocol": "TCP", "targetPort": FOREIGN.2 },
    ])
}

/// A server whose records come from `fake` (default Service and ConfigMap names, the
/// Service's ClusterIP for edge nodes), adjusted by `tweak`.
async fn server(fake: &FakeKube, dir: &Path, tweak: impl FnOnce(&mut ServerConfig)) -> TestCluster {
    let kubeconfig = fake.kubeconfig(dir);
    let pki = TestPki::new(&[("node-a", &[])]);
    TestCluster::start_with(pki, KUBELET, KUBELET_READ_ONLY, move |config| {
        config.dns.kubernetes = Some(KubeSource::Kubeconfig(kubeconfig));
        config.dns.tunnel_service_ip = None;
        tweak(config);
    })
    .await
}

/// A fake API server with edge-1 (edge), cloud-1 (InternalIP 192.168.0.10) and the tunnel
/// Service with stale ports.
async fn edge_and_cloud() -> FakeKube {
    let fake = FakeKube::start().await.expect("the fake API server starts");
    fake.apply(Kind::Node, node("edge-1", true, &[]));
    fake.apply(
        Kind::Node,
        node("cloud-1", false, &[("InternalIP", "192.168.0.10")]),
    );
    fake.apply(Kind::Service, service(stale_ports()));
    fake
}

/// A second replica beside `first`: the same certificates and front ports, on 127.0.0.2,
/// against the same fake API server, adjusted by `tweak`. A plain `Server` in a task: a
/// second `TestCluster` in one process would wait for the first one's lock.
struct SecondReplica {
    records: tunnel_server::dns::RecordsRx,
    ports: std::sync::Arc<tunnel_server::ports::Ports>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tunnel_server::ServerError>>,
}

impl SecondReplica {
    async fn start(
        first: &TestCluster,
        fake: &FakeKube,
        dir: &Path,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let mut config = TestCluster::server_config(&first.pki, KUBELET, KUBELET_READ_ONLY);
        config.bind_address = "127.0.0.2".parse().expect("ip");
        config.secure_port = first.secure_addr.port();
        config.insecure_port = first.insecure_addr.port();
        config.server_id = "test-server-2".into();
        config.dns.kubernetes = Some(KubeSource::Kubeconfig(fake.kubeconfig(dir)));
        tweak(&mut config);
        let server = tunnel_server::Server::bind(config)
            .await
            .expect("the second server binds");
        let records = server
            .dns_records()
            .expect("the second server makes records");
        let ports = server.ports();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Self {
            records,
            ports,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("the second server's task")
            .expect("the second server ran");
    }
}

fn records(cluster: &TestCluster) -> String {
    cluster
        .dns_records
        .as_ref()
        .expect("the server makes records")
        .borrow()
        .render()
}

fn configmap_content(fake: &FakeKube) -> Option<String> {
    let configmap = fake.get(Kind::ConfigMap, Some(NS), CONFIGMAP)?;
    configmap["data"]["tunnel-nodes"]
        .as_str()
        .map(str::to_owned)
}

/// Waits until the Service's ports are `want` (JSON).
async fn service_ports_become(fake: &FakeKube, want: &str) {
    let want: Value = serde_json::from_str(want).expect("ports as JSON");
    eventually("the Service's ports are set", || {
        let ports = service_ports(fake);
        if ports == want {
            Ok(())
        } else {
            Err(format!("{ports:#}"))
        }
    })
    .await;
}

fn service_ports(fake: &FakeKube) -> Value {
    fake.get(Kind::Service, Some(NS), SERVICE)
        .expect("the Service exists")["spec"]["ports"]
        .clone()
}

/// Polls `probe` until it gives a value, for at most [`WAIT`]; panics with `what` and what
/// the probe last saw.
async fn eventually<T>(what: &str, probe: impl FnMut() -> Result<T, String>) -> T {
    eventually_within(WAIT, what, probe).await
}

/// As [`eventually`], for at most `within`.
async fn eventually_within<T>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "{what} did not happen; last seen:\n{seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until both the published records and the ConfigMap hold `want`.
async fn records_and_configmap_become(cluster: &TestCluster, fake: &FakeKube, want: &str) {
    records_and_configmap_become_within(WAIT, cluster, fake, want).await;
}

/// As [`records_and_configmap_become`], for at most `within`.
async fn records_and_configmap_become_within(
    within: Duration,
    cluster: &TestCluster,
    fake: &FakeKube,
    want: &str,
) {
    eventually_within(
        within,
        "the records and the ConfigMap follow the cluster",
        || {
            let (published, stored) = (records(cluster), configmap_content(fake));
            if published == want && stored.as_deref() == Some(want) {
                Ok(())
            } else {
                Err(format!(
                    "records:\n{published}ConfigMap:\n{}",
                    stored.unwrap_or_else(|| "(none)".into())
                ))
            }
        },
    )
    .await;
}

fn show(requests: &[Recorded]) -> String {
    requests
        .iter()
        .map(|r| format!("  {r}\n"))
        .collect::<Vec<_>>()
        .concat()
}

/// The ConfigMap requests since the `from`-th request, as `METHOD path`.
fn configmap_requests(fake: &FakeKube, from: usize) -> Vec<String> {
    fake.requests()
        .get(from..)
        .unwrap_or_default()
        .iter()
        .filter(|r| r.kind() == Some(Kind::ConfigMap))
        .map(|r| format!("{} {}", r.method, r.path_only()))
        .collect()
}

/// The body of a merge patch that puts `content` under the records' key.
fn records_patch(content: &str) -> String {
    let quoted = serde_json::to_string(content).expect("a string serialises");
    format!(r#"{{"data":{{"tunnel-nodes":{quoted}}}}}"#)
}

/// Asserts that `writes` is one merge patch of the ConfigMap with exactly `body`.
fn assert_one_patch(writes: &[Recorded], body: &str) {
    assert_eq!(writes.len(), 1, "one ConfigMap write:\n{}", show(writes));
    let write = &writes[0];
    assert_eq!(write.method, "PATCH", "{write}");
    assert_eq!(
        write.path_only(),
        format!("/api/v1/namespaces/{NS}/configmaps/{CONFIGMAP}")
    );
    assert_eq!(
        write.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(write.body, body);
}

/// The Service ports as the server writes them: `(port, name, target)` and [`FOREIGN`],
/// sorted by port.
fn ports_json(ports: &[(u16, String, u16)]) -> String {
    let mut ports = ports.to_vec();
    ports.push((FOREIGN.0, FOREIGN.1.into(), FOREIGN.2));
    ports.sort_by_key(|(port, _, _)| *port);
    let items: Vec<String> = ports
        .iter()
        .map(|(port, name, target)| {
            format!(r#"{{"name":"{name}","port":{port},"protocol":"TCP","targetPort":{target}}}"#)
        })
        .collect();
    format!("[{}]", items.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configmap_and_the_service_ports_are_written_byte_for_byte() {
    let fake = FakeKube::start().await.expect("the fake API server starts");
    fake.apply(
        Kind::Node,
        node("edge-1", true, &[("InternalIP", "172.16.0.1")]),
    );
    fake.apply(Kind::Node, node("edge-2", true, &[]));
    fake.apply(
        Kind::Node,
        node(
            "cloud-1",
            false,
            &[
                ("Hostname", "cloud-1"),
                ("ExternalIP", "47.1.1.1"),
                ("InternalIP", "192.168.0.10"),
            ],
        ),
    );
    fake.apply(
        Kind::Node,
        node("cloud-2", false, &[("ExternalIP", "47.1.1.2")]),
    );
    fake.apply(Kind::Service, service(stale_ports()));

    // Every kind of Service port: the dnat pair's front is the HTTP front's port, so the
    // test picks that port; the https-proxy port is one the server listens on itself.
    let insecure = free_port_on(&["127.0.0.1"]);
    let https_proxy = free_port_on(&["127.0.0.1"]);
    let port_config = PortConfig::parse(
        [
            ("dnat-ports-pair", format!("9051={insecure}").as_str()),
            ("http-proxy-ports", "9100"),
            ("https-proxy-ports", https_proxy.to_string().as_str()),
        ],
        FixedPorts {
            http_front: insecure,
            kubelet: KUBELET,
            kubelet_read_only: KUBELET_READ_ONLY,
        },
    )
    .expect("the port configuration parses");
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = server(&fake, dir.path(), |config| {
        config.insecure_port = insecure;
        config.ports = Some(port_config);
    })
    .await;
    assert_eq!(cluster.insecure_addr.port(), insecure);
    let secure = cluster.secure_addr.port();

    let want = "10.96.0.7\tedge-1\n10.96.0.7\tedge-2\n192.168.0.10\tcloud-1\n47.1.1.2\tcloud-2\n";
    records_and_configmap_become(&cluster, &fake, want).await;
    let desired = ports_json(&[
        (KUBELET, "https".into(), secure),
        (KUBELET_READ_ONLY, "http".into(), insecure),
        (9051, "dnat-9051".into(), insecure),
        (9100, "http-9100".into(), insecure),
        (https_proxy, format!("https-{https_proxy}"), https_proxy),
    ]);
    service_ports_become(&fake, &desired).await;
    tokio::time::sleep(QUIET).await;

    // The ConfigMap: read, found missing, created, and nothing else.
    let requests = fake.requests();
    assert_eq!(
        configmap_requests(&fake, 0),
        [
            format!("GET /api/v1/namespaces/{NS}/configmaps/{CONFIGMAP}"),
            format!("POST /api/v1/namespaces/{NS}/configmaps"),
        ],
        "requests:\n{}",
        show(&requests)
    );
    let created = fake.writes(Kind::ConfigMap);
    assert_eq!(created[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(
        created[0].body,
        r#"{"apiVersion":"v1","kind":"ConfigMap","data":{"tunnel-nodes":"10.96.0.7\tedge-1\n10.96.0.7\tedge-2\n192.168.0.10\tcloud-1\n47.1.1.2\tcloud-2\n"},"metadata":{"name":"edge-tunnel-nodes"}}"#
    );

    // The Service: one merge patch of its ports, never a create.
    let service_writes = fake.writes(Kind::Service);
    assert_eq!(
        service_writes.len(),
        1,
        "one Service write:\n{}",
        show(&service_writes)
    );
    for patch in &service_writes {
        assert_eq!(patch.method, "PATCH", "{patch}");
        assert_eq!(
            patch.path_only(),
            format!("/api/v1/namespaces/{NS}/services/{SERVICE}")
        );
        assert_eq!(
            patch.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(patch.body, format!(r#"{{"spec":{{"ports":{desired}}}}}"#));
    }
    let stored = fake
        .get(Kind::Service, Some(NS), SERVICE)
        .expect("the Service");
    assert_eq!(stored["spec"]["clusterIP"], SERVICE_IP, "{stored}");
    assert_eq!(stored["spec"]["selector"]["app"], "edge-tunnel-server");

    // A Node added through the watch: one patch with the new content.
    let mark = fake.requests().len();
    fake.apply(
        Kind::Node,
        node("cloud-3", false, &[("InternalIP", "192.168.0.11")]),
    );
    let want = "10.96.0.7\tedge-1\n10.96.0.7\tedge-2\n192.168.0.10\tcloud-1\n192.168.0.11\tcloud-3\n47.1.1.2\tcloud-2\n";
    records_and_configmap_become(&cluster, &fake, want).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        configmap_requests(&fake, mark),
        [
            format!("GET /api/v1/namespaces/{NS}/configmaps/{CONFIGMAP}"),
            format!("PATCH /api/v1/namespaces/{NS}/configmaps/{CONFIGMAP}"),
        ]
    );
    let writes = fake.writes(Kind::ConfigMap);
    assert_one_patch(&writes[1..], &records_patch(want));

    // A cloud node labelled edge: its line moves to the Service's address.
    let mut relabelled = fake
        .get(Kind::Node, None, "cloud-1")
        .expect("cloud-1 exists");
    relabelled["metadata"]["labels"][EDGE_LABEL] = json!("true");
    fake.apply(Kind::Node, relabelled);
    let want = "10.96.0.7\tcloud-1\n10.96.0.7\tedge-1\n10.96.0.7\tedge-2\n192.168.0.11\tcloud-3\n47.1.1.2\tcloud-2\n";
    records_and_configmap_become(&cluster, &fake, want).await;
    tokio::time::sleep(QUIET).await;
    let writes = fake.writes(Kind::ConfigMap);
    assert_one_patch(&writes[2..], &records_patch(want));
    assert_eq!(
        fake.writes(Kind::Service).len(),
        service_writes.len(),
        "the ports were right"
    );
    let all = fake.requests();
    assert!(
        !all.iter()
            .any(|r| r.method == "POST" && r.kind() == Some(Kind::Service)),
        "the server never creates the Service:\n{}",
        show(&all)
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_watch_is_resumed_from_its_resource_version() {
    let fake = edge_and_cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = server(&fake, dir.path(), |_| {}).await;
    records_and_configmap_become(
        &cluster,
        &fake,
        "10.96.0.7\tedge-1\n192.168.0.10\tcloud-1\n",
    )
    .await;

    let node_watches = |fake: &FakeKube| -> Vec<Recorded> {
        fake.requests()
            .into_iter()
            .filter(|r| r.kind() == Some(Kind::Node) && r.is_watch())
            .collect()
    };
    let before = eventually("the Nodes are watched", || {
        let watches = node_watches(&fake);
        if watches.is_empty() {
            Err(show(&fake.requests()))
        } else {
            Ok(watches)
        }
    })
    .await;
    let revision = fake.revision();
    let broken = fake.break_watches();
    assert!(
        broken >= 2,
        "the Node and Service watches were open: {broken}"
    );
    // Changed before the watch is resumed: the server must get it from the resumed watch.
    fake.apply(
        Kind::Node,
        node("cloud-2", false, &[("InternalIP", "192.168.0.20")]),
    );
    records_and_configmap_become(
        &cluster,
        &fake,
        "10.96.0.7\tedge-1\n192.168.0.10\tcloud-1\n192.168.0.20\tcloud-2\n",
    )
    .await;

    let after = node_watches(&fake);
    let resumed = after.get(before.len()..).unwrap_or_default();
    assert!(
        !resumed.is_empty(),
        "a new watch of the Nodes:\n{}",
        show(&fake.requests())
    );
    let from: u64 = resumed[0]
        .query("resourceVersion")
        .and_then(|v| v.parse().ok())
        .expect("the watch names a resource version");
    assert!(
        from > 0 && from <= revision,
        "resumed from {from}, the revision before the change being {revision}"
    );
    let lists = fake
        .requests()
        .iter()
        .filter(|r| r.kind() == Some(Kind::Node) && r.is_list())
        .count();
    assert_eq!(lists, 1, "a resumed watch needs no new list");
    cluster.stop().await;
}

/// The IPv4 address the responder at `server` gives for `name` (one UDP query, no EDNS).
async fn resolve(server: SocketAddr, name: &str) -> Option<IpAddr> {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(u8::try_from(label.len()).expect("a short label"));
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    socket.send_to(&query, server).await.ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let answer = buf.get(..n)?;
    // One answer, an A record: its data is the last four bytes.
    let answers = u16::from_be_bytes([*answer.get(6)?, *answer.get(7)?]);
    let rcode = answer.get(3)? & 0x0f;
    if rcode != 0 || answers != 1 {
        return None;
    }
    let data: [u8; 4] = answer.get(n.checked_sub(4)?..)?.try_into().ok()?;
    Some(IpAddr::from(data))
}

fn watch_errors(text: &str) -> f64 {
    metric_value(
        text,
        "edge_tunnel_server_kube_watch_errors_total",
        &[("resource", "nodes")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_that_is_down_is_retried_with_backoff_while_the_records_stay() {
    let mut fake = edge_and_cloud().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The responder forwards other names to a port where nothing answers: only node names
    // are asked here.
    let nowhere = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = nowhere.local_addr().expect("addr");
    let cluster = server(&fake, dir.path(), |config| {
        config.dns.listen = Some("127.0.0.1:0".parse().expect("addr"));
        config.dns.upstream = vec![upstream];
    })
    .await;
    let responder = cluster.dns_addr.expect("the responder runs");
    let want = "10.96.0.7\tedge-1\n192.168.0.10\tcloud-1\n";
    records_and_configmap_become(&cluster, &fake, want).await;
    let errors_before = watch_errors(&cluster.scrape().await);

    fake.stop().await;
    let down = Instant::now();
    let text = cluster
        .scrape_until("the watch errors count the failed tries", |text| {
            watch_errors(text) >= errors_before + 2.0
        })
        .await;
    assert!(watch_errors(&text) >= errors_before + 2.0);
    // Changes while the API server is down, and a compaction: the server must list again.
    fake.apply(
        Kind::Node,
        node("cloud-2", false, &[("InternalIP", "192.168.0.20")]),
    );
    fake.delete(Kind::Node, None, "edge-1");
    fake.compact();
    // Down for five seconds in all; the records stay, and the responder answers from them.
    tokio::time::sleep_until(down + Duration::from_secs(5)).await;
    assert_eq!(records(&cluster), want, "the last records stay published");
    assert_eq!(
        resolve(responder, "edge-1").await,
        Some(SERVICE_IP.parse().expect("ip")),
        "the responder answers from the last records"
    );
    let text = cluster.scrape().await;
    let tries = watch_errors(&text) - errors_before;
    let seconds = down.elapsed().as_secs_f64();
    // With backoff from 0.8 s doubling (and jitter), five seconds hold three or four tries;
    // a retry loop without backoff would make hundreds.
    assert!(
        tries <= 1.0 + seconds,
        "{tries} failed tries of the Node watch in {seconds:.1} s: no backoff"
    );

    println!("figure: {tries} failed tries of the Node watch in {seconds:.1} s down");

    let mark = fake.requests().len();
    fake.restart()
        .await
        .expect("the fake API server starts again");
    let up = Instant::now();
    let want = "192.168.0.10\tcloud-1\n192.168.0.20\tcloud-2\n";
    // The watcher's next try comes after its backoff (0.8 s doubling, with jitter, up to
    // 30 s); its watch then gets 410 Gone, an error too, and the list follows one more
    // backoff later: after five seconds down, that can take some twenty seconds.
    records_and_configmap_become_within(RECOVERY, &cluster, &fake, want).await;
    println!(
        "figure: records and ConfigMap follow the API server {:?} after it is back",
        up.elapsed()
    );
    let since: Vec<Recorded> = fake.requests().split_off(mark);
    let relisted = since
        .iter()
        .any(|r| r.kind() == Some(Kind::Node) && r.is_list());
    assert!(
        relisted,
        "the Nodes are listed again after 410 Gone:\n{}",
        show(&since)
    );
    assert_eq!(resolve(responder, "edge-1").await, None, "edge-1 is gone");
    assert_eq!(
        resolve(responder, "cloud-2").await,
        Some("192.168.0.20".parse().expect("ip"))
    );
    cluster.stop().await;
}

/// The address of the `i`-th of many nodes.
fn many_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256)
}

/// The name of the `i`-th of many nodes: not in the order of `i`.
fn many_name(i: usize) -> String {
    format!("node-{:04}", (i * 7919) % 5000)
}

/// 5,000 Nodes (every third an edge node) and the tunnel Service in `fake`; returns the
/// records they make.
fn five_thousand_nodes(fake: &FakeKube) -> String {
    let mut want: Vec<String> = Vec::new();
    for i in 0..5000 {
        let name = many_name(i);
        let edge = i % 3 == 0;
        fake.apply(
            Kind::Node,
            node(&name, edge, &[("InternalIP", &many_ip(i))]),
        );
        let ip = if edge {
            SERVICE_IP.to_owned()
        } else {
            many_ip(i)
        };
        want.push(format!("{ip}\t{name}\n"));
    }
    fake.apply(Kind::Service, service(stale_ports()));
    want.sort();
    want.concat()
}

/// Each write as `METHOD, bytes`.
fn summary(writes: &[Recorded]) -> Vec<String> {
    writes
        .iter()
        .map(|w| format!("{} {} bytes", w.method, w.body.len()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_nodes_are_listed_in_pages_and_written_once() {
    let fake = FakeKube::start().await.expect("the fake API server starts");
    let want = five_thousand_nodes(&fake);
    assert_eq!(want.lines().count(), 5000);
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = server(&fake, dir.path(), |_| {}).await;
    records_and_configmap_become(&cluster, &fake, &want).await;
    tokio::time::sleep(QUIET).await;
    let writes = fake.writes(Kind::ConfigMap);
    assert_eq!(writes.len(), 1, "one write: {:?}", summary(&writes));
    assert_eq!(writes[0].method, "POST");
    let created: Value = serde_json::from_str(&writes[0].body).expect("JSON");
    assert_eq!(created["data"]["tunnel-nodes"], want.as_str());
    let pages: Vec<Recorded> = fake
        .requests()
        .into_iter()
        .filter(|r| r.kind() == Some(Kind::Node) && r.is_list())
        .collect();
    assert_eq!(pages.len(), 10, "pages of 500:\n{}", show(&pages));
    assert!(
        pages
            .iter()
            .all(|p| p.query("limit").as_deref() == Some("500"))
    );
    assert!(pages[1..].iter().all(|p| p.query("continue").is_some()));
    cluster.stop().await;
}

/// A burst of Node changes is one ConfigMap write, however slowly it reaches the records (a
/// busy machine spreads it over several publishes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_a_hundred_node_changes_among_five_thousand_is_one_write() {
    let fake = FakeKube::start().await.expect("the fake API server starts");
    let want = five_thousand_nodes(&fake);
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = server(&fake, dir.path(), |_| {}).await;
    records_and_configmap_become(&cluster, &fake, &want).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(fake.writes(Kind::ConfigMap).len(), 1);

    // A hundred changes at once: fifty new cloud nodes, fifty edge nodes moved to the cloud.
    let mut changed: Vec<(String, String)> = (0..50)
        .map(|i| (format!("late-{i:02}"), format!("172.16.0.{i}")))
        .collect();
    changed.extend((0..150).step_by(3).map(|i| (many_name(i), many_ip(i))));
    let mut lines: Vec<String> = want
        .lines()
        .filter(|line| {
            let name = line.split('\t').nth(1).unwrap_or_default();
            !changed.iter().any(|(n, _)| n == name)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    lines.extend(changed.iter().map(|(name, ip)| format!("{ip}\t{name}\n")));
    lines.sort();
    let want = lines.concat();
    for (name, ip) in &changed {
        fake.apply(Kind::Node, node(name, false, &[("InternalIP", ip)]));
    }
    records_and_configmap_become(&cluster, &fake, &want).await;
    tokio::time::sleep(QUIET).await;
    let writes = fake.writes(Kind::ConfigMap);
    // How many of the hundred changes each write carried.
    let carried: Vec<usize> = writes[1..]
        .iter()
        .map(|w| {
            changed
                .iter()
                .filter(|(name, ip)| w.body.contains(&format!("{ip}\\t{name}\\n")))
                .count()
        })
        .collect();
    assert_eq!(
        writes.len(),
        2,
        "one more write for the batch: {:?}, carrying {carried:?} of the 100 changes",
        summary(&writes)
    );
    assert_one_patch(&writes[1..], &records_patch(&want));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_write_the_same_bytes_and_never_fight() {
    let fake = edge_and_cloud().await;
    // A ConfigMap with stale records and a key of someone else's, which must stay.
    fake.apply(
        Kind::ConfigMap,
        json!({
            "metadata": { "name": CONFIGMAP, "namespace": NS },
            "data": { "tunnel-nodes": "10.0.0.1\tgone\n", "Corefile.extra": "log\n" },
        }),
    );

    // Two replicas of one Deployment: the same front ports, on two addresses.
    let secure = free_port_on(&["127.0.0.1", "127.0.0.2"]);
    let insecure = free_port_on(&["127.0.0.1", "127.0.0.2"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let first = server(&fake, dir.path(), |config| {
        config.secure_port = secure;
        config.insecure_port = insecure;
    })
    .await;
    let second = SecondReplica::start(&first, &fake, dir.path(), |_| {}).await;
    let second_records = second.records.clone();

    let want = "10.96.0.7\tedge-1\n192.168.0.10\tcloud-1\n";
    records_and_configmap_become(&first, &fake, want).await;
    eventually("the second server publishes the same records", || {
        let published = second_records.borrow().render();
        if published == want {
            Ok(())
        } else {
            Err(published)
        }
    })
    .await;
    // No http-proxy port 9100 here: that one of someone else's stays too.
    let desired = ports_json(&[
        (KUBELET, "https".into(), secure),
        (KUBELET_READ_ONLY, "http".into(), insecure),
        (9100, "node-exporter".into(), 9100),
    ]);
    service_ports_become(&fake, &desired).await;
    tokio::time::sleep(QUIET).await;
    let configmap_writes = fake.writes(Kind::ConfigMap);
    let service_writes = fake.writes(Kind::Service);
    // Each replica writes at most once, and the same bytes.
    assert!(
        (1..=2).contains(&configmap_writes.len()),
        "{}",
        show(&configmap_writes)
    );
    for write in &configmap_writes {
        assert_eq!(write.method, "PATCH", "{write}");
        assert_eq!(write.body, records_patch(want), "{write}");
    }
    assert!(
        (1..=2).contains(&service_writes.len()),
        "{}",
        show(&service_writes)
    );
    for write in &service_writes {
        assert_eq!(
            write.body,
            format!(r#"{{"spec":{{"ports":{desired}}}}}"#),
            "{write}"
        );
    }
    let stored = fake
        .get(Kind::ConfigMap, Some(NS), CONFIGMAP)
        .expect("the ConfigMap");
    assert_eq!(stored["data"]["Corefile.extra"], "log\n", "{stored}");

    // Settled: neither writes again.
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        fake.writes(Kind::ConfigMap).len(),
        configmap_writes.len(),
        "{}",
        show(&fake.writes(Kind::ConfigMap))
    );
    assert_eq!(
        fake.writes(Kind::Service).len(),
        service_writes.len(),
        "{}",
        show(&fake.writes(Kind::Service))
    );

    // A change: both see it, the ConfigMap gets the same bytes at most once from each.
    fake.apply(
        Kind::Node,
        node("cloud-2", false, &[("ExternalIP", "47.1.1.2")]),
    );
    let want = "10.96.0.7\tedge-1\n192.168.0.10\tcloud-1\n47.1.1.2\tcloud-2\n";
    records_and_configmap_become(&first, &fake, want).await;
    tokio::time::sleep(QUIET).await;
    let later = fake
        .writes(Kind::ConfigMap)
        .split_off(configmap_writes.len());
    assert!((1..=2).contains(&later.len()), "{}", show(&later));
    for write in &later {
        assert_eq!(write.body, records_patch(want), "{write}");
    }
    assert_eq!(second_records.borrow().render(), want);
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        fake.writes(Kind::ConfigMap).len(),
        configmap_writes.len() + later.len(),
        "no write after the change settled"
    );
    assert_eq!(fake.writes(Kind::Service).len(), service_writes.len());

    second.stop().await;
    first.stop().await;
}

/// One request to the fake on a fresh connection: the status and the body as JSON (`null`
/// when it is not JSON).
async fn call(
    fake: &FakeKube,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let response = send(fake, method, path, content_type, body).await;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("the whole body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn send(
    fake: &FakeKube,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> http::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(fake.addr())
        .await
        .expect("the fake accepts");
    let mut sender = edge_tunnel_testkit::client::http1(tcp)
        .await
        .expect("an HTTP/1 connection");
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "fake");
    if !content_type.is_empty() {
        request = request.header(http::header::CONTENT_TYPE, content_type);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a request");
    sender.send_request(request).await.expect("an answer")
}

/// The next line of a watch, `Err` when the stream failed, `Ok(None)` when it ended cleanly.
async fn next_line(body: &mut hyper::body::Incoming) -> Result<Option<Value>, String> {
    let frame = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the watch says something");
    match frame {
        None => Ok(None),
        Some(Err(e)) => Err(e.to_string()),
        Some(Ok(frame)) => {
            let data = frame.into_data().expect("data");
            Ok(Some(serde_json::from_slice(&data).expect("a JSON line")))
        }
    }
}

fn assert_status(answer: &(u16, Value), code: u16, reason: &str) {
    let (status, body) = answer;
    assert_eq!(*status, code, "{body}");
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
}

#[tokio::test]
async fn the_fake_api_server_answers_odd_requests_with_a_status_and_carries_on() {
    let fake = FakeKube::start().await.expect("the fake API server starts");
    let cms = "/api/v1/namespaces/ns/configmaps";
    let merge = "application/merge-patch+json";
    assert_status(
        &call(&fake, "GET", &format!("{cms}/a"), "", "").await,
        404,
        "NotFound",
    );
    let created = call(
        &fake,
        "POST",
        cms,
        "application/json",
        r#"{"metadata":{"name":"a"},"data":{"k":"v","x":"y"}}"#,
    )
    .await;
    assert_eq!(created.0, 201, "{}", created.1);
    let revision = created.1["metadata"]["resourceVersion"]
        .as_str()
        .expect("a resource version")
        .to_owned();
    let again = call(
        &fake,
        "POST",
        cms,
        "application/json",
        r#"{"metadata":{"name":"a"}}"#,
    )
    .await;
    assert_status(&again, 409, "AlreadyExists");

    // A watch from the creation sees the patch, then a change made by the test.
    let watch = format!("{cms}?watch=true&resourceVersion={revision}&timeoutSeconds=60");
    let mut watching = send(&fake, "GET", &watch, "", "").await;
    assert_eq!(watching.status(), 200);
    let patched = call(
        &fake,
        "PATCH",
        &format!("{cms}/a"),
        merge,
        r#"{"data":{"k":null,"n":"m"}}"#,
    )
    .await;
    assert_eq!(patched.0, 200, "{}", patched.1);
    assert_eq!(patched.1["data"], json!({ "x": "y", "n": "m" }));
    let event = next_line(watching.body_mut())
        .await
        .expect("a line")
        .expect("an event");
    assert_eq!(event["type"], "MODIFIED", "{event}");
    assert_eq!(event["object"]["data"]["n"], "m", "{event}");
    fake.apply(
        Kind::ConfigMap,
        json!({ "metadata": { "name": "b", "namespace": "ns" } }),
    );
    let event = next_line(watching.body_mut())
        .await
        .expect("a line")
        .expect("an event");
    assert_eq!(event["type"], "ADDED", "{event}");
    assert_eq!(fake.break_watches(), 1);
    assert!(
        next_line(watching.body_mut()).await.is_err(),
        "a broken watch ends abruptly, not with the end of its body"
    );

    // Odd requests: a Status each, and the fake carries on.
    let odd = [
        (
            "PATCH",
            format!("{cms}/a"),
            "application/strategic-merge-patch+json",
            "{}",
            415,
            "UnsupportedMediaType",
        ),
        (
            "PATCH",
            format!("{cms}/a"),
            merge,
            r#"{"metadata":{"resourceVersion":"1"}}"#,
            409,
            "Conflict",
        ),
        ("PATCH", format!("{cms}/a"), merge, "[1]", 400, "BadRequest"),
        ("PATCH", format!("{cms}/zz"), merge, "{}", 404, "NotFound"),
        (
            "POST",
            cms.to_owned(),
            "application/json",
            "{not json",
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.to_owned(),
            "application/json",
            r#"{"metadata":{}}"#,
            422,
            "Invalid",
        ),
        (
            "POST",
            cms.to_owned(),
            "application/json",
            r#"{"kind":"Node","metadata":{"name":"c"}}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            cms.to_owned(),
            "application/json",
            r#"{"metadata":{"name":"c","namespace":"other"}}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/api/v1/configmaps".to_owned(),
            "application/json",
            r#"{"metadata":{"name":"c"}}"#,
            405,
            "MethodNotAllowed",
        ),
        (
            "PUT",
            format!("{cms}/a"),
            "application/json",
            "{}",
            405,
            "MethodNotAllowed",
        ),
        (
            "GET",
            format!("{cms}?labelSelector=a%3Db"),
            "",
            "",
            400,
            "BadRequest",
        ),
        (
            "GET",
            format!("{cms}?fieldSelector=spec.x%3Dy"),
            "",
            "",
            400,
            "BadRequest",
        ),
        (
            "GET",
            format!("{cms}?limit=lots"),
            "",
            "",
            400,
            "BadRequest",
        ),
        (
            "GET",
            format!("{cms}?limit=1&continue=%ZZ%7C"),
            "",
            "",
            400,
            "BadRequest",
        ),
        (
            "GET",
            format!("{cms}?watch=true&resourceVersion=x"),
            "",
            "",
            400,
            "BadRequest",
        ),
        (
            "GET",
            format!("{cms}?watch=1&sendInitialEvents=true"),
            "",
            "",
            400,
            "BadRequest",
        ),
        ("GET", "/api/v1/pods".to_owned(), "", "", 404, "NotFound"),
        (
            "GET",
            "/api/v1/namespaces/%ZZ/configmaps/%FF%FE".to_owned(),
            "",
            "",
            404,
            "NotFound",
        ),
        ("GET", "/healthz".to_owned(), "", "", 404, "NotFound"),
    ];
    for (method, path, content_type, body, code, reason) in &odd {
        let answer = call(&fake, method, path, content_type, body).await;
        assert_eq!(answer.0, *code, "{method} {path} {body}: {}", answer.1);
        assert_status(&answer, *code, reason);
    }

    // Pages: one item each, the continue token leading to the next.
    let (status, page) = call(&fake, "GET", &format!("{cms}?limit=1"), "", "").await;
    assert_eq!(status, 200);
    assert_eq!(page["kind"], "ConfigMapList");
    assert_eq!(page["items"][0]["metadata"]["name"], "a");
    let token = page["metadata"]["continue"]
        .as_str()
        .expect("a continue token");
    let next = format!("{cms}?limit=1&continue={}", token.replace('|', "%7C"));
    let (_, page) = call(&fake, "GET", &next, "", "").await;
    assert_eq!(page["items"][0]["metadata"]["name"], "b");
    assert!(page["metadata"].get("continue").is_none(), "{page}");

    // After a compaction, a watch from before it gets 410 Gone and ends.
    fake.compact();
    let mut gone = send(&fake, "GET", &watch, "", "").await;
    assert_eq!(gone.status(), 200);
    let event = next_line(gone.body_mut())
        .await
        .expect("a line")
        .expect("an event");
    assert_eq!(event["type"], "ERROR", "{event}");
    assert_eq!(event["object"]["code"], 410, "{event}");
    assert_eq!(next_line(gone.body_mut()).await, Ok(None));

    let (status, _) = call(&fake, "GET", &format!("{cms}/a"), "", "").await;
    assert_eq!(status, 200, "the fake still serves");
    // Every request is recorded, odd ones included.
    assert_eq!(fake.requests().len(), 9 + odd.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_whose_port_configurations_differ_pause_instead_of_taking_turns() {
    let fake = FakeKube::start().await.expect("the fake API server starts");
    fake.apply(Kind::Node, node("edge-1", true, &[]));
    fake.apply(Kind::Service, service(stale_ports()));
    let secure = free_port_on(&["127.0.0.1", "127.0.0.2"]);
    let insecure = free_port_on(&["127.0.0.1", "127.0.0.2"]);
    let fixed = FixedPorts {
        http_front: insecure,
        kubelet: KUBELET,
        kubelet_read_only: KUBELET_READ_ONLY,
    };
    let with_9100 = PortConfig::parse([("http-proxy-ports", "9100")], fixed)
        .expect("the port configuration parses");
    let dir = tempfile::tempdir().expect("tempdir");
    // The first replica has read a ConfigMap that serves 9100; the second not yet.
    let first = server(&fake, dir.path(), |config| {
        config.secure_port = secure;
        config.insecure_port = insecure;
        config.ports = Some(with_9100.clone());
    })
    .await;
    let second = SecondReplica::start(&first, &fake, dir.path(), |config| {
        config.ports = Some(PortConfig::new(fixed));
        config.dns.configmap = None;
    })
    .await;

    // Each wants its own ports: they disagree for as long as the kubelet takes to update the
    // second one's copy of the ConfigMap. Writes slow down instead of alternating as fast as
    // the API answers (thousands in a few seconds).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let contested = fake.writes(Kind::Service).len();
    println!("figure: {contested} Service writes in 6 s while two replicas disagree");
    assert!(
        (2..=16).contains(&contested),
        "{contested} Service writes in 6 s:\n{}",
        show(&fake.writes(Kind::Service))
    );
    let metrics = first.scrape().await;
    assert!(
        metric_value(
            &metrics,
            "edge_tunnel_server_kube_service_port_writes_total",
            &[("result", "contested")]
        ) >= 1.0,
        "{metrics}"
    );

    // The second replica reads the new ConfigMap: they agree, the Service gets those ports
    // and nobody writes again.
    second.ports.set(with_9100);
    let desired = ports_json(&[
        (9100, "http-9100".into(), insecure),
        (KUBELET, "https".into(), secure),
        (KUBELET_READ_ONLY, "http".into(), insecure),
    ]);
    // The longest pause so far was a few seconds; the replicas agree within it.
    eventually_within(
        Duration::from_secs(40),
        "the Service's ports settle",
        || {
            let ports = service_ports(&fake).to_string();
            if ports == desired { Ok(()) } else { Err(ports) }
        },
    )
    .await;
    let settled = fake.writes(Kind::Service).len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        fake.writes(Kind::Service).len(),
        settled,
        "writes after the replicas agreed:\n{}",
        show(&fake.writes(Kind::Service))
    );
    assert_eq!(service_ports(&fake).to_string(), desired);

    second.stop().await;
    first.stop().await;
}
