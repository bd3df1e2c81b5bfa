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

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest request body read; a bigger one is answered 413.
const MAX_BODY: usize = 8 << 20;
/// Events kept for watches to replay; older ones are compacted away (a watch from before
/// them gets 410 Gone, as from a real API server after etcd compaction).
const LOG_CAPACITY: usize = 20_000;
/// Events queued for one watch; a watch this far behind is ended (cleanly) and its client
/// resumes from the log.
const WATCH_QUEUE: usize = 1024;
/// Open watches at most; more are refused with 429.
const MAX_WATCHES: usize = 256;
/// Open connections at most; more are closed on accept.
const MAX_CONNECTIONS: usize = 512;
/// Requests recorded at most; the oldest are forgotten first.
const MAX_RECORDED: usize = 100_000;
/// Longest watch, whatever `timeoutSeconds` asks.
const MAX_WATCH: Duration = Duration::from_secs(3600);
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

/// Where an object lives: kind, namespace (empty for a Node), name. Sorted as a real API
/// server lists: by namespace, then name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    kind: Kind,
    namespace: String,
    name: String,
}

impl Key {
    fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.unwrap_or_default().to_owned(),
            name: name.to_owned(),
        }
    }
}

/// One change, as a watch line.
struct Change {
    revision: u64,
    key: Key,
    line: Bytes,
}

/// Which objects a list or watch covers.
#[derive(Debug, Clone)]
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

impl Filter {
    fn matches(&self, key: &Key) -> bool {
        key.kind == self.kind
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
            && self.name.as_ref().is_none_or(|n| *n == key.name)
    }
}

struct Watcher {
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    broken: Arc<AtomicBool>,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    revision: u64,
    log: VecDeque<Change>,
    /// The newest revision whose event is no longer in the log.
    compacted: u64,
    watchers: Vec<Watcher>,
}

impl Store {
    /// Stores `object` under `key` with the next revision, keeping the identity of the object
    /// it replaces; returns it as stored.
    fn put(&mut self, key: Key, mut object: Value) -> Value {
        self.revision += 1;
        let revision = self.revision;
        let old = self.objects.get(&key);
        let created = old.is_none();
        let old_meta = old.map(|o| o["metadata"].clone()).unwrap_or_default();
        if !object.is_object() {
            object = json!({});
        }
        object["kind"] = json!(key.kind.name());
        object["apiVersion"] = json!("v1");
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let meta = &mut object["metadata"];
        meta["name"] = json!(key.name);
        if key.kind.namespaced() {
            meta["namespace"] = json!(key.namespace);
        }
        meta["resourceVersion"] = json!(revision.to_string());
        meta["uid"] = match old_meta.get("uid") {
            Some(uid) => uid.clone(),
            None => json!(format!("00000000-0000-0000-0000-{revision:012}")),
        };
        meta["creationTimestamp"] = match old_meta.get("creationTimestamp") {
            Some(at) => at.clone(),
            None => json!("2025-01-01T00:00:00Z"),
        };
        self.objects.insert(key.clone(), object.clone());
        let kind = if created { "ADDED" } else { "MODIFIED" };
        self.emit(revision, key, kind, &object);
        object
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        self.emit(self.revision, key.clone(), "DELETED", &object);
        Some(object)
    }

    /// Logs the change and sends it to the watches it concerns; a watch whose queue is full
    /// is ended (its client resumes from the log).
    fn emit(&mut self, revision: u64, key: Key, kind: &str, object: &Value) {
        let line = event_line(kind, object);
        self.watchers
            .retain(|w| !w.filter.matches(&key) || w.tx.try_send(line.clone()).is_ok());
        if self.log.len() >= LOG_CAPACITY
            && let Some(old) = self.log.pop_front()
        {
            self.compacted = old.revision;
        }
        self.log.push_back(Change {
            revision,
            key,
            line,
        });
    }

    fn break_watches(&mut self) -> usize {
        let watchers = std::mem::take(&mut self.watchers);
        let open = watchers.iter().filter(|w| !w.tx.is_closed()).count();
        for w in &watchers {
            w.broken.store(true, Ordering::SeqCst);
        }
        // Dropping the senders wakes the streams, which then fail.
        open
    }

    /// The items of a list: those `filter` covers after `after`, at most `limit`, and
    /// whether more remain.
    fn list(
        &self,
        filter: &Filter,
        after: Option<&Key>,
        limit: usize,
    ) -> (Vec<Value>, Option<Key>) {
        let start = match after {
            Some(key) => Bound::Excluded(key.clone()),
            None => Bound::Included(Key::new(filter.kind, None, "")),
        };
        let mut items = Vec::new();
        let mut last = None;
        let range = self.objects.range((start, Bound::Unbounded));
        for (key, object) in range.take_while(|(key, _)| key.kind == filter.kind) {
            if !filter.matches(key) {
                continue;
            }
            if items.len() == limit {
                return (items, last);
            }
            items.push(object.clone());
            last = Some(key.clone());
        }
        (items, None)
    }

    /// Opens a watch from `from` (`None`: from now, with every current object as ADDED).
    fn watch(&mut self, filter: Filter, from: Option<u64>) -> Result<WatchBody, Failure> {
        let mut backlog = VecDeque::new();
        match from {
            Some(from) if from < self.compacted => {
                let gone = status_json(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {from} ({})", self.compacted + 1),
                );
                backlog.push_back(event_line("ERROR", &gone));
                return Ok(WatchBody::finished(backlog));
            }
            Some(from) => backlog.extend(
                self.log
                    .iter()
                    .filter(|c| c.revision > from && filter.matches(&c.key))
                    .map(|c| c.line.clone()),
            ),
            None => backlog.extend(
                self.objects
                    .iter()
                    .filter(|(key, _)| filter.matches(key))
                    .map(|(_, object)| event_line("ADDED", object)),
            ),
        }
        self.watchers.retain(|w| !w.tx.is_closed());
        if self.watchers.len() >= MAX_WATCHES {
            return Err(Failure::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "too many open watches".into(),
            ));
        }
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let broken = Arc::new(AtomicBool::new(false));
        self.watchers.push(Watcher {
            filter,
            tx,
            broken: broken.clone(),
        });
        Ok(WatchBody {
            backlog,
            rx: Some(rx),
            broken,
            deadline: None,
        })
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object }))
        .expect("invariant: a JSON value serialises");
    line.push(b'\n');
    Bytes::from(line)
}

/// A watch response: the backlog, then the events as they come, until the deadline (a clean
/// end) or a break (an abrupt one).
struct WatchBody {
    backlog: VecDeque<Bytes>,
    rx: Option<mpsc::Receiver<Bytes>>,
    broken: Arc<AtomicBool>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WatchBody {
    fn finished(backlog: VecDeque<Bytes>) -> Self {
        Self {
            backlog,
            rx: None,
            broken: Arc::default(),
            deadline: None,
        }
    }
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        let broken = || {
            Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the watch was broken",
            ))))
        };
        if this.broken.load(Ordering::SeqCst) {
            return broken();
        }
        if let Some(line) = this.backlog.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(line))));
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        let Some(rx) = &mut this.rx else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(line)) => Poll::Ready(Some(Ok(Frame::data(line)))),
            Poll::Ready(None) if this.broken.load(Ordering::SeqCst) => broken(),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

type Body = Either<Full<Bytes>, WatchBody>;

/// A request refused, as a `Status`.
#[derive(Debug)]
struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(code: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
        }
    }

    fn bad_request(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn not_found(key: &Key) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{}\" not found", key.kind.plural(), key.name),
        )
    }

    fn into_response(self) -> Response<Body> {
        json_response(
            self.code,
            &status_json(self.code, self.reason, &self.message),
        )
    }
}

fn status_json(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("invariant: a JSON value serialises");
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// What a path names: a collection (no name) or an object.
#[derive(Debug)]
struct Target {
    kind: Kind,
    /// `None`: every namespace (or a cluster-scoped kind).
    namespace: Option<String>,
    name: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/api/v1/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let valid = |s: &str| !s.is_empty();
        let (kind, namespace, name) = match parts.as_slice() {
            [plural] => (Kind::from_plural(plural)?, None, None),
            [plural, name] if valid(name) => {
                let kind = Kind::from_plural(plural).filter(|k| !k.namespaced())?;
                (kind, None, Some(*name))
            }
            ["namespaces", ns, plural] if valid(ns) => {
                let kind = Kind::from_plural(plural).filter(|k| k.namespaced())?;
                (kind, Some(*ns), None)
            }
            ["namespaces", ns, plural, name] if valid(ns) && valid(name) => {
                let kind = Kind::from_plural(plural).filter(|k| k.namespaced())?;
                (kind, Some(*ns), Some(*name))
            }
            _ => return None,
        };
        Some(Self {
            kind,
            namespace: namespace.map(percent_decode),
            name: name.map(percent_decode),
        })
    }

    fn key(&self, name: &str) -> Key {
        Key::new(self.kind, self.namespace.as_deref(), name)
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, "fake kube-apiserver: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            continue;
        }
        let shared = shared.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes());
    let recorded = Recorded {
        at: Instant::now(),
        method: parts.method.clone(),
        path,
        content_type,
        body: body
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
    };
    shared.record(recorded.clone());
    let Ok(body) = body else {
        return Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "the request body is too large or was cut".into(),
        )
        .into_response();
    };
    match route(shared, &recorded, &body) {
        Ok(response) => response,
        Err(failure) => failure.into_response(),
    }
}

fn route(shared: &Shared, request: &Recorded, body: &[u8]) -> Result<Response<Body>, Failure> {
    let target = Target::parse(request.path_only()).ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "the server could not find the requested resource {}",
                request.path_only()
            ),
        )
    })?;
    let query: BTreeMap<String, String> = query_pairs(&request.path).into_iter().collect();
    let method = &request.method;
    match (&target.name, method) {
        (None, &Method::GET) if request.is_watch() => watch(shared, &target, &query),
        (None, &Method::GET) => list(shared, &target, &query),
        (Some(name), &Method::GET) => {
            let key = target.key(name);
            let store = shared.store();
            let object = store
                .objects
                .get(&key)
                .ok_or_else(|| Failure::not_found(&key))?;
            Ok(json_response(StatusCode::OK, object))
        }
        (None, &Method::POST) => create(shared, &target, body),
        (Some(name), &Method::PATCH) => patch(shared, &target.key(name), request, body),
        (Some(name), &Method::DELETE) => {
            let key = target.key(name);
            let object = shared
                .store()
                .remove(&key)
                .ok_or_else(|| Failure::not_found(&key))?;
            Ok(json_response(StatusCode::OK, &object))
        }
        _ => Err(Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", request.path_only()),
        )),
    }
}

/// The filter of a list or watch: the path's kind and namespace, and the name of a
/// `metadata.name=NAME` field selector (the only one supported; label selectors are not).
fn filter_of(target: &Target, query: &BTreeMap<String, String>) -> Result<Filter, Failure> {
    if query.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return Err(Failure::bad_request(
            "the fake API server does not support label selectors".into(),
        ));
    }
    let name = match query.get("fieldSelector").map(String::as_str) {
        None | Some("") => None,
        Some(selector) => {
            let name = selector
                .strip_prefix("metadata.name==")
                .or_else(|| selector.strip_prefix("metadata.name="))
                .filter(|n| !n.contains(','))
                .ok_or_else(|| {
                    Failure::bad_request(format!(
                        "field selector {selector:?}: only metadata.name=NAME is supported"
                    ))
                })?;
            Some(name.to_owned())
        }
    };
    Ok(Filter {
        kind: target.kind,
        namespace: target.namespace.clone(),
        name,
    })
}

fn list(
    shared: &Shared,
    target: &Target,
    query: &BTreeMap<String, String>,
) -> Result<Response<Body>, Failure> {
    let filter = filter_of(target, query)?;
    let limit = match query.get("limit").map(String::as_str) {
        None | Some("" | "0") => usize::MAX,
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| Failure::bad_request(format!("limit {n:?} is not a number")))?,
    };
    // A continue token: the list's revision, then the key of the last item given.
    let resume = match query.get("continue").map(String::as_str) {
        None | Some("") => None,
        Some(token) => Some(parse_continue(token, target.kind).ok_or_else(|| {
            Failure::bad_request(format!("continue token {token:?} is not valid"))
        })?),
    };
    let store = shared.store();
    let revision = resume.as_ref().map_or(store.revision, |(r, _)| *r);
    let (items, more) = store.list(&filter, resume.as_ref().map(|(_, k)| k), limit);
    let mut metadata = json!({ "resourceVersion": revision.to_string() });
    if let Some(last) = more {
        metadata["continue"] = json!(format!("{revision}|{}|{}", last.namespace, last.name));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", target.kind.name()),
            "apiVersion": "v1",
            "metadata": metadata,
            "items": items,
        }),
    ))
}

fn parse_continue(token: &str, kind: Kind) -> Option<(u64, Key)> {
    let mut parts = token.splitn(3, '|');
    let revision = parts.next()?.parse().ok()?;
    let namespace = parts.next()?;
    let name = parts.next()?;
    Some((revision, Key::new(kind, Some(namespace), name)))
}

fn watch(
    shared: &Shared,
    target: &Target,
    query: &BTreeMap<String, String>,
) -> Result<Response<Body>, Failure> {
    let filter = filter_of(target, query)?;
    if query.get("sendInitialEvents").is_some_and(|v| v == "true") {
        return Err(Failure::bad_request(
            "the fake API server does not support streaming lists (sendInitialEvents)".into(),
        ));
    }
    let from =
        match query.get("resourceVersion").map(String::as_str) {
            None | Some("" | "0") => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                Failure::bad_request(format!("resourceVersion {v:?} is not a number"))
            })?),
        };
    let timeout = match query.get("timeoutSeconds") {
        None => MAX_WATCH,
        Some(s) => s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| Failure::bad_request(format!("timeoutSeconds {s:?} is not a number")))?
            .min(MAX_WATCH),
    };
    let mut body = shared.store().watch(filter, from)?;
    body.deadline = Some(Box::pin(tokio::time::sleep(timeout)));
    let mut response = Response::new(Either::Right(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Failure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Failure::bad_request("the body is not a JSON object".into())),
        Err(e) => Err(Failure::bad_request(format!("the body is not JSON: {e}"))),
    }
}

fn create(shared: &Shared, target: &Target, body: &[u8]) -> Result<Response<Body>, Failure> {
    let object = parse_object(body)?;
    let kind_ok = object
        .get("kind")
        .is_none_or(|k| k.as_str() == Some(target.kind.name()));
    if !kind_ok {
        return Err(Failure::bad_request(format!(
            "the object's kind is not {}",
            target.kind.name()
        )));
    }
    let meta = object.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Failure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value".into(),
            )
        })?;
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    if target.kind.namespaced() && target.namespace.is_none() {
        return Err(Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "create a namespaced object in its namespace's path".into(),
        ));
    }
    if namespace.is_some_and(|ns| Some(ns) != target.namespace.as_deref()) {
        return Err(Failure::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        ));
    }
    let key = target.key(name);
    let mut store = shared.store();
    if store.objects.contains_key(&key) {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{}\" already exists", key.kind.plural(), key.name),
        ));
    }
    let stored = store.put(key, Value::Object(object));
    Ok(json_response(StatusCode::CREATED, &stored))
}

fn patch(
    shared: &Shared,
    key: &Key,
    request: &Recorded,
    body: &[u8],
) -> Result<Response<Body>, Failure> {
    let content_type = request.content_type.as_deref().unwrap_or_default();
    if content_type.split(';').next().map(str::trim) != Some("application/merge-patch+json") {
        return Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the fake API server takes merge patches only, not {content_type:?}"),
        ));
    }
    let patch = Value::Object(parse_object(body)?);
    let mut store = shared.store();
    let current = store
        .objects
        .get(key)
        .ok_or_else(|| Failure::not_found(key))?;
    // A patch that names a resource version must name the current one.
    let wanted = &patch["metadata"]["resourceVersion"];
    if wanted.is_string() && *wanted != current["metadata"]["resourceVersion"] {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "Conflict",
            "the object has been modified; please apply your changes to the latest version".into(),
        ));
    }
    let mut object = current.clone();
    merge_patch(&mut object, &patch);
    let stored = store.put(key.clone(), object);
    Ok(json_response(StatusCode::OK, &stored))
}

/// Applies an RFC 7386 JSON merge patch: objects merge key by key, `null` removes a key,
/// anything else replaces. (The JSON parser's depth limit bounds the recursion.)
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The decoded `key=value` pairs of a path's query.
fn query_pairs(path: &str) -> Vec<(String, String)> {
    let Some((_, query)) = path.split_once('?') else {
        return Vec::new();
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; a `%` not
/// followed by two hex digits stays as it is.
fn form_decode(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |at: usize| bytes.get(at).and_then(|c| (*c as char).to_digit(16));
        if b == b'%'
            && let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2))
        {
            out.push(u8::try_from(hi * 16 + lo).expect("invariant: two hex digits make a byte"));
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patches_follow_rfc_7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut target,
            &json!({"a": "z", "c": {"f": null, "h": 1}, "l": [3], "n": {"o": null}}),
        );
        assert_eq!(
            target,
            json!({"a": "z", "c": {"d": "e", "h": 1}, "l": [3], "n": {}})
        );
        let mut scalar = json!("x");
        merge_patch(&mut scalar, &json!({"k": "v"}));
        assert_eq!(scalar, json!({"k": "v"}));
    }

    #[test]
    fn paths_and_queries_decode() {
        let t = Target::parse("/api/v1/namespaces/kube-system/services/x-svc").unwrap();
        assert_eq!(
            (t.kind, t.namespace.as_deref(), t.name.as_deref()),
            (Kind::Service, Some("kube-system"), Some("x-svc"))
        );
        assert_eq!(Target::parse("/api/v1/nodes").unwrap().kind, Kind::Node);
        for bad in [
            "/api/v1/services/x",
            "/api/v1/namespaces/a/nodes",
            "/api/v1/pods",
            "/api/v1/",
            "/apis/x",
            "/api/v1/namespaces//configmaps",
        ] {
            assert!(Target::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(
            query_pairs("/x?fieldSelector=metadata.name%3Dx+y&watch&bad=%zz%4"),
            [
                ("fieldSelector".to_owned(), "metadata.name=x y".to_owned()),
                ("watch".to_owned(), String::new()),
                ("bad".to_owned(), "%zz%4".to_owned()),
            ]
        );
    }
}
