//! `cargo xtask vm`: the tests that need another kernel, run in a QEMU VM booted with
//! Debian 12's 6.1 kernel (the kernel family EKS, GKE and Bottlerocket nodes commonly run)
//! with the BPF LSM on. This host's own kernel refuses BPF LSM programs, so this is where
//! `--deny-raw-sockets` really refuses sockets, and the datapath gets a second kernel
//! version. The binaries are the host's: the workspace is shared read-only over 9p at its
//! host path, and the tests run in place.
//!
//! Steps, in one boot:
//! - `check`: `datalab-guard check` passes and reports the BPF LSM active;
//! - `raw-sockets`: `tests/tests/raw_sockets.rs` (AF_PACKET raw and dgram, AF_XDP and
//!   SOCK_RAW refused in guarded cgroups, allowed elsewhere, counted, audited);
//! - `sighup-reload`: the SIGHUP reload that turns `denyRawSockets` on and off (node_mode.rs);
//! - `local-mode`, `packets`: the datapath end to end and the packet tests on this kernel;
//! - `edge-layer`: `tests/tests/edge_layer.rs`, the pod-edge program loaded, attached and
//!   dropping AF_PACKET and AF_XDP frames on a kernel without tcx (6.1: the clsact
//!   fallback, chosen without the test knob);
//! - `tunnel-lab`: tests/tests/tunnel_lab.rs, real VXLAN and Geneve devices (this host's
//!   kernel has no Geneve) that must deliver nothing a guarded cgroup encapsulates;
//! - `socket-hooks`: tests/tests/socket_hooks.rs, sockets handed over from an exempt
//!   process, and MPTCP subflows a kernel worker connects judged by the connection's
//!   recorded cgroup path (`bpf_skc_to_mptcp_sock` and socket storage on 6.1);
//! - `verifier`: every program's verified instruction count on this kernel, which must load
//!   them all: a program that fits the verifier on the host's kernel but not on 6.1 (E2BIG
//!   at 1M instructions) fails here (also alone: `cargo xtask verifier --vm`).
//!
//! Any step failing, any `SKIPPED:` line (any case) and any BPF LSM branch that did not run
//! (`vm_markers`) fail it. The pieces of the VM are built and cached by `vm_image`; the boot
//! itself is `vm_qemu`.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    artifacts::{self, Bins, EBPF_CRATE},
    bench::verifier::{self, Count},
    setup, test,
    util::{cargo_cmd, show, workspace_root},
    vm_image,
    vm_markers::{self, LsmMarkers},
    vm_qemu::{self, Boot, Share},
};

/// The guest's memory: the end-to-end suites need it (VM-LAB.md).
const MEMORY: &str = "4G";
/// Virtual CPUs (software emulated; the host has two cores).
const CPUS: u32 = 2;
/// Prefix of the lines the guest script prints around each step.
const STEP_LINE: &str = "dg-vm-step: ";
/// Where the `verifier` step pins the maps (the guest's own bpffs; removed by the helper).
const VERIFIER_BPFFS: &str = "/sys/fs/bpf/dg-vm-verifier";

/// Options of `cargo xtask vm`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Run only these steps (repeatable; default: all of them, in the order listed).
    #[arg(long = "step", value_enum)]
    pub steps: Vec<Step>,
    /// Give up on the VM after this many seconds.
    #[arg(long, default_value_t = 1200)]
    pub timeout_secs: u64,
}

/// What runs in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Step {
    /// `datalab-guard check` passes and reports the BPF LSM active.
    Check,
    /// tests/tests/raw_sockets.rs: the BPF LSM refusals.
    RawSockets,
    /// The SIGHUP reload turning denyRawSockets on and off (node_mode.rs).
    SighupReload,
    /// tests/tests/local_mode.rs: the datapath end to end on this kernel.
    LocalMode,
    /// tests/tests/packets.rs: the packet tests on this kernel.
    Packets,
    /// tests/tests/edge_layer.rs: the pod-edge layer on a kernel without tcx.
    EdgeLayer,
    /// tests/tests/tunnel_lab.rs: VXLAN and Geneve devices decapsulating in the lab.
    TunnelLab,
    /// tests/tests/socket_hooks.rs: handed-over sockets and MPTCP subflows on this kernel.
    SocketHooks,
    /// Every program's verified instruction count on this kernel (`xtask-verifier`); every
    /// program must load.
    Verifier,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::Check,
        Step::RawSockets,
        Step::SighupReload,
        Step::LocalMode,
        Step::Packets,
        Step::EdgeLayer,
        Step::TunnelLab,
        Step::SocketHooks,
        Step::Verifier,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::Check => "check",
            Step::RawSockets => "raw-sockets",
            Step::SighupReload => "sighup-reload",
            Step::LocalMode => "local-mode",
            Step::Packets => "packets",
            Step::EdgeLayer => "edge-layer",
            Step::TunnelLab => "tunnel-lab",
            Step::SocketHooks => "socket-hooks",
            Step::Verifier => "verifier",
        }
    }

    /// The integration test file (under tests/tests/) and the test binary's arguments.
    fn test(self) -> Option<(&'static str, Vec<&'static str>)> {
        let all = vec!["--test-threads=2", "--nocapture"];
        match self {
            Step::Check | Step::Verifier => None,
            Step::RawSockets => Some(("raw_sockets", all)),
            Step::SighupReload => Some((
                "node_mode",
                vec![
                    "--exact",
                    "sighup_deny_raw_sockets_attaches_the_socket_programs_or_is_rejected",
                    "--nocapture",
                ],
            )),
            // Not the upgrade-under-flood test: under software emulation the agent answers
            // /metrics too slowly while the sender floods (20,000 datagrams/s), and the
            // test's metrics read times out (EAGAIN). It runs on the host.
            Step::LocalMode => Some((
                "local_mode",
                vec![
                    "--test-threads=2",
                    "--nocapture",
                    "--skip",
                    "a_continuous_sender_gets_nothing_through_an_upgrade",
                ],
            )),
            Step::Packets => Some(("packets", all)),
            Step::EdgeLayer => Some(("edge_layer", all)),
            Step::TunnelLab => Some(("tunnel_lab", all)),
            Step::SocketHooks => Some(("socket_hooks", all)),
        }
    }
}

/// What the VM run saw.
#[derive(Debug, Default)]
pub struct VmReport {
    pub lsm: LsmMarkers,
    /// The guest's kernel release.
    pub kernel_release: String,
    /// The `verifier` step's counts, by program (empty when the step did not run).
    pub verifier: Vec<(String, Count)>,
}

/// Runs `cargo xtask vm`.
pub fn run(args: &VmArgs) -> Result<()> {
    setup::run_all()?;
    test::require_root("cargo xtask vm");
    let bins = artifacts::build_bins(&[])?;
    let steps = if args.steps.is_empty() {
        Step::ALL.to_vec()
    } else {
        args.steps.clone()
    };
    let report = run_steps(&bins, &steps, Duration::from_secs(args.timeout_secs))?;
    // Run alone, the VM must show the LSM branch of every test it ran.
    vm_markers::require_lsm_branches(&report.lsm, false)?;
    if steps.contains(&Step::RawSockets) && steps.contains(&Step::SighupReload) {
        vm_markers::require_lsm_branches(&report.lsm, true)?;
    }
    println!("cargo xtask vm: every step passed on the VM's kernel, none skipped");
    Ok(())
}

/// Builds the VM (cached) and the test binaries, boots once, runs `steps` and checks their
/// outcome; the BPF LSM markers seen are returned for the caller to combine with the host's.
pub fn run_steps(bins: &Bins, steps: &[Step], timeout: Duration) -> Result<VmReport> {
    let started = Instant::now();
    let mut bins = bins.clone();
    if steps.contains(&Step::Verifier) && !bins.all.contains_key(verifier::HELPER) {
        bins.all
            .insert(verifier::HELPER.to_owned(), verifier::build_helper()?);
    }
    let bins = &bins;
    let image = vm_image::ensure()?;
    let test_files: Vec<&str> = steps.iter().filter_map(|s| s.test()).map(|t| t.0).collect();
    let test_bins = build_test_binaries(&test_files)?;
    let script = guest_script(bins, &test_bins, steps)?;
    let boot = Boot {
        memory: MEMORY.into(),
        cpus: CPUS,
        timeout,
        shares: vec![Share {
            path: workspace_root(),
            read_only: true,
        }],
    };
    println!(
        "vm: booting Debian 12's {} (software emulation, {MEMORY}, {CPUS} CPUs): {}",
        image.kernel_release,
        steps
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut seen = GuestOutput::default();
    let boot_started = Instant::now();
    let rc = vm_qemu::run_script(&image, &boot, &script, |line| {
        println!("vm| {line}");
        seen.observe(line, boot_started.elapsed());
    })?;
    seen.verdict(steps, rc)?;
    println!(
        "vm: done in {:.0?} (boot and steps {:.0?})",
        started.elapsed(),
        boot_started.elapsed()
    );
    let verifier = if steps.contains(&Step::Verifier) {
        seen.verifier_counts()?
    } else {
        Vec::new()
    };
    Ok(VmReport {
        lsm: seen.lsm,
        kernel_release: image.kernel_release,
        verifier,
    })
}

/// Boots the VM for the `verifier` step alone (`cargo xtask verifier --vm`): the guest's
/// kernel release and its verified instruction count for every program. `helper` is the
/// `xtask-verifier` binary.
pub fn verifier_counts(helper: PathBuf) -> Result<(String, Vec<(String, Count)>)> {
    setup::run_all()?;
    let bins = Bins {
        all: [(verifier::HELPER.to_owned(), helper)].into(),
    };
    let report = run_steps(&bins, &[Step::Verifier], Duration::from_secs(600))?;
    Ok((report.kernel_release, report.verifier))
}

/// `cargo test --no-run` for the given integration tests (tests/tests/); their executables
/// by test name.
fn build_test_binaries(names: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    if names.is_empty() {
        return Ok(found);
    }
    let mut cmd = cargo_cmd();
    // The whole workspace, as the host run builds it: the same feature set, so in a full
    // run these binaries are already built (a `-p` selection would rebuild dependencies).
    cmd.args(["test", "--no-run", "--workspace", "--exclude", EBPF_CRATE]);
    for name in names {
        cmd.args(["--test", name]);
    }
    cmd.arg("--message-format=json-render-diagnostics");
    let line = show(&cmd);
    println!("$ {line}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    for msg in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&msg?) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if v["reason"] == "compiler-artifact" && is_test {
            if let (Some(name), Some(exe)) =
                (v["target"]["name"].as_str(), v["executable"].as_str())
            {
                found.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{line}` failed: {status}");
    }
    for name in names {
        if !found.contains_key(*name) {
            bail!(
                "cargo built no test binary `{name}` (built: {:?})",
                found.keys()
            );
        }
    }
    Ok(found)
}

/// The bash script the guest runs: every step, each between two [`STEP_LINE`] lines, with
/// the kit's environment pointing at the host-built binaries.
fn guest_script(
    bins: &Bins,
    test_bins: &BTreeMap<String, PathBuf>,
    steps: &[Step],
) -> Result<String> {
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut s = String::from("set -u\n");
    for (var, path) in bins.kit_env() {
        s.push_str(&format!("export {var}={}\n", q(&path.to_string_lossy())));
    }
    s.push_str(&format!("cd {}\n", q(&workspace_root().to_string_lossy())));
    s.push_str(&format!(
        "failed=0\nstep() {{ echo \"{STEP_LINE}$1: start\"; local n=$1; shift; \"$@\"; \
         local rc=$?; echo \"{STEP_LINE}$n: exit $rc\"; [ $rc = 0 ] || failed=1; }}\n"
    ));
    for step in steps {
        let command = match step.test() {
            None if *step == Step::Verifier => vec![
                bins.get(verifier::HELPER)?.to_string_lossy().into_owned(),
                "--bpffs".to_owned(),
                VERIFIER_BPFFS.to_owned(),
            ],
            None => vec![
                bins.get("datalab-guard")?.to_string_lossy().into_owned(),
                "check".to_owned(),
            ],
            Some((file, args)) => {
                let exe = &test_bins[file];
                std::iter::once(exe.to_string_lossy().into_owned())
                    .chain(args.into_iter().map(str::to_owned))
                    .collect()
            }
        };
        let quoted: Vec<String> = command.iter().map(|a| q(a)).collect();
        s.push_str(&format!("step {} {}\n", step.name(), quoted.join(" ")));
    }
    s.push_str("exit $failed\n");
    Ok(s)
}

/// What the guest printed, as far as the verdict goes.
#[derive(Debug, Default)]
struct GuestOutput {
    /// Exit status of each step that finished, with its duration.
    ended: BTreeMap<String, (i32, Duration)>,
    started: BTreeMap<String, Duration>,
    /// The step running now (its output lines are attributed to it).
    current: Option<String>,
    check_lines: Vec<String>,
    /// The `verifier` step's output: the helper's JSON document is one of these lines.
    verifier_lines: Vec<String>,
    skipped: Vec<String>,
    lsm: LsmMarkers,
}

impl GuestOutput {
    fn observe(&mut self, line: &str, at: Duration) {
        if let Some(rest) = line.strip_prefix(STEP_LINE) {
            if let Some(name) = rest.strip_suffix(": start") {
                self.started.insert(name.to_owned(), at);
                self.current = Some(name.to_owned());
                return;
            }
            if let Some((name, rc)) = rest.split_once(": exit ") {
                let took = at.saturating_sub(self.started.get(name).copied().unwrap_or(at));
                let rc = rc.trim().parse().unwrap_or(-1);
                self.ended.insert(name.to_owned(), (rc, took));
                self.current = None;
                return;
            }
        }
        if test::is_skip_line(line) {
            self.skipped.push(line.to_owned());
        }
        self.lsm.observe(line);
        if self.current.as_deref() == Some(Step::Check.name()) {
            self.check_lines.push(line.to_owned());
        }
        if self.current.as_deref() == Some(Step::Verifier.name()) {
            self.verifier_lines.push(line.to_owned());
        }
    }

    /// Prints the `verifier` step's counts; a line per program the kernel refused (or one
    /// saying the step printed no counts).
    fn verifier_problems(&self) -> Vec<String> {
        let counts = match self.verifier_counts() {
            Ok(counts) => counts,
            Err(e) => return vec![format!("{e:#}")],
        };
        let mut problems = Vec::new();
        for (name, count) in counts {
            match count {
                Ok(n) => println!("vm: {name}: {n} verified instructions"),
                Err(why) => problems.push(format!("the VM's kernel refused {name}: {why}")),
            }
        }
        problems
    }

    /// The `verifier` step's counts, from the helper's JSON line.
    fn verifier_counts(&self) -> Result<Vec<(String, Count)>> {
        let json = self
            .verifier_lines
            .iter()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| {
                format!(
                    "the verifier step printed no JSON document:\n{}",
                    self.verifier_lines.join("\n")
                )
            })?;
        verifier::parse_helper_output(json)
    }

    /// Every step ran and passed, nothing skipped, and `check` saw the BPF LSM active.
    fn verdict(&self, steps: &[Step], rc: i32) -> Result<()> {
        let mut problems = Vec::new();
        for step in steps {
            match self.ended.get(step.name()) {
                Some((0, took)) => println!("vm: step {}: passed in {took:.0?}", step.name()),
                Some((code, took)) => problems.push(format!(
                    "step {} failed (exit {code}) after {took:.0?}",
                    step.name()
                )),
                None => problems.push(format!("step {} did not finish", step.name())),
            }
        }
        if steps.contains(&Step::Check) {
            let active = self
                .check_lines
                .iter()
                .any(|l| l.contains("BPF LSM active"));
            if !active {
                problems.push(format!(
                    "`datalab-guard check` did not report the BPF LSM active:\n{}",
                    self.check_lines.join("\n")
                ));
            }
        }
        if steps.contains(&Step::Verifier) {
            problems.extend(self.verifier_problems());
        }
        if !self.skipped.is_empty() {
            problems.push(format!(
                "{} line(s) in the VM printed `{}`; every test must run there:\n{}",
                self.skipped.len(),
                test::SKIP_MARKER,
                self.skipped.join("\n")
            ));
        }
        if rc != 0 && problems.is_empty() {
            problems.push(format!("the guest script exited {rc}"));
        }
        if !problems.is_empty() {
            bail!("the VM step failed:\n- {}", problems.join("\n- "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(lines: &[&str]) -> GuestOutput {
        let mut out = GuestOutput::default();
        for (i, l) in lines.iter().enumerate() {
            out.observe(l, Duration::from_secs(i as u64));
        }
        out
    }

    #[test]
    fn steps_pass_only_when_each_ended_zero_and_nothing_skipped() {
        let good = [
            "dg-vm-step: check: start",
            "PASS  BPF LSM active (...)",
            "dg-vm-step: check: exit 0",
            "dg-vm-step: raw-sockets: start",
            "test a ... ok",
            "dg-vm-step: raw-sockets: exit 0",
        ];
        output(&good)
            .verdict(&[Step::Check, Step::RawSockets], 0)
            .unwrap();
        // A step that never ended (the VM died in it) fails, even with a zero status.
        let err = output(&good[..4])
            .verdict(&[Step::Check, Step::RawSockets], 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("raw-sockets did not finish"), "{err}");
        // A skip notice fails, whatever its case.
        let mut skipped = good.to_vec();
        skipped.insert(4, "Skipped: no BPF LSM");
        let err = output(&skipped)
            .verdict(&[Step::Check, Step::RawSockets], 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Skipped: no BPF LSM"), "{err}");
        // check must say the BPF LSM is active.
        let mut inactive = good.to_vec();
        inactive[1] = "FAIL  BPF LSM not active";
        assert!(output(&inactive).verdict(&[Step::Check], 0).is_err());
        let failed = ["dg-vm-step: check: start", "dg-vm-step: check: exit 1"];
        assert!(output(&failed).verdict(&[Step::Check], 1).is_err());
    }

    #[test]
    fn the_verifier_step_passes_only_when_the_kernel_loaded_every_program() {
        let loaded = [
            "dg-vm-step: verifier: start",
            r#"{"programs":[{"name":"dg_egress","verified_insns":23360}]}"#,
            "dg-vm-step: verifier: exit 0",
        ];
        let out = output(&loaded);
        out.verdict(&[Step::Verifier], 0).unwrap();
        assert_eq!(
            out.verifier_counts().unwrap(),
            vec![("dg_egress".to_string(), Ok(23360))]
        );
        let refused = [
            loaded[0],
            r#"{"programs":[{"name":"dg_edge","refused":"E2BIG"}]}"#,
            loaded[2],
        ];
        let err = output(&refused)
            .verdict(&[Step::Verifier], 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("refused dg_edge: E2BIG"), "{err}");
        let silent = [loaded[0], loaded[2]];
        let err = output(&silent)
            .verdict(&[Step::Verifier], 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("printed no JSON document"), "{err}");
    }
}
