//! Which agent serves which node, on this replica. Node IPs map to nodes only through the IP SANs
//! of a connected agent's certificate; an IP that two connected nodes claim stays with the node
//! that claimed it first, so a second certificate cannot take over another node's address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tracing::warn;
use tunnel_core::{NodeRef, ServerSession, TargetHost};

#[derive(Debug, Default)]
struct Maps {
    by_node: HashMap<String, ServerSession>,
    by_ip: HashMap<IpAddr, String>,
}

/// The live agent sessions of this replica, by node name and by node IP. Both maps change
/// under one lock, so a lookup never sees a node without its IPs or the reverse.
#[derive(Debug)]
pub struct Registry {
    maps: Mutex<Maps>,
    generation: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            maps: Mutex::new(Maps::default()),
            generation: watch::Sender::new(0),
        }
    }
}

impl Registry {
    fn maps(&self) -> MutexGuard<'_, Maps> {
        // The maps are consistent after every statement; a panic elsewhere cannot break them.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `session` for its node; returns the session it replaces (the caller closes it).
    pub fn insert(&self, session: ServerSession) -> Option<ServerSession> {
        let node = session.identity().node_name.clone();
        let old = {
            let mut maps = self.maps();
            let old = maps.by_node.insert(node.clone(), session.clone());
            // IPs the previous session of this node had and the new one has not.
            if let Some(old) = &old {
                for ip in &old.identity().node_ips {
                    if !session.identity().node_ips.contains(ip)
                        && maps.by_ip.get(ip) == Some(&node)
                    {
                        maps.by_ip.remove(ip);
                    }
                }
            }
            for ip in &session.identity().node_ips {
                match maps.by_ip.get(ip) {
                    Some(owner) if *owner != node => {
                        metrics::counter!("edge_tunnel_server_ip_conflicts_total").increment(1);
                        warn!(%ip, agent.id = %node, owner = %owner, "node IP already claimed by another connected node; not routing it here");
                    }
                    _ => {
                        maps.by_ip.insert(*ip, node.clone());
                    }
                }
            }
            old
        };
        self.generation.send_modify(|g| *g += 1);
        old
    }

    /// Removes `session`, unless a newer session of the same node has replaced it. Its IPs go
    /// to another connected node that also claims them, if any.
    pub fn remove(&self, session: &ServerSession) {
        let node = &session.identity().node_name;
        {
            let mut maps = self.maps();
            if maps
                .by_node
                .get(node)
                .is_none_or(|s| s.id() != session.id())
            {
                return;
            }
            maps.by_node.remove(node);
            for ip in &session.identity().node_ips {
                if maps.by_ip.get(ip) != Some(node) {
                    continue;
                }
                maps.by_ip.remove(ip);
                let heir = maps
                    .by_node
                    .iter()
                    .find(|(_, s)| s.identity().node_ips.contains(ip))
                    .map(|(n, _)| n.clone());
                if let Some(heir) = heir {
                    maps.by_ip.insert(*ip, heir);
                }
            }
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// The session serving `node`, and how to name the host to its agent.
    pub fn lookup(&self, node: &NodeRef) -> Option<(ServerSession, TargetHost)> {
        let maps = self.maps();
        match node {
            NodeRef::Name(name) => maps
                .by_node
                .get(name)
                .map(|s| (s.clone(), TargetHost::Node)),
            NodeRef::Ip(ip) => {
                let name = maps.by_ip.get(ip)?;
                maps.by_node
                    .get(name)
                    .map(|s| (s.clone(), TargetHost::NodeIp(*ip)))
            }
        }
    }

    /// Number of connected agents.
    pub fn len(&self) -> usize {
        self.maps().by_node.len()
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.maps().by_node.is_empty()
    }

    /// Every session, for drain.
    pub fn sessions(&self) -> Vec<ServerSession> {
        self.maps().by_node.values().cloned().collect()
    }

    fn has(&self, node: &str, pred: impl Fn(&ServerSession) -> bool) -> bool {
        self.maps().by_node.get(node).is_some_and(pred)
    }

    /// Resolves once `node` has an agent (at once if it has one now).
    pub async fn wait_for(&self, node: &str) {
        let mut rx = self.generation.subscribe();
        // The sender lives as long as the registry, which outlives this borrow.
        let _ = rx.wait_for(|_| self.has(node, |_| true)).await.map(|_| ());
    }

    /// Resolves once `node` has no agent.
    pub async fn wait_gone(&self, node: &str) {
        let mut rx = self.generation.subscribe();
        let _ = rx.wait_for(|_| !self.has(node, |_| true)).await.map(|_| ());
    }

    /// Resolves once `node` has an agent other than session `old` (a reconnect).
    pub async fn wait_for_new(&self, node: &str, old: u64) {
        let mut rx = self.generation.subscribe();
        let _ = rx
            .wait_for(|_| self.has(node, |s| s.id() != old))
            .await
            .map(|_| ());
    }
}
