//! The hyper service: accepting connections, routing requests to the LIST, WATCH, GET, POST,
//! PATCH and DELETE handlers, and answering refusals with `Status` bodies.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::path::{Target, query_pairs};
use super::store::{Filter, Key, WatchBody, merge_patch};
use super::{Kind, Recorded, Shared};

/// Largest request body read; a bigger one is answered 413.
const MAX_BODY: usize = 8 << 20;
/// Open connections at most; more are closed on accept.
const MAX_CONNECTIONS: usize = 512;
/// Longest watch, whatever `timeoutSeconds` asks.
const MAX_WATCH: Duration = Duration::from_secs(3600);

type Body = Either<Full<Bytes>, WatchBody>;

/// A request refused, as a `Status`.
#[derive(Debug)]
pub(super) struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Failure {
    pub(super) fn new(code: StatusCode, reason: &'static str, message: String) -> Self {
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

pub(super) fn status_json(code: StatusCode, reason: &str, message: &str) -> Value {
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

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
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
