//! Which agent serves which node, on this replica. Node IPs map to nodes only through the IP SANs
//! of a connected agent's certificate; an IP that two connected nodes claim stays with the node
//! that claimed it first, so a second certificate cannot take over another node's address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tracing::warn;
use tunnel_core::{AgentIdentity, NodeRef, ServerSession, TargetHost};

/// What the registry needs of a live agent link: which session it is and whose.
///
/// The server stores [`ServerSession`]s, which exist only over a live link. The registry's logic
/// needs nothing of the link, so benches and tests store a cheap stand-in instead.
pub trait AgentLink: Clone {
    /// Unique within this process; tells a replaced session from its successor.
    fn id(&self) -> u64;
    /// The agent's identity, from its certificate.
    fn identity(&self) -> &AgentIdentity;
}

impl AgentLink for ServerSession {
    fn id(&self) -> u64 {
        Self::id(self)
    }

    fn identity(&self) -> &AgentIdentity {
        Self::identity(self)
    }
}

/// A link that is only an id and an identity: all the registry reads of a session. For tests
/// and benches of the registry, which need no live link; cheap to clone, as a session is.
#[derive(Debug, Clone)]
pub struct BareLink(std::sync::Arc<(u64, AgentIdentity)>);

impl BareLink {
    /// Session `id` of the agent `identity`.
    pub fn new(id: u64, identity: AgentIdentity) -> Self {
        Self(std::sync::Arc::new((id, identity)))
    }
}

impl AgentLink for BareLink {
    fn id(&self) -> u64 {
        self.0.0
    }

    fn identity(&self) -> &AgentIdentity {
        &self.0.1
    }
}

#[derive(Debug)]
struct Maps<S> {
    by_node: HashMap<String, S>,
    /// The connected nodes that claim each IP, in the order they claimed it: the first one owns
    /// it; when it leaves, the next one takes over. Kept per IP so that a node leaving costs
    /// the few claimants of its IPs, not a scan of every node under the lock.
    claims: HashMap<IpAddr, Vec<String>>,
}

impl<S> Default for Maps<S> {
    fn default() -> Self {
        Self {
            by_node: HashMap::new(),
            claims: HashMap::new(),
        }
    }
}

impl<S> Maps<S> {
    fn owner(&self, ip: &IpAddr) -> Option<&String> {
        self.claims.get(ip).and_then(|c| c.first())
    }

    fn unclaim(&mut self, ip: &IpAddr, node: &str) {
        if let Some(claimants) = self.claims.get_mut(ip) {
            claimants.retain(|n| n != node);
            if claimants.is_empty() {
                self.claims.remove(ip);
            }
        }
    }
}

/// The live agent sessions of this replica, by node name and by node IP. Both maps change
/// under one lock, so a lookup never sees a node without its IPs or the reverse.
#[derive(Debug)]
pub struct Registry<S = ServerSession> {
    maps: Mutex<Maps<S>>,
    generation: watch::Sender<u64>,
}

impl<S> Default for Registry<S> {
    fn default() -> Self {
        Self {
            maps: Mutex::new(Maps::default()),
            generation: watch::Sender::new(0),
        }
    }
}

impl<S: AgentLink> Registry<S> {
    fn maps(&self) -> MutexGuard<'_, Maps<S>> {
        // The maps are consistent after every statement; a panic elsewhere cannot break them.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `session` for its node; returns the session it replaces (the caller closes it).
    pub fn insert(&self, session: S) -> Option<S> {
        let node = session.identity().node_name.clone();
        let old = {
            let mut maps = self.maps();
            let old = maps.by_node.insert(node.clone(), session.clone());
            // IPs the previous session of this node had and the new one has not: the next
            // claimant, if any, takes them over.
            if let Some(old) = &old {
                for ip in &old.identity().node_ips {
                    if !session.identity().node_ips.contains(ip) {
                        maps.unclaim(ip, &node);
                    }
                }
            }
            for ip in &session.identity().node_ips {
                let claimants = maps.claims.entry(*ip).or_default();
                if !claimants.contains(&node) {
                    claimants.push(node.clone());
                }
                if let Some(owner) = claimants.first().filter(|o| **o != node) {
                    metrics::counter!("edge_tunnel_server_ip_conflicts_total").increment(1);
                    warn!(%ip, agent.id = %node, owner = %owner, "node IP already claimed by another connected node; not routing it here");
                }
            }
            old
        };
        self.generation.send_modify(|g| *g += 1);
        old
    }

    /// Removes `session`, unless a newer session of the same node has replaced it. Its IPs go
    /// to another connected node that also claims them, if any.
    pub fn remove(&self, session: &S) {
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
                maps.unclaim(ip, node);
            }
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// The session serving `node`, and how to name the host to its agent.
    pub fn lookup(&self, node: &NodeRef) -> Option<(S, TargetHost)> {
        let maps = self.maps();
        match node {
            NodeRef::Name(name) => maps
                .by_node
                .get(name)
                .map(|s| (s.clone(), TargetHost::Node)),
            NodeRef::Ip(ip) => {
                let name = maps.owner(ip)?;
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

    /// The names of the connected nodes, in no particular order.
    pub fn node_names(&self) -> Vec<String> {
        self.maps().by_node.keys().cloned().collect()
    }

    /// A receiver that sees a change each time an agent comes or goes (its value counts the
    /// changes; read the registry for what they were).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Every session, for drain.
    pub fn sessions(&self) -> Vec<S> {
        self.maps().by_node.values().cloned().collect()
    }

    fn has(&self, node: &str, pred: impl Fn(&S) -> bool) -> bool {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn link(id: u64, node: &str, ips: &[&str]) -> BareLink {
        BareLink::new(
            id,
            AgentIdentity {
                node_name: node.into(),
                node_ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            },
        )
    }

    fn by_ip(registry: &Registry<BareLink>, ip: &str) -> Option<(String, TargetHost)> {
        registry
            .lookup(&NodeRef::Ip(ip.parse().unwrap()))
            .map(|(s, host)| (s.identity().node_name.clone(), host))
    }

    #[test]
    fn lookup_by_name_and_by_ip() {
        let registry = Registry::default();
        assert!(registry.insert(link(1, "node-a", &["10.0.0.1"])).is_none());
        let (s, host) = registry.lookup(&NodeRef::Name("node-a".into())).unwrap();
        assert_eq!((s.id(), host), (1, TargetHost::Node));
        assert_eq!(
            by_ip(&registry, "10.0.0.1"),
            Some((
                "node-a".into(),
                TargetHost::NodeIp("10.0.0.1".parse().unwrap())
            ))
        );
        assert!(registry.lookup(&NodeRef::Name("node-b".into())).is_none());
        assert!(by_ip(&registry, "10.0.0.2").is_none());
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn an_ip_stays_with_its_first_claimer_and_passes_on_when_it_leaves() {
        let registry = Registry::default();
        let a = link(1, "node-a", &["10.0.0.1"]);
        registry.insert(a.clone());
        registry.insert(link(2, "node-b", &["10.0.0.1", "10.0.0.2"]));
        assert_eq!(by_ip(&registry, "10.0.0.1").unwrap().0, "node-a");
        assert_eq!(by_ip(&registry, "10.0.0.2").unwrap().0, "node-b");
        registry.remove(&a);
        assert_eq!(by_ip(&registry, "10.0.0.1").unwrap().0, "node-b");
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn a_replaced_session_cannot_remove_its_successor() {
        let registry = Registry::default();
        let old = link(1, "node-a", &["10.0.0.1", "10.0.0.9"]);
        registry.insert(old.clone());
        let replaced = registry.insert(link(2, "node-a", &["10.0.0.1"])).unwrap();
        assert_eq!(replaced.id(), 1);
        // The IP the new certificate dropped no longer routes.
        assert!(by_ip(&registry, "10.0.0.9").is_none());
        registry.remove(&old);
        let (s, _) = registry.lookup(&NodeRef::Name("node-a".into())).unwrap();
        assert_eq!(s.id(), 2);
        assert_eq!(by_ip(&registry, "10.0.0.1").unwrap().0, "node-a");
    }

    #[test]
    fn heirs_follow_claim_order_on_leave_and_on_a_replacement_that_drops_the_ip() {
        let registry = Registry::default();
        let a = link(1, "node-a", &["10.0.0.1"]);
        registry.insert(a.clone());
        registry.insert(link(2, "node-b", &["10.0.0.1"]));
        registry.insert(link(3, "node-c", &["10.0.0.1"]));
        // node-a's new certificate no longer names the IP: the next claimant, node-b, owns it.
        registry.insert(link(4, "node-a", &[]));
        assert_eq!(by_ip(&registry, "10.0.0.1").unwrap().0, "node-b");
        let b = registry.lookup(&NodeRef::Name("node-b".into())).unwrap().0;
        registry.remove(&b);
        assert_eq!(by_ip(&registry, "10.0.0.1").unwrap().0, "node-c");
        let c = registry.lookup(&NodeRef::Name("node-c".into())).unwrap().0;
        registry.remove(&c);
        assert!(by_ip(&registry, "10.0.0.1").is_none());
        // The first session of node-a is long replaced: removing it changes nothing.
        registry.remove(&a);
        assert_eq!(registry.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_see_connects_and_reconnects() {
        let registry = Arc::new(Registry::default());
        let waiter = tokio::spawn({
            let registry = registry.clone();
            async move {
                registry.wait_for("node-a").await;
                registry.wait_for_new("node-a", 1).await;
            }
        });
        tokio::task::yield_now().await;
        registry.insert(link(1, "node-a", &[]));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        registry.insert(link(2, "node-a", &[]));
        waiter.await.unwrap();
        let last = link(2, "node-a", &[]);
        registry.remove(&last);
        registry.wait_gone("node-a").await;
        assert!(registry.is_empty());
    }
}
