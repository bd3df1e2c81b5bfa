//! The control channel's state machine, sans-IO.
//!
//! One [`Control`] per side of an agent link. The driver feeds it received messages
//! ([`Control::handle_message`]) and expired deadlines ([`Control::handle_timeout`]), then drains
//! [`Control::poll_transmit`] and [`Control::poll_event`] and re-arms one timer from
//! [`Control::poll_timeout`]. It never touches a socket or a clock.
//!
//! ```text
//! agent:  AwaitRegistered --Registered--> Active --GoAway(any side)--> Draining
//! server: AwaitRegister --Register--> AwaitAccept --accept_registration--> Active --> Draining
//! ```
//! Once active, the server pings when it has heard nothing from the agent for `ping_interval`,
//! and declares the agent dead when nothing comes back within `ping_timeout`: anything heard
//! proves the peer alive, so a busy control channel carries no pings at all and an idle one one
//! ping and one pong per interval. The agent, which expects those pings, pings only after a
//! longer silence. A stream open left without an answer asks for a [`Control::probe`]: a ping
//! at once, with a deadline of a few round trips, so that a dead link is found in about a
//! second while clients wait on it rather than at the next ping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::error::CloseCause;
use crate::proto::{self, control::Msg};
use crate::route;

/// Liveness and handshake timing.
///
/// At the defaults a silent agent is found dead 9 s after it was last heard at most (5 s of
/// silence, then 4 s for the pong), and within about 1.5 s once a stream open waits on it
/// (0.5 s, then a probe with a 1 s deadline on a short-RTT link).
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Server: silence (nothing received) after which it pings. The agent pings after
    /// `ping_interval + ping_timeout` of silence, since it expects the server's pings.
    /// Default 5 s.
    pub ping_interval: Duration,
    /// Time allowed for the answer to a ping. Default 4 s.
    pub ping_timeout: Duration,
    /// Time allowed from link up to completed registration. Default 10 s.
    pub register_timeout: Duration,
    /// A stream open without an answer after this long (or four round trips, if longer)
    /// probes the link. Default 500 ms.
    pub probe_after: Duration,
    /// Least time a probe's answer gets; three times the round trip plus four deviations when
    /// that is longer, `ping_timeout` at most. Default 1 s.
    pub probe_timeout: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(4),
            register_timeout: Duration::from_secs(10),
            probe_after: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(1),
        }
    }
}

/// What the control channel reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Server side: the agent registered with these claims. The owner checks them against the
    /// certificate and answers with [`Control::accept_registration`].
    RegisterReceived(proto::Register),
    /// Agent side: the server accepted the registration.
    Registered(proto::Registered),
    /// Agent side, gRPC transport: the server asks for a stream.
    StreamRequested(proto::StreamRequest),
    /// Agent side, gRPC transport: the server's client is gone; withdraw this stream request.
    StreamCancelled(u64),
    /// Agent side: the server's port policy changed (the one in force at registration comes
    /// with [`Event::Registered`]).
    PortPolicy(route::PortPolicy),
    /// The peer accepts no new streams.
    GoAway {
        /// Why.
        cause: CloseCause,
        /// How long existing streams may go on.
        drain: Duration,
    },
    /// The peer ends the link now.
    Closed {
        /// Why.
        cause: CloseCause,
        /// The peer's one-line detail, for logs.
        detail: String,
    },
}

/// A control-channel failure; the link should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A message that is not allowed in the current state.
    #[error("unexpected {message} in state {state}")]
    Unexpected {
        /// The message kind.
        message: &'static str,
        /// The state it arrived in.
        state: &'static str,
    },
    /// The peer did not register (or answer the registration) in time.
    #[error("registration timed out")]
    RegisterTimeout,
    /// No pong within the ping timeout.
    #[error(
        "nothing heard from the peer in time (ping {seq} unanswered): the link is dead or cut off"
    )]
    PingTimeout {
        /// The unanswered ping.
        seq: u64,
    },
    /// The peer sends faster than we can answer.
    #[error("peer floods the control channel")]
    Flood,
    /// An empty control message.
    #[error("empty control message")]
    Empty,
    /// A message whose content is out of range.
    #[error("invalid control message: {0}")]
    Invalid(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitRegister { deadline: Instant },
    AwaitAccept { deadline: Instant },
    AwaitRegistered { deadline: Instant },
    Active,
    Draining,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            Self::AwaitRegister { .. } => "await-register",
            Self::AwaitAccept { .. } => "await-accept",
            Self::AwaitRegistered { .. } => "await-registered",
            Self::Active => "active",
            Self::Draining => "draining",
        }
    }
}

/// Bound on queued outgoing messages: a well-behaved peer never gets us past a handful.
const MAX_OUTBOX: usize = 64;

/// A ping waiting for its answer, or for anything from the peer.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    seq: u64,
    deadline: Instant,
}

/// Round-trip estimate from pings and their pongs, as TCP keeps it (RFC 6298).
#[derive(Debug, Clone, Copy)]
struct Rtt {
    smoothed: Duration,
    variation: Duration,
}

impl Rtt {
    fn sample(previous: Option<Self>, sample: Duration) -> Self {
        match previous {
            None => Self {
                smoothed: sample,
                variation: sample / 2,
            },
            Some(p) => Self {
                variation: (p.variation * 3 + p.smoothed.abs_diff(sample)) / 4,
                smoothed: (p.smoothed * 7 + sample) / 8,
            },
        }
    }
}

/// One side of the control channel.
#[derive(Debug)]
pub struct Control {
    agent: bool,
    config: ControlConfig,
    state: State,
    outbox: VecDeque<proto::Control>,
    events: VecDeque<Event>,
    /// When a message from the peer last arrived (registration counts).
    last_heard: Instant,
    /// When our last ping left.
    last_ping: Option<(u64, Instant)>,
    outstanding: Option<Outstanding>,
    rtt: Option<Rtt>,
    seq: u64,
}

fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Register(_) => "register",
        Msg::Registered(_) => "registered",
        Msg::Ping(_) => "ping",
        Msg::Pong(_) => "pong",
        Msg::GoAway(_) => "go-away",
        Msg::StreamRequest(_) => "stream-request",
        Msg::StreamCancel(_) => "stream-cancel",
        Msg::Close(_) => "close",
        Msg::PortPolicy(_) => "port-policy",
    }
}

impl Control {
    /// The agent's side; `register` is queued for sending at once.
    pub fn agent(now: Instant, config: ControlConfig, register: proto::Register) -> Self {
        let deadline = now + config.register_timeout;
        let mut c = Self::new(now, config, State::AwaitRegistered { deadline });
        c.agent = true;
        c.outbox.push_back(wrap(Msg::Register(register)));
        c
    }

    /// The server's side, waiting for the agent's Register.
    pub fn server(now: Instant, config: ControlConfig) -> Self {
        let deadline = now + config.register_timeout;
        Self::new(now, config, State::AwaitRegister { deadline })
    }

    fn new(now: Instant, config: ControlConfig, state: State) -> Self {
        Self {
            agent: false,
            config,
            state,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            last_heard: now,
            last_ping: None,
            outstanding: None,
            rtt: None,
            seq: 0,
        }
    }

    /// True once registration completed and until a go-away.
    pub fn is_active(&self) -> bool {
        self.state == State::Active
    }

    /// True after a go-away in either direction.
    pub fn is_draining(&self) -> bool {
        self.state == State::Draining
    }

    /// Feeds one message from the peer.
    pub fn handle_message(
        &mut self,
        now: Instant,
        msg: proto::Control,
    ) -> Result<(), ControlError> {
        let msg = msg.msg.ok_or(ControlError::Empty)?;
        // Anything from the peer proves it alive, whatever it is.
        self.last_heard = now;
        self.outstanding = None;
        let unexpected = |m: &Msg, s: State| ControlError::Unexpected {
            message: msg_name(m),
            state: s.name(),
        };
        match (self.state, msg) {
            // Allowed in every state: a refusal may come before registration completes.
            (_, Msg::Close(c)) => {
                self.events.push_back(Event::Closed {
                    cause: CloseCause::from_proto(c.cause),
                    detail: c.detail.chars().take(200).collect(),
                });
            }
            (State::AwaitRegister { deadline }, Msg::Register(r)) => {
                self.state = State::AwaitAccept { deadline };
                self.events.push_back(Event::RegisterReceived(r));
            }
            (State::AwaitRegistered { .. }, Msg::Registered(r)) => {
                self.activate(now);
                self.events.push_back(Event::Registered(r));
            }
            (State::Active | State::Draining, Msg::Ping(p)) => {
                if self.outbox.len() >= MAX_OUTBOX {
                    return Err(ControlError::Flood);
                }
                self.outbox
                    .push_back(wrap(Msg::Pong(proto::Pong { seq: p.seq })));
            }
            (State::Active | State::Draining, Msg::Pong(p)) => {
                // A pong for an older ping is late but harmless; only our last ping's answer
                // is a round-trip sample.
                if let Some((seq, sent)) = self.last_ping
                    && seq == p.seq
                {
                    self.rtt = Some(Rtt::sample(self.rtt, now.saturating_duration_since(sent)));
                    self.last_ping = None;
                }
            }
            // A request may cross a go-away on the wire; it was sent while the link was open,
            // so it is served like a QUIC stream opened just before the go-away.
            (State::Active | State::Draining, Msg::StreamRequest(r)) if self.agent => {
                self.events.push_back(Event::StreamRequested(r));
            }
            (State::Active | State::Draining, Msg::StreamCancel(c)) if self.agent => {
                self.events.push_back(Event::StreamCancelled(c.stream_id));
            }
            (State::Active | State::Draining, Msg::PortPolicy(p)) if self.agent => {
                let policy = p
                    .to_policy()
                    .map_err(|_| ControlError::Invalid("port policy with a port out of range"))?;
                self.events.push_back(Event::PortPolicy(policy));
            }
            (State::Active | State::Draining, Msg::GoAway(g)) => {
                self.state = State::Draining;
                self.events.push_back(Event::GoAway {
                    cause: CloseCause::from_proto(g.cause),
                    drain: Duration::from_millis(u64::from(g.drain_ms)),
                });
            }
            (state, m) => return Err(unexpected(&m, state)),
        }
        Ok(())
    }

    /// Server side: accepts the registration reported by [`Event::RegisterReceived`], answering
    /// with `registered` (which carries the name from the certificate, not the claim).
    pub fn accept_registration(
        &mut self,
        now: Instant,
        registered: proto::Registered,
    ) -> Result<(), ControlError> {
        let State::AwaitAccept { .. } = self.state else {
            return Err(ControlError::Unexpected {
                message: "registered",
                state: self.state.name(),
            });
        };
        self.outbox.push_back(wrap(Msg::Registered(registered)));
        self.activate(now);
        Ok(())
    }

    /// Server side: tells the agent its new port policy (only to an agent that announced
    /// [`proto::Capability::PortPolicy`]). Dropped before registration completes: the
    /// registration carries the policy of its own time.
    pub fn push_port_policy(&mut self, policy: &route::PortPolicy) {
        if self.agent || !matches!(self.state, State::Active | State::Draining) {
            return;
        }
        // A policy queued but not yet sent is stale now: only the latest counts.
        self.outbox
            .retain(|m| !matches!(m.msg, Some(Msg::PortPolicy(_))));
        self.outbox
            .push_back(wrap(Msg::PortPolicy(proto::PortPolicy::from_policy(
                policy,
            ))));
    }

    /// Server side, gRPC transport: asks the agent for a stream. Also while draining: an
    /// opener that checked the link just before the go-away still gets its stream (new opens
    /// are refused by the session, which sees the draining state).
    pub fn request_stream(&mut self, request: proto::StreamRequest) -> Result<(), ControlError> {
        if self.agent || !matches!(self.state, State::Active | State::Draining) {
            return Err(ControlError::Unexpected {
                message: "stream-request",
                state: self.state.name(),
            });
        }
        self.outbox.push_back(wrap(Msg::StreamRequest(request)));
        Ok(())
    }

    /// Server side, gRPC transport: withdraws a stream request whose client is gone.
    pub fn cancel_stream(&mut self, stream_id: u64) {
        if !self.agent {
            self.outbox
                .push_back(wrap(Msg::StreamCancel(proto::StreamCancel { stream_id })));
        }
    }

    /// Tells the peer that this side accepts no new streams.
    pub fn go_away(&mut self, cause: CloseCause, drain: Duration) {
        if self.state == State::Draining {
            return;
        }
        self.state = State::Draining;
        self.outbox.push_back(wrap(Msg::GoAway(proto::GoAway {
            reason: cause.to_string(),
            drain_ms: u32::try_from(drain.as_millis()).unwrap_or(u32::MAX),
            cause: cause.to_proto().into(),
        })));
    }

    /// Tells the peer that this side ends the link now, and why. The last message: the owner
    /// sends it (best effort) and closes the transport.
    pub fn close(&mut self, cause: CloseCause, detail: &str) {
        self.outbox.push_back(wrap(Msg::Close(proto::Close {
            cause: cause.to_proto().into(),
            detail: detail.chars().take(200).collect(),
        })));
    }

    fn activate(&mut self, now: Instant) {
        self.state = State::Active;
        self.last_heard = now;
        if !self.agent {
            // A first round trip at once: probes need the link's RTT from the start.
            self.ping(now, now + self.config.ping_timeout);
        }
    }

    fn ping(&mut self, now: Instant, deadline: Instant) {
        self.seq += 1;
        self.outbox
            .push_back(wrap(Msg::Ping(proto::Ping { seq: self.seq })));
        self.last_ping = Some((self.seq, now));
        self.outstanding = Some(Outstanding {
            seq: self.seq,
            deadline,
        });
    }

    /// How long this side stays silent before it pings: the server pings on its interval,
    /// the agent only when the server's pings stopped coming.
    fn silence(&self) -> Duration {
        if self.agent {
            self.config.ping_interval + self.config.ping_timeout
        } else {
            self.config.ping_interval
        }
    }

    /// When the next ping is due: after `silence` without hearing from the peer or pinging it.
    fn next_ping(&self) -> Option<Instant> {
        if !matches!(self.state, State::Active | State::Draining) || self.outstanding.is_some() {
            return None;
        }
        let last = match self.last_ping {
            Some((_, sent)) => sent.max(self.last_heard),
            None => self.last_heard,
        };
        Some(last + self.silence())
    }

    /// The smoothed round trip of the control channel, once a ping has been answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt.map(|r| r.smoothed)
    }

    /// The deadline a probe gets: a few round trips on this link, within
    /// `[probe_timeout, ping_timeout]`; `ping_timeout` while the round trip is unknown.
    fn probe_timeout(&self) -> Duration {
        let ceiling = self.config.ping_timeout.max(self.config.probe_timeout);
        match self.rtt {
            Some(r) => {
                ((r.smoothed + r.variation * 4) * 3).clamp(self.config.probe_timeout, ceiling)
            }
            None => ceiling,
        }
    }

    /// A stream open begun at `since` has had no answer: unless the peer was heard from since
    /// then (it is alive; the open is slow for its own reasons), make sure a ping is out with
    /// a deadline of a few round trips. At most one ping is out at a time: probes from many
    /// waiting opens share it.
    /// Returns whether a ping was sent for it.
    pub fn probe(&mut self, now: Instant, since: Instant) -> bool {
        if self.last_heard >= since {
            return false;
        }
        self.check(now, self.probe_timeout())
    }

    /// Makes sure a ping is out whose answer (or anything else from the peer) must come within
    /// `timeout`, or the link is dead. Returns whether a ping was sent for it (a ping already
    /// out only has its deadline brought forward).
    pub fn check(&mut self, now: Instant, timeout: Duration) -> bool {
        if !matches!(self.state, State::Active | State::Draining) {
            return false;
        }
        let deadline = now + timeout;
        match &mut self.outstanding {
            Some(out) => {
                out.deadline = out.deadline.min(deadline);
                false
            }
            None => {
                self.ping(now, deadline);
                true
            }
        }
    }

    /// The next instant at which [`Control::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let register = match self.state {
            State::AwaitRegister { deadline }
            | State::AwaitAccept { deadline }
            | State::AwaitRegistered { deadline } => Some(deadline),
            State::Active | State::Draining => None,
        };
        [
            register,
            self.next_ping(),
            self.outstanding.map(|o| o.deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Acts on every deadline that has passed by `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ControlError> {
        match self.state {
            State::AwaitRegister { deadline }
            | State::AwaitAccept { deadline }
            | State::AwaitRegistered { deadline }
                if now >= deadline =>
            {
                return Err(ControlError::RegisterTimeout);
            }
            _ => {}
        }
        if let Some(out) = self.outstanding
            && now >= out.deadline
        {
            return Err(ControlError::PingTimeout { seq: out.seq });
        }
        if let Some(at) = self.next_ping()
            && now >= at
        {
            self.ping(now, now + self.config.ping_timeout);
        }
        Ok(())
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<proto::Control> {
        self.outbox.pop_front()
    }

    /// The next event for the owner.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

fn wrap(msg: Msg) -> proto::Control {
    proto::Control { msg: Some(msg) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shuttles messages between the two machines until both are quiet.
    fn drive(now: Instant, a: &mut Control, b: &mut Control) -> Result<(), ControlError> {
        loop {
            let mut moved = false;
            while let Some(m) = a.poll_transmit() {
                b.handle_message(now, m)?;
                moved = true;
            }
            while let Some(m) = b.poll_transmit() {
                a.handle_message(now, m)?;
                moved = true;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn register() -> proto::Register {
        proto::Register {
            node_name: "claimed".into(),
            ..Default::default()
        }
    }

    fn registered_pair(now: Instant) -> (Control, Control) {
        let cfg = ControlConfig::default();
        let mut agent = Control::agent(now, cfg.clone(), register());
        let mut server = Control::server(now, cfg);
        drive(now, &mut agent, &mut server).unwrap();
        assert_eq!(
            server.poll_event(),
            Some(Event::RegisterReceived(register()))
        );
        server
            .accept_registration(
                now,
                proto::Registered {
                    node_name: "from-cert".into(),
                    server_id: "s1".into(),
                    ports: None,
                },
            )
            .unwrap();
        drive(now, &mut agent, &mut server).unwrap();
        assert!(
            matches!(agent.poll_event(), Some(Event::Registered(r)) if r.node_name == "from-cert")
        );
        assert!(agent.is_active() && server.is_active());
        (agent, server)
    }

    /// Moves both machines to the earlier of their deadlines and shuttles what they send.
    fn step(now: &mut Instant, agent: &mut Control, server: &mut Control) {
        *now = agent
            .poll_timeout()
            .into_iter()
            .chain(server.poll_timeout())
            .min()
            .unwrap();
        agent.handle_timeout(*now).unwrap();
        server.handle_timeout(*now).unwrap();
        drive(*now, agent, server).unwrap();
    }

    #[test]
    fn an_idle_pair_carries_one_server_ping_per_interval() {
        let start = Instant::now();
        let (mut agent, mut server) = registered_pair(start);
        // The server's first ping, at registration, measured the round trip.
        assert_eq!(server.seq, 1);
        assert_eq!(server.rtt(), Some(Duration::ZERO));
        let mut now = start;
        for _ in 0..10 {
            step(&mut now, &mut agent, &mut server);
        }
        assert_eq!(now, start + Duration::from_secs(50));
        assert_eq!(server.seq, 11);
        // The agent hears the server's pings and so never needs one of its own.
        assert_eq!(agent.seq, 0);
        assert!(agent.outstanding.is_none() && server.outstanding.is_none());
    }

    #[test]
    fn traffic_from_the_peer_postpones_the_ping() {
        let start = Instant::now();
        let (mut agent, mut server) = registered_pair(start);
        let first = server.poll_timeout().unwrap();
        assert_eq!(first, start + Duration::from_secs(5));
        // A go-away from the agent at 4 s is news from it: no ping before 9 s.
        agent.go_away(CloseCause::Shutdown, Duration::from_secs(1));
        drive(start + Duration::from_secs(4), &mut agent, &mut server).unwrap();
        assert_eq!(server.poll_timeout(), Some(start + Duration::from_secs(9)));
    }

    #[test]
    fn silent_agent_is_declared_dead_after_interval_plus_timeout() {
        let start = Instant::now();
        let (_agent, mut server) = registered_pair(start);
        let ping_at = server.poll_timeout().unwrap();
        assert_eq!(ping_at, start + Duration::from_secs(5));
        server.handle_timeout(ping_at).unwrap();
        assert!(matches!(
            server.poll_transmit().and_then(|m| m.msg),
            Some(Msg::Ping(_))
        ));
        let dead_at = server.poll_timeout().unwrap();
        assert_eq!(dead_at, start + Duration::from_secs(9));
        assert_eq!(
            server.handle_timeout(dead_at),
            Err(ControlError::PingTimeout { seq: 2 })
        );
    }

    #[test]
    fn agent_pings_only_when_the_server_falls_silent() {
        let start = Instant::now();
        let (mut agent, _server) = registered_pair(start);
        let ping_at = agent.poll_timeout().unwrap();
        assert_eq!(ping_at, start + Duration::from_secs(9));
        agent.handle_timeout(ping_at).unwrap();
        let dead_at = agent.poll_timeout().unwrap();
        assert_eq!(dead_at, start + Duration::from_secs(13));
        assert_eq!(
            agent.handle_timeout(dead_at),
            Err(ControlError::PingTimeout { seq: 1 })
        );
    }

    #[test]
    fn a_probe_finds_a_silent_peer_within_a_few_round_trips() {
        let start = Instant::now();
        let (mut agent, mut server) = registered_pair(start);
        // A 100 ms round trip at the next ping.
        let mut now = start + Duration::from_secs(5);
        server.handle_timeout(now).unwrap();
        let ping = server.poll_transmit().unwrap();
        agent.handle_message(now, ping).unwrap();
        now += Duration::from_millis(100);
        server
            .handle_message(now, agent.poll_transmit().unwrap())
            .unwrap();
        let rtt = server.rtt().unwrap();
        assert!(
            rtt > Duration::ZERO && rtt < Duration::from_millis(100),
            "{rtt:?}"
        );
        // An open begun at 6 s waits; the agent has been heard at 5.1 s only.
        let since = start + Duration::from_secs(6);
        now = since + Duration::from_millis(500);
        assert!(server.probe(now, since));
        assert!(matches!(
            server.poll_transmit().and_then(|m| m.msg),
            Some(Msg::Ping(_))
        ));
        // The floor, 1 s, for a short round trip; far before the regular 4 s.
        let dead_at = server.poll_timeout().unwrap();
        assert_eq!(dead_at, now + Duration::from_secs(1));
        assert!(matches!(
            server.handle_timeout(dead_at),
            Err(ControlError::PingTimeout { .. })
        ));
    }

    #[test]
    fn probes_share_one_ping_and_spare_a_peer_heard_since_the_open_began() {
        let start = Instant::now();
        let (_agent, mut server) = registered_pair(start);
        // The agent answered the registration ping at `start`: an open begun then is slow for
        // its own reasons.
        assert!(!server.probe(start + Duration::from_secs(1), start));
        assert!(server.poll_transmit().is_none());
        assert_eq!(server.poll_timeout(), Some(start + Duration::from_secs(5)));
        // A younger open probes: one ping, with the 1 s floor as its deadline.
        server.probe(
            start + Duration::from_secs(2),
            start + Duration::from_secs(1),
        );
        assert!(matches!(
            server.poll_transmit().and_then(|m| m.msg),
            Some(Msg::Ping(_))
        ));
        assert_eq!(server.poll_timeout(), Some(start + Duration::from_secs(3)));
        // Another waiting open shares that ping and keeps the earlier deadline.
        assert!(!server.probe(
            start + Duration::from_millis(2500),
            start + Duration::from_secs(2),
        ));
        assert!(server.poll_transmit().is_none());
        assert_eq!(server.poll_timeout(), Some(start + Duration::from_secs(3)));
    }

    #[test]
    fn a_long_round_trip_gives_probes_longer() {
        let start = Instant::now();
        let mut server = Control::server(start, ControlConfig::default());
        server.state = State::Active;
        server.rtt = Some(Rtt {
            smoothed: Duration::from_millis(600),
            variation: Duration::from_millis(50),
        });
        assert_eq!(server.probe_timeout(), Duration::from_millis(2400));
        server.rtt = Some(Rtt {
            smoothed: Duration::from_secs(2),
            variation: Duration::ZERO,
        });
        assert_eq!(server.probe_timeout(), Duration::from_secs(4));
    }

    #[test]
    fn registration_must_happen_in_time_and_in_order() {
        let now = Instant::now();
        let mut server = Control::server(now, ControlConfig::default());
        assert_eq!(server.poll_timeout(), Some(now + Duration::from_secs(10)));
        assert_eq!(
            server.handle_timeout(now + Duration::from_secs(10)),
            Err(ControlError::RegisterTimeout)
        );

        let mut server = Control::server(now, ControlConfig::default());
        let ping = wrap(Msg::Ping(proto::Ping { seq: 1 }));
        assert_eq!(
            server.handle_message(now, ping),
            Err(ControlError::Unexpected {
                message: "ping",
                state: "await-register"
            })
        );
        let mut agent = Control::agent(now, ControlConfig::default(), register());
        assert!(
            agent
                .handle_message(now, wrap(Msg::Register(register())))
                .is_err()
        );
        assert_eq!(
            agent.handle_message(now, proto::Control { msg: None }),
            Err(ControlError::Empty)
        );
    }

    #[test]
    fn port_policies_reach_the_agent_latest_first_and_bad_ones_close() {
        let now = Instant::now();
        let policy = |ports: &[u16]| route::PortPolicy {
            node: route::PortSet::new(ports.iter().copied()),
            loopback: route::PortSet::new([10250]),
        };
        // Before registration there is nothing to push to.
        let mut early = Control::server(now, ControlConfig::default());
        early.push_port_policy(&policy(&[1]));
        assert_eq!(early.poll_transmit(), None);

        let (mut agent, mut server) = registered_pair(now);
        server.push_port_policy(&policy(&[9100]));
        server.push_port_policy(&policy(&[9100, 9051]));
        drive(now, &mut agent, &mut server).unwrap();
        assert_eq!(
            agent.poll_event(),
            Some(Event::PortPolicy(policy(&[9051, 9100])))
        );
        assert_eq!(agent.poll_event(), None, "the stale policy was never sent");

        // An agent never pushes one, and one with a port out of range is a protocol error.
        agent.push_port_policy(&policy(&[1]));
        assert_eq!(agent.poll_transmit(), None);
        let bad = wrap(Msg::PortPolicy(proto::PortPolicy {
            node_ports: vec![70_000],
            loopback_ports: vec![],
        }));
        assert!(matches!(
            agent.handle_message(now, bad.clone()),
            Err(ControlError::Invalid(_))
        ));
        assert!(matches!(
            server.handle_message(now, bad),
            Err(ControlError::Unexpected { .. })
        ));
    }

    #[test]
    fn go_away_reaches_the_peer_and_pings_go_on() {
        let mut now = Instant::now();
        let (mut agent, mut server) = registered_pair(now);
        server.go_away(CloseCause::Shutdown, Duration::from_secs(30));
        drive(now, &mut agent, &mut server).unwrap();
        assert_eq!(
            agent.poll_event(),
            Some(Event::GoAway {
                cause: CloseCause::Shutdown,
                drain: Duration::from_secs(30)
            })
        );
        assert!(agent.is_draining() && server.is_draining());
        step(&mut now, &mut agent, &mut server);
        step(&mut now, &mut agent, &mut server);
        assert!(agent.outstanding.is_none() && server.outstanding.is_none());
    }

    #[test]
    fn close_carries_its_cause_in_any_state() {
        let now = Instant::now();
        let mut server = Control::server(now, ControlConfig::default());
        server.close(CloseCause::Refused, "no identity");
        let mut agent = Control::agent(now, ControlConfig::default(), register());
        let msg = server.poll_transmit().unwrap();
        // Before registration completed: a refusal must still be heard.
        agent.handle_message(now, msg).unwrap();
        assert_eq!(
            agent.poll_event(),
            Some(Event::Closed {
                cause: CloseCause::Refused,
                detail: "no identity".into()
            })
        );
        let (mut agent, mut server) = registered_pair(now);
        agent.close(CloseCause::Shutdown, "");
        drive(now, &mut agent, &mut server).unwrap();
        assert_eq!(
            server.poll_event(),
            Some(Event::Closed {
                cause: CloseCause::Shutdown,
                detail: String::new()
            })
        );
    }

    #[test]
    fn stream_requests_go_only_from_server_to_agent() {
        let now = Instant::now();
        let (mut agent, mut server) = registered_pair(now);
        let request = proto::StreamRequest {
            stream_id: 7,
            open: None,
        };
        assert!(agent.request_stream(request.clone()).is_err());
        server.request_stream(request.clone()).unwrap();
        server.cancel_stream(7);
        drive(now, &mut agent, &mut server).unwrap();
        assert_eq!(agent.poll_event(), Some(Event::StreamRequested(request)));
        assert_eq!(agent.poll_event(), Some(Event::StreamCancelled(7)));
        // An agent that sends a request breaks the protocol.
        let bad = wrap(Msg::StreamRequest(proto::StreamRequest::default()));
        assert!(matches!(
            server.handle_message(now, bad),
            Err(ControlError::Unexpected { .. })
        ));
    }

    #[test]
    fn ping_flood_is_an_error_not_unbounded_memory() {
        let now = Instant::now();
        let (_agent, mut server) = registered_pair(now);
        let mut result = Ok(());
        for seq in 0..1000 {
            result = server.handle_message(now, wrap(Msg::Ping(proto::Ping { seq })));
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ControlError::Flood));
        assert!(server.outbox.len() <= MAX_OUTBOX);
    }
}
