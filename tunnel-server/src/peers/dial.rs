//! This replica's side of the peer links it dials: who the peers are (a static list, the
//! headless Service's DNS name re-resolved), one link kept to each, and the streams the peers
//! open on those links served from this replica's own agents.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_core::copy::{CopyConfig, copy_bidirectional};
use tunnel_core::{
    AgentSession, CloseCause, Connector, IncomingStream, OpenError, OpenRequest, Refusal,
    RequestedStream, Target, TransportChoice, proto,
};

use crate::ports::Ports;
use crate::registry::Registry;

/// How often the peer list is resolved again: a replica added to the headless Service is
/// linked within this (plus its DNS TTL).
const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// Redial backoff of a peer link: from the first to the longest wait. A replica that starts
/// (or comes back) is linked within the longest wait of the others.
const REDIAL_FIRST: Duration = Duration::from_millis(500);
const REDIAL_MAX: Duration = Duration::from_secs(5);
/// How long a forwarded stream waits for the peer to acknowledge its last bytes.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the peers are: `HOST:PORT` entries, and a DNS name whose addresses are the replicas
/// (the headless Service), at `port`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Membership {
    pub(crate) statics: Vec<(String, u16)>,
    pub(crate) dns_name: Option<(String, u16)>,
}

impl Membership {
    /// Every address the peers have now. A name whose lookup fails keeps its last answer: a
    /// DNS hiccup (CoreDNS restarting) must not cut the links to every peer.
    async fn resolve(
        &self,
        resolver: &TokioResolver,
        last: &mut HashMap<String, Vec<IpAddr>>,
    ) -> BTreeSet<SocketAddr> {
        let mut addrs = BTreeSet::new();
        let names = self.statics.iter().chain(self.dns_name.as_ref());
        for (host, port) in names {
            if let Ok(ip) = host.parse() {
                addrs.insert(SocketAddr::new(ip, *port));
                continue;
            }
            match resolver.lookup_ip(host.as_str()).await {
                Ok(ips) => {
                    last.insert(host.clone(), ips.iter().collect());
                }
                // An answer: the name has no replicas now (the Service has no endpoints).
                Err(e) if e.is_no_records_found() => {
                    last.insert(host.clone(), Vec::new());
                }
                Err(e) => {
                    debug!(peer.host = %host, error = %e, "peer name does not resolve; keeping its last answer")
                }
            }
            if let Some(ips) = last.get(host) {
                addrs.extend(ips.iter().map(|ip| SocketAddr::new(*ip, *port)));
            }
        }
        addrs
    }
}

/// What serving the peers' streams needs of this replica.
#[derive(Debug)]
pub(crate) struct Dialing {
    pub(crate) server_id: String,
    /// The name the peers' certificate carries (they serve the same one as this replica).
    pub(crate) server_name: String,
    pub(crate) connector: Connector,
    pub(crate) registry: Arc<Registry>,
    pub(crate) ports: Arc<Ports>,
    pub(crate) copy: CopyConfig,
    /// The server ids this replica holds a link to (one per replica, whatever its addresses).
    pub(crate) linked: std::sync::Mutex<HashSet<String>>,
    /// Forwarded streams being served, which the drain waits for as for the fronts'.
    pub(crate) serving: Arc<Serving>,
}

/// Counts the streams peers opened here while they run; [`idle`](Self::idle) waits for none.
#[derive(Debug, Default)]
pub(crate) struct Serving {
    streams: watch::Sender<usize>,
}

impl Serving {
    fn start(self: &Arc<Self>) -> ServingGuard {
        self.streams.send_modify(|n| *n += 1);
        ServingGuard(self.clone())
    }

    /// Resolves when no forwarded stream is being served.
    pub(crate) async fn idle(&self) {
        let mut rx = self.streams.subscribe();
        // The sender lives in `self`.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

struct ServingGuard(Arc<Serving>);

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.0.streams.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Keeps a peer link to every address of `membership` but this replica's own, until `stop`.
pub(crate) async fn dial(
    membership: Membership,
    resolver: TokioResolver,
    dialing: Dialing,
    mut stop: watch::Receiver<bool>,
) {
    let dialing = Arc::new(dialing);
    // One task per peer address, aborted when the address leaves the list or at the cut.
    let mut tasks = JoinSet::new();
    let mut links: HashMap<SocketAddr, AbortHandle> = HashMap::new();
    let mut last = HashMap::new();
    loop {
        let addrs = tokio::select! {
            addrs = membership.resolve(&resolver, &mut last) => addrs,
            () = crate::stopped(&mut stop) => break,
        };
        links.retain(|addr, task| {
            let keep = addrs.contains(addr);
            if !keep {
                info!(peer.addr = %addr, "peer left the peer list");
                task.abort();
            }
            keep
        });
        for addr in addrs {
            links.entry(addr).or_insert_with(|| {
                let span = info_span!("peer", peer.addr = %addr);
                tasks.spawn(keep_link(addr, dialing.clone()).instrument(span))
            });
        }
        tokio::select! {
            () = tokio::time::sleep(RESOLVE_EVERY) => {}
            () = crate::stopped(&mut stop) => break,
        }
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
}

/// Dials `addr` until it answers, serves the link until it ends, and again; returns when the
/// address is this replica's own.
async fn keep_link(addr: SocketAddr, dialing: Arc<Dialing>) {
    let register = proto::Register {
        node_name: dialing.server_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let mut wait = REDIAL_FIRST;
    let mut failures = 0u32;
    // The replica this address answered as, last time.
    let mut known: Option<String> = None;
    loop {
        // Linked to that replica through another address already: one link is enough, until
        // that one ends.
        while known.as_ref().is_some_and(|id| dialing.is_linked(id)) {
            tokio::time::sleep(jittered(REDIAL_MAX)).await;
        }
        let connect = dialing.connector.connect_over(
            TransportChoice::Quic,
            addr,
            &dialing.server_name,
            register.clone(),
        );
        match connect.await {
            Ok(link) if link.server_id() == dialing.server_id => {
                debug!("this address is this replica's own");
                link.close(CloseCause::Refused);
                return;
            }
            Ok(link) => {
                known = Some(link.server_id().to_owned());
                match Linked::claim(&dialing, link.server_id()) {
                    Some(_linked) => {
                        info!(peer.id = %link.server_id(), "peer link up");
                        wait = REDIAL_FIRST;
                        failures = 0;
                        let reason = serve(link, &dialing).await;
                        info!(%reason, "peer link ended");
                    }
                    None => {
                        // The same replica under another address (an AAAA record beside its A
                        // record, or in both lists): one link is enough.
                        debug!(peer.id = %link.server_id(), "already linked to this replica at another address");
                        link.close(CloseCause::Replaced);
                    }
                }
            }
            Err(e) => {
                failures += 1;
                // A replica still starting, or one going away: say so once, then quietly.
                if failures == 1 {
                    warn!(error = %e, "cannot link to a peer; retrying");
                } else {
                    debug!(error = %e, failures, "cannot link to a peer; retrying");
                }
            }
        }
        tokio::time::sleep(jittered(wait)).await;
        wait = (wait * 2).min(REDIAL_MAX);
    }
}

/// A peer link up, counted in the `out` gauge and in [`Dialing::linked`] while it lives
/// (however its task ends, an abort included).
struct Linked {
    dialing: Arc<Dialing>,
    server_id: String,
    gauge: metrics::Gauge,
}

impl Dialing {
    /// Whether a link to the replica `server_id` is up.
    fn is_linked(&self, server_id: &str) -> bool {
        self.linked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(server_id)
    }
}

impl Linked {
    /// Claims the link to `server_id`: `None` when another address's task holds one already.
    fn claim(dialing: &Arc<Dialing>, server_id: &str) -> Option<Self> {
        let mut linked = dialing
            .linked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !linked.insert(server_id.to_owned()) {
            return None;
        }
        let gauge = metrics::gauge!("edge_tunnel_server_peer_links", "direction" => "out");
        gauge.increment(1.0);
        Some(Self {
            dialing: dialing.clone(),
            server_id: server_id.to_owned(),
            gauge,
        })
    }
}

impl Drop for Linked {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        self.dialing
            .linked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.server_id);
    }
}

/// Between 50 % and 100 % of `wait`, so that replicas restarted together do not redial in step.
fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Serves the streams the peer opens on `link` until the link ends (they end with it).
async fn serve(link: AgentSession, dialing: &Arc<Dialing>) -> tunnel_core::CloseReason {
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            incoming = link.accept() => match incoming {
                Ok(incoming) => {
                    streams.spawn(serve_stream(incoming, dialing.clone()));
                }
                Err(_) => return link.closed().await,
            },
            // The peer sends no more streams here: let its streams finish, and dial again.
            state = link.draining() => {
                if let tunnel_core::LinkState::Draining(reason) = state {
                    while streams.join_next().await.is_some() {}
                    link.close(CloseCause::GoAway);
                    return reason;
                }
                return link.closed().await;
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

/// One stream a peer opened: open the same port of the node on this replica's agent, answer
/// with that agent's answer, and copy.
async fn serve_stream(incoming: IncomingStream, dialing: Arc<Dialing>) {
    let mut requested = match incoming.read_request().await {
        Ok(r) => r,
        Err(e) => {
            served("bad_header");
            debug!(error = %e, "peer stream with a bad header");
            return;
        }
    };
    let request = requested.request().clone();
    let Some(node) = request.node.clone() else {
        served("unsupported");
        return refuse(
            requested,
            Refusal::Unsupported,
            "a peer link carries requests for a node only",
        )
        .await;
    };
    let port = request.target.port;
    // Whether we hold the node comes first: only the holder's answer ends the peer's search.
    let Some((session, host)) = dialing.registry.lookup(&node) else {
        served("no_agent");
        return refuse(requested, Refusal::NoAgent, "no agent for this node here").await;
    };
    // The peer checked its own port configuration; ours is the same, and a replica that
    // has not caught up yet must not serve what it does not.
    if !dialing.ports.current().serves(port) {
        served("forbidden");
        let why = format!("port {port} is not served by this replica");
        return refuse(requested, Refusal::Forbidden, &why).await;
    }
    let _serving = dialing.serving.start();
    let open = OpenRequest::new(Target { host, port }, request.trace_id);
    debug!(%node, port, trace.id = request.trace_id, "serving a peer's stream");
    let opened = tokio::select! {
        opened = session.open(&open) => opened,
        // The peer's client left: the open on our agent is dropped, which withdraws it.
        () = requested.withdrawn() => {
            served("withdrawn");
            return;
        }
    };
    let mut agent = match opened {
        Ok(stream) => stream,
        Err(e) => {
            let (refusal, detail) = match &e {
                OpenError::Refused {
                    refusal, detail, ..
                } => (*refusal, detail.clone()),
                // The agent is leaving (its link drains, or closed as we opened): it is on its
                // way to another replica, where the peer will find it.
                OpenError::LinkClosed(_) => (Refusal::Leaving, e.to_string()),
                _ => (e.refusal(), e.to_string()),
            };
            served(refusal.as_str());
            return refuse(requested, refusal, &detail).await;
        }
    };
    let mut peer = match requested.accept().await {
        Ok(stream) => stream,
        Err(e) => {
            served("abandoned");
            debug!(error = %e, "the peer gave up on the stream");
            agent.abort();
            return;
        }
    };
    served("ok");
    match copy_bidirectional(&mut peer, &mut agent, &dialing.copy).await {
        Ok(_) => {
            tokio::join!(
                peer.delivered(DELIVERY_TIMEOUT),
                agent.delivered(DELIVERY_TIMEOUT)
            );
        }
        Err(e) => {
            debug!(error = %e, "forwarded stream ended with an error");
            peer.abort();
            agent.abort();
        }
    }
}

async fn refuse(requested: RequestedStream, refusal: Refusal, detail: &str) {
    if let Err(e) = requested.refuse(refusal, detail).await {
        debug!(error = %e, "refusal not delivered to the peer");
    }
}

fn served(result: &'static str) {
    metrics::counter!("edge_tunnel_server_peer_streams_served_total", "result" => result)
        .increment(1);
}
