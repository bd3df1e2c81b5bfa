//! The end of a run: work in flight may finish within the drain timeout; what is left then is
//! cut, and the operator is told.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::warn;

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Everything finished within the timeout.
    Finished,
    /// The timeout came first; a warning was logged.
    TimedOut,
}

/// Waits for `work` up to `timeout`. When the timeout comes first, warns that the remaining
/// streams are being closed (closing them is the caller's next step).
pub async fn within(timeout: Duration, work: impl Future<Output = ()>) -> Drained {
    if tokio::time::timeout(timeout, work).await.is_ok() {
        return Drained::Finished;
    }
    warn!(
        timeout = ?timeout,
        "drain timeout reached; closing the remaining streams"
    );
    Drained::TimedOut
}

/// Lets the tasks of `tasks` finish within `timeout` (see [`within`]), then aborts the rest
/// and waits until they are gone.
pub async fn join_set<T: 'static>(tasks: &mut JoinSet<T>, timeout: Duration) -> Drained {
    let drained = within(timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.shutdown().await;
    drained
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_timeout_and_aborts_the_rest() {
        let mut tasks = JoinSet::new();
        tasks.spawn(tokio::time::sleep(Duration::from_secs(1)));
        tasks.spawn(tokio::time::sleep(Duration::from_secs(3600)));
        let start = Instant::now();
        let drained = join_set(&mut tasks, Duration::from_secs(10)).await;
        assert_eq!(drained, Drained::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert!(tasks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn returns_as_soon_as_the_work_is_done() {
        let mut tasks = JoinSet::new();
        tasks.spawn(tokio::time::sleep(Duration::from_secs(1)));
        tasks.spawn(tokio::time::sleep(Duration::from_secs(2)));
        let start = Instant::now();
        let drained = join_set(&mut tasks, Duration::from_secs(10)).await;
        assert_eq!(drained, Drained::Finished);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert!(tasks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn within_times_out_on_a_future() {
        let start = Instant::now();
        let drained = within(Duration::from_secs(5), std::future::pending()).await;
        assert_eq!(drained, Drained::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
