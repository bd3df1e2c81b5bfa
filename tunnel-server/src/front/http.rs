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
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span};
use tunnel_core::NodeRef;
use tunnel_core::sniff::http::{RequestForm, request_target};

use super::{Admission, DELIVERY_TIMEOUT, Front, Fronts, StreamGuard};

type Body = BoxBody<Bytes, hyper::Error>;

/// Time a client has to send a request head on an idle keep-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The upstream connection of the last request, reused while requests name the same node and
/// port (hyper serves one request at a time per HTTP/1 connection).
struct Upstream {
    key: (NodeRef, u16),
    sender: client::SendRequest<Incoming>,
    _guard: StreamGuard,
}

pub(crate) async fn handle(
    fronts: Arc<Fronts>,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) {
    let upstream: Arc<Mutex<Option<Upstream>>> = Arc::new(Mutex::new(None));
    let mut stop = admission.stop.clone();
    let service = service_fn(move |req| {
        let fronts = fronts.clone();
        let upstream = upstream.clone();
        let admission = admission.clone();
        async move { Ok::<_, hyper::Error>(route(fronts, upstream, admission, req).await) }
    });
    let conn = server::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let span = info_span!("http_front", peer.addr = %peer);
    let result = async {
        tokio::select! {
            r = conn.as_mut() => r,
            () = crate::stopped(&mut stop) => {
                // Draining: finish the request in flight, then close the keep-alive
                // connection (and the upstream stream it caches).
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        }
    }
    .instrument(span)
    .await;
    if let Err(e) = result {
        debug!(peer.addr = %peer, error = %e, "HTTP front connection ended with an error");
    }
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

async fn route(
    fronts: Arc<Fronts>,
    upstream: Arc<Mutex<Option<Upstream>>>,
    admission: Admission,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let front = if req.method() == Method::CONNECT {
        Front::Connect
    } else {
        Front::Http
    };
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return bad_request(front, "several Host headers"),
        (Some(h), None) => match h.to_str() {
            Ok(h) => Some(h.to_owned()),
            Err(_) => return bad_request(front, "Host header is not text"),
        },
        (None, _) => None,
    };
    let uri = req.uri().to_string();
    let target = match request_target(
        req.method().as_str(),
        &uri,
        host.as_deref(),
        fronts.config.kubelet_read_only_port,
    ) {
        Ok(t) => t,
        Err(e) => return bad_request(front, &e.to_string()),
    };
    let key = (target.node.clone(), target.port);

    if target.form == RequestForm::Connect {
        let (mut stream, guard) = match fronts.dial(front, &key.0, key.1).await {
            Ok(s) => s,
            Err(e) => return dial_error(&e),
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let permit = admission.permit.clone();
        tokio::spawn(
            async move {
                let _held = (guard, permit);
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
            }
            .in_current_span(),
        );
        return Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
    }

    // Forward in origin-form; Host names the node for the kubelet as it did for us.
    if target.form == RequestForm::Absolute {
        let authority = req.uri().authority().map(|a| a.as_str().to_owned());
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        match path.parse() {
            Ok(p) => *req.uri_mut() = p,
            Err(_) => return bad_request(front, "request target"),
        }
        if host.is_none()
            && let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok())
        {
            req.headers_mut().insert(header::HOST, a);
        }
    }
    req.headers_mut().remove("proxy-connection");
    req.headers_mut().remove(header::PROXY_AUTHORIZATION);

    let reusable = {
        let mut slot = upstream.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(u) if u.key == key && !u.sender.is_closed() => Some(u),
            _ => None,
        }
    };
    let mut up = match reusable {
        Some(u) => u,
        None => match connect(&fronts, front, &key).await {
            Ok(u) => u,
            Err(resp) => return resp,
        },
    };
    if up.sender.ready().await.is_err() {
        up = match connect(&fronts, front, &key).await {
            Ok(u) => u,
            Err(resp) => return resp,
        };
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut resp = match up.sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            debug!(error = %e, "upstream request failed");
            return text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "edge-tunnel: node {}: upstream connection failed: {e}",
                    key.0
                ),
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // exec/attach/port-forward: from here on both sides speak the upgraded protocol.
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let guard = up._guard;
        drop(up.sender);
        let permit = admission.permit.clone();
        tokio::spawn(
            async move {
                let _held = (guard, permit);
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client_io, upstream_io)) => {
                        let mut client_io = TokioIo::new(client_io);
                        let mut upstream_io = TokioIo::new(upstream_io);
                        let result = tunnel_core::copy::copy_bidirectional(
                            &mut client_io,
                            &mut upstream_io,
                            &fronts.config.copy,
                        )
                        .await;
                        // Back to the tunnel stream under hyper's upgrade: wait for delivery
                        // after a clean end, reset it after a failure.
                        let stream = upstream_io
                            .into_inner()
                            .downcast::<TokioIo<tunnel_core::TunnelStream>>()
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
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            }
            .in_current_span(),
        );
    } else {
        *upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(up);
    }
    resp.map(BodyExt::boxed)
}

async fn connect(
    fronts: &Arc<Fronts>,
    front: Front,
    key: &(NodeRef, u16),
) -> Result<Upstream, Response<Body>> {
    let (stream, guard) = fronts
        .dial(front, &key.0, key.1)
        .await
        .map_err(|e| dial_error(&e))?;
    let (sender, conn) = client::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            text(
                StatusCode::BAD_GATEWAY,
                format!("edge-tunnel: node {}: {e}", key.0),
            )
        })?;
    // The connection task ends with the stream or when the sender is dropped.
    tokio::spawn(
        async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        }
        .in_current_span(),
    );
    Ok(Upstream {
        key: key.clone(),
        sender,
        _guard: guard,
    })
}

fn dial_error(e: &super::DialError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    debug!(error = %e, status = status.as_u16(), "dial failed");
    text(status, format!("edge-tunnel: {e}"))
}
