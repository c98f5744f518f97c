//! The HTTP side: the listener (which can go down and come back on the same port), request
//! logging, fault injection, routing of API paths, and the handlers of every verb.

use std::{net::SocketAddr, panic::AssertUnwindSafe, sync::Arc, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use futures::FutureExt as _;
use http::{request::Parts, Method, Request, Response};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::oneshot,
    task::JoinSet,
};

use super::{
    discovery, lock, rbac,
    resources::Kind,
    selectors::{FieldSelector, LabelSelector},
    status::{success_status, ApiError},
    store::{PatchType, Writer},
    throttle,
    watch::{self, partial_object_metadata, WatchRequest},
    watch_cache, Body, RequestLog, Shared,
};

/// The real API server's request body limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

// ---- listener lifecycle ----

/// A running accept loop. Shutting it down closes the listening socket and every
/// connection it accepted (watch streams included).
pub(crate) struct Listener {
    stop: Option<oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Listener {
    pub fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.done.recv_timeout(Duration::from_secs(5));
    }
}

/// Binds `addr` (SO_REUSEADDR, so the same port can be bound again right after going down)
/// and starts accepting on `rt`.
pub(crate) fn spawn_listener(
    rt: &tokio::runtime::Runtime,
    shared: Arc<Shared>,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, Listener)> {
    let _guard = rt.enter();
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    let local = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    rt.spawn(accept_loop(listener, shared, stop_rx, done_tx));
    Ok((
        local,
        Listener {
            stop: Some(stop_tx),
            done: done_rx,
        },
    ))
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
    done: std::sync::mpsc::Sender<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    conns.spawn(serve_connection(stream, shared.clone()));
                }
                Err(e) => {
                    eprintln!("fake-apiserver: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    let _ = done.send(());
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    match shared.tls.clone() {
        // HTTPS (see `tls`): a client that does not speak TLS or rejects the certificate
        // is counted and cut before any HTTP request is read.
        Some(tls) => {
            if let Some(stream) = tls.accept(stream).await {
                serve_http(TokioIo::new(stream), shared).await;
            }
        }
        None => serve_http(TokioIo::new(stream), shared).await,
    }
}

async fn serve_http<I>(io: I, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move {
            if *shared.dark.borrow() {
                // Blackholed: no answer until the server comes back, then the connection
                // is cut (an error from the service makes hyper close it unanswered).
                let mut dark = shared.dark.subscribe();
                let _ = dark.wait_for(|d| !*d).await;
                return Err(std::io::Error::other("blackholed request cut"));
            }
            Ok::<_, std::io::Error>(handle(shared, req).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service)
        .await;
}

// ---- responses ----

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *resp.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

fn text_response(text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

// ---- query strings ----

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decoded query parameters, in order.
pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn nonempty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

// ---- routing ----

#[derive(Clone, Debug)]
struct ResourceRoute {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    watch_path: bool,
}

enum Route {
    Doc(Value),
    Text(&'static str),
    Resource(ResourceRoute),
    NotFound,
}

fn classify(path: &str, addr: SocketAddr) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Route::Doc(discovery::version()),
        ["healthz"] | ["livez"] | ["readyz"] => Route::Text("ok"),
        ["api"] => Route::Doc(discovery::api_versions(addr)),
        ["apis"] => Route::Doc(discovery::api_group_list()),
        ["api", "v1"] => discovery::resource_list("", "v1").map_or(Route::NotFound, Route::Doc),
        ["apis", group] => discovery::api_group(group).map_or(Route::NotFound, Route::Doc),
        ["apis", group, version] => {
            discovery::resource_list(group, version).map_or(Route::NotFound, Route::Doc)
        }
        ["api", "v1", rest @ ..] => resource_route("", "v1", rest),
        ["apis", group, version, rest @ ..] => resource_route(group, version, rest),
        _ => Route::NotFound,
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Route {
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let lookup = |plural: &str| Kind::lookup(group, version, plural);
    let route = |kind, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Route::Resource(ResourceRoute {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            subresource: sub.map(str::to_string),
            watch_path,
        })
    };
    // /namespaces/{ns}/{plural}[/{name}[/{subresource}]]
    if let ["namespaces", ns, plural, tail @ ..] = rest {
        if let Some(kind) = lookup(plural).filter(|k| k.is_namespaced()) {
            return match tail {
                [] => route(kind, Some(ns), None, None),
                [name] => route(kind, Some(ns), Some(name), None),
                [name, sub] => route(kind, Some(ns), Some(name), Some(sub)),
                _ => Route::NotFound,
            };
        }
    }
    match rest {
        [plural] => lookup(plural).map_or(Route::NotFound, |k| route(k, None, None, None)),
        [plural, name] => match lookup(plural) {
            Some(k) if !k.is_namespaced() => route(k, None, Some(name), None),
            _ => Route::NotFound,
        },
        [plural, name, sub] => match lookup(plural) {
            Some(k) if !k.is_namespaced() => route(k, None, Some(name), Some(sub)),
            _ => Route::NotFound,
        },
        _ => Route::NotFound,
    }
}

fn verb_of(method: &Method, r: &ResourceRoute, q: &Query) -> &'static str {
    match (method.as_str(), r.name.is_some()) {
        ("GET", _) if r.watch_path || q.flag("watch") => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "",
    }
}

// ---- the request handler ----

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let arrived = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let query = Query(parse_query(parts.uri.query().unwrap_or("")));
    let route = classify(parts.uri.path(), shared.addr());
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut log = RequestLog {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        status: 0,
        verb: String::new(),
        user: None,
        grant_scope: None,
        also_authorized_as: Vec::new(),
        api_group: None,
        resource: None,
        subresource: None,
        namespace: None,
        name: None,
        content_type: header(http::header::CONTENT_TYPE),
        accept: header(http::header::ACCEPT),
        user_agent: header(http::header::USER_AGENT),
        bearer_token: header(http::header::AUTHORIZATION)
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_string)),
        injected_fault: false,
    };
    if let Route::Resource(r) = &route {
        log.verb = verb_of(&parts.method, r, &query).to_string();
        log.api_group = Some(r.kind.group().to_string());
        log.resource = Some(match &r.subresource {
            Some(sub) => format!("{}/{sub}", r.kind.plural()),
            None => r.kind.plural().to_string(),
        });
        log.subresource = r.subresource.clone();
        log.namespace = r.namespace.clone();
        log.name = r.name.clone();
    }
    let identity = rbac::authenticate(&shared, log.bearer_token.as_deref());
    log.user = identity.map(|i| i.api_calls_name().to_string());

    let latency = lock(&shared.faults).latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    // Authentication comes first, as in the real handler chain (then priority and fairness,
    // where injected failures and 429s stand, then authorization).
    let injected = match identity {
        Some(_) => lock(&shared.faults).take_failure(),
        None => None,
    };
    let throttled = match (identity, injected) {
        (Some(_), None) => lock(&shared.faults).throttled(&log.verb),
        _ => None,
    };
    let authorized = match (identity, &route) {
        (Some(who), Route::Resource(r)) if injected.is_none() && throttled.is_none() => {
            authorize(&shared, who, r, &parts, &query, &log.verb).map(|(scope, also)| {
                log.grant_scope = Some(scope.api_calls_scope());
                log.also_authorized_as = also;
            })
        }
        _ => Ok(()),
    };
    let resp = if identity.is_none() {
        // No token, an unknown one, or another scheme.
        error_response(&ApiError::new(401, "Unauthorized"))
    } else if let Some(code) = injected {
        log.injected_fault = true;
        error_response(&ApiError::new(
            code,
            format!("injected failure (HTTP {code}) by the API server fixture"),
        ))
    } else if let Some(secs) = throttled {
        log.injected_fault = true;
        throttle::response(secs)
    } else if let Err(e) = authorized {
        error_response(&e)
    } else {
        match Limited::new(body, MAX_BODY).collect().await {
            Err(e) => error_response(&ApiError::new(413, format!("request body rejected: {e}"))),
            Ok(collected) => {
                let bytes = collected.to_bytes();
                let dispatched = AssertUnwindSafe(dispatch(&shared, &parts, &query, route, bytes))
                    .catch_unwind()
                    .await;
                match dispatched {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(e)) => error_response(&e),
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        eprintln!(
                            "fake-apiserver: BUG: handler panicked on {} {}?{}: {what}",
                            log.method, log.path, log.query
                        );
                        error_response(&ApiError::internal(format!(
                            "the API server fixture failed on this request: {what}"
                        )))
                    }
                }
            }
        }
    };
    log.status = resp.status().as_u16();
    if log.status == 404 && log.resource.is_none() {
        eprintln!(
            "fake-apiserver: unhandled request {} {}?{}",
            log.method, log.path, log.query
        );
    }
    let resp = shared.traffic.record(arrived, &log, resp);
    lock(&shared.requests).push(log);
    resp
}

/// The RBAC decision on a resource request (see [`rbac`]); list and watch carry the name of
/// a `metadata.name=` field selector, as the real request info does.
fn authorize(
    shared: &Shared,
    who: rbac::Identity,
    r: &ResourceRoute,
    parts: &Parts,
    query: &Query,
    verb: &str,
) -> Result<(rbac::GrantScope, Vec<String>), ApiError> {
    let mut name = r.name.clone();
    if name.is_none() && matches!(verb, "list" | "watch") {
        name = query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name="))
            .filter(|n| !n.contains(','))
            .map(str::to_string);
    }
    let attrs = rbac::Attributes {
        verb: verb.to_string(),
        group: r.kind.group().to_string(),
        resource: r.kind.plural().to_string(),
        subresource: r.subresource.clone(),
        namespace: r.namespace.clone(),
        name,
    };
    let is_apply = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/apply-patch"));
    rbac::authorize_request(shared, who, r.kind, &attrs, is_apply)
}

async fn dispatch(
    shared: &Arc<Shared>,
    parts: &Parts,
    query: &Query,
    route: Route,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    match route {
        Route::NotFound => Err(ApiError::path_not_found()),
        Route::Doc(doc) if parts.method == Method::GET => Ok(json_response(200, &doc)),
        Route::Text(text) if parts.method == Method::GET => Ok(text_response(text)),
        Route::Doc(_) | Route::Text(_) => Err(ApiError::method_not_allowed(parts.method.as_str())),
        Route::Resource(r) => {
            if parts.method == Method::GET && query.get("continue").is_none() {
                // Served from the watch cache: a version it has not reached is waited for.
                watch_cache::wait_until_fresh(shared, query.nonempty("resourceVersion")).await?;
            }
            resource(shared, parts, query, &r, &body)
        }
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    serde_yaml_ng::from_slice::<Value>(body)
        .map_err(|e| ApiError::bad_request(format!("the request body could not be decoded: {e}")))
}

fn field_manager(parts: &Parts, query: &Query) -> String {
    if let Some(m) = query.nonempty("fieldManager") {
        return m.to_string();
    }
    // The real API server names an unnamed writer after its user agent.
    parts
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

fn metadata_only(parts: &Parts) -> bool {
    parts
        .headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',').next().is_some_and(|first| {
                first.contains("as=PartialObjectMetadata") && first.contains("g=meta.k8s.io")
            })
        })
}

fn resource(
    shared: &Arc<Shared>,
    parts: &Parts,
    query: &Query,
    r: &ResourceRoute,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    if r.subresource.is_some() {
        return Err(ApiError::path_not_found());
    }
    let kind = r.kind;
    let ns = r.namespace.as_deref();
    let item_ns = ns.unwrap_or("");
    let meta_only = metadata_only(parts);
    let dry_run = query.get("dryRun") == Some("All");
    let manager = field_manager(parts, query);
    let writer = Writer {
        manager: &manager,
        dry_run,
        client: true,
    };
    let out = |obj: Value| {
        if meta_only {
            partial_object_metadata(&obj)
        } else {
            obj
        }
    };
    match (verb_of(&parts.method, r, query), r.name.as_deref()) {
        ("watch", name) => {
            let mut field_selector = query.get("fieldSelector").unwrap_or("").to_string();
            if let Some(name) = name {
                // Legacy /watch/.../{name}: a watch of that one object.
                let by_name = format!("metadata.name={name}");
                field_selector = if field_selector.is_empty() {
                    by_name
                } else {
                    format!("{field_selector},{by_name}")
                };
            }
            let req = WatchRequest {
                kind,
                namespace: r.namespace.clone(),
                labels: LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
                    .map_err(ApiError::bad_request)?,
                fields: FieldSelector::parse(&field_selector, kind)
                    .map_err(ApiError::bad_request)?,
                resource_version: query.get("resourceVersion").map(str::to_string),
                bookmarks: query.flag("allowWatchBookmarks"),
                send_initial_events: query.flag("sendInitialEvents"),
                timeout: query
                    .nonempty("timeoutSeconds")
                    .map(|t| {
                        t.parse::<u64>().map_err(|_| {
                            ApiError::bad_request(format!("invalid timeoutSeconds {t:?}"))
                        })
                    })
                    .transpose()?
                    .map(Duration::from_secs),
                metadata_only: meta_only,
            };
            watch_cache::check_send_initial_events(
                kind,
                req.send_initial_events,
                query.nonempty("resourceVersionMatch"),
            )?;
            if req.send_initial_events && !req.bookmarks {
                return Err(ApiError::invalid(
                    kind,
                    "",
                    "allowWatchBookmarks",
                    "Required value: allowWatchBookmarks must be true when sendInitialEvents is set",
                ));
            }
            watch::start(shared, req)
        }
        ("list", None) => Ok(json_response(
            200,
            &list(shared, kind, ns, query, meta_only)?,
        )),
        ("get", Some(name)) => lock(&shared.store)
            .get(kind, item_ns, name)
            .cloned()
            .map(|o| json_response(200, &out(o)))
            .ok_or_else(|| ApiError::not_found(kind, name)),
        ("create", None) => {
            let Some(ns) = ns.or((!kind.is_namespaced()).then_some("")) else {
                return Err(ApiError::method_not_allowed("POST"));
            };
            let body = parse_body(body)?;
            let obj = shared.mutate(|s| s.create(kind, ns, body, &writer))?;
            Ok(json_response(201, &out(obj)))
        }
        ("update", Some(name)) => {
            let body = parse_body(body)?;
            let obj = shared.mutate(|s| s.replace(kind, item_ns, name, body, &writer))?;
            Ok(json_response(200, &out(obj)))
        }
        ("patch", Some(name)) => {
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let media = content_type.split(';').next().unwrap_or("").trim();
            let patch_type = match media {
                "application/apply-patch+yaml" => PatchType::Apply,
                "application/merge-patch+json" => PatchType::Merge,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/json-patch+json" => PatchType::Json,
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            if patch_type == PatchType::Apply && query.nonempty("fieldManager").is_none() {
                return Err(ApiError::bad_request(
                    "PATCH /apply requires fieldManager: fieldManager is required for apply requests",
                ));
            }
            let force = query.flag("force");
            if force && patch_type != PatchType::Apply {
                return Err(ApiError::bad_request(
                    "force is only allowed for apply patches",
                ));
            }
            let body = parse_body(body)?;
            let (obj, created) = shared
                .mutate(|s| s.patch(kind, item_ns, name, patch_type, body, force, &writer))?;
            Ok(json_response(if created { 201 } else { 200 }, &out(obj)))
        }
        ("delete", Some(name)) => {
            let options = if body.is_empty() {
                json!({})
            } else {
                parse_body(body)?
            };
            let dry_run = dry_run
                || options
                    .get("dryRun")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|v| v == "All"));
            let obj = shared.mutate(|s| s.delete(kind, item_ns, name, &options, dry_run))?;
            Ok(match kind {
                // Graceful-deletion types answer with the object, the others with a Status.
                Kind::Pod | Kind::Namespace => json_response(200, &out(obj)),
                _ => json_response(
                    200,
                    &success_status(
                        kind,
                        name,
                        obj.pointer("/metadata/uid").and_then(Value::as_str),
                    ),
                ),
            })
        }
        ("deletecollection", None) => {
            if kind.is_namespaced() && ns.is_none() {
                return Err(ApiError::method_not_allowed("DELETE"));
            }
            let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
                .map_err(ApiError::bad_request)?;
            let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""), kind)
                .map_err(ApiError::bad_request)?;
            let deleted = shared.mutate(|s| {
                let names: Vec<String> = s
                    .objects(kind, ns)
                    .into_iter()
                    .filter(|o| labels.matches(o) && fields.matches(kind, o))
                    .filter_map(|o| o.pointer("/metadata/name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect();
                names
                    .iter()
                    .filter_map(|n| s.delete(kind, item_ns, n, &json!({}), dry_run).ok())
                    .collect::<Vec<_>>()
            });
            Ok(json_response(
                200,
                &json!({
                    "kind": format!("{}List", kind.kind_name()),
                    "apiVersion": kind.api_version(),
                    "metadata": {},
                    "items": deleted.into_iter().map(strip_type).collect::<Vec<_>>(),
                }),
            ))
        }
        (_, _) => Err(ApiError::method_not_allowed(parts.method.as_str())),
    }
}

/// List items carry no apiVersion/kind on the wire (the list's kind says it).
fn strip_type(mut obj: Value) -> Value {
    if let Some(m) = obj.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    obj
}

fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let start = if ns.is_empty() {
        format!("{name}\u{0}")
    } else {
        format!("{ns}/{name}\u{0}")
    };
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    base64::engine::general_purpose::URL_SAFE.encode(token.to_string())
}

fn decode_continue(token: &str, kind: Kind) -> Result<(u64, (String, String)), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .or_else(|_| base64::engine::general_purpose::STANDARD.decode(token))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    if v.get("v").and_then(Value::as_str) != Some("meta.k8s.io/v1") {
        return Err(bad());
    }
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    let start = start.trim_end_matches('\u{0}');
    let key = if kind.is_namespaced() {
        let (ns, name) = start.split_once('/').ok_or_else(bad)?;
        (ns.to_string(), name.to_string())
    } else {
        (String::new(), start.to_string())
    };
    Ok((rv, key))
}

fn key_of(obj: &Value) -> (String, String) {
    let s = |k: &str| {
        obj.pointer(&format!("/metadata/{k}"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    (s("namespace"), s("name"))
}

fn list(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: Option<&str>,
    query: &Query,
    meta_only: bool,
) -> Result<Value, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""), kind)
        .map_err(ApiError::bad_request)?;
    let limit = match query.nonempty("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
        None => 0,
    };
    let rv_param = query.nonempty("resourceVersion");
    let parse_rv = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version {s:?}")))
    };

    let frozen = lock(&shared.settings).cache_frozen_at;
    let (rv, items, start_after) = {
        let store = lock(&shared.store);
        if let Some(token) = query.nonempty("continue") {
            if rv_param.is_some() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (rv, start) = decode_continue(token, kind)?;
            let items = store.snapshot_at(kind, rv).map_err(|e| {
                if e.code == 410 {
                    ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. \
                         You can start a new list without the continue parameter.",
                    )
                } else {
                    e
                }
            })?;
            (rv, items, Some(start))
        } else {
            match query.nonempty("resourceVersionMatch") {
                Some("Exact") => {
                    let Some(rv) = rv_param else {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch is forbidden unless resourceVersion is provided",
                        ));
                    };
                    let rv = parse_rv(rv)?;
                    if rv == 0 {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                        ));
                    }
                    (rv, store.snapshot_at(kind, rv)?, None)
                }
                Some("NotOlderThan") | None => {
                    if query.nonempty("resourceVersionMatch").is_some() && rv_param.is_none() {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch is forbidden unless resourceVersion is provided",
                        ));
                    }
                    if let Some(rv) = rv_param {
                        let rv = parse_rv(rv)?;
                        if rv > store.rv() {
                            // The real API server waits up to 3 s for it, then gives up.
                            return Err(ApiError::too_large(rv, store.rv()));
                        }
                    }
                    // With a resourceVersion (0: any) the list is served from the watch
                    // cache, which may lag; without one it is a consistent read.
                    let rv = if rv_param.is_some() {
                        watch_cache::cache_rv(frozen, store.rv())
                    } else {
                        store.rv()
                    };
                    (rv, store.snapshot_at(kind, rv)?, None)
                }
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "invalid resourceVersionMatch {other:?}"
                    )))
                }
            }
        }
    };

    let mut matching: Vec<Value> = items
        .into_iter()
        .filter(|o| {
            ns.is_none_or(|ns| o.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns))
        })
        .filter(|o| start_after.as_ref().is_none_or(|s| key_of(o) > *s))
        .filter(|o| labels.matches(o) && fields.matches(kind, o))
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if limit > 0 && matching.len() > limit {
        let remaining = matching.len() - limit;
        matching.truncate(limit);
        if let Some(last) = matching.last() {
            let (lns, lname) = key_of(last);
            metadata["continue"] = json!(encode_continue(rv, &lns, &lname));
        }
        if query.nonempty("labelSelector").is_none() && query.nonempty("fieldSelector").is_none() {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let (list_kind, api_version) = if meta_only {
        ("PartialObjectMetadataList".to_string(), "meta.k8s.io/v1")
    } else {
        (format!("{}List", kind.kind_name()), kind.api_version())
    };
    let items: Vec<Value> = matching
        .into_iter()
        .map(|o| {
            if meta_only {
                partial_object_metadata(&o)
            } else {
                strip_type(o)
            }
        })
        .collect();
    Ok(json!({
        "kind": list_kind,
        "apiVersion": api_version,
        "metadata": metadata,
        "items": items,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query("labelSelector=a%3Db%2Cc+in+%28x%29&watch=true&x");
        assert_eq!(q[0], ("labelSelector".into(), "a=b,c in (x)".into()));
        assert_eq!(q[1], ("watch".into(), "true".into()));
        assert_eq!(q[2], ("x".into(), String::new()));
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn routes() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let r = |p: &str| match classify(p, addr) {
            Route::Resource(r) => Some((r.kind, r.namespace, r.name, r.subresource)),
            _ => None,
        };
        assert_eq!(r("/api/v1/pods"), Some((Kind::Pod, None, None, None)));
        assert_eq!(
            r("/api/v1/namespaces/a/pods/p"),
            Some((Kind::Pod, Some("a".into()), Some("p".into()), None))
        );
        assert_eq!(
            r("/api/v1/namespaces/a"),
            Some((Kind::Namespace, None, Some("a".into()), None))
        );
        assert_eq!(
            r("/api/v1/namespaces/a/status"),
            Some((
                Kind::Namespace,
                None,
                Some("a".into()),
                Some("status".into())
            ))
        );
        assert_eq!(
            r("/apis/coordination.k8s.io/v1/namespaces/n/leases/l"),
            Some((Kind::Lease, Some("n".into()), Some("l".into()), None))
        );
        assert_eq!(r("/api/v1/pods/p"), None);
        assert_eq!(r("/apis/coordination.k8s.io/v2/leases"), None);
        assert_eq!(
            r("/apis/events.k8s.io/v1/events"),
            Some((Kind::EventV1, None, None, None))
        );
        assert_eq!(r("/api/v1/events"), Some((Kind::Event, None, None, None)));
        assert!(matches!(classify("/nonsense/a/b/c", addr), Route::NotFound));
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(42, "ns", "pod-a");
        assert_eq!(
            decode_continue(&t, Kind::Pod).unwrap(),
            (42, ("ns".into(), "pod-a".into()))
        );
        let t = encode_continue(7, "", "node-1");
        assert_eq!(
            decode_continue(&t, Kind::Node).unwrap(),
            (7, (String::new(), "node-1".into()))
        );
        assert!(decode_continue("garbage", Kind::Pod).is_err());
    }
}
