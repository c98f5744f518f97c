//! `cargo xtask bench`: not implemented yet (another engineer owns it).

use anyhow::{bail, Result};

/// Options of `cargo xtask bench` (placeholder: everything after `bench` is collected).
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Arguments for the benchmark runner.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Runs the benchmarks.
pub fn run(_args: &BenchArgs) -> Result<()> {
    bail!("`cargo xtask bench` is not implemented yet")
}
