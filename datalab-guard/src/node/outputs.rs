//! The node agent's two files, written off the reconcile loop: the state file (what `status`
//! shows) and the state cache (what a restart enforces before the API server answers).
//!
//! Both list every environment namespace of the cluster, tens of thousands on a Datalab, so
//! building and writing them is the costliest part of a reconcile; a new pod's verdict must
//! not wait for it. Hence:
//! - each file is written by its own thread ([`LatestWriter`]): the loop hands over the
//!   newest contents and goes on;
//! - the state file is built at most once per [`STATE_FILE_INTERVAL`] (a reconcile in
//!   between leaves it pending; the loop comes back when it is due), and its list of
//!   environment names is kept until the namespaces or the policy change;
//! - the cache is offered only when the namespaces, the pods or their verdicts changed, and
//!   its thread builds the contents from the shared view itself.

use std::{
    collections::HashSet,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use datalab_guard_policy::PolicyConfig;

use super::{
    background::LatestWriter,
    cache::{CacheReport, CacheWriter, Contents, NamespacesOut},
    context::Context,
    net_raw::NetRawReport,
    state_file::{
        unix_secs, EnforcingFrom, NodeNamespaceState, PodRow, StateFile, StateFileWriter,
    },
};
use crate::k8s::ClusterView;

/// At most one state file per this interval (`status` reads it; the pins are live).
pub const STATE_FILE_INTERVAL: Duration = Duration::from_secs(1);

pub struct Outputs {
    view: Arc<ClusterView>,
    state_file: LatestWriter<StateFile>,
    cache: Arc<Mutex<CacheWriter>>,
    /// The cache's thread; its input is the rows of the reconcile that changed something.
    cache_jobs: LatestWriter<Vec<PodRow>>,
    /// Rows (and raw-path exposure) of the last API-synced reconcile not yet in a state
    /// file.
    pending: Option<(Vec<PodRow>, Option<NetRawReport>)>,
    last_state_file: Option<Instant>,
    /// Environment names as of a namespace-cache generation (cleared on a policy reload).
    environments: Option<(u64, Arc<[String]>)>,
    /// What the last cache offer was built from: namespace and pod generations, rows.
    last_cache_key: Option<(u64, u64, u64)>,
    /// Whether a state file from the API's view has been written (the first one is waited
    /// for).
    api_state_written: bool,
}

/// How long the first API-synced reconcile waits for its state file.
const FIRST_WRITE_WAIT: Duration = Duration::from_secs(5);

impl Outputs {
    pub fn new(
        view: Arc<ClusterView>,
        state_file: StateFileWriter,
        cache: CacheWriter,
    ) -> std::io::Result<Outputs> {
        let mut state_writer = state_file;
        let state_file = LatestWriter::spawn("dg-state-file", Duration::ZERO, move |state| {
            state_writer.write(&state);
        })?;
        let cache = Arc::new(Mutex::new(cache));
        let cache_jobs = LatestWriter::spawn(
            "dg-state-cache",
            super::cache::MIN_WRITE_INTERVAL,
            cache_job(view.clone(), cache.clone()),
        )?;
        Ok(Outputs {
            view,
            state_file,
            cache,
            cache_jobs,
            pending: None,
            last_state_file: None,
            environments: None,
            last_cache_key: None,
            api_state_written: false,
        })
    }

    /// The cache's part of the state file.
    pub fn cache_report(&self) -> CacheReport {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report()
    }

    /// Before the first sync: a state file from the state cache's view, at once.
    pub fn write_from_cache(&mut self, state: StateFile) {
        self.state_file.offer(state);
        self.last_state_file = Some(Instant::now());
    }

    /// After an API-synced reconcile: its rows go to the state file (now, or when
    /// [`Self::state_file_due`]) and, if anything changed, to the cache.
    pub fn synced(
        &mut self,
        rows: Vec<PodRow>,
        net_raw: Option<NetRawReport>,
        ctx: &Context,
        policy: &PolicyConfig,
    ) {
        self.offer_cache(&rows);
        self.pending = Some((rows, net_raw));
        if !self.api_state_written {
            // The first state file after the sync is on disk before the agent says it is
            // ready: `status` never shows the cache's view of a ready agent.
            self.api_state_written = true;
            if let Some(state) = self.build_state_file(ctx, policy) {
                if !self.state_file.offer_and_wait(state, FIRST_WRITE_WAIT) {
                    tracing::warn!("the state file was not written within {FIRST_WRITE_WAIT:?}; `status` may lag");
                }
            }
            return;
        }
        if self
            .state_file_due()
            .is_some_and(|due| due <= Instant::now())
        {
            self.write_state_file(ctx, policy);
        }
    }

    /// When the pending state file may be written; `None` when none is pending.
    pub fn state_file_due(&self) -> Option<Instant> {
        self.pending.as_ref()?;
        Some(
            self.last_state_file
                .map_or_else(Instant::now, |t| t + STATE_FILE_INTERVAL),
        )
    }

    /// The configuration changed: which namespaces are environments may have too.
    pub fn policy_changed(&mut self) {
        self.environments = None;
        self.last_cache_key = None;
    }

    /// Writes the pending rows into a state file with every environment namespace (and the
    /// CNI state where this node has probed it) and each pod's attempt count; drops
    /// namespaces that are no longer environments from the CNI probe's states.
    pub fn write_state_file(&mut self, ctx: &Context, policy: &PolicyConfig) {
        if let Some(state) = self.build_state_file(ctx, policy) {
            self.state_file.offer(state);
        }
    }

    /// The state file of the pending rows (none pending: `None`).
    fn build_state_file(&mut self, ctx: &Context, policy: &PolicyConfig) -> Option<StateFile> {
        let (mut rows, net_raw) = self.pending.take()?;
        self.last_state_file = Some(Instant::now());
        let environments = self.environment_names(policy);
        let is_environment: HashSet<&str> = environments.iter().map(|n| &**n).collect();
        ctx.namespace_states
            .retain(|ns| is_environment.contains(ns));
        let probed = ctx.namespace_states.snapshot();
        let namespaces = environments
            .iter()
            .map(|name| {
                let cni = probed.get(&**name).and_then(|st| st.cni);
                (name.clone(), NodeNamespaceState { cni })
            })
            .collect();
        {
            let mut counts = ctx
                .attempts_by_pod
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let live: HashSet<&str> = rows.iter().map(|r| r.uid.as_str()).collect();
            counts.retain(|uid, _| live.contains(uid.as_str()));
            for row in &mut rows {
                row.audited_attempts = counts.get(&row.uid).copied().unwrap_or(0);
            }
        }
        let counter_classes = ctx
            .classes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Some(StateFile {
            net_raw,
            node: ctx.node.clone(),
            written_unix: unix_secs(SystemTime::now()),
            namespaces,
            pods: rows,
            counter_classes,
            enforcing_from: EnforcingFrom::Api,
            cache: self.cache_report(),
        })
    }

    /// The environment namespaces' names, recomputed only when the namespaces changed.
    fn environment_names(&mut self, policy: &PolicyConfig) -> Arc<[String]> {
        let generation = self.view.namespaces_generation();
        if let Some((at, names)) = &self.environments {
            if *at == generation {
                return names.clone();
            }
        }
        let mut names = self
            .view
            .namespace_names_where(|n| policy.is_environment(n));
        names.sort_unstable();
        let names: Arc<[String]> = names.into();
        self.environments = Some((generation, names.clone()));
        names
    }

    fn offer_cache(&mut self, rows: &[PodRow]) {
        let mut verdicts = DefaultHasher::new();
        for row in rows {
            (&row.uid, row.verdict as u32).hash(&mut verdicts);
        }
        let key = (
            self.view.namespaces_generation(),
            self.view.pods_generation(),
            verdicts.finish(),
        );
        if self.last_cache_key != Some(key) {
            self.last_cache_key = Some(key);
            self.cache_jobs.offer(rows.to_vec());
        }
    }
}

/// The cache thread's work: build the contents from the view and the rows, offer them to
/// the writer (which skips unchanged contents), give the transient copy's memory back.
fn cache_job(
    view: Arc<ClusterView>,
    cache: Arc<Mutex<CacheWriter>>,
) -> impl FnMut(Vec<PodRow>) + Send + 'static {
    move |rows| {
        let pods = view.node_pods();
        let cgroup_uids = crate::k8s::convert::cgroup_uids(&pods);
        let namespaces = NamespacesOut(view.namespace_records());
        let contents = Contents::from_api(
            namespaces,
            pods.iter().map(|p| &p.info),
            &cgroup_uids,
            &rows,
        );
        cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .offer(contents);
        crate::memory::release_free_memory();
    }
}
