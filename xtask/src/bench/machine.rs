//! Facts about the machine and the tree a benchmark ran on: commit (and whether the tree
//! had uncommitted changes), kernel, CPU model, core count, load average before and after,
//! tool versions. Recorded in every file under `bench-results/` so a number can be traced
//! to what produced it.
//!
//! Self-contained (std and serde_json only): `xtask-bench-node`, a separate binary, includes
//! this file by path for the same record.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use serde_json::{json, Value};

/// Facts about the machine and the tree the numbers came from.
#[derive(Debug, Clone)]
pub struct Machine {
    pub date: String,
    pub commit: String,
    /// Tracked files differ from the commit.
    pub dirty: bool,
    pub kernel: String,
    pub nproc: usize,
    pub cpu: String,
    pub loadavg_start: String,
    pub loadavg_end: Option<String>,
    pub iperf3: String,
    pub nft: String,
}

fn first_line(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".to_string())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "?".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

impl Machine {
    pub fn collect() -> Machine {
        // The workspace root: xtask's parent directory.
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let git = |args: &[&str]| {
            let mut c = Command::new("git");
            // Read-only: no opportunistic index refresh (others work in this tree).
            c.args(args)
                .current_dir(&root)
                .env("GIT_OPTIONAL_LOCKS", "0");
            c
        };
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        Machine {
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
            commit: first_line(&mut git(&["rev-parse", "--short", "HEAD"])),
            dirty,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "?".into(), |s| s.trim().to_string()),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            loadavg_start: loadavg(),
            loadavg_end: None,
            iperf3: first_line(Command::new("iperf3").arg("--version")),
            nft: first_line(Command::new("nft").arg("--version")),
        }
    }

    pub fn finish(&mut self) {
        self.loadavg_end = Some(loadavg());
    }

    pub fn to_json(&self) -> Value {
        json!({
            "date": self.date,
            "commit": self.commit,
            "dirty": self.dirty,
            "kernel": self.kernel,
            "nproc": self.nproc,
            "cpu": self.cpu,
            "loadavg_start": self.loadavg_start,
            "loadavg_end": self.loadavg_end,
            "iperf3": self.iperf3,
            "nft": self.nft,
        })
    }
}
