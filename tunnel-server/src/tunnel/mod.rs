//! The agent-facing listener: mTLS handshake, identity from the certificate, registration.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_core::{QuicListener, ServerSession};

use crate::registry::Registry;

/// Accepts agents until `stop` turns true; each link is served by its own task until it ends.
pub(crate) async fn serve(
    listener: Arc<QuicListener>,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut links = JoinSet::new();
    let mut draining = false;
    loop {
        tokio::select! {
            pending = listener.accept() => {
                let Some(pending) = pending else { break };
                if draining {
                    // Agents move to another replica (or wait for the restart) at once.
                    pending.refuse();
                    continue;
                }
                let registry = registry.clone();
                let stop = stop.clone();
                let peer = pending.remote_addr();
                links.spawn(
                    async move {
                        match pending.establish().await {
                            Ok(session) => serve_link(session, &registry, &stop, drain).await,
                            Err(e) => {
                                metrics::counter!("edge_tunnel_server_handshakes_total", "result" => "rejected").increment(1);
                                if e.is_peer() {
                                    warn!(error = %e, "agent rejected");
                                } else {
                                    debug!(error = %e, "agent handshake failed");
                                }
                            }
                        }
                    }
                    .instrument(info_span!("agent", peer.addr = %peer)),
                );
            }
            Some(_) = links.join_next(), if !links.is_empty() => {}
            () = crate::stopped(&mut stop), if !draining => draining = true,
        }
    }
    // The endpoint closed at the end of the drain; the links end with it.
    while links.join_next().await.is_some() {}
}

/// Serves agents registering over gRPC until `stop` turns true (the listener is dropped then,
/// so new agents fail over to another replica or retry).
pub(crate) async fn serve_grpc(
    mut listener: tunnel_core::GrpcListener,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut links = JoinSet::new();
    loop {
        tokio::select! {
            session = listener.accept() => {
                let Some(session) = session else { break };
                let registry = registry.clone();
                let stop = stop.clone();
                let peer = session.remote_addr();
                links.spawn(
                    async move { serve_link(session, &registry, &stop, drain).await }
                        .instrument(info_span!("agent", peer.addr = %peer)),
                );
            }
            Some(_) = links.join_next(), if !links.is_empty() => {}
            () = crate::stopped(&mut stop) => break,
        }
    }
    drop(listener);
    while links.join_next().await.is_some() {}
}

async fn serve_link(
    session: ServerSession,
    registry: &Registry,
    stop: &watch::Receiver<bool>,
    drain: Duration,
) {
    let node = session.identity().node_name.clone();
    let transport = session.transport().as_str();
    metrics::counter!("edge_tunnel_server_handshakes_total", "result" => "accepted").increment(1);
    info!(
        agent.id = %node,
        agent.ips = ?session.identity().node_ips,
        session.id = session.id(),
        transport,
        "agent registered"
    );
    let replaced = registry.insert(session.clone());
    if *stop.borrow() {
        // Registered while the server drains (after its go-away round): tell it too.
        session.go_away("server shutting down", Duration::from_secs(1));
    }
    let gauge = metrics::gauge!("edge_tunnel_server_sessions", "transport" => transport);
    gauge.increment(1.0);
    let serve = async {
        let reason = session.closed().await;
        gauge.decrement(1.0);
        registry.remove(&session);
        reason
    };
    let ((), reason) = tokio::join!(retire(replaced, drain), serve);
    info!(agent.id = %node, session.id = session.id(), %reason, "agent session ended");
}

/// Retires the session a newer one of the same node replaced (a reconnect, or `auto` moving
/// from gRPC back to QUIC): it gets no new streams, its open ones may finish within `drain`,
/// then it is closed. A session with nothing open closes at once.
async fn retire(old: Option<ServerSession>, drain: Duration) {
    let Some(old) = old else { return };
    let node = &old.identity().node_name;
    info!(agent.id = %node, old.session = old.id(), old.transport = %old.transport(), open = old.open_streams(), "agent reconnected; retiring its previous session");
    old.go_away("replaced by a newer session", drain);
    if tokio::time::timeout(drain, old.idle()).await.is_err() {
        warn!(agent.id = %node, old.session = old.id(), open = old.open_streams(), "drain timeout reached on a replaced session; closing it");
    }
    old.close("replaced by a newer session");
}
