//! The server's agent registry with 10,000 connected nodes: lookups by node name and by node IP
//! (hits and misses), agents connecting, reconnecting and leaving, and lookups from two threads
//! while a third churns sessions.
//!
//! Every proxied connection looks its node up under the registry's one lock, and every agent
//! (re)connect takes the same lock, so these figures bound how a replica routes while a fleet
//! reconnects or drops (after a network blip, many agents at once). Sessions are a stand-in
//! `AgentLink` (`BareLink`): a real `ServerSession` needs a live link, and the registry never
//! touches it.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tunnel_core::{AgentIdentity, NodeRef};
use tunnel_server::registry::{BareLink as Link, Registry};

/// Connected nodes.
const NODES: u64 = 10_000;
/// Keys each lookup bench cycles through (a power of two), spread over the nodes.
const KEYS: usize = 1024;

fn node_name(i: u64) -> String {
    format!("edge-node-{i:05}")
}

fn node_v4(i: u64) -> IpAddr {
    let [_, b, c, d] = (i as u32).to_be_bytes();
    Ipv4Addr::new(10, 64 + b, c, d).into()
}

fn node_v6(i: u64) -> IpAddr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into()
}

/// Node `i`'s session `id`: an IPv4 SAN, and an IPv6 one on every other node (dual-stack).
fn link(id: u64, i: u64) -> Link {
    let mut node_ips = vec![node_v4(i)];
    if i.is_multiple_of(2) {
        node_ips.push(node_v6(i));
    }
    Link::new(
        id,
        AgentIdentity {
            node_name: node_name(i),
            node_ips,
        },
    )
}

/// Ids that never repeat, so that each new session replaces its node's previous one.
#[derive(Debug)]
struct Ids(u64);

impl Ids {
    fn next(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

fn filled(ids: &mut Ids) -> (Registry<Link>, Vec<Link>) {
    let registry = Registry::default();
    let links: Vec<Link> = (0..NODES).map(|i| link(ids.next(), i)).collect();
    for l in &links {
        assert!(registry.insert(l.clone()).is_none());
    }
    assert_eq!(registry.len(), NODES as usize);
    (registry, links)
}

/// `KEYS` node indexes spread over all nodes (a prime stride).
fn spread() -> impl Iterator<Item = u64> {
    (0..KEYS as u64).map(|k| k * 7919 % NODES)
}

fn lookups(c: &mut Criterion) {
    let (registry, _) = filled(&mut Ids(0));
    let sets: [(&str, Vec<NodeRef>, bool); 4] = [
        (
            "name_hit",
            spread().map(|i| NodeRef::Name(node_name(i))).collect(),
            true,
        ),
        (
            "name_miss",
            spread()
                .map(|i| NodeRef::Name(node_name(i + NODES)))
                .collect(),
            false,
        ),
        (
            "ip_hit",
            spread()
                .map(|i| {
                    NodeRef::Ip(if i.is_multiple_of(2) {
                        node_v6(i)
                    } else {
                        node_v4(i)
                    })
                })
                .collect(),
            true,
        ),
        (
            "ip_miss",
            spread()
                .map(|i| NodeRef::Ip(Ipv4Addr::new(192, 168, (i >> 8) as u8, i as u8).into()))
                .collect(),
            false,
        ),
    ];
    let mut g = c.benchmark_group("registry/lookup");
    g.throughput(Throughput::Elements(1));
    for (name, keys, hit) in &sets {
        assert!(keys.iter().all(|k| registry.lookup(k).is_some() == *hit));
        g.bench_function(*name, |b| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) & (KEYS - 1);
                registry.lookup(black_box(&keys[k]))
            })
        });
    }
    g.finish();
}

fn churn(c: &mut Criterion) {
    let mut ids = Ids(0);
    let (registry, mut current) = filled(&mut ids);
    let mut g = c.benchmark_group("registry/churn");
    g.throughput(Throughput::Elements(1));
    // An agent reconnects before its old link is gone: the new session replaces the old one.
    // Two generations are built up front so that the bench times the registry, not the setup.
    let gens: Vec<Vec<Link>> = (0..2)
        .map(|_| spread().map(|i| link(ids.next(), i)).collect())
        .collect();
    g.bench_function("replace", |b| {
        let mut n = 0;
        b.iter(|| {
            n = (n + 1) % (2 * KEYS);
            registry.insert(black_box(gens[n / KEYS][n % KEYS].clone()))
        })
    });
    // Settle every node back on one known session, for the bench below.
    for (k, i) in spread().enumerate() {
        current[i as usize] = gens[1][k].clone();
        registry.insert(current[i as usize].clone());
    }
    // An agent leaves and comes back: remove (which looks for another node claiming its IPs)
    // and a fresh insert.
    g.bench_function("remove_reinsert", |b| {
        let mut k = 0;
        let nodes: Vec<usize> = spread().map(|i| i as usize).collect();
        b.iter(|| {
            k = (k + 1) & (KEYS - 1);
            let l = &current[nodes[k]];
            registry.remove(black_box(l));
            registry.insert(l.clone())
        })
    });
    g.finish();
}

/// What the third thread does while two threads look nodes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Nothing: the readers contend only with each other.
    None,
    /// Agents reconnect: every `CHURN_PERIOD` a new session replaces its node's previous one.
    Replace,
    /// As `Replace`, and every eighth session also leaves and comes back (remove, insert).
    ReplaceRemove,
}

/// How often the writer changes a session: 10,000 a second, as if the whole fleet reconnected
/// within a second. A writer that ran flat out would measure the lock's fairness instead.
const CHURN_PERIOD: Duration = Duration::from_micros(100);

/// Lookups a reader times together, to see its stalls without timing every lookup.
const BATCH: usize = 64;

/// What the writer did while the readers read, summed over a bench's samples, and how long each
/// batch of `BATCH` lookups took.
#[derive(Debug, Default)]
struct Churned {
    changes: u64,
    removals: u64,
    reading: Duration,
    batches: Vec<Duration>,
}

impl Churned {
    fn quantile(&mut self, q: f64) -> Duration {
        self.batches.sort_unstable();
        let last = self.batches.len().saturating_sub(1);
        self.batches
            .get((last as f64 * q) as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// Two threads each do `iters` lookups (names and IPs, all hits) while a third thread churns
/// sessions as `writer` says. Returns the mean reader time.
fn read_under(
    registry: &Registry<Link>,
    keys: &[NodeRef],
    iters: u64,
    writer: Writer,
    ids: &mut Ids,
    churned: &mut Churned,
) -> Duration {
    let stop = AtomicBool::new(false);
    let start = Barrier::new(if writer == Writer::None { 2 } else { 3 });
    thread::scope(|s| {
        let churn = (writer != Writer::None).then(|| {
            s.spawn(|| {
                start.wait();
                let (mut n, mut removals) = (0u64, 0u64);
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        thread::park_timeout(next - now);
                        continue;
                    }
                    next += CHURN_PERIOD;
                    let l = link(ids.next(), n * 7919 % NODES);
                    registry.insert(l.clone());
                    if writer == Writer::ReplaceRemove && n.is_multiple_of(8) {
                        registry.remove(&l);
                        registry.insert(l);
                        removals += 1;
                    }
                    n += 1;
                }
                (n, removals)
            })
        });
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let start = &start;
                s.spawn(move || {
                    let iters = iters as usize;
                    let mut batches = Vec::with_capacity(iters / BATCH + 1);
                    start.wait();
                    let t = Instant::now();
                    for from in (0..iters).step_by(BATCH) {
                        let batch = Instant::now();
                        for n in from..iters.min(from + BATCH) {
                            black_box(registry.lookup(black_box(&keys[(2 * n + r) & (KEYS - 1)])));
                        }
                        batches.push(batch.elapsed());
                    }
                    (t.elapsed(), batches)
                })
            })
            .collect();
        let mut total = Duration::ZERO;
        for h in readers {
            let (took, batches) = h.join().expect("reader");
            total += took;
            churned.batches.extend(batches);
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(churn) = churn {
            let (changes, removals) = churn.join().expect("writer");
            churned.changes += changes;
            churned.removals += removals;
        }
        churned.reading += total / 2;
        total / 2
    })
}

fn contended(c: &mut Criterion) {
    let mut ids = Ids(0);
    let (registry, _) = filled(&mut ids);
    let keys: Vec<NodeRef> = spread()
        .map(|i| match i % 4 {
            0 => NodeRef::Ip(node_v6(i)),
            1 => NodeRef::Ip(node_v4(i)),
            _ => NodeRef::Name(node_name(i)),
        })
        .collect();
    let mut g = c.benchmark_group("registry/contended");
    g.throughput(Throughput::Elements(1));
    for (name, writer) in [
        ("lookup_2_readers", Writer::None),
        ("lookup_2_readers_1_replacing", Writer::Replace),
        (
            "lookup_2_readers_1_replacing_removing",
            Writer::ReplaceRemove,
        ),
    ] {
        let mut churned = Churned::default();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                read_under(&registry, &keys, iters, writer, &mut ids, &mut churned)
            })
        });
        // The rate the readers really saw (the writer may fall behind on a loaded machine), and
        // the tail the mean hides: a lookup waits for whatever holds the lock.
        let secs = churned.reading.as_secs_f64().max(f64::EPSILON);
        eprintln!(
            "registry/contended/{name}: writer made {:.0} changes/s ({:.0} removals/s); {BATCH} lookups took p50 {:?}, p90 {:?}, p99 {:?}",
            churned.changes as f64 / secs,
            churned.removals as f64 / secs,
            churned.quantile(0.5),
            churned.quantile(0.9),
            churned.quantile(0.99),
        );
    }
    g.finish();
    assert_eq!(registry.len(), NODES as usize);
}

criterion_group!(benches, lookups, churn, contended);
criterion_main!(benches);
