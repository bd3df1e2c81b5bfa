//! The agent side: connecting and registering, and answering dials with `Stream` calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, PollSender};
use tonic::Request;
use tracing::debug_span;

use super::stream::{AgentCalls, DialTicket, GrpcStream, Outbound};
use super::{
    ALPN_H2, AgentDials, CHUNKS_IN_FLIGHT, ControlIo, MAX_OUTSTANDING_DIALS, Out, STREAM_ID_KEY,
    now, spawn_driver,
};
use crate::control::{Control, ControlError, Event};
use crate::error::SessionError;
use crate::proto::{self, tunnel_client::TunnelClient};
use crate::transport::SessionConfig;

/// The agent's side of the gRPC transport.
#[derive(Debug, Clone)]
pub struct GrpcConnector {
    tls: Arc<rustls::ClientConfig>,
    config: Arc<SessionConfig>,
}

/// A dial the server asked for, and the signal that it was withdrawn.
pub(crate) type DialQueue = tokio::sync::Mutex<mpsc::Receiver<(proto::DialRequest, DialTicket)>>;

impl GrpcConnector {
    /// A connector presenting the client certificate in `tls`.
    pub fn new(mut tls: rustls::ClientConfig, config: SessionConfig) -> Self {
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        Self {
            tls: Arc::new(tls),
            config: Arc::new(config),
        }
    }

    /// Dials `addr` over TLS/TCP, verifying the server as `server_name`, and registers.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        register: proto::Register,
    ) -> Result<crate::transport::AgentSession, SessionError> {
        let config = self.config.clone();
        let io_err =
            |e: &dyn std::fmt::Display| SessionError::Io(std::io::Error::other(e.to_string()));
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| io_err(&e))?
            .initial_stream_window_size(config.stream_window)
            .initial_connection_window_size(config.connection_window)
            .max_frame_size(super::GRPC_MAX_FRAME)
            .http2_keep_alive_interval(config.keep_alive)
            .keep_alive_timeout(config.idle_timeout)
            .keep_alive_while_idle(true)
            .connect_timeout(config.handshake_timeout);
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|e| io_err(&e))?;
        let tls = self.tls.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let (tls, name) = (tls.clone(), name.clone());
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let mut io = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                io.get_mut().1.set_buffer_limit(Some(super::TLS_SEND_LIMIT));
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        });
        let channel = tokio::time::timeout(
            config.handshake_timeout,
            endpoint.connect_with_connector(connector),
        )
        .await
        .map_err(|_| SessionError::Timeout("grpc connect"))?
        .map_err(|e| io_err(&e))?;
        let mut client = TunnelClient::new(channel);
        let (out_tx, out_rx) = mpsc::channel(16);
        let mut control = Control::agent(now(), config.control.clone(), register);
        while let Some(msg) = control.poll_transmit() {
            out_tx.try_send(msg).map_err(|e| io_err(&e))?;
        }
        let inbound = tokio::time::timeout(
            config.control.register_timeout,
            client.control(ReceiverStream::new(out_rx)),
        )
        .await
        .map_err(|_| SessionError::Timeout("control call"))?
        .map_err(|s| io_err(&s.message()))?
        .into_inner();
        let mut io = ControlIo {
            inbound,
            out: Out::Agent(out_tx),
            send_timeout: config.control.ping_timeout,
        };
        let span = debug_span!("session", peer.addr = %addr, transport = "grpc");
        let Event::Registered(registered) = io.until_event(&mut control).await? else {
            return Err(SessionError::Protocol(ControlError::Unexpected {
                message: "event",
                state: "await-registered",
            }));
        };
        let (dials_tx, dials_rx) = mpsc::channel(MAX_OUTSTANDING_DIALS);
        let agent = AgentDials {
            dials: dials_tx,
            cancels: Arc::new(Mutex::new(HashMap::new())),
        };
        let closed = CancellationToken::new();
        // The agent's commands are go-away and close only.
        let link = spawn_driver(control, io, Some(agent), closed.clone(), 16, span);
        Ok(crate::transport::AgentSession::new(
            registered,
            addr,
            config,
            crate::transport::session::AgentConn::Grpc {
                client: AgentCalls { client, closed },
                dials: tokio::sync::Mutex::new(dials_rx),
            },
            link,
        ))
    }
}

/// Agent side: answers a dial by opening its `Stream` call, the answer in the first chunk.
pub(crate) async fn answer(
    calls: &AgentCalls,
    stream_id: u64,
    reply: proto::StreamOpenReply,
) -> Result<GrpcStream, SessionError> {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tx.try_send(proto::Chunk {
        data: Bytes::new(),
        reply: Some(reply),
    })
    .map_err(|_| SessionError::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe)))?;
    let mut request = Request::new(ReceiverStream::new(rx));
    let id = tonic::metadata::MetadataValue::try_from(stream_id.to_string())
        .map_err(|e| SessionError::Io(std::io::Error::other(e.to_string())))?;
    request.metadata_mut().insert(STREAM_ID_KEY, id);
    let inbound = calls
        .client
        .clone()
        .stream(request)
        .await
        .map_err(|s| SessionError::Io(std::io::Error::other(s.message().to_owned())))?
        .into_inner();
    Ok(GrpcStream::new(
        stream_id,
        inbound,
        Outbound::Request(PollSender::new(tx)),
        &calls.closed,
    ))
}
