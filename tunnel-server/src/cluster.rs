//! The Kubernetes side, through kube-rs: Node and Service watchers that make the node records,
//! the ConfigMap CoreDNS reads them from, and the tunnel Service's ports kept in step with the
//! port configuration.
//!
//! Every replica computes the same records from the same Nodes, so they write the same bytes
//! and never fight over the ConfigMap. The watchers resume broken watches and back off while
//! the API server is away; the last records stay published (and served) meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::{Expression, ParseExpressionError, Selector, SelectorExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use tunnel_core::PortConfig;

use crate::config::{KubeSource, ObjectName};
use crate::dns::{self, InvalidNames, NodeRecords, RecordsRx, Sink};
use crate::stopped;

/// The ConfigMap key CoreDNS's hosts plugin reads (mounted as `/etc/edge/tunnel-nodes`).
pub const RECORDS_KEY: &str = "tunnel-nodes";

/// Fewest seconds between two ConfigMap writes: changes within it go out as one write.
const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a change waits for the rest of its batch (a Node list, a burst of watch events)
/// before it is written, so that a batch becomes one write.
const SETTLE: Duration = Duration::from_millis(200);
/// How often the ConfigMap is read again while the records do not change.
const RESYNC: Duration = Duration::from_secs(60);
/// How long after writing the Service's ports a different set there counts as someone
/// undoing them (rather than a change of their own).
const CONTEST_MEMORY: Duration = Duration::from_secs(60);
/// Longest wait between two tries of a failed write.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How long connecting to the API server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read or write of the API may take (watches are ended by the server sooner).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the Kubernetes client could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// Not in a pod, or the pod's service account is not mounted.
    #[error(
        "in-cluster Kubernetes configuration (KUBERNETES_SERVICE_HOST is set; --kubernetes=off goes without): {0}"
    )]
    InCluster(#[source] kube::config::InClusterError),
    /// The kubeconfig cannot be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The client could not be built from the configuration.
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client for `source`. Nothing is sent yet: an API server that is down shows in the
/// watchers' logs and metrics, not here.
pub async fn client(source: &KubeSource) -> Result<Client, ClusterError> {
    let mut config = match source {
        KubeSource::InCluster => kube::Config::incluster().map_err(ClusterError::InCluster)?,
        KubeSource::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClusterError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| ClusterError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(REQUEST_TIMEOUT);
    config.write_timeout = Some(REQUEST_TIMEOUT);
    Client::try_from(config).map_err(ClusterError::Client)
}

/// Parses a label selector as `kubectl -l` takes it: comma-separated `key=value`,
/// `key==value`, `key!=value`, `key`, `!key`, `key in (a,b)` and `key notin (a,b)`.
pub fn parse_selector(text: &str) -> Result<Selector, ParseExpressionError> {
    let bad = |why: String| ParseExpressionError(format!("{text:?}: {why}"));
    let mut expressions = Vec::new();
    for part in split_outside_parens(text) {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad("an empty requirement".into()));
        }
        let expression = if let Some(key) = part.strip_prefix('!') {
            Expression::DoesNotExist(label_key(key.trim()).map_err(bad)?)
        } else if let Some((key, value)) = part.split_once("!=") {
            Expression::NotEqual(
                label_key(key.trim()).map_err(bad)?,
                label_value(value.trim()).map_err(bad)?,
            )
        } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Expression::Equal(
                label_key(key.trim()).map_err(bad)?,
                label_value(value.trim()).map_err(bad)?,
            )
        } else if let Some((key, values)) = split_set(part, " notin ") {
            Expression::NotIn(
                label_key(key).map_err(bad)?,
                value_set(values).map_err(bad)?,
            )
        } else if let Some((key, values)) = split_set(part, " in ") {
            Expression::In(
                label_key(key).map_err(bad)?,
                value_set(values).map_err(bad)?,
            )
        } else {
            Expression::Exists(label_key(part).map_err(bad)?)
        };
        expressions.push(expression);
    }
    Ok(expressions.into_iter().collect())
}

/// `text` split at the commas that are not inside a `( )` set.
fn split_outside_parens(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn split_set<'a>(part: &'a str, operator: &str) -> Option<(&'a str, &'a str)> {
    let (key, values) = part.split_once(operator)?;
    Some((key.trim(), values.trim()))
}

fn value_set(values: &str) -> Result<BTreeSet<String>, String> {
    let inner = values
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| format!("{values:?} is not a (a,b) set"))?;
    inner.split(',').map(|v| label_value(v.trim())).collect()
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of up to 63 characters.
fn label_key(key: &str) -> Result<String, String> {
    let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
    let name_ok = !name.is_empty() && name.len() <= 63 && label_chars(name);
    let prefix_ok = prefix.is_empty() || dns::is_dns1123_subdomain(prefix);
    if name_ok && prefix_ok && !key.starts_with('/') {
        Ok(key.to_owned())
    } else {
        Err(format!("{key:?} is not a label key"))
    }
}

/// A label value: empty, or up to 63 characters.
fn label_value(value: &str) -> Result<String, String> {
    if value.is_empty() || (value.len() <= 63 && label_chars(value)) {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not a label value"))
    }
}

/// Alphanumerics at both ends, `-`, `_` and `.` between.
fn label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// What the records need of a Node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeEntry {
    edge: bool,
    /// Its InternalIPs, or its ExternalIPs when it has no InternalIP.
    ips: Vec<IpAddr>,
}

impl NodeEntry {
    fn of(node: &Node, selector: &Selector) -> Self {
        let empty = BTreeMap::new();
        let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_deref())
            .unwrap_or_default();
        let of_type = |kind: &str| -> Vec<IpAddr> {
            addresses
                .iter()
                .filter(|a| a.type_ == kind)
                .filter_map(|a| a.address.parse().ok())
                .collect()
        };
        let mut ips = of_type("InternalIP");
        if ips.is_empty() {
            ips = of_type("ExternalIP");
        }
        Self {
            edge: selector.matches(labels),
            ips,
        }
    }
}

/// The tunnel Service as the watcher last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SeenService {
    /// Its ClusterIP, when it has one.
    pub(crate) cluster_ip: Option<IpAddr>,
    /// Its ports, in the form [`ServicePorts`] compares.
    pub(crate) ports: Vec<ServicePort>,
}

/// What the cluster source needs.
pub(crate) struct NodeSource {
    pub(crate) client: Client,
    pub(crate) selector: Selector,
    pub(crate) service: ObjectName,
    /// The address edge nodes resolve to when given (else the Service's ClusterIP).
    pub(crate) service_ip: Option<IpAddr>,
    pub(crate) records: watch::Sender<Arc<NodeRecords>>,
    /// Where the Service, as last seen, goes (to the ports' keeper).
    pub(crate) seen_service: watch::Sender<Option<SeenService>>,
}

/// Events taken at most before the records are made again: a burst becomes one publish, and a
/// flood still lets the records out now and then.
const MAX_BATCH: usize = 4096;

/// What the watchers have seen so far.
#[derive(Debug, Default)]
struct Watched {
    /// The Nodes in force.
    live: BTreeMap<String, NodeEntry>,
    /// A re-list of the Nodes in progress: the live map stays in force until it is complete.
    relist: Option<BTreeMap<String, NodeEntry>>,
    /// Whether the Nodes have been listed once.
    nodes_listed: bool,
    /// The Service's last ClusterIP; kept when the Service goes away.
    service_ip: Option<IpAddr>,
    /// A re-list of the Service in progress: what it found so far.
    service_relist: Option<Option<SeenService>>,
    /// Whether the Service has been listed once.
    service_listed: bool,
    /// Whether the Service exists, as last seen (to warn once when it goes).
    service_exists: bool,
}

impl NodeSource {
    /// Watches Nodes and the tunnel Service and publishes the records, until `stop`. The
    /// first records go out once the Nodes are listed and the edge address is known; after
    /// that, a change goes out only when it changes a record.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let services_api: Api<Service> =
            Api::namespaced(self.client.clone(), &self.service.namespace);
        // client-go's backoff (0.8 s doubling to 30 s): kind to an API server that struggles;
        // the last records stay in force meanwhile.
        let mut nodes = watcher::watcher(nodes_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let by_name = format!("metadata.name={}", self.service.name);
        let mut services =
            watcher::watcher(services_api, watcher::Config::default().fields(&by_name))
                .default_backoff()
                .boxed();
        for resource in ["nodes", "services"] {
            metrics::counter!("edge_tunnel_server_kube_watch_errors_total", "resource" => resource)
                .absolute(0);
        }

        let mut watched = Watched::default();
        let mut invalid = InvalidNames::default();
        let mut first = true;
        let mut said_no_ip = false;
        loop {
            let item = tokio::select! {
                item = nodes.next() => Item::Node(item),
                item = services.next() => Item::Service(item),
                () = stopped(&mut stop) => return,
            };
            let Some(mut changed) = self.take(item, &mut watched) else {
                return;
            };
            // Every event already waiting goes in before the records are made again.
            for _ in 0..MAX_BATCH {
                let item = match (nodes.next().now_or_never(), services.next().now_or_never()) {
                    (None, None) => break,
                    (Some(node), None) => Item::Node(node),
                    (None, Some(service)) => Item::Service(service),
                    (Some(node), Some(service)) => {
                        let Some(c) = self.take(Item::Service(service), &mut watched) else {
                            return;
                        };
                        changed |= c;
                        Item::Node(node)
                    }
                };
                let Some(c) = self.take(item, &mut watched) else {
                    return;
                };
                changed |= c;
            }
            if !changed || !watched.nodes_listed {
                continue;
            }
            let Some(edge_ip) = self.service_ip.or(watched.service_ip) else {
                if watched.service_listed && !said_no_ip {
                    warn!(service = %self.service, "the tunnel Service has no ClusterIP; edge node records wait for one (or give --tunnel-service-ip)");
                    said_no_ip = true;
                }
                continue;
            };
            said_no_ip = false;
            let mut records = NodeRecords::new();
            for (name, entry) in &watched.live {
                let ok = if entry.edge {
                    records.insert(name, edge_ip)
                } else {
                    entry.ips.iter().all(|ip| records.insert(name, *ip))
                };
                if !ok {
                    invalid.warn(name, "a Node");
                }
            }
            if first {
                let edge = watched.live.values().filter(|e| e.edge).count();
                info!(nodes = watched.live.len(), edge, %edge_ip, "node records made from the cluster");
            }
            dns::publish(&self.records, records, first);
            first = false;
        }
    }

    /// Takes one item of either watcher; whether the records may have changed, `None` when
    /// a watcher ended (it never does on its own: the task is being torn down).
    fn take(&self, item: Item, watched: &mut Watched) -> Option<bool> {
        let (resource, result) = match item {
            Item::Node(None) | Item::Service(None) => return None,
            Item::Node(Some(Ok(event))) => return Some(self.node_event(event, watched)),
            Item::Service(Some(Ok(event))) => return Some(self.service_event(event, watched)),
            Item::Node(Some(Err(error))) => ("nodes", error),
            Item::Service(Some(Err(error))) => ("services", error),
        };
        metrics::counter!("edge_tunnel_server_kube_watch_errors_total", "resource" => resource)
            .increment(1);
        warn!(error = %result, resource, "watching the Kubernetes API failed; keeping the last records and retrying with backoff");
        Some(false)
    }

    /// Applies one Node event; whether the live map changed.
    fn node_event(&self, event: Event<Node>, watched: &mut Watched) -> bool {
        let name_of = |node: &Node| node.metadata.name.clone().unwrap_or_default();
        match event {
            Event::Init => {
                watched.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(node) => {
                let entry = NodeEntry::of(&node, &self.selector);
                watched
                    .relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name_of(&node), entry);
                false
            }
            Event::InitDone => {
                let fresh = watched.relist.take().unwrap_or_default();
                debug!(nodes = fresh.len(), "Nodes listed");
                let changed = !watched.nodes_listed || watched.live != fresh;
                watched.live = fresh;
                watched.nodes_listed = true;
                changed
            }
            Event::Apply(node) => {
                let entry = NodeEntry::of(&node, &self.selector);
                let name = name_of(&node);
                if watched.live.get(&name) == Some(&entry) {
                    return false;
                }
                watched.live.insert(name, entry);
                true
            }
            Event::Delete(node) => watched.live.remove(&name_of(&node)).is_some(),
        }
    }

    /// Applies one Service event; whether the edge address changed.
    fn service_event(&self, event: Event<Service>, watched: &mut Watched) -> bool {
        let first_list = !watched.service_listed;
        let seen = match event {
            Event::Init => {
                watched.service_relist = Some(None);
                return false;
            }
            Event::InitApply(service) => {
                watched.service_relist = Some(Some(SeenService::of(&service)));
                return false;
            }
            // An empty list: no such Service (any more).
            Event::InitDone => {
                watched.service_listed = true;
                watched.service_relist.take().flatten()
            }
            Event::Apply(service) => Some(SeenService::of(&service)),
            Event::Delete(_) => None,
        };
        if seen.is_none() && (watched.service_exists || first_list) {
            warn!(service = %self.service, "the tunnel Service does not exist: create it (examples/k8s/services.yaml); edge records keep their last address");
        }
        watched.service_exists = seen.is_some();
        // Only a change wakes the ports' keeper: a re-list that finds the same Service is none.
        self.seen_service.send_if_modified(|current| {
            let modified = *current != seen;
            if modified {
                current.clone_from(&seen);
            }
            modified
        });
        let ip = seen.and_then(|s| s.cluster_ip);
        if ip.is_none() || ip == watched.service_ip {
            return false;
        }
        watched.service_ip = ip;
        true
    }
}

/// One item of either watcher.
// One lives on the stack for one turn of the loop; boxing it would cost an allocation per
// event for nothing.
#[allow(clippy::large_enum_variant)]
enum Item {
    Node(Option<Result<Event<Node>, watcher::Error>>),
    Service(Option<Result<Event<Service>, watcher::Error>>),
}

impl SeenService {
    fn of(service: &Service) -> Self {
        let spec = service.spec.as_ref();
        let cluster_ip = spec
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let ports = spec
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port: p.port,
                target_port: match &p.target_port {
                    None => IntOrString::Int(p.port),
                    Some(t) => t.clone(),
                },
            })
            .collect();
        Self { cluster_ip, ports }
    }
}

/// One port of the tunnel Service, as far as the server manages it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServicePort {
    pub(crate) name: String,
    pub(crate) protocol: String,
    pub(crate) port: i32,
    pub(crate) target_port: IntOrString,
}

impl ServicePort {
    /// As the Service's spec writes it.
    fn to_json(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "port": self.port,
            "protocol": self.protocol,
            "targetPort": self.target_port,
        })
    }
}

/// Where the Service's ports lead: the server's two front ports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrontPorts {
    /// The TLS front (SNI), behind the kubelet's port.
    pub(crate) secure: u16,
    /// The HTTP front, behind the kubelet's read-only port and the plain HTTP ports.
    pub(crate) insecure: u16,
    /// The egress front's mutual-TLS port (`--connect-port`), when it listens.
    pub(crate) connect: Option<u16>,
}

/// The ports the tunnel Service should have for `config`, sorted by port: the kubelet's port
/// to the TLS front, its read-only port to the HTTP front, each `dnat-ports-pair` node port to
/// its front port, each `http-proxy-ports` port to the HTTP front, and each
/// `https-proxy-ports` port to the server's own listener on that port. A port that several
/// keys name appears once, with the first of those meanings.
pub(crate) fn desired_ports(config: &PortConfig, fronts: FrontPorts) -> Vec<ServicePort> {
    let fixed = config.fixed();
    let mut ports: BTreeMap<u16, (String, u16)> = BTreeMap::new();
    let mut add = |port: u16, name: String, target: u16| {
        ports.entry(port).or_insert((name, target));
    };
    add(fixed.kubelet, "https".into(), fronts.secure);
    add(fixed.kubelet_read_only, "http".into(), fronts.insecure);
    if let Some(port) = fronts.connect {
        add(port, "connect".into(), port);
    }
    for port in config.https_proxy_ports().iter() {
        add(port, format!("https-{port}"), port);
    }
    for (port, front) in config.dnat_pairs() {
        add(*port, format!("dnat-{port}"), *front);
    }
    for port in config.http_proxy_ports().iter() {
        add(port, format!("http-{port}"), fronts.insecure);
    }
    ports
        .into_iter()
        .map(|(port, (name, target))| ServicePort {
            name,
            protocol: "TCP".into(),
            port: port.into(),
            target_port: IntOrString::Int(target.into()),
        })
        .collect()
}

/// Whether the server owns a Service port of this name (see [`desired_ports`]).
fn is_managed(name: &str) -> bool {
    let numbered = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(name, "https" | "http" | "connect")
        || numbered("https-")
        || numbered("http-")
        || numbered("dnat-")
}

/// The ports the Service should have: the server's own (`ours`), and any port of `current`
/// someone else added under another name, unless it takes a port number of ours.
fn with_foreign_ports(ours: Vec<ServicePort>, current: &[ServicePort]) -> Vec<ServicePort> {
    let mut ports = ours;
    for port in current.iter().filter(|p| !is_managed(&p.name)) {
        if ports
            .iter()
            .any(|o| o.port == port.port && o.protocol == port.protocol)
        {
            warn!(name = %port.name, port = port.port, "a tunnel Service port takes a port number the server needs; replacing it");
            continue;
        }
        ports.push(port.clone());
    }
    ports.sort_by(|a, b| (a.port, &a.protocol).cmp(&(b.port, &b.protocol)));
    ports
}

/// Keeps the tunnel Service's ports equal to [`desired_ports`] of the configuration in force,
/// until `stop`, leaving alone the ports of other names that someone else added. It only
/// ever patches the ports of a Service that exists (the manifests create it); a failed patch
/// is tried again with backoff.
pub(crate) async fn keep_service_ports(
    client: Client,
    service: ObjectName,
    fronts: FrontPorts,
    mut seen: watch::Receiver<Option<SeenService>>,
    mut config: watch::Receiver<Arc<PortConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Service> = Api::namespaced(client, &service.namespace);
    for result in ["written", "error", "contested"] {
        metrics::counter!("edge_tunnel_server_kube_service_port_writes_total", "result" => result)
            .absolute(0);
    }
    let mut retry = dns::RETRY;
    // The ports this replica last wrote, and when.
    let mut last: Option<(Vec<ServicePort>, Instant)> = None;
    // How long to wait before writing again ports that someone undid; grows while it goes on.
    let mut pause = Duration::ZERO;
    loop {
        let ours = desired_ports(&config.borrow_and_update(), fronts);
        let current = seen.borrow_and_update().as_ref().map(|s| s.ports.clone());
        let Some(current) = current else {
            tokio::select! {
                changed = seen.changed() => if changed.is_err() { return },
                changed = config.changed() => if changed.is_err() { return },
                () = stopped(&mut stop) => return,
            }
            continue;
        };
        let desired = with_foreign_ports(ours, &current);
        if current != desired {
            if let Some((ports, at)) = &last
                && *ports == desired
                && at.elapsed() < CONTEST_MEMORY
            {
                // These ports were written here and the Service has others again: a replica
                // whose port configuration differs (it has not read a changed ConfigMap
                // yet) wrote its own. Taking turns at once would rewrite the Service as fast
                // as the API allows; wait longer each time until the replicas agree.
                pause = (pause * 2).clamp(dns::RETRY, MAX_RETRY);
                metrics::counter!("edge_tunnel_server_kube_service_port_writes_total", "result" => "contested").increment(1);
                warn!(%service, ?pause, "another writer keeps changing the tunnel Service's ports (a replica with another port configuration?); writing them again after a pause");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    changed = config.changed() => {
                        if changed.is_err() { return }
                        pause = Duration::ZERO;
                    }
                    () = stopped(&mut stop) => return,
                }
                // Look again: the other writer may agree by now.
                last = None;
                continue;
            }
            let ports: Vec<_> = desired.iter().map(ServicePort::to_json).collect();
            let patch = json!({ "spec": { "ports": ports } });
            match api
                .patch(
                    &service.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    metrics::counter!("edge_tunnel_server_kube_service_port_writes_total", "result" => "written").increment(1);
                    let shown: Vec<String> = desired
                        .iter()
                        .map(|p| format!("{}→{:?}", p.port, p.target_port))
                        .collect();
                    info!(%service, ports = %shown.join(","), "tunnel Service ports set");
                    retry = dns::RETRY;
                    last = Some((desired, Instant::now()));
                }
                Err(error) => {
                    metrics::counter!("edge_tunnel_server_kube_service_port_writes_total", "result" => "error").increment(1);
                    warn!(%service, %error, ?retry, "cannot set the tunnel Service's ports; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = stopped(&mut stop) => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            }
        } else if last
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= CONTEST_MEMORY)
        {
            pause = Duration::ZERO;
        }
        tokio::select! {
            changed = seen.changed() => if changed.is_err() { return },
            changed = config.changed() => {
                if changed.is_err() { return }
                pause = Duration::ZERO;
            }
            () = stopped(&mut stop) => return,
        }
    }
}

/// Writes the records to the ConfigMap's [`RECORDS_KEY`] each time they change, [`SETTLE`]
/// after the change and at most once per [`WRITE_INTERVAL`], until `stop`. It reads the ConfigMap first and writes only when the
/// key differs (another replica may have written the same bytes); it creates the ConfigMap
/// when there is none.
pub(crate) async fn write_configmap(
    client: Client,
    configmap: ObjectName,
    mut records: RecordsRx,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &configmap.namespace);
    tokio::select! {
        changed = records.changed() => if changed.is_err() { return },
        () = stopped(&mut stop) => return,
    }
    let mut written: Option<String> = None;
    let mut retry = dns::RETRY;
    loop {
        tokio::select! {
            () = tokio::time::sleep(SETTLE) => {}
            () = stopped(&mut stop) => return,
        }
        let content = records.borrow_and_update().render();
        if written.as_deref() != Some(content.as_str()) {
            match put_records(&api, &configmap.name, &content).await {
                Ok(wrote) => {
                    Sink::ConfigMap.count(if wrote { "written" } else { "current" });
                    if wrote {
                        info!(%configmap, lines = content.lines().count(), "DNS records written to the ConfigMap");
                    }
                    written = Some(content);
                    retry = dns::RETRY;
                    // The changes of the next second go out together.
                    tokio::select! {
                        () = tokio::time::sleep(WRITE_INTERVAL) => {}
                        () = stopped(&mut stop) => return,
                    }
                    continue;
                }
                Err(error) => {
                    Sink::ConfigMap.count("error");
                    warn!(%configmap, %error, ?retry, "cannot write the DNS records to the ConfigMap; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = stopped(&mut stop) => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            }
        }
        tokio::select! {
            changed = records.changed() => if changed.is_err() { return },
            // Someone may have changed the ConfigMap (a `kubectl apply` of the manifests):
            // read it again now and then, and put the records back.
            () = tokio::time::sleep(RESYNC) => written = None,
            () = stopped(&mut stop) => return,
        }
    }
}

/// Puts `content` under [`RECORDS_KEY`]; whether it wrote (false: it was there already).
async fn put_records(api: &Api<ConfigMap>, name: &str, content: &str) -> kube::Result<bool> {
    let patch = json!({ "data": { RECORDS_KEY: content } });
    match api.get_opt(name).await? {
        Some(existing) => {
            let current = existing.data.as_ref().and_then(|d| d.get(RECORDS_KEY));
            if current.map(String::as_str) == Some(content) {
                return Ok(false);
            }
        }
        None => {
            let configmap = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_owned()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    RECORDS_KEY.to_owned(),
                    content.to_owned(),
                )])),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &configmap).await {
                Ok(_) => return Ok(true),
                // Another replica created it first: patch it like an existing one.
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use tunnel_core::route::config::FixedPorts;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selectors_parse_as_kubectl_takes_them() {
        let edge = parse_selector("alibabacloud.com/is-edge-worker=true").unwrap();
        assert!(edge.matches(&labels(&[("alibabacloud.com/is-edge-worker", "true")])));
        assert!(!edge.matches(&labels(&[("alibabacloud.com/is-edge-worker", "false")])));
        assert!(!edge.matches(&labels(&[])));

        let mixed = parse_selector("role in (edge, gateway), !cloud ,zone!=cn-1,tier").unwrap();
        assert!(mixed.matches(&labels(&[("role", "edge"), ("tier", "x")])));
        assert!(!mixed.matches(&labels(&[("role", "edge"), ("tier", "x"), ("cloud", "")])));
        assert!(!mixed.matches(&labels(&[("role", "db"), ("tier", "x")])));
        assert!(!mixed.matches(&labels(&[
            ("role", "edge"),
            ("tier", "x"),
            ("zone", "cn-1")
        ])));
        assert!(!mixed.matches(&labels(&[("role", "edge")])));
        let notin = parse_selector("role notin (cloud)").unwrap();
        assert!(notin.matches(&labels(&[("role", "edge")])));

        for bad in [
            "",
            "a=b,",
            "=x",
            "a=b c",
            "/x=y",
            "Not_A/x=1",
            "k in a,b",
            "a==b=c",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
    }

    fn node(name: &str, edge: bool, addresses: &[(&str, &str)]) -> Node {
        let labels = if edge {
            json!({ "alibabacloud.com/is-edge-worker": "true" })
        } else {
            json!({})
        };
        let addresses: Vec<_> = addresses
            .iter()
            .map(|(t, a)| json!({ "type": t, "address": a }))
            .collect();
        serde_json::from_value(json!({
            "metadata": { "name": name, "labels": labels },
            "status": { "addresses": addresses },
        }))
        .unwrap()
    }

    #[test]
    fn cloud_nodes_take_their_internal_ips_else_their_external_ones() {
        let selector = parse_selector("alibabacloud.com/is-edge-worker=true").unwrap();
        let both = NodeEntry::of(
            &node(
                "cloud-1",
                false,
                &[
                    ("Hostname", "cloud-1"),
                    ("ExternalIP", "47.1.1.1"),
                    ("InternalIP", "192.168.0.10"),
                ],
            ),
            &selector,
        );
        assert_eq!(both.ips, ["192.168.0.10".parse::<IpAddr>().unwrap()]);
        assert!(!both.edge);
        let external = NodeEntry::of(
            &node("cloud-2", false, &[("ExternalIP", "47.1.1.2")]),
            &selector,
        );
        assert_eq!(external.ips, ["47.1.1.2".parse::<IpAddr>().unwrap()]);
        assert!(NodeEntry::of(&node("edge-1", true, &[]), &selector).edge);
    }

    #[test]
    fn service_ports_follow_the_port_configuration() {
        let fixed = FixedPorts {
            http_front: 10264,
            kubelet: 10250,
            kubelet_read_only: 10255,
        };
        let config = PortConfig::parse(
            [
                ("dnat-ports-pair", "9051=10264"),
                ("http-proxy-ports", "9100, 9051, 10255"),
                ("https-proxy-ports", "9443"),
            ],
            fixed,
        )
        .unwrap();
        let ports = desired_ports(
            &config,
            FrontPorts {
                secure: 10263,
                insecure: 10264,
                connect: Some(10268),
            },
        );
        let summary: Vec<(String, i32, IntOrString)> = ports
            .into_iter()
            .map(|p| (p.name, p.port, p.target_port))
            .collect();
        let int = IntOrString::Int;
        assert_eq!(
            summary,
            [
                ("dnat-9051".to_owned(), 9051, int(10264)),
                ("http-9100".to_owned(), 9100, int(10264)),
                ("https-9443".to_owned(), 9443, int(9443)),
                ("https".to_owned(), 10250, int(10263)),
                ("http".to_owned(), 10255, int(10264)),
                ("connect".to_owned(), 10268, int(10268)),
            ]
        );
    }

    fn port(name: &str, port: i32) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol: "TCP".into(),
            port,
            target_port: IntOrString::Int(port),
        }
    }

    #[test]
    fn ports_someone_else_added_stay_unless_they_collide() {
        let ours = vec![port("https", 10250), port("http-9100", 9100)];
        let current = [
            port("https", 10250),
            // Ours once (a port since removed from the configuration): goes.
            port("dnat-9051", 9051),
            // Someone's own: stays, in port order.
            port("metrics", 9500),
            port("dns", 53),
            // Someone's own on a number the server needs: replaced.
            port("node-exporter", 9100),
        ];
        let names: Vec<String> = with_foreign_ports(ours, &current)
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["dns", "http-9100", "metrics", "https"]);
        assert!(is_managed("https-9443") && is_managed("dnat-1") && !is_managed("http-x"));
    }
}
