//! The Kubernetes Events a node writes, kept cheap for the API server whatever tenants do:
//! - on pods whose processes tried to reach a blocked destination: type Warning, reason
//!   `MetadataAccessBlocked` (or `MetadataAccessAudited`), at most
//!   `audit.eventsPerPodPerMinute` per pod, as **one Event series per pod**: the first write
//!   creates the Event, later ones patch it with the latest note and `series.count` = the
//!   attempts reported so far (kube-runtime's `Recorder` would keep the first note);
//! - on namespaces whose CNI enforcement changed (as probed from this node), in the
//!   namespace concerned ([`namespace_reference`]), so that its tenants see them;
//! - from the controller, Warning Events on namespaces (policy repaired, Pod Security too
//!   weak, bypassing policy) through [`NamespaceEvents`], within the controller's own budget;
//! - all of them within one per-node budget, [`EventBudget`] (`audit.eventsPerMinutePerNode`):
//!   a storm of attempts from many pods costs the API server at most that many writes a
//!   minute from this node. Attempts that find the budget spent are not lost: they stay
//!   counted for the pod and go out with its next Event; when tokens come back, pods that
//!   have waited longest (never reported first) are served first ([`PodEvents::flush`],
//!   every [`FLUSH_EVERY`]).
//!
//! Memory is bounded: per-pod state is dropped when it has nothing to report and has been
//! idle for [`POD_IDLE_TTL`], and, past [`MAX_PODS`] pods (churn), the longest idle go first.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::baseline_state::CniState;

/// Per-pod state kept at most this long without anything to report.
pub const POD_IDLE_TTL: Duration = Duration::from_secs(15 * 60);

/// At most this many pods' state (far above what one node runs: only churn reaches it).
pub const MAX_PODS: usize = 4096;

/// How often pods whose attempts are waiting (for their interval or for the budget) are
/// looked at again, and idle state is dropped.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The API server's limit on `note`.
const MAX_NOTE: usize = 1024;

// ---------------------------------------------------------------------------------------
// The per-node budget.

/// The per-node budget of Event writes: `tokens` per `window`. Each write spends a token and
/// that token comes back one `window` after it was spent, so no window ever holds more than
/// `tokens` writes (a bucket refilled at a steady rate would allow twice that in the minute
/// after a quiet spell). Cheap to clone; clones share the budget.
#[derive(Clone, Debug)]
pub struct EventBudget {
    inner: Arc<Mutex<Spent>>,
}

#[derive(Debug)]
struct Spent {
    tokens: usize,
    window: Duration,
    /// When each token in use was spent, oldest first.
    at: VecDeque<Instant>,
}

impl EventBudget {
    /// `per_minute` writes per minute (at least one).
    pub fn per_minute(per_minute: u32) -> EventBudget {
        EventBudget::new(per_minute, Duration::from_secs(60))
    }

    /// `tokens` writes per `window` (at least one).
    pub fn new(tokens: u32, window: Duration) -> EventBudget {
        let tokens = usize::try_from(tokens.max(1)).unwrap_or(usize::MAX);
        EventBudget {
            inner: Arc::new(Mutex::new(Spent {
                tokens,
                window,
                at: VecDeque::with_capacity(tokens.min(4096)),
            })),
        }
    }

    /// Spends a token if one is free at `now`.
    pub fn try_take_at(&self, now: Instant) -> bool {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let window = s.window;
        while s
            .at
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            s.at.pop_front();
        }
        if s.at.len() < s.tokens {
            s.at.push_back(now);
            true
        } else {
            false
        }
    }

    pub fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    /// When the next token comes back (`now` if one is free).
    pub fn next_free_at(&self, now: Instant) -> Instant {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if s.at.len() < s.tokens {
            return now;
        }
        s.at.front().map_or(now, |t| (*t + s.window).max(now))
    }

    /// Waits for a token and spends it.
    pub async fn take(&self) {
        loop {
            let now = Instant::now();
            if self.try_take_at(now) {
                return;
            }
            tokio::time::sleep_until(self.next_free_at(now).into()).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writing Events (events.k8s.io/v1: create, then merge-patch a series).

/// Writes events.k8s.io/v1 Events as `datalab-guard` on `instance` (the node).
#[derive(Clone)]
struct EventWriter {
    client: Client,
    instance: String,
}

/// What an Event says.
struct Report<'a> {
    type_: &'static str,
    reason: &'a str,
    action: &'a str,
    note: String,
    /// A second object the Event is about (e.g. the NetworkPolicy a repair restored).
    related: Option<ObjectReference>,
}

impl EventWriter {
    /// Creates a new Event about `regarding` (in its namespace); returns the Event's name.
    async fn create(
        &self,
        regarding: &ObjectReference,
        report: Report<'_>,
    ) -> Result<String, kube::Error> {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let now = Timestamp::now();
        let name = event_name(regarding.name.as_deref().unwrap_or("object"), now);
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(report.type_.into()),
            reason: Some(report.reason.into()),
            action: Some(report.action.into()),
            note: Some(cap_note(report.note)),
            regarding: Some(regarding.clone()),
            related: report.related,
            reporting_controller: Some(super::client::MANAGER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..K8sEvent::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await?;
        Ok(name)
    }

    /// Brings an existing Event's series up to date: the latest note and `count`.
    async fn update_series(
        &self,
        namespace: &str,
        name: &str,
        note: String,
        count: u64,
    ) -> Result<(), kube::Error> {
        let patch = json!({
            "note": cap_note(note),
            "series": {"count": count, "lastObservedTime": MicroTime(Timestamp::now())},
        });
        Api::<K8sEvent>::namespaced(self.client.clone(), namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

/// `<object>.<hex nanoseconds>` as kube-runtime and client-go name Events, the object part
/// cut so that the whole stays a valid name (≤ 253 characters).
fn event_name(object: &str, now: Timestamp) -> String {
    let suffix = format!("{:x}", now.as_nanosecond());
    let mut prefix = object.to_owned();
    let room = 253 - 1 - suffix.len();
    if prefix.len() > room {
        let mut cut = room;
        while !prefix.is_char_boundary(cut) {
            cut -= 1;
        }
        prefix.truncate(cut);
        // A name may not end in '.' or '-' before our own dot.
        while prefix.ends_with(['.', '-']) {
            prefix.pop();
        }
    }
    format!("{prefix}.{suffix}")
}

fn cap_note(mut note: String) -> String {
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    note
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The reference for an Event about namespace `name`. A Namespace is cluster-scoped, so a
/// plain reference would put the Event in `default`, out of the tenants' sight; with the
/// reference's namespace set to the namespace itself the Event lives there (the API server
/// requires an Event's namespace to equal its object's namespace when that is set).
pub fn namespace_reference(name: &str, uid: Option<&str>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Namespace".into()),
        name: Some(name.to_owned()),
        namespace: Some(name.to_owned()),
        uid: uid.map(str::to_owned),
        ..ObjectReference::default()
    }
}

// ---------------------------------------------------------------------------------------
// Pod Events.

/// One blocked attempt attributed to a pod.
#[derive(Clone, Debug)]
pub struct PodAttempt {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: Option<String>,
    pub destination: String,
    pub audited: bool,
}

impl PodAttempt {
    fn reason(&self) -> &'static str {
        if self.audited {
            "MetadataAccessAudited"
        } else {
            "MetadataAccessBlocked"
        }
    }
}

/// What this node knows about one pod's Event series.
struct PodState {
    /// The latest attempt: what the next note says.
    latest: PodAttempt,
    /// Attempts not reported yet.
    pending: u64,
    /// Attempts reported in the current series (its `series.count`).
    reported: u64,
    /// The series' Event, once created.
    event: Option<String>,
    last_sent: Option<Instant>,
    last_seen: Instant,
}

/// The pod Events of one node; see the module docs. Driven by [`publish_pod_events`].
pub struct PodEvents {
    writer: EventWriter,
    budget: EventBudget,
    interval: Duration,
    pods: HashMap<String, PodState>,
    max_pods: usize,
    /// The budget ran out with pods waiting: until a flush has served them (longest
    /// waiting first), new attempts only count, so that a pod that already had its Event
    /// does not take the token a waiting pod is owed.
    starved: bool,
}

impl PodEvents {
    /// At most `per_pod_per_minute` Events per pod per minute, all writes within `budget`.
    pub fn new(
        client: Client,
        node: &str,
        per_pod_per_minute: u32,
        budget: EventBudget,
    ) -> PodEvents {
        PodEvents {
            writer: EventWriter {
                client,
                instance: node.to_owned(),
            },
            budget,
            interval: Duration::from_secs(60) / per_pod_per_minute.max(1),
            pods: HashMap::new(),
            max_pods: MAX_PODS,
            starved: false,
        }
    }

    /// Pods whose state is kept now.
    pub fn tracked_pods(&self) -> usize {
        self.pods.len()
    }

    /// Counts an attempt and publishes the pod's Event when its interval has passed and the
    /// node's budget allows.
    pub async fn record(&mut self, attempt: PodAttempt) {
        let now = Instant::now();
        let uid = attempt.uid.clone();
        if !self.pods.contains_key(&uid) && self.pods.len() >= self.max_pods {
            self.evict(now);
        }
        let state = self.pods.entry(uid.clone()).or_insert_with(|| PodState {
            latest: attempt.clone(),
            pending: 0,
            reported: 0,
            event: None,
            last_sent: None,
            last_seen: now,
        });
        if state.latest.audited != attempt.audited {
            // The mode changed: a new reason, a new series.
            state.event = None;
            state.reported = 0;
        }
        state.latest = attempt;
        state.pending += 1;
        state.last_seen = now;
        if !self.starved {
            self.starved = !self.publish_if_due(&uid, now).await;
        }
    }

    /// Publishes what waits (pods whose interval has passed, those who waited longest
    /// first, as far as the budget allows) and drops idle state.
    pub async fn flush(&mut self) {
        let now = Instant::now();
        drop_idle(&mut self.pods, now);
        let mut due: Vec<(Option<Instant>, String)> = self
            .pods
            .iter()
            .filter(|(_, s)| self.is_due(s, now))
            .map(|(uid, s)| (s.last_sent, uid.clone()))
            .collect();
        due.sort();
        self.starved = false;
        for (_, uid) in due {
            if !self.publish_if_due(&uid, now).await {
                self.starved = true;
                break;
            }
        }
    }

    fn is_due(&self, s: &PodState, now: Instant) -> bool {
        s.pending > 0
            && s.last_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= self.interval)
    }

    /// Publishes the pod's pending attempts if due and a token is free; `false` when the
    /// budget is spent.
    async fn publish_if_due(&mut self, uid: &str, now: Instant) -> bool {
        let Some(state) = self.pods.get(uid) else {
            return true;
        };
        if !self.is_due(state, now) {
            return true;
        }
        if !self.budget.try_take_at(now) {
            return false;
        }
        let state = self.pods.get_mut(uid).expect("looked up above");
        let count = std::mem::take(&mut state.pending);
        state.last_sent = Some(now);
        state.reported += count;
        let (a, reported, series) = (state.latest.clone(), state.reported, state.event.clone());
        let note = pod_note(&a, count, reported);
        let result = match series {
            Some(name) => {
                match self
                    .writer
                    .update_series(&a.namespace, &name, note.clone(), reported)
                    .await
                {
                    // Expired (the API server's event TTL) or deleted: start a new series.
                    Err(e) if is_not_found(&e) => {
                        self.create_pod_event(&a, note).await.map(|n| (n, count))
                    }
                    other => other.map(|()| (name, reported)),
                }
            }
            None => self.create_pod_event(&a, note).await.map(|n| (n, reported)),
        };
        match result {
            Ok((name, in_series)) => {
                if let Some(state) = self.pods.get_mut(uid) {
                    state.event = Some(name);
                    state.reported = in_series;
                }
            }
            Err(e) => {
                tracing::warn!(namespace = %a.namespace, pod = %a.pod, error = %e, "cannot publish the pod Event");
            }
        }
        true
    }

    async fn create_pod_event(&self, a: &PodAttempt, note: String) -> Result<String, kube::Error> {
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(a.pod.clone()),
            namespace: Some(a.namespace.clone()),
            uid: Some(a.uid.clone()),
            ..ObjectReference::default()
        };
        let report = Report {
            type_: "Warning",
            reason: a.reason(),
            action: "BlockMetadataAccess",
            note,
            related: None,
        };
        self.writer.create(&regarding, report).await
    }

    /// Makes room for a new pod; see [`make_room`].
    fn evict(&mut self, now: Instant) {
        let (dropped, lost) = make_room(&mut self.pods, self.max_pods, now);
        if dropped > 0 {
            tracing::debug!(
                dropped_pods = dropped,
                unreported_attempts = lost,
                "pod Event state full; dropped the longest idle pods"
            );
        }
    }
}

/// Drops the state of pods with nothing to report, idle for [`POD_IDLE_TTL`].
fn drop_idle(pods: &mut HashMap<String, PodState>, now: Instant) {
    pods.retain(|_, s| s.pending > 0 || now.saturating_duration_since(s.last_seen) < POD_IDLE_TTL);
}

/// Below `max` pods again: idle state first, then the longest idle pods, a quarter of `max`
/// at a time so that churn does not pay a sort for every new pod. Returns (pods dropped
/// for room, their attempts never reported).
fn make_room(pods: &mut HashMap<String, PodState>, max: usize, now: Instant) -> (usize, u64) {
    drop_idle(pods, now);
    if pods.len() < max {
        return (0, 0);
    }
    let mut by_age: Vec<(Instant, String)> = pods
        .iter()
        .map(|(uid, s)| (s.last_seen, uid.clone()))
        .collect();
    by_age.sort();
    let mut lost = 0;
    let drop = (max / 4).max(1);
    for (_, uid) in by_age.into_iter().take(drop) {
        if let Some(s) = pods.remove(&uid) {
            lost += s.pending;
        }
    }
    (drop, lost)
}

/// The note of a pod's Event: the latest attempt, how many since the last Event, and the
/// series' total.
fn pod_note(a: &PodAttempt, since_last: u64, total: u64) -> String {
    let container = a
        .container
        .as_deref()
        .map(|c| format!(" from container {c}"))
        .unwrap_or_default();
    let verb = if a.audited {
        "would have blocked (audit mode)"
    } else {
        "blocked"
    };
    format!(
        "datalab-guard {verb} {since_last} attempt(s) to reach the instance metadata endpoint {}{container} since the last event; {total} in all",
        a.destination
    )
}

/// Feeds attempts to `publisher`, and flushes it every [`FLUSH_EVERY`], until the sender
/// goes away.
pub async fn publish_pod_events(
    mut publisher: PodEvents,
    mut attempts: mpsc::Receiver<PodAttempt>,
) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            attempt = attempts.recv() => match attempt {
                Some(a) => publisher.record(a).await,
                None => return,
            },
            _ = tick.tick() => publisher.flush().await,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Namespace Events.

/// Publishes an Event on a namespace whose CNI enforcement state changed (as probed from
/// this node), in that namespace: Warning `NetworkPolicyNotEnforced` when the CNI lets a pod
/// reach a blocked destination, Normal `NetworkPolicyEnforced` when it stops, Normal
/// `NetworkPolicyEnforcementInconclusive` when this node cannot tell. Each waits for a token
/// of the node's `budget` (changes are rare; the channel holds the few that wait).
pub async fn publish_cni_changes(
    client: Client,
    node: String,
    budget: EventBudget,
    mut changes: mpsc::Receiver<(String, Option<CniState>, CniState)>,
) {
    let writer = EventWriter {
        client,
        instance: node.clone(),
    };
    while let Some((namespace, old, new)) = changes.recv().await {
        let (type_, reason) = match new {
            CniState::NotEnforced => ("Warning", "NetworkPolicyNotEnforced"),
            CniState::Enforced => ("Normal", "NetworkPolicyEnforced"),
            CniState::Inconclusive => ("Normal", "NetworkPolicyEnforcementInconclusive"),
        };
        let note = format!(
            "probe from node {node}: CNI enforcement {} (was {}){}",
            new.as_str(),
            old.map_or("unknown", |o| o.as_str()),
            if new == CniState::NotEnforced {
                "; the eBPF guard is the only line of defence for this namespace"
            } else {
                ""
            }
        );
        budget.take().await;
        let report = Report {
            type_,
            reason,
            action: "ProbeCniEnforcement",
            note,
            related: None,
        };
        if let Err(e) = writer
            .create(&namespace_reference(&namespace, None), report)
            .await
        {
            tracing::warn!(namespace, error = %e, "cannot publish the CNI enforcement Event");
        }
    }
}

/// The controller's Warning Events on namespaces, in the namespace concerned, spending from
/// one per-process budget. Events are a courtesy on top of the log line that says the same:
/// when the budget is spent (a GitOps tool fighting us over hundreds of namespaces), the
/// Event is skipped, never queued, so the reconcile loop never waits on it.
#[derive(Clone)]
pub struct NamespaceEvents {
    writer: EventWriter,
    budget: EventBudget,
}

impl NamespaceEvents {
    /// Events reported as `datalab-guard` on `instance` (the controller's identity).
    pub fn new(client: Client, instance: String, budget: EventBudget) -> NamespaceEvents {
        NamespaceEvents {
            writer: EventWriter { client, instance },
            budget,
        }
    }

    /// A Warning Event about namespace `name`; failures and a spent budget are logged.
    pub async fn warn(
        &self,
        name: &str,
        uid: Option<&str>,
        (reason, action): (&str, &str),
        note: String,
        related: Option<ObjectReference>,
    ) {
        if !self.budget.try_take() {
            tracing::debug!(
                namespace = name,
                reason,
                "Event budget spent; namespace Event skipped (the log line above says the same)"
            );
            return;
        }
        let report = Report {
            type_: "Warning",
            reason,
            action,
            note,
            related,
        };
        if let Err(e) = self
            .writer
            .create(&namespace_reference(name, uid), report)
            .await
        {
            tracing::warn!(namespace = name, reason, error = %e, "cannot publish the namespace Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_window_holds_more_writes_than_the_budget() {
        let t0 = Instant::now();
        let budget = EventBudget::new(3, Duration::from_secs(60));
        let at = |s: u64| t0 + Duration::from_secs(s);
        // A burst uses the whole budget at once...
        assert!(budget.try_take_at(at(0)));
        assert!(budget.try_take_at(at(0)));
        assert!(budget.try_take_at(at(10)));
        assert!(!budget.try_take_at(at(10)));
        assert_eq!(budget.next_free_at(at(10)), at(60));
        // ... and each token comes back one window after it was spent, not sooner.
        assert!(!budget.try_take_at(at(59)));
        assert!(budget.try_take_at(at(60)));
        assert!(budget.try_take_at(at(60)));
        assert!(!budget.try_take_at(at(60)));
        assert!(!budget.try_take_at(at(69)));
        assert!(budget.try_take_at(at(70)));
        // A writer trying every second for ten minutes: never more than 3 in any 60 s.
        let budget = EventBudget::new(3, Duration::from_secs(60));
        let granted: Vec<u64> = (0..600).filter(|s| budget.try_take_at(at(*s))).collect();
        for (i, t) in granted.iter().enumerate() {
            let in_window = granted[i..].iter().take_while(|u| **u < t + 60).count();
            assert!(in_window <= 3, "{in_window} writes in the minute from {t}s");
        }
        assert_eq!(granted.len(), 30, "the budget is used, not starved");
        // At least one token, whatever the config says.
        let one = EventBudget::new(0, Duration::from_secs(60));
        assert!(one.try_take_at(at(0)));
        assert!(!one.try_take_at(at(1)));
    }

    fn pod(uid: &str, pending: u64, last_seen: Instant) -> (String, PodState) {
        (
            uid.to_owned(),
            PodState {
                latest: PodAttempt {
                    namespace: "t".into(),
                    pod: uid.into(),
                    uid: uid.into(),
                    container: None,
                    destination: "169.254.169.254:80".into(),
                    audited: false,
                },
                pending,
                reported: 0,
                event: None,
                last_sent: None,
                last_seen,
            },
        )
    }

    #[test]
    fn pod_state_is_dropped_when_idle_and_bounded_under_churn() {
        let t0 = Instant::now();
        let later = t0 + POD_IDLE_TTL;
        // Idle with nothing to report: dropped after the TTL, not before; with attempts
        // waiting: kept (they go out with the next flush).
        let mut pods: HashMap<_, _> = [
            pod("idle", 0, t0),
            pod("waiting", 3, t0),
            pod("recent", 0, later - Duration::from_secs(1)),
        ]
        .into();
        drop_idle(&mut pods, later - Duration::from_secs(1));
        assert_eq!(pods.len(), 3);
        drop_idle(&mut pods, later);
        let mut left: Vec<_> = pods.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["recent", "waiting"]);

        // Full of busy pods: the longest idle quarter goes, whatever it had pending.
        let mut pods: HashMap<_, _> = (0..8)
            .map(|i| pod(&format!("p{i}"), 1, t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(make_room(&mut pods, 8, t0 + Duration::from_secs(8)), (2, 2));
        assert_eq!(pods.len(), 6);
        assert!(!pods.contains_key("p0") && !pods.contains_key("p1"));
        assert_eq!(make_room(&mut pods, 8, t0), (0, 0), "room enough");
    }

    #[test]
    fn event_names_stay_valid() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        assert_eq!(
            event_name("web-0", now),
            format!("web-0.{:x}", now.as_nanosecond())
        );
        let long = format!("{}-{}", "a".repeat(240), "b".repeat(12));
        let name = event_name(&long, now);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.starts_with("aaaa"));
        let dotted = format!("{}.{}", "a".repeat(235), "b".repeat(17));
        let name = event_name(&dotted, now);
        assert!(name.len() <= 253 && !name.contains(".."), "{name}");
    }

    #[test]
    fn notes_are_capped_at_the_api_limit() {
        assert_eq!(cap_note("short".into()), "short");
        let capped = cap_note("é".repeat(800));
        assert!(capped.len() <= MAX_NOTE && capped.ends_with("..."));
    }

    #[test]
    fn namespace_events_live_in_the_namespace() {
        let r = namespace_reference("tenant-a", Some("uid-1"));
        assert_eq!(r.kind.as_deref(), Some("Namespace"));
        assert_eq!(r.name.as_deref(), Some("tenant-a"));
        assert_eq!(r.namespace.as_deref(), Some("tenant-a"));
        assert_eq!(r.uid.as_deref(), Some("uid-1"));
    }
}
