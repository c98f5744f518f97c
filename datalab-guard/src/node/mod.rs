//! `datalab-guard node`: the DaemonSet agent.
//!
//! Start-up order (DESIGN.md: attach first, sync later): `commands::node` validates the
//! input, the state directory included (bad input → exit 2, kernel untouched) → bind the
//! metrics port → start the API watches (in the background; the API server may be down) →
//! load the state cache → attach (or adopt the pins of a previous agent) at once with the
//! cache's verdicts for the pod cgroups found now, over the previous agent's pinned entries,
//! everything else on the unknown-cgroup verdict (guard) → [`startup`]: new pod cgroups get
//! the cache's verdict until the first full list of namespaces and pods has arrived → the
//! first API-synced reconcile → ready (`/readyz`), and the startup taint comes off the Node
//! ([`crate::k8s::taint`]). Then [`reconcile`] on every change: a watch event, a new or
//! removed cgroup directory, the periodic rescan, or a SIGHUP config reload; each
//! API-synced reconcile also refreshes the state cache ([`cache`]). The API server going
//! away changes nothing in the kernel; the watchers retry and the agent catches up.
//!
//! Parts: [`context`] (what the tasks share), [`index`] (pods ↔ cgroups → verdicts),
//! [`startup`] (before the first sync), [`reconcile`] (the loop), [`cache`] (the state
//! directory), [`runtime_classify`] (pods the API does not know, classified from the
//! container runtime), [`audit_sink`] (audit lines and pod Events), [`state_file`] (what
//! `status` reads), [`outputs`] (the state file and cache, written off the loop by
//! [`background`] threads), [`probe_targets`] (where the CNI probe runs from).

pub mod audit_sink;
pub mod background;
pub mod cache;
pub mod context;
pub mod edge;
pub mod index;
pub mod net_raw;
pub mod outputs;
pub mod probe_targets;
pub mod reconcile;
pub mod runtime_classify;
pub mod startup;
pub mod state_file;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{sync::mpsc, task::JoinHandle};

use self::{
    cache::{CacheWriter, Classified, Loaded, LoadedCache},
    context::Context,
    index::PodIndex,
    outputs::Outputs,
    reconcile::Reconciler,
    startup::SyncOutcome,
    state_file::StateFileWriter,
};
use crate::{
    bpf::{PinLayout, Session, StartRequest},
    cgroups::{
        pod::CgroupDriver,
        watch::{CgroupEvent, CgroupWatcher, WatchConfig},
        CgroupDir,
    },
    config::{Config, ConfigSource},
    http,
    input::bad_input,
    k8s::{self, ClusterView},
    probe::ProbeSettings,
    runtime::{Hangup, Termination},
};

/// Everything `commands::node` validated before the kernel or the API server is touched.
pub struct Plan {
    pub node: String,
    pub config_source: ConfigSource,
    pub config: Config,
    pub root: CgroupDir,
    pub driver: CgroupDriver,
    pub bpffs: PathBuf,
    pub metrics_addr: SocketAddr,
    pub kubeconfig: Option<PathBuf>,
    /// `POD_UID`: the agent's own pod, always exempt.
    pub own_pod_uid: Option<String>,
    pub netns_dir: PathBuf,
    pub state_file: PathBuf,
    /// The state cache's directory; `None`: no cache (the default directory was unusable).
    pub state_dir: Option<PathBuf>,
}

pub async fn serve(plan: Plan) -> anyhow::Result<()> {
    let mut hangup = Hangup::new()?;
    let mut termination = Termination::new()?;
    let listener = http::bind(plan.metrics_addr).await.map_err(bad_input)?;
    let client = k8s::connect(plan.kubeconfig.as_deref(), "node").await?;
    let view = Arc::new(ClusterView::start(
        client.clone(),
        &plan.node,
        k8s::WatchHealth::default(),
    ));
    let ctx = Arc::new(Context::new(
        client.clone(),
        plan.node.clone(),
        view.clone(),
        k8s::events::EventBudget::per_minute(plan.config.audit.events_per_minute_per_node),
    ));
    let http_state = Arc::new(http::HttpState::new(ctx.snapshot_fn()));
    http_state.set_ready(false, "waiting for the first full sync with the API server");
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Tasks::default();
    tasks.wait.push(tokio::spawn(http::serve_listener(
        listener,
        http_state.clone(),
        shutdown_rx.clone(),
    )));
    for warning in plan.config.warnings() {
        tracing::warn!("{warning}");
    }

    // Attach first: nothing below waits for the API server.
    let Attached {
        session,
        events,
        index,
        classified,
        loaded,
        layout,
    } = attach_first(&plan)?;
    let (audit, pod_events) = audit_sink::spawn(
        &ctx,
        &plan.config.audit,
        events,
        session.audit_stats(),
        shutdown_rx.clone(),
    );
    *ctx.session.lock().expect("session lock") = Some(session);
    tasks.wait.push(audit);
    tasks.abort.extend(pod_events);
    let (probe_settings, probe_settings_rx) = tokio::sync::watch::channel(
        ProbeSettings::from_config(&plan.config, &plan.config.blocklist()),
    );
    tasks.abort.extend(probe_targets::spawn(
        &ctx,
        probe_settings_rx,
        index.resolver(),
        plan.netns_dir.clone(),
        shutdown_rx,
    ));
    let mut cgroup_events = watch_cgroups(&plan)?;
    let runtime = runtime_classify::RuntimeLookups::new(&plan.config.runtime, ctx.runtime.clone());
    let mut reconciler = Reconciler {
        ctx,
        http: http_state.clone(),
        index,
        config_source: plan.config_source.clone(),
        own_pod_uid: plan.own_pod_uid.clone(),
        probe_settings,
        outputs: outputs_of(&plan, &view, &loaded)?,
        runtime,
        edge: edge::NodeEdge::new(layout.clone(), plan.netns_dir.clone()),
    };
    startup::write_state(&mut reconciler, classified);
    // Pod cgroups that exist already and that neither the cache nor (later) the API knows
    // (static pods without a mirror pod, pods not announced yet): one listing of the
    // runtime, answered through the loops below, before and after the first sync.
    let mut runtime_answers = reconciler
        .runtime
        .take_answers()
        .unwrap_or_else(|| mpsc::channel(1).1);
    reconciler.runtime.list_all();

    tracing::info!(node = %plan.node, root = %plan.root.path.display(), "enforcing; waiting for the first full list of namespaces and pods");
    let outcome = startup::until_synced(
        &mut reconciler,
        cache_of(&loaded),
        &view,
        &mut cgroup_events,
        &mut runtime_answers,
        &mut hangup,
        &mut termination,
    )
    .await;
    // The state cache loaded at start has served its purpose: the API is the authority now.
    drop(loaded);
    reconciler.index.cached_namespaces.clear();
    match outcome {
        SyncOutcome::Terminated => {}
        SyncOutcome::Synced => {
            tracing::info!("first full sync with the API server; enforcing its verdicts");
            reconciler.reconcile();
            tasks
                .abort
                .extend(remove_startup_taint(&plan, client, &http_state));
            reconciler
                .run(
                    cgroup_events,
                    runtime_answers,
                    &mut hangup,
                    &mut termination,
                )
                .await;
        }
    }
    tracing::info!(
        "exiting; enforcement stays in place (pinned under {})",
        layout.root().display()
    );
    let _ = shutdown_tx.send(true);
    tasks.stop().await;
    Ok(())
}

/// What attaching before the first sync produced: the datapath, and the pod index and
/// verdicts it was filled from (the state cache's, the previous agent's pins, else guard).
struct Attached {
    session: Session,
    events: RingBuf<MapData>,
    index: PodIndex,
    classified: Classified,
    loaded: Loaded,
    layout: PinLayout,
}

/// Loads the state cache, classifies the pod cgroups it knows, and attaches (or adopts).
fn attach_first(plan: &Plan) -> anyhow::Result<Attached> {
    let loaded = load_cache(plan);
    let policy = plan.config.policy_config(plan.own_pod_uid.clone());
    let mut index = PodIndex::new(plan.root.clone(), plan.driver, policy);
    let classified = match cache_of(&loaded) {
        Some(cache) => {
            index.cached_namespaces = cache.namespaces().clone();
            let found = startup::scan(&plan.root.path, plan.driver);
            cache.classify(&found, &index.policy, &mut index.classes)
        }
        None => Classified::default(),
    };
    let layout = PinLayout::new(&plan.bpffs);
    let (session, events) = Session::start(StartRequest {
        layout: layout.clone(),
        root: plan.root.clone(),
        settings: plan.config.datapath(),
        blocked: plan.config.blocklist(),
        verdicts: startup::initial_verdicts(startup::pinned_verdicts(&layout), &classified),
    })?;
    Ok(Attached {
        session,
        events,
        index,
        classified,
        loaded,
        layout,
    })
}

/// The state file and state cache writers.
fn outputs_of(plan: &Plan, view: &Arc<ClusterView>, loaded: &Loaded) -> anyhow::Result<Outputs> {
    let mut cache = CacheWriter::new(plan.state_dir.as_deref(), &plan.node);
    cache.note_loaded(loaded);
    let state_file = StateFileWriter::new(plan.state_file.clone(), plan.bpffs.clone());
    Outputs::new(view.clone(), state_file, cache).context("cannot start the state file writers")
}

fn cache_of(loaded: &Loaded) -> Option<&LoadedCache> {
    match loaded {
        Loaded::Cache(cache) => Some(cache),
        _ => None,
    }
}

/// Once ready (attached and synced), removes the startup taint from this node, if
/// configured (`startupTaint`).
fn remove_startup_taint(
    plan: &Plan,
    client: kube::Client,
    http_state: &Arc<http::HttpState>,
) -> Option<JoinHandle<()>> {
    if plan.config.startup_taint.is_empty() {
        return None;
    }
    let http = http_state.clone();
    Some(k8s::taint::spawn(
        client,
        plan.node.clone(),
        plan.config.startup_taint.clone(),
        move || http.readiness().is_ok(),
    ))
}

/// Reads the state cache and says what came of it. Never fails: an unusable cache is
/// ignored (every pod it would have named keeps the unknown-cgroup verdict).
fn load_cache(plan: &Plan) -> Loaded {
    let Some(dir) = &plan.state_dir else {
        return Loaded::Missing;
    };
    let loaded = cache::load(dir, &plan.node);
    match &loaded {
        Loaded::Cache(cache) => tracing::info!(
            pods = cache.pod_count(),
            age_seconds = cache.age_secs(SystemTime::now()),
            "state cache loaded; enforcing its verdicts until the API server answers"
        ),
        Loaded::Missing => {
            tracing::info!(dir = %dir.display(), "no state cache yet; pods stay on the unknown-cgroup verdict until the API server answers");
        }
        Loaded::Unusable(e) => {
            tracing::warn!(error = %e, "state cache ignored; pods stay on the unknown-cgroup verdict until the API server answers");
        }
    }
    loaded
}

/// Pod cgroup directories appearing and going, plus the periodic rescan.
fn watch_cgroups(plan: &Plan) -> anyhow::Result<mpsc::Receiver<CgroupEvent>> {
    let mut config = WatchConfig::new(&plan.root.path, plan.driver);
    config.rescan_interval = plan.config.rescan_interval.as_std();
    let (_watcher, events) =
        CgroupWatcher::spawn(config).context("cannot watch the pods' cgroup directories")?;
    Ok(events)
}

/// The agent's background tasks, for an orderly exit.
#[derive(Default)]
struct Tasks {
    /// Stop at the shutdown signal; given a moment to finish (flush audit lines).
    wait: Vec<JoinHandle<()>>,
    /// Hold nothing worth finishing.
    abort: Vec<JoinHandle<()>>,
}

impl Tasks {
    async fn stop(self) {
        for task in self.abort {
            task.abort();
        }
        for task in self.wait {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}
