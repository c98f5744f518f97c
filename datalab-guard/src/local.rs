//! `datalab-guard local`: the datapath without Kubernetes. Guards every process in one
//! cgroup's subtree except exempted sub-cgroups (e.g. `user.slice` on a shared JupyterHub
//! VM), and is the basis of the demo and the end-to-end tests.
//!
//! Order: validate all input (exit 2, kernel untouched) → bind the metrics port → fill the
//! maps and attach (or adopt) → ready → serve metrics, stream audit lines, keep the exempt
//! entries in line with the directories. SIGTERM/SIGINT exit and leave enforcement pinned.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use datalab_guard_common::{counters::Stat, GuardConfig, Mode, PolicyEntry, Verdict};

use crate::{
    audit, blocklist,
    bpf::{self, GuardMaps, InstallOutcome, InstallRequest, PinLayout},
    cgroups::{self, CgroupDir},
    cli::{LocalArgs, ModeArg, Shared},
    http,
    input::bad_input,
    metrics::{CounterSample, Snapshot},
};

/// Default metrics address in local mode: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9090";
/// How often the exempt directories are re-read (a recreated directory has a new id).
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Bound on the cgroup-id → path cache used to attribute audit lines.
const PATH_CACHE_MAX: usize = 4096;

/// The validated input of a local run.
struct Plan {
    root: CgroupDir,
    exempt: Vec<PathBuf>,
    blocked: Vec<datalab_guard_common::cidr::Cidr>,
    config: GuardConfig,
    metrics_addr: SocketAddr,
}

pub fn run(shared: &Shared, args: &LocalArgs) -> anyhow::Result<()> {
    let plan = validate(shared, args)?;
    crate::runtime::build()?.block_on(serve(shared, plan))
}

fn validate(shared: &Shared, args: &LocalArgs) -> anyhow::Result<Plan> {
    let blocked = blocklist::build_blocklist(&shared.block, &shared.preset).map_err(bad_input)?;
    let root = cgroups::validate_cgroup_dir(&args.cgroup)
        .map_err(|e| bad_input(format!("--cgroup: {e}")))?;
    let mut exempt = Vec::new();
    for dir in &args.exempt {
        let sub =
            cgroups::validate_cgroup_dir(dir).map_err(|e| bad_input(format!("--exempt: {e}")))?;
        if !cgroups::is_within(&sub, &root) {
            return Err(bad_input(format!(
                "--exempt {} is not inside --cgroup {}",
                dir.display(),
                root.path.display()
            )));
        }
        exempt.push(sub.path);
    }
    if args.deny_raw_sockets
        && crate::check::bpf_lsm_active(crate::check::active_lsms().as_deref()) == Some(false)
    {
        return Err(bad_input(format!(
            "--deny-raw-sockets needs the BPF LSM to refuse AF_PACKET sockets, and it is not active (LSMs: {}); add `bpf` to the lsm= kernel parameter",
            crate::check::active_lsms().unwrap_or_default()
        )));
    }
    let metrics_addr = match shared.metrics_addr {
        Some(addr) => addr,
        None => DEFAULT_METRICS_ADDR.parse().expect("valid default address"),
    };
    let mut config = GuardConfig::zeroed();
    config.mode = match shared.mode_or_default() {
        ModeArg::Enforce => Mode::Enforce as u32,
        ModeArg::Audit => Mode::Audit as u32,
    };
    config.default_verdict = Verdict::Guard as u32;
    config.deny_raw_sockets = u32::from(args.deny_raw_sockets);
    config.events_per_window = args.audit_rate;
    config.window_ms = 1000;
    Ok(Plan {
        root,
        exempt,
        blocked,
        config,
        metrics_addr,
    })
}

/// The POLICY entries local mode wants: the root guarded, each exempt directory exempt.
/// Directories that vanished are skipped (their processes are gone with them).
fn desired_policy(root: &CgroupDir, exempt: &[PathBuf]) -> BTreeMap<u64, PolicyEntry> {
    let mut policy = BTreeMap::new();
    policy.insert(
        root.id,
        PolicyEntry {
            verdict: Verdict::Guard as u32,
            class: 0,
        },
    );
    for dir in exempt {
        match cgroups::validate_cgroup_dir(dir) {
            Ok(sub) => {
                policy.insert(
                    sub.id,
                    PolicyEntry {
                        verdict: Verdict::Exempt as u32,
                        class: 0,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "exempt cgroup unavailable; its processes would be guarded")
            }
        }
    }
    policy
}

async fn serve(shared: &Shared, plan: Plan) -> anyhow::Result<()> {
    // Bind before touching the kernel: a taken port is bad input, not a half install.
    let listener = http::bind(plan.metrics_addr).await.map_err(bad_input)?;
    let mut termination = crate::runtime::Termination::new()?;
    let layout = PinLayout::new(&shared.bpffs);
    let installed = bpf::install(InstallRequest {
        layout: layout.clone(),
        root: plan.root.clone(),
        config: plan.config,
        blocked: plan.blocked.clone(),
        policy: desired_policy(&plan.root, &plan.exempt),
    })?;
    let outcome = match installed.outcome {
        InstallOutcome::Fresh => "attached".to_owned(),
        InstallOutcome::Adopted => "adopted existing pins".to_owned(),
        InstallOutcome::Upgraded { previous_hash } => {
            format!("upgraded programs {previous_hash:016x}")
        }
    };
    tracing::info!(
        root = %plan.root.path.display(),
        bpffs = %layout.root().display(),
        mode = ?shared.mode_or_default(),
        blocked = %plan.blocked.iter().map(blocklist::describe).collect::<Vec<_>>().join(","),
        links = %installed.links.join(","),
        "guard {outcome}"
    );

    let bpf::Installed { maps, events, .. } = installed;
    let maps = Arc::new(Mutex::new(maps));
    let state = Arc::new(http::HttpState::new(snapshot_fn(maps.clone())));
    state.set_ready(true, "programs attached and maps current");

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let http_task = tokio::spawn(http::serve_listener(
        listener,
        state.clone(),
        shutdown_rx.clone(),
    ));
    let audit_task = tokio::spawn(stream_audit(
        events,
        plan.root.path.clone(),
        shutdown_rx.clone(),
    ));
    let reconcile_task = tokio::spawn(reconcile_loop(
        maps.clone(),
        plan.root.clone(),
        plan.exempt.clone(),
        state.clone(),
        shutdown_rx.clone(),
    ));

    termination.terminated().await;
    tracing::info!("exiting; enforcement stays in place (pinned under {}); `datalab-guard uninstall` removes it", layout.root().display());
    let _ = shutdown_tx.send(true);
    for task in [http_task, audit_task, reconcile_task] {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    Ok(())
}

/// Keeps POLICY equal to the directories' current ids; reports not-ready while the root is
/// gone or the maps cannot be written.
async fn reconcile_loop(
    maps: Arc<Mutex<GuardMaps>>,
    root: CgroupDir,
    exempt: Vec<PathBuf>,
    state: Arc<http::HttpState>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {},
            _ = shutdown.changed() => return,
        }
        let root_alive = cgroups::validate_cgroup_dir(&root.path)
            .map(|d| d.id == root.id)
            .unwrap_or(false);
        if !root_alive {
            state.set_ready(false, "the guarded cgroup is gone");
            continue;
        }
        let desired = desired_policy(&root, &exempt);
        let result = maps
            .lock()
            .map_err(|_| anyhow::anyhow!("maps lock poisoned"))
            .and_then(|mut m| m.reconcile_policy(&desired));
        match result {
            Ok(changes) if changes != Default::default() => {
                tracing::info!(
                    added = changes.added,
                    updated = changes.updated,
                    removed = changes.removed,
                    "policy reconciled"
                );
                state.set_ready(true, "programs attached and maps current");
            }
            Ok(_) => state.set_ready(true, "programs attached and maps current"),
            Err(e) => {
                tracing::error!(error = %e, "cannot reconcile the policy map");
                state.set_ready(false, "policy map not reconciled");
            }
        }
    }
}

/// Reads the ring buffer and writes one JSON audit line per event to stdout, naming the
/// cgroup (relative to the cgroup2 mount) the attempt came from.
async fn stream_audit(
    events: aya::maps::RingBuf<aya::maps::MapData>,
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
    if let Err(e) = audit::consume(events, sink, shutdown).await {
        tracing::error!(error = %e, "audit stream stopped");
    }
}

/// The metrics snapshot: in-kernel counters (class 0 in local mode) and statistics.
fn snapshot_fn(
    maps: Arc<Mutex<GuardMaps>>,
) -> Arc<dyn Fn() -> anyhow::Result<Snapshot> + Send + Sync> {
    Arc::new(move || {
        let maps = maps
            .lock()
            .map_err(|_| anyhow::anyhow!("maps lock poisoned"))?;
        let counters = maps
            .counters([0])?
            .into_iter()
            .map(|c| CounterSample {
                action: c.action,
                family: c.family,
                hook: c.hook,
                namespace: String::new(),
                value: c.value,
            })
            .collect();
        let policy = maps.policy()?;
        Ok(Snapshot {
            counters,
            events_lost: maps.stat(Stat::EventsLost)?,
            events_suppressed: maps.stat(Stat::EventsSuppressed)?,
            events_malformed: 0,
            guarded: None,
            exempt: None,
            unknown_cgroups: None,
            policy_entries: policy.len() as u64,
            policy_capacity: u64::from(datalab_guard_common::maps::POLICY_MAX_ENTRIES),
            namespaces: Vec::new(),
            watches: Vec::new(),
        })
    })
}
