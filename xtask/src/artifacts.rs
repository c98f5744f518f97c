//! Building the workspace's binaries and learning where cargo put them, from cargo's own
//! JSON artifact messages rather than by guessing `target/` paths.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};

use crate::util::{cargo_cmd, show};

/// The eBPF crate targets bpfel-unknown-none and is built by datalab-guard's build.rs; a host
/// build or test of it must be skipped.
pub const EBPF_CRATE: &str = "datalab-guard-ebpf";

/// Paths of the binaries the tests and the demo run.
#[derive(Debug, Clone)]
pub struct Bins {
    /// Every binary built, by target name.
    pub all: BTreeMap<String, PathBuf>,
}

impl Bins {
    /// The path of binary `name`, or an error saying it was not built.
    pub fn get(&self, name: &str) -> Result<&PathBuf> {
        self.all.get(name).with_context(|| {
            format!(
                "cargo built no `{name}` binary (built: {:?})",
                self.all.keys().collect::<Vec<_>>()
            )
        })
    }

    /// Environment variables that point the sandbox kit at these binaries.
    pub fn kit_env(&self) -> Vec<(&'static str, PathBuf)> {
        let mut env = Vec::new();
        for (var, name) in [
            ("DATALAB_GUARD_BIN", "datalab-guard"),
            ("DG_PROBE_BIN", "dg-probe"),
            ("DG_FAKE_IMDS_BIN", "dg-fake-imds"),
        ] {
            if let Some(p) = self.all.get(name) {
                env.push((var, p.clone()));
            }
        }
        env
    }
}

/// `cargo build --bins` (debug) of the whole workspace (`packages` empty) or of the given
/// packages; compiler diagnostics go to our stderr as usual.
pub fn build_bins(packages: &[&str]) -> Result<Bins> {
    let mut cmd = cargo_cmd();
    cmd.arg("build");
    if packages.is_empty() {
        cmd.args(["--workspace", "--exclude", EBPF_CRATE]);
    } else {
        for p in packages {
            cmd.args(["-p", p]);
        }
    }
    cmd.args(["--bins", "--message-format=json-render-diagnostics"]);
    let line = show(&cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let mut all = BTreeMap::new();
    for msg in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let msg = msg?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&msg) else {
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
