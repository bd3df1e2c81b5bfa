//! Cluster DNS: which address each node name resolves to, where that comes from and who is
//! told.
//!
//! One source makes the [`NodeRecords`]: the Kubernetes Nodes (see `crate::cluster`) or,
//! without a cluster, the agents connected to this replica. It publishes them on a watch
//! channel; each sink follows the channel on its own task: the ConfigMap CoreDNS reads, a
//! hosts file, and the embedded [`Responder`]. A sink that fails keeps the last records it
//! wrote and tries again; it never holds up the source or another sink.

pub mod records;
pub mod responder;
mod setup;

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

pub use records::{NodeRecords, is_cluster_name, is_dns1123_subdomain};
pub use responder::{DnsServer, NODE_TTL, Responder, ResponderError};
pub(crate) use setup::Setup;

use crate::registry::{AgentLink, Registry};
use crate::stopped;

/// The records as the source last published them.
pub type RecordsRx = watch::Receiver<Arc<NodeRecords>>;

/// How long a sink waits before it tries a failed write again (doubling, up to
/// [`MAX_RETRY`]).
pub(crate) const RETRY: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a failed write.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(30);
/// How long a change of the records waits for the rest of its burst before the hosts file is
/// written (see [`Pacing`]).
const HOSTS_SETTLE: Duration = Duration::from_millis(100);
/// Fewest time between two writes of the hosts file.
const HOSTS_INTERVAL: Duration = Duration::from_millis(250);

/// Node names warned about as invalid, at most: a flood of bad names cannot grow memory.
const MAX_WARNED: usize = 1024;

/// Where records go, for `edge_tunnel_server_dns_writes_total{sink}`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sink {
    HostsFile,
    ConfigMap,
}

impl Sink {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::HostsFile => "hosts_file",
            Self::ConfigMap => "configmap",
        }
    }

    /// Counts one write attempt: `written`, `current` (the sink already held these records,
    /// nothing written) or `error`.
    pub(crate) fn count(self, result: &'static str) {
        metrics::counter!("edge_tunnel_server_dns_writes_total", "sink" => self.label(), "result" => result)
            .increment(1);
    }
}

/// The records channel, its metrics registered at zero.
pub(crate) fn channel() -> (watch::Sender<Arc<NodeRecords>>, RecordsRx) {
    for sink in [Sink::HostsFile, Sink::ConfigMap] {
        for result in ["written", "current", "error"] {
            metrics::counter!("edge_tunnel_server_dns_writes_total", "sink" => sink.label(), "result" => result)
                .absolute(0);
        }
    }
    metrics::gauge!("edge_tunnel_server_dns_records").set(0.0);
    watch::channel(Arc::new(NodeRecords::new()))
}

/// Publishes `records` when they differ from the last published, or when `first` (so that the
/// sinks write even an empty set once).
pub(crate) fn publish(tx: &watch::Sender<Arc<NodeRecords>>, records: NodeRecords, first: bool) {
    tx.send_if_modified(|current| {
        if !first && **current == records {
            return false;
        }
        metrics::gauge!("edge_tunnel_server_dns_records").set(records.len() as f64);
        *current = Arc::new(records);
        true
    });
}

/// Warns once per node name that cannot be a DNS name, for at most [`MAX_WARNED`] names.
#[derive(Debug, Default)]
pub(crate) struct InvalidNames(HashSet<String>);

impl InvalidNames {
    pub(crate) fn warn(&mut self, name: &str, what: &str) {
        if self.0.len() < MAX_WARNED && self.0.insert(name.to_owned()) {
            warn!(node = %name.escape_debug(), "{what} has a name that is not a valid DNS-1123 subdomain, or one of cluster DNS's own (.svc, cluster.local); it gets no DNS record");
        }
    }
}

/// The records of a cluster-less server: every node with an agent connected here resolves to
/// `ip` (the address of the tunnel's fronts). Follows the registry until `stop`.
pub(crate) async fn follow_agents<S: AgentLink>(
    registry: Arc<Registry<S>>,
    ip: IpAddr,
    records: watch::Sender<Arc<NodeRecords>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = registry.subscribe();
    let mut invalid = InvalidNames::default();
    let mut first = true;
    loop {
        changes.borrow_and_update();
        let mut next = NodeRecords::new();
        for name in registry.node_names() {
            if !next.insert(&name, ip) {
                invalid.warn(&name, "a connected agent's node");
            }
        }
        publish(&records, next, first);
        first = false;
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = stopped(&mut stop) => return,
        }
    }
}

/// How a sink paces its writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacing {
    /// How long the records must stay unchanged before a change is written (a Node list,
    /// agents arriving together), so that a burst becomes one write.
    pub(crate) settle: Duration,
    /// Fewest time between two writes.
    pub(crate) interval: Duration,
    /// How often to write again (the sink compares) while the records do not change: for a
    /// sink that someone else may change too.
    pub(crate) resync: Option<Duration>,
}

/// Follows the records until `stop` and puts each new set into `sink` with `write`, paced by
/// `pacing`: after the source's first publish, each change waits for the rest of its burst
/// (until `pacing.settle` passes without another, `pacing.interval` at most); a write is followed by `pacing.interval` without another; a failed write is tried
/// again after [`RETRY`], doubling up to [`MAX_RETRY`]. `write` gets the rendered records and
/// answers whether it wrote (false: the sink held them already). `target` names the sink in
/// the log.
pub(crate) async fn drive_sink<W, F, E>(
    sink: Sink,
    target: &str,
    pacing: Pacing,
    mut records: RecordsRx,
    mut stop: watch::Receiver<bool>,
    mut write: W,
) where
    W: FnMut(String) -> F,
    F: Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    // Nothing is written before the source has published.
    tokio::select! {
        changed = records.changed() => if changed.is_err() { return },
        () = stopped(&mut stop) => return,
    }
    let mut written: Option<String> = None;
    let mut retry = RETRY;
    loop {
        // The rest of the burst: until `settle` passes without a change, `interval` at most
        // (a burst that trickles in, as a busy source publishes it, is still one write; a
        // stream of changes is still written at the sink's pace).
        let burst = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(pacing.settle) => break,
                changed = records.changed() => {
                    if changed.is_err() || burst.elapsed() >= pacing.interval {
                        break;
                    }
                }
                () = stopped(&mut stop) => return,
            }
        }
        let content = records.borrow_and_update().render();
        if written.as_deref() == Some(content.as_str()) {
            sink.count("current");
        } else {
            let lines = content.lines().count();
            match write(content.clone()).await {
                Ok(wrote) => {
                    sink.count(if wrote { "written" } else { "current" });
                    if wrote {
                        info!(sink = sink.label(), target, lines, "DNS records written");
                    }
                    written = Some(content);
                    retry = RETRY;
                    tokio::select! {
                        () = tokio::time::sleep(pacing.interval) => {}
                        () = stopped(&mut stop) => return,
                    }
                }
                Err(error) => {
                    sink.count("error");
                    warn!(sink = sink.label(), target, %error, ?retry, "cannot write the DNS records; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(retry) => {}
                        () = stopped(&mut stop) => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            }
        }
        let resync = async {
            match pacing.resync {
                Some(every) => tokio::time::sleep(every).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = records.changed() => if changed.is_err() { return },
            // Someone may have changed the sink: look again, and put the records back.
            () = resync => written = None,
            () = stopped(&mut stop) => return,
        }
    }
}

/// Writes the records to `path` each time they change, until `stop`. The file is replaced
/// whole (a temporary file in the same directory, then a rename), so a reader (CoreDNS's hosts
/// plugin, dnsmasq's `--hostsdir`) never sees half of it. The temporary file's name starts
/// with a dot, which dnsmasq skips.
pub(crate) async fn write_hosts_file(
    path: PathBuf,
    records: RecordsRx,
    stop: watch::Receiver<bool>,
) {
    let target = path.display().to_string();
    let pacing = Pacing {
        settle: HOSTS_SETTLE,
        interval: HOSTS_INTERVAL,
        resync: None,
    };
    drive_sink(Sink::HostsFile, &target, pacing, records, stop, |content| {
        let path = path.clone();
        async move { replace_file(&path, content.as_bytes()).await.map(|()| true) }
    })
    .await;
}

/// The `/dns` meta page: where the records come from and what they are now.
pub(crate) fn page(source: &str, records: &NodeRecords) -> serde_json::Value {
    let names: serde_json::Map<String, serde_json::Value> = records
        .iter()
        .map(|(name, ips)| {
            let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
            (name.to_owned(), ips.into())
        })
        .collect();
    serde_json::json!({
        "source": source,
        "names": records.len(),
        "records": names,
    })
}

/// Replaces `path` with `content` atomically: readers see the old file or the new one.
async fn replace_file(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(".tmp");
    let temp = path.with_file_name(temp_name);
    tokio::fs::write(&temp, content).await?;
    // Readable by a resolver running as another user; nothing secret in it.
    tokio::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o644)).await?;
    if let Err(e) = tokio::fs::rename(&temp, path).await {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tunnel_core::AgentIdentity;

    use super::*;
    use crate::registry::BareLink;

    fn link(id: u64, node: &str) -> BareLink {
        BareLink::new(
            id,
            AgentIdentity {
                node_name: node.into(),
                node_ips: vec![],
            },
        )
    }

    async fn file_becomes(path: &Path, want: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = std::fs::read_to_string(path).ok();
            if now.as_deref() == Some(want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} is {now:?}, not {want:?}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn connected_agents_become_the_hosts_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tunnel-nodes");
        let registry = Arc::new(Registry::<BareLink>::default());
        let (tx, rx) = channel();
        let (stop_tx, stop) = watch::channel(false);
        let writer = tokio::spawn(write_hosts_file(path.clone(), rx, stop.clone()));
        let follower = tokio::spawn(follow_agents(
            registry.clone(),
            "10.96.0.7".parse().unwrap(),
            tx,
            stop,
        ));
        // No agent yet: the file exists, empty, for the resolver to read.
        file_becomes(&path, "").await;
        registry.insert(link(1, "node-b"));
        registry.insert(link(2, "node-a"));
        registry.insert(link(3, "Not_A_DNS_Name"));
        file_becomes(&path, "10.96.0.7\tnode-a\n10.96.0.7\tnode-b\n").await;
        registry.remove(&link(2, "node-a"));
        file_becomes(&path, "10.96.0.7\tnode-b\n").await;
        // The temporary file is renamed over the target, never left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tunnel-nodes"]);
        stop_tx.send(true).unwrap();
        writer.await.unwrap();
        follower.await.unwrap();
    }

    #[tokio::test]
    async fn a_hosts_file_that_cannot_be_written_is_retried_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("not-yet");
        let path = sub.join("tunnel-nodes");
        let (tx, rx) = channel();
        let (_stop_tx, stop) = watch::channel(false);
        let writer = tokio::spawn(write_hosts_file(path.clone(), rx, stop));
        let mut records = NodeRecords::new();
        records.insert("node-a", "10.96.0.7".parse().unwrap());
        publish(&tx, records, true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!path.exists());
        std::fs::create_dir(&sub).unwrap();
        file_becomes(&path, "10.96.0.7\tnode-a\n").await;
        writer.abort();
    }
}
