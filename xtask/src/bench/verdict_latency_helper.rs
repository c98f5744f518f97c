//! `xtask-bench-verdict-latency`: the measuring half of `cargo xtask bench --verdict-latency`
//! (issue 9: "time from a pod cgroup's creation to its verdict in the map, for pods known
//! from the API and pods known only from the runtime").
//!
//! Two cases, each against a real `datalab-guard node` agent, one pod at a time (latency,
//! not throughput), alternating a system pod (kube-system, exempt) and a tenant pod
//! (an environment namespace, guard):
//! - `api`: the kit's [`FakeNode`] (systemd-driver cgroup tree, API fixture, `runtime.socket:
//!   none`). The API fixture announces the pod, the helper waits `--api-lead-ms` (the
//!   kubelet creates a pod's cgroup after the API server has bound it), then creates the
//!   pod's cgroup; t0 is just before the `mkdir`.
//! - `runtime`: the kit's [`CriLab`] (a private containerd, cgroupfs driver under
//!   `<cgroup2>/kubepods`) as the agent's runtime, and the API server down after the first
//!   sync, so the pods are known only from the runtime. `RunPodSandbox` creates the pod;
//!   t0 is when a polling thread first sees the pod's cgroup directory (runc makes it while
//!   `RunPodSandbox` runs), polled every [`POLL`].
//!
//! The end of each sample is the first poll of the pinned VERDICTS map (read directly with
//! aya through the agent's `GuardMaps`) that finds the pod cgroup's id with the expected
//! verdict. Prints one JSON document on stdout: raw samples in ms per case and class, and
//! the machine. Everything it creates is removed on the way out (the kit's Drop impls).

#[path = "machine.rs"]
mod machine;

use std::{
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use datalab_guard::bpf::{GuardMaps, PinLayout};
use datalab_guard_common::Verdict;
use datalab_guard_tests::{
    apiserver::FakeApiServer,
    cgroup2_root,
    fake_node::{self, FakeNode, BASE_CONFIG, ENV_LABEL},
    free_loopback_addr, Agent, BpffsDir, CriLab, PodSpec,
};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
struct Args {
    /// Pods per class (system and tenant) per case.
    #[arg(long, default_value_t = 20)]
    pods: u32,
    /// Milliseconds between the API announcing a pod and its cgroup's creation (`api` case).
    #[arg(long, default_value_t = 100)]
    api_lead_ms: u64,
    /// Leave out the `runtime` case (needs containerd, runc and the CNI plugins).
    #[arg(long)]
    skip_runtime: bool,
}

/// How often the map (and, in the `runtime` case, the cgroup directory) is polled.
const POLL: Duration = Duration::from_micros(200);
/// A sample that takes longer is reported as missed.
const GIVE_UP: Duration = Duration::from_secs(15);
const TENANT_NS: &str = "tenant-a";
const SYSTEM_NS: &str = "kube-system";

/// The verdict a class of pod must get.
fn expected(system: bool) -> Verdict {
    match system {
        true => Verdict::Exempt,
        false => Verdict::Guard,
    }
}

/// Samples of one case, per class, in ms; `missed` counts pods whose entry never came.
#[derive(Default)]
struct Samples {
    system_ms: Vec<f64>,
    tenant_ms: Vec<f64>,
    missed: u32,
    /// Pods whose first entry had another verdict than the one they finally got.
    first_entry_wrong: u32,
    /// `runtime` case: entry time minus the time `RunPodSandbox` returned, in ms (negative:
    /// the entry was there before the kubelet could create any container of the pod).
    vs_sandbox_return_ms: Vec<f64>,
}

impl Samples {
    fn push(&mut self, system: bool, outcome: Option<Outcome>) {
        let Some(o) = outcome else {
            self.missed += 1;
            return;
        };
        if o.first_wrong {
            self.first_entry_wrong += 1;
        }
        let ms = o.latency.as_secs_f64() * 1000.0;
        match system {
            true => self.system_ms.push(ms),
            false => self.tenant_ms.push(ms),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "system_ms": self.system_ms,
            "tenant_ms": self.tenant_ms,
            "missed": self.missed,
            "first_entry_wrong": self.first_entry_wrong,
            "vs_sandbox_return_ms": self.vs_sandbox_return_ms,
        })
    }
}

struct Outcome {
    latency: Duration,
    /// When the expected entry was seen.
    at: Instant,
    first_wrong: bool,
}

/// Polls VERDICTS from `t0` until `id` holds `want`; `None` after [`GIVE_UP`].
fn wait_for_verdict(maps: &GuardMaps, id: u64, want: Verdict, t0: Instant) -> Option<Outcome> {
    let mut first_wrong = false;
    let mut seen = false;
    while t0.elapsed() < GIVE_UP {
        if let Ok(Some(entry)) = maps.policy_get(id) {
            if entry.verdict == want as u32 {
                let at = Instant::now();
                return Some(Outcome {
                    latency: at - t0,
                    at,
                    first_wrong,
                });
            }
            if !seen {
                first_wrong = true;
            }
            seen = true;
        }
        std::thread::sleep(POLL);
    }
    None
}

fn cgroup_id(dir: &std::path::Path) -> Result<u64> {
    Ok(std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?,
    ))
}

/// The `api` case; see the module docs.
fn api_case(args: &Args) -> Result<Samples> {
    let mut node = FakeNode::new();
    std::fs::write(
        node.config_path(),
        format!("{BASE_CONFIG}runtime:\n  socket: none\n"),
    )?;
    node.start();
    let maps = GuardMaps::from_pins(&PinLayout::new(node.pins()))?;
    let mut samples = Samples::default();
    for n in 0..args.pods * 2 {
        let system = n % 2 == 0;
        let ns = if system { SYSTEM_NS } else { TENANT_NS };
        let uid = fake_node::uid(0x00be_0000 + n);
        let container = fake_node::container_id(n);
        node.announce(
            ns,
            &format!("bench-{n}"),
            "Burstable",
            &uid,
            &container,
            false,
        );
        std::thread::sleep(Duration::from_millis(args.api_lead_ms));
        let dir = node.pod_dir("Burstable", &uid);
        let t0 = Instant::now();
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let id = cgroup_id(&dir)?;
        samples.push(system, wait_for_verdict(&maps, id, expected(system), t0));
    }
    Ok(samples)
}

/// One pod the poller watches for: its cgroup directory and the verdict it must get.
struct Job {
    dir: PathBuf,
    want: Verdict,
}

/// The poller thread of the `runtime` case: for each job, waits for the directory to
/// appear (t0), then for its map entry.
fn poller(pins: PathBuf, jobs: mpsc::Receiver<Job>, done: mpsc::Sender<Option<Outcome>>) {
    let maps = match GuardMaps::from_pins(&PinLayout::new(&pins)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("poller: {e:#}");
            return;
        }
    };
    for job in jobs {
        let started = Instant::now();
        let appeared = loop {
            if job.dir.exists() {
                break Some(Instant::now());
            }
            if started.elapsed() > GIVE_UP {
                break None;
            }
            std::thread::sleep(POLL);
        };
        let outcome = appeared.and_then(|t0| {
            let id = cgroup_id(&job.dir).ok()?;
            wait_for_verdict(&maps, id, job.want, t0)
        });
        if done.send(outcome).is_err() {
            return;
        }
    }
}

/// The agent of the `runtime` case, with the CRI lab's containerd as its runtime.
struct RuntimeNode {
    agent: Option<Agent>,
    cri: Option<CriLab>,
    bpffs: BpffsDir,
    dir: PathBuf,
    /// QoS directories this run made under `<cgroup2>/kubepods` (removed if empty).
    made: Vec<PathBuf>,
}

impl Drop for RuntimeNode {
    fn drop(&mut self) {
        // The agent first (it watches the tree), then the runtime's pods, then the rest.
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill9();
        }
        if let Some(cri) = self.cri.take() {
            if let Err(e) = cri.shutdown() {
                eprintln!("CRI lab cleanup: {e:#}");
            }
        }
        for dir in self.made.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `runtime` case; see the module docs.
fn runtime_case(args: &Args) -> Result<Samples> {
    let cri = CriLab::start()?;
    let root = cgroup2_root()?.join("kubepods");
    let mut node = RuntimeNode {
        agent: None,
        cri: Some(cri),
        bpffs: BpffsDir::with_prefix("dgbench")?,
        dir: std::env::temp_dir().join(format!("dgbench-verdict-{}", std::process::id())),
        made: Vec::new(),
    };
    for dir in [
        root.clone(),
        root.join("burstable"),
        root.join("besteffort"),
    ] {
        if !dir.exists() {
            std::fs::create_dir(&dir)?;
            node.made.push(dir);
        }
    }
    std::fs::create_dir_all(&node.dir)?;
    let api = FakeApiServer::start();
    api.apply_namespace(TENANT_NS, &[ENV_LABEL]);
    api.apply_namespace(SYSTEM_NS, &[]);
    api.write_kubeconfig(node.dir.join("kubeconfig"))?;
    let socket = node
        .cri
        .as_ref()
        .expect("lab")
        .socket()
        .display()
        .to_string();
    std::fs::write(
        node.dir.join("config.yaml"),
        format!("{BASE_CONFIG}runtime:\n  socket: {socket}\n  timeout: 1s\n"),
    )?;
    let pins = node.bpffs.path().join("guard");
    let metrics = free_loopback_addr()?;
    let path = |name: &str| node.dir.join(name).display().to_string();
    let argv = [
        "node".to_owned(),
        "--node-name".into(),
        fake_node::NODE.into(),
        "--kubeconfig".into(),
        path("kubeconfig"),
        "--config".into(),
        path("config.yaml"),
        "--cgroup-root".into(),
        root.display().to_string(),
        "--bpffs".into(),
        pins.display().to_string(),
        "--metrics-addr".into(),
        metrics.to_string(),
        "--state-file".into(),
        path("state.json"),
        "--state-dir".into(),
        path("state"),
    ];
    let agent = node.agent.insert(Agent::spawn(&argv)?);
    agent
        .wait_ready(metrics, Duration::from_secs(60))
        .context("agent ready")?;
    // From here on the pods are known only from the runtime.
    api.go_down();

    let (job_tx, job_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let poller = std::thread::spawn(move || poller(pins, job_rx, done_tx));
    let mut samples = Samples::default();
    let mut pods = Vec::new();
    let cri = node.cri.as_ref().expect("lab");
    for n in 0..args.pods * 2 {
        let system = n % 2 == 0;
        let ns = if system { SYSTEM_NS } else { TENANT_NS };
        let spec = PodSpec::new(ns, &format!("bench-{n}"));
        let dir = cgroup2_root()?.join(spec.cgroup_parent().trim_start_matches('/'));
        job_tx
            .send(Job {
                dir,
                want: expected(system),
            })
            .context("poller gone")?;
        let pod = cri.run_pod(&spec)?;
        pods.push(pod.id);
        let outcome = done_rx.recv().context("poller gone")?;
        if let Some(o) = &outcome {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            samples.vs_sandbox_return_ms.push(match o.at >= pod.ran_at {
                true => ms(o.at - pod.ran_at),
                false => -ms(pod.ran_at - o.at),
            });
        }
        samples.push(system, outcome);
    }
    drop(job_tx);
    let _ = poller.join();
    for id in pods {
        if let Err(e) = cri.remove_pod(&id) {
            eprintln!("removing sandbox {id}: {e:#}");
        }
    }
    Ok(samples)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.pods == 0 {
        bail!("--pods must be at least 1");
    }
    let mut machine = machine::Machine::collect();
    let api = api_case(&args)?;
    let runtime = match args.skip_runtime {
        true => Value::Null,
        // A runtime case that cannot run (no containerd here) still leaves the API numbers.
        false => runtime_case(&args).map_or_else(
            |e| {
                eprintln!("runtime case: {e:#}");
                json!({ "error": format!("{e:#}") })
            },
            |s| s.to_json(),
        ),
    };
    machine.finish();
    let result = json!({
        "machine": machine.to_json(),
        "pods_per_class": args.pods,
        "api_lead_ms": args.api_lead_ms,
        "poll_us": POLL.as_micros() as u64,
        "api": api.to_json(),
        "runtime": runtime,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
