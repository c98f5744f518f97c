//! The throughput half of the benchmark: TCP over the lab's veth pair with iperf3, from three
//! clients in the tenant namespace, alternating round-robin:
//!
//! - `guarded`: a cgroup under the root that a running `datalab-guard local` guards;
//! - `unguarded`: a sibling cgroup outside the guard's root (the baseline);
//! - `nftables`: the unguarded cgroup again, with the same block done by an nftables output
//!   rule in the tenant namespace (added just for those runs, removed after each).
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

use super::stats::{median, summarize, Summary};

const IPERF_PORT: &str = "5201";
/// Name of the nftables table of the `nftables` configuration (in the tenant namespace).
const NFT_TABLE: &str = "dgbench_block";

/// Where a client runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Guarded,
    Unguarded,
    Nftables,
}

impl Config {
    pub const ALL: [Config; 3] = [Config::Guarded, Config::Unguarded, Config::Nftables];

    pub fn id(self) -> &'static str {
        match self {
            Config::Guarded => "guarded",
            Config::Unguarded => "unguarded",
            Config::Nftables => "nftables",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Config::Guarded => "(a) guarded cgroup, datalab-guard running",
            Config::Unguarded => "(b) unguarded sibling cgroup (baseline)",
            Config::Nftables => "(c) unguarded cgroup + nftables output drop rule",
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// One iperf3 run.
#[derive(Debug, Clone)]
pub struct Run {
    pub round: u32,
    pub config: Config,
    /// Receiver-side throughput.
    pub bits_per_second: f64,
    pub retransmits: u64,
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
                        .find(|r| r.round == round && r.config == k)
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
                "bits_per_second": r.bits_per_second,
                "retransmits": r.retransmits,
            })).collect::<Vec<_>>(),
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

/// Builds the sandbox, runs `rounds` rounds of the three clients, and tears it all down.
/// The kit's binaries (agent, probe, fake IMDS) must be built and exported already.
pub fn run(prefix: &str, rounds: u32, seconds: u32) -> Result<ThroughputResults> {
    // Declaration order matters for teardown (reverse order): processes first, then the
    // pins (detaching the programs), then cgroups, then the namespaces.
    let mut lab = Lab::with_prefix(prefix).context("building the network lab")?;
    lab.start_fake_imds()?;
    let root = TestCgroup::with_prefix(prefix)?;
    let guard_root = root.child("guard")?;
    let guarded = root.child("guard/tenant")?;
    let unguarded = root.child("unguarded")?;
    let server_cg = root.child("server")?;
    let bpffs = BpffsDir::with_prefix(prefix)?;
    let pins = bpffs.path().join("datalab-guard");
    println!(
        "network namespaces: {} (tenant), {} (metadata host)",
        lab.tenant_ns(),
        lab.imds_ns()
    );
    println!(
        "cgroups:            {}/{{guard/tenant, unguarded, server}}",
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

    let checks = check_configs(&lab, &guarded, &unguarded)?;
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
    println!("checked: IMDS refused from (a), reachable from (b), dropped by nftables in (c)");
    let drops_before = agent.metrics(metrics).ok().map(|m| egress_blocked(&m));

    let mut runs = Vec::new();
    for round in 0..rounds {
        let mut line = format!("round {}/{rounds}:", round + 1);
        // Rotated start, so no configuration always runs first (or right after another).
        for k in 0..Config::ALL.len() {
            let config = Config::ALL[(round as usize + k) % Config::ALL.len()];
            let (cgroup, _block) = match config {
                Config::Guarded => (&guarded, None),
                Config::Unguarded => (&unguarded, None),
                Config::Nftables => (&unguarded, Some(NftBlock::add(lab.tenant_ns())?)),
            };
            let (bps, retransmits) = iperf_client(cgroup, lab.tenant_ns(), seconds)
                .with_context(|| format!("iperf3 run of {config} in round {}", round + 1))?;
            line.push_str(&format!("  {config} {:.2} Gbit/s", bps / 1e9));
            runs.push(Run {
                round: round + 1,
                config,
                bits_per_second: bps,
                retransmits,
            });
        }
        println!("{line}");
    }

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
            let mine: Vec<&Run> = runs.iter().filter(|r| r.config == config).collect();
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

/// Probes both metadata endpoints from every configuration.
fn check_configs(lab: &Lab, guarded: &Path, unguarded: &Path) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for config in Config::ALL {
        let (cgroup, _block) = match config {
            Config::Guarded => (guarded, None),
            Config::Unguarded => (unguarded, None),
            Config::Nftables => (unguarded, Some(NftBlock::add(lab.tenant_ns())?)),
        };
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

/// One `iperf3 -c -J` run from `cgroup` in the tenant namespace; returns the receiver-side
/// bits per second and the sender's retransmits.
fn iperf_client(cgroup: &Path, netns: &str, seconds: u32) -> Result<(f64, u64)> {
    let argv = [
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

/// Reads what we need from `iperf3 -c -J` output.
fn parse_client_json(text: &str) -> Result<(f64, u64)> {
    let v: Value = serde_json::from_str(text).with_context(|| {
        format!(
            "iperf3 printed non-JSON: {:?}",
            text.chars().take(300).collect::<String>()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("no end.sum_received.bits_per_second in iperf3's JSON"))?;
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps, retransmits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iperf_json() {
        let ok = r#"{"start": {}, "end": {"sum_sent": {"bits_per_second": 2.1e10, "retransmits": 3},
            "sum_received": {"bits_per_second": 2.0e10}}}"#;
        assert_eq!(parse_client_json(ok).unwrap(), (2.0e10, 3));
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
