//! Small helpers for running commands from xtask: every command is echoed before it runs,
//! and a failing command is an error naming it.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cargo that launched us (`cargo xtask` sets `$CARGO`), else `cargo` from PATH.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// A cargo command run from the workspace root.
pub fn cargo_cmd() -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(workspace_root());
    cmd
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The command line, for display.
pub fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Echoes and runs `cmd` with inherited stdio; fails if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = show(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    Ok(())
}

/// Runs `cmd` silently and returns its output (a non-zero exit is not an error here).
pub fn output(cmd: &mut Command) -> Result<Output> {
    let line = show(cmd);
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{line}`"))
}

/// True if `cargo <name>` is an installed subcommand (`cargo-<name>` answers `--version`).
pub fn have_cargo_subcommand(name: &str) -> bool {
    cargo_cmd()
        .args([name, "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Echoes and runs a bench helper whose stdout is one JSON document (its stderr passes
/// through); fails if it does not exit 0 or prints anything else.
pub fn run_json_helper(cmd: &mut Command) -> Result<serde_json::Value> {
    let line = show(cmd);
    println!("$ {line}");
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed: {}", out.status);
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`{line}` printed something other than its JSON document"))
}
