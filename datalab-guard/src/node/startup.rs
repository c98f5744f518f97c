//! The node agent before its first full API sync: what it installs at once (the state
//! cache's verdicts for the pod cgroups found on the node, over what a previous agent left
//! pinned), and the loop that keeps classifying new pod cgroups from the cache until both
//! initial lists (namespaces, this node's pods) have arrived. `/readyz` stays false all
//! along; the API-synced reconcile loop ([`super::reconcile`]) takes over from there.

use std::{collections::BTreeMap, path::Path, time::SystemTime};

use datalab_guard_common::VerdictEntry;
use tokio::sync::mpsc;

use super::{
    cache::{Classified, LoadedCache},
    reconcile::{Reconciler, PERIODIC_RECONCILE},
    runtime_classify::RuntimeAnswer,
    state_file::{unix_secs, EnforcingFrom, StateFile},
};
use crate::{
    bpf::{GuardMaps, PinLayout},
    cgroups::{
        self,
        pod::{self as podcgroup, CgroupDriver, DiscoveredPod},
        watch::CgroupEvent,
    },
    k8s::ClusterView,
    runtime::{Hangup, Termination},
};

/// How the wait for the first sync ended.
pub enum SyncOutcome {
    Synced,
    /// SIGTERM/SIGINT before the API answered.
    Terminated,
}

/// The pod directories under the root now (empty when the root cannot be listed: every
/// cgroup then keeps the unknown-cgroup verdict).
pub fn scan(root: &Path, driver: CgroupDriver) -> Vec<DiscoveredPod> {
    podcgroup::scan_pods(root, driver).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot scan the pods' cgroups at start");
        Vec::new()
    })
}

/// The entries a previous agent left in the pinned verdict map (none after a reboot, or
/// when the pins cannot be read).
pub fn pinned_verdicts(layout: &PinLayout) -> BTreeMap<u64, VerdictEntry> {
    if !layout.exists() {
        return BTreeMap::new();
    }
    GuardMaps::from_pins(layout)
        .and_then(|maps| maps.verdicts())
        .unwrap_or_else(|e| {
            tracing::debug!(error = %format!("{e:#}"), "pinned verdicts not readable; starting from the cache only");
            BTreeMap::new()
        })
}

/// The verdicts to install before the first sync: the cache's, decided under the current
/// config, win over the pinned ones (which may come from an older config); pinned entries
/// stay for cgroups the cache does not know, so a restart never loses an exemption the
/// previous agent had written. Everything else keeps the unknown-cgroup verdict (guard).
pub fn initial_verdicts(
    pinned: BTreeMap<u64, VerdictEntry>,
    cached: &Classified,
) -> BTreeMap<u64, VerdictEntry> {
    let mut verdicts = pinned;
    verdicts.extend(cached.verdicts.iter().map(|(id, e)| (*id, *e)));
    verdicts
}

/// Waits for the first full sync with the API server, meanwhile giving new pod cgroups the
/// cache's verdict, applying SIGHUP reloads, and rewriting the state file.
pub async fn until_synced(
    reconciler: &mut Reconciler,
    cache: Option<&LoadedCache>,
    view: &ClusterView,
    cgroup_events: &mut mpsc::Receiver<CgroupEvent>,
    runtime_answers: &mut mpsc::Receiver<RuntimeAnswer>,
    hangup: &mut Hangup,
    termination: &mut Termination,
) -> SyncOutcome {
    let synced = view.wait_synced();
    tokio::pin!(synced);
    let mut tick = tokio::time::interval(PERIODIC_RECONCILE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut synced => return SyncOutcome::Synced,
            Some(event) = cgroup_events.recv() => {
                reconciler.index.observe(&event);
                match &event {
                    // The cache first; a pod it does not know is asked of the runtime.
                    CgroupEvent::Created(path) => {
                        if !cache.is_some_and(|cache| from_cache(reconciler, cache, path)) {
                            reconciler.ask_runtime(path);
                        }
                    }
                    // Pod cgroups still unclassified (the runtime was slow to list the
                    // sandbox, or down) are asked about again, as after the sync.
                    CgroupEvent::Rescan(found) => reconciler.ask_runtime_about_unknown(found),
                    CgroupEvent::Removed(_) => {}
                }
            },
            Some(answer) = runtime_answers.recv() => reconciler.on_runtime_answer(answer),
            _ = hangup.received() => {
                reconciler.reload();
                refresh(reconciler, cache);
            },
            _ = tick.tick() => refresh(reconciler, cache),
            _ = termination.terminated() => return SyncOutcome::Terminated,
        }
    }
}

/// A pod cgroup appeared before the first sync: the cache's verdict if it knows the pod
/// (true), else false.
fn from_cache(reconciler: &mut Reconciler, cache: &LoadedCache, path: &Path) -> bool {
    let Some(uid) = path
        .file_name()
        .and_then(|n| podcgroup::parse_pod_dir_name(&n.to_string_lossy()))
        .map(|(_, uid)| uid)
    else {
        return false;
    };
    let Some(pod) = cache.pod_by_cgroup_uid(&uid) else {
        return false;
    };
    let Ok(dir) = cgroups::validate_cgroup_dir(path) else {
        return false;
    };
    let index = &mut reconciler.index;
    let entry = cache.entry(pod, &index.policy, &mut index.classes);
    set_entries(reconciler, [(dir.id, entry)]);
    true
}

/// Classifies every pod cgroup found now by the cache under the current config (after a
/// reload, or a cgroup event missed), writes those entries and the state file.
fn refresh(reconciler: &mut Reconciler, cache: Option<&LoadedCache>) {
    let classified = match cache {
        Some(cache) => {
            let found = scan(&reconciler.index.root().path, reconciler.index.driver());
            let index = &mut reconciler.index;
            cache.classify(&found, &index.policy, &mut index.classes)
        }
        None => Classified::default(),
    };
    set_entries(
        reconciler,
        classified.verdicts.iter().map(|(id, e)| (*id, *e)),
    );
    write_state(reconciler, classified);
}

fn set_entries(reconciler: &Reconciler, entries: impl IntoIterator<Item = (u64, VerdictEntry)>) {
    let mut slot = reconciler.ctx.session.lock().expect("session lock");
    let Some(session) = slot.as_mut() else {
        return;
    };
    for (id, entry) in entries {
        if let Err(e) = session.maps_mut().set_verdict(id, entry) {
            tracing::warn!(error = %e, "cannot write a cached verdict");
        }
    }
}

/// Publishes the cache's view (owners for the audit lines, classes for the counters) and
/// writes the state file saying the verdicts come from the cache.
pub fn write_state(reconciler: &mut Reconciler, classified: Classified) {
    let ctx = &reconciler.ctx;
    ctx.owners.write().expect("owners lock").pods = classified.owners;
    *ctx.classes.write().expect("classes lock") = reconciler.index.classes.snapshot();
    let report = reconciler.outputs.cache_report();
    reconciler.outputs.write_from_cache(StateFile {
        node: ctx.node.clone(),
        written_unix: unix_secs(SystemTime::now()),
        namespaces: BTreeMap::new(),
        pods: classified.rows,
        counter_classes: reconciler.index.classes.snapshot(),
        enforcing_from: EnforcingFrom::Cache,
        cache: report,
        // Counted after the first reconcile, once the edge layer has tried every pod.
        net_raw: None,
    });
}
