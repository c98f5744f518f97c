//! `cargo xtask verifier`: how many instructions the kernel's verifier processes to accept
//! each eBPF program, recorded per kernel in `bench-results/verifier.md` (like Cilium's
//! verifier complexity baselines), so a change that pushes the verifier shows up in review.
//!
//! - `cargo xtask verifier` measures on this kernel and rewrites the record (with kernel,
//!   commit and date).
//! - `cargo xtask verifier --check` ([`check`]) measures and compares with the record: it
//!   fails when a program's count grows more than [`GROWTH_LIMIT`] over it, when a program the
//!   record has a count for is refused now, or when a program is missing from the record.
//! - `cargo xtask verifier --vm` records as above plus a column for Debian 12's 6.1 kernel,
//!   measured in the QEMU VM of `cargo xtask vm` (its `verifier` step): the kernel family
//!   many nodes run, whose verifier counts more than this host's for the same program and
//!   refuses a program over 1,000,000. `--check` compares this host's column only.
//!
//! The counts come from `xtask-verifier` ([`HELPER`]), which loads the real object (nothing
//! attached) with its maps pinned in a private bpffs. Needs root.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};
use datalab_guard_tests::BpffsDir;
use serde_json::Value;

use super::{report::Machine, testrun, PREFIX};
use crate::util;

/// The helper binary (feature `xtask/bench-testrun`) that loads the object and reads the counts.
pub const HELPER: &str = "xtask-verifier";

/// A count may grow by this fraction of the recorded one before `--check` fails.
pub const GROWTH_LIMIT: f64 = 0.20;

/// Options of `cargo xtask verifier`.
#[derive(Debug, clap::Args)]
pub struct VerifierArgs {
    /// Compare with the record instead of rewriting it; fail on growth over 20 %.
    #[arg(long)]
    pub check: bool,
    /// Also measure on Debian 12's 6.1 kernel in the QEMU VM and record it in a column of
    /// its own (recording only).
    #[arg(long, conflicts_with = "check")]
    pub vm: bool,
}

/// Runs `cargo xtask verifier [--check]`.
pub fn run(args: &VerifierArgs) -> Result<()> {
    if args.check {
        check()
    } else {
        record(args.vm)
    }
}

/// The record's path in the workspace.
pub fn record_path() -> PathBuf {
    util::workspace_root()
        .join("bench-results")
        .join("verifier.md")
}

/// Measures on this kernel (and with `vm` on the VM's) and rewrites
/// `bench-results/verifier.md`.
pub fn record(vm: bool) -> Result<()> {
    let measured = measure()?;
    let in_vm = if vm {
        Some(crate::vm::verifier_counts(build_helper()?)?)
    } else {
        None
    };
    let machine = Machine::collect();
    let text = markdown(&machine, &measured, in_vm.as_ref());
    print!("{text}");
    let path = record_path();
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    println!("saved {}", path.display());
    Ok(())
}

/// Measures on this kernel and compares with `bench-results/verifier.md`; an error lists
/// every program that grew too much, is refused now, or has no record. For `cargo xtask
/// lint` and CI (needs root and the eBPF toolchain, like the privileged tests).
pub fn check() -> Result<()> {
    let path = record_path();
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (record one with `cargo xtask verifier`)",
            path.display()
        )
    })?;
    let recorded = parse_record(&text)?;
    let measured = measure()?;
    let kernel = Machine::collect().kernel;
    if recorded.kernel != kernel {
        println!(
            "verifier: note: the record is from kernel {}, this is {kernel}; counts differ \
             between kernels, so a failure here may be the kernel, not the change",
            recorded.kernel
        );
    }
    let problems = compare(&recorded.programs, &measured);
    for (name, count) in &measured {
        let was = recorded.programs.iter().find(|(n, _)| n == name);
        println!(
            "verifier: {name}: {} (recorded {})",
            show_count(count),
            was.map_or("nothing".to_string(), |(_, c)| show_count(c))
        );
    }
    if !problems.is_empty() {
        bail!(
            "verifier complexity check failed against {}:\n  {}\n(if the growth is intended, \
             re-record with `cargo xtask verifier` and commit the file)",
            path.display(),
            problems.join("\n  ")
        );
    }
    println!(
        "verifier: every program within {:.0} % of the record",
        GROWTH_LIMIT * 100.0
    );
    Ok(())
}

/// One program's verified instruction count, or why the kernel gave none.
pub type Count = Result<u32, String>;

/// Builds [`HELPER`] (xtask with `bench-testrun`) and returns its path.
pub fn build_helper() -> Result<PathBuf> {
    Ok(testrun::build(false, &[HELPER])?.get(HELPER)?.clone())
}

/// The counts in the helper's JSON document (one line of its output).
pub fn parse_helper_output(json: &str) -> Result<Vec<(String, Count)>> {
    let doc: Value = serde_json::from_str(json.trim())
        .with_context(|| format!("the verifier helper printed no JSON document: {json}"))?;
    parse_helper(&doc)
}

fn show_count(c: &Count) -> String {
    match c {
        Ok(n) => n.to_string(),
        Err(why) => format!("refused: {why}"),
    }
}

/// Builds the helper and runs it against a private bpffs.
fn measure() -> Result<Vec<(String, Count)>> {
    if !util::is_root() {
        bail!(
            "cargo xtask verifier must run as root: it loads the BPF programs (re-run as root, \
             e.g. `sudo -E cargo xtask verifier`)"
        );
    }
    let bins = testrun::build_all()?;
    let helper = bins.get(HELPER)?;
    let dir = BpffsDir::with_prefix(PREFIX)?;
    run_helper(helper, &dir.path().join("verifier"))
}

fn run_helper(helper: &Path, bpffs: &Path) -> Result<Vec<(String, Count)>> {
    let doc = util::run_json_helper(Command::new(helper).arg("--bpffs").arg(bpffs))?;
    parse_helper(&doc)
}

fn parse_helper(doc: &Value) -> Result<Vec<(String, Count)>> {
    let programs = doc["programs"]
        .as_array()
        .ok_or_else(|| anyhow!("no `programs` in {doc}"))?;
    programs
        .iter()
        .map(|p| {
            let name = p["name"]
                .as_str()
                .ok_or_else(|| anyhow!("program without a name: {p}"))?;
            let count = match (p["verified_insns"].as_u64(), p["refused"].as_str()) {
                (Some(n), _) => Ok(u32::try_from(n)?),
                (None, Some(why)) => Err(why.to_string()),
                (None, None) => bail!("program {name} with neither a count nor a reason: {p}"),
            };
            Ok((name.to_string(), count))
        })
        .collect()
}

/// The VM's kernel release and its counts, when measured there too.
type VmCounts = (String, Vec<(String, Count)>);

fn markdown(machine: &Machine, measured: &[(String, Count)], vm: Option<&VmCounts>) -> String {
    let mut s = String::from("# Verified instruction counts\n\n");
    s.push_str(
        "Instructions the kernel's verifier processed to accept each eBPF program \
         (`verified_insns` of BPF_OBJ_GET_INFO_BY_FD), loaded unattached from the object the \
         agent embeds. Written by `cargo xtask verifier` (as root); `cargo xtask verifier \
         --check` fails when a program's count grows more than 20 % over this record. Counts \
         depend on the kernel: re-record when the reference kernel changes.\n\n",
    );
    s.push_str(&format!(
        "- kernel: {}\n- commit: `{}`{}\n- date: {}\n\n",
        machine.kernel,
        machine.commit,
        if machine.dirty {
            " with uncommitted changes"
        } else {
            ""
        },
        machine.date
    ));
    let cell = |count: &Count| show_count(count).replace('|', "/").replace('\n', " ");
    match vm {
        None => {
            s.push_str("| program | verified instructions |\n|---|---:|\n");
            for (name, count) in measured {
                s.push_str(&format!("| {name} | {} |\n", cell(count)));
            }
        }
        Some((release, in_vm)) => {
            s.push_str(&format!(
                "The last column is Debian 12's kernel {release} in the QEMU VM of `cargo \
                 xtask vm` (`cargo xtask verifier --vm`); it refuses a program over \
                 1,000,000.\n\n"
            ));
            s.push_str(&format!(
                "| program | verified instructions | {release} (VM) |\n|---|---:|---:|\n"
            ));
            for (name, count) in measured {
                let there = in_vm
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or("not measured".to_owned(), |(_, c)| cell(c));
                s.push_str(&format!("| {name} | {} | {there} |\n", cell(count)));
            }
        }
    }
    s
}

/// What `bench-results/verifier.md` says.
#[derive(Debug, PartialEq)]
struct Record {
    kernel: String,
    programs: Vec<(String, Count)>,
}

fn parse_record(text: &str) -> Result<Record> {
    let kernel = text
        .lines()
        .find_map(|l| l.strip_prefix("- kernel: "))
        .ok_or_else(|| anyhow!("the verifier record has no `- kernel:` line"))?
        .trim()
        .to_string();
    let mut programs = Vec::new();
    for line in text.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        // The first count is this host's; a VM column after it is not compared.
        let [name, cell, ..] = cells[..] else {
            continue;
        };
        if !name.starts_with("dg_") {
            continue;
        }
        let count = match cell.strip_prefix("refused: ") {
            Some(why) => Err(why.to_string()),
            None => Ok(cell
                .parse::<u32>()
                .with_context(|| format!("the verifier record's count for {name}: `{cell}`"))?),
        };
        programs.push((name.to_string(), count));
    }
    if programs.is_empty() {
        bail!("the verifier record lists no programs");
    }
    Ok(Record { kernel, programs })
}

/// Every way `measured` falls short of `recorded`, one line each.
fn compare(recorded: &[(String, Count)], measured: &[(String, Count)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, now) in measured {
        let Some((_, was)) = recorded.iter().find(|(n, _)| n == name) else {
            problems.push(format!("{name}: not in the record ({})", show_count(now)));
            continue;
        };
        match (was, now) {
            (Ok(was), Ok(now)) => {
                let limit = f64::from(*was) * (1.0 + GROWTH_LIMIT);
                if f64::from(*now) > limit {
                    problems.push(format!(
                        "{name}: {now} instructions, {:+.0} % over the recorded {was}",
                        (f64::from(*now) / f64::from(*was) - 1.0) * 100.0
                    ));
                }
            }
            (Ok(was), Err(why)) => problems.push(format!(
                "{name}: refused now ({why}), recorded at {was} instructions"
            )),
            // Refused before: whatever happens now is no regression.
            (Err(_), _) => {}
        }
    }
    for (name, _) in recorded {
        if !measured.iter().any(|(n, _)| n == name) {
            problems.push(format!("{name}: in the record but no longer in the object"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        let mut m = Machine::collect();
        m.kernel = "6.18.0-test".into();
        m.commit = "abc1234".into();
        m.dirty = false;
        m
    }

    fn measured() -> Vec<(String, Count)> {
        vec![
            ("dg_egress".into(), Ok(1000)),
            (
                "dg_packet_socket".into(),
                Err("the kernel | refused\nit".into()),
            ),
        ]
    }

    #[test]
    fn the_record_reads_back_what_was_written() {
        let text = markdown(&machine(), &measured(), None);
        let record = parse_record(&text).unwrap();
        assert_eq!(record.kernel, "6.18.0-test");
        assert_eq!(
            record.programs,
            vec![
                ("dg_egress".to_string(), Ok(1000)),
                (
                    "dg_packet_socket".to_string(),
                    Err("the kernel / refused it".into())
                ),
            ]
        );
    }

    #[test]
    fn a_vm_column_is_recorded_but_only_the_host_column_is_read_back() {
        let vm = (
            "6.1.0-57-amd64".to_string(),
            vec![("dg_egress".to_string(), Ok(5000))],
        );
        let text = markdown(&machine(), &measured(), Some(&vm));
        assert!(text.contains("| program | verified instructions | 6.1.0-57-amd64 (VM) |"));
        assert!(text.contains("| dg_egress | 1000 | 5000 |"), "{text}");
        assert!(
            text.contains("| dg_packet_socket | refused: the kernel / refused it | not measured |"),
            "{text}"
        );
        let record = parse_record(&text).unwrap();
        assert_eq!(record.programs[0], ("dg_egress".to_string(), Ok(1000)));
        assert_eq!(record.programs.len(), 2);
    }

    #[test]
    fn growth_past_the_limit_fails_and_within_it_passes() {
        let recorded = measured();
        let mut now = measured();
        now[0].1 = Ok(1200);
        assert!(
            compare(&recorded, &now).is_empty(),
            "20 % exactly is allowed"
        );
        now[0].1 = Ok(1201);
        let problems = compare(&recorded, &now);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("dg_egress: 1201"), "{problems:?}");
        now[0].1 = Ok(10);
        assert!(compare(&recorded, &now).is_empty(), "shrinking is fine");
    }

    #[test]
    fn refusals_new_and_vanished_programs_fail() {
        let recorded = measured();
        let now = vec![
            ("dg_egress".to_string(), Err("verifier said no".to_string())),
            ("dg_new".to_string(), Ok(5)),
        ];
        let problems = compare(&recorded, &now);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("refused now"));
        assert!(problems[1].starts_with("dg_new: not in the record"));
        assert!(problems[2].starts_with("dg_packet_socket: in the record but no longer"));
        // A program refused in the record and accepted now is no regression.
        let now = vec![
            ("dg_egress".to_string(), Ok(900)),
            ("dg_packet_socket".to_string(), Ok(5000)),
        ];
        assert!(compare(&recorded, &now).is_empty());
    }
}
