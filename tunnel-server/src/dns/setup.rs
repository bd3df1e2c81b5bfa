//! Cluster DNS as the server assembles it: the API client, the records' channel and the bound
//! responder at start; the records' source and sinks on the server's tasks when it runs.

use std::net::SocketAddr;
use std::sync::Arc;

use kube::core::Selector;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};
use tunnel_process::meta::MetaPage;

use super::{DnsServer, NodeRecords, RecordsRx, Responder, ResponderError, channel};
use crate::registry::Registry;
use crate::{ConfigError, ServerConfig, ServerError, cluster, ports};

/// Cluster DNS, ready to run: the records' channel, the API client, the bound responder.
#[derive(Default)]
pub(crate) struct Setup {
    records: Option<(watch::Sender<Arc<NodeRecords>>, RecordsRx)>,
    /// The API client and the edge nodes' selector, with a cluster.
    kube: Option<(kube::Client, Selector)>,
    responder: Option<DnsServer>,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("records", &self.records.is_some())
            .field("kube", &self.kube.is_some())
            .field("responder", &self.responder)
            .finish()
    }
}

impl Setup {
    /// Makes the API client, the records' channel and the responder the configuration asks
    /// for.
    pub(crate) async fn prepare(config: &ServerConfig) -> Result<Self, ServerError> {
        let dns = &config.dns;
        let kube = match &dns.kubernetes {
            Some(source) => {
                let selector = cluster::parse_selector(&dns.edge_node_selector).map_err(|e| {
                    ConfigError::Invalid {
                        what: "--edge-node-selector",
                        why: e.0,
                    }
                })?;
                Some((cluster::client(source).await?, selector))
            }
            None => None,
        };
        let mut parts = Self {
            kube,
            ..Self::default()
        };
        if parts.kube.is_none() && !dns.has_sink() {
            return Ok(parts);
        }
        let (tx, rx) = channel();
        if let Some(addr) = dns.listen {
            let upstream = match dns.upstream.as_slice() {
                [] => system_nameservers()?,
                given => given.to_vec(),
            };
            let responder = Responder::new(rx.clone(), &upstream)?;
            let server = DnsServer::bind(addr, responder, &dns.allow).await?;
            // Forwarding to ourselves would loop until the forwards ran out.
            if upstream.iter().any(|up| is_self(*up, server.local_addr())) {
                server.stop().await;
                return Err(ResponderError::Upstream(format!(
                    "the upstream {addr} is the responder itself"
                ))
                .into());
            }
            info!(addr = %server.local_addr(), upstream = ?upstream, "DNS responder listening");
            parts.responder = Some(server);
        }
        parts.records = Some((tx, rx));
        Ok(parts)
    }

    /// The responder's address, when it runs.
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        self.responder.as_ref().map(DnsServer::local_addr)
    }

    /// Follows the records, when there are any.
    pub(crate) fn records(&self) -> Option<RecordsRx> {
        self.records.as_ref().map(|(_, rx)| rx.clone())
    }

    /// Starts the records' source and sinks on `tasks`; they end at `stop` (the drain's start:
    /// the records written so far stay where they are). Returns the `/dns` meta page and the
    /// responder, which the caller stops after the drain.
    pub(crate) fn start(
        self,
        tasks: &mut JoinSet<()>,
        config: &ServerConfig,
        registry: &Arc<Registry>,
        ports: &Arc<ports::Ports>,
        fronts: cluster::FrontPorts,
        stop: &watch::Receiver<bool>,
    ) -> (Option<MetaPage>, Option<DnsServer>) {
        let Some((records_tx, records_rx)) = self.records else {
            return (None, self.responder);
        };
        let source = if self.kube.is_some() {
            "kubernetes"
        } else {
            "agents"
        };
        let page = MetaPage {
            path: "/dns",
            render: {
                let rx = records_rx.clone();
                Arc::new(move || super::page(source, &rx.borrow()))
            },
        };
        let dns = &config.dns;
        match self.kube {
            Some((client, selector)) => {
                let (seen_tx, seen_rx) = watch::channel(None);
                let source = cluster::NodeSource {
                    client: client.clone(),
                    selector,
                    service: dns.tunnel_service.clone(),
                    service_ip: dns.tunnel_service_ip,
                    records: records_tx,
                    seen_service: seen_tx,
                };
                tasks.spawn(source.run(stop.clone()));
                tasks.spawn(cluster::keep_service_ports(
                    client.clone(),
                    dns.tunnel_service.clone(),
                    fronts,
                    seen_rx,
                    ports.subscribe(),
                    stop.clone(),
                ));
                if let Some(configmap) = &dns.configmap {
                    tasks.spawn(cluster::write_configmap(
                        client.clone(),
                        configmap.clone(),
                        records_rx.clone(),
                        stop.clone(),
                    ));
                }
            }
            None => match dns.tunnel_service_ip {
                Some(ip) => {
                    tasks.spawn(super::follow_agents(
                        registry.clone(),
                        ip,
                        records_tx,
                        stop.clone(),
                    ));
                }
                // ServerConfig::validate refuses this configuration; an embedder that skips it
                // gets no records, and is told.
                None => {
                    warn!("DNS records without a cluster need --tunnel-service-ip; none are made")
                }
            },
        }
        if let Some(path) = &dns.hosts_file {
            tasks.spawn(super::write_hosts_file(
                path.clone(),
                records_rx,
                stop.clone(),
            ));
        }

        (Some(page), self.responder)
    }
}

/// Whether `upstream` reaches the responder listening on `listen`: the same address, or a
/// loopback one on the same port while it listens on every address.
fn is_self(upstream: SocketAddr, listen: SocketAddr) -> bool {
    upstream.port() == listen.port()
        && (upstream.ip() == listen.ip()
            || (listen.ip().is_unspecified() && upstream.ip().is_loopback()))
}

/// The nameservers of `/etc/resolv.conf`, port 53 unless it says otherwise.
fn system_nameservers() -> Result<Vec<SocketAddr>, ServerError> {
    let (resolver, _) = hickory_resolver::system_conf::read_system_conf().map_err(|e| {
        ResponderError::Upstream(format!(
            "no --dns-upstream, and /etc/resolv.conf cannot be read: {e}"
        ))
    })?;
    let mut upstream: Vec<SocketAddr> = Vec::new();
    for server in resolver.name_servers() {
        let port = server.connections.first().map_or(53, |c| c.port);
        let addr = SocketAddr::new(server.ip, port);
        if !upstream.contains(&addr) {
            upstream.push(addr);
        }
    }
    if upstream.is_empty() {
        return Err(ResponderError::Upstream(
            "no --dns-upstream, and /etc/resolv.conf names no nameserver".into(),
        )
        .into());
    }
    Ok(upstream)
}
