//! The HTTP front (10264): every request names its node and port (Host header, absolute-form
//! target, or CONNECT), so the front serves as an HTTP proxy too (curl `-x`, Prometheus
//! `proxy_url`, kubectl `proxy-url`). Requests on one keep-alive connection may name different
//! nodes; each goes to its own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span};
use tunnel_core::sniff::SniffError;
use tunnel_core::sniff::http::{RequestForm, RequestTarget, request_target};
use tunnel_core::{NodeRef, TunnelStream};

use super::{Admission, DELIVERY_TIMEOUT, Front, FrontCount, Fronts};

type Body = BoxBody<Bytes, hyper::Error>;

/// Time a client has to send a request head on an idle keep-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The upstream connection of the last request, reused while requests name the same node and
/// port (hyper serves one request at a time per HTTP/1 connection).
struct Upstream {
    key: (NodeRef, u16),
    sender: client::SendRequest<Incoming>,
    _guard: FrontCount,
}

/// What the requests of one client connection share.
struct ClientConn {
    fronts: Arc<Fronts>,
    upstream: Mutex<Option<Upstream>>,
    admission: Admission,
}

pub(crate) async fn handle(
    fronts: Arc<Fronts>,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) {
    let span = info_span!("http_front", peer.addr = %peer);
    let mut cut = admission.cut.clone();
    async move {
        // The tunnels and upgrades its requests start go to the front's own tasks: this
        // handler ends with its HTTP connection, and its memory with it.
        tokio::select! {
            r = serve_requests(fronts, tcp, admission) => if let Err(e) = r {
                debug!(error = %e, "HTTP front connection ended with an error");
            },
            // The drain is over.
            () = crate::stopped(&mut cut) => {}
        }
    }
    .instrument(span)
    .await;
}

/// Serves requests until the client connection ends.
async fn serve_requests(
    fronts: Arc<Fronts>,
    tcp: TcpStream,
    admission: Admission,
) -> hyper::Result<()> {
    let mut stop = admission.stop.clone();
    let shared = Arc::new(ClientConn {
        fronts,
        upstream: Mutex::new(None),
        admission,
    });
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, hyper::Error>(route(&shared, req).await) }
    });
    let conn = server::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        () = crate::stopped(&mut stop) => {}
    }
    // Draining: finish the request in flight, then close the keep-alive connection (and the
    // upstream stream it caches).
    conn.as_mut().graceful_shutdown();
    conn.await
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut body = msg.into();
    body.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn bad_request(front: Front, why: &str) -> Response<Body> {
    metrics::counter!("edge_tunnel_server_streams_total", "front" => front.as_str(), "result" => "bad_request")
        .increment(1);
    text(StatusCode::BAD_REQUEST, format!("edge-tunnel: {why}"))
}

/// Sends a request where its target names, as a tunnel (CONNECT) or over an upstream HTTP
/// connection.
async fn route(conn: &ClientConn, mut req: Request<Incoming>) -> Response<Body> {
    let front = if req.method() == Method::CONNECT {
        Front::Connect
    } else {
        Front::Http
    };
    let (target, host) = match addressee(&conn.fronts, &req) {
        Ok(t) => t,
        Err(e) => return bad_request(front, &e.to_string()),
    };
    let key = (target.node, target.port);
    if target.form == RequestForm::Connect {
        return open_tunnel(conn, front, &key, req).await;
    }
    if let Err(e) = to_origin_form(&mut req, target.form, host.is_some()) {
        return bad_request(front, &e.to_string());
    }
    let up = match checkout(conn, front, &key).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    exchange(conn, up, req).await
}

/// Why a request names no target we can serve (a 400).
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error("several Host headers")]
    SeveralHosts,
    #[error("Host header is not text")]
    HostNotText,
    #[error(transparent)]
    Target(#[from] SniffError),
    #[error("request target")]
    Path,
}

/// Where a request goes, and its Host header.
fn addressee(
    fronts: &Fronts,
    req: &Request<Incoming>,
) -> Result<(RequestTarget, Option<String>), BadRequest> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(BadRequest::SeveralHosts),
        (Some(h), None) => Some(h.to_str().map_err(|_| BadRequest::HostNotText)?.to_owned()),
        (None, _) => None,
    };
    let uri = req.uri().to_string();
    let target = request_target(
        req.method().as_str(),
        &uri,
        host.as_deref(),
        fronts.config.kubelet_read_only_port,
    )?;
    Ok((target, host))
}

/// Answers CONNECT once the stream is open; the bytes after the answer are the tunnel's.
async fn open_tunnel(
    conn: &ClientConn,
    front: Front,
    key: &(NodeRef, u16),
    mut req: Request<Incoming>,
) -> Response<Body> {
    let (mut stream, guard) = match conn.fronts.open(front, &key.0, key.1).await {
        Ok(s) => s,
        Err(e) => return open_failure(&e),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let held = (guard, conn.admission.permit.clone());
    let fronts = conn.fronts.clone();
    conn.admission
        .spawner
        .spawn(async move {
            let _held = held;
            match on_upgrade.await {
                Ok(upgraded) => {
                    fronts
                        .proxy(&mut TokioIo::new(upgraded), &mut stream, &[])
                        .await;
                }
                Err(e) => {
                    debug!(error = %e, "CONNECT upgrade failed");
                    stream.abort();
                }
            }
        })
        .await;
    Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
}

/// Rewrites an absolute-form request to origin-form, so that Host names the node for the
/// kubelet as it did for us, and drops what was meant for the proxy.
fn to_origin_form(
    req: &mut Request<Incoming>,
    form: RequestForm,
    has_host: bool,
) -> Result<(), BadRequest> {
    if form == RequestForm::Absolute {
        let authority = req.uri().authority().map(|a| a.as_str().to_owned());
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        match path.parse() {
            Ok(p) => *req.uri_mut() = p,
            Err(_) => return Err(BadRequest::Path),
        }
        if !has_host && let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            req.headers_mut().insert(header::HOST, a);
        }
    }
    req.headers_mut().remove("proxy-connection");
    req.headers_mut().remove(header::PROXY_AUTHORIZATION);
    Ok(())
}

/// The cached upstream connection when the request goes where the last one went and the
/// connection still takes requests, else a new one.
async fn checkout(
    conn: &ClientConn,
    front: Front,
    key: &(NodeRef, u16),
) -> Result<Upstream, Response<Body>> {
    let reusable = {
        let mut slot = conn.upstream.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(u) if u.key == *key && !u.sender.is_closed() => Some(u),
            _ => None,
        }
    };
    let mut up = match reusable {
        Some(u) => u,
        None => connect(conn, front, key).await?,
    };
    if up.sender.ready().await.is_err() {
        up = connect(conn, front, key).await?;
    }
    Ok(up)
}

/// Sends the request upstream. An upgraded exchange (exec, attach, port-forward) takes the
/// upstream connection over; any other leaves it cached for the next request.
async fn exchange(
    conn: &ClientConn,
    mut up: Upstream,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut resp = match up.sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            debug!(error = %e, "upstream request failed");
            return text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "edge-tunnel: node {}: upstream connection failed: {e}",
                    up.key.0
                ),
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let held = (up._guard, conn.admission.permit.clone());
        drop(up.sender);
        let fronts = conn.fronts.clone();
        conn.admission
            .spawner
            .spawn(async move {
                let _held = held;
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client_io, upstream_io)) => splice(&fronts, client_io, upstream_io).await,
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            })
            .await;
    } else {
        *conn.upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(up);
    }
    resp.map(BodyExt::boxed)
}

/// Copies between the two sides of an upgraded exchange, both now speaking its protocol.
async fn splice(fronts: &Fronts, client_io: Upgraded, upstream_io: Upgraded) {
    let mut client_io = TokioIo::new(client_io);
    let mut upstream_io = TokioIo::new(upstream_io);
    let result = tunnel_core::copy::copy_bidirectional(
        &mut client_io,
        &mut upstream_io,
        &fronts.config.copy,
    )
    .await;
    // Back to the tunnel stream under hyper's upgrade: wait for delivery after a clean end,
    // reset it after a failure.
    let stream = upstream_io
        .into_inner()
        .downcast::<TokioIo<TunnelStream>>()
        .ok()
        .map(|parts| parts.io.into_inner());
    match (result, stream) {
        (Ok(_), Some(stream)) => {
            stream.delivered(DELIVERY_TIMEOUT).await;
        }
        (Err(e), stream) => {
            debug!(error = %e, "upgraded connection ended with an error");
            if let Some(mut stream) = stream {
                stream.abort();
            }
        }
        (Ok(_), None) => {}
    }
}

async fn connect(
    conn: &ClientConn,
    front: Front,
    key: &(NodeRef, u16),
) -> Result<Upstream, Response<Body>> {
    let (stream, guard) = conn
        .fronts
        .open(front, &key.0, key.1)
        .await
        .map_err(|e| open_failure(&e))?;
    let (sender, driver) = client::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            text(
                StatusCode::BAD_GATEWAY,
                format!("edge-tunnel: node {}: {e}", key.0),
            )
        })?;
    // The driver ends with the stream, when the sender is dropped, or at an upgrade.
    conn.admission
        .spawner
        .spawn(async move {
            if let Err(e) = driver.with_upgrades().await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        })
        .await;
    Ok(Upstream {
        key: key.clone(),
        sender,
        _guard: guard,
    })
}

fn open_failure(e: &super::OpenFailure) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    debug!(error = %e, status = status.as_u16(), "open failed");
    text(status, format!("edge-tunnel: {e}"))
}
