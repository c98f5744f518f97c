//! `xtask-bench-progstats`: the kernel half of the datapath-cost measurement under real
//! traffic (`cargo xtask bench`, throughput part), as a binary of its own (feature
//! `bench-testrun`, like `xtask-bench-testrun`: it loads the real eBPF object through the
//! agent's library).
//!
//! It turns on the kernel's per-program run statistics (BPF_ENABLE_STATS, held for as long as
//! it runs), attaches the do-nothing `cgroup_skb` program to `--floor-cgroup`'s egress, prints
//! `{"ready": ...}`, and then answers every line on stdin with one JSON line of cumulative
//! statistics: run time and run count of the guard's egress program as the running agent
//! loaded it (every loaded `dg_egress` but this process's own unattached copy) and of the
//! floor program. At end of input it detaches the floor, removes its pins and exits.

use std::{io::BufRead as _, path::PathBuf};

use anyhow::{Context as _, Result};
use aya::{
    programs::loaded_programs,
    sys::{enable_stats, Stats},
};
use clap::Parser;
use datalab_guard::bpf::testrun::TestRunner;
use datalab_guard_common::maps::programs;
use serde_json::json;

/// Attaches the floor program and reports per-program run statistics on request.
#[derive(Debug, Parser)]
struct Args {
    /// The cgroup whose egress gets the do-nothing program (the bench's unguarded one).
    #[arg(long)]
    floor_cgroup: PathBuf,
    /// A bpffs path that does not exist yet; this process's maps are pinned there and
    /// removed at exit.
    #[arg(long)]
    bpffs: PathBuf,
}

/// Cumulative run time (ns) and run count of a set of programs.
#[derive(Default)]
struct Totals {
    ns: u64,
    runs: u64,
    programs: u32,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _stats = enable_stats(Stats::RunTime).context(
        "BPF_ENABLE_STATS refused (kernel.bpf_stats_enabled needs Linux 5.8 and CAP_SYS_ADMIN)",
    )?;
    let mut runner = TestRunner::new(&args.bpffs).context("loading the eBPF object")?;
    let own_guard = runner.program_id(programs::EGRESS)?;
    let floor = runner.program_id(programs::BENCH_EMPTY)?;
    let _link = runner
        .attach_floor(&args.floor_cgroup)
        .with_context(|| format!("attaching the floor to {}", args.floor_cgroup.display()))?;
    println!("{}", json!({ "ready": true, "floor_id": floor }));
    for line in std::io::stdin().lock().lines() {
        line?;
        let (mut guard, mut empty) = (Totals::default(), Totals::default());
        for info in loaded_programs().filter_map(Result::ok) {
            let totals = if info.id() == floor {
                &mut empty
            } else if info.id() != own_guard && info.name_as_str() == Some(programs::EGRESS) {
                &mut guard
            } else {
                continue;
            };
            totals.ns += info.run_time().as_nanos() as u64;
            totals.runs += info.run_count();
            totals.programs += 1;
        }
        println!(
            "{}",
            json!({
                "guard": { "ns": guard.ns, "runs": guard.runs, "programs": guard.programs },
                "floor": { "ns": empty.ns, "runs": empty.runs, "programs": empty.programs },
            })
        );
    }
    Ok(())
}
