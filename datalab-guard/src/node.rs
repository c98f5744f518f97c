//! `datalab-guard node`: the DaemonSet agent.
//!
//! Start-up order (DESIGN.md): validate the input and bind the metrics port (bad input →
//! exit 2, kernel untouched) → list every namespace and this node's pods → compute every
//! verdict → write the maps, then attach (or adopt the pins of a previous agent) → ready.
//! Then reconcile on every change: a watch event, a new or removed cgroup directory, the
//! periodic rescan, or a SIGHUP config reload. The API server going away changes nothing
//! in the kernel; the watchers retry and the agent catches up when it returns.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use datalab_guard_common::{counters::Stat, GuardConfig, Mode, Verdict};
use tokio::sync::mpsc;

use crate::{
    audit,
    bpf::{self, GuardMaps, InstallOutcome, InstallRequest, PinLayout},
    cgroups::{self, CgroupDir},
    cgroupwatch::{CgroupEvent, CgroupWatcher, WatchConfig},
    cli::{ModeArg, NodeArgs, Shared},
    config::Config,
    http,
    input::bad_input,
    k8s::{
        self,
        events::{PodAttempt, PodEvents},
        ClusterView,
    },
    metrics::{CounterSample, Snapshot},
    podcgroup::{self, CgroupDriver, QosClass},
    policy::{self, NamespaceClasses, PodInfo, PolicyConfig},
};

/// Minimum time between two full reconciles (watch bursts are coalesced).
const RECONCILE_EVERY: Duration = Duration::from_millis(200);

/// Default metrics address in node mode: Prometheus scrapes the pod IP.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9090";

/// Everything validated before the kernel or the API server is touched.
struct Plan {
    node: String,
    config_path: Option<PathBuf>,
    config: Config,
    blocked: Vec<datalab_guard_common::cidr::Cidr>,
    root: CgroupDir,
    driver: CgroupDriver,
    metrics_addr: SocketAddr,
    kubeconfig: Option<PathBuf>,
    own_pod_uid: Option<String>,
    netns_dir: PathBuf,
    state_file: Option<PathBuf>,
}

pub fn run(shared: &Shared, args: &NodeArgs) -> anyhow::Result<()> {
    let plan = validate(shared, args)?;
    crate::runtime::build()?.block_on(serve(shared, plan))
}

fn load_config(path: Option<&Path>, shared: &Shared) -> anyhow::Result<Config> {
    let mut config = match path {
        Some(path) => Config::load(path).map_err(bad_input)?,
        None => Config::default(),
    };
    let mode = shared.mode.map(|m| match m {
        ModeArg::Enforce => Mode::Enforce,
        ModeArg::Audit => Mode::Audit,
    });
    config
        .merge_cli(&shared.block, &shared.preset, mode)
        .map_err(bad_input)?;
    Ok(config)
}

fn validate(shared: &Shared, args: &NodeArgs) -> anyhow::Result<Plan> {
    let node = args
        .node_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| bad_input("the node name is required: --node-name or NODE_NAME"))?;
    let config = load_config(args.config.as_deref(), shared)?;
    let blocked = config.blocklist();
    if let Some(path) = &args.kubeconfig {
        // Parse it now: a broken kubeconfig is bad input, found before anything else runs.
        kube::config::Kubeconfig::read_from(path)
            .map_err(|e| bad_input(format!("--kubeconfig {}: {e}", path.display())))?;
    }
    let (root, driver) = resolve_root(args.cgroup_root.as_deref(), &config)?;
    let metrics_addr = match shared.metrics_addr {
        Some(addr) => addr,
        None => DEFAULT_METRICS_ADDR.parse().expect("valid default address"),
    };
    if config.deny_raw_sockets
        && crate::check::bpf_lsm_active(crate::check::active_lsms().as_deref()) == Some(false)
    {
        return Err(bad_input("denyRawSockets needs the BPF LSM to refuse AF_PACKET sockets, and it is not active; add `bpf` to the lsm= kernel parameter"));
    }
    Ok(Plan {
        node,
        config_path: args.config.clone(),
        config,
        blocked,
        root,
        driver,
        metrics_addr,
        kubeconfig: args.kubeconfig.clone(),
        own_pod_uid: std::env::var("POD_UID").ok().filter(|s| !s.is_empty()),
        netns_dir: args.netns_dir.clone(),
        state_file: Some(args.state_file.clone()),
    })
}

/// The pods' cgroup root: `--cgroup-root`, else the config's `cgroup.root`, else detected.
fn resolve_root(flag: Option<&Path>, config: &Config) -> anyhow::Result<(CgroupDir, CgroupDriver)> {
    let mount = cgroups::cgroup2_mount().map_err(bad_input)?;
    let path = match flag
        .map(Path::to_path_buf)
        .or_else(|| config.cgroup.root_path().map(Path::to_path_buf))
    {
        Some(path) => path,
        None => podcgroup::detect_pods_root(&mount).map_err(bad_input)?,
    };
    let root =
        cgroups::validate_cgroup_dir(&path).map_err(|e| bad_input(format!("cgroup root: {e}")))?;
    let driver = match config.cgroup.driver {
        crate::config::CgroupDriver::Systemd => CgroupDriver::Systemd,
        crate::config::CgroupDriver::Cgroupfs => CgroupDriver::Cgroupfs,
        crate::config::CgroupDriver::Auto => podcgroup::detect_driver(&root.path).ok_or_else(|| {
            bad_input(format!(
                "cannot tell the cgroup driver from {} (expected kubepods, kubepods.slice or *-kubepods.slice); set cgroup.driver",
                root.path.display()
            ))
        })?,
    };
    Ok((root, driver))
}

/// What the audit stream needs to name the pod and container of a cgroup.
#[derive(Default)]
struct Attribution {
    /// Pod-level cgroup id → pod.
    pods: HashMap<u64, PodRef>,
    /// Container cgroup id → (pod cgroup id, container name).
    containers: HashMap<u64, (u64, String)>,
}

#[derive(Clone)]
struct PodRef {
    namespace: String,
    name: String,
    uid: String,
}

/// The agent's reconciling state.
struct Core {
    root: CgroupDir,
    driver: CgroupDriver,
    policy: PolicyConfig,
    classes: NamespaceClasses,
    attribution: Arc<RwLock<Attribution>>,
    gauges: Arc<Mutex<Gauges>>,
    /// API uid → the uid the kubelet named the cgroup with (differs for static pods).
    cgroup_uids: HashMap<String, String>,
    /// API uid → the pod's cgroup directory, once the kubelet has made it.
    dirs: HashMap<String, CgroupDir>,
    /// Pod directories (ids) that gained a child since the last container scan.
    container_scan: HashSet<u64>,
    /// Pod uids of the cgroup directories the watcher has seen.
    discovered: HashSet<String>,
    /// cgroup uid → pod, as of the last reconcile (for the new-cgroup fast path).
    by_uid: HashMap<String, PodInfo>,
    /// One row per pod for `status` (namespace, pod, verdict, reason, cgroup id).
    rows: Vec<serde_json::Value>,
}

#[derive(Clone, Copy, Default)]
struct Gauges {
    guarded: u64,
    exempt: u64,
    unknown: u64,
}

impl Core {
    /// Computes the POLICY entries from the caches and the cgroup tree, and refreshes the
    /// attribution index and gauges as a side product.
    fn desired(&mut self, view: &ClusterView) -> BTreeMap<u64, datalab_guard_common::PolicyEntry> {
        let pods = view.pods();
        self.cgroup_uids = view.cgroup_uids();
        let namespaces = view.namespaces();
        // Free the counter classes of namespaces that left the environment set.
        let policy = &self.policy;
        self.classes.retain(|name| {
            namespaces
                .get(name)
                .is_some_and(|ns| policy.is_environment(ns))
        });

        // Resolve pod directories once and keep them (inotify removals invalidate): with
        // 10 000 pods a reconcile must not stat 30 000 paths.
        let live: HashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
        self.dirs.retain(|uid, _| live.contains(uid.as_str()));
        let mut newly_resolved = Vec::new();
        for pod in &pods {
            if !self.dirs.contains_key(&pod.uid) {
                if let Some(dir) = self.pod_dir(pod) {
                    newly_resolved.push(dir.id);
                    self.dirs.insert(pod.uid.clone(), dir);
                }
            }
        }
        let mut attribution = Attribution::default();
        let mut resolved: Vec<(&PodInfo, Option<&policy::NamespaceInfo>, Option<u64>)> =
            Vec::with_capacity(pods.len());
        for pod in &pods {
            let dir = self.dirs.get(&pod.uid);
            if let Some(dir) = dir {
                attribution.pods.insert(
                    dir.id,
                    PodRef {
                        namespace: pod.namespace.clone(),
                        name: pod.name.clone(),
                        uid: pod.uid.clone(),
                    },
                );
            }
            resolved.push((pod, namespaces.get(&pod.namespace), dir.map(|d| d.id)));
        }
        let (entries, summary) = policy::desired_entries(
            resolved.iter().map(|(p, n, id)| (*p, *n, *id)),
            &self.policy,
            &mut self.classes,
        );
        self.rows = resolved
            .iter()
            .map(|(pod, ns, id)| {
                let decision = policy::verdict(pod, *ns, &self.policy);
                serde_json::json!({
                    "namespace": pod.namespace,
                    "pod": pod.name,
                    "uid": pod.uid,
                    "verdict": if decision.verdict == Verdict::Guard { "guard" } else { "exempt" },
                    "reason": decision.reason.as_str(),
                    "cgroup_id": id,
                })
            })
            .collect();

        // Container sub-cgroups, for naming containers in audit lines: scanned for pods seen
        // for the first time and pods whose directory gained a child since.
        let rescan: HashSet<u64> = newly_resolved
            .into_iter()
            .chain(self.container_scan.drain())
            .collect();
        let previous = std::mem::take(
            &mut self
                .attribution
                .write()
                .expect("attribution lock")
                .containers,
        );
        attribution.containers = previous
            .into_iter()
            .filter(|(_, (pod, _))| attribution.pods.contains_key(pod) && !rescan.contains(pod))
            .collect();
        for pod in &pods {
            let Some(dir) = self.dirs.get(&pod.uid) else {
                continue;
            };
            if !rescan.contains(&dir.id) {
                continue;
            }
            let names: HashMap<String, String> = pod
                .containers
                .iter()
                .filter_map(|c| {
                    let (_, id) = podcgroup::container_id_from_status(c.container_id.as_deref()?)?;
                    Some((id.to_owned(), c.name.clone()))
                })
                .collect();
            if let Ok(children) = std::fs::read_dir(&dir.path) {
                for child in children.flatten() {
                    let name = child.file_name().to_string_lossy().into_owned();
                    let Some(parsed) = podcgroup::parse_container_dir_name(&name) else {
                        continue;
                    };
                    let Some(container) = names.get(&parsed.id) else {
                        continue;
                    };
                    if let Ok(meta) = child.metadata() {
                        attribution.containers.insert(
                            std::os::unix::fs::MetadataExt::ino(&meta),
                            (dir.id, container.clone()),
                        );
                    }
                }
            }
        }
        // Pod cgroups with no pod behind them, from the watcher's last full scan.
        let known: HashSet<&str> = pods
            .iter()
            .map(|p| {
                self.cgroup_uids
                    .get(&p.uid)
                    .map_or(p.uid.as_str(), String::as_str)
            })
            .collect();
        let unknown = self
            .discovered
            .iter()
            .filter(|uid| !known.contains(uid.as_str()) && !live.contains(uid.as_str()))
            .count() as u64;
        *self.gauges.lock().expect("gauges lock") = Gauges {
            guarded: summary.guarded as u64,
            exempt: summary.exempt as u64,
            unknown,
        };
        *self.attribution.write().expect("attribution lock") = attribution;
        self.by_uid = pods
            .iter()
            .map(|p| {
                (
                    self.cgroup_uids
                        .get(&p.uid)
                        .cloned()
                        .unwrap_or_else(|| p.uid.clone()),
                    p.clone(),
                )
            })
            .collect();
        entries
    }

    /// A watcher event: keeps the caches in line with the cgroup tree.
    fn observe(&mut self, event: &CgroupEvent) {
        match event {
            CgroupEvent::Created(path) => {
                if let Some(parent) = path
                    .parent()
                    .and_then(|p| cgroups::validate_cgroup_dir(p).ok())
                {
                    if self.dirs.values().any(|d| d.id == parent.id) {
                        self.container_scan.insert(parent.id);
                    }
                }
                if let Some((_, uid)) = path
                    .file_name()
                    .and_then(|n| podcgroup::parse_pod_dir_name(&n.to_string_lossy()))
                {
                    self.discovered.insert(uid);
                }
            }
            CgroupEvent::Removed(path) => {
                self.dirs.retain(|_, d| d.path != *path);
                if let Some((_, uid)) = path
                    .file_name()
                    .and_then(|n| podcgroup::parse_pod_dir_name(&n.to_string_lossy()))
                {
                    self.discovered.remove(&uid);
                }
            }
            CgroupEvent::Rescan(found) => {
                self.discovered = found.iter().map(|d| d.uid.clone()).collect();
                let by_path: HashSet<&Path> = found.iter().map(|d| d.dir.path.as_path()).collect();
                self.dirs.retain(|_, d| by_path.contains(d.path.as_path()));
            }
        }
    }

    /// The pod's cgroup directory, if the kubelet has created it. The QoS class decides the
    /// parent; when the API has not reported it yet every class is tried.
    fn pod_dir(&self, pod: &PodInfo) -> Option<CgroupDir> {
        let classes: Vec<QosClass> = match pod
            .qos_class
            .as_deref()
            .and_then(|q| q.parse::<QosClass>().ok())
        {
            Some(q) => vec![q],
            None => vec![
                QosClass::Guaranteed,
                QosClass::Burstable,
                QosClass::BestEffort,
            ],
        };
        classes.into_iter().find_map(|qos| {
            // Static pods' cgroups carry the config hash (the mirror annotation), not the API uid.
            let uid = self
                .cgroup_uids
                .get(&pod.uid)
                .map_or(pod.uid.as_str(), String::as_str);
            let path = podcgroup::pod_cgroup_dir(&self.root.path, self.driver, qos, uid);
            cgroups::validate_cgroup_dir(&path).ok()
        })
    }
}

async fn serve(shared: &Shared, plan: Plan) -> anyhow::Result<()> {
    let listener = http::bind(plan.metrics_addr).await.map_err(bad_input)?;
    let mut termination = crate::runtime::Termination::new()?;
    let client = k8s::connect(plan.kubeconfig.as_deref()).await?;
    let layout = PinLayout::new(&shared.bpffs);

    let maps_slot: Arc<Mutex<Option<GuardMaps>>> = Arc::new(Mutex::new(None));
    let attribution = Arc::new(RwLock::new(Attribution::default()));
    let gauges = Arc::new(Mutex::new(Gauges::default()));
    let classes_view: Arc<RwLock<BTreeMap<u32, String>>> = Arc::new(RwLock::new(BTreeMap::new()));
    let states_for_metrics = crate::k8s::state::NamespaceStates::default();
    let watch_health = k8s::WatchHealth::default();
    let state = Arc::new(http::HttpState::new(snapshot_fn(
        maps_slot.clone(),
        gauges.clone(),
        classes_view.clone(),
        states_for_metrics.clone(),
        watch_health.clone(),
    )));
    state.set_ready(false, "waiting for the first full sync with the API server");
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let http_task = tokio::spawn(http::serve_listener(
        listener,
        state.clone(),
        shutdown_rx.clone(),
    ));

    let namespace_states = states_for_metrics.clone();
    let view = Arc::new(ClusterView::start(client.clone(), &plan.node, watch_health));
    tracing::info!(node = %plan.node, root = %plan.root.path.display(), "waiting for the first full list of namespaces and pods");
    tokio::select! {
        _ = view.wait_synced() => {},
        _ = termination.terminated() => {
            tracing::info!("exiting before the first sync; nothing changed in the kernel");
            return Ok(());
        }
    }

    let mut core = Core {
        root: plan.root.clone(),
        driver: plan.driver,
        policy: PolicyConfig::new(&plan.config, plan.own_pod_uid.clone()),
        classes: NamespaceClasses::new(),
        attribution: attribution.clone(),
        gauges: gauges.clone(),
        cgroup_uids: HashMap::new(),
        dirs: HashMap::new(),
        container_scan: HashSet::new(),
        discovered: podcgroup::scan_pods(&plan.root.path, plan.driver)
            .map(|f| f.into_iter().map(|d| d.uid).collect())
            .unwrap_or_default(),
        by_uid: HashMap::new(),
        rows: Vec::new(),
    };
    let desired = core.desired(&view);
    let installed = bpf::install(InstallRequest {
        layout: layout.clone(),
        root: plan.root.clone(),
        config: guard_config(&plan.config),
        blocked: plan.blocked.clone(),
        policy: desired.clone(),
    })?;
    let outcome = match installed.outcome {
        InstallOutcome::Fresh => "attached".to_owned(),
        InstallOutcome::Adopted => "adopted existing pins".to_owned(),
        InstallOutcome::Upgraded { previous_hash } => {
            format!("upgraded programs {previous_hash:016x}")
        }
    };
    tracing::info!(
        node = %plan.node,
        root = %plan.root.path.display(),
        entries = desired.len(),
        links = %installed.links.join(","),
        "guard {outcome}"
    );
    let bpf::Installed { maps, events, .. } = installed;
    *maps_slot.lock().expect("maps lock") = Some(maps);
    *classes_view.write().expect("classes lock") = core.classes.snapshot();
    state.set_ready(true, "programs attached and maps hold the current verdicts");

    // Cluster-wide baseline (leader only writes): allow-web-egress, Pod Security, bypasses.
    let baseline = k8s::provision::spawn(
        client.clone(),
        &plan.config,
        &plan.node,
        namespace_states.clone(),
    );

    // Audit stream → stdout lines + pod Events.
    let (attempt_tx, attempt_rx) = mpsc::channel::<PodAttempt>(1024);
    let attempts_by_pod: Arc<Mutex<HashMap<String, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let audit_task = tokio::spawn(stream_audit(
        events,
        attribution.clone(),
        plan.node.clone(),
        attempt_tx,
        attempts_by_pod.clone(),
        shutdown_rx.clone(),
    ));
    let events_task = if plan.config.audit.kubernetes_events {
        Some(tokio::spawn(publish_events(
            PodEvents::new(
                client.clone(),
                &plan.node,
                plan.config.audit.events_per_pod_per_minute,
            ),
            attempt_rx,
        )))
    } else {
        None
    };

    // Every node: does the CNI enforce the environments' NetworkPolicy? A change is logged
    // and reported with an Event on the namespace.
    let (cni_tx, cni_rx) = mpsc::channel::<(
        String,
        Option<crate::k8s::state::CniState>,
        crate::k8s::state::CniState,
    )>(64);
    let cni_events_task = tokio::spawn(k8s::events::publish_cni_changes(
        client.clone(),
        plan.node.clone(),
        cni_rx,
    ));
    let probe_task = tokio::spawn(crate::cniprobe::run_probe_loop(
        plan.config.probe.clone(),
        PathBuf::from(crate::cniprobe::SELF_NETNS),
        crate::cniprobe::targets_from_blocked(&plan.blocked, plan.config.probe.port),
        probe_targets(view.clone(), core_snapshot(&core), plan.netns_dir.clone()),
        namespace_states.clone(),
        move |namespace: &str,
              old: Option<crate::k8s::state::CniState>,
              new: crate::k8s::state::CniState| {
            tracing::warn!(
                namespace,
                old = old.map(|o| o.as_str()),
                new = new.as_str(),
                "CNI enforcement of the namespace's NetworkPolicy changed"
            );
            let _ = cni_tx.try_send((namespace.to_owned(), old, new));
        },
        shutdown_rx.clone(),
    ));

    // cgroup directories appearing and going.
    let mut watch_config = WatchConfig::new(&plan.root.path, plan.driver);
    watch_config.rescan_interval = plan.config.rescan_interval.as_std();
    let (_watcher, mut cg_rx) =
        CgroupWatcher::spawn(watch_config).context("cannot watch the pods' cgroup directories")?;

    let changed = view.changed();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut last_full = Instant::now();
    let mut last_reconcile = Instant::now();
    let mut dirty = false;
    loop {
        // A reconcile at most every RECONCILE_EVERY: with thousands of pods a burst of watch
        // events must not queue reconciles; new pod cgroups take the fast path meanwhile.
        let debounce = tokio::time::sleep_until((last_reconcile + RECONCILE_EVERY).into());
        tokio::select! {
            _ = changed.notified() => { dirty = true; continue; },
            Some(event) = cg_rx.recv() => {
                core.observe(&event);
                if let CgroupEvent::Created(path) = &event {
                    fast_path_new_cgroup(&mut core, &view, path, &maps_slot);
                }
                dirty = true;
                continue;
            },
            _ = debounce, if dirty => {},
            _ = hup.recv() => {
                match load_config(plan.config_path.as_deref(), shared) {
                    Ok(new_config) => {
                        core.policy = PolicyConfig::new(&new_config, plan.own_pod_uid.clone());
                        baseline.reload(&new_config);
                        let blocked = new_config.blocklist();
                        if let Some(maps) = maps_slot.lock().expect("maps lock").as_mut() {
                            let mut gc = guard_config(&new_config);
                            gc.root_level = plan.root.level;
                            let result = maps.reconcile_blocked(&blocked).and_then(|_| maps.write_config(gc, &blocked));
                            if let Err(e) = result {
                                tracing::error!(error = %e, "cannot apply the reloaded config to the maps");
                            }
                        }
                        tracing::info!("configuration reloaded (SIGHUP)");
                    }
                    Err(e) => tracing::error!(error = %e, "reloaded configuration rejected; keeping the previous one"),
                }
            },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {},
            _ = termination.terminated() => break,
        }
        dirty = false;
        last_reconcile = Instant::now();
        let desired = core.desired(&view);
        let result = {
            let mut slot = maps_slot.lock().expect("maps lock");
            let maps = slot.as_mut().expect("installed");
            maps.reconcile_policy(&desired)
        };
        *classes_view.write().expect("classes lock") = core.classes.snapshot();
        match result {
            Ok(changes) if changes != Default::default() => {
                tracing::info!(
                    added = changes.added,
                    updated = changes.updated,
                    removed = changes.removed,
                    entries = desired.len(),
                    "policy reconciled"
                );
                state.set_ready(true, "programs attached and maps hold the current verdicts");
            }
            Ok(_) => state.set_ready(true, "programs attached and maps hold the current verdicts"),
            Err(e) => {
                tracing::error!(error = %e, "cannot reconcile the policy map");
                state.set_ready(false, "policy map not reconciled");
            }
        }
        {
            let policy = &core.policy;
            let namespaces = view.namespaces();
            namespace_states
                .retain(|ns| namespaces.get(ns).is_some_and(|n| policy.is_environment(n)));
            if let Some(path) = &plan.state_file {
                let counts = {
                    let mut counts = attempts_by_pod.lock().expect("attempts lock");
                    let live: HashSet<&str> =
                        core.rows.iter().filter_map(|r| r["uid"].as_str()).collect();
                    counts.retain(|uid, _| live.contains(uid.as_str()));
                    counts.clone()
                };
                let pods: Vec<serde_json::Value> = core
                    .rows
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        let n = r["uid"]
                            .as_str()
                            .and_then(|u| counts.get(u))
                            .copied()
                            .unwrap_or(0);
                        r["audited_attempts"] = serde_json::json!(n);
                        r
                    })
                    .collect();
                write_state_file(
                    path,
                    &plan.node,
                    &namespace_states.snapshot(),
                    &pods,
                    &core.classes.snapshot(),
                );
            }
        }
        if last_full.elapsed() > Duration::from_secs(300) {
            tracing::debug!(watch_errors = view.watch_errors(), "periodic state");
            last_full = Instant::now();
        }
    }

    // Stop cluster writes and release the Lease so a standby takes over at once.
    baseline.shutdown().await;
    tracing::info!(
        "exiting; enforcement stays in place (pinned under {})",
        layout.root().display()
    );
    let _ = shutdown_tx.send(true);
    probe_task.abort();
    cni_events_task.abort();
    for task in [http_task, audit_task] {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    if let Some(task) = events_task {
        task.abort();
    }
    Ok(())
}

/// A pod cgroup just appeared: if the API already told us about the pod, write its entry
/// now rather than at the next reconcile, so its containers start under the right verdict.
fn fast_path_new_cgroup(
    core: &mut Core,
    view: &ClusterView,
    path: &Path,
    maps_slot: &Arc<Mutex<Option<GuardMaps>>>,
) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Some((_, uid)) = podcgroup::parse_pod_dir_name(&name) else {
        return;
    };
    if !core.by_uid.contains_key(&uid) {
        // Announced since the last reconcile: refresh the index (no syscalls, just the cache).
        let cgroup_uids = view.cgroup_uids();
        core.by_uid = view
            .pods()
            .into_iter()
            .map(|p| {
                (
                    cgroup_uids
                        .get(&p.uid)
                        .cloned()
                        .unwrap_or_else(|| p.uid.clone()),
                    p,
                )
            })
            .collect();
    }
    let Some(pod) = core.by_uid.get(&uid).cloned() else {
        return;
    };
    let namespaces = view.namespaces();
    let decision = policy::verdict(&pod, namespaces.get(&pod.namespace), &core.policy);
    let Ok(dir) = cgroups::validate_cgroup_dir(path) else {
        return;
    };
    let class = if decision.verdict == Verdict::Guard {
        core.classes.class_of(&pod.namespace)
    } else {
        0
    };
    let entry = datalab_guard_common::PolicyEntry {
        verdict: decision.verdict as u32,
        class,
    };
    if let Some(maps) = maps_slot.lock().expect("maps lock").as_mut() {
        if let Err(e) = maps.set_policy(dir.id, entry) {
            tracing::warn!(error = %e, "cannot write the new pod's entry");
        }
    }
    core.dirs.insert(pod.uid.clone(), dir);
}

fn guard_config(config: &Config) -> GuardConfig {
    let mut gc = GuardConfig::zeroed();
    gc.mode = config.mode as u32;
    gc.default_verdict = config.unknown_cgroup_verdict as u32;
    gc.deny_raw_sockets = u32::from(config.deny_raw_sockets);
    gc.events_per_window = config.audit.events_per_second;
    gc.window_ms = 1000;
    gc
}

/// Reads the ring buffer; writes one JSON line per event naming namespace, pod, container
/// and node; forwards pod-attributed attempts to the Event publisher (dropping them when it
/// lags: Events are a courtesy, the counters and audit lines are the record).
async fn stream_audit(
    events: aya::maps::RingBuf<aya::maps::MapData>,
    attribution: Arc<RwLock<Attribution>>,
    node: String,
    attempts: mpsc::Sender<PodAttempt>,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let clock = audit::BootClock::new();
    let sink = move |event: datalab_guard_common::AuditEvent| {
        let index = attribution.read().expect("attribution lock");
        let container = index.containers.get(&event.cgroup_id).cloned();
        let pod_id = container
            .as_ref()
            .map(|(pod, _)| *pod)
            .unwrap_or(event.policy_cgroup_id);
        let pod = index
            .pods
            .get(&pod_id)
            .or_else(|| index.pods.get(&event.cgroup_id))
            .cloned();
        drop(index);
        let who = audit::Attribution {
            namespace: pod.as_ref().map(|p| p.namespace.clone()),
            pod: pod.as_ref().map(|p| p.name.clone()),
            container: container.as_ref().map(|(_, c)| c.clone()),
            node: Some(node.clone()),
            cgroup: None,
        };
        let record = audit::record(&event, &clock, &who);
        audit::write_line(&record);
        if let Some(pod) = pod {
            if let Ok(mut counts) = counts.lock() {
                *counts.entry(pod.uid.clone()).or_insert(0) += 1;
            }
            let _ = attempts.try_send(PodAttempt {
                namespace: pod.namespace,
                pod: pod.name,
                uid: pod.uid,
                container: who.container,
                destination: record["dst"].as_str().unwrap_or("(socket)").to_owned(),
                audited: event.action == datalab_guard_common::Action::Audited as u8,
            });
        }
    };
    if let Err(e) = audit::consume(events, sink, shutdown).await {
        tracing::error!(error = %e, "audit stream stopped");
    }
}

async fn publish_events(mut publisher: PodEvents, mut attempts: mpsc::Receiver<PodAttempt>) {
    while let Some(attempt) = attempts.recv().await {
        publisher.record(attempt).await;
    }
}

/// Metrics: in-kernel counters per namespace class, statistics, and pod gauges.
fn snapshot_fn(
    maps: Arc<Mutex<Option<GuardMaps>>>,
    gauges: Arc<Mutex<Gauges>>,
    classes: Arc<RwLock<BTreeMap<u32, String>>>,
    states: crate::k8s::state::NamespaceStates,
    watches: k8s::WatchHealth,
) -> Arc<dyn Fn() -> anyhow::Result<Snapshot> + Send + Sync> {
    Arc::new(move || {
        let slot = maps
            .lock()
            .map_err(|_| anyhow::anyhow!("maps lock poisoned"))?;
        let g = *gauges
            .lock()
            .map_err(|_| anyhow::anyhow!("gauges lock poisoned"))?;
        let Some(maps) = slot.as_ref() else {
            return Ok(Snapshot {
                counters: Vec::new(),
                events_lost: 0,
                events_suppressed: 0,
                events_malformed: 0,
                guarded: None,
                exempt: None,
                unknown_cgroups: None,
                policy_entries: 0,
                policy_capacity: u64::from(datalab_guard_common::maps::POLICY_MAX_ENTRIES),
                namespaces: Vec::new(),
                watches: watches.samples(),
            });
        };
        let names = classes
            .read()
            .map_err(|_| anyhow::anyhow!("classes lock poisoned"))?
            .clone();
        let class_ids = std::iter::once(0).chain(names.keys().copied());
        let counters = maps
            .counters(class_ids)?
            .into_iter()
            .map(|c| CounterSample {
                action: c.action,
                family: c.family,
                hook: c.hook,
                namespace: names.get(&c.class).cloned().unwrap_or_default(),
                value: c.value,
            })
            .collect();
        Ok(Snapshot {
            counters,
            events_lost: maps.stat(Stat::EventsLost)?,
            events_suppressed: maps.stat(Stat::EventsSuppressed)?,
            events_malformed: 0,
            guarded: Some(g.guarded),
            exempt: Some(g.exempt),
            unknown_cgroups: Some(g.unknown),
            policy_entries: maps.policy()?.len() as u64,
            policy_capacity: u64::from(datalab_guard_common::maps::POLICY_MAX_ENTRIES),
            namespaces: states
                .snapshot()
                .into_iter()
                .map(|(namespace, st)| crate::metrics::NamespaceSample {
                    namespace,
                    policy: st.policy.map(|p| p.as_str()),
                    cni: st.cni.map(|c| c.as_str()),
                })
                .collect(),
            watches: watches.samples(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_config_follows_the_file() {
        let config = Config::default();
        let gc = guard_config(&config);
        assert_eq!(Mode::from_raw(gc.mode), Mode::Enforce);
        assert_eq!(Verdict::from_raw(gc.default_verdict), Verdict::Guard);
        assert_eq!(gc.events_per_window, 5);
    }
}

/// What the probe needs of the reconciler: the resolver settings, to find pod cgroups.
#[derive(Clone)]
struct ResolverView {
    root: PathBuf,
    driver: CgroupDriver,
    policy: Arc<PolicyConfig>,
}

fn core_snapshot(core: &Core) -> ResolverView {
    ResolverView {
        root: core.root.path.clone(),
        driver: core.driver,
        policy: Arc::new(core.policy.clone()),
    }
}

/// For each environment namespace with a running pod on this node, one network namespace
/// to probe from: the runtime's netns file holding the pod's IP (`--netns-dir`, the host's
/// /run/netns), else the namespace of a process in the pod's cgroup (needs hostPID).
fn probe_targets(
    view: Arc<ClusterView>,
    resolver: ResolverView,
    netns_dir: PathBuf,
) -> impl Fn() -> Vec<(String, PathBuf)> + Send + Sync + 'static {
    move || {
        let namespaces = view.namespaces();
        let ips = view.pod_ips();
        let by_ip: Vec<(PathBuf, Vec<std::net::IpAddr>)> =
            crate::cniprobe::netns_addresses(&netns_dir).unwrap_or_default();
        let mut chosen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for pod in view.pods() {
            if chosen.contains_key(&pod.namespace)
                || pod.phase.as_deref() != Some("Running")
                || pod.host_network
            {
                continue;
            }
            let Some(ns) = namespaces.get(&pod.namespace) else {
                continue;
            };
            if !resolver.policy.is_environment(ns) {
                continue;
            }
            let from_ip = ips.get(&pod.uid).and_then(|ip| {
                by_ip
                    .iter()
                    .find(|(_, addrs)| addrs.contains(ip))
                    .map(|(p, _)| p.clone())
            });
            let from_cgroup = || {
                [
                    QosClass::Guaranteed,
                    QosClass::Burstable,
                    QosClass::BestEffort,
                ]
                .into_iter()
                .find_map(|qos| {
                    crate::cniprobe::netns_of_cgroup(&podcgroup::pod_cgroup_dir(
                        &resolver.root,
                        resolver.driver,
                        qos,
                        &pod.uid,
                    ))
                })
            };
            if let Some(path) = from_ip.or_else(from_cgroup) {
                chosen.insert(pod.namespace.clone(), path);
            }
        }
        chosen.into_iter().collect()
    }
}

/// Writes what `status` shows per environment namespace and per pod (atomically: write,
/// then rename). `audited_attempts` counts the audit records attributed to the pod (after
/// the in-kernel rate limit, so a floor); exact totals are per namespace in the counters.
fn write_state_file(
    path: &Path,
    node: &str,
    states: &BTreeMap<String, crate::k8s::state::NamespaceStatus>,
    pods: &[serde_json::Value],
    classes: &BTreeMap<u32, String>,
) {
    let doc = serde_json::json!({
        "node": node,
        "written_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "namespaces": states,
        "pods": pods,
        "counter_classes": classes,
    });
    let tmp = path.with_extension("tmp");
    let result = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap_or_default()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::debug!(path = %path.display(), error = %e, "cannot write the state file");
    }
}
