//! `cargo xtask test`: the one command that runs every test, as CI does.
//!
//! Runs `setup`, insists on root (the privileged tests build network namespaces, cgroups and
//! BPF programs; they must run, not skip), builds the binaries, then runs the workspace's
//! tests with `DATALAB_GUARD_BIN` (and the kit's helper paths) pointing at what was just
//! built, and the common crate's own tests. Test output is streamed through and scanned: a
//! line containing `SKIPPED:` fails the run, so a privileged test can never pass by quietly
//! doing nothing. Tests run with `--nocapture` for that reason (a skip notice printed by a
//! passing test would otherwise be swallowed) and with two threads, which the lab handles.
//! `cargo xtask manifests` runs first (it needs no root). A full run (no `-p`, no test
//! arguments: what `./x test` and CI do) also runs the lint gate (`cargo xtask lint`) before
//! the privileged tests (cargo-deny's checks at the end, its build, where needed, in the
//! background meanwhile) and, once the binaries are built, `cargo xtask verifier --check`
//! (each program's verified instruction count against `bench-results/verifier.md`); a
//! filtered run skips both, so iterating on one test stays quick. After the tests, the API
//! calls the fixture saw the agents make are checked against deploy/api-calls.yaml
//! (`api_calls.rs`; both ways only when every agent test ran).
//!
//! A full run ends with the VM step (`cargo xtask vm`): the tests that need Debian 12's 6.1
//! kernel (its BPF LSM, a kernel without tcx for the edge layer, the verifier's limits on
//! every program), run in a QEMU VM. Every run, full or filtered, fails unless each
//! test that has a BPF LSM branch ran that branch somewhere, on the host or in the VM
//! (`vm_markers`); a full run requires it of every such test.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    artifacts::{self, EBPF_CRATE},
    setup,
    util::{self, cargo_cmd, show},
    vm,
    vm_markers::{self, LsmMarkers},
};

/// Options of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Test only these packages (default: the whole workspace, then the common crate again).
    #[arg(short, long = "package")]
    pub packages: Vec<String>,
    /// Only these integration-test files (`cargo test --test FILE`), so that a filtered run
    /// builds only their binaries; the image is then built only for image_runtime.
    #[arg(long = "test", value_name = "FILE")]
    pub tests: Vec<String>,
    /// Arguments for the test binaries, after `--` (e.g. a test name filter).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

/// The marker a test prints when it skips; any occurrence, in any case, fails the run.
pub const SKIP_MARKER: &str = "SKIPPED:";

/// Does this output line report a skip? Case-insensitive: a test that prints `skipped:` or
/// `Skipped:` has skipped all the same.
pub fn is_skip_line(text: &str) -> bool {
    text.to_ascii_uppercase().contains(SKIP_MARKER)
}

/// Runs `cargo xtask test`.
pub fn run(args: &TestArgs) -> Result<()> {
    setup::run_all()?;
    // Not privileged and quick: the manifests under deploy/ (schemas, RBAC, security).
    crate::manifests::run_all()?;
    let full_run = args.packages.is_empty() && args.test_args.is_empty() && args.tests.is_empty();
    // cargo-deny's checks last (see lint::run_all_deferring_deny).
    let deny = if full_run {
        Some(crate::lint::run_all_deferring_deny()?)
    } else {
        None
    };
    require_root("cargo xtask test");
    let stale = datalab_guard_tests::cleanup_stale(datalab_guard_tests::DEFAULT_PREFIX)?;
    if stale > 0 {
        println!("test: removed {stale} leftover(s) of earlier crashed test runs");
    }
    let bins = artifacts::build_bins(&[])?;
    let agent = bins.get("datalab-guard")?;
    if full_run {
        crate::bench::verifier::check()?;
    }
    // The image tests/tests/image_runtime.rs runs under containerd (with this debug build).
    if args.tests.is_empty() || args.tests.iter().any(|t| t == "image_runtime") {
        crate::image::build_for_tests(agent)?;
    }

    let mut runs: Vec<Vec<String>> = Vec::new();
    let only_files: Vec<String> = args
        .tests
        .iter()
        .flat_map(|t| ["--test".to_string(), t.clone()])
        .collect();
    if !only_files.is_empty() {
        let mut selection: Vec<String> = if args.packages.is_empty() {
            vec!["--workspace".into(), "--exclude".into(), EBPF_CRATE.into()]
        } else {
            args.packages
                .iter()
                .flat_map(|p| ["-p".to_string(), p.clone()])
                .collect()
        };
        selection.extend(only_files);
        runs.push(selection);
    } else if args.packages.is_empty() {
        runs.push(vec![
            "--workspace".into(),
            "--exclude".into(),
            EBPF_CRATE.into(),
        ]);
        runs.push(vec!["-p".into(), "datalab-guard-common".into()]);
    } else {
        runs.push(
            args.packages
                .iter()
                .flat_map(|p| ["-p".to_string(), p.clone()])
                .collect(),
        );
    }
    // The fixture appends the calls it grants the agents' ServiceAccounts (api_calls.rs).
    crate::api_calls::clear()?;
    // Every agent test runs: the listed calls must all have been observed too.
    let all_agent_tests = args.test_args.is_empty()
        && args.tests.is_empty()
        && (args.packages.is_empty() || args.packages.iter().any(|p| p == "datalab-guard-tests"));
    let mut seen = Scanned::default();
    for selection in runs {
        let mut cmd = cargo_cmd();
        // --no-fail-fast: one failing test binary must not hide the results of the others.
        cmd.args(["test", "--no-fail-fast"]).args(&selection);
        cmd.args(["--", "--test-threads=2", "--nocapture"])
            .args(&args.test_args);
        for (var, path) in bins.kit_env() {
            cmd.env(var, path);
        }
        // The pinned kubectl from the manifests step, never whatever is on PATH.
        cmd.env("KUBECTL", crate::manifests::kubectl());
        // Never let a developer's opt-in skip leak into the real run.
        cmd.env_remove(datalab_guard_tests::ALLOW_SKIP_ENV);
        seen.merge(run_scanning(&mut cmd)?);
    }
    if !seen.skipped.is_empty() {
        bail!(
            "{} test(s) printed `{SKIP_MARKER}`; every test must run here:\n{}",
            seen.skipped.len(),
            seen.skipped.join("\n")
        );
    }
    crate::api_calls::check(all_agent_tests)?;
    if full_run {
        let report = vm::run_steps(&bins, &vm::Step::ALL, VM_TIMEOUT)?;
        seen.lsm.merge(&report.lsm);
    }
    vm_markers::require_lsm_branches(&seen.lsm, full_run)?;
    if let Some(deny) = deny {
        deny.finish()?;
    }
    println!("cargo xtask test: all tests passed, none skipped");
    Ok(())
}

/// How long a full run gives the VM step (it takes about four minutes on an idle machine).
const VM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1200);

/// What the output of the test runs showed: skip notices and BPF LSM branch markers.
#[derive(Debug, Default)]
struct Scanned {
    skipped: Vec<String>,
    lsm: LsmMarkers,
}

impl Scanned {
    fn observe(&mut self, text: &str) {
        if is_skip_line(text) {
            self.skipped.push(text.trim_end().to_string());
        }
        self.lsm.observe(text);
    }

    fn merge(&mut self, other: Scanned) {
        self.skipped.extend(other.skipped);
        self.lsm.merge(&other.lsm);
    }
}

/// Exits 1 with a clear message unless running as root.
pub fn require_root(what: &str) {
    if !util::is_root() {
        eprintln!(
            "{what}: privileged tests must run as root (they create network namespaces, \
             cgroups and BPF programs); re-run as root, e.g. `sudo -E cargo xtask test`"
        );
        std::process::exit(1);
    }
}

/// Runs `cmd`, streaming its stdout and stderr through, and returns the skip and BPF LSM
/// markers it printed. Fails if the command fails.
fn run_scanning(cmd: &mut Command) -> Result<Scanned> {
    let line = show(cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let found = Arc::new(Mutex::new(Scanned::default()));
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let f1 = Arc::clone(&found);
    let t1 = std::thread::spawn(move || scan(out, &f1, &mut std::io::stdout()));
    let f2 = Arc::clone(&found);
    let t2 = std::thread::spawn(move || scan(err, &f2, &mut std::io::stderr()));
    let status = child.wait()?;
    let _ = t1.join();
    let _ = t2.join();
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    let found = std::mem::take(&mut *found.lock().unwrap());
    Ok(found)
}

/// Copies `pipe` to `sink` line by line, collecting skip notices and BPF LSM markers.
fn scan(pipe: impl std::io::Read, found: &Mutex<Scanned>, sink: &mut dyn std::io::Write) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    // Byte lines: test output is not guaranteed to be UTF-8.
    while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
        let text = String::from_utf8_lossy(&buf);
        found.lock().unwrap().observe(&text);
        let _ = sink.write_all(&buf);
        let _ = sink.flush();
        buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_skip_lines_anywhere() {
        let found = Mutex::new(Scanned::default());
        let out: &[u8] = b"running 2 tests\nSKIPPED: needs root (x)\ntest a ... ok\nnote SKIPPED: kernel too old\xff\nskipped: no cgroup2 mount\ntest b ... ok\n\tSkIpPeD: mixed case\nnothing skipped here\n";
        // Into a buffer: echoing these lines would trip the real run's own scan.
        let mut sink = Vec::new();
        scan(out, &found, &mut sink);
        assert_eq!(sink, out);
        let found = found.into_inner().unwrap().skipped;
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[1].contains("kernel too old"));
        assert!(found[2].starts_with("skipped: no cgroup2"));
        assert!(found[3].contains("mixed case"));
    }
}
