//! A fake Kubernetes API server: plain HTTP/1 on loopback, the core `v1` API of Nodes
//! (cluster-scoped), Services and ConfigMaps (namespaced), and a record of every request.
//!
//! It serves what a kube-rs watcher and a writer send:
//!
//! ```text
//! GET    /api/v1/nodes?limit=500&resourceVersion=0&…   LIST  (limit/continue, fieldSelector
//!                                                             metadata.name=NAME)
//! GET    /api/v1/nodes?watch=true&resourceVersion=N&…  WATCH (newline-delimited events after N,
//!                                                             410 once N is compacted away)
//! GET    /api/v1/namespaces/NS/configmaps/NAME          GET   (404 Status when absent)
//! POST   /api/v1/namespaces/NS/configmaps               create (409 Status when it exists)
//! PATCH  /api/v1/namespaces/NS/services/NAME            application/merge-patch+json only
//! DELETE /api/v1/namespaces/NS/services/NAME
//! ```
//!
//! Not served, with a 4xx `Status` so that a test relying on them fails loudly: PUT, other
//! patch types, label selectors, field selectors other than `metadata.name`, streaming lists
//! (`sendInitialEvents`). No bookmarks are sent.
//!
//! Every change (through the API or [`FakeKube::apply`] / [`FakeKube::delete`]) takes the next
//! resource version and goes into a bounded event log that watches replay from and follow.
//! The test can break the open watches as a dropped connection would
//! ([`FakeKube::break_watches`]), forget the log ([`FakeKube::compact`]), and take the whole
//! server down and up again on the same port ([`FakeKube::stop`], [`FakeKube::restart`]): the
//! objects survive, as etcd's would.
//!
//! Everything is bounded: request bodies, the event log, each watch's queue (a watch that
//! falls behind is ended cleanly, and its client resumes from the log), the number of watches
//! and connections, and the request record.

mod http;
mod path;
mod store;

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ::http::Method;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::http::serve;
use self::path::{Target, query_pairs};
use self::store::{Key, Store};

/// Requests recorded at most; the oldest are forgotten first.
const MAX_RECORDED: usize = 100_000;
/// How long [`FakeKube::restart`] waits for its port to be free again.
const REBIND_FOR: Duration = Duration::from_secs(5);

/// The kinds of object served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Node, cluster-scoped.
    Node,
    /// `v1` Service, namespaced.
    Service,
    /// `v1` ConfigMap, namespaced.
    ConfigMap,
}

impl Kind {
    const ALL: [Self; 3] = [Self::Node, Self::Service, Self::ConfigMap];

    /// The resource name in paths (`nodes`).
    pub fn plural(self) -> &'static str {
        match self {
            Self::Node => "nodes",
            Self::Service => "services",
            Self::ConfigMap => "configmaps",
        }
    }

    /// The `kind` of an object (`Node`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Node => "Node",
            Self::Service => "Service",
            Self::ConfigMap => "ConfigMap",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Node)
    }

    fn from_plural(plural: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.plural() == plural)
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// When it arrived.
    pub at: Instant,
    /// Its method.
    pub method: Method,
    /// Its path with the query, as sent (percent-encoded).
    pub path: String,
    /// Its `Content-Type`, when it has one.
    pub content_type: Option<String>,
    /// Its body (lossy UTF-8; empty when it had none or it was too large).
    pub body: String,
}

impl Recorded {
    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path.split_once('?').map_or(&self.path, |(p, _)| p)
    }

    /// The decoded value of query parameter `key`, when present.
    pub fn query(&self, key: &str) -> Option<String> {
        query_pairs(&self.path)
            .into_iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    /// The kind of object it is about, when the path names one.
    pub fn kind(&self) -> Option<Kind> {
        Target::parse(self.path_only()).map(|t| t.kind)
    }

    /// Whether it is a WATCH (a GET with `watch=true`).
    pub fn is_watch(&self) -> bool {
        self.method == Method::GET && matches!(self.query("watch").as_deref(), Some("true" | "1"))
    }

    /// Whether it is a LIST (a GET of a collection, not a watch).
    pub fn is_list(&self) -> bool {
        self.method == Method::GET
            && !self.is_watch()
            && Target::parse(self.path_only()).is_some_and(|t| t.name.is_none())
    }

    /// Whether it asks for a change (anything but GET).
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if let Some(ct) = &self.content_type {
            write!(f, " [{ct}]")?;
        }
        if !self.body.is_empty() {
            write!(f, " {}", self.body)?;
        }
        Ok(())
    }
}

/// A running (or stopped) fake API server. Its objects and record outlive a
/// [`stop`](Self::stop); dropping it stops it.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakeKube {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeKube")
            .field("addr", &self.addr)
            .field("running", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

impl FakeKube {
    /// Starts an empty API server on 127.0.0.1, port from the kernel.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let server = Some(tokio::spawn(serve(listener, shared.clone())));
        Ok(Self {
            shared,
            addr,
            server,
        })
    }

    /// Where it listens (also while stopped: where it will listen again).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig for this server (`server: http://ADDR`, no credentials) into `dir`;
    /// returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(&path, text).expect("the kubeconfig is written");
        path
    }

    /// Creates or replaces an object (its `metadata.name` is required; a namespaced object
    /// without `metadata.namespace` goes to `default`), as `kubectl apply` would: watches see
    /// ADDED or MODIFIED. Returns the object as stored (with its resource version).
    pub fn apply(&self, kind: Kind, object: Value) -> Value {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("an object to apply has a metadata.name: {object}"))
            .to_owned();
        let key = Key::new(kind, kind.namespaced().then_some(namespace.as_str()), &name);
        self.shared.store().put(key, object)
    }

    /// Deletes an object (`namespace` is `None` for a Node); watches see DELETED. Returns it,
    /// when it existed.
    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.shared.store().remove(&Key::new(kind, namespace, name))
    }

    /// The object as stored, when it exists.
    pub fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.shared
            .store()
            .objects
            .get(&Key::new(kind, namespace, name))
            .cloned()
    }

    /// Every request received so far (or the last 100,000), in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests().iter().cloned().collect()
    }

    /// The requests that asked to change objects of `kind`, in order.
    pub fn writes(&self, kind: Kind) -> Vec<Recorded> {
        self.shared
            .requests()
            .iter()
            .filter(|r| r.is_write() && r.kind() == Some(kind))
            .cloned()
            .collect()
    }

    /// The resource version of the last change.
    pub fn revision(&self) -> u64 {
        self.shared.store().revision
    }

    /// Ends every open watch abruptly (no end of the chunked body), as a dropped connection
    /// would; returns how many there were. Their clients resume from the event log.
    pub fn break_watches(&self) -> usize {
        self.shared.store().break_watches()
    }

    /// Forgets the event log: a watch from any revision before now gets 410 Gone, and its
    /// client must list again.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.log.clear();
        store.compacted = store.revision;
    }

    /// Whether it is serving.
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Takes the API server down: the listener and every connection close (open watches end
    /// abruptly). Objects and the record stay; [`apply`](Self::apply) and friends still work.
    pub async fn stop(&mut self) {
        self.shared.store().break_watches();
        if let Some(server) = self.server.take() {
            server.abort();
            // The listener and the connections' tasks are dropped with it.
            let _ = server.await;
        }
    }

    /// Serves again on the same address after a [`stop`](Self::stop), with the objects as
    /// they are now. Retries the bind for a few seconds while the port is not yet free.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop().await;
        let deadline = Instant::now() + REBIND_FOR;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.server = Some(tokio::spawn(serve(listener, self.shared.clone())));
        Ok(())
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    requests: Mutex<VecDeque<Recorded>>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn requests(&self) -> MutexGuard<'_, VecDeque<Recorded>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, request: Recorded) {
        let mut requests = self.requests();
        if requests.len() >= MAX_RECORDED {
            requests.pop_front();
        }
        requests.push_back(request);
    }
}
