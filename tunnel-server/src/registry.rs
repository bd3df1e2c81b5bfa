//! Which agent serves which node, on this replica. Node IPs map to nodes only through the IP SANs
//! of a connected agent's certificate.

use std::net::IpAddr;

use dashmap::DashMap;
use tokio::sync::watch;
use tunnel_core::{NodeRef, ServerSession, TargetHost};

/// The live agent sessions of this replica, by node name and by node IP.
#[derive(Debug)]
pub struct Registry {
    by_node: DashMap<String, ServerSession>,
    by_ip: DashMap<IpAddr, String>,
    generation: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            by_node: DashMap::new(),
            by_ip: DashMap::new(),
            generation: watch::Sender::new(0),
        }
    }
}

impl Registry {
    /// Registers `session` for its node; returns the session it replaces (the caller closes it).
    pub fn insert(&self, session: ServerSession) -> Option<ServerSession> {
        let node = session.identity().node_name.clone();
        for ip in &session.identity().node_ips {
            self.by_ip.insert(*ip, node.clone());
        }
        let old = self.by_node.insert(node, session);
        self.generation.send_modify(|g| *g += 1);
        old
    }

    /// Removes `session`, unless a newer session of the same node has replaced it.
    pub fn remove(&self, session: &ServerSession) {
        let node = &session.identity().node_name;
        let removed = self
            .by_node
            .remove_if(node, |_, current| current.id() == session.id())
            .is_some();
        if removed {
            for ip in &session.identity().node_ips {
                self.by_ip.remove_if(ip, |_, n| n == node);
            }
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// The session serving `node`, and how to name the host to its agent.
    pub fn lookup(&self, node: &NodeRef) -> Option<(ServerSession, TargetHost)> {
        match node {
            NodeRef::Name(name) => self
                .by_node
                .get(name)
                .map(|s| (s.clone(), TargetHost::Node)),
            NodeRef::Ip(ip) => {
                let name = self.by_ip.get(ip)?.clone();
                self.by_node
                    .get(&name)
                    .map(|s| (s.clone(), TargetHost::NodeIp(*ip)))
            }
        }
    }

    /// Number of connected agents.
    pub fn len(&self) -> usize {
        self.by_node.len()
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty()
    }

    /// Every session, for drain.
    pub fn sessions(&self) -> Vec<ServerSession> {
        self.by_node.iter().map(|e| e.value().clone()).collect()
    }

    /// Resolves once `node` has an agent (at once if it has one now).
    pub async fn wait_for(&self, node: &str) {
        let mut rx = self.generation.subscribe();
        // The sender lives as long as the registry, which outlives this borrow.
        let _ = rx.wait_for(|_| self.by_node.contains_key(node)).await;
    }

    /// Resolves once `node` has no agent.
    pub async fn wait_gone(&self, node: &str) {
        let mut rx = self.generation.subscribe();
        let _ = rx.wait_for(|_| !self.by_node.contains_key(node)).await;
    }

    /// Resolves once `node` has an agent other than session `old` (a reconnect).
    pub async fn wait_for_new(&self, node: &str, old: u64) {
        let mut rx = self.generation.subscribe();
        let _ = rx
            .wait_for(|_| self.by_node.get(node).is_some_and(|s| s.id() != old))
            .await;
    }
}
