//! Load harness (first figures of issue 4), on loopback, each path measured in the same run and
//! printed beside direct TCP as a ratio: bulk throughput of one stream, and a new connection
//! plus one 64-byte round trip (latency percentiles and connections per second). The tunnel
//! path is HTTP front, CONNECT, one QUIC stream, agent, target.
//!
//! ```text
//! cargo run --release -p edge-tunnel-bench --bin tunnel-bench [-- --quick] [--json]
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::{TestCluster, TestPki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;

/// A target that reads everything and answers with the byte count when the sender half-closes.
async fn sink() -> anyhow::Result<SocketAddr> {
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

/// Sends `bytes` and waits for the target's count: the time covers delivery, not buffering.
async fn upload(mut tcp: TcpStream, bytes: u64) -> anyhow::Result<Duration> {
    tcp.set_nodelay(true)?;
    let chunk = vec![0xa5u8; CHUNK];
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        tcp.write_all(&chunk).await?;
        sent += CHUNK as u64;
    }
    tcp.shutdown().await?;
    let got = tcp.read_u64().await?;
    if got != sent {
        bail!("target counted {got} bytes of {sent}");
    }
    Ok(started.elapsed())
}

/// A target that echoes whatever it reads.
async fn echo() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Opens a connection (directly, or through the front), sends 64 bytes, reads them back.
async fn connect_round_trip(
    via: Option<SocketAddr>,
    target: SocketAddr,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tcp = match via {
        None => TcpStream::connect(target).await?,
        Some(front) => connect_via(front, "bench-node", target.port()).await?,
    };
    tcp.set_nodelay(true)?;
    let msg = [0x5au8; 64];
    tcp.write_all(&msg).await?;
    let mut back = [0u8; 64];
    tcp.read_exact(&mut back).await?;
    let elapsed = started.elapsed();
    if back != msg {
        bail!("echo differs");
    }
    Ok(elapsed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `n` sequential connect + round trips; (p50, p99, connections per second).
async fn connect_series(
    via: Option<SocketAddr>,
    target: SocketAddr,
    n: usize,
) -> anyhow::Result<(Duration, Duration, f64)> {
    let mut lat = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        lat.push(connect_round_trip(via, target).await?);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    lat.sort();
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99), rate))
}

async fn connect_via(front: SocketAddr, node: &str, port: u16) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(front).await?;
    tcp.write_all(
        format!("CONNECT {node}:{port} HTTP/1.1\r\nHost: {node}:{port}\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 4096 {
            bail!("CONNECT response head too long");
        }
        head.push(tcp.read_u8().await?);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        bail!("CONNECT refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(tcp)
}

fn gbits(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args.iter().any(|a| a == "--json");
    let bytes: u64 = if quick { 64 << 20 } else { 512 << 20 };
    let runs = 3;

    let target = sink().await?;
    let echo_target = echo().await?;
    let pki = tokio::task::spawn_blocking(|| TestPki::new(&[("bench-node", &[])])).await?;
    let cluster = TestCluster::start(pki, target.port(), target.port()).await;
    let mut agent_config = cluster.agent_config("bench-node");
    let ports = tunnel_core::PortSet::new([target.port(), echo_target.port()]);
    agent_config.allowed_ports = ports.clone();
    agent_config.localhost_proxy_ports = ports;
    let (_agent, _) = cluster.start_agent(agent_config).await;

    let mut direct = Vec::new();
    let mut tunnel = Vec::new();
    for _ in 0..runs {
        let d = tokio::time::timeout(
            Duration::from_secs(120),
            upload(TcpStream::connect(target).await?, bytes),
        )
        .await
        .context("direct transfer timed out")??;
        direct.push(gbits(bytes, d));
        let via = connect_via(cluster.insecure_addr, "bench-node", target.port()).await?;
        let t = tokio::time::timeout(Duration::from_secs(120), upload(via, bytes))
            .await
            .context("tunnel transfer timed out")??;
        tunnel.push(gbits(bytes, t));
    }
    let (direct, tunnel) = (median(direct), median(tunnel));
    let n = if quick { 300 } else { 2000 };
    let bound = Duration::from_secs(120);
    let d = tokio::time::timeout(bound, connect_series(None, echo_target, n))
        .await
        .context("direct connect series timed out")??;
    let t = tokio::time::timeout(
        bound,
        connect_series(Some(cluster.insecure_addr), echo_target, n),
    )
    .await
    .context("tunnel connect series timed out")??;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    if json {
        println!(
            "{{\"bulk_1_stream_upload\":{{\"bytes\":{bytes},\"runs\":{runs},\"direct_gbit_s\":{direct:.3},\"quic_gbit_s\":{tunnel:.3},\"quic_vs_direct\":{:.3}}},\"connect_round_trip_64b\":{{\"n\":{n},\"direct_p50_us\":{:.1},\"direct_p99_us\":{:.1},\"direct_conn_s\":{:.0},\"quic_p50_us\":{:.1},\"quic_p99_us\":{:.1},\"quic_conn_s\":{:.0}}}}}",
            tunnel / direct,
            us(d.0),
            us(d.1),
            d.2,
            us(t.0),
            us(t.1),
            t.2
        );
    } else {
        println!(
            "bulk throughput, 1 stream, client -> node, {} MiB x {runs} runs (median), loopback",
            bytes >> 20
        );
        println!("{:<28} {:>10} {:>12}", "path", "Gbit/s", "x direct");
        println!("{:<28} {:>10.2} {:>12.2}", "direct TCP", direct, 1.0);
        println!(
            "{:<28} {:>10.2} {:>12.2}",
            "tunnel (CONNECT, QUIC)",
            tunnel,
            tunnel / direct
        );
        println!();
        println!(
            "new connection + 64-byte round trip, {n} sequential (CONNECT through the HTTP front)"
        );
        println!(
            "{:<28} {:>10} {:>10} {:>10} {:>12}",
            "path", "p50 us", "p99 us", "conn/s", "p50 x direct"
        );
        println!(
            "{:<28} {:>10.0} {:>10.0} {:>10.0} {:>12.2}",
            "direct TCP",
            us(d.0),
            us(d.1),
            d.2,
            1.0
        );
        println!(
            "{:<28} {:>10.0} {:>10.0} {:>10.0} {:>12.2}",
            "tunnel (CONNECT, QUIC)",
            us(t.0),
            us(t.1),
            t.2,
            us(t.0) / us(d.0)
        );
        println!("rathole: not measured here yet (issue 4)");
    }
    Ok(())
}
