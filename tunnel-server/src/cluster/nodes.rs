//! The records source of a cluster: watchers on the Nodes and on the tunnel Service.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{Selector, SelectorExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::service::ServicePort;
use crate::config::ObjectName;
use crate::dns::{self, InvalidNames, NodeRecords};
use crate::stopped;

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
                seen: serde_json::to_value(p).ok(),
            })
            .collect();
        Self { cluster_ip, ports }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cluster::parse_selector;

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
}
