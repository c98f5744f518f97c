//! `xtask-bench-node`: the node-agent half of `cargo xtask bench` (issue: "With 10,000 pods on
//! the node in the fixture: agent RSS and time to first ready; under 100 pods per second of
//! churn: latency from a pod's cgroup creation to its map entry, p50 and p99").
//!
//! A fake node: the API server fixture holding N pods on this node (spread over environment
//! and system namespaces), a kubelet-style cgroup tree (systemd driver) with every pod's
//! directory, and the real `datalab-guard node` binary. Measures time from spawn to
//! `/readyz`, the agent's RSS (VmRSS and peak VmHWM) once ready and after the churn, then
//! churns pods at a fixed rate (API announce, then mkdir of the pod cgroup; deletion of old
//! pods alongside) and polls the pinned VERDICTS map for each new cgroup id. Prints one JSON
//! document on stdout, with the machine and commit it ran on (`machine`: commit and whether
//! the tree was dirty, kernel, CPU, load average before and after). Everything it creates
//! is removed on the way out.

#[path = "kubelet_tree.rs"]
mod kubelet_tree;
#[path = "machine.rs"]
mod machine;

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use datalab_guard::bpf::{GuardMaps, PinLayout};
use datalab_guard_tests::{
    apiserver::{FakeApiServer, PodBuilder},
    free_loopback_addr, Agent, BpffsDir, TestCgroup,
};
use serde_json::json;

use self::kubelet_tree::{cgroup_id, container_id, cpu_seconds, pod_dir, qos, rss_kib, uid};

#[derive(Debug, Parser)]
struct Args {
    /// The agent binary (release build).
    #[arg(long)]
    agent: PathBuf,
    /// Pods on the node before the agent starts.
    #[arg(long, default_value_t = 10_000)]
    pods: u32,
    /// Churn rate, pods created (and as many deleted) per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Churn duration in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
}

const NODE: &str = "bench-node";
const NAMESPACES: u32 = 100;

fn namespace(n: u32) -> String {
    // One in ten namespaces is a system namespace (exempt); the rest are environments.
    let ns = n % NAMESPACES;
    if ns.is_multiple_of(10) {
        format!("system-{ns}")
    } else {
        format!("env-{ns}")
    }
}

fn announce(api: &FakeApiServer, n: u32) {
    api.apply_pod(
        PodBuilder::new(&namespace(n), &format!("pod-{n}"))
            .uid(&uid(n))
            .node(NODE)
            .qos_class(qos(n))
            .container("main", Some(&container_id(n)))
            .build(),
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let api = FakeApiServer::start();
    for ns in 0..NAMESPACES {
        let name = namespace(ns);
        if name.starts_with("env-") {
            api.apply_namespace(&name, &[("datalab.io/environment", "true")]);
        } else {
            api.apply_namespace(&name, &[]);
        }
    }
    let cgroup = TestCgroup::with_prefix("dgbench").context("cgroup")?;
    let root = cgroup.path().join("kubepods.slice");
    kubelet_tree::make_root(&root)?;
    // After the fixture is up, before anything is measured.
    let mut machine = machine::Machine::collect();
    let setup_start = Instant::now();
    for n in 0..args.pods {
        announce(&api, n);
        std::fs::create_dir(pod_dir(&root, n))?;
    }
    let setup_s = setup_start.elapsed().as_secs_f64();

    let bpffs = BpffsDir::with_prefix("dgbench")?;
    let pins = bpffs.path().join("guard");
    let dir = std::env::temp_dir().join(format!("dgbench-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    api.write_kubeconfig(dir.join("kubeconfig"))?;
    // The CNI probe would connect to the metadata address from the agent's own network
    // namespace (the machine's here): off, nothing is ever sent there.
    // No runtime lookups and no startup taint either (no containerd, no Node object here).
    std::fs::write(
        dir.join("config.yaml"),
        "probe:\n  enabled: false\nruntime:\n  socket: none\nstartupTaint: \"\"\n",
    )?;
    let metrics = free_loopback_addr()?;
    let spawn = Instant::now();
    let mut agent = Agent::spawn_with(
        &args.agent,
        &[
            "node".to_owned(),
            "--node-name".into(),
            NODE.into(),
            "--kubeconfig".into(),
            dir.join("kubeconfig").display().to_string(),
            "--config".into(),
            dir.join("config.yaml").display().to_string(),
            "--cgroup-root".into(),
            root.display().to_string(),
            "--bpffs".into(),
            pins.display().to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            // Never the machine's /run/datalab-guard or /var/lib/datalab-guard.
            "--state-file".into(),
            dir.join("state.json").display().to_string(),
            "--state-dir".into(),
            dir.join("state-dir").display().to_string(),
        ],
        &[("DATALAB_GUARD_LOG", "warn")],
    )?;
    agent
        .wait_ready(metrics, Duration::from_secs(300))
        .context("agent ready")?;
    let ready_s = spawn.elapsed().as_secs_f64();
    let (rss_ready, hwm_ready) = rss_kib(agent.pid())?;
    let layout = PinLayout::new(&pins);
    let maps = GuardMaps::from_pins(&layout)?;
    let entries_ready = maps.verdicts()?.len();
    if entries_ready < args.pods as usize {
        bail!(
            "only {entries_ready} of {} pods have an entry at ready",
            args.pods
        );
    }

    // Churn: every 1/rate s announce a new pod, then create its cgroup; delete an old one.
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let total = args.rate * args.seconds;
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut latencies_ms: Vec<f64> = Vec::with_capacity(total as usize);
    let mut missed = 0u32;
    let churn_start = Instant::now();
    let mut next = Instant::now();
    let mut created = 0u32;
    while created < total || !pending.is_empty() {
        if created < total && Instant::now() >= next {
            let n = args.pods + created;
            announce(&api, n);
            let dir = pod_dir(&root, n);
            std::fs::create_dir(&dir)?;
            let t0 = Instant::now();
            let id = cgroup_id(&dir)?;
            pending.insert(id, t0);
            // Delete the oldest pod: API first, then its cgroup (as the kubelet does).
            let old = created;
            api.delete_pod(&namespace(old), &format!("pod-{old}"));
            let _ = std::fs::remove_dir(pod_dir(&root, old));
            created += 1;
            next += interval;
        }
        let now = Instant::now();
        pending.retain(|id, t0| {
            if maps_has(&maps, *id) {
                latencies_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                return false;
            }
            if now.duration_since(*t0) > Duration::from_secs(10) {
                missed += 1;
                return false;
            }
            true
        });
        std::thread::sleep(Duration::from_micros(200));
    }
    let churn_s = churn_start.elapsed().as_secs_f64();
    let (rss_after, hwm_after) = rss_kib(agent.pid())?;
    let cpu_after = cpu_seconds(&agent.pid().to_string())?;
    latencies_ms.sort_by(f64::total_cmp);
    machine.finish();
    let result = json!({
        "machine": machine.to_json(),
        "pods": args.pods,
        "namespaces": NAMESPACES,
        "setup_s": setup_s,
        "time_to_ready_s": ready_s,
        "policy_entries_at_ready": entries_ready,
        "rss_ready_kib": rss_ready,
        "hwm_ready_kib": hwm_ready,
        "rss_after_churn_kib": rss_after,
        "hwm_after_churn_kib": hwm_after,
        "cpu_s_after_churn": cpu_after,
        "churn_rate_per_s": args.rate,
        "churn_seconds": args.seconds,
        "churn_wall_s": churn_s,
        "churn_created": total,
        "churn_missed": missed,
        "latency_ms": {
            "p50": percentile(&latencies_ms, 50.0),
            "p90": percentile(&latencies_ms, 90.0),
            "p99": percentile(&latencies_ms, 99.0),
            "max": latencies_ms.last().copied().unwrap_or(f64::NAN),
            "samples": latencies_ms.len(),
        },
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    agent.sigterm()?;
    let _ = agent.wait_exit(Duration::from_secs(5));
    drop(maps);
    let _ = datalab_guard::bpf::install::remove_all_pins(&layout);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn maps_has(maps: &GuardMaps, id: u64) -> bool {
    maps.policy_get(id).ok().flatten().is_some()
}
