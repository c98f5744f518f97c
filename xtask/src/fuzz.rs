//! `cargo xtask fuzz [--seconds N]`: runs the classifier fuzz target (`fuzz/`, cargo-fuzz and
//! libFuzzer with AddressSanitizer) for a bounded time, as CI does.
//!
//! Needs a nightly toolchain (cargo-fuzz builds with `-Z sanitizer=address`; the stable and
//! Debian toolchains cannot) whose rust-std carries the ASan runtime, a C++ compiler (libFuzzer
//! is built from source by `libfuzzer-sys`), and `cargo-fuzz`, which this command installs
//! from crates.io at a pinned version when it is missing. The toolchain is `nightly` unless
//! `DATALAB_GUARD_FUZZ_TOOLCHAIN` names another. A crash or a broken invariant fails the
//! command and leaves the input in `fuzz/artifacts/classify/`.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{self, cargo_cmd};

/// The cargo-fuzz release the command installs (MSRV-free, builds with stable cargo).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The only fuzz target: the destination classifier against its oracle.
const TARGET: &str = "classify";
/// Environment variable naming the nightly toolchain to fuzz with.
pub const TOOLCHAIN_ENV: &str = "DATALAB_GUARD_FUZZ_TOOLCHAIN";

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Fuzzing time in seconds (after the build).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: u64,
}

/// Runs `cargo xtask fuzz`.
pub fn run_args(args: &FuzzArgs) -> Result<()> {
    run(args.seconds)
}

/// Builds the fuzz target and fuzzes for `seconds` (what CI calls, with ~60).
pub fn run(seconds: u64) -> Result<()> {
    let toolchain = std::env::var(TOOLCHAIN_ENV).unwrap_or_else(|_| "nightly".into());
    require_toolchain(&toolchain)?;
    if !util::have_cargo_subcommand("fuzz") {
        println!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        util::run(cargo_cmd().args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))
        .context("installing cargo-fuzz")?;
    }
    let root = util::workspace_root();
    // `cargo +toolchain fuzz`: rustup's proxy picks the toolchain for cargo-fuzz's builds.
    // From the workspace root cargo-fuzz finds `fuzz/` (its own workspace; corpus and
    // artifacts are ignored by git).
    let corpus = root.join("fuzz/corpus").join(TARGET);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .arg(format!("+{toolchain}"))
        .args(["fuzz", "run", TARGET])
        // The working corpus first (new inputs are written there), then the kept findings,
        // so every earlier finding is replayed before fuzzing starts.
        .arg(&corpus)
        .arg(root.join("fuzz/regressions").join(TARGET))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // Keep the log short: a status line every 10 s, not on every new coverage point.
        .args(["-print_final_stats=1", "-verbosity=0"])
        // The cargo that launched xtask points RUSTUP_TOOLCHAIN at stable: let `+` decide.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    util::run(&mut cmd).with_context(|| {
        format!(
            "fuzz target {TARGET} failed (a crashing input is saved under \
             fuzz/artifacts/{TARGET}/; replay it with `cargo +{toolchain} fuzz run {TARGET} \
             <file>` in fuzz/)"
        )
    })?;
    println!("fuzz: {TARGET} ran {seconds} s without a failure");
    Ok(())
}

/// Fails with what to do when the fuzzing toolchain is missing.
fn require_toolchain(toolchain: &str) -> Result<()> {
    let ok = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--version"])
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "cargo xtask fuzz needs the Rust toolchain {toolchain:?} (nightly: cargo-fuzz builds \
             with -Z sanitizer=address): install it with `rustup toolchain install nightly`, or \
             set {TOOLCHAIN_ENV} to an installed nightly"
        );
    }
    Ok(())
}
