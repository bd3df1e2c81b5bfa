//! The TLS front (10263): the node comes from the ClientHello's SNI; the connection goes to
//! that node's kubelet port. TLS is passed through untouched: the kubelet sees the client's
//! certificate, and the tunnel never holds kubelet credentials nor sees plaintext.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span};
use tunnel_core::route::{NodeRef, parse_host};
use tunnel_core::sniff::{SniffError, sni};

use super::{Admission, Front, Fronts};

pub(crate) async fn handle(
    fronts: Arc<Fronts>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    admission: Admission,
) {
    let span = info_span!("tls_front", peer.addr = %peer, node = tracing::field::Empty);
    async move {
        let mut hello = BytesMut::with_capacity(2048);
        let sniffed =
            tokio::time::timeout(fronts.config.sniff_timeout, read_sni(&mut tcp, &mut hello)).await;
        let node = match sniffed {
            Ok(Ok(node)) => node,
            Ok(Err(e)) => {
                reject(&e.to_string());
                return;
            }
            Err(_) => {
                reject("no ClientHello within the sniff timeout");
                return;
            }
        };
        tracing::Span::current().record("node", tracing::field::display(&node));
        let port = fronts.config.kubelet_port;
        let opened = tokio::select! {
            opened = fronts.open(Front::Tls, &node, port) => opened,
            // Dropping the open withdraws it: the agent stops dialing for a client that left.
            () = super::client_gone(&tcp) => {
                metrics::counter!("edge_tunnel_server_streams_total", "front" => "tls", "result" => "client_gone")
                    .increment(1);
                debug!("client left before the agent answered");
                return;
            }
        };
        let (mut stream, _guard) = match opened {
            Ok(s) => s,
            Err(e) => {
                // No readable error on a passthrough connection: close it, log and count.
                info!(error = %e, "closing TLS connection");
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

fn reject(why: &str) {
    metrics::counter!("edge_tunnel_server_streams_total", "front" => "tls", "result" => "bad_request")
        .increment(1);
    debug!(reason = why, "TLS front rejected a connection");
}

#[derive(Debug, thiserror::Error)]
enum SniError {
    #[error("client hello: {0}")]
    Sniff(#[from] SniffError),
    #[error("client hello without SNI: the TLS front needs the node name")]
    NoSni,
    #[error("SNI is not a node name: {0}")]
    NotANode(String),
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
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
