//! The shipped alerts and dashboard under a real Prometheus (Debian's `prometheus` 2.42 and
//! `promtool`; `cargo xtask setup` installs them).
//!
//! - [`promtool_checks_the_rules_and_every_alert_has_passing_unit_tests`]: `promtool check
//!   rules` on the rendered PrometheusRule; `promtool test rules` with
//!   `deploy/components/monitoring/tests/*.yaml`, which must test every alert both firing and
//!   not firing.
//! - [`prometheus_evaluates_every_shipped_query_against_a_running_agent`] (root): Prometheus
//!   on loopback scrapes the real agent in local mode (the kit's network lab: a guarded
//!   cgroup routed only to a fake metadata host), loads the rendered rules, and every alert
//!   `expr` and every dashboard panel query is evaluated through `/api/v1/query`: each must
//!   succeed; after blocked attempts the blocked-attempts queries return the series and values
//!   the agent's own `/metrics` says, and the blocked alert fires.
//!
//! Everything is rendered from `deploy/` at test time (`shipped/manifests.rs`).
//!
//! Run: `cargo test -p datalab-guard-tests --test prometheus -- --test-threads=1 --nocapture`

#[path = "shipped/manifests.rs"]
mod manifests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use datalab_guard_tests::{
    bins::workspace_root, free_loopback_addr, http_get, process::tool, require_root, Lab,
    LocalGuard,
};
use manifests::ScratchDir;
use serde_json::{json, Value};

/// The scrape job's name: the PodMonitor's `jobLabel` makes it the pods'
/// `app.kubernetes.io/name`, which is what the alerts' `up{job=...}` select.
const JOB: &str = "datalab-guard";
/// The `node` label the PodMonitor relabels onto every series.
const NODE: &str = "lab-node";

/// The rendered PrometheusRules' groups (every component, so every rule shipped).
fn rule_groups(docs: &[Value]) -> Vec<Value> {
    docs.iter()
        .filter(|d| d["kind"] == "PrometheusRule")
        .flat_map(|d| d["spec"]["groups"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// (alert name, expr) of every rule.
fn alerts(groups: &[Value]) -> Vec<(String, String)> {
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["alert"]
                    .as_str()
                    .or(r["record"].as_str())
                    .unwrap_or("?")
                    .to_owned(),
                r["expr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// (panel title, query) of every target of every panel (rows' nested panels too) of every
/// dashboard ConfigMap (label `grafana_dashboard`).
fn dashboard_queries(docs: &[Value]) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((title.to_owned(), expr.to_owned()));
                }
            }
            walk(p["panels"].as_array().map_or(&[], Vec::as_slice), out);
        }
    }
    let mut out = Vec::new();
    for cm in docs.iter().filter(|d| {
        d["kind"] == "ConfigMap" && !d["metadata"]["labels"]["grafana_dashboard"].is_null()
    }) {
        for text in cm["data"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.as_str())
        {
            let dash: Value = serde_json::from_str(text).expect("dashboard JSON");
            walk(
                dash["panels"].as_array().map_or(&[], Vec::as_slice),
                &mut out,
            );
        }
    }
    out
}

/// Grafana's template variables as a dashboard user with "All" selected would send them:
/// `$node` (multi-value, `allValue` `.*`) as a regex, the built-in intervals as durations.
/// Any other `$variable` is an error: the test must learn about it.
fn substitute(expr: &str) -> Result<String> {
    let mut out = expr.to_owned();
    for (var, value) in [
        ("${node}", ".*"),
        ("$node", ".*"),
        ("$__rate_interval", "30s"),
        ("$__interval", "5s"),
        ("$__range", "5m"),
    ] {
        out = out.replace(var, value);
    }
    if let Some(i) = out.find('$') {
        bail!("unknown template variable at `{}` in {expr}", &out[i..]);
    }
    Ok(out)
}

fn write_yaml(path: &Path, value: &Value) {
    fs::write(path, serde_yaml_ng::to_string(value).unwrap()).unwrap();
}

fn promtool(args: &[&Path], sub: &[&str]) -> std::process::Output {
    let bin = tool("promtool".as_ref());
    assert!(
        bin.is_absolute(),
        "promtool is missing: run `cargo xtask setup` as root (it installs Debian's prometheus)"
    );
    Command::new(bin)
        .args(sub)
        .args(args)
        .output()
        .expect("running promtool")
}

#[test]
fn promtool_checks_the_rules_and_every_alert_has_passing_unit_tests() {
    let docs = manifests::render(&["*"]).expect("rendering deploy/");
    let groups = rule_groups(&docs);
    let names: Vec<String> = alerts(&groups).into_iter().map(|(n, _)| n).collect();
    assert!(!names.is_empty(), "no PrometheusRule rules rendered");
    let dir = ScratchDir::new("promtool");

    let full = dir.path().join("full-rules.yaml");
    write_yaml(&full, &json!({ "groups": groups }));
    let out = promtool(&[&full], &["check", "rules"]);
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}");
    assert!(out.status.success(), "promtool check rules:\n{report}");
    assert!(
        report.contains(&format!("SUCCESS: {} rules found", names.len())),
        "{report}"
    );

    // The unit tests' rule file: each alert with its summary only (see the tests' header).
    let mut trimmed = groups;
    for rule in trimmed
        .iter_mut()
        .flat_map(|g| g["rules"].as_array_mut().into_iter().flatten())
    {
        let summary = rule["annotations"]["summary"].clone();
        rule["annotations"] = json!({ "summary": summary });
    }
    write_yaml(
        &dir.path().join("rules.yaml"),
        &json!({ "groups": trimmed }),
    );
    let tests_dir = workspace_root().join("deploy/components/monitoring/tests");
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    let mut files = Vec::new();
    for entry in fs::read_dir(&tests_dir).expect("deploy/components/monitoring/tests") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let copy = dir.path().join(path.file_name().unwrap());
            fs::copy(&path, &copy).unwrap();
            let spec: Value = serde_yaml_ng::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            for case in spec["tests"].as_array().into_iter().flatten() {
                for t in case["alert_rule_test"].as_array().into_iter().flatten() {
                    let name = t["alertname"].as_str().unwrap_or_default().to_owned();
                    match t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                        true => fires.insert(name),
                        false => silent.insert(name),
                    };
                }
            }
            files.push(copy);
        }
    }
    assert!(
        !files.is_empty(),
        "no promtool tests in {}",
        tests_dir.display()
    );
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let out = promtool(&refs, &["test", "rules"]);
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}");
    assert!(out.status.success(), "promtool test rules:\n{report}");
    for name in &names {
        assert!(
            fires.contains(name) && silent.contains(name),
            "alert {name} needs a promtool test where it fires and one where it does not \
             (in {})",
            tests_dir.display()
        );
    }
}

/// `prometheus` on loopback with its own config and storage; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: ScratchDir,
}

impl Prometheus {
    fn start(target: SocketAddr, groups: &[Value]) -> Result<Prometheus> {
        let dir = ScratchDir::new("prometheus");
        write_yaml(&dir.path().join("rules.yaml"), &json!({ "groups": groups }));
        // What the PodMonitor generates, minus Kubernetes discovery: the job name, honored
        // labels, the node label; a short interval so the test needs seconds, not minutes.
        let config = json!({
            "global": { "scrape_interval": "1s", "evaluation_interval": "1s" },
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{
                "job_name": JOB,
                "honor_labels": true,
                "metrics_path": "/metrics",
                "static_configs": [{ "targets": [target.to_string()], "labels": { "node": NODE } }],
            }],
        });
        write_yaml(&dir.path().join("prometheus.yml"), &config);
        let addr = free_loopback_addr()?;
        let bin = tool("prometheus".as_ref());
        if !bin.is_absolute() {
            bail!("prometheus is missing: run `cargo xtask setup` as root (Debian's prometheus)");
        }
        let log = fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        p.wait(Duration::from_secs(30), "ready", |p| {
            Ok(http_get(p.addr, "/-/ready", Duration::from_secs(2))?.status == 200)
        })?;
        Ok(p)
    }

    fn log(&self) -> String {
        fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn wait(
        &self,
        timeout: Duration,
        what: &str,
        mut ok: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match ok(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "prometheus: {what}: not within {timeout:?} ({last}); log:\n{}",
            self.log()
        )
    }

    /// GET `/api/v1/<path>`; the `data` of a `success` answer, else an error with Prometheus's.
    fn api(&self, path: &str) -> Result<Value> {
        let resp = http_get(
            self.addr,
            &format!("/api/v1/{path}"),
            Duration::from_secs(10),
        )?;
        let body: Value = serde_json::from_str(&resp.body)
            .with_context(|| format!("/api/v1/{path}: not JSON: {}", resp.body))?;
        if body["status"] != "success" {
            bail!(
                "/api/v1/{path}: {} {}: {}",
                resp.status,
                body["errorType"],
                body["error"]
            );
        }
        Ok(body["data"].clone())
    }

    /// An instant query: its result vector (or scalar) as JSON.
    fn query(&self, expr: &str) -> Result<Value> {
        Ok(self.api(&format!("query?query={}", urlencode(expr)))?["result"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The agent's `datalab_guard_blocked_total` samples: labels -> value.
fn blocked_samples(exposition: &str) -> BTreeMap<BTreeMap<String, String>, f64> {
    let mut out = BTreeMap::new();
    for line in exposition
        .lines()
        .filter(|l| l.starts_with("datalab_guard_blocked_total{"))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let inner = &series[series.find('{').unwrap() + 1..series.len() - 1];
        let labels = inner
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            // Prometheus stores an empty label value as no label (local mode's namespace).
            .filter(|(_, v)| !v.is_empty())
            .collect();
        out.insert(labels, value.parse().unwrap());
    }
    out
}

/// The label set `keep` of each series of a query result, with its value.
fn by_labels(result: &Value, keep: &[&str]) -> BTreeMap<Vec<String>, f64> {
    result
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let key = keep
                .iter()
                .map(|k| s["metric"][*k].as_str().unwrap_or("").to_owned())
                .collect();
            (
                key,
                s["value"][1]
                    .as_str()
                    .unwrap_or("nan")
                    .parse()
                    .unwrap_or(f64::NAN),
            )
        })
        .collect()
}

/// One guarded cgroup (and an exempt one) of a local-mode agent in the kit's network lab,
/// as `cargo xtask demo` and tests/tests/local_mode.rs set it up. Drops in field order.
struct LocalAgent {
    guard: LocalGuard,
    lab: Lab,
}

impl LocalAgent {
    fn start() -> LocalAgent {
        let mut lab = Lab::new().expect("lab");
        lab.start_fake_imds().expect("fake imds");
        let guard = LocalGuard::start(&[]).expect("local agent");
        LocalAgent { guard, lab }
    }

    /// One blocked attempt per hook: a TCP connect and a UDP sendto to the metadata address.
    fn attempt(&self) {
        for kind in ["tcp", "udp-sendto"] {
            let r = self
                .lab
                .probe_timeout(&self.guard.guarded, kind, "169.254.169.254", 80, 1000)
                .expect("probe");
            assert!(
                r.is_eperm(),
                "{kind} from the guarded cgroup must be refused: {}",
                r.raw
            );
        }
    }
}

#[test]
fn prometheus_evaluates_every_shipped_query_against_a_running_agent() {
    if !require_root() {
        return;
    }
    let docs = manifests::render(&["*"]).expect("rendering deploy/");
    let groups = rule_groups(&docs);
    let alert_exprs = alerts(&groups);
    let panels = dashboard_queries(&docs);
    assert!(!alert_exprs.is_empty() && !panels.is_empty());

    let local = LocalAgent::start();
    let prom = Prometheus::start(local.guard.metrics, &groups).expect("prometheus");
    // Counters first seen at a value do not count as an increase: one round of attempts,
    // scraped, then a second round, whose increase every query must see.
    local.attempt();
    let scraped = |want: f64| {
        move |p: &Prometheus| -> Result<bool> {
            let r = p.query("sum(datalab_guard_blocked_total)")?;
            Ok(r[0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                == Some(want))
        }
    };
    let total = |m: &str| blocked_samples(m).values().sum::<f64>();
    let first = total(&local.guard.agent.metrics(local.guard.metrics).unwrap());
    prom.wait(
        Duration::from_secs(20),
        "first round scraped",
        scraped(first),
    )
    .unwrap();
    local.attempt();
    let exposition = local.guard.agent.metrics(local.guard.metrics).unwrap();
    let samples = blocked_samples(&exposition);
    prom.wait(
        Duration::from_secs(20),
        "second round scraped",
        scraped(total(&exposition)),
    )
    .unwrap();
    assert_eq!(
        local.lab.imds_packets(),
        0,
        "nothing reached the metadata host"
    );

    // Every alert expression and every panel query parses and evaluates.
    let mut failures = Vec::new();
    let mut results = BTreeMap::new();
    for (what, expr) in alert_exprs
        .iter()
        .map(|(n, e)| (format!("alert {n}"), e))
        .chain(panels.iter().map(|(t, e)| (format!("panel {t:?}"), e)))
    {
        match substitute(expr).and_then(|q| prom.query(&q)) {
            Ok(r) => {
                eprintln!("ok    {what}: {} series", r.as_array().map_or(1, Vec::len));
                results.insert(expr.clone(), r);
            }
            Err(e) => failures.push(format!("{what}: {expr}: {e:#}")),
        }
    }
    // The dashboard's `node` variable: label_values(datalab_guard_build_info, node).
    let nodes = prom
        .api(&format!(
            "label/node/values?match[]={}",
            urlencode("datalab_guard_build_info")
        ))
        .unwrap();
    assert_eq!(nodes, json!([NODE]), "the dashboard's node variable");
    assert!(
        failures.is_empty(),
        "queries failed:\n{}",
        failures.join("\n")
    );

    // Raw counters: exactly what the agent exports, with the scrape's job and node labels.
    let raw = prom.query("datalab_guard_blocked_total").unwrap();
    assert_eq!(raw.as_array().unwrap().len(), samples.len(), "{raw}");
    for s in raw.as_array().unwrap() {
        assert_eq!(
            (s["metric"]["job"].as_str(), s["metric"]["node"].as_str()),
            (Some(JOB), Some(NODE))
        );
        let labels: BTreeMap<String, String> = s["metric"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "__name__" | "job" | "node" | "instance"))
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let value: f64 = s["value"][1].as_str().unwrap().parse().unwrap();
        assert_eq!(
            samples.get(&labels),
            Some(&value),
            "{labels:?} in {samples:?}"
        );
    }
    // The blocked-attempts queries see the second round: per (namespace, hook) and per
    // (hook, family), exactly the agent's series, each with a positive value.
    let expect = |keys: &[&str]| -> BTreeSet<Vec<String>> {
        samples
            .keys()
            .map(|l| {
                keys.iter()
                    .map(|k| l.get(*k).cloned().unwrap_or_default())
                    .collect()
            })
            .collect()
    };
    for (expr, keys) in [
        ("sum by (namespace, hook) (increase(datalab_guard_blocked_total[5m])) > 0", &["namespace", "hook"][..]),
        ("sum by (hook, family) (rate(datalab_guard_blocked_total{node=~\"$node\"}[$__rate_interval]))", &["hook", "family"][..]),
        ("sum by (namespace) (rate(datalab_guard_blocked_total{node=~\"$node\"}[$__rate_interval]))", &["namespace"][..]),
    ] {
        let Some(result) = results.get(expr) else {
            panic!("the shipped alerts/dashboard no longer have the query `{expr}`: update this test");
        };
        let got = by_labels(result, keys);
        assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), expect(keys), "{expr}: {result}");
        assert!(got.values().all(|v| *v > 0.0), "{expr}: {result}");
    }
    assert!(
        expect(&["hook"]).len() == 2,
        "both hooks counted: {samples:?}"
    );

    // Prometheus itself evaluated the loaded rules without error, and the blocked alert fires.
    prom.wait(
        Duration::from_secs(20),
        "rules evaluated, blocked alert firing",
        |p| {
            let rules = p.api("rules")?;
            let all: Vec<Value> = rules["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            if let Some(bad) = all.iter().find(|r| r["health"] == "err") {
                bail!("rule {} failed: {}", bad["name"], bad["lastError"]);
            }
            let firing = all.iter().any(|r| {
                r["name"] == "DatalabGuardMetadataAccessBlocked"
                    && r["alerts"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|a| a["state"] == "firing"))
            });
            Ok(all.len() == alert_exprs.len() && all.iter().all(|r| r["health"] == "ok") && firing)
        },
    )
    .unwrap();
    let up = prom.query(&format!("up{{job=\"{JOB}\"}}")).unwrap();
    assert_eq!(up[0]["value"][1], "1", "{up}");
}
