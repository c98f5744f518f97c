//! One resource's list-and-watch loop, feeding a kube-runtime reflector store: the list,
//! the watch from its resourceVersion, and recovery that cannot stall.
//!
//! Why not kube-runtime's `watcher`: in kube-runtime 5.0 it swallows bookmarks and successful
//! watch (re)starts, so neither can reset a backoff or show that a quiet watch is healthy;
//! its caller can only see delivered objects. And an HTTP 410 answering the watch request
//! (instead of an ERROR event in the stream) makes it retry the same expired resourceVersion
//! forever. Here:
//! - a 410 Gone (ERROR event or HTTP status) relists at once, without a backoff sleep (only a
//!   second desync in a row with nothing delivered in between waits, so a broken server is
//!   not hammered with full lists);
//! - the backoff ([`WatchBackoff`], 0.2 s to 4 s) is reset when the server answers a watch
//!   request, delivers an event or a bookmark, or completes a list;
//! - bookmarks are requested, and every event or bookmark refreshes [`WatchStats`], so the
//!   staleness metric of a quiet healthy watch stays below the bookmark interval;
//! - no request can hang: list pages and watch starts time out after [`REQUEST_TIMEOUT`],
//!   and a stream with no event and no bookmark for [`IDLE_TIMEOUT`] (a blackholed or
//!   stalled connection) is dropped and re-watched.
//!
//! During a relist the store keeps its previous contents until the new list is complete
//! (`Init` … `InitDone`), so what is enforced never changes because of a failure.

use std::{
    fmt::{self, Debug, Display},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use kube::{
    api::{ListParams, WatchEvent, WatchParams},
    core::Status,
    runtime::watcher::Event,
    Api, Resource, ResourceExt as _,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use super::{
    backoff::{unit_random, WatchBackoff},
    retry,
    store::WatchSink,
};

/// Longest wait for a list page or for the API server to start answering a watch.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A watch with neither an event nor a bookmark for this long is taken for dead (API servers
/// send a bookmark about every minute) and re-opened from its last resourceVersion.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Page size of lists (client-go's default).
const PAGE_SIZE: u32 = 500;
/// A watch that ends sooner than this having delivered nothing counts as a failure (waits the
/// backoff before the next one), so a server that closes every watch at once is not looped on.
const SHORT_WATCH: Duration = Duration::from_secs(1);

/// Health of one watch, shared with the metrics: when it last heard from the API server,
/// how often it relisted, how many errors it met.
#[derive(Debug)]
pub struct WatchStats {
    origin: Instant,
    /// Milliseconds after `origin` of the last event, bookmark or completed list.
    last_seen_ms: AtomicU64,
    relists: AtomicU64,
    errors: AtomicU64,
}

impl Default for WatchStats {
    fn default() -> Self {
        WatchStats {
            origin: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            relists: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }
}

impl WatchStats {
    /// Time since the watch last delivered an event or a bookmark or completed a list (since
    /// the agent started, before the first one).
    pub fn staleness(&self) -> Duration {
        let last = Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Completed lists after the first (after a 410 Gone or an unrecoverable watch).
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::Relaxed)
    }

    /// Failed requests, ERROR events (410 included), undecodable events and stalled streams.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn heard_from_server(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_seen_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// Why a list or a watch did not go on.
enum Failure {
    Api(kube::Error),
    ErrorEvent(Box<Status>),
    TimedOut(&'static str),
    Stalled,
}

impl Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Api(e) => write!(f, "{}", crate::cri::error::error_chain(e)),
            Failure::ErrorEvent(s) => {
                write!(f, "ERROR event {} {}: {}", s.code, s.reason, s.message)
            }
            Failure::TimedOut(what) => write!(f, "{what}: no answer within {REQUEST_TIMEOUT:?}"),
            Failure::Stalled => write!(f, "no event or bookmark for {IDLE_TIMEOUT:?}"),
        }
    }
}

impl Failure {
    /// How long to wait before the next attempt: `backoff`, or the server's Retry-After
    /// (429 Too Many Requests, 5xx) if it asked for longer.
    fn delay(&self, backoff: Duration) -> Duration {
        match self {
            Failure::Api(e) => retry::delay_after(e, backoff),
            Failure::ErrorEvent(s) => retry::asked_delay(s).map_or(backoff, |d| d.max(backoff)),
            Failure::TimedOut(_) | Failure::Stalled => backoff,
        }
    }
}

/// 410 Gone: the resourceVersion is older than the server's history; only a list helps.
fn is_expired(status: &Status) -> bool {
    status.code == 410 || status.reason == "Expired" || status.reason == "Gone"
}

/// What ended a watch phase: the client's resourceVersion is no longer served.
struct Desync {
    /// Whether anything (event or bookmark) arrived since the list.
    delivered: bool,
}

/// The loop for one resource. Build with [`Informer::new`], run with [`Informer::run`].
pub struct Informer<K: Resource<DynamicType = ()> + Clone + 'static, S: WatchSink<K>> {
    what: &'static str,
    api: Api<K>,
    field_selector: Option<String>,
    sink: S,
    stats: Arc<WatchStats>,
    changed: Arc<Notify>,
    backoff: WatchBackoff,
    failing: bool,
    /// What the failure log line adds about the consequence (see [`Informer::failure_note`]).
    note: &'static str,
}

impl<K, S> Informer<K, S>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    S: WatchSink<K>,
{
    /// `what` names the resource in logs; `sink` stores what arrives (see [`super::store`]);
    /// `changed` is poked on every change of the store.
    pub fn new(
        what: &'static str,
        api: Api<K>,
        field_selector: Option<String>,
        sink: S,
        stats: Arc<WatchStats>,
        changed: Arc<Notify>,
    ) -> Self {
        Informer {
            what,
            api,
            field_selector,
            sink,
            stats,
            changed,
            backoff: WatchBackoff::default(),
            failing: false,
            note: "enforcement unchanged",
        }
    }

    /// What a failure means for the process, said in the one warning line per failure streak
    /// (default: the node's "enforcement unchanged").
    #[must_use]
    pub fn failure_note(mut self, note: &'static str) -> Self {
        self.note = note;
        self
    }

    /// Lists and watches until the task is dropped.
    pub async fn run(mut self) {
        let mut listed_once = false;
        // Paces desyncs that follow each other with nothing delivered in between.
        let mut desync_backoff = WatchBackoff::default();
        let mut desyncs_in_a_row = 0u32;
        loop {
            let resource_version = match self.list().await {
                Ok(rv) => rv,
                Err(e) => {
                    self.failed("list", &e);
                    tokio::time::sleep(e.delay(self.backoff.next_delay())).await;
                    continue;
                }
            };
            if listed_once {
                self.stats.relists.fetch_add(1, Ordering::Relaxed);
            }
            listed_once = true;
            let Desync { delivered } = self.watch_from(resource_version).await;
            if delivered {
                desyncs_in_a_row = 0;
                desync_backoff.reset();
            }
            desyncs_in_a_row += 1;
            if desyncs_in_a_row > 1 {
                tokio::time::sleep(desync_backoff.next_delay()).await;
            }
        }
    }

    /// A full paginated list into the store; returns the list's resourceVersion.
    async fn list(&mut self) -> Result<String, Failure> {
        let mut params = ListParams {
            field_selector: self.field_selector.clone(),
            limit: Some(PAGE_SIZE),
            ..ListParams::default()
        };
        // The store keeps its contents until InitDone; an interrupted list is simply
        // restarted by the next Init.
        self.sink.apply(Event::Init);
        loop {
            let page = tokio::time::timeout(REQUEST_TIMEOUT, self.api.list(&params))
                .await
                .map_err(|_| Failure::TimedOut("list"))?
                .map_err(Failure::Api)?;
            for obj in page.items {
                self.sink.apply(Event::InitApply(obj));
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params.continue_token = Some(token),
                None => {
                    let rv = page.metadata.resource_version.unwrap_or_default();
                    self.sink.apply(Event::InitDone);
                    self.changed.notify_one();
                    self.answered();
                    self.stats.heard_from_server();
                    return Ok(rv);
                }
            }
        }
    }

    /// Watches from `rv` (re-opening ended or failed watches) until the server no longer
    /// serves the client's resourceVersion.
    async fn watch_from(&mut self, mut rv: String) -> Desync {
        let mut delivered = false;
        loop {
            let params = WatchParams {
                field_selector: self.field_selector.clone(),
                // client-go's spread: 5–10 min, so a cluster's watches do not end together.
                timeout: Some(300 + (300.0 * unit_random()) as u32),
                bookmarks: true,
                ..WatchParams::default()
            };
            let stream =
                match tokio::time::timeout(REQUEST_TIMEOUT, self.api.watch(&params, &rv)).await {
                    Ok(Ok(stream)) => stream,
                    // 410: history lost. 504 "Too large resource version": the server's
                    // watch cache is behind our list (another API server instance, a
                    // lagging cache); only a fresh list resynchronises either.
                    Ok(Err(kube::Error::Api(status)))
                        if is_expired(&status) || retry::is_too_large_resource_version(&status) =>
                    {
                        self.desynced(&Failure::Api(kube::Error::Api(status)));
                        return Desync { delivered };
                    }
                    Ok(Err(e)) => {
                        self.retry_after("watch", &Failure::Api(e)).await;
                        continue;
                    }
                    Err(_) => {
                        self.retry_after("watch", &Failure::TimedOut("watch")).await;
                        continue;
                    }
                };
            // The server answers again: whatever failed before, retries start short.
            self.answered();
            let opened = Instant::now();
            match self.follow(stream, &mut rv, &mut delivered).await {
                StreamEnd::Expired(status) => {
                    self.desynced(&Failure::ErrorEvent(status));
                    return Desync { delivered };
                }
                StreamEnd::Failed(e) => self.retry_after("watch stream", &e).await,
                StreamEnd::Closed { delivered_any } => {
                    if !delivered_any && opened.elapsed() < SHORT_WATCH {
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    }
                }
            }
        }
    }

    /// Reads one watch stream into the store until it ends.
    async fn follow(
        &mut self,
        stream: impl Stream<Item = kube::Result<WatchEvent<K>>>,
        rv: &mut String,
        delivered: &mut bool,
    ) -> StreamEnd {
        let mut stream = std::pin::pin!(stream);
        let mut delivered_any = false;
        loop {
            let item = match tokio::time::timeout(IDLE_TIMEOUT, stream.next()).await {
                Err(_) => return StreamEnd::Failed(Failure::Stalled),
                Ok(None) => return StreamEnd::Closed { delivered_any },
                Ok(Some(item)) => item,
            };
            let event = match item {
                Ok(WatchEvent::Added(obj) | WatchEvent::Modified(obj)) => Some(Event::Apply(obj)),
                Ok(WatchEvent::Deleted(obj)) => Some(Event::Delete(obj)),
                Ok(WatchEvent::Bookmark(bookmark)) => {
                    *rv = bookmark.metadata.resource_version;
                    None
                }
                Ok(WatchEvent::Error(status)) if is_expired(&status) => {
                    return StreamEnd::Expired(status);
                }
                Ok(WatchEvent::Error(status)) => {
                    return StreamEnd::Failed(Failure::ErrorEvent(status));
                }
                Err(e) => {
                    // One undecodable line; the stream itself goes on (a broken connection
                    // ends it next).
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(what = self.what, error = %e, "undecodable watch event skipped");
                    continue;
                }
            };
            delivered_any = true;
            *delivered = true;
            self.stats.heard_from_server();
            self.answered();
            if let Some(event) = event {
                if let Event::Apply(obj) | Event::Delete(obj) = &event {
                    if let Some(v) = obj.resource_version().filter(|v| !v.is_empty()) {
                        *rv = v;
                    }
                }
                self.sink.apply(event);
                self.changed.notify_one();
            }
        }
    }

    /// The API server answered: reset the backoff, and say so once after failures.
    fn answered(&mut self) {
        self.backoff.reset();
        if self.failing {
            tracing::info!(what = self.what, "watch recovered");
            self.failing = false;
        }
    }

    fn failed(&mut self, step: &'static str, e: &Failure) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.failing {
            tracing::debug!(what = self.what, step, error = %e, "watch still failing");
        } else {
            tracing::warn!(what = self.what, step, error = %e, "watch failed; retrying, {}", self.note);
            self.failing = true;
        }
    }

    /// Logs the failure and waits the backoff, or the server's Retry-After if longer.
    async fn retry_after(&mut self, step: &'static str, e: &Failure) {
        self.failed(step, e);
        tokio::time::sleep(e.delay(self.backoff.next_delay())).await;
    }

    fn desynced(&self, e: &Failure) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::info!(what = self.what, error = %e, "resourceVersion expired; relisting now, {}", self.note);
    }
}

enum StreamEnd {
    /// The server closed the stream (its timeout, a restart): re-watch from the last
    /// resourceVersion.
    Closed {
        delivered_any: bool,
    },
    Expired(Box<Status>),
    Failed(Failure),
}
