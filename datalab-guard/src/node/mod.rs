//! `datalab-guard node`: the DaemonSet agent.
//!
//! Start-up order (DESIGN.md): `commands::node` validates the input (bad input → exit 2,
//! kernel untouched) → bind the metrics port → list every namespace and this node's pods →
//! compute every verdict → write the maps, then attach (or adopt the pins of a previous
//! agent) → ready. Then [`reconcile`] on every change: a watch event, a new or removed
//! cgroup directory, the periodic rescan, or a SIGHUP config reload. The API server going
//! away changes nothing in the kernel; the watchers retry and the agent catches up.
//!
//! Parts: [`context`] (what the tasks share), [`index`] (pods ↔ cgroups → verdicts),
//! [`reconcile`] (the loop), [`audit_sink`] (audit lines and pod Events), [`state_file`]
//! (what `status` reads), [`probe_targets`] (where the CNI probe runs from).

pub mod audit_sink;
pub mod context;
pub mod index;
pub mod probe_targets;
pub mod reconcile;
pub mod state_file;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{sync::mpsc, task::JoinHandle};

use self::{context::Context, index::PodIndex, reconcile::Reconciler, state_file::StateFileWriter};
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

    tracing::info!(node = %plan.node, root = %plan.root.path.display(), "waiting for the first full list of namespaces and pods");
    tokio::select! {
        _ = view.wait_synced() => {},
        _ = termination.terminated() => {
            tracing::info!("exiting before the first sync; nothing changed in the kernel");
            return Ok(());
        }
    }
    let policy = plan.config.policy_config(plan.own_pod_uid.clone());
    let mut index = PodIndex::new(plan.root.clone(), plan.driver, policy);
    let desired = index.desired(&view, Default::default());
    let layout = PinLayout::new(&plan.bpffs);
    let (session, events) = Session::start(StartRequest {
        layout: layout.clone(),
        root: plan.root.clone(),
        settings: plan.config.datapath(),
        blocked: plan.config.blocklist(),
        verdicts: desired.verdicts.clone(),
    })?;
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
    let cgroup_events = watch_cgroups(&plan)?;

    let mut reconciler = Reconciler {
        ctx,
        http: http_state,
        index,
        config_source: plan.config_source,
        own_pod_uid: plan.own_pod_uid,
        probe_settings,
        state_file: StateFileWriter::new(plan.state_file),
    };
    reconciler.apply_and_publish(desired);
    reconciler
        .run(cgroup_events, &mut hangup, &mut termination)
        .await;
    tracing::info!(
        "exiting; enforcement stays in place (pinned under {})",
        layout.root().display()
    );
    let _ = shutdown_tx.send(true);
    tasks.stop().await;
    Ok(())
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
