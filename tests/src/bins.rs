//! Locating the programs the kit runs: its own helpers (`dg-probe`, `dg-fake-imds`, built
//! from this crate) and the real agent (`datalab-guard`).
//!
//! Each can be given explicitly by an environment variable (`cargo xtask test` sets them from
//! the build's own artifact list). Otherwise helpers are looked up next to the running
//! executable first (an integration test runs from `target/<profile>/deps/`, xtask from
//! `target/<profile>/`, and cargo builds the package's binaries before its integration
//! tests), then in the workspace's `target/{debug,release}`, newest first.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{bail, Result};

/// Environment variable naming the agent binary.
pub const AGENT_BIN_ENV: &str = "DATALAB_GUARD_BIN";
/// Environment variable naming the probe binary.
pub const PROBE_BIN_ENV: &str = "DG_PROBE_BIN";
/// Environment variable naming the fake metadata server binary.
pub const FAKE_IMDS_BIN_ENV: &str = "DG_FAKE_IMDS_BIN";

/// The workspace root (parent of this crate's directory), as of compile time.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `target/debug` and `target/release` of the workspace (and of `$CARGO_TARGET_DIR`).
fn profile_dirs() -> Vec<PathBuf> {
    let mut targets = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        targets.push(if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        });
    }
    targets.push(workspace_root().join("target"));
    targets
        .into_iter()
        .flat_map(|t| [t.join("debug"), t.join("release")])
        .collect()
}

fn from_env(var: &str) -> Result<Option<PathBuf>> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("{var} points to {}, which does not exist", p.display());
            }
            Ok(Some(p))
        }
        _ => Ok(None),
    }
}

fn newest(candidates: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    candidates
        .into_iter()
        .filter(|p| p.is_file())
        .max_by_key(|p| {
            p.metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        })
}

fn helper(name: &str, var: &str) -> Result<PathBuf> {
    if let Some(p) = from_env(var)? {
        return Ok(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let dirs = profile_dirs();
    match newest(dirs.iter().map(|d| d.join(name))) {
        Some(p) => Ok(p),
        None => bail!(
            "cannot find the {name} helper binary (set {var}, or build it: \
             `cargo build -p datalab-guard-tests --bins`); looked next to the running \
             executable and in {dirs:?}"
        ),
    }
}

/// Path of `dg-probe`.
pub fn probe_bin() -> Result<PathBuf> {
    helper("dg-probe", PROBE_BIN_ENV)
}

/// Path of `dg-fake-imds`.
pub fn fake_imds_bin() -> Result<PathBuf> {
    helper("dg-fake-imds", FAKE_IMDS_BIN_ENV)
}

/// Path of the real `datalab-guard` binary: `$DATALAB_GUARD_BIN`, else the newest of the
/// workspace's `target/{debug,release}/datalab-guard`.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = from_env(AGENT_BIN_ENV)? {
        return Ok(p);
    }
    let dirs = profile_dirs();
    match newest(dirs.iter().map(|d| d.join("datalab-guard"))) {
        Some(p) => Ok(p),
        None => bail!(
            "cannot find the datalab-guard binary: set {AGENT_BIN_ENV} or run `cargo build \
             -p datalab-guard` (looked in {dirs:?})"
        ),
    }
}
