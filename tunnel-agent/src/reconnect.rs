//! When to connect again: exponential backoff with jitter, reset only by a session that lasted;
//! and, right after a working link was lost, short and frequent attempts, so that the agent is
//! back within seconds of the path coming back.

use std::time::Duration;

use tokio::time::Instant;
use tunnel_core::CloseCause;

use crate::config::Backoff;

/// A session that lasted this long counts as healthy for the reconnect backoff.
pub(crate) const STABLE_SESSION: Duration = Duration::from_secs(30);

/// A session that lasted this long and was then lost puts the agent in recovery. Finding a
/// silent server takes longer than this, so a partition always qualifies; a server that drops
/// links as soon as they come up does not.
pub(crate) const RECOVERY_MIN_SESSION: Duration = Duration::from_secs(10);

/// How long recovery lasts after the loss; then the backoff applies again.
pub(crate) const RECOVERY_WINDOW: Duration = Duration::from_secs(120);

/// The pause between attempts in recovery, uniformly spread over this range. With attempts
/// of ~2 s, each agent tries every ~2.6 s and a crowd of agents arrives spread over that
/// period when the path comes back, not in one burst.
const RECOVERY_PAUSE: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(1));

/// The shortest attempt in recovery. A QUIC Initial or a TCP SYN lost in the partition is sent
/// again after about a second: an attempt this long has one retransmission to catch the path
/// coming back, and the next attempt follows soon after.
const RECOVERY_ATTEMPT: Duration = Duration::from_secs(2);

/// After a stateless reset (the server restarted and is up), the next attempt starts within
/// this, uniformly spread so that the agents of a restarted server do not all arrive at once.
const RESET_PAUSE: Duration = Duration::from_millis(250);

/// Stateless resets in a row that are answered at once; after that the backoff applies, so
/// that a server that keeps forgetting us is not hammered.
const RESET_FAST_RETRIES: u32 = 3;

/// The agent's reconnect state: how many attempts failed in a row, since when the current
/// session is up, and whether a lost link is being recovered.
#[derive(Debug)]
pub(crate) struct Reconnect {
    backoff: Backoff,
    failures: u32,
    up_since: Option<Instant>,
    /// Until when attempts are short and frequent.
    recovering_until: Option<Instant>,
    /// How long the last successful connect took.
    last_connect: Duration,
}

impl Reconnect {
    pub(crate) fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            failures: 0,
            up_since: None,
            recovering_until: None,
            last_connect: Duration::ZERO,
        }
    }

    /// A session came up after a connect that took `took`.
    pub(crate) fn connected(&mut self, took: Duration) {
        self.up_since = Some(Instant::now());
        self.last_connect = took;
        self.recovering_until = None;
    }

    fn recovering(&self) -> bool {
        self.recovering_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// The time an attempt may take before the agent gives up on it and tries again: in
    /// recovery a few times what the last connect took, at least [`RECOVERY_ATTEMPT`]; `None`
    /// otherwise (the connector's own handshake timeouts apply).
    pub(crate) fn attempt_timeout(&self) -> Option<Duration> {
        self.recovering()
            .then(|| (self.last_connect * 3).max(RECOVERY_ATTEMPT))
    }

    /// An attempt failed (or a session ended badly): the delay before the next one, `unit` (in
    /// 0..1) choosing the jitter. Each failure in a row waits longer, up to the cap; in
    /// recovery the pause is short whatever the count.
    pub(crate) fn failed(&mut self, unit: f64) -> Duration {
        self.up_since = None;
        let delay = if self.recovering() {
            let (low, high) = RECOVERY_PAUSE;
            low + (high - low).mul_f64(unit.clamp(0.0, 1.0))
        } else {
            self.backoff.delay(self.failures, unit)
        };
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The session ended with a stateless reset: the server restarted, and it is reachable
    /// now. The next attempt follows at once (within [`RESET_PAUSE`]) rather than after the
    /// backoff, unless resets keep coming ([`RESET_FAST_RETRIES`] in a row without a session
    /// that lasted).
    pub(crate) fn reset_by_server(&mut self, unit: f64) -> Duration {
        let failures = self.failures;
        let backoff = self.ended(CloseCause::Transport, false, unit);
        if failures < RESET_FAST_RETRIES || self.failures == 1 {
            return RESET_PAUSE.mul_f64(unit.clamp(0.0, 1.0));
        }
        backoff.unwrap_or_default()
    }

    /// The session ended for `cause`. Only a session that lasted resets the backoff: two
    /// agents with one certificate, replacing each other, must not flap every second. A
    /// session that lasted a while and ended because the path or the server went away (not
    /// a refusal, not a replacement) starts recovery. `moving`: the server asked us to go
    /// (go-away); after a session that lasted we go at once (`None`), otherwise the pause
    /// before the next attempt applies.
    pub(crate) fn ended(&mut self, cause: CloseCause, moving: bool, unit: f64) -> Option<Duration> {
        let lasted = self
            .up_since
            .take()
            .map_or(Duration::ZERO, |since| since.elapsed());
        let path_lost = matches!(
            cause,
            CloseCause::PingDeadline
                | CloseCause::IdleTimeout
                | CloseCause::Transport
                | CloseCause::Shutdown
                | CloseCause::GoAway
        );
        if path_lost && lasted >= RECOVERY_MIN_SESSION {
            self.recovering_until = Some(Instant::now() + RECOVERY_WINDOW);
        }
        if lasted >= STABLE_SESSION {
            self.failures = 0;
            if moving {
                return None;
            }
        }
        Some(self.failed(unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconnect() -> Reconnect {
        Reconnect::new(Backoff::default())
    }

    #[tokio::test(start_paused = true)]
    async fn a_stateless_reset_reconnects_at_once_a_few_times_then_backs_off() {
        let mut r = reconnect();
        // A short session: no recovery, and the backoff would be a second or more.
        for _ in 0..RESET_FAST_RETRIES {
            r.connected(Duration::from_millis(20));
            tokio::time::advance(Duration::from_secs(5)).await;
            assert!(r.reset_by_server(1.0) <= RESET_PAUSE);
        }
        // A server that keeps forgetting us gets the backoff.
        r.connected(Duration::from_millis(20));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(r.reset_by_server(0.5) >= Duration::from_secs(1));
        // A session that lasted starts the count again.
        r.connected(Duration::from_millis(20));
        tokio::time::advance(STABLE_SESSION).await;
        assert!(r.reset_by_server(1.0) <= RESET_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_back_off_to_the_cap() {
        let mut r = reconnect();
        // The middle of the jitter range: the base delays themselves.
        let delays: Vec<_> = (0..10).map(|_| r.failed(0.5)).collect();
        assert_eq!(delays[0], Duration::from_secs(1));
        assert_eq!(delays[1], Duration::from_secs_f64(1.6));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays[9], Duration::from_secs(30));
        // Jitter stays within ±20 %.
        assert_eq!(r.failed(0.0), Duration::from_secs(24));
        assert_eq!(r.failed(1.0), Duration::from_secs(36));
        assert_eq!(r.attempt_timeout(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_lasted_resets_the_backoff() {
        let mut r = reconnect();
        for _ in 0..5 {
            r.failed(0.5);
        }
        r.connected(Duration::from_millis(20));
        tokio::time::advance(STABLE_SESSION).await;
        // Refused: no recovery, the backoff from its start.
        assert_eq!(
            r.ended(CloseCause::Refused, false, 0.5),
            Some(Duration::from_secs(1))
        );
        assert_eq!(r.attempt_timeout(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_session_keeps_backing_off() {
        let mut r = reconnect();
        r.failed(0.5);
        r.failed(0.5);
        r.connected(Duration::from_millis(20));
        tokio::time::advance(Duration::from_secs(5)).await;
        // Replaced again and again by a twin with our certificate: no reset, longer waits.
        assert_eq!(
            r.ended(CloseCause::Replaced, true, 0.5),
            Some(Duration::from_secs_f64(1.6 * 1.6))
        );
        r.connected(Duration::from_millis(20));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            r.ended(CloseCause::Replaced, true, 0.5) > Some(Duration::from_secs_f64(1.6 * 1.6))
        );
        // Nor does a twin that holds on for longer put us in recovery: being replaced is not
        // a lost path.
        r.connected(Duration::from_millis(20));
        tokio::time::advance(STABLE_SESSION).await;
        r.ended(CloseCause::Replaced, false, 0.5);
        assert_eq!(r.attempt_timeout(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_go_away_after_a_session_that_lasted_moves_at_once() {
        let mut r = reconnect();
        r.failed(0.5);
        r.connected(Duration::from_millis(20));
        tokio::time::advance(STABLE_SESSION + Duration::from_secs(1)).await;
        assert_eq!(r.ended(CloseCause::Shutdown, true, 0.5), None);
        // The server is restarting: the next attempts are quick ones.
        assert!(r.failed(0.5) <= RECOVERY_PAUSE.1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_link_is_recovered_with_short_jittered_attempts_then_the_backoff() {
        let mut r = reconnect();
        r.connected(Duration::from_secs(1));
        tokio::time::advance(RECOVERY_MIN_SESSION).await;
        let first = r.ended(CloseCause::PingDeadline, false, 0.0).unwrap();
        assert_eq!(first, RECOVERY_PAUSE.0);
        // Three times the last connect, which took 1 s.
        assert_eq!(r.attempt_timeout(), Some(Duration::from_secs(3)));
        tokio::time::advance(first).await;
        let mut pauses = Vec::new();
        for i in 0.. {
            // An attempt that runs out of time, then the pause.
            tokio::time::advance(Duration::from_secs(3)).await;
            if r.attempt_timeout().is_none() {
                break;
            }
            let pause = r.failed(f64::from(i % 10) / 10.0);
            tokio::time::advance(pause).await;
            pauses.push(pause);
        }
        // About 120 s / 3.6 s.
        assert!((30..=40).contains(&pauses.len()), "{}", pauses.len());
        // Every pause within the range, spread by the jitter: a crowd does not move in step.
        assert!(
            pauses
                .iter()
                .all(|p| *p <= RECOVERY_PAUSE.1 && *p >= RECOVERY_PAUSE.0)
        );
        assert!(pauses.iter().min() < pauses.iter().max());
        // Past the window: the backoff, at its cap after so many failures, and no short attempts.
        assert_eq!(r.attempt_timeout(), None);
        assert_eq!(r.failed(0.5), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_that_dies_at_once_starts_no_recovery() {
        let mut r = reconnect();
        r.connected(Duration::from_millis(20));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            r.ended(CloseCause::Transport, false, 0.5),
            Some(Duration::from_secs(1))
        );
        assert_eq!(r.attempt_timeout(), None);
        // And a quick connect still gets at least the shortest attempt.
        let mut r = reconnect();
        r.connected(Duration::from_millis(5));
        tokio::time::advance(RECOVERY_MIN_SESSION).await;
        r.ended(CloseCause::IdleTimeout, false, 0.5);
        assert_eq!(r.attempt_timeout(), Some(RECOVERY_ATTEMPT));
    }
}
