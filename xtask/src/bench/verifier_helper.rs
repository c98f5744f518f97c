//! `xtask-verifier`: the kernel half of `cargo xtask verifier`, as a binary of its own
//! (feature `bench-testrun`, like `xtask-bench-testrun`: it loads the real eBPF object through
//! the agent's library).
//!
//! Loads every program of the object (maps pinned under `--bpffs`, removed at exit; nothing
//! attached) and prints one JSON document: per program, the instructions the verifier
//! processed, or why the kernel gave no count.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Parser;
use datalab_guard::bpf::testrun::verified_instruction_counts;
use serde_json::json;

/// Loads the eBPF object and prints each program's verified instruction count as JSON.
#[derive(Debug, Parser)]
struct Args {
    /// A bpffs path that does not exist yet; the maps are pinned there and removed at exit.
    #[arg(long)]
    bpffs: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let programs = verified_instruction_counts(&args.bpffs).context("loading the eBPF object")?;
    let programs: Vec<_> = programs
        .into_iter()
        .map(|p| match p.verified {
            Ok(n) => json!({ "name": p.name, "verified_insns": n }),
            Err(why) => json!({ "name": p.name, "refused": why }),
        })
        .collect();
    println!("{}", json!({ "programs": programs }));
    Ok(())
}
