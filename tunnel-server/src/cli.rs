//! Command-line flags, kube-style (`--tunnel-port`, `--tls-cert-file`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tunnel_process::telemetry::LogArgs;

use crate::config::{DnsConfig, KubeSource, ObjectName, ServerConfig};
use crate::pki::{AgentSpec, PkiRequest};

/// edge-tunnel server: accepts agents from edge nodes and carries kubelet-bound traffic to them.
#[derive(Debug, Parser)]
#[command(name = "tunnel-server", version, about)]
pub struct Cli {
    /// A subcommand; without one, the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of the server.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Logging flags (for the server and its subcommands).
    #[command(flatten)]
    pub log: LogArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Certificate helpers for development and tests.
    Pki {
        /// What to do.
        #[command(subcommand)]
        action: PkiAction,
    },
}

/// `pki` actions.
#[derive(Debug, Subcommand)]
pub enum PkiAction {
    /// Write a CA, a server certificate and agent certificates.
    Init(PkiArgs),
}

/// Flags of `pki init`.
#[derive(Debug, Args)]
pub struct PkiArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Names and IPs of the server certificate, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub server_san: Vec<String>,
    /// An agent certificate: `NODE` or `NODE=IP,IP…`; repeatable.
    #[arg(long = "agent")]
    pub agents: Vec<AgentSpec>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub validity_days: u32,
}

impl PkiArgs {
    /// The request for [`crate::pki::init`].
    pub fn into_request(self) -> PkiRequest {
        PkiRequest {
            out: self.out,
            server_sans: self.server_san,
            agents: self.agents,
            validity_days: self.validity_days,
        }
    }
}

/// Flags of the server itself.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the tunnel and front listeners.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// UDP port for agents (QUIC).
    #[arg(long, default_value_t = 10262)]
    pub tunnel_port: u16,
    /// TLS passthrough front for kubelet 10250 (node from SNI).
    #[arg(long, default_value_t = 10263)]
    pub secure_port: u16,
    /// HTTP front and proxy (node and port from Host, absolute-form or CONNECT).
    #[arg(long, default_value_t = 10264)]
    pub insecure_port: u16,
    /// Address of the meta server.
    #[arg(long, default_value = "127.0.0.1")]
    pub meta_bind_address: IpAddr,
    /// Port of the meta server (/healthz, /readyz, /metrics).
    #[arg(long, default_value_t = 10265)]
    pub meta_port: u16,
    /// Server certificate (PEM) for the tunnel port.
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle (PEM) that agent certificates must chain to.
    #[arg(long)]
    pub client_ca_file: Option<PathBuf>,
    /// This replica's id (default: $HOSTNAME, else edge-tunnel-server).
    #[arg(long, env = "HOSTNAME", default_value = "edge-tunnel-server")]
    pub server_id: String,
    /// The replicas' tunnel ports, HOST:PORT, comma-separated or repeated; this replica finds
    /// itself among them. A request for a node whose agent is on another replica is forwarded
    /// to it over a peer link (QUIC, the serving certificate as identity).
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// A DNS name whose addresses are the replicas (the headless Service, e.g.
    /// x-tunnel-server-peers.kube-system.svc.cluster.local), re-resolved every 5 s; their
    /// tunnel port is --tunnel-port.
    #[arg(long)]
    pub peer_dns_name: Option<String>,
    /// The DNS server asked for --peer-dns-name, IP or IP:PORT (default: the nameservers of
    /// /etc/resolv.conf).
    #[arg(long, value_parser = parse_upstream)]
    pub peer_dns_server: Option<SocketAddr>,
    /// Node port reached through the TLS front.
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// Node port used on the HTTP front when a request names none.
    #[arg(long, default_value_t = 10255)]
    pub kubelet_read_only_port: u16,
    /// Tunnel transports to serve: quic (UDP), grpc (TCP), or both.
    #[arg(long, default_value = "quic,grpc")]
    pub transports: tunnel_core::Transports,
    /// Seconds open streams may run on after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_seconds: u64,
    /// Seconds /readyz says 503 after SIGTERM while everything still serves, so that load
    /// balancers stop sending new work before the listeners close (the drain follows).
    #[arg(long, default_value_t = 2)]
    pub shutdown_delay_seconds: u64,
    /// Longest pause, in seconds, between two pieces of a plain HTTP request's body on the
    /// HTTP front; past it the client gets 408. Upgrades and CONNECT tunnels are not affected.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_body_timeout_seconds: u64,
    /// The ConfigMap edge-tunnel-server-cfg mounted as a directory (keys dnat-ports-pair,
    /// http-proxy-ports, https-proxy-ports, localhost-proxy-ports), followed live.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Seconds an HTTP front client has to send a whole request head (idle keep-alive
    /// included).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_seconds: u64,
    /// Unix socket of the egress front (HTTP CONNECT, for kube-apiserver's egress selector).
    #[arg(long)]
    pub connect_uds: Option<PathBuf>,
    /// TCP port of the egress front with mutual TLS (HTTP CONNECT, for kube-apiserver's
    /// egress selector); needs --connect-client-ca-file.
    #[arg(long)]
    pub connect_port: Option<u16>,
    /// CA bundle (PEM) for the client certificates of --connect-port (kube-apiserver's).
    #[arg(long)]
    pub connect_client_ca_file: Option<PathBuf>,
    /// Most proxied connections one agent may carry at once (QUIC streams, or HTTP/2 streams
    /// of its gRPC link). Each can hold up to a 2 MiB window; the agent's whole link is capped
    /// at 16 MiB.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Flags of cluster DNS and the Kubernetes API.
    #[command(flatten)]
    pub dns: DnsArgs,
}

/// Whether the server talks to the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KubernetesMode {
    /// With --kubeconfig, that cluster; in a pod, the pod's own; else none.
    Auto,
    /// Never.
    Off,
}

/// Flags of cluster DNS: where the node records come from and where they go.
#[derive(Debug, Args)]
pub struct DnsArgs {
    /// Whether to use the Kubernetes API (Node watcher, records ConfigMap, tunnel Service's
    /// ports).
    #[arg(long, value_enum, default_value = "auto")]
    pub kubernetes: KubernetesMode,
    /// A kubeconfig for the Kubernetes API (default in a pod: its service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The Service in front of the fronts, NAMESPACE/NAME: its ClusterIP is what edge node
    /// names resolve to, and its ports are kept in step with the port configuration.
    #[arg(long, default_value = "kube-system/x-tunnel-server-internal-svc")]
    pub tunnel_service: ObjectName,
    /// The address edge node names resolve to, instead of the tunnel Service's ClusterIP
    /// (needed without a cluster).
    #[arg(long)]
    pub tunnel_service_ip: Option<IpAddr>,
    /// Label selector of the edge Nodes (`key=value`, `key!=value`, `key`, `!key`,
    /// `key in (a,b)`, comma-separated).
    #[arg(long, default_value = "alibabacloud.com/is-edge-worker=true")]
    pub edge_node_selector: String,
    /// The ConfigMap (NAMESPACE/NAME) the records are written to, key tunnel-nodes, for
    /// CoreDNS's hosts plugin; empty: none.
    #[arg(long, default_value = "kube-system/edge-tunnel-nodes")]
    pub dns_configmap: String,
    /// A file the records are written to (hosts format), replaced whole on each change.
    #[arg(long)]
    pub dns_hosts_file: Option<PathBuf>,
    /// Where the embedded DNS responder listens, UDP and TCP (e.g. 0.0.0.0:53).
    #[arg(long)]
    pub dns_listen: Option<SocketAddr>,
    /// Where the responder forwards names that are not nodes', IP or IP:PORT, comma-separated
    /// or repeated (default: the nameservers of /etc/resolv.conf).
    #[arg(long, value_delimiter = ',', value_parser = parse_upstream)]
    pub dns_upstream: Vec<SocketAddr>,
    /// The clients the DNS responder answers, CIDRs, comma-separated or repeated (default:
    /// loopback and the private ranges, 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7,
    /// fe80::/10); others are refused.
    #[arg(long, value_delimiter = ',')]
    pub dns_allow: Vec<ipnet::IpNet>,
}

/// `IP` (port 53) or `IP:PORT`.
fn parse_upstream(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{text:?} is not IP or IP:PORT"))
}

impl DnsArgs {
    /// The DNS configuration these flags describe; `in_pod` says whether the process runs in
    /// a pod (`KUBERNETES_SERVICE_HOST` is set).
    pub fn into_config(self, in_pod: bool) -> Result<DnsConfig, String> {
        let kubernetes = match (self.kubernetes, self.kubeconfig) {
            (KubernetesMode::Off, Some(_)) => {
                return Err("--kubeconfig with --kubernetes=off".into());
            }
            (KubernetesMode::Off, None) => None,
            (KubernetesMode::Auto, Some(path)) => Some(KubeSource::Kubeconfig(path)),
            (KubernetesMode::Auto, None) => in_pod.then_some(KubeSource::InCluster),
        };
        let configmap = match self.dns_configmap.trim() {
            "" => None,
            name => Some(name.parse().map_err(|e| format!("--dns-configmap: {e}"))?),
        };
        Ok(DnsConfig {
            kubernetes,
            tunnel_service: self.tunnel_service,
            tunnel_service_ip: self.tunnel_service_ip,
            edge_node_selector: self.edge_node_selector,
            configmap,
            hosts_file: self.dns_hosts_file,
            listen: self.dns_listen,
            upstream: self.dns_upstream,
            allow: if self.dns_allow.is_empty() {
                DnsConfig::default().allow
            } else {
                self.dns_allow
            },
        })
    }
}

impl ServeArgs {
    /// The server configuration these flags describe (not yet validated).
    pub fn into_config(self) -> Result<ServerConfig, String> {
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let dns = self.dns.into_config(in_pod)?;
        Ok(ServerConfig {
            bind_address: self.bind_address,
            tunnel_port: self.tunnel_port,
            secure_port: self.secure_port,
            insecure_port: self.insecure_port,
            meta_bind_address: self.meta_bind_address,
            meta_port: self.meta_port,
            tls_cert_file: self.tls_cert_file,
            tls_private_key_file: self.tls_private_key_file,
            client_ca_file: self.client_ca_file,
            server_id: self.server_id,
            kubelet_port: self.kubelet_port,
            kubelet_read_only_port: self.kubelet_read_only_port,
            drain_timeout: Duration::from_secs(self.drain_timeout_seconds),
            shutdown_delay: Duration::from_secs(self.shutdown_delay_seconds),
            request_body_timeout: Duration::from_secs(self.request_body_timeout_seconds),
            header_timeout: Duration::from_secs(self.header_timeout_seconds),
            config_dir: self.config_dir,
            connect_uds: self.connect_uds,
            connect_port: self.connect_port,
            connect_client_ca_file: self.connect_client_ca_file,
            transports: self.transports,
            session: tunnel_core::SessionConfig {
                max_streams: self.max_concurrent_streams,
                ..tunnel_core::SessionConfig::default()
            },
            dns,
            peers: crate::config::PeerConfig {
                peers: self.peers,
                dns_name: self.peer_dns_name,
                dns_server: self.peer_dns_server,
            },
            ..ServerConfig::default()
        })
    }
}

/// The `tunnel-server` program: `pki init`, or flags, logging, metrics, then the server until
/// SIGTERM or Ctrl-C. Kept here so that test harnesses run the very same program as a child
/// process (and can kill it).
pub fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    use tunnel_process::{signal, telemetry};

    let cli = Cli::parse();
    telemetry::init_logging(cli.log.log_format)?;
    if let Some(Command::Pki {
        action: PkiAction::Init(args),
    }) = cli.command
    {
        let out = args.out.clone();
        let files = crate::pki::init(&args.into_request())
            .with_context(|| format!("writing PKI to {}", out.display()))?;
        println!("wrote {}", files.ca_cert.display());
        println!(
            "wrote {} / {}",
            files.server_cert.display(),
            files.server_key.display()
        );
        for (node, crt, key) in &files.agents {
            println!("wrote {node}: {} / {}", crt.display(), key.display());
        }
        return Ok(());
    }
    let mut config = cli
        .serve
        .into_config()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    config.validate().context("invalid configuration")?;
    config.metrics = Some(telemetry::install_recorder()?);
    signal::run_until_signal(|shutdown| crate::run(config, shutdown))
        .context("starting the runtime")?
        .context("tunnel server")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn dns(args: &[&str], in_pod: bool) -> Result<DnsConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("tunnel-server").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.serve.dns.into_config(in_pod)
    }

    #[test]
    fn kubernetes_is_the_kubeconfig_the_pod_or_nothing() {
        assert_eq!(dns(&[], false).unwrap().kubernetes, None);
        assert_eq!(
            dns(&[], true).unwrap().kubernetes,
            Some(KubeSource::InCluster)
        );
        assert_eq!(
            dns(&["--kubeconfig", "/k"], true).unwrap().kubernetes,
            Some(KubeSource::Kubeconfig("/k".into()))
        );
        assert_eq!(
            dns(&["--kubernetes", "off"], true).unwrap().kubernetes,
            None
        );
        assert!(dns(&["--kubernetes", "off", "--kubeconfig", "/k"], false).is_err());
    }

    #[test]
    fn dns_flags_parse() {
        let config = dns(
            &[
                "--dns-upstream",
                "127.0.0.53,10.0.0.10:5353",
                "--dns-upstream",
                "::1",
                "--dns-configmap",
                "",
                "--tunnel-service",
                "edge/tunnel",
            ],
            false,
        )
        .unwrap();
        let upstream: Vec<String> = config.upstream.iter().map(ToString::to_string).collect();
        assert_eq!(upstream, ["127.0.0.53:53", "10.0.0.10:5353", "[::1]:53"]);
        assert_eq!(config.configmap, None);
        assert_eq!(config.tunnel_service.to_string(), "edge/tunnel");
        let default = dns(&[], false).unwrap();
        assert_eq!(
            default.configmap.map(|c| c.to_string()).as_deref(),
            Some("kube-system/edge-tunnel-nodes")
        );
        for bad in [
            &["--dns-upstream", "resolver"][..],
            &["--tunnel-service", "no-namespace"],
            &["--dns-configmap", "Kube_System/x"],
        ] {
            assert!(dns(bad, false).is_err(), "{bad:?}");
        }
    }
}
