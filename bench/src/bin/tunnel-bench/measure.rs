//! The measurements, each over any [`Path`]: bulk throughput, round trips on a kept
//! connection, new connections, and head-of-line blocking. Every loop is bounded in count and
//! in time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::target::{Source, fetch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::paths::Path;

const CHUNK: usize = 64 * 1024;
/// No single measurement may run longer than this.
const BOUND: Duration = Duration::from_secs(180);

async fn bounded<T>(what: &str, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(BOUND, f)
        .await
        .with_context(|| format!("{what}: no result within {BOUND:?}"))?
}

/// A target that reads everything and answers with the byte count once the sender half-closes.
pub(crate) async fn sink() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut total: u64 = 0;
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = tcp.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// A target that echoes what it reads (and holds idle connections open).
pub(crate) async fn echo() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

async fn upload_one(mut tcp: TcpStream, bytes: u64) -> anyhow::Result<()> {
    let chunk = vec![0xa5u8; CHUNK];
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        tcp.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    tcp.shutdown().await?;
    let got = tcp.read_u64().await?;
    if got != sent {
        bail!("target counted {got} bytes of {sent}");
    }
    Ok(())
}

/// Direction of a bulk transfer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    /// Client to target (as `kubectl cp` into a pod).
    Up,
    /// Target to client (logs, metrics, `kubectl cp` out).
    Down,
}

/// `bytes` in total over `streams` connections at once; Gbit/s, delivery included (uploads end
/// when the target has counted every byte).
pub(crate) async fn bulk(
    path: &Path,
    dir: Direction,
    sink: SocketAddr,
    source: &Source,
    bytes: u64,
    streams: u64,
) -> anyhow::Result<f64> {
    let each = bytes / streams;
    let mut conns = Vec::new();
    for _ in 0..streams {
        conns.push(match dir {
            Direction::Up => path.connect(sink).await?,
            Direction::Down => path.connect(source.addr).await?,
        });
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for mut tcp in conns {
        tasks.spawn(async move {
            match dir {
                Direction::Up => upload_one(tcp, each).await,
                Direction::Down => {
                    let got = fetch(&mut tcp, each).await?;
                    if got != each {
                        bail!("got {got} bytes of {each}");
                    }
                    Ok(())
                }
            }
        });
    }
    bounded("bulk transfer", async {
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    })
    .await?;
    Ok(gbits(each * streams, started.elapsed()))
}

pub(crate) fn gbits(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

/// Opens a connection, sends `size` bytes, reads them back.
pub(crate) async fn round_trip_once(
    path: &Path,
    echo: SocketAddr,
    size: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tcp = path.connect(echo).await?;
    exchange(&mut tcp, size).await?;
    Ok(started.elapsed())
}

async fn exchange(tcp: &mut TcpStream, size: usize) -> anyhow::Result<()> {
    let msg = vec![0x5au8; size];
    tcp.write_all(&msg).await?;
    let mut back = vec![0u8; size];
    tcp.read_exact(&mut back).await?;
    if back != msg {
        bail!("echo differs");
    }
    Ok(())
}

/// Latencies of `per_conn` round trips of `size` bytes on each of `conc` kept connections,
/// all connections at once.
pub(crate) async fn round_trips(
    path: &Path,
    echo: SocketAddr,
    size: usize,
    conc: usize,
    per_conn: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut conns = Vec::new();
    for _ in 0..conc {
        let mut tcp = path.connect(echo).await?;
        exchange(&mut tcp, size).await?;
        conns.push(tcp);
    }
    let mut tasks = JoinSet::new();
    for mut tcp in conns {
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per_conn);
            for _ in 0..per_conn {
                let t = Instant::now();
                exchange(&mut tcp, size).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    bounded("round trips", async {
        let mut all = Vec::with_capacity(conc * per_conn);
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        all.sort();
        Ok(all)
    })
    .await
}

/// New connection + one 64-byte round trip: `n` in total from `conc` loops at once; the
/// sorted latencies and the connections per second.
pub(crate) async fn connects(
    path: &Path,
    echo: SocketAddr,
    n: usize,
    conc: usize,
) -> anyhow::Result<(Vec<Duration>, f64)> {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..conc {
        let path = path.clone();
        let each = n / conc;
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(each);
            for _ in 0..each {
                lat.push(round_trip_once(&path, echo, 64).await?);
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = bounded("new connections", async {
        let mut all = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        Ok(all)
    })
    .await?;
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    Ok((all, rate))
}

/// The value at quantile `q` of sorted latencies, microseconds.
pub(crate) fn quantile_us(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

/// Head-of-line: 10 downloads of `each` bytes at once, Gbit/s together, with and without one
/// more stream on the same path whose reader has stopped (its windows full). Returns
/// (without, with).
pub(crate) async fn head_of_line(
    path: &Path,
    source: &Source,
    each: u64,
) -> anyhow::Result<(f64, f64)> {
    let without = bulk(path, Direction::Down, source.addr, source, each * 10, 10).await?;
    let index = source.connections();
    let mut stalled = path.connect(source.addr).await?;
    stalled.write_u64(1 << 40).await?;
    // Stalled once the source's count stops moving (every buffer on the path is full).
    let mut last = 0;
    let mut still = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while still < 5 {
        if Instant::now() > deadline {
            bail!("the stopped reader never filled its path");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = source.written(index);
        still = if now == last && now > 0 { still + 1 } else { 0 };
        last = now;
    }
    let with = bulk(path, Direction::Down, source.addr, source, each * 10, 10).await?;
    drop(stalled);
    Ok((without, with))
}
