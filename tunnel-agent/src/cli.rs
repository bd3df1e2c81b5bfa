//! Command-line flags, kube-style.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;
use tunnel_core::PortSet;
use tunnel_process::telemetry::LogArgs;

use crate::config::AgentConfig;

/// edge-tunnel agent: dials out to the tunnel server and serves this node's allowed ports.
#[derive(Debug, Parser)]
#[command(name = "tunnel-agent", version, about)]
pub struct Cli {
    /// The tunnel server, HOST:PORT (every address HOST resolves to is tried).
    #[arg(long)]
    pub server_address: String,
    /// Name to verify in the server certificate (default: HOST of --server-address).
    #[arg(long)]
    pub server_name: Option<String>,
    /// This node's name (the server registers the name in the certificate).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// This node's IP; repeatable; each must be an IP SAN of the certificate (default: all of
    /// them).
    #[arg(long = "node-ip", env = "NODE_IP", value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
    /// Agent certificate (PEM).
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// Agent private key (PEM).
    #[arg(long)]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle (PEM) for the server certificate.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Address of the meta server.
    #[arg(long, default_value = "127.0.0.1")]
    pub meta_bind_address: IpAddr,
    /// Port of the meta server (/healthz, /readyz, /metrics); 0 turns it off.
    #[arg(long, default_value_t = 10266)]
    pub meta_port: u16,
    /// Ports dialed on the node's own IPs. The server's port policy decides; this flag narrows
    /// it (never widens). With a server that sends no policy: this, or 10250,10255.
    #[arg(long)]
    pub allowed_ports: Option<PortSet>,
    /// Transport to the server: auto (QUIC, else gRPC over TLS/TCP), quic or grpc.
    #[arg(long, default_value = "auto")]
    pub transport: tunnel_core::TransportChoice,
    /// Sessions kept at once, each to a distinct server replica (through the same
    /// --server-address): with 2, the node stays served when one replica goes, without a
    /// reconnect. 1 to 8.
    #[arg(long, default_value_t = 1)]
    pub server_redundancy: usize,
    /// With --transport auto running over gRPC: seconds between attempts to move back to QUIC
    /// (open streams finish on gRPC).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub quic_retry_interval_seconds: u64,
    /// Most QUIC streams the server may open to this agent at once (its stream credit; the
    /// smaller of this and the server's --max-concurrent-streams is the limit). Over gRPC the
    /// server's limit governs.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Ports dialed on 127.0.0.1 instead of the node IP. The server's port policy decides;
    /// this flag narrows it (never widens). With a server that sends no policy: this, or
    /// 10250,10255,10266,10267.
    #[arg(long)]
    pub localhost_proxy_ports: Option<PortSet>,
    /// Logging flags.
    #[command(flatten)]
    pub log: LogArgs,
}

impl Cli {
    /// The agent configuration these flags describe (not yet validated).
    pub fn into_config(self) -> AgentConfig {
        AgentConfig {
            server_address: self.server_address,
            server_name: self.server_name,
            node_name: self.node_name,
            node_ips: self.node_ips,
            tls_cert_file: self.tls_cert_file,
            tls_private_key_file: self.tls_private_key_file,
            ca_file: self.ca_file,
            meta_bind_address: self.meta_bind_address,
            meta_port: self.meta_port,
            allowed_ports: self.allowed_ports,
            localhost_proxy_ports: self.localhost_proxy_ports,
            transport: self.transport,
            server_redundancy: self.server_redundancy,
            quic_retry_interval: std::time::Duration::from_secs(self.quic_retry_interval_seconds),
            session: tunnel_core::SessionConfig {
                max_streams: self.max_concurrent_streams,
                ..tunnel_core::SessionConfig::default()
            },
            ..AgentConfig::default()
        }
    }
}

/// The `tunnel-agent` program: flags, logging, metrics, then the agent until SIGTERM or
/// Ctrl-C. Kept here so that test harnesses run the very same program as a child process.
pub fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::Parser;
    use tunnel_process::{signal, telemetry};

    let cli = Cli::parse();
    telemetry::init_logging(cli.log.log_format)?;
    let mut config = cli.into_config();
    config.validate().context("invalid configuration")?;
    config.metrics = Some(telemetry::install_recorder()?);
    signal::run_until_signal(|shutdown| crate::run(config, shutdown))
        .context("starting the runtime")?
        .context("tunnel agent")
}
