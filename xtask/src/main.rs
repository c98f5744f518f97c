//! `cargo xtask <command>`: the project's developer tasks (aliased in .cargo/config.toml).
//!
//! - `setup`: install the eBPF toolchain and test tools (TOOLCHAIN.md's recipe), idempotently.
//! - `test`:  setup, then build and run every test as root; fails on any skipped test.
//! - `demo`:  local mode end to end in a sandboxed network lab.
//! - `bench`: benchmarks.
//! - `verifier`: record (or `--check`) each eBPF program's verified instruction count.
//! - `manifests`: render and check the kustomize manifests under deploy/.
//! - `api-calls`: check the API calls the last test run observed against deploy/api-calls.yaml.
//! - `image`: build the release image from the Containerfile without a registry (OCI archive).
//! - `lint`:  rustfmt, clippy (host and eBPF), the policy core's purity, cargo-deny.
//! - `fuzz`:  the classifier fuzz target for a bounded time (nightly, cargo-fuzz).
//! - `fresh-machine`: the README's setup and a smoke test in a fresh Debian 12 root.
//! - `vm`:    the tests that need Debian 12's 6.1 kernel (BPF LSM), in a QEMU VM.

mod api_calls;
mod artifacts;
mod bench;
mod demo;
mod fresh_machine;
mod fuzz;
mod image;
mod lint;
mod manifests;
mod setup;
mod test;
mod util;
mod vm;
mod vm_image;
mod vm_markers;
mod vm_qemu;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "datalab-guard developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain (Debian Rust + rust-src, LLVM 22, bpf-linker) and the test
    /// tools. Idempotent. (bpffs is not mounted: tests use private mounts.)
    Setup,
    /// Run setup, build, and run all tests (needs root; skipped tests fail the run).
    Test(test::TestArgs),
    /// Demonstrate `datalab-guard local` in a sandboxed network lab (needs root).
    Demo(demo::DemoArgs),
    /// Run the benchmarks.
    Bench(bench::BenchArgs),
    /// Record each eBPF program's verified instruction count in bench-results/verifier.md,
    /// or with --check fail when one grew more than 20 % over that record (needs root).
    Verifier(bench::verifier::VerifierArgs),
    /// Render deploy/ (base, components, overlays) and validate it: schemas, RBAC against
    /// deploy/api-calls.yaml, the DaemonSet's security settings.
    Manifests,
    /// Check the API calls the last `cargo xtask test` observed (target/api-calls-observed/)
    /// against deploy/api-calls.yaml, both ways (`test` does this after the tests).
    ApiCalls,
    /// rustfmt check, clippy with warnings denied (host workspace and the eBPF crate),
    /// the policy core's dependency purity, and cargo-deny (licences, bans, sources).
    Lint,
    /// Fuzz the destination classifier against its oracle for --seconds (nightly toolchain;
    /// installs cargo-fuzz if missing).
    Fuzz(fuzz::FuzzArgs),
    /// Build the release image from the Containerfile with buildah and local Debian base
    /// images (no registry, no daemon); saves target/image/datalab-guard-<version>.oci.tar.
    Image(image::ImageArgs),
    /// Follow the README as a newcomer in a fresh Debian 12 root (debootstrap, chroot in a
    /// private mount namespace): clone, `./x demo`, a smoke test run (needs root; CI).
    FreshMachine(fresh_machine::FreshMachineArgs),
    /// Run the tests that need another kernel in a QEMU VM with Debian 12's 6.1 kernel and
    /// its BPF LSM: the raw-socket refusals, `check`, the denyRawSockets reload, and the
    /// datapath end to end (needs root; `./x test` runs it after the host tests).
    Vm(vm::VmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Setup => setup::run_all(),
        Cmd::Test(args) => test::run(args),
        Cmd::Demo(args) => demo::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Verifier(args) => bench::verifier::run(args),
        Cmd::Manifests => manifests::run_all(),
        Cmd::ApiCalls => api_calls::check(true),
        Cmd::Lint => lint::run_all(),
        Cmd::Fuzz(args) => fuzz::run_args(args),
        Cmd::Image(args) => image::run_image(args),
        Cmd::FreshMachine(args) => fresh_machine::run(args),
        Cmd::Vm(args) => vm::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
