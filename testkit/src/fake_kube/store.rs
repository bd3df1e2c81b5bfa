//! The objects, their resource versions, the event log and the watches that follow it.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use hyper::body::Frame;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::Kind;
use super::http::{Failure, status_json};

/// Events kept for watches to replay; older ones are compacted away (a watch from before
/// them gets 410 Gone, as from a real API server after etcd compaction).
const LOG_CAPACITY: usize = 20_000;
/// Events queued for one watch; a watch this far behind is ended (cleanly) and its client
/// resumes from the log.
const WATCH_QUEUE: usize = 1024;
/// Open watches at most; more are refused with 429.
const MAX_WATCHES: usize = 256;

/// Where an object lives: kind, namespace (empty for a Node), name. Sorted as a real API
/// server lists: by namespace, then name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    pub(super) kind: Kind,
    pub(super) namespace: String,
    pub(super) name: String,
}

impl Key {
    pub(super) fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.unwrap_or_default().to_owned(),
            name: name.to_owned(),
        }
    }
}

/// One change, as a watch line.
pub(super) struct Change {
    revision: u64,
    key: Key,
    line: Bytes,
}

/// Which objects a list or watch covers.
#[derive(Debug, Clone)]
pub(super) struct Filter {
    pub(super) kind: Kind,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
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
pub(super) struct Store {
    pub(super) objects: BTreeMap<Key, Value>,
    pub(super) revision: u64,
    pub(super) log: VecDeque<Change>,
    /// The newest revision whose event is no longer in the log.
    pub(super) compacted: u64,
    watchers: Vec<Watcher>,
}

impl Store {
    /// Stores `object` under `key` with the next revision, keeping the identity of the object
    /// it replaces; returns it as stored.
    pub(super) fn put(&mut self, key: Key, mut object: Value) -> Value {
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

    pub(super) fn remove(&mut self, key: &Key) -> Option<Value> {
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

    pub(super) fn break_watches(&mut self) -> usize {
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
    pub(super) fn list(
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
    pub(super) fn watch(
        &mut self,
        filter: Filter,
        from: Option<u64>,
    ) -> Result<WatchBody, Failure> {
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
pub(super) struct WatchBody {
    backlog: VecDeque<Bytes>,
    rx: Option<mpsc::Receiver<Bytes>>,
    broken: Arc<AtomicBool>,
    pub(super) deadline: Option<Pin<Box<tokio::time::Sleep>>>,
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

/// Applies an RFC 7386 JSON merge patch: objects merge key by key, `null` removes a key,
/// anything else replaces. (The JSON parser's depth limit bounds the recursion.)
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
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
}
