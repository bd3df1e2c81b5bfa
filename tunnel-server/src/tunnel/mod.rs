//! The agent-facing side: the tunnel listener (QUIC and gRPC), each registered link served
//! until it ends, and a newer session of a node retiring its predecessor.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};
use tunnel_core::{CloseCause, HandshakeError, Initiator, Listener, ServerSession};

use crate::registry::Registry;

/// How long agents get to acknowledge the endpoint's close at the end of a shutdown.
const CLOSE_ACK: Duration = Duration::from_secs(2);

/// Accepts agents until `stop` turns true, then only finishes the handshakes in progress;
/// `close` (after the drain) closes the listener. Each link is served by its own task until it
/// ends.
pub(crate) async fn serve(
    mut listener: Listener,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
    mut close: oneshot::Receiver<()>,
    drain: Duration,
) {
    let mut links = JoinSet::new();
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Some(Ok(session)) => {
                    let registry = registry.clone();
                    let stop = stop.clone();
                    let span = info_span!("agent", peer.addr = %session.remote_addr());
                    links.spawn(async move { serve_link(session, &registry, &stop, drain).await }.instrument(span));
                }
                Some(Err(failure)) => rejected(&failure),
                None => break,
            },
            Some(_) = links.join_next(), if !links.is_empty() => {}
            () = crate::stopped(&mut stop), if !draining => {
                draining = true;
                listener.stop_accepting();
            }
            _ = &mut close => break,
        }
    }
    if !listener.close(CloseCause::Shutdown, CLOSE_ACK).await {
        warn!("agents did not acknowledge the close in time");
    }
    // The sessions were closed at the end of the drain; their links end with them.
    while links.join_next().await.is_some() {}
}

/// Logs and counts an agent that did not become a session. A refusal (certificate, identity)
/// is the operator's business; a handshake that failed on the way is not.
fn rejected(failure: &HandshakeError) {
    let reason = failure.error.reason();
    metrics::counter!(
        "edge_tunnel_server_handshakes_total",
        "result" => "rejected",
        "cause" => reason.cause.as_str(),
        "transport" => failure.transport.as_str()
    )
    .increment(1);
    if failure.error.is_peer() {
        warn!(
            peer.addr = %failure.remote,
            transport = %failure.transport,
            cause = %reason.cause.as_str(),
            error = %failure.error,
            "agent rejected"
        );
    } else {
        debug!(
            peer.addr = %failure.remote,
            transport = %failure.transport,
            cause = %reason.cause.as_str(),
            error = %failure.error,
            "agent handshake failed"
        );
    }
}

async fn serve_link(
    session: ServerSession,
    registry: &Registry,
    stop: &watch::Receiver<bool>,
    drain: Duration,
) {
    let node = session.identity().node_name.clone();
    let transport = session.transport().as_str();
    metrics::counter!(
        "edge_tunnel_server_handshakes_total",
        "result" => "accepted",
        "cause" => "none",
        "transport" => transport
    )
    .increment(1);
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
        session.go_away(CloseCause::Shutdown, Duration::from_secs(1));
    }
    let gauge = metrics::gauge!("edge_tunnel_server_sessions", "transport" => transport);
    gauge.increment(1.0);
    let serve = async {
        let reason = session.closed().await;
        gauge.decrement(1.0);
        registry.remove(&session);
        // The server's last close must reach the agent before the process may exit.
        session.finished().await;
        reason
    };
    let ((), reason) = tokio::join!(retire(replaced, &session, drain), serve);
    let initiator = match reason.initiator {
        Initiator::Local => "server",
        Initiator::Remote => "agent",
    };
    metrics::counter!(
        "edge_tunnel_server_session_ends_total",
        "cause" => reason.cause.as_str(),
        "initiator" => initiator
    )
    .increment(1);
    info!(
        agent.id = %node,
        session.id = session.id(),
        cause = %reason.cause.as_str(),
        closed_by = initiator,
        %reason,
        "agent session ended"
    );
}

/// What a new session says of the one it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Predecessor {
    /// The same agent process, which says it holds no other session: it lost the old link.
    Dead,
    /// Another agent process: a restart or a crash, unless the old one still answers (a
    /// DaemonSet surge, two agents with one certificate).
    Check,
    /// The same process, still serving the old link (the QUIC return), or an agent too old to
    /// say.
    Live,
}

fn predecessor(old: &ServerSession, new: &ServerSession) -> Predecessor {
    let (old, new) = (old.claims(), new.claims());
    if new.instance_id == 0 {
        Predecessor::Live
    } else if old.instance_id != new.instance_id {
        Predecessor::Check
    } else if new.live_sessions == 0 {
        Predecessor::Dead
    } else {
        Predecessor::Live
    }
}

/// The least time the old session of a restarted agent gets to answer; four round trips of
/// its link when longer. A wrong verdict costs nothing that trusting the restart would not.
const RESTART_CHECK: Duration = Duration::from_millis(250);

/// Ends the session a newer one of the same node replaced. A dead one is closed at once (its
/// streams reset; the opens waiting on it fail now and move to the new session): the agent
/// said it lost that link, or it comes from another process and the old link does not answer
/// a ping within a few round trips. A live one is retired: it gets no new streams, its open
/// ones may finish within `drain`, then it is closed. A session with nothing open closes at
/// once.
async fn retire(old: Option<ServerSession>, new: &ServerSession, drain: Duration) {
    let Some(old) = old else { return };
    let node = &old.identity().node_name;
    let dead = match predecessor(&old, new) {
        Predecessor::Dead => true,
        Predecessor::Check => {
            let within = (old.rtt().unwrap_or_default() * 4).max(RESTART_CHECK);
            !old.check_alive(within).await
        }
        Predecessor::Live => false,
    };
    if dead {
        info!(agent.id = %node, old.session = old.id(), old.transport = %old.transport(), open = old.open_streams(), "agent restarted or lost its link; closing its previous session and resetting its streams");
        old.close(CloseCause::Replaced);
        return;
    }
    info!(agent.id = %node, old.session = old.id(), old.transport = %old.transport(), open = old.open_streams(), "agent reconnected; retiring its previous session");
    old.go_away(CloseCause::Replaced, drain);
    if tokio::time::timeout(drain, old.idle()).await.is_err() {
        warn!(agent.id = %node, old.session = old.id(), open = old.open_streams(), "drain timeout reached on a replaced session; closing it");
    }
    old.close(CloseCause::Replaced);
}
