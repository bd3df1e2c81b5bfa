//! The meta endpoints of a tunnel process: `/healthz` and `/livez` (the process runs),
//! `/readyz` (it serves: listener up or session established, not draining) and `/metrics`
//! (Prometheus text). The embedding program owns the metrics recorder and passes its handle in.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::debug;

/// What the meta endpoints report.
#[derive(Debug, Clone)]
pub struct MetaState {
    /// True while the component serves (listener up / session established, not draining).
    pub ready: Arc<AtomicBool>,
    /// The recorder's handle; `None` answers 404 on `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Read-only JSON pages of the component (the configuration in force, say).
    pub pages: Vec<MetaPage>,
}

/// A read-only JSON page: `GET path` answers what `render` says at that moment.
#[derive(Clone)]
pub struct MetaPage {
    /// The path, e.g. `/config`.
    pub path: &'static str,
    /// Renders the page.
    pub render: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

impl std::fmt::Debug for MetaPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaPage")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
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
        path => match state.pages.iter().find(|p| p.path == path) {
            Some(page) => {
                let mut body = serde_json::to_vec_pretty(&(page.render)()).unwrap_or_default();
                body.push(b'\n');
                reply(StatusCode::OK, "application/json", body)
            }
            None => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        },
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let state = state.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let resp = answer(&state, &req);
                        async move { Ok::<_, Infallible>(resp) }
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

/// A meta server running in its own task. It outlives the drain of the component, so that
/// probes and scrapes still see it; [`stop`](Self::stop) ends it, and dropping the handle
/// aborts it.
#[derive(Debug)]
pub struct MetaServer {
    stop: oneshot::Sender<()>,
    task: JoinSet<()>,
}

impl MetaServer {
    /// Starts serving the meta endpoints on `listener`.
    pub fn spawn(listener: TcpListener, state: MetaState) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let mut task = JoinSet::new();
        task.spawn(serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    /// Stops accepting, ends the open meta connections and waits until the server is gone.
    pub async fn stop(self) {
        let Self { stop, mut task } = self;
        let _ = stop.send(());
        while task.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: meta\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn readyz_follows_the_flag_and_health_is_always_ok() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let server = MetaServer::spawn(
            listener,
            MetaState {
                ready: ready.clone(),
                metrics: None,
                pages: vec![MetaPage {
                    path: "/config",
                    render: Arc::new(|| serde_json::json!({"ports": [9100]})),
                }],
            },
        );
        let page = get(addr, "/config").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("application/json"), "{page}");
        assert!(page.contains("\"ports\": [\n    9100\n  ]"), "{page}");

        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/livez").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        ready.store(true, Ordering::Release);
        let response = get(addr, "/readyz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ready\n"), "{response}");

        server.stop().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn metrics_renders_the_recorder_it_is_given() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("edge_tunnel_test_total").increment(3);
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = MetaServer::spawn(
            listener,
            MetaState {
                ready: Arc::new(AtomicBool::new(true)),
                metrics: Some(handle),
                pages: Vec::new(),
            },
        );
        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("edge_tunnel_test_total 3"), "{response}");
        server.stop().await;
    }
}
