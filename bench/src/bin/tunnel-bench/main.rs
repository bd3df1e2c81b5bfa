//! The load harness: starts everything it needs on loopback (the tunnel server in a child
//! process, agents, targets, clients; rathole with TLS when `rathole` is on the PATH) and
//! prints one table, each figure beside direct TCP and rathole from the same run, as ratios:
//! bulk throughput, round trips, new connections, memory per idle connection and per idle
//! agent, head-of-line blocking, and the time agents take to serve again after a server
//! restart. Figures are reported, never asserted.
//!
//! ```text
//! cargo run --release -p edge-tunnel-bench --bin tunnel-bench [-- --quick] [--json]
//! ```

mod child;
mod measure;
mod memory;
mod paths;
mod rathole;
mod replicas;
mod report;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tunnel_agent::{Agent, AgentConfig, AgentStatus};
use tunnel_core::TransportChoice;
use tunnel_core::{PortSet, SessionConfig};

use crate::child::{AgentArgs, AgentChild, ServeArgs, ServerChild, TlsFiles};
use crate::measure::{Direction, quantile_us};
use crate::paths::{Column, Path};
use crate::report::{Better, Report};

#[derive(Debug, Parser)]
#[command(name = "tunnel-bench", about = "edge-tunnel load harness")]
struct Cli {
    /// Smaller sizes and counts (CI): about a minute.
    #[arg(long)]
    quick: bool,
    /// One JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Only these sections of the table (numbers, comma-separated: `--only 1,3`); for
    /// profiling one path. Default: all.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=8))]
    only: Vec<u8>,
    /// Only these paths (comma-separated), for profiling one of them: sections 1 to 3 and 5
    /// measure just these, and rathole is not started without `rathole`. Default: all;
    /// ratios need `direct` and `rathole` in the run.
    #[arg(long, value_delimiter = ',', value_enum)]
    columns: Vec<Column>,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// (internal) Run the server under test in this process.
    #[command(hide = true)]
    Serve(ServeArgs),
    /// (internal) Run one agent under test in this process.
    #[command(hide = true)]
    Agent(AgentArgs),
}

/// Sizes of one run.
pub(crate) struct Sizes {
    bulk_bytes: u64,
    bulk_runs: usize,
    rtt_single: usize,
    rtt_per_conn_64: usize,
    connects: usize,
    idle_conns: usize,
    idle_agents: usize,
    hol_each: u64,
    /// Section 8: idle agents on each of the three replicas.
    agents_per_replica: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                bulk_bytes: 64 << 20,
                bulk_runs: 3,
                rtt_single: 1_000,
                rtt_per_conn_64: 50,
                connects: 320,
                idle_conns: 1_000,
                idle_agents: 200,
                hol_each: 8 << 20,
                agents_per_replica: 100,
            }
        } else {
            Self {
                bulk_bytes: 512 << 20,
                bulk_runs: 3,
                rtt_single: 10_000,
                rtt_per_conn_64: 500,
                connects: 3_200,
                idle_conns: 10_000,
                idle_agents: 5_000,
                hol_each: 32 << 20,
                agents_per_replica: 1_000,
            }
        }
    }
}

/// Link settings of the bench: many streams on one agent (the memory figure opens 10,000).
pub(crate) fn session_config(max_streams: u32) -> SessionConfig {
    SessionConfig {
        max_streams,
        ..SessionConfig::default()
    }
}

/// An agent running in this process.
pub(crate) struct RunningAgent {
    status: tokio::sync::watch::Receiver<AgentStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningAgent {
    pub(crate) fn start(config: AgentConfig) -> Self {
        let agent = Agent::new(config);
        let status = agent.status();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = agent
                .run(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Self {
            status,
            stop: Some(tx),
            task,
        }
    }

    async fn connected(&mut self) -> anyhow::Result<()> {
        tokio::time::timeout(
            Duration::from_secs(30),
            self.status
                .wait_for(|s| matches!(s, AgentStatus::Connected { .. })),
        )
        .await
        .context("agent did not connect within 30 s")??;
        Ok(())
    }

    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
    }
}

/// An agent of the bench: verifies the server as `localhost`, may dial `ports` on loopback.
pub(crate) fn agent_config(
    server: std::net::SocketAddr,
    tls: &TlsFiles,
    transport: TransportChoice,
    ports: &PortSet,
) -> AgentConfig {
    AgentConfig {
        server_address: server.to_string(),
        server_name: Some("localhost".into()),
        tls_cert_file: Some(tls.cert.clone()),
        tls_private_key_file: Some(tls.key.clone()),
        ca_file: Some(tls.ca.clone()),
        meta_port: 0,
        allowed_ports: Some(ports.clone()),
        localhost_proxy_ports: Some(ports.clone()),
        transport,
        session: session_config(20_000),
        ..AgentConfig::default()
    }
}

/// The TLS files of agent `index` of `pki`.
pub(crate) fn agent_tls(pki: &tunnel_server::pki::PkiFiles, index: usize) -> TlsFiles {
    let (_, cert, key) = &pki.agents[index];
    TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        ca: pki.ca_cert.clone(),
    }
}

/// Waits until the server has `want` sessions over `transport`; returns how long it took
/// until half of them and until all of them were there.
pub(crate) async fn sessions_reach(
    server: &ServerChild,
    transport: &str,
    want: usize,
    bound: Duration,
) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let mut half = None;
    loop {
        let n = server
            .metric("edge_tunnel_server_sessions", &[("transport", transport)])
            .await
            .unwrap_or(0.0);
        if half.is_none() && n as usize * 2 >= want {
            half = Some(started.elapsed());
        }
        if n as usize >= want {
            let all = started.elapsed();
            return Ok((half.unwrap_or(all), all));
        }
        if started.elapsed() > bound {
            bail!("{transport}: {n} of {want} sessions after {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn machine_note() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("machine: {cores} cores, {cpu}; everything on loopback")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Quiet by default (the table is the output); `RUST_LOG=debug` shows the links' statistics
    // when they end, in the harness and in the server child, which inherits the variable.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.mode {
        Some(Mode::Serve(args)) => runtime.block_on(child::serve(args)),
        Some(Mode::Agent(args)) => runtime.block_on(child::agent(args)),
        None => runtime.block_on(async {
            // Interrupted: dropping the run kills the processes it started (server, rathole).
            tokio::select! {
                r = run(cli.quick, cli.json, Sections(cli.only), cli.columns) => r,
                r = tokio::signal::ctrl_c() => match r {
                    Ok(()) => bail!("interrupted"),
                    Err(e) => Err(e).context("listening for Ctrl-C"),
                },
            }
        }),
    }
}

/// The sections a run measures.
struct Sections(Vec<u8>);

impl Sections {
    fn wants(&self, n: u8) -> bool {
        self.0.is_empty() || self.0.contains(&n)
    }
}

async fn run(
    quick: bool,
    json: bool,
    sections: Sections,
    columns: Vec<Column>,
) -> anyhow::Result<()> {
    let sizes = Sizes::new(quick);
    let mut report = Report::default();
    report.notes.push(machine_note());
    let nofile = memory::raise_nofile(200_000);
    let idle_agents = if sections.wants(4) || sections.wants(6) {
        sizes.idle_agents
    } else {
        0
    }
    .max(if sections.wants(8) {
        3 * sizes.agents_per_replica
    } else {
        0
    });
    let idle_conns = sizes
        .idle_conns
        .min((nofile as usize).saturating_sub(2_000) / 4);

    let sink = measure::sink().await?;
    let echo = measure::echo().await?;
    let source = testkit::target::Source::start().await?;
    let ports = PortSet::new([sink.port(), echo.port(), source.addr.port()]);

    // The tunnel PKI: two serving agents, and the idle ones of the memory figure.
    let dir = tempfile_dir()?;
    let mut agents: Vec<tunnel_server::pki::AgentSpec> = ["bench-quic", "bench-grpc"]
        .into_iter()
        .map(|n| tunnel_server::pki::AgentSpec {
            node: n.into(),
            ips: vec![],
        })
        .collect();
    agents.extend((0..idle_agents).map(|i| tunnel_server::pki::AgentSpec {
        node: format!("idle-{i}"),
        ips: vec![],
    }));
    let out = dir.path().join("pki");
    let pki = tokio::task::spawn_blocking(move || {
        tunnel_server::pki::init(&tunnel_server::pki::PkiRequest {
            out,
            server_sans: vec!["localhost".into(), "127.0.0.1".into()],
            agents,
            validity_days: 1,
        })
    })
    .await??;

    // Every server of the run: fresh ports, the same certificate.
    let serve_args = ServeArgs {
        tls: TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            ca: pki.ca_cert.clone(),
        },
        tunnel_port: 0,
        insecure_port: 0,
        meta_port: 0,
        max_streams: 20_000,
        ports: ports.iter().collect(),
        server_id: "bench".into(),
        peers: Vec::new(),
    };
    let server = ServerChild::start(serve_args.clone()).await?;
    // The agents of the measured paths run in processes of their own, as on a node (and as
    // rathole's client does); the many idle ones of sections 4 and 6 share this one.
    let agent_args = |index: usize, transport: TransportChoice| AgentArgs {
        server: server.tunnel,
        tls: agent_tls(&pki, index),
        transport,
        ports: vec![sink.port(), echo.port(), source.addr.port()],
    };
    let quic_agent = AgentChild::start(&agent_args(0, TransportChoice::Quic)).await?;
    let grpc_agent = AgentChild::start(&agent_args(1, TransportChoice::Grpc)).await?;

    let mut paths: Vec<(Column, Path)> = vec![
        (Column::Direct, Path::Direct),
        (
            Column::Quic,
            Path::Tunnel {
                front: server.front,
                node: "bench-quic".into(),
            },
        ),
        (
            Column::Grpc,
            Path::Tunnel {
                front: server.front,
                node: "bench-grpc".into(),
            },
        ),
    ];
    let rathole = if !columns.is_empty() && !columns.contains(&Column::Rathole) {
        None
    } else if rathole::available().await {
        match rathole::start(dir.path(), &pki, &[echo, sink, source.addr]).await {
            Ok(r) => {
                paths.push((
                    Column::Rathole,
                    Path::Rathole {
                        services: r.services.clone(),
                    },
                ));
                Some(r)
            }
            Err(e) => {
                report.skipped.push(format!("rathole column: {e:#}"));
                None
            }
        }
    } else {
        report
            .skipped
            .push("rathole column: `rathole` is not on the PATH (cargo install rathole)".into());
        None
    };
    if !columns.is_empty() {
        paths.retain(|(c, _)| columns.contains(c));
    }

    if sections.wants(1) {
        // 1. Bulk throughput.
        report.notes.push(format!(
            "bulk: {} MiB per transfer, median of {} runs",
            sizes.bulk_bytes >> 20,
            sizes.bulk_runs
        ));
        for streams in [1u64, 8] {
            for (dir, label) in [
                (Direction::Up, "client -> node"),
                (Direction::Down, "node -> client"),
            ] {
                let mut values = Vec::new();
                for (col, path) in &paths {
                    let mut runs = Vec::new();
                    for _ in 0..sizes.bulk_runs {
                        runs.push(
                            measure::bulk(path, dir, sink, &source, sizes.bulk_bytes, streams)
                                .await
                                .with_context(|| format!("bulk over {}", col.name()))?,
                        );
                    }
                    runs.sort_by(f64::total_cmp);
                    values.push((*col, runs[runs.len() / 2]));
                }
                report.add(
                    "1. bulk throughput",
                    format!(
                        "{streams} stream{}, {label}",
                        if streams > 1 { "s" } else { "" }
                    ),
                    "Gbit/s",
                    Better::Higher,
                    values,
                );
            }
        }
    }

    if sections.wants(2) {
        // 2. Round trips on kept connections.
        for size in [64usize, 1024] {
            for conc in [1usize, 64] {
                let per_conn = if conc == 1 {
                    sizes.rtt_single
                } else {
                    sizes.rtt_per_conn_64
                };
                let mut lat = Vec::new();
                for (col, path) in &paths {
                    let l = measure::round_trips(path, echo, size, conc, per_conn)
                        .await
                        .with_context(|| format!("round trips over {}", col.name()))?;
                    lat.push((*col, l));
                }
                for (q, qname) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
                    report.add(
                        "2. round trip on a kept connection",
                        format!("{size} B, {conc} concurrent, {qname}"),
                        "us",
                        Better::Lower,
                        lat.iter().map(|(c, l)| (*c, quantile_us(l, q))),
                    );
                }
            }
        }
    }

    if sections.wants(3) {
        // 3. New connection + one round trip.
        for conc in [1usize, 16] {
            let mut rows = Vec::new();
            let mut opens = Vec::new();
            for (col, path) in &paths {
                let open = "edge_tunnel_server_open_duration_seconds";
                let before = server.metric(&format!("{open}_sum"), &[]).await?;
                let count = server.metric(&format!("{open}_count"), &[]).await?;
                let (lat, rate) = measure::connects(path, echo, sizes.connects, conc)
                    .await
                    .with_context(|| format!("new connections over {}", col.name()))?;
                let opened = server.metric(&format!("{open}_count"), &[]).await? - count;
                if opened > 0.0 {
                    let spent = server.metric(&format!("{open}_sum"), &[]).await? - before;
                    opens.push((*col, spent / opened * 1e6));
                }
                rows.push((*col, lat, rate));
            }
            let section = "3. new connection + 64 B round trip";
            for (q, qname) in [(0.5, "p50"), (0.99, "p99")] {
                report.add(
                    section,
                    format!("{conc} at a time, {qname}"),
                    "us",
                    Better::Lower,
                    rows.iter().map(|(c, l, _)| (*c, quantile_us(l, q))),
                );
            }
            report.add(
                section,
                format!("{conc} at a time, rate"),
                "conn/s",
                Better::Higher,
                rows.iter().map(|(c, _, r)| (*c, *r)),
            );
            report.add(
                section,
                format!("{conc} at a time, of which stream open"),
                "us",
                Better::Lower,
                opens,
            );
        }
    }

    if sections.wants(5) {
        // 5. Head-of-line blocking (before the memory figures, which restart the server).
        let mut hol = Vec::new();
        for (col, path) in &paths {
            if matches!(col, Column::Quic | Column::Grpc) {
                let (without, with) = measure::head_of_line(path, &source, sizes.hol_each)
                    .await
                    .with_context(|| format!("head-of-line over {}", col.name()))?;
                hol.push((*col, with / without));
            }
        }
        report.add(
            "5. head-of-line: 10 streams with one stopped reader ÷ without",
            "throughput ratio",
            "ratio",
            Better::Higher,
            hol,
        );
    }

    // 4. Memory per idle proxied connection, at the server. Each figure on a fresh server
    // process: the heap left by the bulk runs would hide growth.
    drop((quic_agent, grpc_agent));
    drop(server);
    drop(rathole);
    if sections.wants(4) {
        report.notes.push(format!(
        "memory: {idle_conns} idle proxied connections; {} idle agents; each on a fresh server process",
        sizes.idle_agents
    ));
        let mut per_conn = Vec::new();
        for (col, choice, index, node) in [
            (Column::Quic, TransportChoice::Quic, 0, "bench-quic"),
            (Column::Grpc, TransportChoice::Grpc, 1, "bench-grpc"),
        ] {
            let server = ServerChild::start(serve_args.clone()).await?;
            let mut agent = RunningAgent::start(agent_config(
                server.tunnel,
                &agent_tls(&pki, index),
                choice,
                &ports,
            ));
            agent.connected().await?;
            let path = Path::Tunnel {
                front: server.front,
                node: node.into(),
            };
            let kib = idle_connections(&path, echo, idle_conns, || server.rss()).await?;
            per_conn.push((col, kib));
            agent.stop().await;
        }
        if paths.iter().any(|(c, _)| *c == Column::Rathole) {
            let fresh = rathole::start(dir.path(), &pki, &[echo]).await?;
            let path = Path::Rathole {
                services: fresh.services.clone(),
            };
            let kib = idle_connections(&path, echo, idle_conns, || fresh.server_rss()).await?;
            per_conn.push((Column::Rathole, kib));
        }
        report.add(
            "4. memory at the server",
            "per idle proxied connection",
            "KiB",
            Better::Lower,
            per_conn,
        );
    }

    if sections.wants(4) || sections.wants(6) {
        // 4 and 6: per idle agent, and the time for agents to serve again after a restart.
        let mut per_agent = Vec::new();
        let mut back_half = Vec::new();
        let mut back_all = Vec::new();
        for (col, choice, label) in [
            (Column::Quic, TransportChoice::Quic, "quic"),
            (Column::Grpc, TransportChoice::Grpc, "grpc"),
        ] {
            let mut server = ServerChild::start(serve_args.clone()).await?;
            let before = server.rss()?;
            let mut idle = Vec::with_capacity(sizes.idle_agents);
            for i in 0..sizes.idle_agents {
                idle.push(RunningAgent::start(agent_config(
                    server.tunnel,
                    &agent_tls(&pki, i + 2),
                    choice,
                    &ports,
                )));
            }
            sessions_reach(&server, label, sizes.idle_agents, Duration::from_secs(120)).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = server.rss()?;
            per_agent.push((
                col,
                after.saturating_sub(before) as f64 / sizes.idle_agents as f64 / 1024.0,
            ));

            server = server.restart().await?;
            let (half, all) =
                sessions_reach(&server, label, sizes.idle_agents, Duration::from_secs(120)).await?;
            back_half.push((col, half.as_secs_f64()));
            back_all.push((col, all.as_secs_f64()));
            for a in idle {
                a.stop().await;
            }
        }
        if sections.wants(4) {
            report.add(
                "4. memory at the server",
                "per idle agent",
                "KiB",
                Better::Lower,
                per_agent,
            );
        }
        if sections.wants(6) {
            let section = "6. server killed (no close) and restarted on the same ports";
            report.add(
                section,
                format!("until half of {} agents serve again", sizes.idle_agents),
                "s",
                Better::Lower,
                back_half,
            );
            report.add(
                section,
                format!("until all {} agents serve again", sizes.idle_agents),
                "s",
                Better::Lower,
                back_all,
            );
        }
    }

    if sections.wants(8) {
        let targets = replicas::Targets {
            sink,
            echo,
            source: &source,
            ports: &ports,
        };
        replicas::measure(&sizes, &mut report, &serve_args, &pki, &targets).await?;
    }

    if sections.wants(7) {
        report
            .skipped
            .push("7. compression: zstd streams are not built yet (issue [compress])".into());
    }

    if json {
        report.print_json();
    } else {
        report.print_table();
    }
    Ok(())
}

/// Opens `n` idle connections along `path` (one byte each way, so each is open end to end)
/// and returns the growth of `rss` per connection, KiB.
async fn idle_connections(
    path: &Path,
    echo: std::net::SocketAddr,
    n: usize,
    rss: impl Fn() -> anyhow::Result<u64>,
) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let before = rss()?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut tcp = path.connect(echo).await?;
        tcp.write_all(b"x").await?;
        tcp.read_u8().await?;
        held.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss()?;
    Ok(after.saturating_sub(before) as f64 / n as f64 / 1024.0)
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
    let path = std::env::temp_dir().join(format!("tunnel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(TempDir(path))
}

/// A directory removed when the run ends.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
