//! The datapath's cost under real traffic, xtask side: drives `xtask-bench-progstats`
//! (`progstats_helper.rs`), which holds the kernel's per-program run statistics on, attaches
//! the do-nothing `cgroup_skb` program to the unguarded cgroup and reports cumulative run time
//! and run count of it and of the agent's guard program on request. Sampling around each
//! iperf3 run gives the mean ns per run of the program that judged exactly that run's packets.
//!
//! With statistics on, the kernel times every run (two clock reads around each): the same
//! overhead lands on both programs, so their difference is the guard's own cost.

use std::{
    io::{BufRead as _, BufReader, Lines, Write as _},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

/// The helper binary (built by `testrun::build_all`).
pub const HELPER: &str = "xtask-bench-progstats";

/// Which program's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// The guard's `cgroup_skb` egress program, as the running agent attached it.
    Guard,
    /// The do-nothing `cgroup_skb` program on the unguarded cgroup.
    Floor,
    /// The fast path's CONFIG read alone, on the unguarded cgroup.
    ConfigProbe,
    /// The fast path's packet read alone, on the unguarded cgroup.
    PacketProbe,
    /// The guard's whole fast path alone, on the unguarded cgroup.
    FastPathProbe,
    /// The whole guard program again, loaded by the bench with private maps, on the
    /// unguarded cgroup.
    GuardCopy,
    /// The pod-edge program on the veth's host side (loaded only during `edge` runs).
    Edge,
    /// The whole guard program again, loaded by the bench over the agent's pinned maps, on
    /// the guarded cgroup (only with `--probes-on-guarded`).
    GuardOnAgentMaps,
}

impl Program {
    pub const ALL: [Program; 8] = [
        Program::Guard,
        Program::Floor,
        Program::ConfigProbe,
        Program::PacketProbe,
        Program::FastPathProbe,
        Program::GuardCopy,
        Program::Edge,
        Program::GuardOnAgentMaps,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Program::Guard => "guard",
            Program::Floor => "floor",
            Program::ConfigProbe => "config_probe",
            Program::PacketProbe => "packet_probe",
            Program::FastPathProbe => "fast_path_probe",
            Program::GuardCopy => "guard_copy",
            Program::Edge => "edge",
            Program::GuardOnAgentMaps => "guard_on_agent_maps",
        }
    }

    /// The kernel program's name (the helper's JSON keys).
    fn kernel_name(self) -> &'static str {
        match self {
            Program::Guard => "dg_egress",
            Program::Floor => "dg_bench_empty",
            Program::ConfigProbe => "dg_bench_config",
            Program::PacketProbe => "dg_bench_packet",
            Program::FastPathProbe => "dg_bench_fast",
            Program::GuardCopy => "dg_egress_copy",
            Program::Edge => "dg_edge",
            Program::GuardOnAgentMaps => "dg_egress_agent_maps",
        }
    }
}

/// Cumulative statistics of one program at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub ns: u64,
    pub runs: u64,
}

/// Every program's statistics at one moment, in [`Program::ALL`] order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot([Totals; 8]);

/// What one program cost over an interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub program: Program,
    pub ns_per_run: f64,
    pub runs: u64,
}

impl Snapshot {
    fn get(&self, program: Program) -> Totals {
        self.0[program as usize]
    }

    /// `program`'s mean ns per run between `before` and `self`; `None` when it did not run.
    pub fn cost_since(&self, before: &Snapshot, program: Program) -> Option<Cost> {
        let (a, b) = (before.get(program), self.get(program));
        let runs = b.runs.checked_sub(a.runs)?;
        let ns = b.ns.checked_sub(a.ns)?;
        (runs > 0).then(|| Cost {
            program,
            ns_per_run: ns as f64 / runs as f64,
            runs,
        })
    }
}

/// The running helper; detached and reaped on drop.
pub struct ProgStats {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ProgStats {
    /// Starts the helper with the floor program on `floor_cgroup`; its maps are pinned under
    /// `bpffs` (which must not exist yet) until it exits.
    /// With `also`, the bench programs go on that cgroup too (see `--probes-on-guarded`).
    /// With `agent_maps` (the agent's pinned maps directory) as well, a second instance of
    /// the guard over those maps goes on `also` too.
    pub fn start(
        helper: &Path,
        floor_cgroup: &Path,
        also: Option<&Path>,
        agent_maps: Option<&Path>,
        bpffs: &Path,
    ) -> Result<ProgStats> {
        let mut cmd = Command::new(helper);
        if let Some(also) = also {
            cmd.arg("--also-cgroup").arg(also);
            if let Some(maps) = agent_maps {
                cmd.arg("--agent-maps").arg(maps);
            }
        }
        let mut child = cmd
            .arg("--floor-cgroup")
            .arg(floor_cgroup)
            .arg("--bpffs")
            .arg(bpffs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", helper.display()))?;
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut stats = ProgStats {
            child,
            stdin,
            lines,
        };
        let ready = stats.read_line()?;
        if ready["ready"] != true {
            bail!("{HELPER} did not report ready: {ready}");
        }
        Ok(stats)
    }

    /// Both programs' cumulative statistics now.
    pub fn sample(&mut self) -> Result<Snapshot> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{HELPER} closed"))?;
        stdin.write_all(b"sample\n")?;
        stdin.flush()?;
        let v = self.read_line()?;
        parse_snapshot(&v)
    }

    fn read_line(&mut self) -> Result<Value> {
        let line = self
            .lines
            .next()
            .ok_or_else(|| anyhow!("{HELPER} exited (see its error above)"))??;
        serde_json::from_str(&line).with_context(|| format!("{HELPER} printed {line:?}"))
    }
}

impl Drop for ProgStats {
    fn drop(&mut self) {
        // End of input: the helper detaches the floor and removes its pins.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_snapshot(v: &Value) -> Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    for program in Program::ALL {
        let key = program.kernel_name();
        let t = &v[key];
        // The edge program is loaded only while an `edge` run goes on, the copy on the
        // agent's maps only with `--probes-on-guarded`: none is no cost.
        let optional = matches!(program, Program::Edge | Program::GuardOnAgentMaps);
        if optional && t["programs"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        if t["programs"].as_u64() == Some(0) {
            bail!("{HELPER}: no {key} program is loaded: {v}");
        }
        snapshot.0[program as usize] = Totals {
            ns: t["ns"]
                .as_u64()
                .ok_or_else(|| anyhow!("no {key}.ns in {v}"))?,
            runs: t["runs"]
                .as_u64()
                .ok_or_else(|| anyhow!("no {key}.runs in {v}"))?,
        };
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc(guard: (u64, u64), floor: (u64, u64)) -> Value {
        let t = |(ns, runs): (u64, u64)| json!({"ns": ns, "runs": runs, "programs": 1});
        json!({"dg_egress": t(guard), "dg_bench_empty": t(floor),
               "dg_bench_config": t((0, 0)), "dg_bench_packet": t((0, 0)),
               "dg_bench_fast": t((0, 0)), "dg_egress_copy": t((0, 0))})
    }

    #[test]
    fn cost_is_the_mean_over_the_interval() {
        let before = parse_snapshot(&doc((1_000, 10), (500, 10))).unwrap();
        let after = parse_snapshot(&doc((31_000, 1_010), (500, 10))).unwrap();
        let c = after.cost_since(&before, Program::Guard).unwrap();
        assert_eq!((c.ns_per_run, c.runs), (30.0, 1_000));
        // The floor did not run in that interval: no cost rather than 0 ns.
        assert_eq!(after.cost_since(&before, Program::Floor), None);
        // Counters never go back; if they do (a reloaded program), no cost either.
        assert_eq!(before.cost_since(&after, Program::Guard), None);
        // No edge program loaded (absent or none): no cost, not an error.
        assert_eq!(after.cost_since(&before, Program::Edge), None);
        let mut v = doc((0, 0), (0, 0));
        v["dg_edge"] = json!({"ns": 4_000, "runs": 100, "programs": 1});
        let with_edge = parse_snapshot(&v).unwrap();
        let c = with_edge.cost_since(&before, Program::Edge).unwrap();
        assert_eq!((c.ns_per_run, c.runs), (40.0, 100));
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let mut v = doc((0, 0), (0, 0));
        v["dg_egress"]["programs"] = json!(0);
        assert!(parse_snapshot(&v)
            .unwrap_err()
            .to_string()
            .contains("no dg_egress"));
        let mut v = doc((0, 0), (0, 0));
        v.as_object_mut().unwrap().remove("dg_bench_packet");
        assert!(parse_snapshot(&v).is_err());
    }
}
