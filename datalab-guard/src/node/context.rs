//! What the node agent's tasks share (controller-rs style): one [`Context`] behind an
//! `Arc`, each field documented, instead of loose handles passed to every task.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
};

use crate::{
    baseline_state::NamespaceStates,
    bpf::{session, Session},
    k8s::{events::EventBudget, ClusterView},
    metrics::{NamespaceSample, Snapshot, SnapshotFn},
    node::{audit_sink::CgroupOwners, runtime_classify::RuntimeStats},
};

/// Pod counts of the last reconcile, for the gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Pods with a cgroup whose entry says guard.
    pub guarded: u64,
    /// Pods with a cgroup whose entry says exempt.
    pub exempt: u64,
    /// Pod cgroups under the root with no pod behind them (from the watcher's scan).
    pub unknown: u64,
}

pub struct Context {
    /// The API server connection (Events, provisioning).
    pub client: kube::Client,
    /// This node's name: the pods it guards, audit lines, Events, the state file.
    pub node: String,
    /// Node-local caches of this node's pods and every namespace, fed by watches.
    pub view: Arc<ClusterView>,
    /// The kernel side; `None` until the first full sync installs it (the metrics then
    /// report no counters).
    pub session: Mutex<Option<Session>>,
    /// cgroup id → pod and container, rebuilt by every reconcile, read by the audit stream
    /// to name who made an attempt.
    pub owners: RwLock<CgroupOwners>,
    /// Pod gauges as of the last reconcile.
    pub gauges: Mutex<Gauges>,
    /// Counter class → environment namespace, as of the last reconcile: the `namespace`
    /// label of the counters and the state file's `counter_classes`.
    pub classes: RwLock<BTreeMap<u32, String>>,
    /// Each environment namespace's baseline (NetworkPolicy, Pod Security, CNI), written by
    /// provisioning and the CNI probe, read by the metrics and the state file.
    pub namespace_states: NamespaceStates,
    /// Pod uid → audit records attributed to it (state file), pruned to live pods.
    pub attempts_by_pod: Mutex<HashMap<String, u64>>,
    /// Every Event this node writes (pod and namespace) spends from this one budget
    /// (`audit.eventsPerMinutePerNode`), so an attack cannot turn into an API write storm.
    pub event_budget: EventBudget,
    /// The container runtime lookups' health (metrics), written by their tasks.
    pub runtime: Arc<RuntimeStats>,
    /// The pod-edge layer's coverage as of the last reconcile (metrics).
    pub edge: Mutex<Option<crate::metrics::EdgeSample>>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        node: String,
        view: Arc<ClusterView>,
        event_budget: EventBudget,
    ) -> Context {
        Context {
            client,
            node,
            view,
            session: Mutex::new(None),
            owners: RwLock::new(CgroupOwners::default()),
            gauges: Mutex::new(Gauges::default()),
            classes: RwLock::new(BTreeMap::new()),
            namespace_states: NamespaceStates::default(),
            attempts_by_pod: Mutex::new(HashMap::new()),
            event_budget,
            runtime: Arc::new(RuntimeStats::default()),
            edge: Mutex::new(None),
        }
    }

    /// The metrics: the session's counters per namespace class, pod gauges, namespace states,
    /// and the API watches' health (also before the first sync, when it matters most).
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let watches = self.view.health().samples();
        let slot = self.session.lock().map_err(|_| poisoned("session"))?;
        let Some(session) = slot.as_ref() else {
            return Ok(Snapshot {
                watches,
                runtime: self.runtime.sample(),
                ..session::empty_snapshot()
            });
        };
        let classes = self
            .classes
            .read()
            .map_err(|_| poisoned("classes"))?
            .clone();
        let mut snapshot = session.snapshot(&classes)?;
        drop(slot);
        let g = *self.gauges.lock().map_err(|_| poisoned("gauges"))?;
        snapshot.guarded = Some(g.guarded);
        snapshot.exempt = Some(g.exempt);
        snapshot.unknown_cgroups = Some(g.unknown);
        snapshot.namespaces = self
            .namespace_states
            .snapshot()
            .into_iter()
            .map(|(namespace, st)| NamespaceSample {
                namespace,
                policy: st.policy,
                cni: st.cni,
            })
            .collect();
        snapshot.watches = watches;
        snapshot.runtime = self.runtime.sample();
        snapshot.edge = self.edge.lock().map_err(|_| poisoned("edge"))?.clone();
        Ok(snapshot)
    }

    pub fn snapshot_fn(self: &Arc<Self>) -> SnapshotFn {
        let ctx = Arc::clone(self);
        Arc::new(move || ctx.snapshot())
    }
}

fn poisoned(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what} lock poisoned")
}
