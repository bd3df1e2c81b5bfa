//! Clients as the apiserver and Prometheus would be: TLS with SNI through the TLS front, plain
//! HTTP/1.1 (with upgrades) through the HTTP front.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A TLS connection to `addr` with SNI `server_name` (the node, as the apiserver dials it).
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(std::io::Error::other)?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// An HTTP/1.1 client connection over `io`; the connection task runs until the peer closes or
/// the sender is dropped.
pub async fn http1<IO>(io: IO) -> hyper::Result<http1::SendRequest<Full<Bytes>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// A raw TCP tunnel to `authority` (`node:port`) through the HTTP front at `proxy`, by
/// `CONNECT`, as kube-apiserver's egress selector and `curl -p` open one.
pub async fn connect_via(proxy: SocketAddr, authority: &str) -> std::io::Result<TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(proxy).await?;
    tcp.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    // Peek, then consume exactly the head: bytes after it belong to the tunnel. Two syscalls
    // in the usual case, where a byte at a time would take dozens.
    let mut head = Vec::new();
    let mut peeked = [0u8; 1024];
    loop {
        let n = tcp.peek(&mut peeked).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // The terminator may straddle what we hold and what we peeked.
        let from = head.len().saturating_sub(3);
        let joined: Vec<u8> = head[from..].iter().chain(&peeked[..n]).copied().collect();
        let take = match joined.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => i + 4 - (head.len() - from),
            None => n,
        };
        let start = head.len();
        head.resize(start + take, 0);
        tcp.read_exact(&mut head[start..]).await?;
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
        if head.len() >= 1024 {
            return Err(std::io::Error::other("CONNECT response head too long"));
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "CONNECT refused: {}",
            String::from_utf8_lossy(&head).trim_end()
        )));
    }
    Ok(tcp)
}

/// A GET with `Host: host`; the status and the whole body.
pub async fn get(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
) -> hyper::Result<(StatusCode, Bytes)> {
    let req = Request::get(path)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .expect("request");
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Kinds of exec upgrade the kubelet speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// `GET` with `Upgrade: websocket`, subprotocol `v5.channel.k8s.io` (kubectl ≥ 1.30).
    WebSocket,
    /// `POST` with `Upgrade: SPDY/3.1` (older kubectl, the apiserver's default before 1.30).
    Spdy,
}

/// Sends an exec upgrade request and returns the upgraded connection after `101`.
pub async fn exec_upgrade(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    host: &str,
    kind: Upgrade,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
    let path = "/exec/default/pod-1/app?command=cat&input=1&output=1";
    let builder = match kind {
        Upgrade::WebSocket => Request::get(path)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header(
                "sec-websocket-protocol",
                "v5.channel.k8s.io, v4.channel.k8s.io",
            ),
        Upgrade::Spdy => Request::post(path)
            .header("upgrade", "SPDY/3.1")
            .header("connection", "Upgrade")
            .header("x-stream-protocol-version", "v4.channel.k8s.io"),
    };
    let req = builder
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let mut resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("expected 101, got {}", resp.status()));
    }
    if kind == Upgrade::WebSocket {
        let accept = resp
            .headers()
            .get("sec-websocket-accept")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if accept != crate::kubelet::websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") {
            return Err(format!("bad Sec-WebSocket-Accept {accept:?}"));
        }
    }
    hyper::upgrade::on(&mut resp)
        .await
        .map(TokioIo::new)
        .map_err(|e| e.to_string())
}

/// `len` bytes of a pattern that shows misplaced or lost bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(u64::from(seed)) as u8 ^ (i >> 13) as u8)
        .collect()
}

/// Writes `data` while reading as many bytes back, then half-closes and expects the peer's end
/// of stream: the reply must arrive whole after our write side is shut.
pub async fn echo_exact<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = tokio::io::split(io);
    let write = async {
        w.write_all(data).await.expect("write");
        w.shutdown().await.expect("half-close");
    };
    let mut got = Vec::with_capacity(data.len());
    let ((), n) = tokio::join!(write, r.read_to_end(&mut got));
    n.expect("read to end");
    assert_eq!(got.len(), data.len(), "echoed length");
    assert!(got == data, "echoed bytes differ");
}

/// One GET for `path` with `Host: host` through the HTTP front at `front`, on a new
/// connection: its status and how long the answer took (30 s at most).
pub async fn timed_get(front: SocketAddr, host: &str, path: &str) -> (u16, std::time::Duration) {
    let started = tokio::time::Instant::now();
    let tcp = TcpStream::connect(front)
        .await
        .expect("connect to the front");
    let mut sender = http1(tcp).await.expect("HTTP/1 handshake");
    let (status, _) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        get(&mut sender, host, path),
    )
    .await
    .expect("an answer, whatever it is")
    .expect("a well-formed answer");
    (status.as_u16(), started.elapsed())
}

/// GETs `path` on `host` through the front, on a new connection each time, until the status
/// is `want`, for at most 10 s (a change applied elsewhere, such as a port policy reaching an
/// agent); returns how long that took. Panics with the last status otherwise.
pub async fn until_status(
    front: SocketAddr,
    host: &str,
    path: &str,
    want: u16,
) -> std::time::Duration {
    let started = tokio::time::Instant::now();
    loop {
        let (status, _) = timed_get(front, host, path).await;
        if status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{host}{path}: still {status}, not {want}, after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
