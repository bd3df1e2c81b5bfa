//! One stream the server opened: read its target, check it against the allowlist, dial, answer,
//! copy. Forbidden targets are refused before any dial.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{Instrument, debug, debug_span, warn};
use tunnel_core::copy::copy_bidirectional;
use tunnel_core::{IncomingStream, OpenRequest, Refusal, RequestedStream, TunnelStream};

use crate::Shared;

/// How long a finished stream waits for the server to acknowledge its last bytes.
const DELIVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A local dial in progress, in `edge_tunnel_agent_dials_in_progress` until dropped.
struct DialInProgress(metrics::Gauge);

impl DialInProgress {
    fn new() -> Self {
        let gauge = metrics::gauge!("edge_tunnel_agent_dials_in_progress");
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for DialInProgress {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Serves one incoming stream to its end, under the server's port policy `ports` (`None`: it
/// sent none).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    incoming: IncomingStream,
    ports: Option<Arc<tunnel_core::PortPolicy>>,
) {
    let mut requested = match incoming.read_request().await {
        Ok(r) => r,
        Err(e) => {
            count("bad_header");
            if let Some(suppressed) = shared.refusals.admit() {
                warn!(
                    result = "bad_header",
                    suppressed = (suppressed > 0).then_some(suppressed),
                    error = %e,
                    "stream with a bad header reset"
                );
            }
            return;
        }
    };
    let request = requested.request().clone();
    let span = debug_span!("stream", target = %request.target, trace.id = request.trace_id);
    async move {
        if let Some(node) = &request.node {
            // A replica's forwarding request: only another replica serves those.
            let why = format!("a request for node {node} is for a replica, not an agent");
            count("unsupported");
            refused(&shared, &request, Refusal::Unsupported, &why);
            return refuse(requested, Refusal::Unsupported, &why).await;
        }
        let addr = match shared.allowlist.resolve(&request.target, ports.as_deref()) {
            Ok(addr) => addr,
            Err(denied) => {
                count("forbidden");
                refused(&shared, &request, Refusal::Forbidden, &denied);
                return refuse(requested, Refusal::Forbidden, &denied.to_string()).await;
            }
        };
        let tcp = match dial(&shared, &mut requested, addr).await {
            Ok(tcp) => tcp,
            Err(Undialed::Withdrawn) => return,
            Err(Undialed::Failed(refusal, detail)) => {
                refused(&shared, &request, refusal, &detail);
                return refuse(requested, refusal, &detail).await;
            }
        };
        let stream = match requested.accept().await {
            Ok(s) => s,
            Err(e) => {
                // The server gave up (timeout, client gone): drop the local connection.
                count("abandoned");
                debug!(error = %e, "server abandoned the stream");
                return;
            }
        };
        count("ok");
        relay(&shared, stream, tcp).await;
    }
    .instrument(span)
    .await;
}

/// One line at the default level for a stream the agent refused or could not dial: target,
/// port, why; throttled, with the count of lines dropped before it.
fn refused(
    shared: &Shared,
    request: &OpenRequest,
    refusal: Refusal,
    detail: &dyn std::fmt::Display,
) {
    let Some(suppressed) = shared.refusals.admit() else {
        return;
    };
    warn!(
        target = %request.target,
        port = request.target.port,
        trace.id = request.trace_id,
        result = refusal.as_str(),
        suppressed = (suppressed > 0).then_some(suppressed),
        error = %detail,
        "refused a stream"
    );
}

fn count(result: &'static str) {
    metrics::counter!("edge_tunnel_agent_streams_total", "result" => result).increment(1);
}

async fn refuse(requested: RequestedStream, refusal: Refusal, detail: &str) {
    if let Err(e) = requested.refuse(refusal, detail).await {
        debug!(error = %e, "refusal not delivered");
    }
}

/// How a local dial ended without a connection.
enum Undialed {
    /// The server's client left before we answered: no answer is owed.
    Withdrawn,
    /// The target did not take the connection; the server hears why.
    Failed(Refusal, String),
}

/// Dials the target within the dial timeout, giving up as soon as the server withdraws the
/// stream.
async fn dial(
    shared: &Shared,
    requested: &mut RequestedStream,
    addr: SocketAddr,
) -> Result<TcpStream, Undialed> {
    let in_progress = DialInProgress::new();
    let dial = tokio::time::timeout(shared.config.dial_timeout, TcpStream::connect(addr));
    let dialed = tokio::select! {
        dialed = dial => dialed,
        () = requested.withdrawn() => {
            count("cancelled");
            debug!(%addr, "dial withdrawn by the server");
            return Err(Undialed::Withdrawn);
        }
    };
    drop(in_progress);
    match dialed {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(e)) => {
            let refusal = Refusal::from_io(&e);
            count(refusal.as_str());
            Err(Undialed::Failed(refusal, format!("dial {addr}: {e}")))
        }
        Err(_) => {
            count("timeout");
            Err(Undialed::Failed(
                Refusal::Timeout,
                format!(
                    "dial {addr}: no answer within {:?}",
                    shared.config.dial_timeout
                ),
            ))
        }
    }
}

/// Copies between the accepted stream and the local connection until both ends finish.
async fn relay(shared: &Shared, mut stream: TunnelStream, mut tcp: TcpStream) {
    let open = metrics::gauge!("edge_tunnel_agent_streams_open");
    open.increment(1.0);
    let result = copy_bidirectional(&mut stream, &mut tcp, &shared.config.copy).await;
    open.decrement(1.0);
    let moved = match &result {
        Ok(t) => *t,
        Err(e) => e.transferred(),
    };
    metrics::counter!("edge_tunnel_agent_bytes_total", "direction" => "to_target")
        .increment(moved.a_to_b);
    metrics::counter!("edge_tunnel_agent_bytes_total", "direction" => "from_target")
        .increment(moved.b_to_a);
    match result {
        Ok(_) => {
            // Keep the session (held by this task) until the server has the last byte.
            stream.delivered(DELIVERY_TIMEOUT).await;
        }
        Err(e) => {
            debug!(error = %e, "stream ended with an error");
            stream.abort();
            // A reset, not a FIN: the local peer must not take a cut stream for a whole one.
            let _ = tcp.set_zero_linger();
        }
    }
}
