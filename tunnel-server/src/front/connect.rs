//! The egress front: HTTP CONNECT and nothing else, over a Unix socket (`--connect-uds`) or
//! mutual-TLS TCP (`--connect-port`), as kube-apiserver speaks it to the proxy named in its
//! `EgressSelectorConfiguration` (`proxyProtocol: HTTPConnect`, `cluster` egress). It sends
//! `CONNECT <node IP or name>:<port>` and, after our `200`, the kubelet's own TLS flows
//! through. Routing and refusals are those of the other fronts: the node by name or by an IP
//! of its agent's certificate, the port only if the configuration serves it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info_span};
use tunnel_core::sniff::SniffError;
use tunnel_core::sniff::http::{MAX_HEAD, RequestForm, parse_request_head};

use super::{Admission, Front, Fronts, Refused};

/// Serves one client of the Unix socket.
pub(crate) async fn handle_unix(
    fronts: Arc<Fronts>,
    unix: tokio::net::UnixStream,
    _peer: &'static str,
    admission: Admission,
) {
    let span = info_span!(
        "egress_front",
        peer.addr = "unix",
        node = tracing::field::Empty
    );
    serve(fronts, unix, admission).instrument(span).await;
}

/// Serves one client of the mutual-TLS port: the handshake (the client's certificate must
/// chain to `--connect-client-ca-file`), then as on the Unix socket.
pub(crate) async fn handle_tls(
    fronts: Arc<Fronts>,
    tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
    acceptor: TlsAcceptor,
) {
    let span = info_span!("egress_front", peer.addr = %peer, node = tracing::field::Empty);
    async move {
        let handshake = tokio::time::timeout(fronts.config.sniff_timeout, acceptor.accept(tcp));
        match handshake.await {
            Ok(Ok(tls)) => serve(fronts, tls, admission).await,
            Ok(Err(e)) => refuse(&fronts, "tls_failed", &e),
            Err(_) => refuse(
                &fronts,
                "tls_failed",
                &"no TLS handshake within the sniff timeout",
            ),
        }
    }
    .instrument(span)
    .await;
}

fn refuse(fronts: &Fronts, result: &'static str, why: &dyn std::fmt::Display) {
    metrics::counter!("edge_tunnel_server_streams_total", "front" => Front::Egress.as_str(), "result" => result)
        .increment(1);
    Refused {
        front: Front::Egress,
        node: None,
        port: None,
        result,
        status: None,
    }
    .log(&fronts.refusals, why);
}

/// Why a head gets no tunnel, with the status that says so.
#[derive(Debug, thiserror::Error)]
enum BadHead {
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("no request head within the sniff timeout")]
    Timeout,
    #[error("the egress front speaks CONNECT only: send CONNECT NODE:PORT")]
    NotConnect,
    #[error("cannot tell the node from the request ({0}): send CONNECT NODE:PORT")]
    Target(SniffError),
}

impl BadHead {
    fn status(&self) -> (u16, &'static str) {
        match self {
            Self::TooLarge => (431, "Request Header Fields Too Large"),
            Self::Timeout => (408, "Request Timeout"),
            Self::NotConnect => (405, "Method Not Allowed"),
            Self::Target(_) => (400, "Bad Request"),
        }
    }
}

async fn serve<IO>(fronts: Arc<Fronts>, mut io: IO, admission: Admission)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut buf = BytesMut::with_capacity(1024);
    let read = tokio::time::timeout(fronts.config.sniff_timeout, read_head(&mut io, &mut buf));
    let head = match read.await.unwrap_or(Err(BadHead::Timeout)) {
        Ok(Some(head)) => head,
        // Gone before its head: nothing to answer.
        Ok(None) => return,
        Err(bad) => {
            let (status, reason) = bad.status();
            refuse_with(&fronts, &mut io, status, reason, &bad).await;
            return;
        }
    };
    let (node, port) = (head.target.node, head.target.port);
    tracing::Span::current().record("node", tracing::field::display(&node));
    let (mut stream, _guard) = match fronts.open(Front::Egress, &node, port).await {
        Ok(s) => s,
        Err(e) => {
            Refused {
                front: Front::Egress,
                node: Some(&node),
                port: Some(port),
                result: e.result(),
                status: Some(e.status()),
            }
            .log(&fronts.refusals, &e);
            let status =
                http::StatusCode::from_u16(e.status()).unwrap_or(http::StatusCode::BAD_GATEWAY);
            let body = format!("edge-tunnel: {e}: {}", e.hint());
            answer(
                &mut io,
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                &body,
            )
            .await;
            return;
        }
    };
    if io
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        stream.abort();
        return;
    }
    let mut cut = admission.cut.clone();
    let prefix = buf.split_off(head.head_len);
    tokio::select! {
        whole = fronts.proxy(&mut io, &mut stream, &prefix) => if !whole {
            debug!("egress tunnel cut");
        },
        // The drain is over.
        () = crate::stopped(&mut cut) => stream.abort(),
    }
}

/// Reads until the request head is complete. `None`: the client left first.
async fn read_head<IO>(
    io: &mut IO,
    buf: &mut BytesMut,
) -> Result<Option<tunnel_core::sniff::http::RequestHead>, BadHead>
where
    IO: AsyncRead + Unpin,
{
    loop {
        match parse_request_head(buf, 0) {
            Ok(head) if head.target.form == RequestForm::Connect => return Ok(Some(head)),
            Ok(_) => return Err(BadHead::NotConnect),
            Err(SniffError::TooLarge { .. }) => return Err(BadHead::TooLarge),
            Err(e) if e.is_incomplete() => {}
            Err(e) => return Err(BadHead::Target(e)),
        }
        let mut chunk = [0u8; 2048];
        let room = (MAX_HEAD + 1).saturating_sub(buf.len()).min(chunk.len());
        match io.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn refuse_with<IO>(fronts: &Fronts, io: &mut IO, status: u16, reason: &str, why: &BadHead)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    metrics::counter!("edge_tunnel_server_streams_total", "front" => Front::Egress.as_str(), "result" => "bad_request")
        .increment(1);
    Refused {
        front: Front::Egress,
        node: None,
        port: None,
        result: "bad_request",
        status: Some(status),
    }
    .log(&fronts.refusals, why);
    answer(io, status, reason, &format!("edge-tunnel: {why}")).await;
}

/// Writes a one-line error answer, ends our side, and lingers for the client's close.
async fn answer<IO>(io: &mut IO, status: u16, reason: &str, body: &str)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let allow = if status == 405 {
        "Allow: CONNECT\r\n"
    } else {
        ""
    };
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\n{allow}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    if io.write_all(msg.as_bytes()).await.is_ok() && io.shutdown().await.is_ok() {
        super::linger(io).await;
    }
}
