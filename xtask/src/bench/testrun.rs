//! The BPF_PROG_TEST_RUN half of the benchmark, xtask side: builds the `xtask-bench-testrun`
//! helper (feature `bench-testrun`) together with the kit's binaries, runs it against a
//! private bpffs directory, and turns its raw per-round samples into medians and
//! differences against the empty program.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

use super::stats::{paired_differences, summarize, Summary};
use crate::{
    artifacts::Bins,
    util::{self, cargo_cmd, show},
};

const HELPER: &str = "xtask-bench-testrun";

/// Builds, in one cargo invocation, the binaries the sandbox kit runs (the agent, the probe,
/// the fake metadata server) and the test-run, verifier and verdict-latency helpers (feature
/// `xtask/bench-testrun`). One
/// invocation, so the agent's library is compiled once, with one feature set; the xtask
/// binary that is running is left alone.
pub fn build_all() -> Result<Bins> {
    build(
        false,
        &[
            "datalab-guard",
            "dg-probe",
            "dg-fake-imds",
            HELPER,
            super::verifier::HELPER,
            super::verdict_latency::HELPER,
            super::progstats::HELPER,
        ],
    )
}

/// Builds `bins` (of the agent, the kit and xtask with feature `bench-testrun`) in one cargo
/// invocation, `--release` if asked; returns where each landed.
pub fn build(release: bool, bins: &[&str]) -> Result<Bins> {
    let mut cmd = cargo_cmd();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    cmd.args(["-p", "datalab-guard", "-p", "xtask"]);
    // The kit's own binaries (probe, fake metadata server) live in datalab-guard-tests.
    if bins.iter().any(|b| b.starts_with("dg-")) {
        cmd.args(["-p", "datalab-guard-tests"]);
    }
    for b in bins {
        cmd.args(["--bin", b]);
    }
    cmd.args(["--features", "xtask/bench-testrun"]);
    cmd.arg("--message-format=json-render-diagnostics");
    let line = show(&cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let mut all = BTreeMap::new();
    for msg in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let msg = msg?;
        let Ok(v) = serde_json::from_str::<Value>(&msg) else {
            println!("{msg}");
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            all.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    Ok(Bins { all })
}

/// The helper's path in what [`build_all`] built.
pub fn helper(bins: &Bins) -> Result<&PathBuf> {
    bins.get(HELPER)
}

/// One case as measured by the helper, with its statistics.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub id: String,
    pub label: String,
    /// `empty`, `pass` or `block`.
    pub role: String,
    pub family: String,
    pub packet: String,
    pub expected_verdict: u64,
    /// Every round's verdict equalled the expected one.
    pub verdicts_ok: bool,
    /// Kernel-measured mean ns per run, one per round (whole ns: the kernel truncates).
    pub ns: Vec<f64>,
    pub summary: Summary,
    /// Guard cases: per-round difference to the empty program on the same family's packet.
    pub delta: Option<Summary>,
    /// Guard cases: fastest round minus the empty program's fastest round (a second,
    /// noise-resistant view: disturbances only ever add time).
    pub delta_of_minima: Option<f64>,
    /// Raw helper output for this case (counters included).
    pub raw: Value,
}

/// The whole test-run part.
#[derive(Debug, Clone)]
pub struct TestRunResults {
    pub rounds: u64,
    pub repeat: u64,
    /// The cgroup the programs judged (the helper's own).
    pub cgroup: String,
    pub cases: Vec<CaseResult>,
}

impl TestRunResults {
    pub fn case(&self, id: &str) -> Option<&CaseResult> {
        self.cases.iter().find(|c| c.id == id)
    }

    pub fn to_json(&self) -> Value {
        let cases: Vec<Value> = self
            .cases
            .iter()
            .map(|c| {
                let mut v = c.raw.clone();
                v["median_ns"] = json!(c.summary.median);
                v["mean_ns"] = json!(c.summary.mean);
                v["min_ns"] = json!(c.summary.min);
                v["max_ns"] = json!(c.summary.max);
                if let Some(d) = c.delta {
                    v["delta_vs_empty_ns"] = json!({
                        "median": d.median, "mean": d.mean, "min": d.min, "max": d.max,
                        "of_minima": c.delta_of_minima,
                    });
                }
                v
            })
            .collect();
        json!({
            "rounds": self.rounds,
            "repeat": self.repeat,
            "cgroup": self.cgroup,
            "cases": cases,
        })
    }
}

/// Runs the helper (pins under `bpffs_dir`, which must not exist yet) and analyses its output.
pub fn run(helper: &Path, bpffs_dir: &Path, rounds: u32, repeat: u32) -> Result<TestRunResults> {
    let doc = util::run_json_helper(
        Command::new(helper)
            .arg("--bpffs")
            .arg(bpffs_dir)
            .args(["--rounds", &rounds.to_string()])
            .args(["--repeat", &repeat.to_string()]),
    )?;
    analyse(&doc)
}

/// Turns the helper's JSON document into [`TestRunResults`].
pub fn analyse(doc: &Value) -> Result<TestRunResults> {
    let raw_cases = doc["cases"]
        .as_array()
        .ok_or_else(|| anyhow!("no `cases` in {doc}"))?;
    let mut cases = Vec::new();
    for c in raw_cases {
        let text = |k: &str| -> Result<String> {
            c[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("case without `{k}`: {c}"))
        };
        let ns: Vec<f64> = c["ns"]
            .as_array()
            .ok_or_else(|| anyhow!("case without `ns`: {c}"))?
            .iter()
            .map(|v| v.as_f64().ok_or_else(|| anyhow!("bad sample {v}")))
            .collect::<Result<_>>()?;
        let expected = c["expected_verdict"]
            .as_u64()
            .ok_or_else(|| anyhow!("case without `expected_verdict`: {c}"))?;
        let verdicts_ok = c["verdicts"]
            .as_array()
            .is_some_and(|v| !v.is_empty() && v.iter().all(|v| v.as_u64() == Some(expected)));
        cases.push(CaseResult {
            id: text("id")?,
            label: text("label")?,
            role: text("role")?,
            family: text("family")?,
            packet: text("packet")?,
            expected_verdict: expected,
            verdicts_ok,
            summary: summarize(&ns).ok_or_else(|| anyhow!("case without samples: {c}"))?,
            ns,
            delta: None,
            delta_of_minima: None,
            raw: c.clone(),
        });
    }
    let empties: Vec<(String, Vec<f64>)> = cases
        .iter()
        .filter(|c| c.role == "empty")
        .map(|c| (c.family.clone(), c.ns.clone()))
        .collect();
    for c in cases.iter_mut().filter(|c| c.role != "empty") {
        if let Some((_, floor)) = empties.iter().find(|(f, _)| *f == c.family) {
            c.delta = summarize(&paired_differences(&c.ns, floor));
            let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            c.delta_of_minima = Some(min(&c.ns) - min(floor));
        }
    }
    Ok(TestRunResults {
        rounds: doc["rounds"].as_u64().unwrap_or(0),
        repeat: doc["repeat"].as_u64().unwrap_or(0),
        cgroup: doc["cgroup"].as_str().unwrap_or("?").to_string(),
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_pair_rounds_within_a_family() {
        let case = |id: &str, role: &str, family: &str, ns: &[u64], verdicts: &[u64]| {
            json!({
                "id": id, "label": id, "role": role, "family": family, "packet": "p",
                "expected_verdict": 1, "verdicts": verdicts, "ns": ns,
            })
        };
        let doc = json!({
            "rounds": 3, "repeat": 10, "cgroup": "/x",
            "cases": [
                case("empty_v4", "empty", "v4", &[26, 27, 26], &[1, 1, 1]),
                case("empty_v6", "empty", "v6", &[30, 30, 30], &[1, 1, 1]),
                case("guard_pass_v4", "pass", "v4", &[27, 27, 29], &[1, 1, 1]),
                case("guard_pass_v6", "pass", "v6", &[31, 30, 30], &[1, 0, 1]),
            ],
        });
        let r = analyse(&doc).unwrap();
        let p4 = r.case("guard_pass_v4").unwrap();
        assert_eq!(p4.delta.unwrap().median, 1.0);
        assert_eq!(p4.delta.unwrap().max, 3.0);
        assert_eq!(p4.delta_of_minima, Some(1.0));
        assert!(p4.verdicts_ok);
        let p6 = r.case("guard_pass_v6").unwrap();
        assert_eq!(p6.delta.unwrap().median, 0.0);
        assert!(!p6.verdicts_ok);
        assert!(r.case("empty_v4").unwrap().delta.is_none());
    }
}
