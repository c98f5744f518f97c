//! The API calls datalab-guard's ServiceAccounts were seen to make, written where
//! `cargo xtask test` checks them against deploy/api-calls.yaml.
//!
//! Owns the file format: one JSON object per line in
//! `target/api-calls-observed/<test binary>--<test name>.jsonl`, each a distinct
//! `{identity, verb, group, resource, scope}` (scope as api-calls.yaml writes it: `cluster`
//! or `agent-namespace`) that the fixture granted during that test. Appended when a
//! [`super::FakeApiServer`] is dropped, so every test that runs an agent against the fixture
//! contributes without doing anything.

use std::{collections::BTreeSet, io::Write as _, path::PathBuf};

use serde_json::json;

use super::{rbac, RequestLog};

/// Where the observed calls go, relative to the workspace root.
pub const DIR: &str = "target/api-calls-observed";

/// Whether the request came from one of datalab-guard's ServiceAccounts.
fn by_agent(r: &RequestLog) -> bool {
    rbac::Identity::AGENTS
        .iter()
        .any(|i| r.user.as_deref() == Some(i.api_calls_name()))
}

/// The distinct granted calls of the ServiceAccounts among `requests`, as JSON lines.
pub fn lines(requests: &[RequestLog]) -> BTreeSet<String> {
    requests
        .iter()
        .filter(|r| by_agent(r) && r.status != 403)
        .filter(|r| r.grant_scope.is_some() && r.resource.is_some())
        .flat_map(|r| {
            std::iter::once(&r.verb)
                .chain(&r.also_authorized_as)
                .map(move |verb| {
                    json!({
                        "identity": r.user,
                        "verb": verb,
                        "group": r.api_group,
                        "resource": r.resource,
                        "scope": r.grant_scope,
                    })
                    .to_string()
                })
        })
        .collect()
}

/// The ServiceAccounts' requests refused with 403, one line each, naming the call.
pub fn forbidden(requests: &[RequestLog]) -> Vec<String> {
    requests
        .iter()
        .filter(|r| by_agent(r) && r.status == 403 && !r.injected_fault)
        .map(|r| {
            format!(
                "  {} {} {} group {:?} resource {:?} namespace {:?} name {:?} ({} {})",
                r.user.as_deref().unwrap_or(""),
                r.verb,
                if r.namespace.is_some() {
                    "namespaced"
                } else {
                    "cluster-wide"
                },
                r.api_group.as_deref().unwrap_or(""),
                r.resource.as_deref().unwrap_or(""),
                r.namespace.as_deref().unwrap_or(""),
                r.name.as_deref().unwrap_or(""),
                r.method,
                r.path,
            )
        })
        .collect()
}

/// This test's file: `<test binary>--<test name>.jsonl` (the harness names each test's
/// thread after the test).
fn file() -> PathBuf {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // Cargo's test binaries are `<name>-<16 hex digits>`.
    let binary = match exe.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_owned()
        }
        _ => exe,
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .replace("::", "__");
    rbac::workspace_root()
        .join(DIR)
        .join(format!("{binary}--{test}.jsonl"))
}

/// Appends the granted calls among `requests` to this test's file (nothing when there are
/// none).
pub fn append(requests: &[RequestLog]) -> std::io::Result<()> {
    let lines = lines(requests);
    if lines.is_empty() {
        return Ok(());
    }
    let path = file();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let mut text = String::new();
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    f.write_all(text.as_bytes())
}
