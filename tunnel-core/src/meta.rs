//! The meta endpoints of a tunnel component: `/healthz`, `/readyz`, `/metrics` (feature
//! `meta`). The embedding program owns the metrics recorder and passes its handle in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::debug;

/// What the meta endpoints report.
#[derive(Debug, Clone)]
pub struct MetaState {
    /// True while the component serves (listener up / session established, not draining).
    pub ready: Arc<AtomicBool>,
    /// The recorder's handle; `None` answers 404 on `/metrics`.
    pub metrics: Option<PrometheusHandle>,
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn answer(state: &MetaState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" | "/livez" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if state.ready.load(Ordering::Acquire) => {
            reply(StatusCode::OK, "text/plain", "ready\n")
        }
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        "/metrics" => match &state.metrics {
            Some(h) => {
                h.run_upkeep();
                reply(StatusCode::OK, "text/plain; version=0.0.4", h.render())
            }
            None => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "no metrics recorder installed\n",
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the meta endpoints on `listener` until `stop` resolves.
pub async fn serve(listener: TcpListener, state: MetaState, stop: impl Future<Output = ()>) {
    let mut conns = JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else {
                    // Out of file descriptors and the like: pause rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let state = state.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let resp = answer(&state, &req);
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await {
                        debug!(error = %e, "meta connection error");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = &mut stop => break,
        }
    }
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
