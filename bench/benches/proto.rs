//! Wire encode/decode: the stream-open header (once per proxied connection) and control pings.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tunnel_core::proto::{self, MAX_CONTROL_LEN, MAX_OPEN_LEN};
use tunnel_core::{OpenRequest, Target, TargetHost};

fn stream_open(c: &mut Criterion) {
    let req = OpenRequest::new(
        Target {
            host: TargetHost::NodeIp("10.20.30.40".parse().expect("ip")),
            port: 10250,
        },
        0x1234_5678_9abc,
    );
    let frame = proto::frame(&req.to_proto()).expect("encodes");
    let mut g = c.benchmark_group("stream_open");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        b.iter(|| proto::frame(&black_box(&req).to_proto()).expect("encodes"))
    });
    g.bench_function("decode_validate", |b| {
        b.iter(|| {
            let (msg, _) =
                proto::decode_frame::<proto::StreamOpen>(black_box(&frame), MAX_OPEN_LEN)
                    .expect("decodes");
            OpenRequest::from_proto(msg).expect("valid")
        })
    });
    g.finish();
}

fn control(c: &mut Criterion) {
    let ping = proto::Control {
        msg: Some(proto::control::Msg::Ping(proto::Ping { seq: 42 })),
    };
    let frame = proto::frame(&ping).expect("encodes");
    c.bench_function("control/ping_decode", |b| {
        b.iter(|| {
            proto::decode_frame::<proto::Control>(black_box(&frame), MAX_CONTROL_LEN)
                .expect("decodes")
        })
    });
}

criterion_group!(benches, stream_open, control);
criterion_main!(benches);
