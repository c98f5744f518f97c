//! `xtask-bench-datalab`: the measuring half of `cargo xtask bench --datalab` (issue 12: a
//! Datalab platform's shape — tens of thousands of namespaces, one per environment, a few
//! hundred pods per node — and the load the agents put on the API server).
//!
//! The cluster is the kit's API server fixture, in this process; the agents under test are
//! the real `datalab-guard` binaries, each its own process, so nothing the fixture does is
//! counted as theirs (memory and CPU come from `/proc/<agent pid>` only). Steps:
//! 1. seed (in one step, [`FakeApiServer::seed`]) N namespaces, half of them environments
//!    (`datalab.io/environment=true`, Pod Security `baseline` enforced), and one tenant
//!    NetworkPolicy per environment; build a kubelet-style cgroup tree with P pods of this
//!    node (nine in ten in environments);
//! 2. start `datalab-guard controller` with no baseline policy anywhere: time to ready,
//!    RSS, time until every environment has `allow-web-egress` (then 2 policies per
//!    environment), and its writes per second, from the fixture's traffic log;
//! 3. start `datalab-guard node`: time to `/readyz`, RSS and peak RSS, CPU seconds;
//! 4. a quiet window of S seconds: the controller's writes and the node agent's requests and
//!    response bytes received in it, per minute (watch streams counted by the bytes they
//!    carried within the window);
//! 5. C seconds of churn at R pods created and R deleted per second, alternating two orders:
//!    `api_first` (announced, then its cgroup created `--lead-ms` later; t0 = the `mkdir`)
//!    and `cgroup_first` (cgroup created, then announced `--lead-ms` later; t0 = just before
//!    the fixture commits the pod and wakes its watches). The end of a sample is the first
//!    poll of the pinned VERDICTS map (every [`POLL`]) that holds the expected verdict;
//! 6. RSS, peak RSS and CPU seconds again.
//!
//! Prints one JSON document; everything it creates is removed on the way out.

#[path = "kubelet_tree.rs"]
mod kubelet_tree;
#[path = "machine.rs"]
mod machine;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use datalab_guard::bpf::{GuardMaps, PinLayout};
use datalab_guard_common::Verdict;
use datalab_guard_tests::{
    apiserver::{traffic::TrafficEntry, FakeApiServer, Kind, PodBuilder},
    free_loopback_addr, Agent, BpffsDir, TestCgroup,
};
use serde_json::{json, Value};

use self::kubelet_tree::{cgroup_id, container_id, cpu_seconds, pod_dir, qos, rss_kib, uid};

#[derive(Debug, Parser)]
struct Args {
    /// The agent binary (a release build: debug builds measure the compiler, not the agent).
    #[arg(long)]
    agent: PathBuf,
    /// Fraction of the full scenario's object counts (20 000 namespaces, 500 pods); the
    /// rates and durations stay as given.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Pods created (and as many deleted) per second during the churn.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Seconds of churn.
    #[arg(long, default_value_t = 60)]
    churn_seconds: u32,
    /// Seconds of the quiet window (steady-state API load).
    #[arg(long, default_value_t = 60)]
    steady_seconds: u32,
    /// Milliseconds between a churn pod's first and second appearance (API, cgroup).
    #[arg(long, default_value_t = 100)]
    lead_ms: u64,
}

const NODE: &str = "bench-node";
const ENV_LABEL: (&str, &str) = ("datalab.io/environment", "true");
const PSA_LABEL: (&str, &str) = ("pod-security.kubernetes.io/enforce", "baseline");
const BASELINE: &str = "allow-web-egress";
const FULL_NAMESPACES: f64 = 20_000.0;
const FULL_PODS: f64 = 500.0;
/// How often the verdict map is polled for pending samples.
const POLL: Duration = Duration::from_micros(500);
/// A churn pod whose entry takes longer is counted as missed.
const GIVE_UP: Duration = Duration::from_secs(10);

/// The scenario's object counts.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    environments: u32,
    others: u32,
    pods: u32,
}

impl Sizes {
    fn of(scale: f64) -> Sizes {
        let namespaces = (FULL_NAMESPACES * scale).round().max(20.0) as u32;
        Sizes {
            environments: namespaces / 2,
            others: namespaces - namespaces / 2,
            pods: (FULL_PODS * scale).round().max(10.0) as u32,
        }
    }
}

fn env_name(i: u32) -> String {
    format!("env-{i:05}")
}

/// Pod `n`'s namespace: one in ten in a non-environment namespace, the rest spread over the
/// environments.
fn namespace_of(sizes: Sizes, n: u32) -> (String, bool) {
    if n.is_multiple_of(10) {
        (format!("team-{:05}", (n / 10) % sizes.others), false)
    } else {
        (env_name(n.wrapping_mul(7919) % sizes.environments), true)
    }
}

fn expected(env: bool) -> u32 {
    match env {
        true => Verdict::Guard as u32,
        false => Verdict::Exempt as u32,
    }
}

fn tenant_policy(ns: &str) -> Value {
    json!({
        "metadata": {"name": "notebook-egress", "namespace": ns, "labels": {"app": "notebook"}},
        "spec": {
            "podSelector": {"matchLabels": {"app": "notebook"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                        "ports": [{"protocol": "TCP", "port": 443}]}],
        },
    })
}

fn seed_cluster(api: &FakeApiServer, sizes: Sizes) {
    let envs = (0..sizes.environments).map(|i| {
        (
            env_name(i),
            vec![ENV_LABEL, PSA_LABEL, ("datalab.io/owner", "someone")],
        )
    });
    let others = (0..sizes.others).map(|i| (format!("team-{i:05}"), vec![("team", "platform")]));
    api.seed_namespaces(envs.chain(others));
    api.seed(
        Kind::NetworkPolicy,
        (0..sizes.environments).map(|i| tenant_policy(&env_name(i))),
    );
}

fn announce(api: &FakeApiServer, sizes: Sizes, n: u32) {
    let (ns, _) = namespace_of(sizes, n);
    api.apply_pod(
        PodBuilder::new(&ns, &format!("pod-{n}"))
            .uid(&uid(n))
            .node(NODE)
            .label("app", "notebook")
            .qos_class(qos(n))
            .container("main", Some(&container_id(n)))
            .build(),
    );
}

/// Writes of `component` (Lease renewals left out) in arrival order.
fn writes_of(traffic: &[TrafficEntry], component: &str) -> Vec<Instant> {
    let mut times: Vec<Instant> = traffic
        .iter()
        .filter(|t| t.sent_by(component) && t.is_write())
        .filter(|t| t.resource.as_deref() != Some("leases"))
        .map(|t| t.at)
        .collect();
    times.sort();
    times
}

/// The most entries of sorted `times` within any one second.
fn busiest_second(times: &[Instant]) -> usize {
    let mut most = 0;
    let mut start = 0;
    for (end, t) in times.iter().enumerate() {
        while *t - times[start] >= Duration::from_secs(1) {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

/// A process's memory and CPU now.
fn process_json(pid: u32) -> Result<Value> {
    let (rss, hwm) = rss_kib(pid)?;
    Ok(json!({"rss_kib": rss, "hwm_kib": hwm, "cpu_s": cpu_seconds(&pid.to_string())?}))
}

/// The files and addresses of one agent process.
struct Inputs {
    dir: PathBuf,
    kubeconfig: String,
}

impl Inputs {
    fn new(api: &FakeApiServer) -> Result<Inputs> {
        let dir = std::env::temp_dir().join(format!("dgbench-datalab-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        Ok(Inputs {
            kubeconfig: kubeconfig.display().to_string(),
            dir,
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Inputs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Step 2: the controller provisions every environment from scratch.
fn provision(
    api: &FakeApiServer,
    args: &Args,
    inputs: &Inputs,
    sizes: Sizes,
) -> Result<(Agent, Value)> {
    std::fs::write(
        inputs.dir.join("controller.yaml"),
        "leaderElection:\n  namespace: kube-system\nnetworkPolicy:\n  dualStack: false\n",
    )?;
    let metrics = free_loopback_addr()?;
    let argv = [
        "controller".to_owned(),
        "--identity".into(),
        "bench-controller".into(),
        "--kubeconfig".into(),
        inputs.kubeconfig.clone(),
        "--config".into(),
        inputs.path("controller.yaml"),
        "--metrics-addr".into(),
        metrics.to_string(),
    ];
    let spawned = Instant::now();
    let mut controller = Agent::spawn_with(&args.agent, &argv, &[("DATALAB_GUARD_LOG", "warn")])?;
    controller
        .wait_ready(metrics, Duration::from_secs(300))
        .context("controller ready")?;
    let ready_s = spawned.elapsed().as_secs_f64();
    let at_ready = process_json(controller.pid())?;
    // 50 writes/s by default: allow twice that, plus two minutes.
    let limit = Duration::from_secs(120 + u64::from(sizes.environments) / 25);
    let created = |traffic: &[TrafficEntry]| -> Vec<Instant> {
        let mut t: Vec<Instant> = traffic
            .iter()
            .filter(|t| t.sent_by("controller") && t.method == "PATCH" && t.status == 201)
            .filter(|t| t.resource.as_deref() == Some("networkpolicies"))
            .map(|t| t.at)
            .collect();
        t.sort();
        t
    };
    let done = loop {
        let traffic = api.traffic();
        let made = created(&traffic);
        if made.len() >= sizes.environments as usize {
            break made;
        }
        if spawned.elapsed() > limit {
            bail!(
                "the controller provisioned {} of {} environments in {limit:?}",
                made.len(),
                sizes.environments
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let last = *done.last().context("no environment")?;
    let writes = writes_of(&api.traffic(), "controller");
    let span = writes
        .last()
        .zip(writes.first())
        .map_or(0.0, |(l, f)| (*l - *f).as_secs_f64());
    let policies = api.list(Kind::NetworkPolicy);
    let baselines = policies
        .iter()
        .filter(|p| p["metadata"]["name"] == BASELINE)
        .count();
    let result = json!({
        "time_to_ready_s": ready_s,
        "at_ready": at_ready,
        "provision_s": (last - spawned).as_secs_f64(),
        "after_provisioning": process_json(controller.pid())?,
        "writes": writes.len(),
        "write_rate_mean_per_s": if span > 0.0 { writes.len() as f64 / span } else { 0.0 },
        "write_rate_max_in_1s": busiest_second(&writes),
        "networkpolicies": policies.len(),
        "baseline_policies": baselines,
    });
    Ok((controller, result))
}

/// Step 3: the node agent starts against the seeded cluster.
fn start_node(
    args: &Args,
    inputs: &Inputs,
    root: &Path,
    pins: &Path,
) -> Result<(Agent, SocketAddr, Value)> {
    // No CNI probe (it would connect to the metadata address from this machine), no
    // runtime (none here), no startup taint (the fixture has no Node object).
    std::fs::write(
        inputs.dir.join("node.yaml"),
        "probe:\n  enabled: false\nruntime:\n  socket: none\nstartupTaint: \"\"\n",
    )?;
    let metrics = free_loopback_addr()?;
    let argv = [
        "node".to_owned(),
        "--node-name".into(),
        NODE.into(),
        "--kubeconfig".into(),
        inputs.kubeconfig.clone(),
        "--config".into(),
        inputs.path("node.yaml"),
        "--cgroup-root".into(),
        root.display().to_string(),
        "--bpffs".into(),
        pins.display().to_string(),
        "--metrics-addr".into(),
        metrics.to_string(),
        "--state-file".into(),
        inputs.path("state.json"),
        "--state-dir".into(),
        inputs.path("state-dir"),
    ];
    let spawned = Instant::now();
    let mut agent = Agent::spawn_with(&args.agent, &argv, &[("DATALAB_GUARD_LOG", "warn")])?;
    agent
        .wait_ready(metrics, Duration::from_secs(300))
        .context("node agent ready")?;
    let ready_s = spawned.elapsed().as_secs_f64();
    let at_ready = process_json(agent.pid())?;
    Ok((
        agent,
        metrics,
        json!({"time_to_ready_s": ready_s, "at_ready": at_ready}),
    ))
}

/// Step 4: what the agents ask of the API server while nothing changes.
fn steady(api: &FakeApiServer, seconds: u32) -> Value {
    let before: Vec<u64> = api.traffic().iter().map(TrafficEntry::bytes).collect();
    let from = Instant::now();
    std::thread::sleep(Duration::from_secs(u64::from(seconds)));
    let to = Instant::now();
    let traffic = api.traffic();
    let minutes = (to - from).as_secs_f64() / 60.0;
    let in_window = |t: &TrafficEntry| t.at >= from && t.at < to;
    let node_requests = traffic
        .iter()
        .filter(|t| t.sent_by("node") && in_window(t))
        .count();
    let node_bytes: u64 = traffic
        .iter()
        .enumerate()
        .filter(|(_, t)| t.sent_by("node"))
        .map(|(i, t)| t.bytes() - before.get(i).copied().unwrap_or(0))
        .sum();
    let controller_writes = writes_of(&traffic, "controller")
        .into_iter()
        .filter(|t| *t >= from && *t < to)
        .count();
    let controller_requests = traffic
        .iter()
        .filter(|t| t.sent_by("controller") && in_window(t))
        .count();
    json!({
        "seconds": (to - from).as_secs_f64(),
        "node_requests_per_min": node_requests as f64 / minutes,
        "node_bytes_per_min": node_bytes as f64 / minutes,
        "controller_writes_per_min": controller_writes as f64 / minutes,
        "controller_requests_per_min": controller_requests as f64 / minutes,
    })
}

/// One pod waiting for its map entry.
struct Pending {
    id: u64,
    t0: Instant,
    api_first: bool,
    want: u32,
}

enum Step {
    Mkdir(u32),
    Announce(u32),
}

/// Latency samples of the churn, per order, in ms.
#[derive(Default)]
struct Churned {
    api_first_ms: Vec<f64>,
    cgroup_first_ms: Vec<f64>,
    missed: u32,
    created: u32,
}

/// Step 5: see the module docs.
fn churn(
    api: &FakeApiServer,
    args: &Args,
    sizes: Sizes,
    root: &Path,
    maps: &GuardMaps,
) -> Result<Churned> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let lead = Duration::from_millis(args.lead_ms);
    let total = args.rate * args.churn_seconds;
    let mut live: VecDeque<u32> = (0..sizes.pods).collect();
    let mut due: VecDeque<(Instant, Step)> = VecDeque::new();
    let mut ids: HashMap<u32, u64> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut out = Churned::default();
    let mut next = Instant::now();
    while out.created < total || !due.is_empty() || !pending.is_empty() {
        let now = Instant::now();
        if out.created < total && now >= next {
            let n = sizes.pods + out.created;
            if out.created % 2 == 0 {
                announce(api, sizes, n);
                due.push_back((now + lead, Step::Mkdir(n)));
            } else {
                let dir = pod_dir(root, n);
                std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
                ids.insert(n, cgroup_id(&dir)?);
                due.push_back((now + lead, Step::Announce(n)));
            }
            if let Some(old) = live.pop_front() {
                api.delete_pod(&namespace_of(sizes, old).0, &format!("pod-{old}"));
                let _ = std::fs::remove_dir(pod_dir(root, old));
            }
            live.push_back(n);
            out.created += 1;
            next += interval;
        }
        while due.front().is_some_and(|(at, _)| *at <= Instant::now()) {
            let Some((_, step)) = due.pop_front() else {
                break;
            };
            let t0 = Instant::now();
            let (n, id, api_first) = match step {
                Step::Mkdir(n) => {
                    let dir = pod_dir(root, n);
                    std::fs::create_dir(&dir)
                        .with_context(|| format!("mkdir {}", dir.display()))?;
                    (n, cgroup_id(&dir)?, true)
                }
                Step::Announce(n) => {
                    announce(api, sizes, n);
                    (n, ids.remove(&n).context("cgroup id")?, false)
                }
            };
            let want = expected(namespace_of(sizes, n).1);
            pending.push(Pending {
                id,
                t0,
                api_first,
                want,
            });
        }
        pending.retain(|p| {
            let have = maps.policy_get(p.id).ok().flatten().map(|e| e.verdict);
            if have == Some(p.want) {
                let ms = p.t0.elapsed().as_secs_f64() * 1000.0;
                match p.api_first {
                    true => out.api_first_ms.push(ms),
                    false => out.cgroup_first_ms.push(ms),
                }
                return false;
            }
            if p.t0.elapsed() > GIVE_UP {
                out.missed += 1;
                return false;
            }
            true
        });
        std::thread::sleep(POLL);
    }
    Ok(out)
}

fn percentiles(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if ms.is_empty() {
            return Value::Null;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * ms.len() as f64).ceil().max(1.0) as usize;
        json!(ms[rank.min(ms.len()) - 1])
    };
    json!({"n": ms.len(), "p50": at(50.0), "p90": at(90.0), "p99": at(99.0), "max": at(100.0)})
}

fn check_prerequisites(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "xtask-bench-datalab must run as root (BPF, cgroups); run `sudo ./x bench --datalab`"
        );
    }
    if !args.agent.is_file() {
        bail!("the agent binary {} does not exist: build it first (`cargo build --release -p datalab-guard`)", args.agent.display());
    }
    if !(args.scale > 0.0 && args.scale <= 1.0) {
        bail!("--scale must be in (0, 1], not {}", args.scale);
    }
    if args.rate == 0 || args.churn_seconds == 0 || args.steady_seconds == 0 {
        bail!("--rate, --churn-seconds and --steady-seconds must be at least 1");
    }
    datalab_guard_tests::cgroup2_root()
        .context("no cgroup2 mount (needed for the fake kubelet tree)")?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    check_prerequisites(&args)?;
    let sizes = Sizes::of(args.scale);
    // The oldest pod is deleted as each new one comes: it must have finished appearing.
    if f64::from(sizes.pods) / f64::from(args.rate) <= 2.0 * args.lead_ms as f64 / 1000.0 {
        bail!(
            "{} pods at {} pods/s turn over faster than twice --lead-ms ({} ms): raise --scale",
            sizes.pods,
            args.rate,
            args.lead_ms
        );
    }
    let api = FakeApiServer::start();
    let seeding = Instant::now();
    seed_cluster(&api, sizes);
    let cgroup = TestCgroup::with_prefix("dgbench").context("cgroup")?;
    let root = cgroup.path().join("kubepods.slice");
    kubelet_tree::make_root(&root)?;
    for n in 0..sizes.pods {
        announce(&api, sizes, n);
        std::fs::create_dir(pod_dir(&root, n))?;
    }
    let seed_s = seeding.elapsed().as_secs_f64();
    eprintln!("datalab: seeded {sizes:?} in {seed_s:.1} s");
    let inputs = Inputs::new(&api)?;
    // After the seeding, before anything is measured.
    let mut machine = machine::Machine::collect();
    let helper_cpu_start = cpu_seconds("self")?;

    eprintln!(
        "datalab: controller provisioning {} environments",
        sizes.environments
    );
    let (mut controller, provisioning) = provision(&api, &args, &inputs, sizes)?;
    eprintln!("datalab: {provisioning}");

    let bpffs = BpffsDir::with_prefix("dgbench")
        .context("a private bpffs directory for the agent's pins (is bpffs mountable here?)")?;
    let pins = bpffs.path().join("guard");
    eprintln!("datalab: node agent");
    let (mut agent, _metrics, started) = start_node(&args, &inputs, &root, &pins)?;
    let layout = PinLayout::new(&pins);
    let maps = GuardMaps::from_pins(&layout)?;
    let entries_at_ready = maps.verdicts()?.len();
    if entries_at_ready < sizes.pods as usize {
        bail!(
            "only {entries_at_ready} of {} pods have an entry at ready",
            sizes.pods
        );
    }
    eprintln!(
        "datalab: {started}; quiet window of {} s",
        args.steady_seconds
    );
    let quiet = steady(&api, args.steady_seconds);
    let before_churn = process_json(agent.pid())?;
    eprintln!("datalab: {quiet}; churn for {} s", args.churn_seconds);
    let churn_start = Instant::now();
    let churned = churn(&api, &args, sizes, &root, &maps)?;
    let churn_wall_s = churn_start.elapsed().as_secs_f64();
    let after_churn = process_json(agent.pid())?;
    let controller_after = process_json(controller.pid())?;
    let helper_cpu_s = cpu_seconds("self")? - helper_cpu_start;
    machine.finish();

    let doc = json!({
        "machine": machine.to_json(),
        "scale": args.scale,
        "sizes": {
            "namespaces": sizes.environments + sizes.others,
            "environments": sizes.environments,
            "tenant_policies": sizes.environments,
            "pods": sizes.pods,
        },
        "seed_s": seed_s,
        "controller": provisioning,
        "controller_at_end": controller_after,
        "node": {
            "started": started,
            "entries_at_ready": entries_at_ready,
            "before_churn": before_churn,
            "after_churn": after_churn,
        },
        "steady": quiet,
        "churn": {
            "rate_per_s": args.rate,
            "seconds": args.churn_seconds,
            "wall_s": churn_wall_s,
            "lead_ms": args.lead_ms,
            "poll_us": POLL.as_micros() as u64,
            "created": churned.created,
            "missed": churned.missed,
            "api_first_ms": percentiles(churned.api_first_ms),
            "cgroup_first_ms": percentiles(churned.cgroup_first_ms),
        },
        "helper_cpu_s": helper_cpu_s,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    agent.sigterm()?;
    let _ = agent.wait_exit(Duration::from_secs(5));
    controller.sigterm()?;
    let _ = controller.wait_exit(Duration::from_secs(5));
    drop(maps);
    let _ = datalab_guard::bpf::install::remove_all_pins(&layout);
    Ok(())
}
