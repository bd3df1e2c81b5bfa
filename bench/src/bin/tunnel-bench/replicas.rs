//! Section 8: three replicas that forward to each other, with idle agents spread over them.
//! What forwarding costs: the same request through the replica that holds the node's agent
//! and through another one (one peer-link hop more), in one run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::target::Source;
use tunnel_core::{PortSet, TransportChoice};

use crate::child::{AgentArgs, AgentChild, ServeArgs, ServerChild};
use crate::measure::{self, Direction, quantile_us};
use crate::paths::{Column, Path};
use crate::report::{Better, Report};
use crate::{RunningAgent, Sizes, agent_config, agent_tls, sessions_reach};

const SECTION: &str =
    "8. three replicas: through the replica holding the agent, and forwarded by another";

/// The targets of the measured paths.
pub(crate) struct Targets<'a> {
    pub(crate) sink: SocketAddr,
    pub(crate) echo: SocketAddr,
    pub(crate) source: &'a Source,
    pub(crate) ports: &'a PortSet,
}

/// Starts three replicas listing one another as peers, the two measured agents (QUIC and
/// gRPC) on the first, `agents_per_replica` idle agents on each, and measures round trips
/// and one stream's throughput through the first replica (holding) and the second
/// (forwarding).
pub(crate) async fn measure(
    sizes: &Sizes,
    report: &mut Report,
    serve: &ServeArgs,
    pki: &tunnel_server::pki::PkiFiles,
    targets: &Targets<'_>,
) -> anyhow::Result<()> {
    let tunnel_ports: Vec<u16> = (0..3)
        .map(|_| testkit::free_port_on(&["127.0.0.1"]))
        .collect();
    let peers: Vec<String> = tunnel_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let mut replicas = Vec::new();
    for (i, port) in tunnel_ports.iter().enumerate() {
        let args = ServeArgs {
            tunnel_port: *port,
            server_id: format!("replica-{i}"),
            peers: peers.clone(),
            ..serve.clone()
        };
        replicas.push(ServerChild::start(args).await?);
    }
    let ports: Vec<u16> = targets.ports.iter().collect();
    let measured = |index: usize, transport| AgentArgs {
        server: replicas[0].tunnel,
        tls: agent_tls(pki, index),
        transport,
        ports: ports.clone(),
    };
    let _quic = AgentChild::start(&measured(0, TransportChoice::Quic)).await?;
    let _grpc = AgentChild::start(&measured(1, TransportChoice::Grpc)).await?;
    let per = sizes.agents_per_replica;
    let mut idle = Vec::with_capacity(3 * per);
    for i in 0..3 * per {
        idle.push(RunningAgent::start(agent_config(
            replicas[i % 3].tunnel,
            &agent_tls(pki, i + 2),
            TransportChoice::Quic,
            targets.ports,
        )));
    }
    for (i, replica) in replicas.iter().enumerate() {
        // The first also holds the measured QUIC agent.
        let want = per + usize::from(i == 0);
        sessions_reach(replica, "quic", want, Duration::from_secs(120))
            .await
            .with_context(|| format!("idle agents on replica {i}"))?;
    }
    report.notes.push(format!(
        "replicas: 3, {per} idle QUIC agents on each; the measured agents on the first"
    ));

    let path = |replica: usize, node: &str| Path::Tunnel {
        front: replicas[replica].front,
        node: node.into(),
    };
    for node in ["bench-quic", "bench-grpc"] {
        linked(&path(1, node), targets.echo).await?;
    }
    let mut rtt = Vec::new();
    let mut bulk = Vec::new();
    for (col, node) in [(Column::Quic, "bench-quic"), (Column::Grpc, "bench-grpc")] {
        let mut lat = Vec::new();
        let mut speed = Vec::new();
        for replica in [0, 1] {
            lat.push(
                measure::round_trips(&path(replica, node), targets.echo, 64, 1, sizes.rtt_single)
                    .await
                    .with_context(|| format!("round trips via replica {replica} to {node}"))?,
            );
            let mut runs = Vec::new();
            for _ in 0..sizes.bulk_runs {
                runs.push(
                    measure::bulk(
                        &path(replica, node),
                        Direction::Down,
                        targets.sink,
                        targets.source,
                        sizes.bulk_bytes,
                        1,
                    )
                    .await
                    .with_context(|| format!("bulk via replica {replica} to {node}"))?,
                );
            }
            runs.sort_by(f64::total_cmp);
            speed.push(runs[runs.len() / 2]);
        }
        rtt.push((col, lat));
        bulk.push((col, speed));
    }
    for (q, qname) in [(0.5, "p50"), (0.99, "p99")] {
        for (replica, via) in [(0, "on the holder"), (1, "forwarded")] {
            report.add(
                SECTION,
                format!("64 B round trip {qname}, {via}"),
                "us",
                Better::Lower,
                rtt.iter().map(|(c, l)| (*c, quantile_us(&l[replica], q))),
            );
        }
        report.add(
            SECTION,
            format!("64 B round trip {qname}, fwd ÷ hold"),
            "ratio",
            Better::Lower,
            rtt.iter()
                .map(|(c, l)| (*c, quantile_us(&l[1], q) / quantile_us(&l[0], q))),
        );
    }
    for (replica, via) in [(0, "on the holder"), (1, "forwarded")] {
        report.add(
            SECTION,
            format!("1 stream down, {via}"),
            "Gbit/s",
            Better::Higher,
            bulk.iter().map(|(c, s)| (*c, s[replica])),
        );
    }
    report.add(
        SECTION,
        "1 stream down, fwd ÷ hold",
        "ratio",
        Better::Higher,
        bulk.iter().map(|(c, s)| (*c, s[1] / s[0])),
    );
    for agent in idle {
        agent.stop().await;
    }
    Ok(())
}

/// Waits until `path` (through a replica that forwards) carries a round trip: the replicas
/// link to each other within their redial backoff.
async fn linked(path: &Path, echo: SocketAddr) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match measure::round_trips(path, echo, 64, 1, 1).await {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                bail!("no forwarded round trip after 30 s: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
