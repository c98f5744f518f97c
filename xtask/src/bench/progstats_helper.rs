//! `xtask-bench-progstats`: the kernel half of the datapath-cost measurement under real
//! traffic (`cargo xtask bench`, throughput part), as a binary of its own (feature
//! `bench-testrun`, like `xtask-bench-testrun`: it loads the real eBPF object through the
//! agent's library).
//!
//! It turns on the kernel's per-program run statistics (BPF_ENABLE_STATS, held for as long as
//! it runs), attaches the bench-only `cgroup_skb` programs (the do-nothing floor and the two
//! fast-path probes) to `--floor-cgroup`'s egress, prints `{"ready": ...}`, and then answers
//! every line on stdin with one JSON line of cumulative statistics: run time and run count of
//! the guard's egress program as the running agent loaded it (every loaded `dg_egress` but
//! this process's own copy) and of each bench program, of its own copy of the guard,
//! attached beside the floor (`dg_egress_copy`), and of every loaded pod-edge program
//! (`dg_edge`, loaded only while the bench's `edge` configuration runs). At end of input it
//! detaches them, removes its pins and exits.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    programs::loaded_programs,
    sys::{enable_stats, Stats},
};
use clap::Parser;
use datalab_guard::{
    blocklist::{parse_cidr, DEFAULT_BLOCKED},
    bpf::testrun::TestRunner,
};
use datalab_guard_common::{maps::programs, Mode, Verdict};
use serde_json::json;

/// Attaches the floor program and reports per-program run statistics on request.
#[derive(Debug, Parser)]
struct Args {
    /// The cgroup whose egress gets the do-nothing program (the bench's unguarded one).
    #[arg(long)]
    floor_cgroup: PathBuf,
    /// Also attach the bench programs here (the guarded cgroup, for attribution: there they
    /// run before the guard, which is attached at an ancestor, on the same packets).
    #[arg(long)]
    also_cgroup: Option<PathBuf>,
    /// A bpffs path that does not exist yet; this process's maps are pinned there and
    /// removed at exit.
    #[arg(long)]
    bpffs: PathBuf,
    /// With `--also-cgroup`: the running agent's pinned maps directory. A second instance of
    /// the guard program, loaded by us over those very maps (read, never written), goes on
    /// the `--also-cgroup` too (`dg_egress_agent_maps`): the agent's code and data on the
    /// agent's packets, but another program instance.
    #[arg(long, requires = "also_cgroup")]
    agent_maps: Option<PathBuf>,
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
    let mut links = Vec::new();
    let mut bench_ids = Vec::new();
    let cgroups: Vec<&PathBuf> = std::iter::once(&args.floor_cgroup)
        .chain(args.also_cgroup.as_ref())
        .collect();
    for name in programs::BENCH {
        for cgroup in &cgroups {
            links.push(
                runner
                    .attach_bench(name, cgroup)
                    .with_context(|| format!("attaching {name} to {}", cgroup.display()))?,
            );
        }
        bench_ids.push((name, runner.program_id(name)?));
    }
    // This process's own copy of the guard, configured as the agent is by default (but
    // exempt by default, so that it can never drop the unguarded cgroup's traffic), on the
    // floor's cgroup: the guard program with private maps, loaded and attached by us.
    let blocked = DEFAULT_BLOCKED
        .iter()
        .map(|c| parse_cidr(c))
        .collect::<Result<Vec<_>, _>>()?;
    runner.configure(
        &blocked,
        Mode::Enforce,
        Verdict::Exempt,
        &Default::default(),
    )?;
    for cgroup in &cgroups {
        links.push(runner.attach_bench(programs::EGRESS, cgroup)?);
    }
    let agent_maps_copy = match (&args.agent_maps, &args.also_cgroup) {
        (Some(maps), Some(cgroup)) => Some(attach_on_agent_maps(maps, cgroup)?),
        _ => None,
    };
    let agent_maps_id = agent_maps_copy.as_ref().map(|c| c.id);
    println!("{}", json!({ "ready": true }));
    for line in std::io::stdin().lock().lines() {
        line?;
        let (mut guard, mut copy, mut edge, mut on_agent_maps) = Default::default();
        let mut bench: Vec<(&str, Totals)> = bench_ids
            .iter()
            .map(|(n, _)| (*n, Totals::default()))
            .collect();
        for info in loaded_programs().filter_map(Result::ok) {
            let totals = if let Some(i) = bench_ids.iter().position(|(_, id)| *id == info.id()) {
                &mut bench[i].1
            } else if info.id() == own_guard {
                &mut copy
            } else if Some(info.id()) == agent_maps_id {
                &mut on_agent_maps
            } else if info.name_as_str() == Some(programs::EGRESS) {
                &mut guard
            } else if info.name_as_str() == Some(programs::EDGE) {
                &mut edge
            } else {
                continue;
            };
            totals.ns += info.run_time().as_nanos() as u64;
            totals.runs += info.run_count();
            totals.programs += 1;
        }
        let mut out = serde_json::Map::new();
        out.insert(programs::EGRESS.into(), guard.json());
        out.insert("dg_egress_copy".into(), copy.json());
        out.insert(programs::EDGE.into(), edge.json());
        out.insert("dg_egress_agent_maps".into(), on_agent_maps.json());
        for (name, t) in bench {
            out.insert(name.into(), t.json());
        }
        println!("{}", serde_json::Value::Object(out));
    }
    drop(links);
    drop(agent_maps_copy);
    Ok(())
}

/// The guard program loaded again over the agent's pinned maps and attached to `cgroup`.
struct AgentMapsCopy {
    id: u32,
    /// Detaches on drop; the object's fds close with `_ebpf` (the agent's pins stay).
    _link: aya::programs::links::FdLink,
    _ebpf: aya::Ebpf,
}

fn attach_on_agent_maps(maps: &Path, cgroup: &Path) -> Result<AgentMapsCopy> {
    use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(maps)
        .load(datalab_guard::bpf::object::OBJECT)
        .with_context(|| format!("loading the guard over the maps in {}", maps.display()))?;
    let prog: &mut CgroupSkb = ebpf
        .program_mut(programs::EGRESS)
        .context("no guard program in the object")?
        .try_into()?;
    prog.load().context("the verifier refused the guard")?;
    let file = std::fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
    let link = prog.attach(&file, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)?;
    let link = prog.take_link(link)?.try_into()?;
    let id = prog.info()?.id();
    Ok(AgentMapsCopy {
        id,
        _link: link,
        _ebpf: ebpf,
    })
}

impl Totals {
    fn json(&self) -> serde_json::Value {
        json!({ "ns": self.ns, "runs": self.runs, "programs": self.programs })
    }
}
