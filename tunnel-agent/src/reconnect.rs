//! When to connect again: exponential backoff with jitter, reset only by a session that lasted.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Backoff;

/// A session that lasted this long counts as healthy for the reconnect backoff.
pub(crate) const STABLE_SESSION: Duration = Duration::from_secs(30);

/// The agent's reconnect state: how many attempts failed in a row, and since when the current
/// session is up.
#[derive(Debug)]
pub(crate) struct Reconnect {
    backoff: Backoff,
    failures: u32,
    up_since: Option<Instant>,
}

impl Reconnect {
    pub(crate) fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            failures: 0,
            up_since: None,
        }
    }

    /// A session came up.
    pub(crate) fn connected(&mut self) {
        self.up_since = Some(Instant::now());
    }

    /// An attempt failed (or a session ended badly): the delay before the next one, `unit` (in
    /// 0..1) choosing the jitter. Each failure in a row waits longer, up to the cap.
    pub(crate) fn failed(&mut self, unit: f64) -> Duration {
        self.up_since = None;
        let delay = self.backoff.delay(self.failures, unit);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The session ended. Only a session that lasted resets the backoff: two agents with one
    /// certificate, replacing each other, must not flap every second. `moving`: the server
    /// asked us to go (go-away); after a session that lasted we go at once (`None`), otherwise
    /// the backoff applies.
    pub(crate) fn ended(&mut self, moving: bool, unit: f64) -> Option<Duration> {
        let lasted = self
            .up_since
            .take()
            .is_some_and(|since| since.elapsed() >= STABLE_SESSION);
        if lasted {
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
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_lasted_resets_the_backoff() {
        let mut r = reconnect();
        for _ in 0..5 {
            r.failed(0.5);
        }
        r.connected();
        tokio::time::advance(STABLE_SESSION).await;
        assert_eq!(r.ended(false, 0.5), Some(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_session_keeps_backing_off() {
        let mut r = reconnect();
        r.failed(0.5);
        r.failed(0.5);
        r.connected();
        tokio::time::advance(Duration::from_secs(5)).await;
        // Replaced again and again by a twin with our certificate: no reset, longer waits.
        assert_eq!(r.ended(true, 0.5), Some(Duration::from_secs_f64(1.6 * 1.6)));
        r.connected();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(r.ended(true, 0.5) > Some(Duration::from_secs_f64(1.6 * 1.6)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_go_away_after_a_session_that_lasted_moves_at_once() {
        let mut r = reconnect();
        r.failed(0.5);
        r.connected();
        tokio::time::advance(STABLE_SESSION + Duration::from_secs(1)).await;
        assert_eq!(r.ended(true, 0.5), None);
        // The next failure starts from the first delay again.
        assert_eq!(r.failed(0.5), Duration::from_secs(1));
    }
}
