//! How a tunnel process learns that it should stop.

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
///
/// Pass it as the `shutdown` future of `tunnel_server::run` or `tunnel_agent::run`.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
