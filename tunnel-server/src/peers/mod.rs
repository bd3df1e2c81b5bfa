//! Replicas serving one another's nodes. Behind a load balancer an agent lands on whichever
//! replica it picks; a request for its node may land on any other. So every replica dials a
//! peer link to every other one (QUIC, mutual TLS with its serving certificate, which carries
//! the replica mark), and on a link it *accepted* a replica opens streams toward the dialer:
//! "open this port on node N among your agents". The dialer serves such a stream from its own
//! registry only, so a request crosses one peer link at most and never loops.
//!
//! Who holds which node is asked, not told: on a miss, the peers are tried one by one (the
//! stream's own opening is the question, `no_agent` the answer), and the replica that answered
//! is remembered until it says `no_agent` or its link goes. Nothing is sent while agents come and
//! go, which with thousands of agents reconnecting at once (a replica's restart) would be a
//! storm of deltas to every peer; a miss costs one round trip per peer asked, on a LAN.

mod dial;
mod setup;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info};
use tunnel_core::{
    CloseCause, CloseReason, LinkState, NodeRef, OpenError, OpenRequest, Refusal, ReplicaSession,
    TunnelStream,
};

use dial::{Dialing, Membership, Serving, dial};
pub(crate) use setup::Setup;

/// The most nodes remembered with their holder. Past it the directory starts again empty: it
/// is a cache, and asking again costs a round trip per peer.
const DIRECTORY_CAP: usize = 100_000;

/// Where a node was last found.
#[derive(Debug, Clone)]
enum Holder {
    /// On the replica of this server id.
    At(String),
    /// Its replica said it no longer holds it, or went away, at this instant: the agent is
    /// moving to another replica (its own drained or died), and appears there shortly.
    Left(Instant),
}

/// How long a node whose replica let it go counts as moving: opens for it wait that long for
/// its agent to turn up on another replica (a reconnect through the load balancer: a backoff
/// of a second or two, then a handshake).
pub(crate) const MOVE_WAIT: Duration = Duration::from_secs(5);

/// What asking the peers found.
#[derive(Debug)]
pub(crate) enum Found {
    /// The stream, through the replica that holds the node's agent.
    Stream(TunnelStream),
    /// No peer holds the node. `moving`: its last holder let it go within [`MOVE_WAIT`]: the
    /// agent is likely about to appear on another replica.
    Nowhere {
        /// The node's last holder said `no_agent`, or its link ended, that recently.
        moving: bool,
    },
}

/// The peer links other replicas dialed to this one, and where nodes were last found.
#[derive(Debug)]
pub(crate) struct Peers {
    server_id: String,
    state: Mutex<State>,
    /// The streams other replicas forwarded here, being served.
    serving: std::sync::Arc<Serving>,
}

#[derive(Debug, Default)]
struct State {
    /// By the server id each replica registered with, oldest first. Usually one each; a
    /// replica's new link comes before its old one is known dead (a restart), and both are
    /// kept: each leaves when it closes, and the newest serving one is used.
    links: HashMap<String, Vec<ReplicaSession>>,
    /// Node → where it was last found.
    holders: HashMap<NodeRef, Holder>,
}

impl State {
    /// Records where `node` is, within [`DIRECTORY_CAP`].
    fn remember(&mut self, node: &NodeRef, holder: Holder) {
        if self.holders.len() >= DIRECTORY_CAP && !self.holders.contains_key(node) {
            self.holders.clear();
        }
        self.holders.insert(node.clone(), holder);
        directory_gauge(self);
    }
}

impl Peers {
    pub(crate) fn new(server_id: &str, serving: std::sync::Arc<Serving>) -> Self {
        Self {
            server_id: server_id.to_owned(),
            state: Mutex::new(State::default()),
            serving,
        }
    }

    /// Resolves when no stream another replica forwarded here is being served: the drain
    /// waits for these as for the fronts' own.
    pub(crate) async fn idle(&self) {
        self.serving.idle().await;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every statement leaves the maps consistent; a panic elsewhere cannot break them.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens `port` on `node` through the replica that holds its agent. The replica that
    /// served it last is asked first; a refusal other than `no_agent` is that replica's
    /// agent's answer and ends the search.
    pub(crate) async fn open(&self, node: &NodeRef, port: u16) -> Result<Found, OpenError> {
        let candidates = {
            let state = self.state();
            let cached = match state.holders.get(node) {
                Some(Holder::At(id)) => Some(id),
                _ => None,
            };
            let mut links: Vec<(String, ReplicaSession)> = state
                .links
                .iter()
                .filter_map(|(id, links)| {
                    let serving = links
                        .iter()
                        .rev()
                        .find(|l| matches!(l.state(), LinkState::Active));
                    serving.map(|link| (id.clone(), link.clone()))
                })
                .collect();
            // The remembered holder first, then the others in a stable order.
            links.sort_by(|(a, _), (b, _)| {
                (Some(a) != cached)
                    .cmp(&(Some(b) != cached))
                    .then_with(|| a.cmp(b))
            });
            links
        };
        for (id, link) in candidates {
            let request = OpenRequest::to_peer(node.clone(), port, link.next_trace_id());
            debug!(%node, port, peer.id = %id, trace.id = request.trace_id, "asking a peer");
            match link.open(&request).await {
                Ok(stream) => {
                    self.state().remember(node, Holder::At(id));
                    forwarded("ok");
                    return Ok(Found::Stream(stream));
                }
                Err(OpenError::Refused {
                    refusal: Refusal::Leaving,
                    ..
                }) => {
                    self.state().remember(node, Holder::Left(Instant::now()));
                }
                Err(OpenError::Refused {
                    refusal: Refusal::NoAgent,
                    ..
                })
                | Err(OpenError::LinkClosed(_)) => {
                    let mut state = self.state();
                    if matches!(state.holders.get(node), Some(Holder::At(holder)) if *holder == id)
                    {
                        state.remember(node, Holder::Left(Instant::now()));
                    }
                }
                Err(e) => {
                    forwarded(if e.is_refusal() { "refused" } else { "failed" });
                    return Err(e);
                }
            }
        }
        forwarded("no_agent");
        let mut state = self.state();
        let moving = match state.holders.get(node) {
            Some(Holder::Left(since)) if since.elapsed() < MOVE_WAIT => true,
            Some(Holder::Left(_)) => {
                state.holders.remove(node);
                directory_gauge(&state);
                false
            }
            _ => false,
        };
        Ok(Found::Nowhere { moving })
    }

    /// Takes the peer links the tunnel listener accepts until its queue closes. A link from
    /// this replica itself (found in its own peer list) is closed.
    pub(crate) async fn accept(&self, mut links: mpsc::Receiver<ReplicaSession>) {
        let mut ends = JoinSet::new();
        loop {
            tokio::select! {
                link = links.recv() => match link {
                    Some(link) => self.add(link, &mut ends),
                    None => break,
                },
                Some(Ok((id, session, reason))) = ends.join_next(), if !ends.is_empty() => {
                    self.forget(&id, session, &reason);
                }
            }
        }
    }

    fn add(&self, link: ReplicaSession, ends: &mut JoinSet<(String, u64, CloseReason)>) {
        let id = link.identity().server_id.clone();
        if id == self.server_id {
            debug!("our own peer link (this replica is in its peer list): closing it");
            link.close(CloseCause::Refused);
            return;
        }
        info!(peer.id = %id, peer.addr = %link.remote_addr(), "peer link accepted");
        let mut state = self.state();
        let links = state.links.entry(id.clone()).or_default();
        if links.is_empty() {
            links_gauge().increment(1.0);
        }
        links.push(link.clone());
        drop(state);
        ends.spawn(async move {
            let reason = link.closed().await;
            (id, link.id(), reason)
        });
    }

    fn forget(&self, id: &str, session: u64, reason: &CloseReason) {
        let mut state = self.state();
        let Some(links) = state.links.get_mut(id) else {
            return;
        };
        links.retain(|l| l.id() != session);
        if links.is_empty() {
            state.links.remove(id);
            // Its agents are on their way to the other replicas.
            let now = Instant::now();
            for holder in state.holders.values_mut() {
                if matches!(holder, Holder::At(at) if at == id) {
                    *holder = Holder::Left(now);
                }
            }
            links_gauge().decrement(1.0);
            info!(peer.id = %id, %reason, "peer link ended");
        }
    }
}

fn forwarded(result: &'static str) {
    metrics::counter!("edge_tunnel_server_peer_forwards_total", "result" => result).increment(1);
}

fn directory_gauge(state: &State) {
    metrics::gauge!("edge_tunnel_server_peer_directory_entries").set(state.holders.len() as f64);
}

/// Peer links other replicas dialed to this one (this replica forwards over them).
fn links_gauge() -> metrics::Gauge {
    metrics::gauge!("edge_tunnel_server_peer_links", "direction" => "in")
}
