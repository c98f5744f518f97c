//! `cargo xtask bench --verdict-latency`, xtask side: runs the `xtask-bench-verdict-latency`
//! helper (built by [`super::testrun::build_all`]), turns its raw samples into p50/p90/p99/max
//! per case and class, and writes `verdict-latency.md` (method and numbers) and
//! `verdict-latency.json` (every sample). What is measured, and where t0 is, is in the
//! helper's module docs and repeated in the report.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::stats::percentile;
use crate::{artifacts::Bins, util};

pub const HELPER: &str = "xtask-bench-verdict-latency";

/// Runs the helper with `pods` pods per class; returns its JSON document.
pub fn measure(bins: &Bins, pods: u32) -> Result<Value> {
    util::run_json_helper(Command::new(bins.get(HELPER)?).args(["--pods", &pods.to_string()]))
}

fn samples(v: &Value) -> Vec<f64> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect()
}

fn cell(x: Option<f64>) -> String {
    x.map_or_else(|| "–".into(), |x| format!("{x:.1}"))
}

/// One table row: case, class, N, p50, p90, p99, max (ms).
fn row(case: &str, class: &str, s: &[f64]) -> String {
    format!(
        "| {case} | {class} | {} | {} | {} | {} | {} |",
        s.len(),
        cell(percentile(s, 50.0)),
        cell(percentile(s, 90.0)),
        cell(percentile(s, 99.0)),
        cell(percentile(s, 100.0)),
    )
}

fn case_rows(out: &mut Vec<String>, name: &str, case: &Value) {
    if let Some(err) = case["error"].as_str() {
        out.push(format!("| {name} | – | 0 | failed: {err} | | | |"));
        return;
    }
    if case.is_null() {
        out.push(format!("| {name} | – | 0 | skipped | | | |"));
        return;
    }
    let system = samples(&case["system_ms"]);
    let tenant = samples(&case["tenant_ms"]);
    let all: Vec<f64> = system.iter().chain(&tenant).copied().collect();
    out.push(row(name, "system (exempt)", &system));
    out.push(row(name, "tenant (guard)", &tenant));
    out.push(row(name, "all", &all));
}

/// The report as markdown.
pub fn markdown(doc: &Value, command: &str) -> String {
    let m = &doc["machine"];
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let mut out = vec![
        "# Pod cgroup creation → verdict in the map".to_owned(),
        String::new(),
        format!("`{command}`, {}", s(&m["date"])),
        String::new(),
        format!(
            "Machine: commit {}{}, kernel {}, {} CPUs ({}), load average {} at the start, {} \
             at the end.",
            s(&m["commit"]),
            if m["dirty"] == true { " (dirty)" } else { "" },
            s(&m["kernel"]),
            m["nproc"],
            s(&m["cpu"]),
            s(&m["loadavg_start"]),
            s(&m["loadavg_end"]),
        ),
        String::new(),
        "## Method".to_owned(),
        String::new(),
        format!(
            "One real `datalab-guard node` agent per case; pods one at a time, alternating a \
             kube-system pod (exempt by config) and a tenant pod (namespace labelled \
             `datalab.io/environment`, guard); {} pods per class. The end of a sample is the \
             first read of the pinned VERDICTS map (aya, by pin path, every {} µs) that holds \
             the pod cgroup's id with the expected verdict.",
            doc["pods_per_class"], doc["poll_us"],
        ),
        String::new(),
        format!(
            "- **api** (pods known from the API): API server fixture up, `runtime.socket: none`, \
             kubelet-style cgroup tree (systemd driver). The fixture announces the pod, {} ms \
             later the bench creates the pod cgroup directory; t0 = just before the `mkdir`.",
            doc["api_lead_ms"],
        ),
        "- **runtime** (pods known only from the runtime): a private containerd through CRI \
         (the kit's CRI lab, cgroupfs driver), the agent's `runtime.socket` pointing at it, \
         the API server taken down after the agent's first sync. `RunPodSandbox` creates the \
         pod; t0 = when a polling thread first sees the pod's cgroup directory (runc creates \
         it during `RunPodSandbox`), so t0 is late by at most one poll interval."
            .to_owned(),
        String::new(),
        "Percentiles are nearest-rank over the measured samples (below 100 samples p99 is the \
         maximum). A load average above the CPU count means other work competed for the \
         CPUs during the run."
            .to_owned(),
        String::new(),
        "## Results (ms)".to_owned(),
        String::new(),
        "| case | class | N | p50 | p90 | p99 | max |".to_owned(),
        "|---|---|---:|---:|---:|---:|---:|".to_owned(),
    ];
    case_rows(&mut out, "api", &doc["api"]);
    case_rows(&mut out, "runtime", &doc["runtime"]);
    out.push(String::new());
    for case in ["api", "runtime"] {
        let c = &doc[case];
        if c.is_object() && c["error"].is_null() {
            out.push(format!(
                "{case}: {} pod(s) missed (no entry with the expected verdict within 15 s), {} \
                 whose first entry had another verdict.",
                c["missed"], c["first_entry_wrong"],
            ));
        }
    }
    let vs_return = samples(&doc["runtime"]["vs_sandbox_return_ms"]);
    if !vs_return.is_empty() {
        let before = vs_return.iter().filter(|&&x| x < 0.0).count();
        out.push(format!(
            "runtime: entry time minus `RunPodSandbox` returning (negative: in the map before \
             the kubelet could create any container of the pod): p50 {}, max {} ms; {before} \
             of {} before it returned.",
            cell(percentile(&vs_return, 50.0)),
            cell(percentile(&vs_return, 100.0)),
            vs_return.len(),
        ));
    }
    out.push(String::new());
    out.join("\n")
}

/// Writes `verdict-latency.md` and `verdict-latency.json` into `dir`.
pub fn save(dir: &Path, doc: &Value, md: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("verdict-latency.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    let path = dir.join("verdict-latency.json");
    let mut text = serde_json::to_string_pretty(doc)?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn markdown_has_a_row_per_class_and_says_what_failed() {
        let doc = json!({
            "machine": {"date": "d", "commit": "c", "dirty": false, "kernel": "k", "nproc": 2,
                        "cpu": "x", "loadavg_start": "1", "loadavg_end": "2"},
            "pods_per_class": 2, "poll_us": 200, "api_lead_ms": 100,
            "api": {"system_ms": [1.0, 3.0], "tenant_ms": [2.0, 4.0], "missed": 0,
                    "first_entry_wrong": 0},
            "runtime": {"error": "no containerd"},
        });
        let mut with_runtime = doc.clone();
        with_runtime["runtime"] = json!({"system_ms": [40.0], "tenant_ms": [42.0],
            "missed": 0, "first_entry_wrong": 0, "vs_sandbox_return_ms": [-3.0, 5.0]});
        let md2 = markdown(&with_runtime, "c");
        assert!(
            md2.contains("| runtime | all | 2 | 40.0 | 42.0 | 42.0 | 42.0 |"),
            "{md2}"
        );
        assert!(md2.contains("p50 -3.0, max 5.0 ms; 1 of 2 before"), "{md2}");
        let md = markdown(&doc, "cargo xtask bench --verdict-latency");
        assert!(
            md.contains("| api | system (exempt) | 2 | 1.0 | 3.0 | 3.0 | 3.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| api | all | 4 | 2.0 | 4.0 | 4.0 | 4.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| runtime | – | 0 | failed: no containerd |"),
            "{md}"
        );
    }
}
