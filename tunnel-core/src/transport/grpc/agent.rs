//! The agent side: connecting and registering, and answering stream requests with `Stream`
//! calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, PollSender};
use tonic::Request;

use super::service::tunnel_client::TunnelClient;
use super::stream::{Abort, AgentCalls, GrpcStream, Outbound, RequestChunks, RequestTicket};
use super::{
    ALPN_H2, CHUNKS_IN_FLIGHT, GrpcControl, MAX_OUTSTANDING_REQUESTS, Out, Requests, STREAM_ID_KEY,
    status_reason,
};
use crate::error::{CloseCause, CloseReason, Initiator, SessionError};
use crate::proto::{self, DecodeError, OpenRequest};
use crate::transport::link::{self, Acceptor, BoxFuture, Incoming, RequestRead, Requested};
use crate::transport::session::AgentParts;
use crate::transport::stream::StreamIo;
use crate::transport::{AgentSession, Server, SessionConfig, TransportKind};

/// The agent's side of the gRPC transport.
#[derive(Debug, Clone)]
pub(crate) struct GrpcConnector {
    tls: Arc<rustls::ClientConfig>,
    config: Arc<SessionConfig>,
}

/// Why the TCP/TLS connection to the server failed, as a typed reason.
fn connect_reason(e: tonic::transport::Error) -> CloseReason {
    let tls = crate::error::tls_error_in(&e);
    let reason = match tls.map(crate::error::tls_refusal) {
        Some(Some(Initiator::Remote)) => CloseReason::remote(CloseCause::Refused),
        Some(Some(Initiator::Local)) => CloseReason::local(CloseCause::Refused),
        Some(None) => CloseReason::local(CloseCause::Protocol),
        None => CloseReason::local(CloseCause::Transport),
    };
    reason.with_source(e)
}

impl GrpcConnector {
    /// A connector presenting the client certificate in `tls`.
    pub(crate) fn new(mut tls: rustls::ClientConfig, config: SessionConfig) -> Self {
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        Self {
            tls: Arc::new(tls),
            config: Arc::new(config),
        }
    }

    /// An HTTP/2 channel to `server` over TLS/TCP.
    async fn channel(&self, server: Server<'_>) -> Result<tonic::transport::Channel, SessionError> {
        let addr = server.addr;
        let config = &self.config;
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(std::io::Error::other)?
            .initial_stream_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window)
            .max_frame_size(super::GRPC_MAX_FRAME)
            .http2_keep_alive_interval(config.keep_alive)
            .keep_alive_timeout(config.idle_timeout)
            .keep_alive_while_idle(true)
            .connect_timeout(config.handshake_timeout);
        let name = rustls_pki_types::ServerName::try_from(server.name.to_owned())
            .map_err(std::io::Error::other)?;
        let tls = self.tls.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (tls, name) = (tls.clone(), name.clone());
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let mut io = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                confirm(&mut io).await?;
                io.get_mut().1.set_buffer_limit(Some(super::TLS_SEND_LIMIT));
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        });
        tokio::time::timeout(
            config.handshake_timeout,
            endpoint.connect_with_connector(connector),
        )
        .await
        .map_err(|_| CloseReason::local(CloseCause::HandshakeTimeout))?
        .map_err(|e| SessionError::Closed(connect_reason(e)))
    }

    /// Connects to `server` over TLS/TCP and registers with `register`'s claims.
    pub(crate) async fn connect(
        &self,
        server: Server<'_>,
        register: proto::Register,
    ) -> Result<AgentSession, SessionError> {
        let config = self.config.clone();
        let mut client = TunnelClient::new(self.channel(server).await?);
        // The registration must be queued before the call starts: tonic sends the request
        // stream's first message with the call's headers.
        let (out_tx, out_rx) = mpsc::channel(16);
        let mut control =
            crate::control::Control::agent(link::now(), config.control.clone(), register);
        while let Some(msg) = control.poll_transmit() {
            out_tx
                .try_send(msg)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        }
        let inbound = tokio::time::timeout(
            config.control.register_timeout,
            client.control(ReceiverStream::new(out_rx)),
        )
        .await
        .map_err(|_| CloseReason::local(CloseCause::HandshakeTimeout))?
        .map_err(status_reason)?
        .into_inner();
        let (queue, requests) = mpsc::channel(MAX_OUTSTANDING_REQUESTS);
        let closed = CancellationToken::new();
        let requests_in = Requests {
            queue,
            cancels: Arc::new(Mutex::new(HashMap::new())),
        };
        let send_timeout = config.control.ping_timeout;
        let channel = GrpcControl::new(
            inbound,
            Out::Agent(out_tx),
            send_timeout,
            Some(requests_in),
            &closed,
        );
        let acceptor = GrpcAcceptor {
            calls: AgentCalls { client, closed },
            requests: tokio::sync::Mutex::new(requests),
        };
        let parts = AgentParts::new(server.addr, TransportKind::Grpc, config, acceptor);
        AgentSession::register(channel, control, parts).await
    }
}

/// How long a new connection waits for the server's first records after the handshake.
const CONFIRM_WAIT: Duration = Duration::from_secs(2);

/// Waits (at most [`CONFIRM_WAIT`]) for the server's first records after the TLS handshake.
/// In TLS 1.3 the server checks our certificate only after our side of the handshake is done,
/// and answers with its session tickets, or with an alert. Read here, an alert stays a typed
/// `rustls::Error` for the caller; read later by HTTP/2, it would reach us as text only. The
/// records are processed in place: whatever application data came with them stays buffered in
/// the TLS session for HTTP/2 to read.
async fn confirm(io: &mut tokio_rustls::client::TlsStream<TcpStream>) -> std::io::Result<()> {
    let (tcp, tls) = io.get_mut();
    let first = async {
        loop {
            tcp.readable().await?;
            match tls.read_tls(&mut TryRead(tcp)) {
                // The server hung up: HTTP/2 will say so.
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return tls
                        .process_new_packets()
                        .map(|_| ())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    // A server that sends nothing first (no tickets) costs the wait, not the connection.
    tokio::time::timeout(CONFIRM_WAIT, first)
        .await
        .unwrap_or(Ok(()))
}

/// A tokio socket as the blocking reader rustls reads records from, without blocking.
struct TryRead<'a>(&'a TcpStream);

impl std::io::Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// The agent's way to take the streams the server asks for over the control call.
#[derive(Debug)]
struct GrpcAcceptor {
    calls: AgentCalls,
    requests: tokio::sync::Mutex<mpsc::Receiver<(proto::StreamRequest, RequestTicket)>>,
}

impl Acceptor for GrpcAcceptor {
    fn accept(&self) -> BoxFuture<'_, Result<Box<dyn Incoming>, SessionError>> {
        Box::pin(async move {
            let Some((request, ticket)) = self.requests.lock().await.recv().await else {
                return Err(SessionError::Io(std::io::ErrorKind::NotConnected.into()));
            };
            Ok(Box::new(GrpcIncoming {
                request,
                ticket,
                calls: self.calls.clone(),
            }) as Box<dyn Incoming>)
        })
    }
}

/// A stream request from the server, answered by a `Stream` call.
#[derive(Debug)]
struct GrpcIncoming {
    request: proto::StreamRequest,
    ticket: RequestTicket,
    calls: AgentCalls,
}

impl Incoming for GrpcIncoming {
    fn read_request(self: Box<Self>, _timeout: Duration) -> RequestRead {
        // The target came with the request on the control call: nothing left to read.
        Box::pin(async move {
            let Self {
                request,
                ticket,
                calls,
            } = *self;
            let open = request
                .open
                .ok_or(DecodeError::Invalid("stream request without target"))?;
            let requested = GrpcRequested {
                id: request.stream_id,
                ticket,
                calls,
            };
            Ok((
                OpenRequest::from_proto(open)?,
                Box::new(requested) as Box<dyn Requested>,
            ))
        })
    }
}

#[derive(Debug)]
struct GrpcRequested {
    id: u64,
    ticket: RequestTicket,
    calls: AgentCalls,
}

impl Requested for GrpcRequested {
    fn withdrawn(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(self.ticket.withdrawn())
    }

    fn accept(mut self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn StreamIo>, SessionError>> {
        Box::pin(async move {
            // The server withdrew the request (its client left): answer nothing.
            if self.ticket.is_withdrawn() {
                return Err(SessionError::Withdrawn);
            }
            let reply = proto::StreamOpenReply {
                result: proto::OpenResult::Ok.into(),
                detail: String::new(),
            };
            let stream = answer(&self.calls, self.id, reply).await?;
            Ok(Box::new(stream) as Box<dyn StreamIo>)
        })
    }

    fn refuse(
        self: Box<Self>,
        reply: proto::StreamOpenReply,
    ) -> BoxFuture<'static, Result<(), SessionError>> {
        Box::pin(async move {
            let mut stream = answer(&self.calls, self.id, reply).await?;
            stream.shutdown();
            Ok(())
        })
    }
}

/// Answers a stream request by opening its `Stream` call, the answer in the first chunk.
async fn answer(
    calls: &AgentCalls,
    stream_id: u64,
    reply: proto::StreamOpenReply,
) -> Result<GrpcStream, SessionError> {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tx.try_send(proto::Chunk {
        reply: Some(reply),
        ..proto::Chunk::default()
    })
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
    let abort = Arc::new(Abort::default());
    let mut request = Request::new(RequestChunks::new(rx, abort.clone()));
    let id = tonic::metadata::MetadataValue::from(stream_id);
    request.metadata_mut().insert(STREAM_ID_KEY, id);
    let inbound = calls
        .client
        .clone()
        .stream(request)
        .await
        .map_err(|status| SessionError::Closed(status_reason(status)))?
        .into_inner();
    Ok(GrpcStream::new(
        stream_id,
        inbound,
        Outbound::Request(PollSender::new(tx), abort),
        &calls.closed,
    ))
}
