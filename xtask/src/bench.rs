//! `cargo xtask bench`: what the guard costs, side by side in one run.
//!
//! Two parts, each alternating between the things it compares so that drift on a shared
//! machine hits all of them alike, and each reported as medians:
//! - BPF_PROG_TEST_RUN ([`testrun`]): ns per packet of an empty cgroup_skb program returning
//!   1 (the harness floor), and of the guard on a passed and on a blocked packet, v4 and v6;
//!   reported as differences to the empty program on the same packet family.
//! - TCP throughput ([`throughput`]): iperf3 over the lab's veth pair from a cgroup guarded by
//!   a running `datalab-guard local`, from an unguarded sibling cgroup, and from the
//!   unguarded cgroup with the same block done by an nftables rule, and from the unguarded
//!   cgroup through the pod-edge program on the veth's host side; reported as ratios to the
//!   unguarded client.
//!
//! The report ([`report`]) is printed as markdown and saved to `bench-results/latest.md`, with
//! every raw sample in `bench-results/latest.json`. Targets (fast path within 5 ns of the
//! empty program, throughput ratio ≥ 0.98) are reported as met or not; they never fail the
//! command. A part that cannot run does: the report is still saved, saying what failed.
//!
//! `--verdict-latency` runs another scenario instead, kept out of the default run because it
//! starts containerd ([`verdict_latency`]): time from a pod cgroup's creation to its verdict
//! in the pinned map, for pods known from the API and pods known only from the container
//! runtime; saved to `bench-results/verdict-latency.md` and `.json`.
//!
//! `--datalab` runs the Datalab scale scenario instead ([`datalab`]): 20 000 namespaces,
//! 20 000 NetworkPolicies, 500 pods on the node under churn, the controller provisioning
//! every environment, and the API load per agent; plus the 10 000-pods-on-one-node stress
//! point. Release builds; saved to `bench-results/datalab.md` and `.json`.
//!
//! Needs root (BPF programs, network namespaces, cgroups); everything created is removed on
//! the way out, also on failure, and leftovers of an interrupted run are removed first.

mod cost_report;
mod datalab;
mod machine;
mod progstats;
mod report;
mod stats;
mod testrun;
mod throughput;
mod verdict_latency;
pub mod verifier;

use std::{path::PathBuf, time::Instant};

use anyhow::{bail, Result};
use datalab_guard_tests::{cleanup_stale, BpffsDir};

use self::report::{Machine, Part, Report};
use crate::{setup, util};

/// Name prefix of everything the benchmark creates (so stale leftovers can be found).
const PREFIX: &str = "dgbench";

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Throughput rounds; each round runs the four iperf3 clients once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub seconds: u32,
    /// BPF_PROG_TEST_RUN rounds; each round runs every case once. Many short rounds rather
    /// than a few long ones: on a shared machine a disturbance then spoils one pair of a
    /// large set, and the medians of the per-round differences stay put.
    #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u32).range(1..))]
    pub testrun_rounds: u32,
    /// Program runs per case per BPF_PROG_TEST_RUN round.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,
    /// Leave out the BPF_PROG_TEST_RUN part.
    #[arg(long)]
    pub skip_testrun: bool,
    /// Leave out the throughput part.
    #[arg(long)]
    pub skip_throughput: bool,
    /// Diagnosis of the per-run cost: also attach the do-nothing program and the fast-path
    /// probes to the guarded cgroup, where they run just before the guard on its packets.
    #[arg(long)]
    pub probes_on_guarded: bool,
    /// Instead of the parts above, measure pod cgroup creation → verdict in the map, for pods
    /// known from the API and pods known only from the runtime (starts containerd).
    #[arg(long)]
    pub verdict_latency: bool,
    /// Pods per class (system, tenant) per case of --verdict-latency.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub verdict_latency_pods: u32,
    /// Instead of the parts above, the Datalab scale scenario (see `bench-results/README.md`):
    /// about 9 minutes at full size, release builds.
    #[arg(long)]
    pub datalab: bool,
    /// With --datalab: fraction of the scenario's object counts (0.1: 2 000 namespaces, 50
    /// pods, 1 000 pods for the stress point) for a quick check.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// With --datalab: seconds of churn.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub churn_seconds: u32,
    /// With --datalab: seconds of the quiet (steady-state) window.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub steady_seconds: u32,
    /// Directory for latest.md and latest.json [default: <workspace>/bench-results].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs the benchmarks; see the module docs.
pub fn run(args: &BenchArgs) -> Result<()> {
    if !util::is_root() {
        bail!(
            "cargo xtask bench must run as root: it loads BPF programs, creates network \
             namespaces and cgroups, and starts datalab-guard; re-run as root, e.g. \
             `sudo ./x bench` or `sudo -E cargo xtask bench`"
        );
    }
    setup::run_all()?;
    let removed = cleanup_stale(PREFIX)?;
    if removed > 0 {
        println!("bench: removed {removed} leftover(s) of an earlier interrupted run");
    }
    if args.datalab {
        return run_datalab(args);
    }
    let bins = testrun::build_all()?;
    bins.get("datalab-guard")?;
    for (var, path) in bins.kit_env() {
        std::env::set_var(var, path);
    }
    if args.verdict_latency {
        return run_verdict_latency(args, &bins);
    }
    let helper = match args.skip_testrun {
        true => None,
        false => Some(testrun::helper(&bins)?),
    };
    // After the builds, so the load average says something about the measurements.
    let mut machine = Machine::collect();

    let testrun = match &helper {
        None => Part::Skipped,
        Some(helper) => {
            println!("\n== BPF_PROG_TEST_RUN");
            let started = Instant::now();
            let measured = BpffsDir::with_prefix(PREFIX).and_then(|dir| {
                testrun::run(
                    helper,
                    &dir.path().join("testrun"),
                    args.testrun_rounds,
                    args.repeat,
                )
            });
            println!("(took {:.0} s)", started.elapsed().as_secs_f64());
            part(measured)
        }
    };
    let throughput = match args.skip_throughput {
        true => Part::Skipped,
        false => {
            println!("\n== throughput and per-run cost under real traffic (iperf3: TCP, UDP 64 B)");
            let started = Instant::now();
            let progstats = bins.get(progstats::HELPER)?;
            let measured = throughput::run(
                PREFIX,
                args.rounds,
                args.seconds,
                Some(progstats),
                args.probes_on_guarded,
            );
            println!("(took {:.0} s)", started.elapsed().as_secs_f64());
            part(measured)
        }
    };
    machine.finish();

    let report = Report {
        machine,
        command: format!(
            "cargo xtask {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        testrun,
        throughput,
    };
    println!("\n{}", report.markdown());
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| util::workspace_root().join("bench-results"));
    report.save(&dir)?;
    println!(
        "saved {} and {}",
        dir.join("latest.md").display(),
        dir.join("latest.json").display()
    );
    let failed: Vec<&str> = [
        matches!(report.testrun, Part::Failed(_)).then_some("BPF_PROG_TEST_RUN"),
        matches!(report.throughput, Part::Failed(_)).then_some("throughput"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !failed.is_empty() {
        bail!(
            "bench: the {} part failed (see the report)",
            failed.join(" and ")
        );
    }
    Ok(())
}

/// `--verdict-latency`: runs the scenario, prints and saves its report.
fn run_verdict_latency(args: &BenchArgs, bins: &crate::artifacts::Bins) -> Result<()> {
    println!("\n== pod cgroup creation -> verdict in the map");
    let started = Instant::now();
    let doc = verdict_latency::measure(bins, args.verdict_latency_pods)?;
    println!("(took {:.0} s)", started.elapsed().as_secs_f64());
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let md = verdict_latency::markdown(&doc, &command);
    println!("\n{md}");
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| util::workspace_root().join("bench-results"));
    verdict_latency::save(&dir, &doc, &md)?;
    println!("saved {}", dir.join("verdict-latency.md").display());
    if doc["runtime"]["error"].is_string() {
        bail!("bench: the runtime case failed (see the report)");
    }
    Ok(())
}

/// `--datalab`: runs the scenario, prints and saves its report.
fn run_datalab(args: &BenchArgs) -> Result<()> {
    println!("\n== Datalab scale scenario (scale {})", args.scale);
    let started = Instant::now();
    let doc = datalab::measure(&datalab::Options {
        scale: args.scale,
        churn_seconds: args.churn_seconds,
        steady_seconds: args.steady_seconds,
    })?;
    println!("(took {:.0} s)", started.elapsed().as_secs_f64());
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let md = datalab::markdown(&doc, &command);
    println!("\n{md}");
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| util::workspace_root().join("bench-results"));
    datalab::save(&dir, &doc, &md)?;
    println!(
        "saved {} and {}",
        dir.join("datalab.md").display(),
        dir.join("datalab.json").display()
    );
    Ok(())
}

fn part<T>(r: Result<T>) -> Part<T> {
    match r {
        Ok(t) => Part::Done(t),
        Err(e) => {
            eprintln!("bench: {e:#}");
            Part::Failed(format!("{e:#}"))
        }
    }
}
