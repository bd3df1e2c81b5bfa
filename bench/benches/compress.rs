//! zstd on what agents mostly carry: Prometheus exposition text (a kubelet/node-exporter-like
//! `/metrics` page of ~200 KB) and kubelet logs. Compression at levels 1 and 3, as one buffer and
//! as a proxied stream flushed every 16 KiB read, and decompression.
//!
//! Compression trades agent CPU for uplink bytes, which are what edge sites pay for; these
//! figures say how many MB/s one core sustains per level, and (printed once, not timed) how much
//! of the text goes on the wire.

use std::fmt::Write as _;
use std::hint::black_box;
use std::io::Write as _;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// Size of each generated corpus.
const TARGET_LEN: usize = 200 * 1024;
/// How much a proxied stream reads before it flushes a compressed block.
const CHUNK: usize = 16 * 1024;
const LEVELS: [i32; 2] = [1, 3];

/// splitmix64: deterministic, so every run compresses the same text.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn float(&mut self, max: f64) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * max
    }

    fn hex(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            write!(s, "{:016x}", self.next()).expect("string");
        }
        s.truncate(len);
        s
    }
}

const NAMESPACES: [&str; 8] = [
    "kube-system",
    "monitoring",
    "ingress-nginx",
    "shop-frontend",
    "shop-backend",
    "payments",
    "edge-cache",
    "logging",
];
const APPS: [&str; 10] = [
    "coredns",
    "node-exporter",
    "fluent-bit",
    "nginx",
    "checkout",
    "inventory",
    "redis",
    "postgres",
    "varnish",
    "pos-sync",
];

#[derive(Debug)]
struct Container {
    namespace: &'static str,
    pod: String,
    pod_uid: String,
    name: &'static str,
    id: String,
    image: String,
}

fn containers(rng: &mut Rng, pods: usize) -> Vec<Container> {
    let mut out = Vec::new();
    for p in 0..pods {
        let namespace = NAMESPACES[p % NAMESPACES.len()];
        let app = APPS[rng.below(APPS.len() as u64) as usize];
        let pod = format!("{app}-{}-{}", rng.hex(10), rng.hex(5));
        let uid = rng.hex(32);
        let pod_uid = format!(
            "{}-{}-{}-{}-{}",
            &uid[..8],
            &uid[8..12],
            &uid[12..16],
            &uid[16..20],
            &uid[20..]
        );
        let sidecar = rng.below(3) == 0;
        for name in std::iter::once(app).chain(sidecar.then_some("istio-proxy")) {
            out.push(Container {
                namespace,
                pod: pod.clone(),
                pod_uid: pod_uid.clone(),
                name,
                id: rng.hex(64),
                image: format!(
                    "registry.example.com/{namespace}/{name}:v1.{}.{}",
                    p % 7,
                    p % 3
                ),
            });
        }
    }
    out
}

/// A metric family's HELP and TYPE lines.
fn family(s: &mut String, name: &str, kind: &str, help: &str) {
    writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}").expect("string");
}

/// A `/metrics` page: node-exporter families, then cAdvisor container families, then a kubelet
/// latency histogram; `pods` sets the size.
fn metrics_page(pods: usize) -> String {
    let mut rng = Rng(0x006b_7562_656c_6574);
    let mut s = String::new();
    family(
        &mut s,
        "node_cpu_seconds_total",
        "counter",
        "Seconds the CPUs spent in each mode.",
    );
    for cpu in 0..8 {
        for mode in [
            "idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user",
        ] {
            let v = rng.float(2e6);
            writeln!(
                s,
                "node_cpu_seconds_total{{cpu=\"{cpu}\",mode=\"{mode}\"}} {v:.2}"
            )
            .expect("string");
        }
    }
    for (name, help) in [
        (
            "node_filesystem_avail_bytes",
            "Filesystem space available to non-root users in bytes.",
        ),
        ("node_filesystem_size_bytes", "Filesystem size in bytes."),
    ] {
        family(&mut s, name, "gauge", help);
        for (dev, mnt) in [
            ("/dev/sda1", "/"),
            ("/dev/sda15", "/boot/efi"),
            ("tmpfs", "/run"),
            ("/dev/sdb1", "/var/lib/containerd"),
        ] {
            let v = rng.below(1 << 40);
            writeln!(
                s,
                "{name}{{device=\"{dev}\",fstype=\"ext4\",mountpoint=\"{mnt}\"}} {v:e}"
            )
            .expect("string");
        }
    }

    let containers = containers(&mut rng, pods);
    let labels = |c: &Container| {
        format!(
            "container=\"{}\",id=\"/kubepods/burstable/pod{}/{}\",image=\"{}\",name=\"{}\",namespace=\"{}\",pod=\"{}\"",
            c.name, c.pod_uid, c.id, c.image, c.id, c.namespace, c.pod
        )
    };
    let ts = 1_736_935_425_123u64;
    for (name, kind, help, max) in [
        (
            "container_cpu_usage_seconds_total",
            "counter",
            "Cumulative cpu time consumed in seconds.",
            1e5,
        ),
        (
            "container_memory_working_set_bytes",
            "gauge",
            "Current working set in bytes.",
            2e9,
        ),
        (
            "container_memory_rss",
            "gauge",
            "Size of RSS in bytes.",
            2e9,
        ),
        (
            "container_fs_reads_bytes_total",
            "counter",
            "Cumulative count of bytes read",
            1e11,
        ),
        (
            "container_fs_writes_bytes_total",
            "counter",
            "Cumulative count of bytes written",
            1e11,
        ),
        (
            "container_spec_memory_limit_bytes",
            "gauge",
            "Memory limit for the container.",
            4e9,
        ),
        (
            "container_last_seen",
            "gauge",
            "Last time a container was seen by the exporter",
            0.0,
        ),
    ] {
        family(&mut s, name, kind, help);
        for c in &containers {
            let v = if max == 0.0 {
                1.736_935_425e9
            } else if kind == "counter" {
                rng.float(max)
            } else {
                rng.float(max).round()
            };
            writeln!(s, "{name}{{{}}} {v} {ts}", labels(c)).expect("string");
        }
    }
    for dir in ["receive", "transmit"] {
        let name = format!("container_network_{dir}_bytes_total");
        family(
            &mut s,
            &name,
            "counter",
            &format!("Cumulative count of bytes {dir}d"),
        );
        for c in containers.iter().filter(|c| c.name != "istio-proxy") {
            let v = rng.below(1 << 38);
            writeln!(
                s,
                "{name}{{container=\"\",id=\"/kubepods/burstable/pod{}\",interface=\"eth0\",name=\"\",namespace=\"{}\",pod=\"{}\"}} {v} {ts}",
                c.pod_uid, c.namespace, c.pod
            )
            .expect("string");
        }
    }

    let name = "kubelet_http_requests_duration_seconds";
    family(
        &mut s,
        name,
        "histogram",
        "[ALPHA] Duration in seconds to serve http requests",
    );
    for path in [
        "metrics",
        "metrics/cadvisor",
        "stats",
        "pods",
        "exec",
        "logs",
    ] {
        let mut count = 0;
        for le in [
            "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
        ] {
            count += rng.below(500);
            writeln!(
                s,
                "{name}_bucket{{long_running=\"false\",method=\"GET\",path=\"{path}\",server_type=\"readwrite\",le=\"{le}\"}} {count}"
            )
            .expect("string");
        }
        let sum = rng.float(1e3);
        writeln!(s, "{name}_sum{{long_running=\"false\",method=\"GET\",path=\"{path}\",server_type=\"readwrite\"}} {sum}\n{name}_count{{long_running=\"false\",method=\"GET\",path=\"{path}\",server_type=\"readwrite\"}} {count}")
            .expect("string");
    }
    s
}

/// kubelet's klog output: sync loop events, probe failures, volume mounts, errors.
fn kubelet_log(lines: usize) -> String {
    let mut rng = Rng(0x6b6c_6f67);
    let pods = containers(&mut rng, 60);
    let mut s = String::new();
    let mut micros: u64 = (10 * 3600 + 23 * 60) * 1_000_000;
    for _ in 0..lines {
        micros += rng.below(400_000);
        let (h, m, sec, us) = (
            micros / 3_600_000_000,
            micros / 60_000_000 % 60,
            micros / 1_000_000 % 60,
            micros % 1_000_000,
        );
        let c = &pods[rng.below(pods.len() as u64) as usize];
        let (sev, src, msg) = match rng.below(10) {
            0..=3 => (
                'I',
                "kubelet.go:2404",
                format!(
                    "\"SyncLoop (PLEG): event for pod\" pod=\"{}/{}\" event={{\"ID\":\"{}\",\"Type\":\"ContainerStarted\",\"Data\":\"{}\"}}",
                    c.namespace, c.pod, c.pod_uid, c.id
                ),
            ),
            4..=5 => {
                let ip = format!("10.244.{}.{}", 1 + rng.below(3), 2 + rng.below(250));
                (
                    'I',
                    "prober.go:107",
                    format!(
                        "\"Probe failed\" probeType=\"Readiness\" pod=\"{}/{}\" podUID=\"{}\" containerName=\"{}\" probeResult=\"failure\" output=\"Get \\\"http://{ip}:8080/healthz\\\": dial tcp {ip}:8080: connect: connection refused\"",
                        c.namespace, c.pod, c.pod_uid, c.name
                    ),
                )
            }
            6..=7 => (
                'I',
                "reconciler_common.go:258",
                format!(
                    "\"operationExecutor.MountVolume started for volume \\\"kube-api-access-{}\\\" (UniqueName: \\\"kubernetes.io/projected/{}-kube-api-access-{}\\\") pod \\\"{}\\\" (UID: \\\"{}\\\") \" pod=\"{}/{}\"",
                    rng.hex(5),
                    c.pod_uid,
                    rng.hex(5),
                    c.pod,
                    c.pod_uid,
                    c.namespace,
                    c.pod
                ),
            ),
            8 => (
                'W',
                "cpu_manager.go:395",
                format!(
                    "\"RemoveStaleState: removing container\" podUID=\"{}\" containerName=\"{}\"",
                    c.pod_uid, c.name
                ),
            ),
            _ => (
                'E',
                "pod_workers.go:1298",
                format!(
                    "\"Error syncing pod, skipping\" err=\"failed to \\\"StartContainer\\\" for \\\"{}\\\" with CrashLoopBackOff: \\\"back-off {}s restarting failed container={} pod={}_{}({})\\\"\" pod=\"{}/{}\" podUID=\"{}\"",
                    c.name,
                    10u64 << rng.below(5),
                    c.name,
                    c.pod,
                    c.namespace,
                    c.pod_uid,
                    c.namespace,
                    c.pod,
                    c.pod_uid
                ),
            ),
        };
        writeln!(
            s,
            "{sev}0115 {h:02}:{m:02}:{sec:02}.{us:06}    2345 {src}] {msg}"
        )
        .expect("string");
    }
    s
}

/// The smallest corpus from `make` that reaches `TARGET_LEN`.
fn sized(make: impl Fn(usize) -> String, step: usize) -> String {
    (1..)
        .map(|n| make(n * step))
        .find(|s| s.len() >= TARGET_LEN)
        .expect("grows")
}

/// A proxied stream's compressor, made per stream as the tunnel would make it (so its setup is
/// timed too); every `CHUNK` read is flushed, so the peer never waits for more input.
fn stream_compress(raw: &[u8], level: i32, out: Vec<u8>) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(out, level).expect("encoder");
    for chunk in raw.chunks(CHUNK) {
        enc.write_all(chunk).expect("compresses");
        enc.flush().expect("flushes");
    }
    enc.finish().expect("finishes")
}

fn corpus(c: &mut Criterion, name: &str, raw: &[u8]) {
    let mut group = c.benchmark_group(format!("compress/{name}"));
    group.throughput(Throughput::Bytes(raw.len() as u64));
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
    let mut frames = Vec::new();
    for level in LEVELS {
        let mut cx = zstd::bulk::Compressor::new(level).expect("compressor");
        let n = cx.compress_to_buffer(raw, &mut out).expect("compresses");
        let streamed = stream_compress(raw, level, Vec::new()).len();
        eprintln!(
            "compress/{name}: {} bytes raw; zstd -{level}: {n} bytes ({:.1}%), streamed with a flush every {} KiB: {streamed} bytes ({:.1}%)",
            raw.len(),
            100.0 * n as f64 / raw.len() as f64,
            CHUNK / 1024,
            100.0 * streamed as f64 / raw.len() as f64,
        );
        frames.push((level, out[..n].to_vec()));
        group.bench_function(format!("zstd_{level}"), |b| {
            b.iter(|| {
                cx.compress_to_buffer(black_box(raw), &mut out)
                    .expect("compresses")
            })
        });
        group.bench_function(format!("zstd_{level}_stream_{}k", CHUNK / 1024), |b| {
            b.iter(|| stream_compress(black_box(raw), level, Vec::with_capacity(raw.len())))
        });
    }
    let mut dx = zstd::bulk::Decompressor::new().expect("decompressor");
    let mut back = Vec::with_capacity(raw.len());
    for (level, frame) in &frames {
        dx.decompress_to_buffer(frame, &mut back)
            .expect("decompresses");
        assert_eq!(back, raw, "round trip at level {level}");
        group.bench_function(format!("decompress_{level}"), |b| {
            b.iter(|| {
                dx.decompress_to_buffer(black_box(frame), &mut back)
                    .expect("decompresses")
            })
        });
    }
    group.finish();
}

fn compression(c: &mut Criterion) {
    let metrics = sized(metrics_page, 4);
    let log = sized(kubelet_log, 50);
    corpus(c, "prometheus_text", metrics.as_bytes());
    corpus(c, "kubelet_log", log.as_bytes());
}

criterion_group!(benches, compression);
criterion_main!(benches);
