//! The throughput half of the benchmark: TCP over the lab's veth pair with iperf3, from four
//! clients in the tenant namespace, alternating round-robin:
//!
//! - `guarded`: a cgroup under the root that a running `datalab-guard local` guards;
//! - `unguarded`: a sibling cgroup outside the guard's root (the baseline);
//! - `nftables`: the unguarded cgroup again, with the same block done by an nftables output
//!   rule in the tenant namespace (added just for those runs, removed after each);
//! - `edge`: the unguarded cgroup again, with the pod-edge program `dg_edge` on the ingress
//!   of the tenant veth's host side (the metadata host's `veth-imds`), attached for those
//!   runs by a second `datalab-guard local --edge-iface` with pins of its own and removed
//!   after each by its `uninstall`: every packet of the run passes through it.
//!
//! The iperf3 server listens on 192.0.2.1 in the metadata host namespace, in a cgroup of its
//! own (outside the guard). Before measuring, each configuration is checked to do what its
//! name says: probes to 169.254.169.254 and fd00:ec2::254 are refused by the guard, pass
//! unguarded, and are dropped by nftables. Everything (namespaces, cgroups and the processes
//! in them, pins, nft table) is removed on the way out, also on failure.

use std::{
    fmt,
    io::{BufRead as _, BufReader, Read as _},
    net::IpAddr,
    path::Path,
    process::{Child, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use datalab_guard_tests::{
    command_in, free_loopback_addr,
    lab::{IMDS_V4, IMDS_V6, OTHER_V4},
    process::run_checked,
    Agent, BpffsDir, Lab, TestCgroup,
};
use serde_json::{json, Value};

use super::{
    progstats::{Cost, ProgStats, Program},
    stats::{median, summarize, Summary},
};

const IPERF_PORT: &str = "5201";
/// Name of the nftables table of the `nftables` configuration (in the tenant namespace).
const NFT_TABLE: &str = "dgbench_block";
/// The tenant veth's host side, where the `edge` configuration attaches `dg_edge`.
const EDGE_IF: &str = datalab_guard_tests::lab::IMDS_IF;

/// Where a client runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Guarded,
    Unguarded,
    Nftables,
    Edge,
}

impl Config {
    pub const ALL: [Config; 4] = [
        Config::Guarded,
        Config::Unguarded,
        Config::Nftables,
        Config::Edge,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Config::Guarded => "guarded",
            Config::Unguarded => "unguarded",
            Config::Nftables => "nftables",
            Config::Edge => "edge",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Config::Guarded => "(a) guarded cgroup, datalab-guard running",
            Config::Unguarded => "(b) unguarded sibling cgroup (baseline)",
            Config::Nftables => "(c) unguarded cgroup + nftables output drop rule",
            Config::Edge => "(d) unguarded cgroup + dg_edge on the veth's host side",
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// What one iperf3 run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// One TCP stream (bulk: large, GSO-sized packets).
    Tcp,
    /// UDP with 64-byte payloads as fast as the sender can (`-b 0`): the per-packet case.
    Udp64,
}

impl Traffic {
    pub const ALL: [Traffic; 2] = [Traffic::Tcp, Traffic::Udp64];

    pub fn id(self) -> &'static str {
        match self {
            Traffic::Tcp => "tcp",
            Traffic::Udp64 => "udp64",
        }
    }
}

/// One iperf3 run.
#[derive(Debug, Clone)]
pub struct Run {
    pub round: u32,
    pub config: Config,
    pub traffic: Traffic,
    /// Receiver-side throughput.
    pub bits_per_second: f64,
    pub retransmits: u64,
    /// UDP: packets per second the client sent, and the server received.
    pub sent_pps: Option<f64>,
    pub received_pps: Option<f64>,
    /// Kernel per-run statistics of the program that judged this run's packets: the guard
    /// for (a), the do-nothing program for (b) and (c).
    pub cost: Option<Cost>,
    /// The bench programs that ran on the same packets beside the judging one: on (b) and
    /// (c) the fast-path probes; on (a) all of them with `--probes-on-guarded`.
    pub probes: Vec<Cost>,
}

/// One configuration's runs, summarised.
#[derive(Debug, Clone)]
pub struct ConfigResult {
    pub config: Config,
    pub bps: Summary,
    pub retransmits_median: f64,
}

/// One sanity probe before the measurements.
#[derive(Debug, Clone)]
pub struct Check {
    pub config: Config,
    pub dst: IpAddr,
    pub expect_blocked: bool,
    pub outcome: String,
    pub as_expected: bool,
}

/// The whole throughput part.
#[derive(Debug, Clone)]
pub struct ThroughputResults {
    pub rounds: u32,
    pub seconds: u32,
    pub checks: Vec<Check>,
    pub runs: Vec<Run>,
    pub configs: Vec<ConfigResult>,
    /// Packets datalab-guard dropped at cgroup egress during the measurements (from its
    /// `/metrics`, after minus before): any would mean the guard dropped iperf3 traffic.
    pub egress_drops: Option<u64>,
    /// datalab-guard's `blocked_total` lines at the end (the checks' refusals are in them).
    pub agent_counters: Vec<String>,
}

impl ThroughputResults {
    pub fn config(&self, c: Config) -> Option<&ConfigResult> {
        self.configs.iter().find(|r| r.config == c)
    }

    /// Median throughput of `c` divided by the unguarded median.
    pub fn ratio(&self, c: Config) -> Option<f64> {
        let base = self.config(Config::Unguarded)?.bps.median;
        let x = self.config(c)?.bps.median;
        (base > 0.0).then(|| x / base)
    }

    /// Per-round `c / unguarded` (each pair ran back to back, so slow drift cancels).
    pub fn paired_ratios(&self, c: Config) -> Vec<f64> {
        (1..=self.rounds)
            .filter_map(|round| {
                let get = |k: Config| {
                    self.runs
                        .iter()
                        .find(|r| r.round == round && r.config == k && r.traffic == Traffic::Tcp)
                        .map(|r| r.bits_per_second)
                };
                match (get(c), get(Config::Unguarded)) {
                    (Some(x), Some(b)) if b > 0.0 => Some(x / b),
                    _ => None,
                }
            })
            .collect()
    }

    /// Half the range of the unguarded runs relative to their median: how far apart two
    /// runs of the *same* configuration land on this machine now.
    pub fn baseline_noise(&self) -> Option<f64> {
        let b = self.config(Config::Unguarded)?.bps;
        (b.median > 0.0).then(|| (b.max - b.min) / 2.0 / b.median)
    }

    /// The runs of one kind of traffic and client, in round order.
    pub fn runs_of(&self, traffic: Traffic, config: Config) -> impl Iterator<Item = &Run> {
        self.runs
            .iter()
            .filter(move |r| r.traffic == traffic && r.config == config)
    }

    /// Kernel-measured ns per run of the program that judged `config`'s `traffic`.
    pub fn costs(&self, traffic: Traffic, config: Config) -> Vec<f64> {
        self.runs_of(traffic, config)
            .filter_map(|r| r.cost.map(|c| c.ns_per_run))
            .collect()
    }

    /// Per round: the guard's ns per run on (a) minus the do-nothing program's on (b), the
    /// two runs of the same round back to back.
    pub fn cost_deltas(&self, traffic: Traffic) -> Vec<f64> {
        self.runs_of(traffic, Config::Guarded)
            .filter_map(|g| {
                let floor = self
                    .runs_of(traffic, Config::Unguarded)
                    .find(|u| u.round == g.round)?;
                Some(g.cost?.ns_per_run - floor.cost?.ns_per_run)
            })
            .collect()
    }

    /// Ns per run of a bench program beside the judging one over `config`'s `traffic` runs.
    pub fn probe_costs(&self, traffic: Traffic, config: Config, probe: Program) -> Vec<f64> {
        self.runs_of(traffic, config)
            .flat_map(|r| r.probes.iter())
            .filter(|c| c.program == probe)
            .map(|c| c.ns_per_run)
            .collect()
    }

    /// UDP packets per second the client of `config` sent.
    pub fn sent_pps(&self, config: Config) -> Vec<f64> {
        self.runs_of(Traffic::Udp64, config)
            .filter_map(|r| r.sent_pps)
            .collect()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "rounds": self.rounds,
            "seconds": self.seconds,
            "server": format!("iperf3 -s on {OTHER_V4}:{IPERF_PORT} (metadata host namespace)"),
            "checks": self.checks.iter().map(|c| json!({
                "config": c.config.id(),
                "dst": c.dst.to_string(),
                "expect": if c.expect_blocked { "blocked" } else { "reachable" },
                "outcome": c.outcome,
                "as_expected": c.as_expected,
            })).collect::<Vec<_>>(),
            "runs": self.runs.iter().map(|r| json!({
                "round": r.round,
                "config": r.config.id(),
                "traffic": r.traffic.id(),
                "bits_per_second": r.bits_per_second,
                "retransmits": r.retransmits,
                "sent_pps": r.sent_pps,
                "received_pps": r.received_pps,
                "program": r.cost.map(|c| c.program.id()),
                "ns_per_run": r.cost.map(|c| c.ns_per_run),
                "program_runs": r.cost.map(|c| c.runs),
                "probes": r.probes.iter().map(|c| json!({
                    "program": c.program.id(), "ns_per_run": c.ns_per_run, "runs": c.runs,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "cost_deltas_ns": Traffic::ALL.map(|t| json!({
                "traffic": t.id(),
                "guard_minus_floor_per_round": self.cost_deltas(t),
            })),
            "configs": self.configs.iter().map(|c| json!({
                "config": c.config.id(),
                "label": c.config.label(),
                "median_bps": c.bps.median,
                "mean_bps": c.bps.mean,
                "min_bps": c.bps.min,
                "max_bps": c.bps.max,
                "retransmits_median": c.retransmits_median,
                "ratio_vs_unguarded": self.ratio(c.config),
                "paired_ratios_vs_unguarded": self.paired_ratios(c.config),
            })).collect::<Vec<_>>(),
            "baseline_noise": self.baseline_noise(),
            "egress_drops_during_runs": self.egress_drops,
            "agent_blocked_total": self.agent_counters,
        })
    }
}

/// Builds the sandbox, runs `rounds` rounds of the four clients (TCP, then UDP with small
/// packets), and tears it all down. The kit's binaries (agent, probe, fake IMDS) must be
/// built and exported already; with `progstats` (the `xtask-bench-progstats` helper) each
/// run also records the kernel's per-run cost of the program that judged its packets.
pub fn run(
    prefix: &str,
    rounds: u32,
    seconds: u32,
    progstats: Option<&Path>,
    probes_on_guarded: bool,
) -> Result<ThroughputResults> {
    // Declaration order matters for teardown (reverse order): processes first, then the
    // pins (detaching the programs), then cgroups, then the namespaces.
    let mut lab = Lab::with_prefix(prefix).context("building the network lab")?;
    lab.start_fake_imds()?;
    let root = TestCgroup::with_prefix(prefix)?;
    let guard_root = root.child("guard")?;
    let guarded = root.child("guard/tenant")?;
    let unguarded = root.child("unguarded")?;
    let server_cg = root.child("server")?;
    let edge_cg = root.child("edge-agent")?;
    let bpffs = BpffsDir::with_prefix(prefix)?;
    let pins = bpffs.path().join("datalab-guard");
    let edge = EdgeSetup {
        netns: lab.imds_ns(),
        cgroup: &edge_cg,
        pins: bpffs.path().join("edge-agent"),
    };
    println!(
        "network namespaces: {} (tenant), {} (metadata host)",
        lab.tenant_ns(),
        lab.imds_ns()
    );
    println!(
        "cgroups:            {}/{{guard/tenant, unguarded, server, edge-agent}}",
        root.path().display()
    );

    let metrics = free_loopback_addr()?;
    let argv = vec![
        "local".to_string(),
        "--cgroup".into(),
        guard_root.display().to_string(),
        "--bpffs".into(),
        pins.display().to_string(),
        "--metrics-addr".into(),
        metrics.to_string(),
    ];
    println!("starting: datalab-guard {}", argv.join(" "));
    let mut agent = Agent::spawn(&argv)?;
    agent.wait_ready(metrics, Duration::from_secs(30))?;
    let server = IperfServer::start(&server_cg, lab.imds_ns())?;

    let checks = check_configs(&lab, &guarded, &unguarded, &edge)?;
    let bad: Vec<String> = checks
        .iter()
        .filter(|c| !c.as_expected)
        .map(|c| {
            format!(
                "{} -> {}: expected {}, got {}",
                c.config,
                c.dst,
                if c.expect_blocked {
                    "blocked"
                } else {
                    "reachable"
                },
                c.outcome
            )
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "a client configuration does not do what it claims, so its throughput would mean \
             nothing:\n  {}",
            bad.join("\n  ")
        );
    }
    println!(
        "checked: IMDS refused from (a), reachable from (b), dropped by nftables in (c) and \
         by dg_edge in (d)"
    );
    let drops_before = agent.metrics(metrics).ok().map(|m| egress_blocked(&m));

    // The floor program goes on the unguarded cgroup only now, after the checks.
    let mut stats = progstats
        .map(|helper| {
            let also = probes_on_guarded.then_some(guarded.as_path());
            // The agent's pinned maps (PinLayout: `<bpffs>/maps`), for the second instance.
            let agent_maps = pins.join("maps");
            ProgStats::start(
                helper,
                &unguarded,
                also,
                Some(&agent_maps),
                &bpffs.path().join("progstats"),
            )
        })
        .transpose()
        .context("starting the per-run statistics helper")?;
    let mut runs = Vec::new();
    for traffic in Traffic::ALL {
        runs.extend(run_rounds(
            &lab,
            (&guarded, &unguarded),
            &edge,
            traffic,
            (rounds, seconds),
            stats.as_mut(),
        )?);
    }
    drop(stats);

    // The agent must still be alive, or (a) was not guarded throughout.
    if let Some(status) = agent.try_status() {
        bail!("datalab-guard exited during the measurements ({status})");
    }
    let text_after = agent.metrics(metrics).ok();
    let egress_drops = match (drops_before, &text_after) {
        (Some(before), Some(after)) => Some(egress_blocked(after).saturating_sub(before)),
        _ => None,
    };
    let agent_counters: Vec<String> = text_after
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| l.starts_with("datalab_guard_blocked_total"))
        .map(str::to_string)
        .collect();
    drop(server);
    let _ = agent.sigterm();
    let _ = agent.wait_exit(Duration::from_secs(10));
    drop(agent);
    drop(bpffs);
    drop(root);
    drop(lab);

    let configs = Config::ALL
        .iter()
        .map(|&config| {
            let mine: Vec<&Run> = runs
                .iter()
                .filter(|r| r.config == config && r.traffic == Traffic::Tcp)
                .collect();
            let bps: Vec<f64> = mine.iter().map(|r| r.bits_per_second).collect();
            let retr: Vec<f64> = mine.iter().map(|r| r.retransmits as f64).collect();
            Ok(ConfigResult {
                config,
                bps: summarize(&bps).ok_or_else(|| anyhow!("no runs of {config}"))?,
                retransmits_median: median(&retr).unwrap_or(0.0),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ThroughputResults {
        rounds,
        seconds,
        checks,
        runs,
        configs,
        egress_drops,
        agent_counters,
    })
}

/// `rounds` rounds of the clients sending `traffic`, start rotated per round so no
/// configuration always runs first (or right after another). With `stats`, each run's packets
/// are costed by the program that judged them.
fn run_rounds(
    lab: &Lab,
    (guarded, unguarded): (&Path, &Path),
    edge: &EdgeSetup<'_>,
    traffic: Traffic,
    (rounds, seconds): (u32, u32),
    mut stats: Option<&mut ProgStats>,
) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for round in 0..rounds {
        let mut line = format!("{} round {}/{rounds}:", traffic.id(), round + 1);
        for k in 0..Config::ALL.len() {
            let config = Config::ALL[(round as usize + k) % Config::ALL.len()];
            let (cgroup, _block) = client(config, lab, (guarded, unguarded), edge)?;
            let before = stats.as_deref_mut().map(ProgStats::sample).transpose()?;
            let sample =
                iperf_client(cgroup, lab.tenant_ns(), seconds, traffic).with_context(|| {
                    format!(
                        "iperf3 {} run of {config} in round {}",
                        traffic.id(),
                        round + 1
                    )
                })?;
            let after = stats.as_deref_mut().map(ProgStats::sample).transpose()?;
            // The edge runs' packets meet the do-nothing program too (same cgroup as (b));
            // their own cost is the edge program's, the floor's is among the probes.
            let program = match config {
                Config::Guarded => Program::Guard,
                Config::Unguarded | Config::Nftables => Program::Floor,
                Config::Edge => Program::Edge,
            };
            let cost = before
                .zip(after)
                .and_then(|(b, a)| a.cost_since(&b, program));
            // Every bench program that ran on this run's packets beside the judging one.
            let probes = match before.zip(after) {
                None => Vec::new(),
                Some((b, a)) => Program::ALL
                    .iter()
                    .filter(|p| **p != Program::Guard && **p != program)
                    .filter_map(|p| a.cost_since(&b, *p))
                    .collect(),
            };
            line.push_str(&match sample.sent_pps {
                Some(pps) => format!("  {config} {:.0} kpps", pps / 1e3),
                None => format!("  {config} {:.2} Gbit/s", sample.bits_per_second / 1e9),
            });
            if let Some(c) = cost {
                line.push_str(&format!(" ({:.1} ns/run)", c.ns_per_run));
            }
            runs.push(Run {
                round: round + 1,
                config,
                traffic,
                cost,
                probes,
                ..sample
            });
        }
        println!("{line}");
    }
    Ok(runs)
}

/// Sum of `datalab_guard_blocked_total{...hook="egress"...}` in Prometheus text.
fn egress_blocked(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("datalab_guard_blocked_total{") && l.contains(r#"hook="egress""#))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// What a configuration adds around its client's runs, removed when dropped.
enum Around {
    Nothing,
    /// Held for its `Drop`.
    Nft {
        _block: NftBlock,
    },
    /// Held for its `Drop`.
    Edge {
        _agent: EdgeAgent,
    },
}

/// The client cgroup of `config` and what must be in place while it runs.
fn client<'a>(
    config: Config,
    lab: &Lab,
    (guarded, unguarded): (&'a Path, &'a Path),
    edge: &EdgeSetup<'_>,
) -> Result<(&'a Path, Around)> {
    Ok(match config {
        Config::Guarded => (guarded, Around::Nothing),
        Config::Unguarded => (unguarded, Around::Nothing),
        Config::Nftables => (
            unguarded,
            Around::Nft {
                _block: NftBlock::add(lab.tenant_ns())?,
            },
        ),
        Config::Edge => (
            unguarded,
            Around::Edge {
                _agent: EdgeAgent::start(edge)?,
            },
        ),
    })
}

/// Probes both metadata endpoints from every configuration.
fn check_configs(
    lab: &Lab,
    guarded: &Path,
    unguarded: &Path,
    edge: &EdgeSetup<'_>,
) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for config in Config::ALL {
        let (cgroup, _around) = client(config, lab, (guarded, unguarded), edge)?;
        for dst in [IpAddr::from(IMDS_V4), IpAddr::from(IMDS_V6)] {
            let r = lab.probe_timeout(cgroup, "tcp", dst, 80, 1000)?;
            let expect_blocked = config != Config::Unguarded;
            let outcome = match (r.ok, r.errno) {
                (true, _) => "reachable".to_string(),
                (false, Some(libc::EPERM)) => "blocked (EPERM)".to_string(),
                (false, Some(libc::ETIMEDOUT)) => "blocked (timed out: dropped)".to_string(),
                (false, _) => format!("failed: {}", r.error.as_deref().unwrap_or("?")),
            };
            checks.push(Check {
                config,
                dst,
                expect_blocked,
                as_expected: if expect_blocked {
                    !r.ok && (r.is_eperm() || r.is_timeout())
                } else {
                    r.ok
                },
                outcome,
            });
        }
    }
    Ok(checks)
}

/// The nftables version of the block, in the tenant namespace; the table is deleted on drop
/// (and goes with the namespace in any case).
struct NftBlock {
    netns: String,
}

impl NftBlock {
    fn add(netns: &str) -> Result<NftBlock> {
        let ruleset = format!(
            "table inet {NFT_TABLE} {{\n  chain output {{\n    type filter hook output priority filter; policy accept;\n    ip daddr {IMDS_V4} drop\n    ip6 daddr {IMDS_V6} drop\n  }}\n}}\n"
        );
        let mut cmd = command_in(None, Some(netns), &["nft", "-f", "-"])?;
        run_checked(
            &mut cmd,
            "nft -f - (IMDS drop rule in the tenant namespace)",
            Some(ruleset.as_bytes()),
        )?;
        Ok(NftBlock {
            netns: netns.to_string(),
        })
    }
}

impl Drop for NftBlock {
    fn drop(&mut self) {
        let r = command_in(
            None,
            Some(&self.netns),
            &["nft", "delete", "table", "inet", NFT_TABLE],
        )
        .and_then(|mut cmd| run_checked(&mut cmd, "nft delete table", None));
        if let Err(e) = r {
            eprintln!(
                "bench: could not delete nft table {NFT_TABLE} in {}: {e:#}",
                self.netns
            );
        }
    }
}

/// Where the `edge` configuration's agent runs: the namespace holding [`EDGE_IF`], an empty
/// cgroup for its (unused) cgroup programs, and its own pins.
struct EdgeSetup<'a> {
    netns: &'a str,
    cgroup: &'a Path,
    pins: std::path::PathBuf,
}

/// `datalab-guard local --edge-iface` with pins of its own, for one run of the `edge`
/// configuration; on drop it is stopped and `uninstall` removes the edge program (the pins
/// go with the bench's bpffs in any case, and the interface with the lab).
struct EdgeAgent {
    agent: Agent,
    netns: String,
    pins: std::path::PathBuf,
}

impl EdgeAgent {
    fn start(setup: &EdgeSetup<'_>) -> Result<EdgeAgent> {
        let metrics = free_loopback_addr()?;
        let argv = [
            "local".to_string(),
            "--cgroup".into(),
            setup.cgroup.display().to_string(),
            "--bpffs".into(),
            setup.pins.display().to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--edge-iface".into(),
            EDGE_IF.into(),
        ];
        let agent = Agent::spawn_in_netns(setup.netns, &argv, &[])?;
        let mut edge = EdgeAgent {
            agent,
            netns: setup.netns.to_string(),
            pins: setup.pins.clone(),
        };
        edge.agent
            .wait_ready_in_netns(setup.netns, metrics, Duration::from_secs(30))
            .with_context(|| format!("datalab-guard --edge-iface {EDGE_IF}"))?;
        Ok(edge)
    }
}

impl Drop for EdgeAgent {
    fn drop(&mut self) {
        let _ = self.agent.sigterm();
        let _ = self.agent.wait_exit(Duration::from_secs(10));
        let pins = self.pins.display().to_string();
        let r = Agent::bin().and_then(|bin| {
            let bin = bin.display().to_string();
            let mut cmd = command_in(
                None,
                Some(&self.netns),
                &[bin.as_str(), "uninstall", "--bpffs", &pins],
            )?;
            run_checked(&mut cmd, "datalab-guard uninstall (edge agent)", None)
        });
        if let Err(e) = r {
            eprintln!("bench: could not uninstall the edge agent's pins {pins}: {e:#}");
        }
    }
}

/// `iperf3 -s` in the metadata host namespace; killed and reaped on drop (its cgroup is
/// killed with the bench's cgroup tree in any case).
struct IperfServer {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl IperfServer {
    fn start(cgroup: &Path, netns: &str) -> Result<IperfServer> {
        let other = OTHER_V4.to_string();
        let argv = [
            "iperf3",
            "-s",
            "-B",
            &other,
            "-p",
            IPERF_PORT,
            "--forceflush",
        ];
        let mut cmd = command_in(Some(cgroup), Some(netns), &argv)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .context("starting iperf3 -s (apt-get install iperf3)")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let l1 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains("Server listening") {
                    let _ = tx.send(());
                }
                l1.lock().unwrap().push(line);
            }
        });
        let l2 = Arc::clone(&log);
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        let mut server = IperfServer { child, log };
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            // Disconnected: stdout closed, i.e. it exited; say how, with everything it said.
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut exited = server.child.try_wait().ok().flatten();
            while exited.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                exited = server.child.try_wait().ok().flatten();
            }
            if let Some(status) = exited {
                let _ = err_reader.join();
                bail!(
                    "iperf3 -s exited ({status}) before listening: {:?}",
                    server.log.lock().unwrap()
                );
            }
            bail!(
                "iperf3 -s did not say `Server listening` within 10 s: {:?}",
                server.log.lock().unwrap()
            );
        }
        Ok(server)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `iperf3 -c -J` run from `cgroup` in the tenant namespace (round and config left for
/// the caller to fill in).
fn iperf_client(cgroup: &Path, netns: &str, seconds: u32, traffic: Traffic) -> Result<Run> {
    let mut argv = vec![
        "iperf3".to_string(),
        "-c".into(),
        OTHER_V4.to_string(),
        "-p".into(),
        IPERF_PORT.into(),
        "-t".into(),
        seconds.to_string(),
        "-J".into(),
        "--connect-timeout".into(),
        "3000".into(),
    ];
    if traffic == Traffic::Udp64 {
        argv.extend(["-u", "-l", "64", "-b", "0"].map(String::from));
    }
    let mut cmd = command_in(Some(cgroup), Some(netns), &argv)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting iperf3 -c")?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(u64::from(seconds) + 20);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "iperf3 -c still running {} s after it should have ended; killed",
                20
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    parse_client_json(&stdout)
        .with_context(|| format!("iperf3 -c exited {status}; stderr: {}", stderr.trim()))
}

/// Reads what we need from `iperf3 -c -J` output (TCP or UDP).
fn parse_client_json(text: &str) -> Result<Run> {
    let v: Value = serde_json::from_str(text).with_context(|| {
        format!(
            "iperf3 printed non-JSON: {:?}",
            text.chars().take(300).collect::<String>()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let (sent, received) = (&v["end"]["sum_sent"], &v["end"]["sum_received"]);
    let bps = received["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second in iperf3's JSON"))?;
    // UDP reports packets on both sides (TCP has none): per second of each side's own clock.
    let pps = |side: &Value, counted: Option<u64>| -> Option<f64> {
        let secs = side["seconds"].as_f64().filter(|s| *s > 0.0)?;
        Some(counted? as f64 / secs)
    };
    let received_packets = received["packets"]
        .as_u64()
        .zip(received["lost_packets"].as_u64())
        .map(|(p, lost)| p.saturating_sub(lost));
    Ok(Run {
        round: 0,
        config: Config::Unguarded,
        traffic: if sent["packets"].is_u64() {
            Traffic::Udp64
        } else {
            Traffic::Tcp
        },
        bits_per_second: bps,
        retransmits: sent["retransmits"].as_u64().unwrap_or(0),
        sent_pps: pps(sent, sent["packets"].as_u64()),
        received_pps: pps(received, received_packets),
        cost: None,
        probes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf_json() {
        let ok = r#"{"start": {}, "end": {"sum_sent": {"bits_per_second": 2.1e10, "retransmits": 3},
            "sum_received": {"bits_per_second": 2.0e10}}}"#;
        let tcp = parse_client_json(ok).unwrap();
        assert_eq!((tcp.bits_per_second, tcp.retransmits), (2.0e10, 3));
        assert_eq!((tcp.traffic, tcp.sent_pps), (Traffic::Tcp, None));
        // iperf3 3.12's UDP shape: packets on both sides, the receiver's lost ones deducted.
        let udp = r#"{"end": {"sum_sent": {"seconds": 2.0, "packets": 1000000, "lost_packets": 0,
            "bits_per_second": 3.0e8}, "sum_received": {"seconds": 2.0, "packets": 1000000,
            "lost_packets": 40000, "bits_per_second": 2.9e8}}}"#;
        let udp = parse_client_json(udp).unwrap();
        assert_eq!(udp.traffic, Traffic::Udp64);
        assert_eq!(
            (udp.sent_pps, udp.received_pps),
            (Some(500_000.0), Some(480_000.0))
        );
        let err = r#"{"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}"#;
        assert!(parse_client_json(err)
            .unwrap_err()
            .to_string()
            .contains("Connection refused"));
        assert!(parse_client_json("iperf3: error").is_err());
    }

    #[test]
    fn counts_egress_drops_in_metrics() {
        let text = "# HELP datalab_guard_blocked_total x\n\
            datalab_guard_blocked_total{family=\"ipv4\",hook=\"egress\",namespace=\"\"} 6\n\
            datalab_guard_blocked_total{family=\"ipv6\",hook=\"egress\",namespace=\"\"} 1\n\
            datalab_guard_blocked_total{family=\"ipv6\",hook=\"connect\",namespace=\"\"} 2\n\
            datalab_guard_audited_total{family=\"ipv4\",hook=\"egress\",namespace=\"\"} 9\n";
        assert_eq!(egress_blocked(text), 7);
        assert_eq!(egress_blocked(""), 0);
    }

    #[test]
    fn ratios_are_against_the_unguarded_median() {
        let s = |m: f64| Summary {
            median: m,
            mean: m,
            min: m,
            max: m,
        };
        let r = ThroughputResults {
            rounds: 1,
            seconds: 1,
            checks: vec![],
            runs: vec![],
            egress_drops: None,
            agent_counters: vec![],
            configs: vec![
                ConfigResult {
                    config: Config::Guarded,
                    bps: s(99.0),
                    retransmits_median: 0.0,
                },
                ConfigResult {
                    config: Config::Unguarded,
                    bps: s(100.0),
                    retransmits_median: 0.0,
                },
                ConfigResult {
                    config: Config::Nftables,
                    bps: s(97.0),
                    retransmits_median: 0.0,
                },
            ],
        };
        assert_eq!(r.ratio(Config::Guarded), Some(0.99));
        assert_eq!(r.ratio(Config::Nftables), Some(0.97));
    }
}
