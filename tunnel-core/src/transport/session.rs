//! Session handles: what the server and the agent hold for one agent link, whatever carries it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::link::{Acceptor, ControlChannel, Incoming, Link, LinkState, Opener, Requested};
use super::stream::{StreamCount, TunnelStream};
use super::{SessionConfig, TransportKind};
use crate::control::Control;
use crate::error::{CloseCause, CloseReason, OpenError, Refusal, SessionError};
use crate::proto::{self, OpenRequest};
use crate::tls::AgentIdentity;

/// One opening waiting for the agent's answer, in `edge_tunnel_server_pending_opens`; it
/// leaves the gauge however the opening ends, the opener dropping it included.
struct PendingOpen(metrics::Gauge);

impl PendingOpen {
    fn new(transport: TransportKind) -> Self {
        let gauge =
            metrics::gauge!("edge_tunnel_server_pending_opens", "transport" => transport.as_str());
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for PendingOpen {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[derive(Debug)]
struct ServerShared<I> {
    id: u64,
    identity: I,
    claims: proto::Register,
    remote: SocketAddr,
    transport: TransportKind,
    config: Arc<SessionConfig>,
    opener: Box<dyn Opener>,
    link: Link,
    trace_ids: AtomicU64,
}

/// The server's handle on one agent link (or, as [`ReplicaSession`], on the link another
/// replica dialed to this one). Cheap to clone; the link lives while a handle does. `I` is who
/// is at the other end, as the certificate says.
#[derive(Debug)]
pub struct ServerSession<I = AgentIdentity> {
    shared: Arc<ServerShared<I>>,
}

impl<I> Clone for ServerSession<I> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// Who dialed a peer link: another replica, proven by its certificate's replica mark
/// ([`crate::tls::REPLICA_URI`]). Which replica it is, it says at registration (its server id);
/// that is for logs and for telling its links apart, not a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaIdentity {
    /// The server id the replica registered with.
    pub server_id: String,
}

/// The server's handle on a peer link another replica dialed: this replica opens streams on
/// it toward agents that replica holds ([`OpenRequest::to_peer`]).
pub type ReplicaSession = ServerSession<ReplicaIdentity>;

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// What a transport hands over to make a [`ServerSession`].
pub(crate) struct ServerParts<I> {
    pub(crate) identity: I,
    pub(crate) claims: proto::Register,
    pub(crate) remote: SocketAddr,
    pub(crate) transport: TransportKind,
    pub(crate) config: Arc<SessionConfig>,
    pub(crate) opener: Box<dyn Opener>,
    pub(crate) link: Link,
}

impl<I> ServerSession<I> {
    pub(crate) fn new(parts: ServerParts<I>) -> Self {
        let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: Arc::new(ServerShared {
                id,
                identity: parts.identity,
                claims: parts.claims,
                remote: parts.remote,
                transport: parts.transport,
                config: parts.config,
                opener: parts.opener,
                link: parts.link,
                trace_ids: AtomicU64::new(id << 32),
            }),
        }
    }

    /// Unique within this process; tells a replaced session from its successor.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Who is at the other end, from its certificate: the agent's node identity, or the
    /// replica's.
    pub fn identity(&self) -> &I {
        &self.shared.identity
    }

    /// What the agent claimed when registering (for logs only; never trusted).
    pub fn claims(&self) -> &proto::Register {
        &self.shared.claims
    }

    /// The agent's address as seen by the server.
    pub fn remote_addr(&self) -> SocketAddr {
        self.shared.remote
    }

    /// The transport of this link.
    pub fn transport(&self) -> TransportKind {
        self.shared.transport
    }

    /// The link's state now.
    pub fn state(&self) -> LinkState {
        self.shared.link.current()
    }

    /// Opens a stream to `request`'s target. Resolves when the agent has answered: with the
    /// stream, or with its typed refusal.
    pub async fn open(&self, request: &OpenRequest) -> Result<TunnelStream, OpenError> {
        match self.shared.link.current() {
            LinkState::Active => {}
            LinkState::Draining(reason) | LinkState::Closed(reason) => {
                return Err(OpenError::LinkClosed(reason));
            }
        }
        let limit = self.shared.config.max_streams;
        let guard = StreamCount::try_new(&self.shared.link.streams, limit as usize)
            .ok_or(OpenError::Busy(limit))?;
        let _pending = PendingOpen::new(self.transport());
        let link = &self.shared.link;
        let since = super::link::now();
        let mut opening = self.shared.opener.open(link, request);
        let probe_after = link.probe_after(self.shared.config.control.probe_after);
        // An answer that is slow to come may mean a dead link: have it probed, so that a
        // dead one is closed (and this open failed) in a few round trips, not at the next
        // ping or at the open timeout.
        let io = tokio::select! {
            io = &mut opening => io,
            () = tokio::time::sleep(probe_after) => {
                link.probe(since);
                opening.await
            }
        }?;
        Ok(TunnelStream::new(io, guard))
    }

    /// Streams open on this link now, openings in progress included.
    pub fn open_streams(&self) -> usize {
        self.shared.link.open_streams()
    }

    /// The control channel's smoothed round trip, once a ping has been answered (the first
    /// goes out at registration).
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.link.rtt()
    }

    /// Whether the agent answers within `timeout`. A ping goes out at once; if nothing comes
    /// back in time, the link is closed (cause `ping_deadline`, streams reset) and this
    /// returns false. For a session whose agent may have died: a restart's new session
    /// checks the one it replaces.
    pub async fn check_alive(&self, timeout: Duration) -> bool {
        self.shared.link.check_alive(timeout).await
    }

    /// Resolves when no stream is open on this link (at once if none is), or when it closes.
    pub async fn idle(&self) {
        self.shared.link.idle().await;
    }

    /// A fresh trace id for a stream of this session.
    pub fn next_trace_id(&self) -> u64 {
        self.shared.trace_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the agent to move away: no new streams here, existing ones may run for `drain`.
    pub fn go_away(&self, cause: CloseCause, drain: Duration) {
        self.shared.link.go_away(cause, drain);
    }

    /// Closes the link now, for `cause`; open streams fail.
    pub fn close(&self, cause: CloseCause) {
        self.shared.link.close(cause);
    }

    /// Resolves when the link is closed, with why and who closed it.
    pub async fn closed(&self) -> CloseReason {
        self.shared.link.closed().await
    }

    /// Resolves once the link is closed and its transport has let go: the close reached the
    /// agent, or the bounded wait for it (two seconds at most) is over. For a process about to
    /// exit, so that its last close is not cut.
    pub async fn finished(&self) {
        self.shared.link.finished().await;
    }
}

/// The agent's handle on its link to a server.
#[derive(Debug)]
pub struct AgentSession {
    registered: proto::Registered,
    remote: SocketAddr,
    transport: TransportKind,
    config: Arc<SessionConfig>,
    acceptor: Box<dyn Acceptor>,
    link: Link,
}

/// What a transport brings to an [`AgentSession`]; registration brings the rest.
pub(crate) struct AgentParts {
    pub(crate) remote: SocketAddr,
    pub(crate) transport: TransportKind,
    pub(crate) config: Arc<SessionConfig>,
    pub(crate) acceptor: Box<dyn Acceptor>,
}

impl AgentParts {
    pub(crate) fn new(
        remote: SocketAddr,
        transport: TransportKind,
        config: Arc<SessionConfig>,
        acceptor: impl Acceptor,
    ) -> Self {
        Self {
            remote,
            transport,
            config,
            acceptor: Box::new(acceptor),
        }
    }
}

impl AgentSession {
    /// Registers on `channel` (`control` has queued our claims) and starts the link.
    pub(crate) async fn register<C: ControlChannel>(
        channel: C,
        control: Control,
        parts: AgentParts,
    ) -> Result<Self, SessionError> {
        let span = tracing::debug_span!("session", peer.addr = %parts.remote, transport = %parts.transport);
        let (registered, link) = super::link::register(channel, control, span).await?;
        Ok(Self {
            registered,
            remote: parts.remote,
            transport: parts.transport,
            config: parts.config,
            acceptor: parts.acceptor,
            link,
        })
    }

    /// The node name the server registered us under (from our certificate).
    pub fn node_name(&self) -> &str {
        &self.registered.node_name
    }

    /// The server replica's id.
    pub fn server_id(&self) -> &str {
        &self.registered.server_id
    }

    /// The server's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The transport of this link.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// The ports the server allows this agent to dial, as it last said: `None` while it has
    /// said nothing (a server without a port policy, or older than them). Changes are sent
    /// only to an agent whose registration announced [`proto::Capability::PortPolicy`];
    /// the policy in force at registration comes to every agent.
    pub fn port_policy(&self) -> tokio::sync::watch::Receiver<Option<Arc<crate::PortPolicy>>> {
        self.link.port_policy()
    }

    /// The link's state now.
    pub fn state(&self) -> LinkState {
        self.link.current()
    }

    /// Streams open on this link now, dials in progress included.
    pub fn open_streams(&self) -> usize {
        self.link.open_streams()
    }

    /// Resolves when no stream is open on this link (at once if none is), or when it closes.
    pub async fn idle(&self) {
        self.link.idle().await;
    }

    /// The next stream the server opens. Returns quickly: the header is read by
    /// [`IncomingStream::read_request`], so that a slow stream never holds up the others.
    /// Fails with the link's close reason once the link is gone.
    pub async fn accept(&self) -> Result<IncomingStream, SessionError> {
        match self.acceptor.accept().await {
            Ok(inner) => Ok(IncomingStream {
                inner,
                header_timeout: self.config.header_timeout,
                guard: StreamCount::new(&self.link.streams),
            }),
            // The transport sees the end before the driver has said why: ask the driver.
            Err(_) => Err(SessionError::Closed(self.link.closed().await)),
        }
    }

    /// Resolves when the server sent a go-away or the link closed, with the state.
    pub async fn draining(&self) -> LinkState {
        self.link.draining().await
    }

    /// Resolves when the link is closed, with why and who closed it.
    pub async fn closed(&self) -> CloseReason {
        self.link.closed().await
    }

    /// Resolves once the link is closed and its transport has let go: the close reached the
    /// server, or the bounded wait for it (two seconds at most) is over.
    pub async fn finished(&self) {
        self.link.finished().await;
    }

    /// Tells the server we are leaving, for `cause`; existing streams may go on for `drain`.
    pub fn go_away(&self, cause: CloseCause, drain: Duration) {
        self.link.go_away(cause, drain);
    }

    /// Closes the link now, for `cause`.
    pub fn close(&self, cause: CloseCause) {
        self.link.close(cause);
    }
}

/// A stream the server opened, before its header is read.
#[derive(Debug)]
pub struct IncomingStream {
    inner: Box<dyn Incoming>,
    header_timeout: Duration,
    guard: StreamCount,
}

impl IncomingStream {
    /// Reads and validates the stream-open header. A malformed or late header resets the
    /// stream; a stream that asks for what the link has not negotiated (compression) is
    /// refused as `unsupported`. Both are reported as errors.
    pub async fn read_request(self) -> Result<RequestedStream, SessionError> {
        let (request, inner) = self.inner.read_request(self.header_timeout).await?;
        let requested = RequestedStream {
            request,
            inner,
            guard: self.guard,
        };
        if requested.request.compress {
            const WHY: &str = "compression is not negotiated on this link";
            requested.refuse(Refusal::Unsupported, WHY).await?;
            return Err(SessionError::Unsupported(WHY));
        }
        Ok(requested)
    }
}

/// A stream whose target is known; the agent accepts it after dialing, or refuses it.
#[derive(Debug)]
pub struct RequestedStream {
    request: OpenRequest,
    inner: Box<dyn Requested>,
    guard: StreamCount,
}

impl RequestedStream {
    /// What the server asks for.
    pub fn request(&self) -> &OpenRequest {
        &self.request
    }

    /// Resolves when the server has withdrawn this stream before our answer (its client left,
    /// or it gave up waiting), or the link is gone: a dial in progress can stop.
    pub async fn withdrawn(&mut self) {
        self.inner.withdrawn().await;
    }

    /// Answers OK; the returned stream carries the proxied bytes.
    pub async fn accept(self) -> Result<TunnelStream, SessionError> {
        let io = self.inner.accept().await?;
        Ok(TunnelStream::new(io, self.guard))
    }

    /// Answers with a typed refusal and a one-line detail (no secrets: the client may see it).
    pub async fn refuse(self, refusal: Refusal, detail: &str) -> Result<(), SessionError> {
        let reply = proto::StreamOpenReply {
            result: refusal.to_proto().into(),
            detail: detail.chars().take(200).collect(),
        };
        self.inner.refuse(reply).await
    }
}

/// The answer an opener got, as the stream or the typed refusal (shared by both transports).
pub(crate) fn answer_to_result(
    reply: &proto::StreamOpenReply,
    request: &OpenRequest,
) -> Result<(), OpenError> {
    match Refusal::from_proto(reply.result)? {
        None => Ok(()),
        Some(refusal) => Err(OpenError::Refused {
            refusal,
            detail: reply.detail.chars().take(200).collect(),
            target: request.target,
        }),
    }
}

impl From<CloseReason> for OpenError {
    fn from(reason: CloseReason) -> Self {
        Self::LinkClosed(reason)
    }
}
