//! `datalab-guard local`: the datapath without Kubernetes. Guards every process in one
//! cgroup's subtree except exempted sub-cgroups (e.g. `user.slice` on a shared JupyterHub
//! VM), and is the basis of the demo and the end-to-end tests.
//!
//! Order: `commands::local` validates all input (exit 2, kernel untouched) → bind the
//! metrics port → fill the maps and attach (or adopt) → ready → serve metrics, stream audit lines, keep the exempt
//! entries in line with the directories. SIGTERM/SIGINT exit and leave enforcement pinned.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use datalab_guard_common::{cidr::Cidr, Verdict, VerdictEntry};

mod edge_layer;

use crate::{
    audit,
    bpf::{DatapathSettings, PinLayout, Session, StartRequest},
    cgroups::{self, CgroupDir},
    http,
    input::bad_input,
    metrics::SnapshotFn,
};

/// How often the exempt directories are re-read (a recreated directory has a new id).
const EXEMPT_RESCAN_EVERY: Duration = Duration::from_secs(2);
/// Bound on the cgroup-id → path cache used to attribute audit lines.
const PATH_CACHE_MAX: usize = 4096;

/// The validated input of a local run (see `commands::local`).
pub struct Plan {
    pub bpffs: PathBuf,
    pub root: CgroupDir,
    pub exempt: Vec<PathBuf>,
    pub blocked: Vec<Cidr>,
    pub settings: DatapathSettings,
    pub metrics_addr: SocketAddr,
    /// Host-side interfaces of guarded sandboxes for the pod-edge layer (`--edge-iface`).
    pub edge_ifaces: Vec<String>,
}

/// The verdict-map entries local mode wants: the root guarded, each exempt directory exempt.
/// Directories that vanished are skipped (their processes are gone with them).
fn desired_verdicts(root: &CgroupDir, exempt: &[PathBuf]) -> BTreeMap<u64, VerdictEntry> {
    let mut policy = BTreeMap::new();
    policy.insert(
        root.id,
        VerdictEntry {
            verdict: Verdict::Guard as u32,
            class: 0,
        },
    );
    for dir in exempt {
        match cgroups::validate_cgroup_dir(dir) {
            Ok(sub) => {
                policy.insert(
                    sub.id,
                    VerdictEntry {
                        verdict: Verdict::Exempt as u32,
                        class: 0,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "exempt cgroup unavailable; its processes would be guarded");
            }
        }
    }
    policy
}

/// Binds the metrics port, installs, and serves until SIGTERM/SIGINT.
pub async fn serve(plan: Plan) -> anyhow::Result<()> {
    // Bind before touching the kernel: a taken port is bad input, not a half install.
    let listener = http::bind(plan.metrics_addr).await.map_err(bad_input)?;
    let mut termination = crate::runtime::Termination::new()?;
    let layout = PinLayout::new(&plan.bpffs);
    let (session, events) = Session::start(StartRequest {
        layout: layout.clone(),
        root: plan.root.clone(),
        settings: plan.settings,
        blocked: plan.blocked.clone(),
        verdicts: desired_verdicts(&plan.root, &plan.exempt),
    })?;
    let audit_stats = session.audit_stats();
    let edge = edge_layer::start(&layout, &plan.edge_ifaces, plan.root.id)?;
    let session = Arc::new(Mutex::new(session));
    let state = Arc::new(http::HttpState::new(snapshot_fn(session.clone())));
    state.set_ready(true, "programs attached and maps current");

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let http_task = tokio::spawn(http::serve_listener(
        listener,
        state.clone(),
        shutdown_rx.clone(),
    ));
    let audit_task = tokio::spawn(stream_audit(
        events,
        audit_stats,
        plan.root.path.clone(),
        shutdown_rx.clone(),
    ));
    let reconcile_task = tokio::spawn(reconcile_loop(
        session,
        plan.root.clone(),
        plan.exempt.clone(),
        state.clone(),
        shutdown_rx.clone(),
    ));
    let edge_task = tokio::spawn(edge_layer::keep_attached(edge, shutdown_rx.clone()));

    termination.terminated().await;
    tracing::info!("exiting; enforcement stays in place (pinned under {}); `datalab-guard uninstall` removes it", layout.root().display());
    let _ = shutdown_tx.send(true);
    for task in [http_task, audit_task, reconcile_task, edge_task] {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    Ok(())
}

/// Keeps the VERDICTS map equal to the directories' current ids; reports not-ready while the root is
/// gone or the maps cannot be written.
async fn reconcile_loop(
    session: Arc<Mutex<Session>>,
    root: CgroupDir,
    exempt: Vec<PathBuf>,
    state: Arc<http::HttpState>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EXEMPT_RESCAN_EVERY) => {},
            _ = shutdown.changed() => return,
        }
        let root_alive = cgroups::validate_cgroup_dir(&root.path).is_ok_and(|d| d.id == root.id);
        if !root_alive {
            state.set_ready(false, "the guarded cgroup is gone");
            continue;
        }
        let desired = desired_verdicts(&root, &exempt);
        let result = session
            .lock()
            .map_err(|_| anyhow::anyhow!("session lock poisoned"))
            .and_then(|mut s| s.maps_mut().reconcile_verdicts(&desired));
        match result {
            Ok(changes) if changes != Default::default() => {
                tracing::info!(
                    added = changes.added,
                    updated = changes.updated,
                    removed = changes.removed,
                    "verdict map reconciled"
                );
                state.set_ready(true, "programs attached and maps current");
            }
            Ok(_) => state.set_ready(true, "programs attached and maps current"),
            Err(e) => {
                tracing::error!(error = %e, "cannot reconcile the verdict map");
                state.set_ready(false, "policy map not reconciled");
            }
        }
    }
}

/// Reads the ring buffer and writes one JSON audit line per event to stdout, naming the
/// cgroup (relative to the cgroup2 mount) the attempt came from.
async fn stream_audit(
    events: aya::maps::RingBuf<aya::maps::MapData>,
    stats: Arc<audit::ConsumerStats>,
    root: PathBuf,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let clock = audit::BootClock::new();
    let mount = cgroups::cgroup2_mount().ok();
    let mut paths: HashMap<u64, Option<String>> = HashMap::new();
    let sink = move |event: datalab_guard_common::AuditEvent| {
        if paths.len() >= PATH_CACHE_MAX {
            paths.clear();
        }
        let path = paths
            .entry(event.cgroup_id)
            .or_insert_with(|| {
                cgroups::find_by_id(&root, event.cgroup_id, 100_000).map(|p| match &mount {
                    Some(m) => format!("/{}", p.strip_prefix(m).unwrap_or(&p).display()),
                    None => p.display().to_string(),
                })
            })
            .clone();
        let who = audit::Attribution {
            cgroup: path,
            ..Default::default()
        };
        audit::write_line(&audit::record(&event, &clock, &who));
    };
    if let Err(e) = audit::consume(events, sink, stats, shutdown).await {
        tracing::error!(error = %e, "audit stream stopped");
    }
}

/// The metrics snapshot: in-kernel counters (class 0: local mode has no namespaces).
fn snapshot_fn(session: Arc<Mutex<Session>>) -> SnapshotFn {
    Arc::new(move || {
        session
            .lock()
            .map_err(|_| anyhow::anyhow!("session lock poisoned"))?
            .snapshot(&BTreeMap::new())
    })
}
