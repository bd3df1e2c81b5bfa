//! The server under test runs in a child process (this binary, `serve` mode), so that its
//! memory is its own: the harness reads the child's RSS, kills it and starts it again on the
//! same ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tunnel_agent::{Agent, AgentConfig, AgentStatus};
use tunnel_core::PortSet;
use tunnel_core::TransportChoice;

/// A certificate, its key, and the CA that verifies the peer.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TlsFiles {
    #[arg(long)]
    pub(crate) cert: PathBuf,
    #[arg(long)]
    pub(crate) key: PathBuf,
    #[arg(long)]
    pub(crate) ca: PathBuf,
}

impl TlsFiles {
    fn add_to(&self, cmd: &mut Command) {
        cmd.args(["--cert".as_ref(), self.cert.as_os_str()])
            .args(["--key".as_ref(), self.key.as_os_str()])
            .args(["--ca".as_ref(), self.ca.as_os_str()]);
    }
}

/// What `serve` needs: the server's TLS files and its ports (0: the kernel picks).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) tls: TlsFiles,
    #[arg(long, default_value_t = 0)]
    pub(crate) tunnel_port: u16,
    #[arg(long, default_value_t = 0)]
    pub(crate) insecure_port: u16,
    #[arg(long, default_value_t = 0)]
    pub(crate) meta_port: u16,
    /// Streams per agent (the load needs more than the default 1,000 on one agent).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) max_streams: u32,
    /// The node ports served (on the nodes' loopback): the targets of the measured paths.
    #[arg(long, value_delimiter = ',')]
    pub(crate) ports: Vec<u16>,
    /// This replica's id.
    #[arg(long, default_value = "bench")]
    pub(crate) server_id: String,
    /// The replicas' tunnel ports (`HOST:PORT`): section 8 runs three that forward.
    #[arg(long, value_delimiter = ',')]
    pub(crate) peers: Vec<String>,
}

/// What `agent` needs: the server, the agent's TLS files, and the ports it may dial.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AgentArgs {
    #[arg(long)]
    pub(crate) server: SocketAddr,
    #[command(flatten)]
    pub(crate) tls: TlsFiles,
    #[arg(long)]
    pub(crate) transport: TransportChoice,
    /// Ports the agent may dial on loopback.
    #[arg(long, value_delimiter = ',')]
    pub(crate) ports: Vec<u16>,
}

/// Runs an agent in this process, as the agent binary does (with its metrics recorder),
/// until the harness exits; prints `READY` once it is connected.
pub(crate) async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let ports = PortSet::new(args.ports.iter().copied());
    let config = AgentConfig {
        metrics: Some(
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .context("metrics recorder")?,
        ),
        ..crate::agent_config(args.server, &args.tls, args.transport, &ports)
    };
    let agent = Agent::new(config);
    let mut status = agent.status();
    let ready = async move {
        if status
            .wait_for(|s| matches!(s, AgentStatus::Connected { .. }))
            .await
            .is_ok()
        {
            println!("READY");
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        r = agent.run(until_parent_exits()) => r.context("agent")?,
        () = ready => {}
    }
    Ok(())
}

/// An agent child process, connected.
pub(crate) struct AgentChild {
    _child: Child,
}

impl AgentChild {
    /// Starts `agent` and waits until it is connected.
    pub(crate) async fn start(args: &AgentArgs) -> anyhow::Result<Self> {
        let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
        let (child, line) = spawn_self(|cmd| {
            cmd.arg("agent")
                .args(["--server", &args.server.to_string()]);
            args.tls.add_to(cmd);
            cmd.args(["--transport", args.transport.as_str()])
                .args(["--ports", &ports.join(",")]);
        })
        .await
        .context("agent child")?;
        if line.trim() != "READY" {
            bail!("unexpected line from the agent child: {line}");
        }
        Ok(Self { _child: child })
    }
}

/// Runs the server in this process until killed; prints `READY tunnel insecure meta`.
pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let loopback = "127.0.0.1".parse().expect("address");
    let config = tunnel_server::ServerConfig {
        bind_address: loopback,
        meta_bind_address: loopback,
        tunnel_port: args.tunnel_port,
        secure_port: 0,
        insecure_port: args.insecure_port,
        meta_port: args.meta_port,
        tls_cert_file: Some(args.tls.cert),
        tls_private_key_file: Some(args.tls.key),
        client_ca_file: Some(args.tls.ca),
        server_id: args.server_id.clone(),
        peers: tunnel_server::config::PeerConfig {
            peers: args.peers.clone(),
            dns_name: None,
            dns_server: None,
        },
        ports: Some(
            tunnel_core::PortConfig::parse(
                [(
                    tunnel_core::route::config::LOCALHOST_PROXY_PORTS,
                    PortSet::new(args.ports.iter().copied())
                        .to_string()
                        .as_str(),
                )],
                tunnel_core::route::config::FixedPorts::default(),
            )
            .context("--ports")?,
        ),
        max_front_connections: 40_000,
        drain_timeout: Duration::from_millis(100),
        shutdown_delay: Duration::ZERO,
        session: crate::session_config(args.max_streams),
        metrics: Some(
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .context("metrics recorder")?,
        ),
        ..tunnel_server::ServerConfig::default()
    };
    let server = tunnel_server::Server::bind(config).await?;
    println!(
        "READY {} {} {}",
        server.tunnel_addr(),
        server.insecure_addr(),
        server.meta_addr().context("meta address")?
    );
    server.run(until_parent_exits()).await?;
    Ok(())
}

/// Starts this executable with the arguments `args` adds, its stdin held open (the child
/// exits when it closes: see [`until_parent_exits`]), and returns it with its first line of
/// output, which says it is ready.
async fn spawn_self(args: impl FnOnce(&mut Command)) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe().context("own executable")?;
    let mut cmd = Command::new(exe);
    args(&mut cmd);
    cmd.stdout(Stdio::piped())
        .stdin(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawn")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("not ready within 30 s")??
        .context("exited before it was ready")?;
    // Keep reading so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, line))
}

/// Resolves when the harness that started this child is gone, however it went (a signal, an
/// interrupted profiling run): the stdin pipe it holds closes. The child then ends instead
/// of lingering on its ports. The blocking read runs on a thread of its own, not the
/// runtime's blocking pool, so that a child ending on an error is not held by it.
async fn until_parent_exits() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let _ = rx.await;
}

/// A server child process.
pub(crate) struct ServerChild {
    child: Child,
    args: ServeArgs,
    /// The tunnel port (UDP and TCP).
    pub(crate) tunnel: SocketAddr,
    /// The HTTP front.
    pub(crate) front: SocketAddr,
    /// The meta server (`/metrics`).
    pub(crate) meta: SocketAddr,
}

impl ServerChild {
    /// Starts `serve` and waits for its READY line.
    pub(crate) async fn start(args: ServeArgs) -> anyhow::Result<Self> {
        let (child, line) = spawn_self(|cmd| {
            cmd.arg("serve");
            args.tls.add_to(cmd);
            cmd.args(["--tunnel-port", &args.tunnel_port.to_string()])
                .args(["--insecure-port", &args.insecure_port.to_string()])
                .args(["--meta-port", &args.meta_port.to_string()])
                .args(["--max-streams", &args.max_streams.to_string()])
                .args(["--server-id", &args.server_id]);
            if !args.peers.is_empty() {
                cmd.args(["--peers", &args.peers.join(",")]);
            }
            if !args.ports.is_empty() {
                cmd.args([
                    "--ports",
                    &PortSet::new(args.ports.iter().copied()).to_string(),
                ]);
            }
        })
        .await
        .context("server child")?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [_, tunnel, front, meta] = parts[..] else {
            bail!("unexpected line from the server child: {line}");
        };
        let mut args = args;
        let (tunnel, front, meta): (SocketAddr, SocketAddr, SocketAddr) =
            (tunnel.parse()?, front.parse()?, meta.parse()?);
        // A restart binds the same ports.
        args.tunnel_port = tunnel.port();
        args.insecure_port = front.port();
        args.meta_port = meta.port();
        Ok(Self {
            child,
            args,
            tunnel,
            front,
            meta,
        })
    }

    /// The child's resident memory, bytes.
    pub(crate) fn rss(&self) -> anyhow::Result<u64> {
        let pid = self.child.id().context("child gone")?;
        crate::memory::rss_of(pid)
    }

    /// Kills the child (as a crash would) and starts a new one on the same ports.
    pub(crate) async fn restart(mut self) -> anyhow::Result<Self> {
        self.child.kill().await?;
        let args = self.args.clone();
        drop(self);
        let mut last = None;
        // The kernel frees the ports at once after a kill; retry briefly in case it lags.
        for _ in 0..50 {
            match Self::start(args.clone()).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("restart failed")))
    }

    /// The value of a metric in the child's `/metrics`, summed over series with `labels`.
    pub(crate) async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let tcp = tokio::net::TcpStream::connect(self.meta).await?;
        let mut sender = testkit::client::http1(tcp).await?;
        let (status, body) = testkit::client::get(&mut sender, "meta", "/metrics").await?;
        if status != 200 {
            bail!("metrics answered {status}");
        }
        Ok(testkit::metric_value(
            &String::from_utf8_lossy(&body),
            name,
            labels,
        ))
    }
}
