//! The benchmark's report: machine facts, the two tables, the targets, as markdown (printed
//! and saved as `latest.md`) and JSON (`latest.json`, every raw sample included).

use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

pub use super::machine::Machine;
use super::{
    cost_report::{self, REAL_TRAFFIC_BUDGET_NS},
    stats::summarize,
    testrun::TestRunResults,
    throughput::{Config, ThroughputResults},
};

/// The fast path may cost at most this much more than the empty program.
pub const FAST_PATH_BUDGET_NS: f64 = 5.0;
/// Guarded throughput must be at least this fraction of unguarded.
pub const THROUGHPUT_RATIO_MIN: f64 = 0.98;

/// A part's outcome: measured, skipped on request, or failed.
#[derive(Debug)]
pub enum Part<T> {
    Done(T),
    Skipped,
    Failed(String),
}

impl<T> Part<T> {
    fn done(&self) -> Option<&T> {
        match self {
            Part::Done(t) => Some(t),
            _ => None,
        }
    }
}

/// Everything one `cargo xtask bench` produced.
#[derive(Debug)]
pub struct Report {
    pub machine: Machine,
    pub command: String,
    pub testrun: Part<TestRunResults>,
    pub throughput: Part<ThroughputResults>,
}

/// A target's verdict.
struct Target {
    id: &'static str,
    text: String,
    measured: String,
    value: Option<f64>,
    met: Option<bool>,
    /// Why the verdict cannot be trusted, if the noise of this run is larger than the margin
    /// the target leaves.
    inconclusive: Option<String>,
}

fn signed(x: f64) -> String {
    format!("{x:+.1}")
}

fn gbit(bps: f64) -> String {
    format!("{:.2}", bps / 1e9)
}

impl Report {
    fn targets(&self) -> Vec<Target> {
        let fast = self.testrun.done().map(|t| {
            let deltas: Vec<(String, Option<f64>)> = ["guard_pass_v4", "guard_pass_v6"]
                .iter()
                .map(|id| {
                    let c = t.case(id);
                    (
                        c.map_or_else(|| id.to_string(), |c| c.family.clone()),
                        c.and_then(|c| c.delta).map(|d| d.median),
                    )
                })
                .collect();
            let worst = deltas
                .iter()
                .map(|(_, d)| *d)
                .try_fold(f64::NEG_INFINITY, |acc, d| d.map(|d| acc.max(d)));
            let measured = deltas
                .iter()
                .map(|(f, d)| format!("{f} {} ns", d.map_or("?".into(), signed)))
                .collect::<Vec<_>>()
                .join(", ");
            (measured, worst)
        });
        vec![
            Target {
                id: "fast_path_within_5ns",
                text: format!(
                    "guard fast path (passed packet) within {FAST_PATH_BUDGET_NS} ns of the empty program"
                ),
                measured: fast
                    .as_ref()
                    .map_or_else(|| "not measured".into(), |(m, _)| m.clone()),
                value: fast.as_ref().and_then(|(_, w)| *w),
                met: fast
                    .as_ref()
                    .and_then(|(_, w)| *w)
                    .map(|w| w <= FAST_PATH_BUDGET_NS),
                inconclusive: None,
            },
            self.throughput_target(
                "throughput_ratio_min_0_98",
                format!("TCP throughput guarded / unguarded ≥ {THROUGHPUT_RATIO_MIN}"),
                Config::Guarded,
            ),
            {
                let cost = self.throughput.done().map(cost_report::target);
                Target {
                    id: "real_traffic_within_5ns",
                    text: format!(
                        "guard per run under real traffic (kernel statistics) within \
                         {REAL_TRAFFIC_BUDGET_NS} ns of a do-nothing cgroup_skb program"
                    ),
                    measured: cost
                        .as_ref()
                        .map_or_else(|| "not measured".into(), |(m, _)| m.clone()),
                    value: cost.as_ref().and_then(|(_, w)| *w),
                    met: cost
                        .as_ref()
                        .and_then(|(_, w)| *w)
                        .map(|w| w <= REAL_TRAFFIC_BUDGET_NS),
                    inconclusive: None,
                }
            },
            // The edge layer's goal (#14): normal traffic within noise of no program.
            self.throughput_target(
                "edge_throughput_ratio_min_0_98",
                format!(
                    "TCP throughput through dg_edge / unguarded ≥ {THROUGHPUT_RATIO_MIN} \
                     (the same cgroup, no program at the edge)"
                ),
                Config::Edge,
            ),
        ]
    }

    /// TCP throughput of `config` against the unguarded client: met at
    /// [`THROUGHPUT_RATIO_MIN`], inconclusive when the baseline's own spread is wider.
    fn throughput_target(&self, id: &'static str, text: String, config: Config) -> Target {
        let t = self.throughput.done();
        let ratio = t.and_then(|t| t.ratio(config));
        let paired = t.and_then(|t| summarize(&t.paired_ratios(config)));
        let noise = t.and_then(|t| t.baseline_noise());
        Target {
            id,
            text,
            measured: match (ratio, paired) {
                (Some(r), Some(p)) => format!(
                    "{r:.3} (per-round ratios: median {:.3}, {:.3}–{:.3})",
                    p.median, p.min, p.max
                ),
                (Some(r), None) => format!("{r:.3}"),
                _ => "not measured".into(),
            },
            value: ratio,
            met: ratio.map(|r| r >= THROUGHPUT_RATIO_MIN),
            inconclusive: noise.filter(|n| *n > 1.0 - THROUGHPUT_RATIO_MIN).map(|n| {
                format!(
                    "runs of the same unguarded client spread ±{:.1} %, wider than the \
                     {:.0} % margin",
                    n * 100.0,
                    (1.0 - THROUGHPUT_RATIO_MIN) * 100.0
                )
            }),
        }
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        s.push_str("# datalab-guard benchmark\n\n");
        s.push_str(&format!(
            "- date: {}; commit `{}`{}\n- machine: Linux {}, {} CPUs ({}), load average {} at start, {} at end\n- tools: {}; {}\n- command: `{}`\n\n",
            m.date,
            m.commit,
            if m.dirty { " with uncommitted changes" } else { "" },
            m.kernel,
            m.nproc,
            m.cpu,
            m.loadavg_start,
            m.loadavg_end.as_deref().unwrap_or("?"),
            m.iperf3,
            m.nft,
            self.command,
        ));
        s.push_str(
            "Numbers are reported, not asserted. Compare within this run only (ratios and \
             differences); absolute numbers vary between runs and machines.\n\n",
        );

        s.push_str("## BPF_PROG_TEST_RUN: ns per packet\n\n");
        match &self.testrun {
            Part::Done(t) => Self::testrun_table(&mut s, t),
            Part::Skipped => s.push_str("Skipped (`--skip-testrun`).\n\n"),
            Part::Failed(e) => s.push_str(&format!("**Failed:** {e}\n\n")),
        }

        s.push_str("## TCP throughput over the lab's veth pair (iperf3)\n\n");
        match &self.throughput {
            Part::Done(t) => Self::throughput_table(&mut s, t),
            Part::Skipped => s.push_str("Skipped (`--skip-throughput`).\n\n"),
            Part::Failed(e) => s.push_str(&format!("**Failed:** {e}\n\n")),
        }
        if let Part::Done(t) = &self.throughput {
            s.push_str(&cost_report::markdown(t));
        }

        s.push_str("## Targets\n\n| target | measured | met |\n|---|---|---|\n");
        for t in self.targets() {
            let mut met = match t.met {
                Some(true) => "met".to_string(),
                Some(false) => "**not met**".to_string(),
                None => "n/a".to_string(),
            };
            if let Some(why) = &t.inconclusive {
                met.push_str(&format!(" — *inconclusive*: {why}"));
            }
            s.push_str(&format!("| {} | {} | {met} |\n", t.text, t.measured));
        }
        s
    }

    fn testrun_table(s: &mut String, t: &TestRunResults) {
        s.push_str(&format!(
            "{} alternating rounds × {} runs per case; per round the kernel reports the mean \
             ns per run, truncated to a whole ns. Δ = per-round difference to the empty \
             program on the same packet family (median; mean in brackets). Programs judged the \
             cgroup `{}` (guarded: default verdict, no policy entries).\n\n",
            t.rounds, t.repeat, t.cgroup
        ));
        s.push_str(
            "| case | packet | verdict | median ns | mean ns | min–max ns | Δ vs empty ns |\n",
        );
        s.push_str("|---|---|---|---:|---:|---:|---:|\n");
        for c in &t.cases {
            let verdict = match (c.expected_verdict, c.verdicts_ok) {
                (1, true) => "pass".to_string(),
                (0, true) => "drop".to_string(),
                (_, false) => format!("**unexpected** (wanted {})", c.expected_verdict),
                (v, true) => v.to_string(),
            };
            let delta = c.delta.map_or_else(
                || "—".to_string(),
                |d| format!("{} ({})", signed(d.median), signed(d.mean)),
            );
            s.push_str(&format!(
                "| {} | {} | {verdict} | {:.1} | {:.1} | {:.0}–{:.0} | {delta} |\n",
                c.label, c.packet, c.summary.median, c.summary.mean, c.summary.min, c.summary.max
            ));
        }
        s.push('\n');
        let mut notes = Vec::new();
        let minima: Vec<String> = t
            .cases
            .iter()
            .filter_map(|c| {
                c.delta_of_minima
                    .map(|d| format!("{} {}", c.label, signed(d)))
            })
            .collect();
        if !minima.is_empty() {
            notes.push(format!(
                "fastest round minus the empty program's fastest round: {} ns",
                minima.join(", ")
            ));
        }
        for c in &t.cases {
            let n = |k: &str| c.raw[k].as_u64().unwrap_or(0);
            match c.role.as_str() {
                "pass" => notes.push(format!(
                    "{}: {} of {} runs left the fast path",
                    c.label,
                    n("slow_path_passed"),
                    t.rounds * t.repeat
                )),
                "block" => notes.push(format!(
                    "{}: {} drops counted; audit events: {} lost (ring buffer full: nothing \
                     drains it under test-run), {} suppressed by the rate limit",
                    c.label,
                    n("counted"),
                    n("events_lost"),
                    n("events_suppressed")
                )),
                _ => {}
            }
        }
        for n in notes {
            s.push_str(&format!("- {n}\n"));
        }
        s.push('\n');
    }

    fn throughput_table(s: &mut String, t: &ThroughputResults) {
        s.push_str(&format!(
            "One TCP stream from the tenant namespace to `iperf3 -s` on 192.0.2.1 in the \
             metadata host namespace; {} rounds × {} s, the four clients alternating \
             (rotated start) in each round; receiver-side bits/s.\n\n",
            t.rounds, t.seconds
        ));
        s.push_str(
            "| client | median Gbit/s | min–max Gbit/s | retransmits (median) | vs (b): ratio of medians | per-round ratio: median (min–max) |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|---:|\n");
        for c in &t.configs {
            let paired = match c.config {
                Config::Unguarded => "—".to_string(),
                _ => summarize(&t.paired_ratios(c.config)).map_or("?".into(), |p| {
                    format!("{:.3} ({:.3}–{:.3})", p.median, p.min, p.max)
                }),
            };
            s.push_str(&format!(
                "| {} | {} | {}–{} | {:.0} | {} | {paired} |\n",
                c.config.label(),
                gbit(c.bps.median),
                gbit(c.bps.min),
                gbit(c.bps.max),
                c.retransmits_median,
                t.ratio(c.config).map_or("?".into(), |r| format!("{r:.3}")),
            ));
        }
        s.push('\n');
        s.push_str("Per round (Gbit/s):\n\n| round |");
        for c in Config::ALL {
            s.push_str(&format!(" {} |", c.id()));
        }
        s.push_str("\n|---:|");
        for _ in Config::ALL {
            s.push_str("---:|");
        }
        s.push('\n');
        for round in 1..=t.rounds {
            s.push_str(&format!("| {round} |"));
            for c in Config::ALL {
                let v = t
                    .runs
                    .iter()
                    .find(|r| r.round == round && r.config == c)
                    .map_or("?".into(), |r| gbit(r.bits_per_second));
                s.push_str(&format!(" {v} |"));
            }
            s.push('\n');
        }
        s.push('\n');
        let checks: Vec<String> = t
            .checks
            .iter()
            .map(|c| format!("{} → {}: {}", c.config.id(), c.dst, c.outcome))
            .collect();
        s.push_str(&format!(
            "Checked before measuring (TCP to port 80 of the fake metadata server): {}.\n\n",
            checks.join("; ")
        ));
        s.push_str(&match t.egress_drops {
            Some(0) => "datalab-guard dropped no packet at cgroup egress during the runs (its \
                        `blocked_total{hook=\"egress\"}` did not move).\n\n"
                .to_string(),
            Some(n) => format!(
                "**datalab-guard dropped {n} packets at cgroup egress during the runs** (its \
                 `blocked_total{{hook=\"egress\"}}` moved): the guarded client's traffic was \
                 not all passed.\n\n"
            ),
            None => "datalab-guard's counters could not be read.\n\n".to_string(),
        });
    }

    pub fn json(&self) -> Value {
        let part = |p: Value, state: &str, err: Option<&String>| json!({ "state": state, "error": err, "results": p });
        let testrun = match &self.testrun {
            Part::Done(t) => part(t.to_json(), "done", None),
            Part::Skipped => part(Value::Null, "skipped", None),
            Part::Failed(e) => part(Value::Null, "failed", Some(e)),
        };
        let throughput = match &self.throughput {
            Part::Done(t) => part(t.to_json(), "done", None),
            Part::Skipped => part(Value::Null, "skipped", None),
            Part::Failed(e) => part(Value::Null, "failed", Some(e)),
        };
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|t| {
                json!({
                    "id": t.id,
                    "target": t.text,
                    "measured": t.measured,
                    "value": t.value,
                    "met": t.met,
                    "conclusive": t.met.map(|_| t.inconclusive.is_none()),
                    "inconclusive_because": t.inconclusive,
                })
            })
            .collect();
        json!({
            "schema": 1,
            "machine": self.machine.to_json(),
            "command": self.command,
            "testrun": testrun,
            "throughput": throughput,
            "targets": targets,
        })
    }

    /// Writes `latest.md` and `latest.json` into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = dir.join("latest.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        let js = dir.join("latest.json");
        let mut text = serde_json::to_string_pretty(&self.json())?;
        text.push('\n');
        std::fs::write(&js, text).with_context(|| format!("writing {}", js.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{
        progstats::{Cost, Program},
        testrun::analyse,
        throughput::{ConfigResult, Run, Traffic},
    };

    fn machine() -> Machine {
        Machine {
            date: "2026-01-01T00:00:00Z".into(),
            commit: "abc1234".into(),
            dirty: false,
            kernel: "6.18".into(),
            nproc: 2,
            cpu: "cpu".into(),
            loadavg_start: "0.1 0.1 0.1".into(),
            loadavg_end: Some("0.2 0.1 0.1".into()),
            iperf3: "iperf 3.12".into(),
            nft: "nftables v1.0.6".into(),
        }
    }

    fn testrun(pass_v4: u64) -> TestRunResults {
        let case = |id: &str, role: &str, family: &str, ns: u64, expected: u64| {
            json!({
                "id": id, "label": id, "role": role, "family": family, "packet": "p",
                "expected_verdict": expected, "verdicts": [expected, expected], "ns": [ns, ns],
            })
        };
        analyse(&json!({
            "rounds": 2, "repeat": 10, "cgroup": "/",
            "cases": [
                case("empty_v4", "empty", "v4", 26, 1),
                case("empty_v6", "empty", "v6", 26, 1),
                case("guard_pass_v4", "pass", "v4", pass_v4, 1),
                case("guard_pass_v6", "pass", "v6", 27, 1),
                case("guard_block_v4", "block", "v4", 150, 0),
            ],
        }))
        .unwrap()
    }

    /// The cost a run records: the guard's on (a), the do-nothing program's elsewhere.
    fn cost(config: Config, floor_ns: f64, guard_ns: f64) -> Cost {
        match config {
            Config::Guarded => Cost {
                program: Program::Guard,
                ns_per_run: guard_ns,
                runs: 1000,
            },
            _ => Cost {
                program: Program::Floor,
                ns_per_run: floor_ns,
                runs: 1000,
            },
        }
    }

    fn throughput(unguarded: [f64; 2]) -> ThroughputResults {
        let runs: Vec<Run> = (1..=2)
            .flat_map(|round| {
                [
                    (Config::Guarded, 99.0),
                    (Config::Unguarded, unguarded[round as usize - 1]),
                    (Config::Nftables, 97.0),
                    (Config::Edge, 98.5),
                ]
                .map(|(config, bps)| Run {
                    round,
                    config,
                    traffic: Traffic::Tcp,
                    bits_per_second: bps,
                    retransmits: 0,
                    sent_pps: None,
                    received_pps: None,
                    cost: Some(cost(config, 27.0, 30.0)),
                    probes: vec![],
                })
            })
            .chain((1..=2).flat_map(|round| {
                Config::ALL.map(|config| Run {
                    round,
                    config,
                    traffic: Traffic::Udp64,
                    bits_per_second: 1e8,
                    retransmits: 0,
                    sent_pps: Some(if config == Config::Guarded { 9e5 } else { 1e6 }),
                    received_pps: Some(8e5),
                    cost: Some(cost(config, 26.0, 26.0 + f64::from(round) * 2.0)),
                    probes: vec![],
                })
            }))
            .collect();
        let configs = Config::ALL
            .iter()
            .map(|&config| {
                let bps: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.config == config && r.traffic == Traffic::Tcp)
                    .map(|r| r.bits_per_second)
                    .collect();
                ConfigResult {
                    config,
                    bps: summarize(&bps).unwrap(),
                    retransmits_median: 0.0,
                }
            })
            .collect();
        ThroughputResults {
            rounds: 2,
            seconds: 1,
            checks: vec![],
            runs,
            configs,
            egress_drops: Some(0),
            agent_counters: vec![],
        }
    }

    fn report(pass_v4: u64, unguarded: [f64; 2]) -> Report {
        Report {
            machine: machine(),
            command: "cargo xtask bench".into(),
            testrun: Part::Done(testrun(pass_v4)),
            throughput: Part::Done(throughput(unguarded)),
        }
    }

    #[test]
    fn targets_met_and_not_met() {
        let r = report(29, [100.0, 100.0]);
        let t = r.targets();
        assert_eq!((t[0].value, t[0].met), (Some(3.0), Some(true)));
        assert_eq!((t[1].value, t[1].met), (Some(0.99), Some(true)));
        assert!(t[1].inconclusive.is_none());
        // Under real traffic: TCP +3 ns per round; UDP +2 and +4 (median 3).
        assert_eq!((t[2].value, t[2].met), (Some(3.0), Some(true)));
        assert_eq!(t[3].id, "edge_throughput_ratio_min_0_98");
        assert_eq!((t[3].value, t[3].met), (Some(0.985), Some(true)));
        let md = r.markdown();
        assert!(md.contains("| tcp +3.0 ns, udp64 +3.0 ns | met |"), "{md}");
        assert!(
            md.contains("| udp64 | 29.0 (28.0–30.0) | 26.0 (26.0–26.0) |"),
            "{md}"
        );
        assert!(md.contains("| 900 (900–900) | 800 | 0.900 |"), "{md}");
        let r = report(33, [100.0, 100.0]);
        assert_eq!(r.targets()[0].met, Some(false));
        let md = r.markdown();
        assert!(
            md.contains("| v4 +7.0 ns, v6 +1.0 ns | **not met** |"),
            "{md}"
        );
    }

    #[test]
    fn noisy_baseline_makes_the_throughput_verdict_inconclusive() {
        let r = report(26, [90.0, 110.0]);
        let t = &r.targets()[1];
        assert_eq!(t.met, Some(true));
        assert!(t.inconclusive.as_deref().unwrap().contains("±10.0 %"));
        let v = r.json();
        assert_eq!(v["targets"][1]["conclusive"], json!(false));
        assert!(r.markdown().contains("*inconclusive*"));
    }

    #[test]
    fn skipped_and_failed_parts_still_render() {
        let r = Report {
            machine: machine(),
            command: "cargo xtask bench".into(),
            testrun: Part::Skipped,
            throughput: Part::Failed("iperf3: boom".into()),
        };
        let md = r.markdown();
        assert!(md.contains("Skipped (`--skip-testrun`)"));
        assert!(md.contains("**Failed:** iperf3: boom"));
        assert_eq!(r.json()["throughput"]["state"], "failed");
        assert!(r.targets().iter().all(|t| t.met.is_none()));
    }
}
