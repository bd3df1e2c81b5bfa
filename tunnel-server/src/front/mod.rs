//! The public listeners: find the node a client wants, open a stream on that node's session,
//! and copy bytes. Each failure maps to an error the client can read.

pub(crate) mod connect;
pub(crate) mod http;
mod http_io;
pub(crate) mod proxies;
pub(crate) mod sni;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, warn};
use tunnel_core::copy::copy_bidirectional;
use tunnel_core::{
    NodeRef, OpenError, OpenRequest, Refusal, ServerSession, Target, TargetHost, TunnelStream,
};
use tunnel_process::throttle::LogThrottle;

use crate::config::ServerConfig;
use crate::peers::{Found, MOVE_WAIT, Peers};
use crate::ports::Ports;
use crate::registry::Registry;

/// While a node's agent moves between replicas, the replicas are asked again after this,
/// doubling up to [`MOVE_POLL_MAX`] (many clients may wait for one node; each asks every peer),
/// and at once when an agent registers here.
const MOVE_POLL: Duration = Duration::from_millis(100);
const MOVE_POLL_MAX: Duration = Duration::from_millis(800);

/// How long a finished stream waits for the agent to acknowledge its last bytes.
pub(crate) const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a front connection holds while it lives: its place under the connection limit (kept by
/// upgraded and CONNECT tunnels that outlive the HTTP exchange) and the drain signal.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    pub(crate) permit: Arc<OwnedSemaphorePermit>,
    /// Turns true when the server drains: finish what is in flight, take nothing new.
    pub(crate) stop: watch::Receiver<bool>,
    /// Turns true when the drain is over: cut what is left and end before returning.
    pub(crate) cut: watch::Receiver<bool>,
    /// Where the connection's requests hand what outlives them.
    pub(crate) spawner: Spawner,
}

/// Work a request starts that outlives it: a CONNECT tunnel, an upgraded exchange, the driver
/// of an upstream connection.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Hands tasks to the front's listener, which owns them as it owns the connections: the drain
/// waits for them, the cut ends them. Owned there rather than by their client connection's
/// handler, so that the handler (and its HTTP state, about 2 KiB) goes when the connection is
/// upgraded.
#[derive(Clone)]
pub(crate) struct Spawner {
    tasks: mpsc::Sender<Task>,
    cut: watch::Receiver<bool>,
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner").finish_non_exhaustive()
    }
}

impl Spawner {
    pub(crate) async fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut cut = self.cut.clone();
        let task = async move {
            tokio::select! {
                () = task => {}
                () = crate::stopped(&mut cut) => {}
            }
        };
        // Fails only once the front is gone, and then the task has nothing left to serve.
        let _ = self.tasks.send(Box::pin(task.in_current_span())).await;
    }
}

/// Which front a stream came through (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Front {
    Tls,
    Http,
    Connect,
    Egress,
}

impl Front {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Http => "http",
            Self::Connect => "connect",
            Self::Egress => "egress",
        }
    }
}

/// Why a stream could not be opened for a client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenFailure {
    #[error("port {0} is not served")]
    NotServed(u16),
    #[error("no agent connected for node {0}")]
    NoAgent(NodeRef),
    #[error("node {node}: {source}")]
    Open {
        node: NodeRef,
        #[source]
        source: OpenError,
    },
}

impl OpenFailure {
    /// The `result` label of the streams counter.
    pub(crate) fn result(&self) -> &'static str {
        match self {
            Self::NotServed(_) => "port_not_served",
            Self::NoAgent(_) => "no_agent",
            Self::Open { source, .. } if !source.is_refusal() => match source {
                OpenError::Timeout(_) => "timeout",
                OpenError::Busy(_) => "busy",
                _ => "session_lost",
            },
            Self::Open { source, .. } => source.refusal().as_str(),
        }
    }

    /// The HTTP status that tells a client what happened: a port the configuration does not
    /// serve 403, no agent 503, agent could not reach the target 502, the agent's dial timed
    /// out 504.
    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::NotServed(_) => 403,
            Self::NoAgent(_) => 503,
            Self::Open { source, .. } if source.refusal() == Refusal::Timeout => 504,
            Self::Open { source, .. } if !source.is_refusal() => 503,
            Self::Open { .. } => 502,
        }
    }

    /// What the client (or the operator it asks) can do about it, for the one-line answer.
    pub(crate) fn hint(&self) -> &'static str {
        match self {
            Self::NotServed(_) => {
                "add it to http-proxy-ports, https-proxy-ports, dnat-ports-pair or localhost-proxy-ports of ConfigMap edge-tunnel-server-cfg"
            }
            Self::NoAgent(NodeRef::Name(_)) => {
                "check that edge-tunnel-agent runs on that node and is connected (its log says why not)"
            }
            Self::NoAgent(NodeRef::Ip(_)) => {
                "no connected agent has this IP in its certificate; name the node instead, or check its agent"
            }
            Self::Open { source, .. } => match source {
                OpenError::Refused { refusal, .. } => match refusal {
                    Refusal::Forbidden => {
                        "the agent does not allow this port: its --allowed-ports or --localhost-proxy-ports leave it out, or it predates the server's port policy"
                    }
                    Refusal::Refused => "nothing listens on that port of the node",
                    Refusal::Timeout => {
                        "the node's port did not answer; check that its service runs"
                    }
                    _ => "the agent could not reach that port of the node",
                },
                OpenError::Busy(_) => "too many streams to this node at once; retry later",
                OpenError::Timeout(_) => "the agent is slow or its link is down; retry",
                _ => "the agent's link went away; retry",
            },
        }
    }
}

/// One line at the default level for a stream a front refused or could not open: node, front,
/// why, status (HTTP), target port. Rate-limited (one bucket per server, [`LogThrottle`]'s
/// defaults), the next line written carries `suppressed=N`, the lines dropped before it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refused<'a> {
    pub(crate) front: Front,
    pub(crate) node: Option<&'a NodeRef>,
    pub(crate) port: Option<u16>,
    /// The `result` label of the streams counter.
    pub(crate) result: &'static str,
    pub(crate) status: Option<u16>,
}

impl Refused<'_> {
    /// Writes the line through `throttle`, with `error` as its cause.
    pub(crate) fn log(self, throttle: &LogThrottle, error: &dyn std::fmt::Display) {
        let Some(suppressed) = throttle.admit() else {
            return;
        };
        warn!(
            front = self.front.as_str(),
            node = self.node.map(tracing::field::display),
            port = self.port,
            result = self.result,
            status = self.status,
            suppressed = (suppressed > 0).then_some(suppressed),
            error = %error,
            "client stream refused"
        );
    }
}

/// Resolves when the client has closed or reset its connection. For use while the client is
/// waiting for us and has nothing to send (a TLS client after its ClientHello): readable data
/// means it is still there, and the watch ends without consuming it.
pub(crate) async fn client_gone(tcp: &TcpStream) {
    let mut byte = [0u8; 1];
    match tcp.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// How long a refused client gets to read our answer and close, and how much it may send
/// meanwhile (dropped). Closing with unread bytes would reset the connection, and a reset can
/// reach the client before the answer does.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// After a final answer and our half-close: reads (bounded in time and bytes) until the client
/// closes, so that the answer is not lost to a reset.
pub(crate) async fn linger<IO: AsyncRead + Unpin>(io: &mut IO) {
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// State shared by the fronts.
#[derive(Debug)]
pub(crate) struct Fronts {
    pub(crate) registry: Arc<Registry>,
    /// The other replicas, for nodes whose agent is not here.
    peers: Option<Arc<Peers>>,
    pub(crate) config: Arc<ServerConfig>,
    /// The port configuration in force.
    pub(crate) ports: Arc<Ports>,
    /// Bounds the refused-stream lines of every front together (see [`Refused`]).
    pub(crate) refusals: LogThrottle,
    open_streams: AtomicUsize,
    idle: Notify,
}

impl Fronts {
    pub(crate) fn new(
        registry: Arc<Registry>,
        config: Arc<ServerConfig>,
        ports: Arc<Ports>,
        peers: Option<Arc<Peers>>,
    ) -> Self {
        Self {
            registry,
            peers,
            config,
            ports,
            refusals: LogThrottle::default(),
            open_streams: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    /// Opens a stream to `port` on `node`, counting the outcome. Dropped before it completes
    /// (the client left), the open is withdrawn and counted as `client_gone`.
    pub(crate) async fn open(
        self: &Arc<Self>,
        front: Front,
        node: &NodeRef,
        port: u16,
    ) -> Result<(TunnelStream, FrontCount), OpenFailure> {
        let started = Instant::now();
        let pending = PendingOpen { front, done: false };
        let result = self.open_on_node(node, port).await;
        pending.finish();
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.result(),
        };
        metrics::counter!("edge_tunnel_server_streams_total", "front" => front.as_str(), "result" => label)
            .increment(1);
        match result {
            Ok(stream) => {
                metrics::histogram!("edge_tunnel_server_open_duration_seconds", "front" => front.as_str())
                    .record(started.elapsed().as_secs_f64());
                Ok((stream, FrontCount::new(self.clone(), front)))
            }
            Err(e) => {
                metrics::counter!("edge_tunnel_server_open_failures_total", "reason" => label)
                    .increment(1);
                Err(e)
            }
        }
    }

    /// Opens on the node's session; when that session ends while the open waits and the node
    /// has a new one already (its agent restarted, or moved to another transport), once more
    /// on the new one, so that the client gets its answer rather than a 503. A node whose
    /// agent is not here is asked of the other replicas; one that is moving between replicas
    /// (its session here draining, or its last holder having let it go) is waited for,
    /// until [`MOVE_WAIT`] after that, while its agent connects to another.
    async fn open_on_node(&self, node: &NodeRef, port: u16) -> Result<TunnelStream, OpenFailure> {
        // Refused here, before any agent hears of it.
        if !self.ports.current().serves(port) {
            return Err(OpenFailure::NotServed(port));
        }
        let failed = |source| OpenFailure::Open {
            node: node.clone(),
            source,
        };
        let started = Instant::now();
        let mut poll = MOVE_POLL;
        let mut registered = self.registry.subscribe();
        // The session here that closed under an open, and how.
        let mut closed: Option<(u64, OpenError)> = None;
        loop {
            let skip = closed.as_ref().map(|(id, _)| *id);
            if let Some((session, host)) = self.local(node, skip) {
                match open_on(&session, host, port).await {
                    Err(OpenError::LinkClosed(reason)) => {
                        closed = Some((session.id(), OpenError::LinkClosed(reason)));
                        if skip.is_none() && self.peers.is_none() {
                            debug!(%node, "session closed while opening; looking for its successor");
                            continue;
                        }
                    }
                    other => return other.map_err(failed),
                }
            }
            let moving = match &self.peers {
                Some(peers) => match peers.open(node, port).await {
                    Ok(Found::Stream(stream)) => return Ok(stream),
                    Ok(Found::Nowhere { moving }) => moving || closed.is_some(),
                    Err(e) => return Err(failed(e)),
                },
                None => false,
            };
            if !moving || started.elapsed() >= MOVE_WAIT {
                return Err(match closed {
                    Some((_, e)) => failed(e),
                    None => OpenFailure::NoAgent(node.clone()),
                });
            }
            debug!(%node, "the node's agent is moving between replicas; waiting for it");
            let skip = closed.as_ref().map(|(id, _)| *id);
            self.arrival(node, skip, poll, &mut registered).await;
            poll = (poll * 2).min(MOVE_POLL_MAX);
        }
    }

    /// The session serving `node` on this replica, unless it is session `skip` (one that
    /// closed under an open).
    fn local(&self, node: &NodeRef, skip: Option<u64>) -> Option<(ServerSession, TargetHost)> {
        self.registry
            .lookup(node)
            .filter(|(session, _)| Some(session.id()) != skip)
    }

    /// Waits `poll`, or less if `node`'s agent (other than session `skip`) registers here
    /// meanwhile. Other registrations do not end the wait: the peers are asked again on the
    /// timer alone.
    async fn arrival(
        &self,
        node: &NodeRef,
        skip: Option<u64>,
        poll: Duration,
        registered: &mut watch::Receiver<u64>,
    ) {
        let timer = tokio::time::sleep(poll);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                () = &mut timer => return,
                changed = registered.changed() => {
                    if self.local(node, skip).is_some() {
                        return;
                    }
                    if changed.is_err() {
                        // The registry is gone: nobody will register.
                        return timer.await;
                    }
                }
            }
        }
    }

    /// Copies between a client and a tunnel stream; `prefix` (bytes already read from the
    /// client while sniffing) goes first.
    /// Returns false when the copy failed (the caller resets the client connection, so that
    /// a cut reply never looks complete).
    pub(crate) async fn proxy<C>(
        &self,
        client: &mut C,
        stream: &mut TunnelStream,
        prefix: &[u8],
    ) -> bool
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        if !prefix.is_empty() && stream.write_all(prefix).await.is_err() {
            stream.abort();
            return false;
        }
        let result = copy_bidirectional(client, stream, &self.config.copy).await;
        let moved = match &result {
            Ok(t) => *t,
            Err(e) => e.transferred(),
        };
        metrics::counter!("edge_tunnel_server_bytes_total", "direction" => "to_agent")
            .increment(moved.a_to_b + prefix.len() as u64);
        metrics::counter!("edge_tunnel_server_bytes_total", "direction" => "from_agent")
            .increment(moved.b_to_a);
        match result {
            Ok(_) => {
                // The stream counts as open until the agent has the last byte, so that a drain
                // that ends right after cannot cut it.
                stream.delivered(DELIVERY_TIMEOUT).await;
                true
            }
            Err(e) => {
                debug!(stream.id = stream.id(), error = %e, "proxied connection ended with an error");
                stream.abort();
                false
            }
        }
    }

    /// Resolves when no proxied stream is open.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open_streams.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

async fn open_on(
    session: &ServerSession,
    host: TargetHost,
    port: u16,
) -> Result<TunnelStream, OpenError> {
    let request = OpenRequest::new(Target { host, port }, session.next_trace_id());
    debug!(agent.id = %session.identity().node_name, session.id = session.id(), target = %request.target, trace.id = request.trace_id, "opening stream");
    session.open(&request).await
}

/// An open in progress: dropped before [`finish`](Self::finish), its client left first (hyper
/// drops a request's future when its client closes; the TLS front drops the open when its
/// client does).
struct PendingOpen {
    front: Front,
    done: bool,
}

impl PendingOpen {
    fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for PendingOpen {
    fn drop(&mut self) {
        if !self.done {
            metrics::counter!("edge_tunnel_server_streams_total", "front" => self.front.as_str(), "result" => "client_gone")
                .increment(1);
            debug!(
                front = self.front.as_str(),
                "client left before the agent answered"
            );
        }
    }
}

/// Counts a stream as open while it lives.
#[derive(Debug)]
pub(crate) struct FrontCount {
    fronts: Arc<Fronts>,
    front: Front,
}

impl FrontCount {
    fn new(fronts: Arc<Fronts>, front: Front) -> Self {
        fronts.open_streams.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!("edge_tunnel_server_streams_open", "front" => front.as_str())
            .increment(1.0);
        Self { fronts, front }
    }
}

impl Drop for FrontCount {
    fn drop(&mut self) {
        metrics::gauge!("edge_tunnel_server_streams_open", "front" => self.front.as_str())
            .decrement(1.0);
        if self.fronts.open_streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.fronts.idle.notify_waiters();
        }
    }
}

/// A listener of a front: TCP, or a Unix socket for the egress front.
pub(crate) trait FrontListener: Send + 'static {
    /// A client connection.
    type Io: Send + 'static;
    /// Who the client is, for its span.
    type Peer: Send + 'static;
    /// The next client.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Peer)>> + Send;
}

impl FrontListener for TcpListener {
    type Io = TcpStream;
    type Peer = SocketAddr;

    async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (tcp, peer) = Self::accept(self).await?;
        // Interactive traffic (exec, logs) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }
}

impl FrontListener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Peer = &'static str;

    async fn accept(&self) -> std::io::Result<(tokio::net::UnixStream, &'static str)> {
        let (unix, _) = Self::accept(self).await?;
        Ok((unix, "unix"))
    }
}

/// Where a connection that reached us through an iptables DNAT (or REDIRECT) was headed: its
/// original destination, when that differs from the address it reached.
fn original_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    // An IPv4 client of a dual-stack socket has a mapped address; its NAT entry is IPv4.
    let original = match local.ip().to_canonical() {
        std::net::IpAddr::V4(_) => sock.original_dst_v4(),
        std::net::IpAddr::V6(_) => sock.original_dst_v6(),
    };
    let original = original.ok()?.as_socket()?;
    let canonical = |a: SocketAddr| (a.ip().to_canonical(), a.port());
    (canonical(original) != canonical(local)).then_some(original)
}

impl Fronts {
    /// The node and port a DNAT'd connection was headed for, when its original destination
    /// is an IP of a connected agent's certificate. Any other translation (kube-proxy's for
    /// the tunnel Service, with the server on the host network) leaves the connection to be
    /// routed by what it says (SNI, Host, CONNECT).
    pub(crate) fn redirected(&self, tcp: &TcpStream) -> Option<(NodeRef, u16)> {
        let original = original_destination(tcp)?;
        let node = NodeRef::Ip(original.ip().to_canonical());
        self.registry.lookup(&node)?;
        Some((node, original.port()))
    }
}

/// Accepts clients until `stop` or `closed` turns true, at most `max_front_connections` at
/// once, and serves each with `handler`; then waits for the open ones to finish. `stop` is the
/// server's drain (its connections hear it too); `closed`, this listener's own end (a port
/// taken out of the configuration), which leaves its connections to finish.
pub(crate) async fn serve_front<L, F, Fut>(
    listener: L,
    fronts: Arc<Fronts>,
    mut stop: watch::Receiver<bool>,
    mut closed: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
    handler: F,
) where
    L: FrontListener,
    F: Fn(Arc<Fronts>, L::Io, L::Peer, Admission) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(fronts.config.max_front_connections));
    // Connections and the tasks their requests start; each task is taken at once, so a few
    // slots bound the queue without holding a request up.
    let mut conns = JoinSet::new();
    let (tasks, mut spawned) = mpsc::channel(64);
    let spawner = Spawner {
        tasks,
        cut: cut.clone(),
    };
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            Some(task) = spawned.recv() => {
                conns.spawn(task);
                continue;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            () = crate::stopped(&mut stop) => break,
            () = crate::stopped(&mut closed) => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let admission = Admission {
                        permit: Arc::new(permit),
                        stop: stop.clone(),
                        cut: cut.clone(),
                        spawner: spawner.clone(),
                    };
                    conns.spawn(handler(fronts.clone(), tcp, peer, admission));
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(task) = spawned.recv() => {
                conns.spawn(task);
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = crate::stopped(&mut stop) => break,
            () = crate::stopped(&mut closed) => break,
        }
    }
    drop(listener);
    drop(spawner);
    // Until every connection and every task it started has ended (the last spawner goes with
    // the last connection).
    loop {
        tokio::select! {
            Some(task) = spawned.recv() => {
                conns.spawn(task);
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            else => break,
        }
    }
}
