//! Server configuration: what the flags set, validated before anything binds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tunnel_core::Transports;

use metrics_exporter_prometheus::PrometheusHandle;
use tunnel_core::SessionConfig;
use tunnel_core::copy::CopyConfig;
pub use tunnel_process::ConfigError;

/// Everything [`crate::run`] needs. Defaults are the production values (ports as in ACK@Edge).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the tunnel and front listeners. Default 0.0.0.0.
    pub bind_address: IpAddr,
    /// UDP port of the QUIC tunnel (agents). Default 10262.
    pub tunnel_port: u16,
    /// TLS passthrough front: SNI names the node, traffic goes to its kubelet port. Default 10263.
    pub secure_port: u16,
    /// HTTP front: Host, absolute-form or CONNECT names node and port. Default 10264.
    pub insecure_port: u16,
    /// Address of the meta server. Default 127.0.0.1.
    pub meta_bind_address: IpAddr,
    /// Port of the meta server (/healthz, /readyz, /metrics). Default 10265. As for every port
    /// here, 0 lets the kernel pick one.
    pub meta_port: u16,
    /// Server certificate chain for the tunnel port (PEM).
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle that agent certificates must chain to (PEM).
    pub client_ca_file: Option<PathBuf>,
    /// This replica's id, told to agents. Default: the host name.
    pub server_id: String,
    /// Node port behind the TLS front. Default 10250 (kubelet).
    pub kubelet_port: u16,
    /// Port used on the HTTP front when the request names none. Default 10255 (kubelet
    /// read-only).
    pub kubelet_read_only_port: u16,
    /// Agent link settings.
    pub session: SessionConfig,
    /// Copy loop settings for proxied connections.
    pub copy: CopyConfig,
    /// Time a client has to send its ClientHello, or its CONNECT head on the egress front.
    /// Default 10 s.
    pub sniff_timeout: Duration,
    /// Time a client of the HTTP front has to send a whole request head, the wait on an idle
    /// keep-alive connection included: a client that trickles its head (a byte every few
    /// seconds) is closed when it runs out. Default 30 s.
    pub header_timeout: Duration,
    /// The ConfigMap `edge-tunnel-server-cfg` mounted as a directory (one file per key),
    /// followed live. `None`: [`ports`](Self::ports), or the defaults.
    pub config_dir: Option<PathBuf>,
    /// The port configuration when there is no `config_dir` (an embedding program's own).
    /// `None`: the defaults (the kubelet's ports, localhost-proxy-ports 10250, 10255, 10266,
    /// 10267).
    pub ports: Option<tunnel_core::PortConfig>,
    /// A Unix socket where the egress front listens: HTTP CONNECT, as kube-apiserver's
    /// `EgressSelectorConfiguration` speaks it over `uds`. The socket is made mode 0660.
    pub connect_uds: Option<PathBuf>,
    /// A TCP port where the egress front listens with mutual TLS (the server's certificate,
    /// clients from `connect_client_ca_file`). `None`: off.
    pub connect_port: Option<u16>,
    /// CA bundle (PEM) that clients of `connect_port` (kube-apiserver) must chain to. Use a CA
    /// apart from the agents': an agent's certificate must not open streams to other nodes.
    pub connect_client_ca_file: Option<PathBuf>,
    /// Longest pause between two pieces of a plain HTTP request's body (not an upgrade's, not
    /// a CONNECT tunnel's): past it the client gets 408 and the node's stream is reset, so
    /// that a slow sender cannot hold one of the node's streams for the copy's idle timeout.
    /// Default 60 s.
    pub request_body_timeout: Duration,
    /// Most client connections per front at once; more wait in the kernel's backlog.
    /// Default 10,000 (each costs two copy buffers, 64 KiB, while moving data).
    pub max_front_connections: usize,
    /// On shutdown, how long open streams may finish. Default 30 s.
    pub drain_timeout: Duration,
    /// On shutdown, how long `/readyz` says 503 while everything still serves, before the
    /// listeners stop and the drain begins: load balancers take the replica out of rotation
    /// first, so that no client reaches a closing listener. Default 2 s (a health check of a
    /// second, failing once, and room).
    pub shutdown_delay: Duration,
    /// Which tunnel transports to serve. Default both: QUIC on UDP and gRPC on TCP, at the
    /// same port number.
    pub transports: Transports,
    /// Renders `/metrics`; `None` serves 404 there (the embedding program owns the recorder).
    pub metrics: Option<PrometheusHandle>,
    /// Cluster DNS: the node records, where they come from and where they go.
    pub dns: DnsConfig,
    /// The other replicas, for requests whose node's agent is on one of them.
    pub peers: PeerConfig,
}

/// Where the other replicas are. With neither set, this replica serves its own agents only.
/// Peer links run over QUIC on the replicas' tunnel ports, each replica presenting its serving
/// certificate, which must carry the replica mark (`tunnel-server pki init` writes it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerConfig {
    /// `HOST:PORT` of every replica's tunnel port; this replica finds itself among them (by
    /// the server id a link to itself answers with) and skips itself.
    pub peers: Vec<String>,
    /// A DNS name whose A/AAAA records are the replicas (the headless Service), re-resolved
    /// every 5 s; their tunnel port is this replica's.
    pub dns_name: Option<String>,
    /// The DNS server asked for `dns_name`. `None`: the nameservers of `/etc/resolv.conf`.
    pub dns_server: Option<SocketAddr>,
}

impl PeerConfig {
    /// Whether any peer is configured.
    pub fn is_set(&self) -> bool {
        !self.peers.is_empty() || self.dns_name.is_some()
    }

    /// The static list as host and port, checked.
    pub(crate) fn statics(&self) -> Result<Vec<(String, u16)>, ConfigError> {
        self.peers
            .iter()
            .map(|entry| {
                let invalid = |why: &str| ConfigError::Invalid {
                    what: "--peers",
                    why: format!("{entry:?}: {why}"),
                };
                let (host, port) = entry
                    .rsplit_once(':')
                    .ok_or_else(|| invalid("not HOST:PORT"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid("port is not 1-65535"))?;
                if host.parse::<IpAddr>().is_err() && !crate::dns::is_dns1123_subdomain(host) {
                    return Err(invalid("host is neither an IP nor a DNS name"));
                }
                Ok((host.to_owned(), port))
            })
            .collect()
    }
}

/// A namespaced Kubernetes object, written `NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::str::FromStr for ObjectName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not NAMESPACE/NAME"))?;
        for part in [namespace, name] {
            if !crate::dns::is_dns1123_subdomain(part) {
                return Err(format!("{part:?} in {s:?} is not a valid Kubernetes name"));
            }
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How the server reaches the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeSource {
    /// The pod's service account (`KUBERNETES_SERVICE_HOST` and the mounted token).
    InCluster,
    /// A kubeconfig file.
    Kubeconfig(PathBuf),
}

/// Cluster DNS: which node names resolve where, and who is told.
///
/// With a cluster ([`kubernetes`](Self::kubernetes)), the records cover every Node: edge nodes
/// (those [`edge_node_selector`](Self::edge_node_selector) selects) resolve to the tunnel
/// Service's ClusterIP, cloud nodes to their InternalIP (ExternalIP when they have none), and
/// the server keeps the tunnel Service's ports in step with the port configuration. Without
/// one, the records are the connected agents' nodes, resolving to
/// [`tunnel_service_ip`](Self::tunnel_service_ip).
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The Kubernetes API, or `None` for no cluster.
    pub kubernetes: Option<KubeSource>,
    /// The Service in front of the server's fronts (`x-tunnel-server-internal-svc`).
    pub tunnel_service: ObjectName,
    /// The address edge node names resolve to. `None`: the tunnel Service's ClusterIP (needs
    /// a cluster).
    pub tunnel_service_ip: Option<IpAddr>,
    /// Label selector of edge nodes (`key=value`, `key!=value`, `key`, `!key`, comma-separated).
    pub edge_node_selector: String,
    /// The ConfigMap the records are written to, key `tunnel-nodes` (with a cluster only).
    pub configmap: Option<ObjectName>,
    /// A hosts file the records are written to (dnsmasq's `--hostsdir`, or CoreDNS's hosts
    /// plugin on a node without the ConfigMap).
    pub hosts_file: Option<PathBuf>,
    /// Where the embedded DNS responder listens (UDP and TCP).
    pub listen: Option<SocketAddr>,
    /// Where the responder forwards names that are not nodes'. Empty: the nameservers of
    /// `/etc/resolv.conf`.
    pub upstream: Vec<SocketAddr>,
    /// The clients the responder answers ([`DEFAULT_DNS_ALLOW`] by default): a resolver open to
    /// the internet would be a reflector for attacks on third parties.
    pub allow: Vec<ipnet::IpNet>,
}

/// The networks the DNS responder answers by default: loopback, the private and shared
/// address ranges pod and Service networks use, and their IPv6 counterparts.
pub const DEFAULT_DNS_ALLOW: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            kubernetes: None,
            tunnel_service: ObjectName {
                namespace: "kube-system".into(),
                name: "x-tunnel-server-internal-svc".into(),
            },
            tunnel_service_ip: None,
            edge_node_selector: "alibabacloud.com/is-edge-worker=true".into(),
            configmap: Some(ObjectName {
                namespace: "kube-system".into(),
                name: "edge-tunnel-nodes".into(),
            }),
            hosts_file: None,
            listen: None,
            upstream: Vec::new(),
            allow: DEFAULT_DNS_ALLOW
                .iter()
                .filter_map(|net| net.parse().ok())
                .collect(),
        }
    }
}

impl DnsConfig {
    /// Whether anything reads the records.
    pub fn has_sink(&self) -> bool {
        self.hosts_file.is_some()
            || self.listen.is_some()
            || (self.kubernetes.is_some() && self.configmap.is_some())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            tunnel_port: 10262,
            secure_port: 10263,
            insecure_port: 10264,
            meta_bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            meta_port: 10265,
            tls_cert_file: None,
            tls_private_key_file: None,
            client_ca_file: None,
            server_id: "edge-tunnel-server".into(),
            kubelet_port: 10250,
            kubelet_read_only_port: 10255,
            session: SessionConfig::default(),
            copy: CopyConfig::default(),
            sniff_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            config_dir: None,
            ports: None,
            connect_uds: None,
            connect_port: None,
            connect_client_ca_file: None,
            request_body_timeout: Duration::from_secs(60),
            max_front_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            shutdown_delay: Duration::from_secs(2),
            metrics: None,
            transports: Transports::default(),
            dns: DnsConfig::default(),
            peers: PeerConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Checks what can be checked without touching files or sockets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, value) in [
            ("--tls-cert-file", &self.tls_cert_file),
            ("--tls-private-key-file", &self.tls_private_key_file),
            ("--client-ca-file", &self.client_ca_file),
        ] {
            if value.is_none() {
                return Err(ConfigError::Missing { flag });
            }
        }
        if self.kubelet_port == 0 || self.kubelet_read_only_port == 0 {
            return Err(ConfigError::Invalid {
                what: "kubelet port",
                why: "must not be 0".into(),
            });
        }
        if self.connect_port.is_some() && self.connect_client_ca_file.is_none() {
            return Err(ConfigError::Missing {
                flag: "--connect-client-ca-file",
            });
        }
        if self.config_dir.is_some() && self.ports.is_some() {
            return Err(ConfigError::Invalid {
                what: "port configuration",
                why: "from a config directory or given, not both".into(),
            });
        }
        if self.header_timeout.is_zero() || self.sniff_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                what: "header timeout",
                why: "must be more than 0".into(),
            });
        }
        if self.request_body_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                what: "request body timeout",
                why: "must be more than 0".into(),
            });
        }
        if self.dns.has_sink()
            && self.dns.kubernetes.is_none()
            && self.dns.tunnel_service_ip.is_none()
        {
            return Err(ConfigError::Invalid {
                what: "DNS records",
                why: "without a cluster (--kubeconfig, or in a pod) the address edge nodes resolve to must be given: --tunnel-service-ip".into(),
            });
        }
        if let Some(kube::core::ParseExpressionError(why)) =
            crate::cluster::parse_selector(&self.dns.edge_node_selector).err()
        {
            return Err(ConfigError::Invalid {
                what: "--edge-node-selector",
                why,
            });
        }
        if self.peers.is_set() {
            self.peers.statics()?;
            if let Some(name) = &self.peers.dns_name
                && !crate::dns::is_dns1123_subdomain(name.trim_end_matches('.'))
            {
                return Err(ConfigError::Invalid {
                    what: "--peer-dns-name",
                    why: format!("{name:?} is not a DNS name"),
                });
            }
            // Replicas tell themselves from their peers by server id: a shared one (the
            // default, where HOSTNAME is not set) would make every peer look like itself.
            if self.server_id == Self::default().server_id {
                return Err(ConfigError::Invalid {
                    what: "--server-id",
                    why: "with peers, each replica needs an id of its own (in a pod, $HOSTNAME, the pod's name, is used)".into(),
                });
            }
            if !self.transports.quic {
                return Err(ConfigError::Invalid {
                    what: "--peers / --peer-dns-name",
                    why: "peer links run over QUIC: serve it (--transports quic,grpc)".into(),
                });
            }
        }
        if self.max_front_connections == 0 {
            return Err(ConfigError::Invalid {
                what: "max front connections",
                why: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    pub(crate) fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.bind_address, port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_host_port_over_quic() {
        let peers = |list: &[&str]| ServerConfig {
            server_id: "replica-a".into(),
            peers: PeerConfig {
                peers: list.iter().map(ToString::to_string).collect(),
                dns_name: None,
                dns_server: None,
            },
            ..with_certs()
        };
        let ok = peers(&["10.0.0.1:10262", "[fd00::1]:10262", "replica-2.peers:10262"]);
        ok.validate().unwrap();
        assert_eq!(
            ok.peers.statics().unwrap()[1],
            ("fd00::1".to_owned(), 10262)
        );
        for bad in ["10.0.0.1", "10.0.0.1:0", "bad_host!:10262"] {
            let err = peers(&[bad]).validate().unwrap_err().to_string();
            assert!(err.contains("--peers"), "{bad}: {err}");
        }
        let grpc_only = ServerConfig {
            transports: "grpc".parse().unwrap(),
            ..peers(&["10.0.0.1:10262"])
        };
        assert!(
            grpc_only
                .validate()
                .unwrap_err()
                .to_string()
                .contains("QUIC")
        );
    }

    fn with_certs() -> ServerConfig {
        ServerConfig {
            tls_cert_file: Some("s.crt".into()),
            tls_private_key_file: Some("s.key".into()),
            client_ca_file: Some("ca.crt".into()),
            ..ServerConfig::default()
        }
    }

    fn invalid(config: &ServerConfig) -> Option<&'static str> {
        match config.validate() {
            Err(ConfigError::Invalid { what, .. }) => Some(what),
            _ => None,
        }
    }

    #[test]
    fn dns_records_need_an_address_for_edge_nodes() {
        let mut config = with_certs();
        assert_eq!(invalid(&config), None, "no sink, nothing needed");
        config.dns.hosts_file = Some("/run/tunnel-nodes".into());
        assert_eq!(invalid(&config), Some("DNS records"));
        config.dns.tunnel_service_ip = Some("10.96.0.7".parse().unwrap());
        assert_eq!(invalid(&config), None);
        config.dns.tunnel_service_ip = None;
        config.dns.kubernetes = Some(KubeSource::InCluster);
        assert_eq!(invalid(&config), None, "the Service's ClusterIP");
        config.dns.edge_node_selector = "a=b=c".into();
        assert_eq!(invalid(&config), Some("--edge-node-selector"));
    }

    #[test]
    fn object_names_are_namespace_slash_name() {
        let name: ObjectName = "kube-system/edge-tunnel-nodes".parse().unwrap();
        assert_eq!(
            (name.namespace.as_str(), name.name.as_str()),
            ("kube-system", "edge-tunnel-nodes")
        );
        for bad in ["edge-tunnel-nodes", "/x", "x/", "a/b/c", "Kube/x"] {
            assert!(bad.parse::<ObjectName>().is_err(), "{bad}");
        }
    }
}
