//! Sniffing the target of a new client connection: SNI from a real ClientHello, and HTTP heads.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tunnel_core::sniff::{http, sni};

fn client_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(tunnel_core::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

fn sniffing(c: &mut Criterion) {
    let hello = client_hello("edge-node-0042.shop-17.example");
    let origin = b"GET /stats/summary HTTP/1.1\r\nHost: edge-node-0042:10255\r\nUser-Agent: metrics-server/v0.7.2\r\nAccept: application/json\r\nAuthorization: Bearer abc.def.ghi\r\n\r\n";
    let connect = b"CONNECT edge-node-0042:10250 HTTP/1.1\r\nHost: edge-node-0042:10250\r\nUser-Agent: Go-http-client/1.1\r\n\r\n";
    let mut g = c.benchmark_group("sniff");
    g.throughput(Throughput::Bytes(hello.len() as u64));
    g.bench_function("sni_client_hello", |b| {
        b.iter(|| sni::server_name(black_box(&hello)).expect("parses"))
    });
    g.throughput(Throughput::Bytes(origin.len() as u64));
    g.bench_function("http_origin_form", |b| {
        b.iter(|| http::parse_request_head(black_box(origin), 10255).expect("parses"))
    });
    g.throughput(Throughput::Bytes(connect.len() as u64));
    g.bench_function("http_connect", |b| {
        b.iter(|| http::parse_request_head(black_box(connect), 10255).expect("parses"))
    });
    g.finish();
}

criterion_group!(benches, sniffing);
criterion_main!(benches);
