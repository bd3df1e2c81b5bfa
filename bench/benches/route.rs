//! Routing a request, as the fronts and the agent do it once per proxied connection: the HTTP
//! front's target (Host, an IP host, absolute-form, CONNECT), the TLS front's SNI name, and the
//! agent's allowlist deciding where a target may be dialed.
//!
//! This runs before every dial, so it bounds the connection rate a replica can route; it should
//! stay far below the cost of the registry lookup and the stream open that follow.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tunnel_agent::Allowlist;
use tunnel_core::route::config::FixedPorts;
use tunnel_core::route::{self, NodeRef};
use tunnel_core::sniff::http::{RequestForm, request_target};
use tunnel_core::{PortConfig, PortSet, Target, TargetHost};

/// The kubelet's read-only port: the HTTP front's default.
const DEFAULT_PORT: u16 = 10255;

/// `(method, request-target, Host)` as the HTTP library hands them to the front.
const REQUESTS: [(&str, &str, Option<&str>); 4] = [
    ("GET", "/stats/summary", Some("edge-node-0123:10250")),
    ("GET", "/metrics/cadvisor", Some("10.20.30.40")),
    (
        "GET",
        "http://edge-node-0123:9100/metrics",
        Some("edge-node-0123:9100"),
    ),
    (
        "CONNECT",
        "edge-node-0123:10250",
        Some("edge-node-0123:10250"),
    ),
];

fn http_front(c: &mut Criterion) {
    // The cases must route as intended, or the bench measures error paths.
    let forms: Vec<RequestForm> = REQUESTS
        .iter()
        .map(|(m, t, h)| request_target(m, t, *h, DEFAULT_PORT).expect("routes").form)
        .collect();
    assert_eq!(
        forms,
        [
            RequestForm::Origin,
            RequestForm::Origin,
            RequestForm::Absolute,
            RequestForm::Connect
        ]
    );

    let mut g = c.benchmark_group("route/http_front");
    g.throughput(Throughput::Elements(1));
    let names = ["host_name", "host_ip", "absolute_form", "connect"];
    for (name, (method, target, host)) in names.into_iter().zip(REQUESTS) {
        g.bench_function(name, |b| {
            b.iter(|| {
                request_target(
                    black_box(method),
                    black_box(target),
                    black_box(host),
                    DEFAULT_PORT,
                )
                .expect("routes")
            })
        });
    }
    // All four in turn, as a front serving mixed clients sees them.
    g.throughput(Throughput::Elements(REQUESTS.len() as u64));
    g.bench_function("mix_of_4", |b| {
        b.iter(|| {
            for (method, target, host) in black_box(&REQUESTS) {
                black_box(request_target(method, target, *host, DEFAULT_PORT).expect("routes"));
            }
        })
    });
    g.finish();
}

fn tls_front(c: &mut Criterion) {
    let sni = "edge-node-0123.shop-17.example";
    assert!(matches!(route::parse_host(sni), Ok(NodeRef::Name(_))));
    c.bench_function("route/tls_front/sni_name", |b| {
        b.iter(|| route::parse_host(black_box(sni)).expect("a node name"))
    });
}

fn agent_allowlist(c: &mut Criterion) {
    // The ConfigMap as operators write it, parsed at start and on every change; the agent
    // gets its policy and narrows it with its own flags.
    let cfg = [
        ("dnat-ports-pair", "9051=10264"),
        ("http-proxy-ports", "9100"),
        ("https-proxy-ports", "9052, 8443"),
        ("localhost-proxy-ports", "10250, 10255, 10266, 10267"),
    ];
    let parse = || PortConfig::parse(cfg, FixedPorts::default()).expect("config");
    let policy = parse().policy();
    let allowlist = Allowlist::new(
        vec![
            "10.20.30.40".parse().expect("ip"),
            "fd00::1e:28".parse().expect("ip"),
        ],
        Some("9100, 9051".parse::<PortSet>().expect("ports")),
        None,
    );
    let targets = [
        Target {
            host: TargetHost::Node,
            port: 10250,
        },
        Target {
            host: TargetHost::NodeIp("fd00::1e:28".parse().expect("ip")),
            port: 9100,
        },
        // Refused: not an address of this node.
        Target {
            host: TargetHost::NodeIp("10.99.0.1".parse().expect("ip")),
            port: 9100,
        },
    ];
    let pushed = Some(&policy);
    assert!(
        allowlist.resolve(&targets[1], pushed).is_ok()
            && allowlist.resolve(&targets[2], pushed).is_err()
    );

    let mut g = c.benchmark_group("route/agent");
    g.throughput(Throughput::Elements(targets.len() as u64));
    g.bench_function("allowlist_resolve_3", |b| {
        b.iter(|| black_box(targets).map(|t| allowlist.resolve(&t, pushed)))
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("server_config_parse", |b| b.iter(|| black_box(parse())));
    g.finish();
}

criterion_group!(benches, http_front, tls_front, agent_allowlist);
criterion_main!(benches);
