//! Watch streams: chunked HTTP responses of one JSON watch event per line.
//!
//! A watch starts after the requested resourceVersion by replaying the change history, or,
//! without one (or with `0`, or with `sendInitialEvents=true`), with a synthetic ADDED event
//! per existing object. It then follows new changes, sends a BOOKMARK every bookmark interval
//! (about a minute by default, as a real watch cache) when `allowWatchBookmarks=true`, and
//! ends after `timeoutSeconds` (without it, after a random 5–10 min, as the real server picks
//! one), on `drop_watches()`, or when the server goes down. `stall_watches()` silences open
//! streams without ending them. A resourceVersion older than the history is answered the way
//! a real API server answers it: HTTP 200 and one ERROR event carrying a 410 `Expired`
//! Status, then the end of the stream; or, with [`super::ExpiredWatch::HttpGone`], an HTTP
//! 410 on the watch request itself. (kube-runtime 5.0 re-lists on the event, but retries the
//! same resourceVersion forever on the HTTP 410.)

use std::{
    convert::Infallible,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt as _;
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    lock,
    resources::Kind,
    selectors::{FieldSelector, LabelSelector},
    status::ApiError,
    store::{Change, ChangeType},
    watch_cache, Body, Shared,
};

pub(crate) struct WatchRequest {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
    pub metadata_only: bool,
}

impl WatchRequest {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns) {
                return false;
            }
        }
        self.labels.matches(obj) && self.fields.matches(self.kind, obj)
    }

    fn object(&self, obj: &Value) -> Value {
        if self.metadata_only {
            partial_object_metadata(obj)
        } else {
            obj.clone()
        }
    }

    /// The event a change means for this watch: selectors turn a MODIFIED into an ADDED
    /// (starts matching) or a DELETED of the previous state (stops matching), as the real
    /// API server's watch cache does.
    fn convert(&self, ch: &Change) -> Option<Bytes> {
        if ch.kind != self.kind {
            return None;
        }
        let new_m = self.matches(&ch.new);
        let old_m = ch.old.as_ref().is_some_and(|o| self.matches(o));
        let (ty, obj) = match ch.ty {
            ChangeType::Added if new_m => ("ADDED", self.object(&ch.new)),
            ChangeType::Deleted if new_m => ("DELETED", self.object(&ch.new)),
            ChangeType::Modified => match (old_m, new_m) {
                (true, true) => ("MODIFIED", self.object(&ch.new)),
                (false, true) => ("ADDED", self.object(&ch.new)),
                (true, false) => {
                    let mut old = ch.old.clone().unwrap_or_default();
                    old["metadata"]["resourceVersion"] = json!(ch.rv.to_string());
                    ("DELETED", self.object(&old))
                }
                (false, false) => return None,
            },
            _ => return None,
        };
        Some(frame(ty, &obj))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let (api_version, kind) = if self.metadata_only {
            ("meta.k8s.io/v1", "PartialObjectMetadata")
        } else {
            (self.kind.api_version(), self.kind.kind_name())
        };
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        frame(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
        )
    }
}

pub(crate) fn partial_object_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

fn frame(ty: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": obj})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn expired_frame(message: String) -> Bytes {
    frame("ERROR", &ApiError::gone(message).to_status())
}

/// Decrements the open-watch count when the stream task ends, however it ends.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn start(shared: &Arc<Shared>, req: WatchRequest) -> Result<Response<Body>, ApiError> {
    // Subscribe before reading the store so no change falls between snapshot and stream.
    let mut changed = shared.changed.subscribe();
    let mut dropped = shared.dropper.subscribe();

    let requested = match req.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {s:?}")))?,
        ),
    };

    let (interval, timeout, expired_watch, frozen) = {
        let settings = lock(&shared.settings);
        (
            settings.bookmark_interval,
            settings.watch_timeout(req.timeout),
            settings.expired_watch,
            settings.cache_frozen_at,
        )
    };
    let mut initial: Vec<Bytes> = Vec::new();
    let mut expired = false;
    let mut cursor;
    {
        let store = lock(&shared.store);
        // A lagging watch cache (see `watch_cache`) serves nothing newer than its own state.
        cursor = watch_cache::cache_rv(frozen, store.rv());
        match requested {
            Some(rv) if !req.send_initial_events => {
                if rv < store.oldest_rv() {
                    let message = format!("too old resource version: {rv} ({})", store.oldest_rv());
                    if expired_watch == super::ExpiredWatch::HttpGone {
                        return Err(ApiError::gone(message));
                    }
                    initial.push(expired_frame(message));
                    expired = true;
                } else if let Some(changes) = store.changes_after(rv) {
                    initial.extend(
                        changes
                            .iter()
                            .filter(|c| c.rv <= cursor)
                            .filter_map(|c| req.convert(c)),
                    );
                    // A resourceVersion from the future: nothing up to it is delivered.
                    cursor = cursor.max(rv);
                }
            }
            _ => {
                let lagging = (cursor < store.rv())
                    .then(|| store.snapshot_at(req.kind, cursor).ok())
                    .flatten();
                let current = || store.objects(req.kind, req.namespace.as_deref());
                let objects: Vec<&Value> = match &lagging {
                    Some(snapshot) => snapshot.iter().collect(),
                    None => current(),
                };
                for obj in objects {
                    if req.matches(obj) {
                        initial.push(frame("ADDED", &req.object(obj)));
                    }
                }
                if req.send_initial_events {
                    initial.push(req.bookmark(cursor, true));
                }
            }
        }
    }

    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    let mut stalled = shared.staller.subscribe();
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let shared = task_shared;
        let _open = OpenWatch(shared.clone());
        for f in initial {
            if tx.send(f).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        let until_deadline = tokio::time::sleep(timeout);
        tokio::pin!(until_deadline);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Biased: once drop_watches() has returned, no later change is delivered on
            // this stream, even if the change is already waiting too.
            tokio::select! {
                biased;
                _ = tx.closed() => break,
                _ = dropped.changed() => break,
                _ = &mut until_deadline => break,
                _ = stalled.changed() => {
                    // Silent until the client gives up or the server cuts everything (the
                    // server-side end would never reach the client either).
                    tokio::select! {
                        _ = tx.closed() => {}
                        _ = dropped.changed() => {}
                    }
                    break;
                }
                r = changed.changed() => {
                    if r.is_err() {
                        break;
                    }
                    let frozen = lock(&shared.settings).cache_frozen_at;
                    let (frames, gap) = {
                        let store = lock(&shared.store);
                        let upto = watch_cache::cache_rv(frozen, store.rv()).max(cursor);
                        match store.changes_after(cursor) {
                            Some(changes) => {
                                let frames: Vec<Bytes> = changes
                                    .iter()
                                    .filter(|c| c.rv <= upto)
                                    .filter_map(|c| req.convert(c))
                                    .collect();
                                cursor = upto;
                                (frames, None)
                            }
                            None => (Vec::new(), Some(store.oldest_rv())),
                        }
                    };
                    if let Some(oldest) = gap {
                        let _ = tx
                            .send(expired_frame(format!(
                                "too old resource version: {cursor} ({oldest})"
                            )))
                            .await;
                        break;
                    }
                    for f in frames {
                        if tx.send(f).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tick.tick(), if req.bookmarks => {
                    if tx.send(req.bookmark(cursor, false)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });

    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let body = BodyExt::boxed(StreamBody::new(stream));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))
}
