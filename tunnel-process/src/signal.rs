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

/// What both binaries' `main` ends with: a multi-thread runtime running `serve(shutdown)`,
/// where `shutdown` is [`shutdown_signal`]. Fails only when the runtime cannot start.
pub fn run_until_signal<F, Fut>(serve: F) -> std::io::Result<Fut::Output>
where
    F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future,
{
    let runtime = tokio::runtime::Runtime::new()?;
    Ok(runtime.block_on(serve(Box::pin(shutdown_signal()))))
}
