//! The port configuration in force, and `--config-dir`: ConfigMap
//! `kube-system/edge-tunnel-server-cfg` mounted as a directory (one file per key), reloaded
//! when it changes.
//!
//! The kubelet updates such a mount by writing a new hidden directory and swapping the
//! `..data` symlink, so the keys change all at once. The directory is watched (inotify) and
//! also read again every [`POLL`], which covers a directory that was removed and made again
//! (its watch goes with it). A value that does not parse is reported with its key and item,
//! counted, and changes nothing: the last good configuration stays in force. Streams in
//! flight are never touched by a change; it applies to the next ones.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::Watcher;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use tunnel_core::route::config::{
    FixedPorts, HTTPS_PROXY_PORTS, KEYS, PortConfigError, PortProblem,
};
use tunnel_core::{PortConfig, PortPolicy, PortSet};

/// How often the directory is read again whatever the watch says.
pub const POLL: Duration = Duration::from_secs(5);
/// Largest value file read. A port list of every port would take about 400 KiB; a real one
/// takes a few bytes.
pub const MAX_VALUE_BYTES: u64 = 64 * 1024;
/// How long to let a burst of file events settle before reading (a symlink swap is several).
const SETTLE: Duration = Duration::from_millis(100);

/// Why `--config-dir` could not be read, or its values are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigDirError {
    /// The directory cannot be listed (gone, not a directory, no permission).
    #[error("cannot read --config-dir {dir}: {why}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The system's word for it.
        why: String,
    },
    /// A key's file cannot be read.
    #[error("--config-dir {dir}: cannot read key {key}: {why}")]
    Key {
        /// The directory.
        dir: PathBuf,
        /// The key (file name).
        key: String,
        /// The system's word for it, or what is wrong with the bytes.
        why: String,
    },
    /// A value is malformed.
    #[error("--config-dir {dir}: {source}")]
    Invalid {
        /// The directory.
        dir: PathBuf,
        /// The key and the bad item.
        #[source]
        source: PortConfigError,
    },
}

/// The key files of a config directory: name → content. Hidden entries (the kubelet's `..data`
/// and timestamped directories) and directories are not keys.
pub fn read_dir(dir: &Path) -> Result<BTreeMap<String, String>, ConfigDirError> {
    let dir_error = |e: std::io::Error| ConfigDirError::Dir {
        dir: dir.to_owned(),
        why: e.to_string(),
    };
    let mut values = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let entry = entry.map_err(dir_error)?;
        let Some(key) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if key.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let key_error = |why: String| ConfigDirError::Key {
            dir: dir.to_owned(),
            key: key.clone(),
            why,
        };
        // Follows the symlink into `..data`; a dangling one (mid-swap) is an error this time
        // and the next read sees the new target.
        let meta = std::fs::metadata(&path).map_err(|e| key_error(e.to_string()))?;
        if !meta.is_file() {
            continue;
        }
        if !KEYS.contains(&key.as_str()) {
            values.insert(key, String::new());
            continue;
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_VALUE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| key_error(e.to_string()))?;
        if bytes.len() as u64 > MAX_VALUE_BYTES {
            return Err(key_error(format!("larger than {MAX_VALUE_BYTES} bytes")));
        }
        let value = String::from_utf8(bytes).map_err(|_| key_error("not UTF-8".into()))?;
        values.insert(key, value);
    }
    Ok(values)
}

/// What a configuration is checked against besides its own consistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The HTTP front's port and the kubelet's ports.
    pub fixed: FixedPorts,
    /// The server's own listener ports: an https-proxy port cannot listen on one of them.
    pub reserved: PortSet,
}

/// Parses what [`read_dir`] read.
pub fn parse(
    dir: &Path,
    values: &BTreeMap<String, String>,
    rules: &Rules,
) -> Result<PortConfig, ConfigDirError> {
    let invalid = |source| ConfigDirError::Invalid {
        dir: dir.to_owned(),
        source,
    };
    let config = PortConfig::parse(
        values.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        rules.fixed,
    )
    .map_err(invalid)?;
    if let Some(port) = config
        .https_proxy_ports()
        .iter()
        .find(|p| rules.reserved.contains(*p))
    {
        return Err(invalid(PortConfigError {
            key: HTTPS_PROXY_PORTS,
            problem: PortProblem::Taken {
                port,
                what: "one of the server's own listeners",
            },
        }));
    }
    Ok(config)
}

/// The outcome of the last reload, for the meta page.
#[derive(Debug, Clone, Default)]
struct Status {
    /// Seconds since the epoch of the last reload that found a change.
    at: u64,
    /// Its error, if it failed.
    error: Option<String>,
    /// Keys in the directory that are not ours.
    unknown_keys: Vec<String>,
}

/// The port configuration in force and what follows it: the fronts read it, the agents'
/// policy is derived from it. An embedding program without a config directory changes it with
/// [`set`](Self::set).
#[derive(Debug)]
pub struct Ports {
    config: watch::Sender<Arc<PortConfig>>,
    policy: watch::Sender<PortPolicy>,
    source: Option<PathBuf>,
    status: Mutex<Status>,
}

impl Ports {
    pub(crate) fn new(config: PortConfig, source: Option<PathBuf>) -> Self {
        for result in ["ok", "error"] {
            metrics::counter!("edge_tunnel_server_config_reloads_total", "result" => result)
                .absolute(0);
        }
        metrics::gauge!("edge_tunnel_server_config_last_reload_successful").set(1.0);
        Self {
            policy: watch::Sender::new(config.policy()),
            config: watch::Sender::new(Arc::new(config)),
            source,
            status: Mutex::new(Status::default()),
        }
    }

    /// The configuration in force now.
    pub fn current(&self) -> Arc<PortConfig> {
        self.config.borrow().clone()
    }

    /// Puts `config` in force: the next streams follow it, and the agents are told.
    pub fn set(&self, config: PortConfig) {
        // Under the configuration's own lock, so that two callers (an embedding program and
        // the directory's follower) cannot leave the policy describing the other's config.
        self.config.send_if_modified(|current| {
            if **current == config {
                return false;
            }
            info!(ports = %config, served = %config.served(), "port configuration in force");
            let policy = config.policy();
            self.policy.send_if_modified(|p| {
                let changed = *p != policy;
                *p = policy;
                changed
            });
            *current = Arc::new(config);
            true
        });
    }

    /// Follows the configuration in force.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<PortConfig>> {
        self.config.subscribe()
    }

    /// Follows the policy the agents are told.
    pub(crate) fn policy(&self) -> watch::Receiver<PortPolicy> {
        self.policy.subscribe()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `config` in force (if it differs) and records a successful reload.
    fn apply(&self, config: PortConfig, unknown_keys: Vec<String>) {
        metrics::counter!("edge_tunnel_server_config_reloads_total", "result" => "ok").increment(1);
        metrics::gauge!("edge_tunnel_server_config_last_reload_successful").set(1.0);
        if !unknown_keys.is_empty() {
            warn!(keys = ?unknown_keys, "config directory has keys edge-tunnel does not read");
        }
        *self.status() = Status {
            at: unix_now(),
            error: None,
            unknown_keys,
        };
        if **self.config.borrow() == config {
            info!(ports = %config, "port configuration reloaded: unchanged");
        }
        self.set(config);
    }

    /// Records a failed reload: the configuration in force stays.
    fn reject(&self, e: &ConfigDirError) {
        metrics::counter!("edge_tunnel_server_config_reloads_total", "result" => "error")
            .increment(1);
        metrics::gauge!("edge_tunnel_server_config_last_reload_successful").set(0.0);
        error!(error = %e, in_force = %self.current(), "port configuration not reloaded; the last good one stays in force");
        let mut status = self.status();
        status.at = unix_now();
        status.error = Some(e.to_string());
    }

    /// The meta page `/config`: the configuration in force, where it comes from, the last
    /// reload.
    pub(crate) fn page(&self) -> serde_json::Value {
        let config = self.current();
        let policy = config.policy();
        let values: serde_json::Map<String, serde_json::Value> = config
            .values()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        let status = self.status().clone();
        serde_json::json!({
            "source": self.source.as_ref().map(|p| p.display().to_string()),
            "in_force": values,
            "served_ports": config.served().iter().collect::<Vec<_>>(),
            "agent_policy": {
                "node_ports": policy.node.iter().collect::<Vec<_>>(),
                "loopback_ports": policy.loopback.iter().collect::<Vec<_>>(),
            },
            "last_reload": {
                "unix_seconds": status.at,
                "result": if status.error.is_some() { "error" } else { "ok" },
                "error": status.error,
                "unknown_keys": status.unknown_keys,
            },
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unknown_keys(values: &BTreeMap<String, String>) -> Vec<String> {
    values
        .keys()
        .filter(|k| !KEYS.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// What a directory read found, to compare the next read with.
pub(crate) type Snapshot = Result<BTreeMap<String, String>, ConfigDirError>;

/// Reads `dir` once, for startup: an unusable directory or value is an error.
pub(crate) fn load(dir: &Path, rules: &Rules) -> Result<(Ports, Snapshot), ConfigDirError> {
    let values = read_dir(dir)?;
    let config = parse(dir, &values, rules)?;
    let keys = unknown_keys(&values);
    if !keys.is_empty() {
        warn!(?keys, "config directory has keys edge-tunnel does not read");
    }
    info!(dir = %dir.display(), ports = %config, served = %config.served(), "port configuration in force");
    let ports = Ports::new(config, Some(dir.to_owned()));
    ports.status().unknown_keys = keys;
    ports.status().at = unix_now();
    Ok((ports, Ok(values)))
}

/// Watches `dir` and reloads `ports` on every change until `stop` turns true. `last` is what
/// the startup read found.
pub(crate) async fn follow(
    dir: PathBuf,
    rules: Rules,
    ports: Arc<Ports>,
    mut last: Snapshot,
    mut stop: watch::Receiver<bool>,
) {
    let (events_tx, mut events) = mpsc::channel::<()>(1);
    let mut watcher = watch_dir(&dir, &events_tx);
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(()) = events.recv() => {
                tokio::time::sleep(SETTLE).await;
                while events.try_recv().is_ok() {}
            }
            _ = poll.tick() => {}
            () = crate::stopped(&mut stop) => return,
        }
        // A few small files, but a slow or hung filesystem must not hold a runtime worker.
        let read = {
            let path = dir.clone();
            match tokio::task::spawn_blocking(move || read_dir(&path)).await {
                Ok(read) => read,
                Err(e) => Err(ConfigDirError::Dir {
                    dir: dir.clone(),
                    why: format!("the read failed: {e}"),
                }),
            }
        };
        if read == last {
            continue;
        }
        match &read {
            Ok(values) => match parse(&dir, values, &rules) {
                Ok(config) => ports.apply(config, unknown_keys(values)),
                Err(e) => ports.reject(&e),
            },
            Err(e) => ports.reject(e),
        }
        // A directory made again has lost its watch: watch the new one.
        if read.is_ok() && (last.is_err() || watcher.is_none()) {
            watcher = watch_dir(&dir, &events_tx);
        }
        last = read;
    }
}

/// An inotify watch on `dir` that nudges `events`; `None` (and the poll alone) when the system
/// refuses one.
fn watch_dir(dir: &Path, events: &mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let events = events.clone();
    let watcher = notify::recommended_watcher(move |_: notify::Result<notify::Event>| {
        // Full means a nudge is already pending.
        let _ = events.try_send(());
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reading it every {}s", POLL.as_secs());
            return None;
        }
    };
    match watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reading it every {}s", POLL.as_secs());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            fixed: FixedPorts::default(),
            reserved: PortSet::new([10262, 10263, 10264, 10265]),
        }
    }

    #[test]
    fn an_https_proxy_port_cannot_take_one_of_the_servers_own() {
        let dir = Path::new("/cfg");
        let values = BTreeMap::from([("https-proxy-ports".to_owned(), "9052, 10263".to_owned())]);
        let err = parse(dir, &values, &rules()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--config-dir /cfg: https-proxy-ports: port 10263 is taken by one of the server's own listeners: the server listens on each https-proxy port itself"
        );
    }

    #[test]
    fn reads_a_kubelet_style_mount() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_12_01_10_00_00.1");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("http-proxy-ports"), "9051, 9100").unwrap();
        std::fs::write(data.join("other-key"), "x").unwrap();
        std::os::unix::fs::symlink(&data, dir.path().join("..data")).unwrap();
        for key in ["http-proxy-ports", "other-key"] {
            std::os::unix::fs::symlink(Path::new("..data").join(key), dir.path().join(key))
                .unwrap();
        }
        let values = read_dir(dir.path()).unwrap();
        assert_eq!(
            values.keys().collect::<Vec<_>>(),
            ["http-proxy-ports", "other-key"]
        );
        assert_eq!(unknown_keys(&values), ["other-key"]);
        let config = parse(dir.path(), &values, &rules()).unwrap();
        assert!(config.serves(9100) && config.serves(9051));
    }

    #[test]
    fn bad_directories_and_values_say_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        assert!(matches!(read_dir(&gone), Err(ConfigDirError::Dir { .. })));
        std::fs::write(dir.path().join("https-proxy-ports"), [0xff, 0xfe]).unwrap();
        let err = read_dir(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("cannot read key https-proxy-ports: not UTF-8"),
            "{err}"
        );
        std::fs::write(
            dir.path().join("https-proxy-ports"),
            vec![b'1'; MAX_VALUE_BYTES as usize + 1],
        )
        .unwrap();
        let err = read_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("larger than 65536 bytes"), "{err}");
        std::fs::write(dir.path().join("https-proxy-ports"), "9052,x").unwrap();
        let values = read_dir(dir.path()).unwrap();
        let err = parse(dir.path(), &values, &rules()).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("https-proxy-ports: invalid port \"x\": a number from 1 to 65535"),
            "{err}"
        );
        // A dangling key (the kubelet mid-swap) is an error for this read only.
        std::fs::remove_file(dir.path().join("https-proxy-ports")).unwrap();
        std::os::unix::fs::symlink("..data/nowhere", dir.path().join("http-proxy-ports")).unwrap();
        assert!(matches!(
            read_dir(dir.path()),
            Err(ConfigDirError::Key { .. })
        ));
    }

    #[test]
    fn a_rejected_reload_keeps_the_config_and_policy_in_force() {
        let fixed = FixedPorts::default();
        let first = PortConfig::parse([("http-proxy-ports", "9100")], fixed).unwrap();
        let ports = Ports::new(first.clone(), None);
        let policy = ports.policy();
        ports.reject(&ConfigDirError::Dir {
            dir: "/x".into(),
            why: "gone".into(),
        });
        assert_eq!(*ports.current(), first);
        assert!(!policy.has_changed().unwrap());
        assert_eq!(ports.page()["last_reload"]["result"], "error");

        let second = PortConfig::parse([("http-proxy-ports", "9101")], fixed).unwrap();
        ports.apply(second.clone(), vec![]);
        assert_eq!(*ports.current(), second);
        assert!(policy.has_changed().unwrap());
        let page = ports.page();
        assert_eq!(page["last_reload"]["result"], "ok");
        assert_eq!(page["in_force"]["http-proxy-ports"], "9101");
    }
}
