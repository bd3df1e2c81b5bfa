//! The tunnel Service's ports, kept in step with the port configuration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};
use tunnel_core::PortConfig;

use super::{MAX_RETRY, SeenService};
use crate::config::ObjectName;
use crate::dns;
use crate::stopped;

/// How long after writing the Service's ports a different set there counts as someone
/// undoing them (rather than a change of their own).
const CONTEST_MEMORY: Duration = Duration::from_secs(60);

/// One port of the tunnel Service, as far as the server manages it.
#[derive(Debug, Clone)]
pub(crate) struct ServicePort {
    pub(crate) name: String,
    pub(crate) protocol: String,
    pub(crate) port: i32,
    pub(crate) target_port: IntOrString,
    /// The port as the Service has it (fields this type does not know, such as
    /// `appProtocol`, included): what a port someone else added is written back as.
    pub(crate) seen: Option<serde_json::Value>,
}

/// Ports compare by what the server manages of them, not by how they were last seen.
impl PartialEq for ServicePort {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, &self.protocol, self.port, &self.target_port)
            == (&other.name, &other.protocol, other.port, &other.target_port)
    }
}

impl Eq for ServicePort {}

impl ServicePort {
    /// As the Service's spec writes it: a port of someone else's as it was seen.
    fn to_json(&self) -> serde_json::Value {
        if let Some(seen) = &self.seen
            && !is_managed(&self.name)
        {
            return seen.clone();
        }
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
            seen: None,
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
        // A Service of several ports needs every one named (the API refuses the patch).
        if port.name.is_empty() {
            warn!(
                port = port.port,
                "the tunnel Service has an unnamed port; it cannot stay beside the server's ports"
            );
            continue;
        }
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

#[cfg(test)]
mod tests {
    use tunnel_core::route::config::FixedPorts;

    use super::*;

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
            seen: None,
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

        // Written back as seen (appProtocol included); an unnamed one cannot stay.
        let seen = json!({"name": "grpc", "port": 9090, "protocol": "TCP", "targetPort": 9090, "appProtocol": "kubernetes.io/h2c"});
        let mut grpc = port("grpc", 9090);
        grpc.seen = Some(seen.clone());
        let kept = with_foreign_ports(vec![port("https", 10250)], &[grpc, port("", 8080)]);
        let written: Vec<_> = kept.iter().map(ServicePort::to_json).collect();
        assert_eq!(written[0], seen);
        assert_eq!(kept.len(), 2);
        assert!(is_managed("https-9443") && is_managed("dnat-1") && !is_managed("http-x"));
    }
}
