//! The node agent's reconcile loop: on a watch event, a cgroup appearing or going, the
//! periodic tick or a SIGHUP, bring the verdict map in line with the caches (coalesced to
//! one reconcile per [`RECONCILE_MIN_INTERVAL`]), publish the views the metrics and the
//! audit stream read, and write the state file. Pod cgroups the API does not know are asked
//! of the container runtime ([`super::runtime_classify`]) off the loop; the answers come
//! back as one more wake-up and their entries are written at once.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{
    context::Context,
    index::{pod_uid_of, Desired, PodIndex},
    outputs::Outputs,
    runtime_classify::{RuntimeAnswer, RuntimeLookups, NEW_CGROUP_WAIT},
};
use crate::{
    cgroups::{pod::DiscoveredPod, watch::CgroupEvent},
    config::ConfigSource,
    cri::SandboxInfo,
    http::HttpState,
    probe::ProbeSettings,
    runtime::{Hangup, Termination},
};

/// Minimum time between two full reconciles: with thousands of pods (or tens of thousands
/// of namespaces) a burst of watch events must not queue reconciles. New pods do not wait
/// for one: a new cgroup of an announced pod, and a pod announced after its cgroup, get
/// their entries on the event itself; the full reconcile batches the rest (deletions,
/// relabelled namespaces, the state file) and keeps a relabel's effect under a second.
pub const RECONCILE_MIN_INTERVAL: Duration = Duration::from_millis(200);
/// A full reconcile holds up the event path while it runs (tens of milliseconds with
/// 10 000 pods on the node), so the next one waits at least this many times as long as the
/// last took: under churn the loop spends at most a tenth of its time reconciling.
const RECONCILE_SPACING_FACTOR: u32 = 10;
/// ... but never longer than this, so that a relabel still takes effect within seconds.
const RECONCILE_MAX_INTERVAL: Duration = Duration::from_secs(2);
/// A reconcile (and a state file write) at least this often, events or not.
pub const PERIODIC_RECONCILE: Duration = Duration::from_secs(5);

const READY: &str = "programs attached and maps hold the current verdicts";

/// The loop's state besides the shared [`Context`].
pub struct Reconciler {
    pub ctx: Arc<Context>,
    pub http: Arc<HttpState>,
    pub index: PodIndex,
    /// Re-read on SIGHUP.
    pub config_source: ConfigSource,
    /// This agent's own pod (always exempt).
    pub own_pod_uid: Option<String>,
    /// The CNI probe's settings; a reload sends the new ones (next probe round).
    pub probe_settings: tokio::sync::watch::Sender<ProbeSettings>,
    /// The state file and the state cache (the cache from API-synced reconciles only),
    /// written off the loop.
    pub outputs: Outputs,
    /// Container runtime lookups for pod cgroups the API does not know.
    pub runtime: RuntimeLookups,
    /// The pod-edge layer on guarded pods' host-side interfaces.
    pub edge: super::edge::NodeEdge,
}

/// Why the loop woke up.
enum Wake {
    Reconcile,
    Dirty,
    StateFile,
    /// A pod the edge layer could not cover yet is due for another attempt.
    EdgeRetry,
    Stop,
}

impl Reconciler {
    /// Runs until SIGTERM/SIGINT.
    pub async fn run(
        mut self,
        mut cgroup_events: mpsc::Receiver<CgroupEvent>,
        mut runtime_answers: mpsc::Receiver<RuntimeAnswer>,
        hangup: &mut Hangup,
        termination: &mut Termination,
    ) {
        let changed = self.ctx.view.changed();
        let mut last_reconcile = Instant::now();
        let mut spacing = RECONCILE_MIN_INTERVAL;
        let mut dirty = false;
        loop {
            let debounce = tokio::time::sleep_until((last_reconcile + spacing).into());
            let state_file_due = self.outputs.state_file_due();
            let state_file =
                tokio::time::sleep_until(state_file_due.unwrap_or_else(Instant::now).into());
            let edge_due = self.edge.next_retry();
            let edge_retry = tokio::time::sleep_until(edge_due.unwrap_or_else(Instant::now).into());
            let wake = tokio::select! {
                _ = changed.notified() => {
                    self.on_api_change();
                    Wake::Dirty
                },
                Some(event) = cgroup_events.recv() => {
                    self.on_cgroup_event(&event);
                    Wake::Dirty
                },
                Some(answer) = runtime_answers.recv() => {
                    self.on_runtime_answer(answer);
                    Wake::Dirty
                },
                _ = debounce, if dirty => Wake::Reconcile,
                _ = state_file, if state_file_due.is_some() => Wake::StateFile,
                _ = edge_retry, if edge_due.is_some() => Wake::EdgeRetry,
                _ = hangup.received() => {
                    self.reload();
                    Wake::Reconcile
                },
                _ = tokio::time::sleep(PERIODIC_RECONCILE) => Wake::Reconcile,
                _ = termination.terminated() => Wake::Stop,
            };
            match wake {
                Wake::Dirty => dirty = true,
                Wake::StateFile => self.outputs.write_state_file(&self.ctx, &self.index.policy),
                Wake::EdgeRetry => {
                    if self.edge.retry_due() {
                        *self.ctx.edge.lock().expect("edge lock") = Some(self.edge.sample());
                    }
                }
                Wake::Stop => return,
                Wake::Reconcile => {
                    dirty = false;
                    last_reconcile = Instant::now();
                    self.reconcile();
                    spacing = (last_reconcile.elapsed() * RECONCILE_SPACING_FACTOR)
                        .clamp(RECONCILE_MIN_INTERVAL, RECONCILE_MAX_INTERVAL);
                }
            }
        }
    }

    /// One full reconcile: compute, write the map, publish, write the state file.
    pub fn reconcile(&mut self) {
        let started = Instant::now();
        let previous = std::mem::take(&mut *self.ctx.owners.write().expect("owners lock"));
        let desired = self.index.desired(&self.ctx.view, previous);
        self.ctx.runtime.set_pods(self.index.runtime_count());
        let entries = desired.verdicts.len();
        self.apply_and_publish(desired);
        // New pods' entries wait while this runs: its duration is their worst latency.
        tracing::debug!(
            entries,
            elapsed_us = started.elapsed().as_micros() as u64,
            "reconciled"
        );
    }

    /// Writes the map (a no-op right after an install that wrote the same entries), then
    /// publishes the owners, gauges and classes and writes the state file.
    pub fn apply_and_publish(&mut self, desired: Desired) {
        let applied = self.apply(&desired);
        let guarded = super::edge::guarded_pods(&desired, &self.index, &self.ctx.view);
        self.edge.sync(&guarded);
        let lsm = (self.ctx.session.lock().expect("session lock").as_ref())
            .is_some_and(|s| s.settings().deny_raw_sockets);
        self.edge.count_net_raw(&guarded, lsm);
        *self.ctx.edge.lock().expect("edge lock") = Some(self.edge.sample());
        let Desired {
            owners,
            gauges,
            rows,
            ..
        } = desired;
        *self.ctx.owners.write().expect("owners lock") = owners;
        *self.ctx.gauges.lock().expect("gauges lock") = gauges;
        *self.ctx.classes.write().expect("classes lock") = self.index.classes.snapshot();
        let net_raw = (self.edge.net_raw_exposed())
            .map(|exposed| super::net_raw::NetRawReport::new(exposed, &rows));
        self.outputs
            .synced(rows, net_raw, &self.ctx, &self.index.policy);
        // Ready once the map holds the verdicts and the state file says so.
        if applied {
            self.http.set_ready(true, READY);
        }
    }

    /// Writes the verdict map; on failure reports not ready. `true` when written.
    fn apply(&self, desired: &Desired) -> bool {
        let result = {
            let mut slot = self.ctx.session.lock().expect("session lock");
            let session = slot
                .as_mut()
                .expect("the session is installed before the loop");
            session.maps_mut().reconcile_verdicts(&desired.verdicts)
        };
        match result {
            Ok(changes) => {
                if changes != Default::default() {
                    tracing::info!(
                        added = changes.added,
                        updated = changes.updated,
                        removed = changes.removed,
                        entries = desired.verdicts.len(),
                        "verdict map reconciled"
                    );
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reconcile the verdict map");
                self.http.set_ready(false, "verdict map not reconciled");
                false
            }
        }
    }

    /// A watch event: pods announced after their cgroup appeared get their entries at once.
    fn on_api_change(&mut self) {
        let classes = self.index.classes.len();
        for (id, entry) in self.index.announced_with_cgroup(&self.ctx.view) {
            self.write_entry(id, entry);
        }
        self.publish_new_classes(classes);
    }

    /// The event path may have given a namespace its counter class: the metrics name it at
    /// once rather than at the next reconcile.
    fn publish_new_classes(&self, classes_before: usize) {
        if self.index.classes.len() != classes_before {
            *self.ctx.classes.write().expect("classes lock") = self.index.classes.snapshot();
        }
    }

    fn on_cgroup_event(&mut self, event: &CgroupEvent) {
        self.index.observe(event);
        match event {
            CgroupEvent::Created(path) => {
                if !self.fast_path(path) {
                    self.ask_runtime(path);
                }
            }
            CgroupEvent::Rescan(found) => self.ask_runtime_about_unknown(found),
            CgroupEvent::Removed(_) => {}
        }
    }

    /// A new pod cgroup of a pod the API already announced gets its entry at once. False
    /// when the API does not know the pod (or `path` is not a pod cgroup).
    fn fast_path(&mut self, path: &Path) -> bool {
        let classes = self.index.classes.len();
        let Some((id, entry)) = self.index.new_pod_cgroup(&self.ctx.view, path) else {
            return false;
        };
        self.write_entry(id, entry);
        self.publish_new_classes(classes);
        true
    }

    fn write_entry(&self, id: u64, entry: datalab_guard_common::VerdictEntry) {
        if let Some(session) = self.ctx.session.lock().expect("session lock").as_mut() {
            if let Err(e) = session.maps_mut().set_verdict(id, entry) {
                tracing::warn!(error = %e, "cannot write the new pod's entry");
            }
        }
    }

    /// A pod cgroup (or the first container directory in one: the runtime lists a sandbox
    /// only once it runs) the API does not know: ask the runtime, off the loop.
    pub(super) fn ask_runtime(&mut self, path: &Path) {
        let pod_dir = match pod_uid_of(path) {
            Some(_) => path,
            None => match path.parent() {
                Some(parent) if pod_uid_of(parent).is_some() => parent,
                _ => return,
            },
        };
        let Some(uid) = pod_uid_of(pod_dir) else {
            return;
        };
        if self.index.runtime_knows(&uid) || self.index.api_knows(&self.ctx.view, &uid) {
            return;
        }
        self.runtime
            .look_up(uid, pod_dir.to_path_buf(), NEW_CGROUP_WAIT);
    }

    /// The periodic rescan: pod cgroups nobody has classified yet are asked about again
    /// (the runtime may have been down, or the sandbox not listed within the first wait).
    pub(super) fn ask_runtime_about_unknown(&mut self, found: &[DiscoveredPod]) {
        if !self.runtime.enabled() {
            return;
        }
        for pod in found {
            if !self.index.runtime_knows(&pod.uid)
                && !self.runtime.is_in_flight(&pod.uid)
                && !self.index.api_knows(&self.ctx.view, &pod.uid)
            {
                self.runtime
                    .look_up(pod.uid.clone(), pod.dir.path.clone(), Duration::ZERO);
            }
        }
    }

    /// What the runtime answered: entries for the pods the API still does not know.
    pub(super) fn on_runtime_answer(&mut self, answer: RuntimeAnswer) {
        match answer {
            RuntimeAnswer::Pod { uid, path, found } => {
                self.runtime.done(&uid);
                if let Some(sandbox) = found.filter(|s| s.uid == uid) {
                    self.adopt(sandbox, Some(&path));
                }
            }
            RuntimeAnswer::Listed(all) => {
                for sandbox in current_sandboxes(all) {
                    self.adopt(sandbox, None);
                }
            }
            RuntimeAnswer::Failed { uid } => {
                if let Some(uid) = uid {
                    self.runtime.done(&uid);
                }
            }
        }
    }

    fn adopt(&mut self, sandbox: SandboxInfo, path: Option<&Path>) {
        if let Some((id, entry)) = self.index.adopt_runtime_pod(&self.ctx.view, sandbox, path) {
            self.write_entry(id, entry);
        }
    }

    /// SIGHUP: read the config again (`runtime` settings are read at start only) and apply it, the datapath first. A config that does
    /// not load, or that the kernel side refuses (e.g. `denyRawSockets` without the BPF
    /// LSM), is rejected as a whole and the previous one stays in force.
    pub(super) fn reload(&mut self) {
        let config = match self.config_source.load() {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reloaded configuration rejected; keeping the previous one");
                return;
            }
        };
        if let Some(session) = self.ctx.session.lock().expect("session lock").as_mut() {
            if let Err(e) = session.reload(config.datapath(), &config.blocklist()) {
                tracing::error!(error = %format!("{e:#}"), "reloaded configuration rejected by the datapath; keeping the previous one");
                return;
            }
        }
        self.index.policy = config.policy_config(self.own_pod_uid.clone());
        self.outputs.policy_changed();
        self.probe_settings
            .send_replace(ProbeSettings::from_config(&config, &config.blocklist()));
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        tracing::info!("configuration reloaded (SIGHUP)");
    }
}

/// One sandbox per pod uid from a full listing: a ready one before a stopped one, then the
/// newest (a pod can have stopped sandboxes of earlier attempts).
fn current_sandboxes(all: Vec<SandboxInfo>) -> Vec<SandboxInfo> {
    let mut by_uid: std::collections::HashMap<String, SandboxInfo> = Default::default();
    for s in all {
        let better = by_uid
            .get(&s.uid)
            .is_none_or(|old| (s.ready, s.created_at_ns) > (old.ready, old.created_at_ns));
        if better {
            by_uid.insert(s.uid.clone(), s);
        }
    }
    by_uid.into_values().collect()
}
