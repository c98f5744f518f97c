#![allow(dead_code, reason = "each test file uses its own part of this module")]

//! The manifests as shipped: `deploy/` rendered with `kubectl kustomize` at test time, so the
//! image and Prometheus tests check what a user installs, not a copy of it.
//!
//! kubectl is the pinned one `cargo xtask manifests` installs (`$KUBECTL`, which `cargo xtask
//! test` sets, else `target/manifests-venv/bin/kubectl`); a kubectl on PATH is never used.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context as _, Result};
use datalab_guard_tests::bins::workspace_root;
use serde_json::Value;

/// The pinned kubectl; panics with how to get it.
pub fn kubectl() -> PathBuf {
    let path = match std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        Some(k) => PathBuf::from(k),
        None => workspace_root().join("target/manifests-venv/bin/kubectl"),
    };
    assert!(
        path.is_file(),
        "kubectl not found at {}: run `cargo xtask manifests` (it installs the pinned kubectl) \
         or run through `cargo xtask test`",
        path.display()
    );
    path
}

/// `deploy/` (the base with its default config) plus the named components of
/// `deploy/components/` (all of them with `&["*"]`), rendered: one JSON value per object.
pub fn render(components: &[&str]) -> Result<Vec<Value>> {
    let root = workspace_root();
    let deploy = root.join("deploy");
    let mut names: Vec<String> = components.iter().map(|c| (*c).to_owned()).collect();
    if components == ["*"] {
        names = fs::read_dir(deploy.join("components"))?
            .flatten()
            .filter(|e| e.path().join("kustomization.yaml").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
    }
    // kustomize loads bases and components by relative path from a kustomization inside the
    // workspace (target/), as `cargo xtask manifests` does.
    let dir = root.join("target/shipped-render").join(format!(
        "{}-{}",
        std::process::id(),
        names.join("+")
    ));
    fs::create_dir_all(&dir)?;
    let up = "../../../";
    let mut text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {up}deploy\n"
    );
    if !names.is_empty() {
        text.push_str("components:\n");
        for n in &names {
            text.push_str(&format!("  - {up}deploy/components/{n}\n"));
        }
    }
    fs::write(dir.join("kustomization.yaml"), text)?;
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(&dir)
        .output()
        .context("running kubectl kustomize")?;
    let _ = fs::remove_dir_all(&dir);
    ensure!(
        out.status.success(),
        "kubectl kustomize deploy/ (+ {names:?}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_yaml_docs(&String::from_utf8_lossy(&out.stdout))
}

/// Every non-empty YAML document of `text` (kustomize's output: documents separated by
/// `---` lines) as JSON.
pub fn parse_yaml_docs(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in format!("\n{text}").split("\n---\n") {
        let value: Value = serde_yaml_ng::from_str(doc).context("rendered YAML")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The single object of `kind` (and `name`, if given); fails if there is not exactly one.
pub fn one<'a>(docs: &'a [Value], kind: &str, name: Option<&str>) -> Result<&'a Value> {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && name.is_none_or(|n| d["metadata"]["name"] == n))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!(
            "expected exactly one {kind} {name:?} in the rendered manifests, found {}",
            found.len()
        ),
    }
}

/// A private scratch directory removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(what: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("dg-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        ScratchDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
