//! The one link driver, and the small interface a transport implements to run on it.
//!
//! A transport gives a link two things: a [`ControlChannel`] (send, receive and close with a
//! cause) and a way to open streams ([`Opener`], server side) or accept them ([`Acceptor`],
//! agent side). Everything else is here once: registration, the sans-IO [`Control`] machine
//! driven by one task per link (messages in and out, one timer from `poll_timeout`, go-away,
//! commands from the session handles), and how a link ends, with a typed [`CloseReason`]. The
//! shape is quinn's `ConnectionDriver` over its state machine.
//!
//! ```text
//!  ServerSession / AgentSession ──commands──▶ drive() ◀──messages──▶ ControlChannel (QUIC | gRPC)
//!            ▲                                   │
//!            └──────────── LinkState ◀───────────┘
//! ```

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::SessionConfig;
use super::stream::StreamIo;
use crate::control::{Control, ControlError, Event};
use crate::error::{CloseCause, CloseReason, OpenError, SessionError};
use crate::proto::{self, OpenRequest};
use crate::route::PortPolicy;
use crate::tls::AgentIdentity;

/// A boxed, sendable future: what the transports' stream methods return.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A transport's control channel: one QUIC stream, or the gRPC `Control` call.
pub(crate) trait ControlChannel: Send + 'static {
    /// Whether a local close is announced with a `Close` message first. QUIC carries the
    /// cause in its close code instead (and discards unsent stream data when it closes).
    const CLOSE_MESSAGE: bool;

    /// Sends one message. Bounded in time by the channel (gRPC) or by the peer's window, far
    /// larger than what a live peer leaves unread (QUIC).
    fn send(&mut self, msg: proto::Control)
    -> impl Future<Output = Result<(), CloseReason>> + Send;

    /// The next message from the peer; an error ends the link. Must be cancel-safe: the driver
    /// drops it whenever another event comes first.
    fn recv(&mut self) -> impl Future<Output = Result<proto::Control, CloseReason>> + Send;

    /// Agent side: the server asks for a stream over the control channel (gRPC only; a QUIC
    /// server opens streams natively, so there it is a protocol violation).
    fn stream_requested(&mut self, request: proto::StreamRequest) -> Result<(), CloseReason> {
        let _ = request;
        Err(
            CloseReason::local(CloseCause::Protocol).with_source(ControlError::Unexpected {
                message: "stream-request",
                state: "native streams",
            }),
        )
    }

    /// Agent side: the server withdrew a stream request (gRPC only).
    fn stream_cancelled(&mut self, stream_id: u64) {
        let _ = stream_id;
    }

    /// Ends the transport's link for `reason` and says what the operator should know about it.
    /// Called once, whoever ended the link.
    fn finish(&mut self, reason: &CloseReason) -> impl Future<Output = ()> + Send;
}

/// An opening in progress: the stream, once the agent has answered OK.
pub(crate) type Opening<'a> = BoxFuture<'a, Result<Box<dyn StreamIo>, OpenError>>;

/// Server side: how a transport opens a stream on its link.
pub(crate) trait Opener: Send + Sync + fmt::Debug + 'static {
    /// Opens a stream for `request` on `link` and waits for the agent's answer.
    fn open<'a>(&'a self, link: &'a Link, request: &'a OpenRequest) -> Opening<'a>;
}

/// Agent side: how a transport hands over the streams the server opens.
pub(crate) trait Acceptor: Send + Sync + fmt::Debug + 'static {
    /// The next stream; an error means the link is gone.
    fn accept(&self) -> BoxFuture<'_, Result<Box<dyn Incoming>, SessionError>>;
}

/// What reading a stream's header yields: the request, and the stream waiting for an answer.
pub(crate) type RequestRead =
    BoxFuture<'static, Result<(OpenRequest, Box<dyn Requested>), SessionError>>;

/// Agent side: a stream the server opened, before its header is read.
pub(crate) trait Incoming: Send + fmt::Debug {
    /// Reads the stream-open header within `timeout`. A malformed or late header resets the
    /// stream.
    fn read_request(self: Box<Self>, timeout: Duration) -> RequestRead;
}

/// Agent side: a stream whose target is known, waiting for the agent's answer.
pub(crate) trait Requested: Send + fmt::Debug {
    /// Resolves when the server withdrew the stream, or the link is gone.
    fn withdrawn(&mut self) -> BoxFuture<'_, ()>;

    /// Answers OK; the stream carries the proxied bytes.
    fn accept(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn StreamIo>, SessionError>>;

    /// Answers with `reply`, a refusal, and ends the stream.
    fn refuse(
        self: Box<Self>,
        reply: proto::StreamOpenReply,
    ) -> BoxFuture<'static, Result<(), SessionError>>;
}

/// Where a link stands, as its driver reports it.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// Registered and serving.
    Active,
    /// A go-away was sent or received: no new streams.
    Draining(CloseReason),
    /// The link is gone.
    Closed(CloseReason),
}

impl LinkState {
    /// True once the link is gone.
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed(_))
    }
}

/// Requests from the session handles to the link's driver.
#[derive(Debug)]
pub(crate) enum Command {
    GoAway {
        cause: CloseCause,
        drain: Duration,
    },
    /// Server side, gRPC: ask the agent for a stream.
    Request(proto::StreamRequest),
    /// Server side, gRPC: withdraw a request.
    Cancel(u64),
    /// Server side: an open begun at this instant waits for its answer; probe a silent link.
    Probe(std::time::Instant),
    /// Server side: the peer must be heard from within this time, or the link is dead.
    Check(Duration),
}

/// What the handles and the driver share: a handle's request to close the link (the first
/// cause wins), the driver's word that the link is gone, and the round trip it measured.
#[derive(Debug)]
struct CloseRequest {
    cause: OnceLock<CloseCause>,
    requested: CancellationToken,
    /// Cancelled when the driver has ended the transport too.
    finished: CancellationToken,
    /// The control channel's smoothed round trip in microseconds; 0 while unknown.
    rtt_micros: AtomicU64,
    /// Bumped by the driver for every message heard from the peer.
    heard: watch::Sender<u64>,
    /// Agent side: the port policy the server sent last; `None` while it sent none (a server
    /// older than port policies).
    ports: watch::Sender<Option<Arc<PortPolicy>>>,
}

impl Default for CloseRequest {
    fn default() -> Self {
        Self {
            cause: OnceLock::new(),
            requested: CancellationToken::new(),
            finished: CancellationToken::new(),
            rtt_micros: AtomicU64::new(0),
            heard: watch::Sender::new(0),
            ports: watch::Sender::new(None),
        }
    }
}

/// A task aborted when its owner is dropped.
#[derive(Debug)]
pub(crate) struct DriverTask(pub(crate) JoinHandle<()>);

impl Drop for DriverTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A link's driver, aborted with the last handle unless it is ending the link: a close asked
/// for just before the handles went must still reach the peer. The end is bounded (the close
/// message's flush and the peer's half, a second each at most), so such a driver outlives its
/// handles by two seconds at most.
#[derive(Debug)]
struct LinkDriver {
    task: JoinHandle<()>,
    close: Arc<CloseRequest>,
}

impl Drop for LinkDriver {
    fn drop(&mut self) {
        if !self.close.requested.is_cancelled() {
            self.task.abort();
        }
    }
}

/// What the session handles hold of a link.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) commands: mpsc::Sender<Command>,
    state: watch::Receiver<LinkState>,
    close: Arc<CloseRequest>,
    /// Streams open on the link (agent: from accept on, dials in progress included).
    pub(crate) streams: watch::Sender<usize>,
    _driver: LinkDriver,
}

impl Link {
    /// Starts the driver of a registered link. `capacity`: the depth of the command queue.
    /// `ports`: server side, the policy whose changes go to the agent.
    fn spawn<C: ControlChannel>(
        channel: C,
        control: Control,
        capacity: usize,
        ports: Option<watch::Receiver<PortPolicy>>,
        close: CloseRequest,
        span: tracing::Span,
    ) -> Self {
        let (commands, rx) = mpsc::channel(capacity);
        let (state_tx, state) = watch::channel(LinkState::Active);
        let close = Arc::new(close);
        let driver = drive(channel, control, rx, ports, state_tx, close.clone());
        let task = tokio::spawn(driver.instrument(span));
        Self {
            commands,
            state,
            _driver: LinkDriver {
                task,
                close: close.clone(),
            },
            close,
            streams: watch::Sender::new(0),
        }
    }

    pub(crate) fn go_away(&self, cause: CloseCause, drain: Duration) {
        // A full queue means a go-away is already on its way; a closed one, that the link is gone.
        let _ = self.commands.try_send(Command::GoAway { cause, drain });
    }

    pub(crate) fn close(&self, cause: CloseCause) {
        let _ = self.close.cause.set(cause);
        self.close.requested.cancel();
    }

    /// Asks the driver to probe the link for an open begun at `since` that has no answer yet.
    pub(crate) fn probe(&self, since: std::time::Instant) {
        // A full queue holds commands enough to keep the driver busy; a probe it misses is
        // covered by the probes of the other waiting opens and by the regular pings.
        let _ = self.commands.try_send(Command::Probe(since));
    }

    /// How long an open waits for its answer before it probes the link: four round trips,
    /// `floor` at least.
    pub(crate) fn probe_after(&self, floor: Duration) -> Duration {
        (self.rtt().unwrap_or_default() * 4).max(floor)
    }

    /// Agent side: the port policy the server sent last (`None`: it sent none).
    pub(crate) fn port_policy(&self) -> watch::Receiver<Option<Arc<PortPolicy>>> {
        self.close.ports.subscribe()
    }

    /// The control channel's smoothed round trip, once measured.
    pub(crate) fn rtt(&self) -> Option<Duration> {
        match self.close.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// Whether the peer is heard from within `timeout`: a ping goes out at once (or the one
    /// out gets that deadline). If nothing comes, the driver closes the link, for a ping
    /// deadline, and this says false.
    pub(crate) async fn check_alive(&self, timeout: Duration) -> bool {
        let mut heard = self.close.heard.subscribe();
        heard.mark_unchanged();
        if self.commands.send(Command::Check(timeout)).await.is_err() {
            return false;
        }
        tokio::select! {
            // The sender lives in `self`.
            _ = heard.changed() => true,
            _ = self.closed() => false,
        }
    }

    pub(crate) fn current(&self) -> LinkState {
        self.state.borrow().clone()
    }

    pub(crate) fn open_streams(&self) -> usize {
        *self.streams.borrow()
    }

    /// Resolves when no stream is open, or the link is closed.
    pub(crate) async fn idle(&self) {
        let mut streams = self.streams.subscribe();
        tokio::select! {
            // The sender lives in `self`: this wait ends only by its predicate.
            _ = streams.wait_for(|n| *n == 0) => {}
            _ = self.closed() => {}
        }
    }

    /// Resolves when the link is draining or closed, with the state.
    pub(crate) async fn draining(&self) -> LinkState {
        let mut rx = self.state.clone();
        let gone = || LinkState::Closed(CloseReason::local(CloseCause::Shutdown));
        match rx.wait_for(|s| !matches!(s, LinkState::Active)).await {
            Ok(s) => s.clone(),
            Err(_) => gone(),
        }
    }

    /// Resolves when the driver has ended the transport as well: the close reached the peer,
    /// or the bounded wait for it is over.
    pub(crate) async fn finished(&self) {
        let mut state = self.state.clone();
        tokio::select! {
            () = self.close.finished.cancelled() => {}
            // The driver is gone without a word (aborted, or it panicked).
            () = async { while state.changed().await.is_ok() {} } => {}
        }
    }

    /// Resolves when the link is closed, with why.
    pub(crate) async fn closed(&self) -> CloseReason {
        let mut rx = self.state.clone();
        let state = match rx.wait_for(LinkState::is_closed).await {
            Ok(s) => s.clone(),
            // The driver is gone without a word: it was aborted with the last handle.
            Err(_) => return CloseReason::local(CloseCause::Shutdown),
        };
        match state {
            LinkState::Closed(reason) => reason,
            LinkState::Active | LinkState::Draining(_) => CloseReason::local(CloseCause::Shutdown),
        }
    }
}

pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Sends every message `control` has queued.
async fn flush<C: ControlChannel>(
    channel: &mut C,
    control: &mut Control,
) -> Result<(), CloseReason> {
    while let Some(msg) = control.poll_transmit() {
        channel.send(msg).await?;
    }
    Ok(())
}

/// Drives `control` until it reports an event (the registration steps), honouring its
/// deadlines. A `Close` from the peer ends it with the peer's cause.
async fn until_event<C: ControlChannel>(
    channel: &mut C,
    control: &mut Control,
) -> Result<Event, CloseReason> {
    loop {
        flush(channel, control).await?;
        match control.poll_event() {
            Some(Event::Closed { cause, detail }) => {
                return Err(CloseReason::remote(cause).with_detail(&detail));
            }
            Some(ev) => return Ok(ev),
            None => {}
        }
        let deadline = control.poll_timeout();
        tokio::select! {
            m = channel.recv() => control.handle_message(now(), m?)?,
            () = sleep_until(deadline) => control.handle_timeout(now())?,
        }
    }
}

fn unexpected(event: &Event, state: &'static str) -> CloseReason {
    let message = match event {
        Event::RegisterReceived(_) => "register",
        Event::Registered(_) => "registered",
        Event::GoAway { .. } => "go-away",
        Event::StreamRequested(_) => "stream-request",
        Event::StreamCancelled(_) => "stream-cancel",
        Event::PortPolicy(_) => "port-policy",
        Event::Closed { .. } => "close",
    };
    ControlError::Unexpected { message, state }.into()
}

/// What a server tells every agent at registration: its id, and the port policy (whose later
/// changes its links pass on).
#[derive(Debug, Clone)]
pub(crate) struct Welcome {
    pub(crate) server_id: Arc<str>,
    pub(crate) ports: Option<watch::Receiver<PortPolicy>>,
}

impl Welcome {
    pub(crate) fn new(server_id: &str) -> Self {
        Self {
            server_id: server_id.into(),
            ports: None,
        }
    }
}

/// Who registers on a link the server accepted, as its certificate says.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Registrant<'a> {
    /// An agent, for the node its certificate names.
    Agent(&'a AgentIdentity),
    /// Another replica dialing a peer link: it is told no port policy, and registers under
    /// the server id it claims.
    Replica,
}

/// Server side: runs the registration on `channel` and starts the link's driver. An agent's
/// node name comes from its certificate only; a differing claim is logged. On failure the
/// channel is closed with the cause.
pub(crate) async fn accept_agent<C: ControlChannel>(
    mut channel: C,
    registrant: Registrant<'_>,
    welcome: &Welcome,
    config: &SessionConfig,
    capacity: usize,
    span: tracing::Span,
) -> Result<(proto::Register, Link), CloseReason> {
    let mut control = Control::server(now(), config.control.clone());
    // Marked seen here: a change after this point goes out as a message of its own.
    let mut ports = match registrant {
        Registrant::Agent(_) => welcome.ports.clone(),
        Registrant::Replica => None,
    };
    let current = ports
        .as_mut()
        .map(|p| proto::PortPolicy::from_policy(&p.borrow_and_update()));
    let registration = async {
        let claims = match until_event(&mut channel, &mut control).await? {
            Event::RegisterReceived(r) => r,
            other => return Err(unexpected(&other, "await-register")),
        };
        let name = match registrant {
            Registrant::Agent(identity) => {
                if claims
                    .connected_server_ids
                    .iter()
                    .any(|id| **id == *welcome.server_id)
                {
                    // A redundant session must go to another replica; taken here, it would
                    // replace the agent's session to us.
                    return Err(CloseReason::local(CloseCause::AlreadyConnected));
                }
                if claims.node_name != identity.node_name && !claims.node_name.is_empty() {
                    warn!(
                        agent.claimed = %claims.node_name,
                        "agent claims another node name; using its certificate's"
                    );
                }
                identity.node_name.clone()
            }
            Registrant::Replica => {
                if claims.node_name.is_empty() || claims.node_name.len() > 253 {
                    return Err(
                        ControlError::Invalid("replica registered without a server id").into(),
                    );
                }
                claims.node_name.clone()
            }
        };
        let registered = proto::Registered {
            node_name: name,
            server_id: welcome.server_id.to_string(),
            ports: current,
        };
        control.accept_registration(now(), registered)?;
        flush(&mut channel, &mut control).await?;
        Ok(claims)
    };
    match registration.instrument(span.clone()).await {
        Ok(claims) => {
            // Only an agent that said it understands them gets policy messages: an older one
            // would take the unknown message for a protocol violation.
            let ports = ports.filter(|_| {
                claims
                    .capabilities
                    .contains(&(proto::Capability::PortPolicy as i32))
            });
            let link = Link::spawn(
                channel,
                control,
                capacity,
                ports,
                CloseRequest::default(),
                span,
            );
            Ok((claims, link))
        }
        Err(reason) => {
            end(&mut channel, &mut control, &reason).await;
            Err(reason)
        }
    }
}

/// Agent side: registers on `channel` (the [`Control::agent`] machine `control` has queued
/// our claims) and starts the link's driver.
pub(crate) async fn register<C: ControlChannel>(
    mut channel: C,
    mut control: Control,
    span: tracing::Span,
) -> Result<(proto::Registered, Link), CloseReason> {
    let registration = async {
        match until_event(&mut channel, &mut control).await? {
            Event::Registered(r) => Ok(r),
            other => Err(unexpected(&other, "await-registered")),
        }
    };
    match registration.instrument(span.clone()).await {
        Ok(registered) => {
            let shared = CloseRequest::default();
            if let Some(ports) = &registered.ports {
                let Ok(policy) = ports.to_policy() else {
                    let reason =
                        ControlError::Invalid("registered: port policy with a port out of range")
                            .into();
                    end(&mut channel, &mut control, &reason).await;
                    return Err(reason);
                };
                shared.ports.send_replace(Some(Arc::new(policy)));
            }
            // The agent's commands are go-aways only.
            let link = Link::spawn(channel, control, 4, None, shared, span);
            Ok((registered, link))
        }
        Err(reason) => {
            end(&mut channel, &mut control, &reason).await;
            Err(reason)
        }
    }
}

/// How long a closing side tries to get its `Close` message out before it closes anyway.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Ends a link for `reason`: announces a local close where the transport needs it, then
/// finishes the transport.
async fn end<C: ControlChannel>(channel: &mut C, control: &mut Control, reason: &CloseReason) {
    if C::CLOSE_MESSAGE && reason.initiator == crate::error::Initiator::Local {
        let detail = std::error::Error::source(reason)
            .map(ToString::to_string)
            .unwrap_or_default();
        control.close(reason.cause, &detail);
        // The peer may be the reason we close: do not wait for it long.
        let _ = tokio::time::timeout(CLOSE_FLUSH, flush(channel, control)).await;
    }
    channel.finish(reason).await;
}

/// One task per link: control messages in and out, pings, go-away, and the link's end.
async fn drive<C: ControlChannel>(
    mut channel: C,
    mut control: Control,
    mut commands: mpsc::Receiver<Command>,
    mut ports: Option<watch::Receiver<PortPolicy>>,
    state: watch::Sender<LinkState>,
    close: Arc<CloseRequest>,
) {
    let inputs = Inputs {
        commands: &mut commands,
        ports: &mut ports,
    };
    let Err(reason) = serve(&mut channel, &mut control, inputs, &state, &close).await;
    // Ending: the handles must not abort what follows, and must not route anything more here.
    close.requested.cancel();
    state.send_replace(LinkState::Closed(reason.clone()));
    end(&mut channel, &mut control, &reason).await;
    close.finished.cancel();
    debug!(%reason, cause = reason.cause.as_str(), "link ended");
}

/// What a link's driver hears besides its peer: its handles' commands and, on the server,
/// the port policy whose changes it passes on.
struct Inputs<'a> {
    commands: &'a mut mpsc::Receiver<Command>,
    ports: &'a mut Option<watch::Receiver<PortPolicy>>,
}

/// Resolves with the new policy when it changes; never when there is none to follow (or its
/// sender is gone, and with it any change).
async fn policy_changed(ports: &mut Option<watch::Receiver<PortPolicy>>) -> PortPolicy {
    if let Some(rx) = ports.as_mut()
        && rx.changed().await.is_ok()
    {
        return rx.borrow_and_update().clone();
    }
    *ports = None;
    std::future::pending().await
}

async fn serve<C: ControlChannel>(
    channel: &mut C,
    control: &mut Control,
    inputs: Inputs<'_>,
    state: &watch::Sender<LinkState>,
    close: &CloseRequest,
) -> Result<Infallible, CloseReason> {
    let Inputs { commands, ports } = inputs;
    loop {
        flush(channel, control).await?;
        while let Some(ev) = control.poll_event() {
            match ev {
                Event::GoAway { cause, drain } => {
                    info!(cause = cause.as_str(), ?drain, "peer sent go-away");
                    state.send_replace(LinkState::Draining(CloseReason::remote(cause)));
                }
                Event::StreamRequested(request) => channel.stream_requested(request)?,
                Event::StreamCancelled(id) => channel.stream_cancelled(id),
                Event::PortPolicy(policy) => {
                    info!(%policy, "the server's port policy changed");
                    close.ports.send_replace(Some(Arc::new(policy)));
                }
                Event::Closed { cause, detail } => {
                    return Err(CloseReason::remote(cause).with_detail(&detail));
                }
                other @ (Event::RegisterReceived(_) | Event::Registered(_)) => {
                    return Err(unexpected(&other, "active"));
                }
            }
        }
        if let Some(rtt) = control.rtt() {
            let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
            close.rtt_micros.store(micros, Ordering::Relaxed);
        }
        let deadline = control.poll_timeout();
        tokio::select! {
            m = channel.recv() => {
                control.handle_message(now(), m?)?;
                close.heard.send_modify(|n| *n = n.wrapping_add(1));
            }
            () = sleep_until(deadline) => control.handle_timeout(now())?,
            policy = policy_changed(ports) => control.push_port_policy(&policy),
            cmd = commands.recv() => match cmd {
                Some(Command::GoAway { cause, drain }) => {
                    control.go_away(cause, drain);
                    state.send_replace(LinkState::Draining(CloseReason::local(cause)));
                }
                Some(Command::Request(request)) => control.request_stream(request)?,
                Some(Command::Cancel(id)) => control.cancel_stream(id),
                Some(Command::Check(timeout)) => {
                    control.check(now(), timeout);
                }
                Some(Command::Probe(since)) => {
                    if control.probe(now(), since) {
                        metrics::counter!("edge_tunnel_server_link_probes_total").increment(1);
                    }
                }
                // The handles are gone; the task is about to be aborted anyway.
                None => return Err(CloseReason::local(CloseCause::Shutdown)),
            },
            () = close.requested.cancelled() => {
                let cause = close.cause.get().copied().unwrap_or(CloseCause::Shutdown);
                return Err(CloseReason::local(cause));
            }
        }
    }
}
