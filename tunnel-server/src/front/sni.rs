//! The TLS front (10263): the node comes from the ClientHello's SNI; the connection goes to
//! that node's kubelet port. TLS is passed through untouched: the kubelet sees the client's
//! certificate, and the tunnel never holds kubelet credentials nor sees plaintext.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span};
use tunnel_core::route::{NodeRef, parse_host};
use tunnel_core::sniff::{SniffError, sni};

use super::{Admission, Front, Fronts, OpenFailure, Refused};

/// The fatal alerts the front sends before closing a connection it cannot serve (RFC 8446
/// §6.2), so that the client reports why rather than a bare EOF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alert {
    /// A ClientHello we cannot parse (or no TLS at all).
    DecodeError = 50,
    /// A port the configuration does not serve (after a reload removed it, or through a DNAT).
    AccessDenied = 49,
    /// The open failed: the agent refused or could not dial, timed out, or its link went.
    InternalError = 80,
    /// No SNI, an SNI that is not a node name, or a node without an agent here.
    UnrecognizedName = 112,
}

/// Serves one client of a TLS front: the kubelet's (`port` 10250) or an https-proxy port's
/// own listener. A connection that came through an iptables DNAT to a node's IP goes where it
/// was headed: that node and that port; the SNI is not needed.
pub(crate) async fn handle(
    fronts: Arc<Fronts>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
    port: u16,
) {
    let span = info_span!("tls_front", peer.addr = %peer, node = tracing::field::Empty, port);
    async move {
        let mut hello = BytesMut::with_capacity(2048);
        let (node, port) = match fronts.redirected(&tcp) {
            Some(headed) => headed,
            None => match sniff(&fronts, &mut tcp, &mut hello).await {
                Ok(node) => (node, port),
                Err(alert) => {
                    if let Some(alert) = alert {
                        send_alert(tcp, alert).await;
                    }
                    return;
                }
            },
        };
        tracing::Span::current().record("node", tracing::field::display(&node));
        let opened = tokio::select! {
            opened = fronts.open(Front::Tls, &node, port) => opened,
            // Dropping the open withdraws it (and counts the client as gone): the agent stops
            // dialing for a client that left.
            () = super::client_gone(&tcp) => return,
        };
        let (mut stream, _guard) = match opened {
            Ok(s) => s,
            Err(e) => {
                Refused {
                    front: Front::Tls,
                    node: Some(&node),
                    port: Some(port),
                    result: e.result(),
                    status: None,
                }
                .log(&fronts.refusals, &e);
                let alert = match e {
                    OpenFailure::NoAgent(_) => Alert::UnrecognizedName,
                    OpenFailure::NotServed(_) => Alert::AccessDenied,
                    OpenFailure::Open { .. } => Alert::InternalError,
                };
                send_alert(tcp, alert).await;
                return;
            }
        };
        let mut cut = admission.cut.clone();
        let whole = tokio::select! {
            whole = fronts.proxy(&mut tcp, &mut stream, &hello) => whole,
            // The drain is over.
            () = crate::stopped(&mut cut) => {
                stream.abort();
                false
            }
        };
        if !whole {
            // A reset, not a FIN: the client must not take a cut stream for a whole one.
            let _ = tcp.set_zero_linger();
        }
    }
    .instrument(span)
    .await;
}

/// Reads the ClientHello's SNI within the sniff timeout. Failures are logged and counted
/// here; the error is the alert to send (none for a client that left or never spoke TLS).
async fn sniff(
    fronts: &Fronts,
    tcp: &mut TcpStream,
    hello: &mut BytesMut,
) -> Result<NodeRef, Option<Alert>> {
    match tokio::time::timeout(fronts.config.sniff_timeout, read_sni(tcp, hello)).await {
        Ok(Ok(node)) => Ok(node),
        Ok(Err(SniError::Io(e))) => {
            // Gone before its ClientHello (a port probe, a health check): not a refusal.
            count_bad_request();
            debug!(error = %e, "client left before its ClientHello");
            Err(None)
        }
        Ok(Err(e)) => {
            reject(fronts, &e);
            Err(Some(e.alert()))
        }
        Err(_) => {
            // Nothing to answer: the client has not spoken TLS yet.
            reject(fronts, &"no ClientHello within the sniff timeout");
            Err(None)
        }
    }
}

fn count_bad_request() {
    metrics::counter!("edge_tunnel_server_streams_total", "front" => "tls", "result" => "bad_request")
        .increment(1);
}

fn reject(fronts: &Fronts, why: &dyn std::fmt::Display) {
    count_bad_request();
    Refused {
        front: Front::Tls,
        node: None,
        port: None,
        result: "bad_request",
        status: None,
    }
    .log(&fronts.refusals, why);
}

/// Sends `alert` as a plaintext record, as a server does before its ServerHello, then closes
/// gently: our side first, then reading (bounded in time and bytes) until the client closes.
async fn send_alert(mut tcp: TcpStream, alert: Alert) {
    // Content type 21 (alert), legacy version TLS 1.2, length 2, level 2 (fatal).
    let record = [21, 3, 3, 0, 2, 2, alert as u8];
    if tcp.write_all(&record).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    super::linger(&mut tcp).await;
}

#[derive(Debug, thiserror::Error)]
enum SniError {
    #[error("client hello: {0}")]
    Sniff(#[from] SniffError),
    #[error("client hello without SNI: the TLS front needs the node name as the server name")]
    NoSni,
    #[error("SNI is not a node name: {0:?}")]
    NotANode(String),
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
}

impl SniError {
    /// The alert that tells the client why.
    fn alert(&self) -> Alert {
        match self {
            Self::NoSni | Self::NotANode(_) => Alert::UnrecognizedName,
            Self::Sniff(_) | Self::Io(_) => Alert::DecodeError,
        }
    }
}

/// Reads until the ClientHello is complete; the bytes stay in `buf` to be forwarded.
async fn read_sni(tcp: &mut TcpStream, buf: &mut BytesMut) -> Result<NodeRef, SniError> {
    loop {
        match sni::server_name(buf) {
            Ok(Some(name)) => {
                return match parse_host(&name) {
                    Ok(node @ NodeRef::Name(_)) => Ok(node),
                    _ => Err(SniError::NotANode(name.chars().take(64).collect())),
                };
            }
            Ok(None) => return Err(SniError::NoSni),
            Err(e) if e.is_incomplete() => {}
            Err(e) => return Err(e.into()),
        }
        // The sniffer bounds the hello (16 KiB over at most 8 records), so this buffer stays
        // below ~17 KiB plus one read.
        if tcp.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
}
