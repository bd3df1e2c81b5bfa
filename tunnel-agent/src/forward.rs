//! One stream the server opened: read its target, check it against the allowlist, dial, answer,
//! copy. Forbidden targets are refused before any dial.

use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{Instrument, debug, debug_span, info};
use tunnel_core::copy::copy_bidirectional;
use tunnel_core::{IncomingStream, Refusal};

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

/// Serves one incoming stream to its end.
pub(crate) async fn serve(shared: Arc<Shared>, incoming: IncomingStream) {
    let mut requested = match incoming.read_request().await {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!("edge_tunnel_agent_streams_total", "result" => "bad_header")
                .increment(1);
            info!(error = %e, "stream with a bad header reset");
            return;
        }
    };
    let request = requested.request().clone();
    let span = debug_span!("stream", target = %request.target, trace.id = request.trace_id);
    async move {
        let addr = match shared.allowlist.resolve(&request.target) {
            Ok(addr) => addr,
            Err(denied) => {
                metrics::counter!("edge_tunnel_agent_streams_total", "result" => "forbidden")
                    .increment(1);
                info!(reason = %denied, "refused a forbidden target");
                if let Err(e) = requested
                    .refuse(Refusal::Forbidden, &denied.to_string())
                    .await
                {
                    debug!(error = %e, "refusal not delivered");
                }
                return;
            }
        };
        let in_progress = DialInProgress::new();
        let dial = tokio::time::timeout(shared.config.dial_timeout, TcpStream::connect(addr));
        let dialed = tokio::select! {
            dialed = dial => dialed,
            () = requested.withdrawn() => {
                // The server's client left before we answered: stop dialing, answer nothing.
                metrics::counter!("edge_tunnel_agent_streams_total", "result" => "cancelled")
                    .increment(1);
                debug!(%addr, "dial withdrawn by the server");
                return;
            }
        };
        drop(in_progress);
        let mut tcp = match dialed {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                let refusal = Refusal::from_io(&e);
                metrics::counter!("edge_tunnel_agent_streams_total", "result" => refusal.as_str())
                    .increment(1);
                debug!(%addr, error = %e, "dial failed");
                let _ = requested
                    .refuse(refusal, &format!("dial {addr}: {e}"))
                    .await;
                return;
            }
            Err(_) => {
                metrics::counter!("edge_tunnel_agent_streams_total", "result" => "timeout")
                    .increment(1);
                let _ = requested
                    .refuse(
                        Refusal::Timeout,
                        &format!(
                            "dial {addr}: no answer within {:?}",
                            shared.config.dial_timeout
                        ),
                    )
                    .await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut stream = match requested.accept().await {
            Ok(s) => s,
            Err(e) => {
                // The server gave up (timeout, client gone): drop the local connection.
                metrics::counter!("edge_tunnel_agent_streams_total", "result" => "abandoned")
                    .increment(1);
                debug!(error = %e, "server abandoned the stream");
                return;
            }
        };
        metrics::counter!("edge_tunnel_agent_streams_total", "result" => "ok").increment(1);
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
    .instrument(span)
    .await;
}
