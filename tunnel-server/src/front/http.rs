//! The HTTP front (10264): every request names its node and port (Host header, absolute-form
//! target, or CONNECT), so the front serves as an HTTP proxy too (curl `-x`, Prometheus
//! `proxy_url`, kubectl `proxy-url`). Requests on one keep-alive connection may name different
//! nodes; each goes to its own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};
use tunnel_core::route::AuthorityError;
use tunnel_core::sniff::SniffError;
use tunnel_core::sniff::http::{RequestForm, RequestTarget, request_target};
use tunnel_core::{NodeRef, TunnelStream};

use super::http_io::{ClientIo, Cut, RequestBody, UpstreamBody, UpstreamIo, stalled};
use super::{Admission, Front, FrontCount, Fronts, Refused};

type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request head read (hyper's read buffer): a longer one gets 431.
pub(crate) const MAX_HEAD: usize = 32 * 1024;

/// The upstream connection of the last request, reused while requests name the same node and
/// port (hyper serves one request at a time per HTTP/1 connection).
struct Upstream {
    key: (NodeRef, u16),
    sender: client::SendRequest<RequestBody>,
    /// Set, the tunnel stream resets when hyper's client lets go of it.
    cut: Cut,
    _guard: FrontCount,
}

/// What the requests of one client connection share.
struct ClientConn {
    fronts: Arc<Fronts>,
    upstream: Mutex<Option<Upstream>>,
    admission: Admission,
    /// Set, the client connection resets when hyper lets go of it.
    cut: Cut,
    /// The node and port an iptables DNAT redirected the connection from.
    redirected: Option<(NodeRef, u16)>,
}

pub(crate) async fn handle(
    fronts: Arc<Fronts>,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) {
    let span = info_span!("http_front", peer.addr = %peer);
    let mut drained = admission.cut.clone();
    async move {
        let cut = Cut::default();
        let redirected = fronts.redirected(&tcp);
        // The tunnels and upgrades its requests start go to the front's own tasks: this
        // handler ends with its HTTP connection, and its memory with it.
        let serve = serve_requests(
            fronts,
            ClientIo::new(tcp, cut.clone()),
            admission,
            redirected,
        );
        let mut serve = std::pin::pin!(serve);
        tokio::select! {
            r = serve.as_mut() => if let Err(e) = r {
                debug!(error = %e, "HTTP front connection ended with an error");
            },
            // The drain is over: what is still in flight is cut (the connection goes with
            // `serve`, after the flag is set).
            () = crate::stopped(&mut drained) => cut.set(),
        }
    }
    .instrument(span)
    .await;
}

/// Serves requests until the client connection ends.
async fn serve_requests(
    fronts: Arc<Fronts>,
    io: ClientIo,
    admission: Admission,
    redirected: Option<(NodeRef, u16)>,
) -> hyper::Result<()> {
    let mut stop = admission.stop.clone();
    let header_timeout = fronts.config.header_timeout;
    let shared = Arc::new(ClientConn {
        fronts,
        upstream: Mutex::new(None),
        admission,
        cut: io.cut().clone(),
        redirected,
    });
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, hyper::Error>(route(&shared, req).await) }
    });
    let conn = server::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service)
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

fn bad_request(conn: &ClientConn, front: Front, why: &BadRequest) -> Response<Body> {
    metrics::counter!("edge_tunnel_server_streams_total", "front" => front.as_str(), "result" => "bad_request")
        .increment(1);
    Refused {
        front,
        node: None,
        port: None,
        result: "bad_request",
        status: Some(400),
    }
    .log(&conn.fronts.refusals, why);
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
    let (mut target, host) = match addressee(&conn.fronts, &req) {
        Ok(t) => t,
        Err(e) => return bad_request(conn, front, &e),
    };
    // A connection that came through an iptables DNAT goes where it was headed, whatever
    // its requests say.
    if let Some((node, port)) = &conn.redirected {
        target.node = node.clone();
        target.port = *port;
    }
    let key = (target.node, target.port);
    if target.form == RequestForm::Connect {
        return open_tunnel(conn, front, &key, req).await;
    }
    if let Err(e) = to_origin_form(&mut req, target.form, host.is_some()) {
        return bad_request(conn, front, &e);
    }
    let up = match checkout(conn, front, &key).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    exchange(conn, up, req).await
}

/// How much of a client's bad value goes back into the answer.
const ECHO_LIMIT: usize = 64;

/// A client's value for an answer: lossy UTF-8, at most [`ECHO_LIMIT`] characters.
fn echo(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .chars()
        .take(ECHO_LIMIT)
        .collect()
}

/// Why a request names no target we can serve (a 400). Each message says what to send instead.
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error("several Host headers: send one, naming the node (Host: NODE[:PORT])")]
    SeveralHosts,
    #[error("Host is not a valid DNS name: {0:?}")]
    HostNotValid(String),
    #[error(
        "cannot tell the node from the request ({0}): name it in the Host header (Host: NODE[:PORT]), in an absolute URL (http://NODE:PORT/path) or as CONNECT NODE:PORT"
    )]
    Target(#[from] SniffError),
    #[error(
        "cannot rewrite the request target {0:?} to a path: send /path, or http://NODE:PORT/path"
    )]
    Path(String),
}

/// Where a request goes, and its Host header.
fn addressee(
    fronts: &Fronts,
    req: &Request<Incoming>,
) -> Result<(RequestTarget, Option<String>), BadRequest> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(BadRequest::SeveralHosts),
        (Some(h), None) => Some(
            h.to_str()
                .map_err(|_| BadRequest::HostNotValid(echo(h.as_bytes())))?
                .to_owned(),
        ),
        (None, _) => None,
    };
    let uri = req.uri().to_string();
    let target = request_target(
        req.method().as_str(),
        &uri,
        host.as_deref(),
        fronts.config.kubelet_read_only_port,
    );
    match (target, &host) {
        // An origin-form request names its node in Host alone: say it is Host that is wrong.
        (Err(SniffError::Authority(AuthorityError::Host(_))), Some(h)) if uri.starts_with('/') => {
            Err(BadRequest::HostNotValid(echo(h.as_bytes())))
        }
        (target, _) => Ok((target?, host)),
    }
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
        Err(e) => return open_failure(conn, front, key, &e),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let held = (guard, conn.admission.permit.clone());
    let fronts = conn.fronts.clone();
    conn.admission
        .spawner
        .spawn(async move {
            let _held = held;
            match on_upgrade.await {
                Ok(upgraded) => relay(&fronts, upgraded, &mut stream, Bytes::new()).await,
                Err(e) => {
                    debug!(error = %e, "CONNECT upgrade failed");
                    stream.abort();
                }
            }
        })
        .await;
    Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
}

/// Copies between an upgraded client connection and a tunnel stream, on the client's own
/// socket taken back from hyper (hyper's buffers and upgrade state go; what it had read past
/// the head goes first to the stream, `to_client` first to the client). The client's
/// connection resets unless the copy ended whole: a cut stream, a failed write, or the drain's
/// end (which drops this future) never reach it as a FIN.
async fn relay(fronts: &Fronts, client: Upgraded, stream: &mut TunnelStream, to_client: Bytes) {
    let Ok(parts) = client.downcast::<TokioIo<ClientIo>>() else {
        // hyper hands back the IO type it serves; nothing else can come here.
        warn!("upgraded connection of an unexpected type; closing it");
        stream.abort();
        return;
    };
    let mut client = parts.io.into_inner();
    // What hyper had read past the head is usually nothing; copied out, so that hyper's read
    // buffers (kilobytes each) are not held for the life of a tunnel that may idle for hours.
    let to_stream = parts.read_buf.to_vec();
    drop(parts.read_buf);
    client.cut().set();
    if !to_client.is_empty() && client.write_all(&to_client).await.is_err() {
        stream.abort();
        return;
    }
    drop(to_client);
    if fronts.proxy(&mut client, stream, &to_stream).await {
        client.cut().clear();
    }
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
            Err(_) => return Err(BadRequest::Path(echo(path.as_bytes()))),
        }
        if !has_host && let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            req.headers_mut().insert(header::HOST, a);
        }
    }
    req.headers_mut().remove("proxy-connection");
    req.headers_mut().remove(header::PROXY_AUTHORIZATION);
    Ok(())
}

/// The cached upstream connection when the request goes where the last one went, the port is
/// still served and the connection still takes requests, else a new one.
async fn checkout(
    conn: &ClientConn,
    front: Front,
    key: &(NodeRef, u16),
) -> Result<Upstream, Response<Body>> {
    // A port the configuration no longer serves is refused for the next request, even on a
    // keep-alive connection whose stream to it is still open (Prometheus keeps one per target).
    let served = conn.fronts.ports.current().serves(key.1);
    let reusable = {
        let mut slot = conn.upstream.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(u) if served && u.key == *key && !u.sender.is_closed() => Some(u),
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
async fn exchange(conn: &ClientConn, mut up: Upstream, req: Request<Incoming>) -> Response<Body> {
    let timeout = conn.fronts.config.request_body_timeout;
    let mut req = req.map(|body| RequestBody::new(body, timeout, up.cut.clone()));
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut resp = match up.sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return upstream_failure(conn, &up.key, &e),
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
    let cut = conn.cut.clone();
    resp.map(|body| UpstreamBody::new(body, cut).boxed())
}

/// The answer to a request whose upstream exchange failed before its response: 408 when the
/// client's body stalled (the stream was reset), else 502.
fn upstream_failure(conn: &ClientConn, key: &(NodeRef, u16), e: &hyper::Error) -> Response<Body> {
    let (status, result, msg) = match stalled(e) {
        Some(t) => (
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "edge-tunnel: the request body stalled (no data for {}s): send it without pauses that long",
                t.as_secs()
            ),
        ),
        None => (
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            format!(
                "edge-tunnel: node {}: the connection to port {} broke before its answer ({e}); retry",
                key.0, key.1
            ),
        ),
    };
    Refused {
        front: Front::Http,
        node: Some(&key.0),
        port: Some(key.1),
        result,
        status: Some(status.as_u16()),
    }
    .log(&conn.fronts.refusals, e);
    let mut resp = text(status, msg);
    if status == StatusCode::REQUEST_TIMEOUT {
        // The rest of the body may still come; it has nowhere to go.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Copies between the two sides of an upgraded exchange, both now speaking its protocol: the
/// client's socket and the tunnel stream, each taken back from hyper.
async fn splice(fronts: &Fronts, client_io: Upgraded, upstream_io: Upgraded) {
    match upstream_io.downcast::<TokioIo<UpstreamIo>>() {
        Ok(parts) => {
            let mut upstream = parts.io.into_inner();
            relay(fronts, client_io, &mut upstream.stream, parts.read_buf).await;
        }
        Err(_) => {
            // hyper hands back the IO type it was given; nothing else can come here.
            warn!("upgraded upstream of an unexpected type; closing the exchange");
        }
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
        .map_err(|e| open_failure(conn, front, key, &e))?;
    let cut = Cut::default();
    let (sender, driver) = client::Builder::new()
        .handshake(TokioIo::new(UpstreamIo::new(stream, cut.clone())))
        .await
        .map_err(|e| upstream_failure(conn, key, &e))?;
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
        cut,
        _guard: guard,
    })
}

fn open_failure(
    conn: &ClientConn,
    front: Front,
    key: &(NodeRef, u16),
    e: &super::OpenFailure,
) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    Refused {
        front,
        node: Some(&key.0),
        port: Some(key.1),
        result: e.result(),
        status: Some(status.as_u16()),
    }
    .log(&conn.fronts.refusals, e);
    text(status, format!("edge-tunnel: {e}: {}", e.hint()))
}
