//! The listeners of `https-proxy-ports`: one TLS front per port, on the same port number of
//! the server, so that the port is known without terminating TLS (the SNI names the node).
//! They open and close as the configuration changes; closing one stops its accepting only,
//! and its connections run on to their end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};
use tunnel_core::{PortConfig, PortSet};

use super::{Fronts, serve_front, sni};

/// How often a port that could not be bound is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// Binds a listener for every https-proxy port of `ports`, for startup: any failure is the
/// caller's error.
pub(crate) async fn bind_all(
    bind: std::net::IpAddr,
    ports: &PortConfig,
) -> Result<BTreeMap<u16, TcpListener>, (u16, std::io::Error)> {
    let mut bound = BTreeMap::new();
    for port in ports.https_proxy_ports().iter() {
        let listener = TcpListener::bind((bind, port))
            .await
            .map_err(|e| (port, e))?;
        bound.insert(port, listener);
    }
    Ok(bound)
}

/// The listeners open now: each with the signal that closes it.
struct Open {
    fronts: Arc<Fronts>,
    stop: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
    closers: BTreeMap<u16, watch::Sender<bool>>,
    tasks: JoinSet<()>,
}

impl Open {
    fn start(&mut self, port: u16, listener: TcpListener) {
        info!(port, "https-proxy port listening");
        let (closer, closed) = watch::channel(false);
        self.tasks.spawn(serve_front(
            listener,
            self.fronts.clone(),
            self.stop.clone(),
            closed,
            self.cut.clone(),
            move |f, tcp, peer, admission| sni::handle(f, tcp, peer, admission, port),
        ));
        self.closers.insert(port, closer);
        self.count();
    }

    /// Closes the listeners of ports not in `want`.
    fn keep(&mut self, want: &PortSet) {
        self.closers.retain(|port, closer| {
            let keep = want.contains(*port);
            if !keep {
                info!(port, "https-proxy port closed (its open connections go on)");
                let _ = closer.send(true);
            }
            keep
        });
        self.count();
    }

    fn count(&self) {
        metrics::gauge!("edge_tunnel_server_https_proxy_listeners").set(self.closers.len() as f64);
    }
}

/// Serves the https-proxy listeners, starting with `bound`, following `config` until `stop`
/// turns true; then waits for their connections to end.
pub(crate) async fn serve(
    fronts: Arc<Fronts>,
    bound: BTreeMap<u16, TcpListener>,
    mut config: watch::Receiver<Arc<PortConfig>>,
    mut stop: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
) {
    let bind = fronts.config.bind_address;
    let mut open = Open {
        fronts,
        stop: stop.clone(),
        cut,
        closers: BTreeMap::new(),
        tasks: JoinSet::new(),
    };
    for (port, listener) in bound {
        open.start(port, listener);
    }
    open.count();
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            _ = retry.tick() => {}
            Some(_) = open.tasks.join_next(), if !open.tasks.is_empty() => continue,
            () = crate::stopped(&mut stop) => break,
        }
        let want = config.borrow_and_update().https_proxy_ports().clone();
        open.keep(&want);
        let missing: Vec<u16> = want
            .iter()
            .filter(|p| !open.closers.contains_key(p))
            .collect();
        for port in missing {
            match TcpListener::bind((bind, port)).await {
                Ok(listener) => open.start(port, listener),
                Err(e) => {
                    warn!(port, error = %e, "cannot listen on an https-proxy port; trying again in {}s", RETRY.as_secs());
                }
            }
        }
    }
    // Draining: every listener hears `stop`; their connections finish or are cut.
    while open.tasks.join_next().await.is_some() {}
}
