//! A fake kubelet: HTTPS that requires a client certificate and records who presented it, and a
//! plain-HTTP read-only listener. It answers the kubelet API calls the tunnel must carry:
//! followed container logs (chunked, line by line as they are written), exec/attach upgrades
//! over WebSocket (`v5.channel.k8s.io`, GET) and SPDY/3.1 (POST) that echo bytes until the
//! client half-closes, `/metrics`, `/pods`, `/healthz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

type Body = BoxBody<Bytes, Infallible>;

/// A followed log: send lines to the client through `lines`.
#[derive(Debug)]
pub struct LogFeed {
    /// The request path (`/containerLogs/NS/POD/CONTAINER`).
    pub path: String,
    /// Each message is written to the response as one chunk.
    pub lines: mpsc::Sender<Bytes>,
}

struct State {
    node: String,
    subjects: Mutex<Vec<String>>,
    feeds: mpsc::Sender<LogFeed>,
}

/// A running fake kubelet; its listeners stop when it is dropped.
pub struct FakeKubelet {
    /// The HTTPS listener (as kubelet 10250).
    pub https_addr: SocketAddr,
    /// The plain-HTTP listener (as kubelet 10255).
    pub http_addr: SocketAddr,
    state: Arc<State>,
    feeds: tokio::sync::Mutex<mpsc::Receiver<LogFeed>>,
    _tasks: JoinSet<()>,
}

impl std::fmt::Debug for FakeKubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubelet")
            .field("node", &self.state.node)
            .field("https_addr", &self.https_addr)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

impl FakeKubelet {
    /// Starts both listeners on 127.0.0.1 with ports from the kernel. `node` is reported by
    /// `/pods` so tests can tell kubelets apart.
    pub async fn start(node: &str, tls: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        Self::start_on(
            node,
            tls,
            "127.0.0.1:0".parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .await
    }

    /// Starts the listeners on the given addresses.
    pub async fn start_on(
        node: &str,
        tls: Arc<rustls::ServerConfig>,
        https: SocketAddr,
        http: SocketAddr,
    ) -> std::io::Result<Self> {
        let (feeds_tx, feeds) = mpsc::channel(64);
        let state = Arc::new(State {
            node: node.to_owned(),
            subjects: Mutex::new(Vec::new()),
            feeds: feeds_tx,
        });
        let https = TcpListener::bind(https).await?;
        let http = TcpListener::bind(http).await?;
        let (https_addr, http_addr) = (https.local_addr()?, http.local_addr()?);
        let mut tasks = JoinSet::new();
        let acceptor = TlsAcceptor::from(tls);
        let s = state.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = https.accept().await {
                let acceptor = acceptor.clone();
                let s = s.clone();
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let subject = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| tunnel_core::AgentIdentity::from_certificate(c).ok())
                        .map(|id| id.node_name);
                    if let Some(subject) = subject {
                        s.subjects.lock().expect("lock").push(subject);
                    }
                    serve(s, tls).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        let s = state.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = http.accept().await {
                conns.spawn(serve(s.clone(), tcp));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            https_addr,
            http_addr,
            state,
            feeds: tokio::sync::Mutex::new(feeds),
            _tasks: tasks,
        })
    }

    /// Subjects (node-name form) of the client certificates seen on HTTPS, in order.
    pub fn client_subjects(&self) -> Vec<String> {
        self.state.subjects.lock().expect("lock").clone()
    }

    /// The next followed log request.
    pub async fn next_log_feed(&self) -> Option<LogFeed> {
        self.feeds.lock().await.recv().await
    }
}

async fn serve<IO>(state: Arc<State>, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(answer(&state, req).await) }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Prometheus text as a kubelet exposes it.
pub fn metrics_text(node: &str) -> String {
    let mut s = String::from(
        "# HELP kubelet_running_pods Number of pods running.\n# TYPE kubelet_running_pods gauge\n",
    );
    s.push_str(&format!("kubelet_running_pods{{node=\"{node}\"}} 12\n"));
    s.push_str("# TYPE kubelet_http_requests_total counter\n");
    for path in ["pods", "metrics", "containerLogs", "exec"] {
        s.push_str(&format!(
            "kubelet_http_requests_total{{long_running=\"false\",method=\"GET\",path=\"{path}\",server_type=\"readwrite\"}} 42\n"
        ));
    }
    s
}

async fn answer(state: &State, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    match (req.method().clone(), path.as_str()) {
        (_, p)
            if p.starts_with("/exec/")
                || p.starts_with("/attach/")
                || p.starts_with("/portForward/") =>
        {
            match (req.method().clone(), upgrade.as_deref()) {
                (Method::GET, Some("websocket")) => {
                    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                        return full(
                            StatusCode::BAD_REQUEST,
                            "text/plain",
                            "missing Sec-WebSocket-Key\n",
                        );
                    };
                    let protocol = req
                        .headers()
                        .get("sec-websocket-protocol")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| {
                            v.split(',')
                                .map(str::trim)
                                .find(|p| p.starts_with('v') && p.contains("channel.k8s.io"))
                        })
                        .map(str::to_owned);
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(echo(on_upgrade));
                    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    let h = resp.headers_mut();
                    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                    if let Ok(v) = HeaderValue::from_str(&websocket_accept(key.as_bytes())) {
                        h.insert("sec-websocket-accept", v);
                    }
                    if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
                        h.insert("sec-websocket-protocol", p);
                    }
                    resp
                }
                (Method::POST, Some(u)) if u.starts_with("spdy/3.1") => {
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(echo(on_upgrade));
                    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    let h = resp.headers_mut();
                    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
                    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                    h.insert(
                        "x-stream-protocol-version",
                        HeaderValue::from_static("v4.channel.k8s.io"),
                    );
                    resp
                }
                _ => full(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "exec needs an upgrade (websocket GET or SPDY/3.1 POST)\n",
                ),
            }
        }
        (Method::GET, p) if p.starts_with("/containerLogs/") => {
            if query.split('&').any(|kv| kv == "follow=true") {
                let (lines, rx) = mpsc::channel::<Bytes>(16);
                if state
                    .feeds
                    .try_send(LogFeed {
                        path: p.to_owned(),
                        lines,
                    })
                    .is_err()
                {
                    return full(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "no log writer\n",
                    );
                }
                let mut resp = Response::new(BodyExt::boxed(LogBody(rx)));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                resp
            } else {
                full(
                    StatusCode::OK,
                    "text/plain",
                    format!("log of {p} on {}\n", state.node),
                )
            }
        }
        (Method::GET, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics_text(&state.node),
        ),
        (Method::GET, "/healthz") => full(StatusCode::OK, "text/plain", "ok"),
        (Method::GET, "/pods") => full(
            StatusCode::OK,
            "application/json",
            format!(
                "{{\"kind\":\"PodList\",\"apiVersion\":\"v1\",\"metadata\":{{}},\"items\":[],\"node\":\"{}\"}}\n",
                state.node
            ),
        ),
        (Method::POST, "/echo") => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            full(StatusCode::OK, "application/octet-stream", body)
        }
        _ => full(StatusCode::NOT_FOUND, "text/plain", "404 page not found\n"),
    }
}

/// The body of a followed log: each line sent to the feed is one chunk, sent as it is written.
struct LogBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for LogBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Sec-WebSocket-Accept for a key (RFC 6455 §4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// Echoes an upgraded connection until the client half-closes, then closes.
async fn echo(on_upgrade: hyper::upgrade::OnUpgrade) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let io = TokioIo::new(upgraded);
    let (mut r, mut w) = tokio::io::split(io);
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
    }
}
