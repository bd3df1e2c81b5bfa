//! Cluster DNS without a cluster, with real resolvers: `dig` against the embedded responder,
//! dnsmasq as its upstream, and dnsmasq reading the hosts file (`--hostsdir`) as CoreDNS's
//! hosts plugin reads the ConfigMap. Edge node names resolve to the tunnel Service's address
//! (`--tunnel-service-ip`, here 10.96.0.7) once their agent connects.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use edge_tunnel_testkit::tools::{dnsmasq, program};
use edge_tunnel_testkit::{TestCluster, TestPki, metric_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::process::Command;

const SERVICE_IP: &str = "10.96.0.7";

/// What dig printed of one answer.
#[derive(Debug)]
struct Dig {
    /// `NOERROR`, `NXDOMAIN`…; empty when no answer came.
    status: String,
    /// The header flags (`qr`, `aa`, `tc`…).
    flags: Vec<String>,
    /// Each answer record's type and data.
    answers: Vec<(String, String)>,
    /// The whole output, for failure messages.
    text: String,
}

/// `dig @server ARGS` with one try; `+tcp`, `+noedns` etc. may be among `args`.
async fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let output = Command::new(program("dig"))
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args([
            "+tries=1",
            "+time=2",
            "+noall",
            "+comments",
            "+answer",
            "+ignore",
        ])
        .args(args)
        .output()
        .await
        .expect("dig runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_default()
        .to_owned();
    let flags = text
        .split(";; flags: ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() >= 5).then(|| (fields[3].to_owned(), fields[4..].join(" ")))
        })
        .collect();
    Dig {
        status,
        flags,
        answers,
        text,
    }
}

/// Asks until `ok` holds of the answer, for at most `within`; returns how long it took.
async fn dig_until(
    server: SocketAddr,
    args: &[&str],
    within: Duration,
    ok: impl Fn(&Dig) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let answer = dig(server, args).await;
        if ok(&answer) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "dig {args:?} @{server} still gives, after {within:?}:\n{}",
            answer.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn a_record(ip: &str) -> impl Fn(&Dig) -> bool + '_ {
    move |d: &Dig| d.status == "NOERROR" && d.answers == [("A".to_owned(), ip.to_owned())]
}

/// A server with the embedded responder on 127.0.0.1 (forwarding to `upstream`, on loopback:
/// the machine's own resolver is never asked) and the hosts file at `hosts_file`; agents'
/// nodes resolve to [`SERVICE_IP`].
async fn cluster(nodes: &[&str], upstream: SocketAddr, hosts_file: Option<&Path>) -> TestCluster {
    let hosts_file = hosts_file.map(Path::to_owned);
    cluster_with(nodes, upstream, move |c| c.dns.hosts_file = hosts_file).await
}

/// As [`cluster`], adjusted by `tweak`.
async fn cluster_with(
    nodes: &[&str],
    upstream: SocketAddr,
    tweak: impl FnOnce(&mut tunnel_server::ServerConfig),
) -> TestCluster {
    let ip: IpAddr = "127.0.0.1".parse().expect("ip");
    let entries: Vec<(&str, &[IpAddr])> = nodes
        .iter()
        .map(|n| (*n, std::slice::from_ref(&ip)))
        .collect();
    let pki = TestPki::new(&entries);
    TestCluster::start_with(pki, 10250, 10255, move |c| {
        c.dns.tunnel_service_ip = Some(SERVICE_IP.parse().expect("ip"));
        c.dns.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.dns.upstream = vec![upstream];
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn a_node_resolves_once_its_agent_connects_and_other_names_go_upstream() {
    let long = "x".repeat(200);
    let (_upstream, upstream) = dnsmasq(&[
        "--address=/upstream.test/192.0.2.1".into(),
        // Three 200-byte strings: more than a 512-byte UDP answer without EDNS can hold.
        format!("--txt-record=big.test,\"{long}\",\"{long}\",\"{long}\""),
    ])
    .await;
    let cluster = cluster(&["node-a", "node-b"], upstream, None).await;
    let dns = cluster.dns_addr.expect("the responder listens");

    // Not a node yet: the upstream's answer (it knows no such name).
    let before = dig(dns, &["node-a", "A"]).await;
    assert!(before.answers.is_empty(), "{}", before.text);
    assert_ne!(before.status, "", "{}", before.text);

    let (agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let took = dig_until(
        dns,
        &["node-a", "A"],
        Duration::from_secs(2),
        a_record(SERVICE_IP),
    )
    .await;
    println!(
        "figure: node-a resolves through the responder {took:?} after its agent is registered"
    );

    let page = cluster.dns_page().await;
    assert_eq!(page["source"], "agents", "{page:#}");
    assert_eq!(
        page["records"],
        serde_json::json!({ "node-a": [SERVICE_IP] }),
        "{page:#}"
    );

    // Authoritative, any case, over TCP too; a node's other types are NODATA, not NXDOMAIN.
    let answer = dig(dns, &["NODE-A.", "A"]).await;
    assert!(a_record(SERVICE_IP)(&answer), "{}", answer.text);
    assert!(answer.flags.contains(&"aa".to_owned()), "{}", answer.text);
    let tcp = dig(dns, &["+tcp", "node-a", "A"]).await;
    assert!(a_record(SERVICE_IP)(&tcp), "{}", tcp.text);
    let aaaa = dig(dns, &["node-a", "AAAA"]).await;
    assert_eq!(
        (aaaa.status.as_str(), aaaa.answers.len()),
        ("NOERROR", 0),
        "{}",
        aaaa.text
    );
    // node-b has no agent: not a record.
    let b = dig(dns, &["node-b", "A"]).await;
    assert!(b.answers.is_empty(), "{}", b.text);

    // Everything else is the upstream's answer, over UDP and TCP.
    let forwarded = dig(dns, &["upstream.test", "A"]).await;
    assert!(a_record("192.0.2.1")(&forwarded), "{}", forwarded.text);
    let forwarded = dig(dns, &["+tcp", "upstream.test", "A"]).await;
    assert!(a_record("192.0.2.1")(&forwarded), "{}", forwarded.text);

    // A large answer over UDP without EDNS is truncated (TC), as resolvers expect, and whole
    // over TCP.
    let udp = dig(dns, &["+noedns", "big.test", "TXT"]).await;
    assert!(udp.flags.contains(&"tc".to_owned()), "{}", udp.text);
    let whole = dig(dns, &["+tcp", "big.test", "TXT"]).await;
    assert_eq!(whole.answers.len(), 1, "{}", whole.text);
    assert_eq!(
        whole.answers[0].1.matches(&long).count(),
        3,
        "{}",
        whole.text
    );

    // The agent goes: so does its record.
    agent.stop().await.expect("agent stops");
    dig_until(dns, &["node-a", "A"], Duration::from_secs(5), |d| {
        d.answers.is_empty()
    })
    .await;

    let metrics = cluster.scrape().await;
    assert!(
        metric_value(
            &metrics,
            "edge_tunnel_server_dns_queries_total",
            &[("answer", "node")]
        ) >= 4.0,
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "edge_tunnel_server_dns_queries_total",
            &[("answer", "forwarded")]
        ) >= 4.0,
        "{metrics}"
    );
    cluster.stop().await;
}

/// A DNS header with `id`, RD set, one question, and `rest` after it.
fn message(id: u16, rest: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(rest);
    m
}

/// The id and RCODE of a response.
fn id_and_rcode(response: &[u8]) -> (u16, u8) {
    assert!(response.len() >= 12, "short response {response:?}");
    (
        u16::from_be_bytes([response[0], response[1]]),
        response[3] & 0x0f,
    )
}

const FORMERR: u8 = 1;

#[tokio::test]
async fn malformed_queries_get_formerr_and_the_responder_carries_on() {
    let (_upstream, upstream) = dnsmasq(&["--address=/upstream.test/192.0.2.1".into()]).await;
    let cluster = cluster(&["node-a"], upstream, None).await;
    let dns = cluster.dns_addr.expect("the responder listens");
    let (_agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    dig_until(
        dns,
        &["node-a", "A"],
        Duration::from_secs(2),
        a_record(SERVICE_IP),
    )
    .await;

    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    udp.connect(dns).await.expect("connect");
    let garbage: [&[u8]; 4] = [
        // A label longer than the message.
        &[63, b'a', b'b'],
        // A compression pointer to itself.
        &[0xc0, 12, 0, 1, 0, 1],
        // No question at all where one is announced.
        &[],
        // A name, then a truncated type.
        &[6, b'n', b'o', b'd', b'e', b'-', b'a', 0, 0],
    ];
    for (i, rest) in garbage.iter().enumerate() {
        let id = 0x4000 + i as u16;
        udp.send(&message(id, rest)).await.expect("send");
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(2), udp.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer to malformed query {i}: dropped silently"))
            .expect("recv");
        assert_eq!(id_and_rcode(&buf[..n]), (id, FORMERR), "query {i}");
    }
    // Less than a header cannot be answered (no id to answer to): it is dropped.
    udp.send(&[0x12, 0x34, 0x01]).await.expect("send");

    // Over TCP: the same garbage, length-prefixed, gets FORMERR too.
    let mut tcp = TcpStream::connect(dns).await.expect("tcp");
    let query = message(0x5000, garbage[1]);
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    tcp.write_all(&framed).await.expect("write");
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(2), tcp.read_exact(&mut len))
        .await
        .expect("a TCP answer")
        .expect("read");
    let mut response = vec![0u8; u16::from_be_bytes(len).into()];
    tcp.read_exact(&mut response).await.expect("read");
    assert_eq!(id_and_rcode(&response), (0x5000, FORMERR));

    // Unharmed: good queries still get their answers.
    let after = dig(dns, &["node-a", "A"]).await;
    assert!(a_record(SERVICE_IP)(&after), "{}", after.text);
    let other = dig(dns, &["upstream.test", "A"]).await;
    assert!(a_record("192.0.2.1")(&other), "{}", other.text);
    cluster.stop().await;
}

#[tokio::test]
async fn dnsmasq_reading_the_hosts_file_resolves_a_newly_connected_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = dir.path().join("tunnel-nodes");
    let (_upstream, upstream) = dnsmasq(&[]).await;
    let cluster = cluster(&["node-a"], upstream, Some(&hosts)).await;
    let (_dnsmasq, resolver) = dnsmasq(&[format!("--hostsdir={}", dir.path().display())]).await;

    let (agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let took = dig_until(
        resolver,
        &["node-a", "A"],
        Duration::from_secs(2),
        a_record(SERVICE_IP),
    )
    .await;
    println!(
        "figure: dnsmasq resolves node-a from the hosts file {took:?} after its agent is registered"
    );
    assert_eq!(
        std::fs::read_to_string(&hosts).expect("hosts file"),
        format!("{SERVICE_IP}\tnode-a\n")
    );

    agent.stop().await.expect("agent stops");
    dig_until(resolver, &["node-a", "A"], Duration::from_secs(5), |d| {
        d.answers.is_empty()
    })
    .await;
    assert_eq!(std::fs::read_to_string(&hosts).expect("hosts file"), "");
    cluster.stop().await;
}

#[tokio::test]
async fn clients_outside_the_allowed_networks_are_refused() {
    let (_upstream, upstream) = dnsmasq(&["--address=/upstream.test/192.0.2.1".into()]).await;
    // Only the pod network: this test's loopback client is outside it.
    let cluster = cluster_with(&["node-a"], upstream, |c| {
        c.dns.allow = vec!["10.0.0.0/8".parse().expect("net")];
    })
    .await;
    let dns = cluster.dns_addr.expect("the responder listens");
    let (_agent, _) = cluster.start_agent(cluster.agent_config("node-a")).await;
    let forwarded = |metrics: &str| {
        metric_value(
            metrics,
            "edge_tunnel_server_dns_queries_total",
            &[("answer", "forwarded")],
        )
    };
    let before = forwarded(&cluster.scrape().await);
    for args in [
        &["node-a", "A"][..],
        &["upstream.test", "A"],
        &["+tcp", "upstream.test", "A"],
    ] {
        let answer = dig(dns, args).await;
        assert_eq!(answer.status, "REFUSED", "{args:?}: {}", answer.text);
        assert!(answer.answers.is_empty(), "{}", answer.text);
    }
    let metrics = cluster.scrape().await;
    assert_eq!(
        forwarded(&metrics),
        before,
        "nothing was forwarded for a client outside: {metrics}"
    );
    cluster.stop().await;
}
