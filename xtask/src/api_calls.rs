//! deploy/api-calls.yaml checked against what the tests saw the agents send.
//!
//! The API server fixture enforces the rendered manifests' RBAC and appends every call it
//! granted to datalab-guard's ServiceAccounts to `target/api-calls-observed/<test>.jsonl`
//! (tests/src/apiserver/observed.rs). After the tests, `cargo xtask test` checks both ways:
//! - every observed `(identity, verb, group, resource, scope)` is listed in api-calls.yaml
//!   for that identity (always: a filtered run checks what it ran);
//! - every listed verb of an implemented call was observed by some test, unless the call
//!   says `notExercisedBecause: <reason>` (only after a run of every agent test: a filtered
//!   run cannot know). A call that is observed but still says it is not exercised is
//!   reported too, so the reasons stay true.
//!
//! `cargo xtask api-calls` runs the same check on the files an earlier run left.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{manifests::ApiCall, util};

/// Written by the fixture (tests/src/apiserver/observed.rs `DIR`).
pub const OBSERVED_DIR: &str = "target/api-calls-observed";

/// One distinct call a test observed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Observed {
    pub identity: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    /// `cluster` or `agent-namespace`.
    pub scope: String,
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(
            f,
            "{} {} {group}/{} (scope {})",
            self.identity, self.verb, self.resource, self.scope
        )
    }
}

fn observed_dir() -> PathBuf {
    util::workspace_root().join(OBSERVED_DIR)
}

/// Removes the files of an earlier run (before the tests run).
pub fn clear() -> Result<()> {
    let dir = observed_dir();
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Every observed call, with the tests (file stems) that made it.
fn read_observed(dir: &Path) -> Result<BTreeMap<Observed, BTreeSet<String>>> {
    let mut seen: BTreeMap<Observed, BTreeSet<String>> = BTreeMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(seen),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "jsonl") {
            continue;
        }
        let test = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = fs::read_to_string(&path)?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let field = |k: &str| -> Result<String> {
                v[k].as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{}:{}: `{k}` missing", path.display(), i + 1))
            };
            let call = Observed {
                identity: field("identity")?,
                verb: field("verb")?,
                group: field("group")?,
                resource: field("resource")?,
                scope: field("scope")?,
            };
            seen.entry(call).or_default().insert(test.clone());
        }
    }
    Ok(seen)
}

fn scope_of(call: &ApiCall) -> &'static str {
    if call.agent_namespace {
        "agent-namespace"
    } else {
        "cluster"
    }
}

fn lists(call: &ApiCall, o: &Observed) -> bool {
    call.identity == o.identity
        && call.group == o.group
        && call.resource == o.resource
        && scope_of(call) == o.scope
        && call.verbs.contains(&o.verb)
}

/// The problems of `observed` against `calls`; `complete`: every agent test ran, so the
/// listed calls must all have been observed too.
pub fn problems(
    calls: &[ApiCall],
    observed: &BTreeMap<Observed, BTreeSet<String>>,
    complete: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (o, tests) in observed {
        if !calls.iter().any(|c| lists(c, o)) {
            let first: Vec<&str> = tests.iter().take(3).map(String::as_str).collect();
            problems.push(format!(
                "observed but not in deploy/api-calls.yaml: {o} (seen in {})",
                first.join(", ")
            ));
        }
    }
    if !complete {
        return problems;
    }
    for call in calls.iter().filter(|c| !c.planned) {
        for verb in &call.verbs {
            let wanted = Observed {
                identity: call.identity.clone(),
                verb: verb.clone(),
                group: call.group.clone(),
                resource: call.resource.clone(),
                scope: scope_of(call).into(),
            };
            match (observed.contains_key(&wanted), &call.not_exercised_because) {
                (false, None) => problems.push(format!(
                    "listed in deploy/api-calls.yaml but no test made the call: {wanted} \
                     (exercise it in a test, remove it, or give `notExercisedBecause:`)"
                )),
                (true, Some(why)) => problems.push(format!(
                    "deploy/api-calls.yaml says {wanted} is not exercised ({why}), but a test \
                     made it: remove `notExercisedBecause`"
                )),
                _ => {}
            }
        }
    }
    problems
}

/// Checks the observed calls against deploy/api-calls.yaml (see the module docs).
pub fn check(complete: bool) -> Result<()> {
    let calls = crate::manifests::load_api_calls()?;
    let dir = observed_dir();
    let observed = read_observed(&dir)?;
    if observed.is_empty() && complete {
        bail!(
            "no API calls were observed in {}: the agent tests did not run against the \
             fixture, or it no longer records them",
            dir.display()
        );
    }
    let problems = problems(&calls, &observed, complete);
    if !problems.is_empty() {
        bail!(
            "the API calls the tests observed do not match deploy/api-calls.yaml:\n  {}",
            problems.join("\n  ")
        );
    }
    let how = if complete {
        "both ways"
    } else {
        "observed ⊆ listed only (a filtered run cannot tell which listed calls no test makes)"
    };
    println!(
        "api-calls: {} distinct observed call(s) match deploy/api-calls.yaml ({how})",
        observed.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(identity: &str, resource: &str, verbs: &[&str], why: Option<&str>) -> ApiCall {
        ApiCall {
            identity: identity.into(),
            group: "".into(),
            resource: resource.into(),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            agent_namespace: false,
            planned: false,
            not_exercised_because: why.map(Into::into),
            resource_names: vec![],
            resource_names_from_config: None,
            component: "base".into(),
            when: vec![],
        }
    }

    fn seen(items: &[(&str, &str, &str)]) -> BTreeMap<Observed, BTreeSet<String>> {
        items
            .iter()
            .map(|(identity, verb, resource)| {
                (
                    Observed {
                        identity: identity.to_string(),
                        verb: verb.to_string(),
                        group: "".into(),
                        resource: resource.to_string(),
                        scope: "cluster".into(),
                    },
                    BTreeSet::from(["t".to_string()]),
                )
            })
            .collect()
    }

    #[test]
    fn both_directions() {
        let calls = [
            call("node-agent", "pods", &["list", "watch"], None),
            call(
                "controller",
                "nodes",
                &["list"],
                Some("dual-stack auto is not tested"),
            ),
        ];
        let ok = seen(&[
            ("node-agent", "list", "pods"),
            ("node-agent", "watch", "pods"),
        ]);
        assert!(problems(&calls, &ok, true).is_empty());
        // A call nobody listed, by identity.
        let extra = seen(&[
            ("node-agent", "list", "pods"),
            ("node-agent", "watch", "pods"),
            ("controller", "list", "pods"),
        ]);
        let p = problems(&calls, &extra, false);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("controller list core/pods"), "{p:?}");
        // A listed verb nobody made: only a complete run says so.
        let missing = seen(&[("node-agent", "list", "pods")]);
        assert!(problems(&calls, &missing, false).is_empty());
        let p = problems(&calls, &missing, true);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("node-agent watch core/pods"), "{p:?}");
        // A reason that is no longer true.
        let stale = seen(&[
            ("node-agent", "list", "pods"),
            ("node-agent", "watch", "pods"),
            ("controller", "list", "nodes"),
        ]);
        let p = problems(&calls, &stale, true);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("remove `notExercisedBecause`"), "{p:?}");
    }
}
