//! `cargo xtask lint`: the one lint gate, run by `cargo xtask test` and so by CI.
//!
//! Steps, each printed as it runs and each fatal:
//! 1. rustfmt: `cargo fmt --all --check` (stable rustfmt; `rustfmt.toml` explains why the
//!    nightly-only import options are kept by hand).
//! 2. clippy on the host workspace, every target and feature, warnings denied. The lint
//!    levels live in the root `Cargo.toml`'s `[workspace.lints]`; exceptions in the code are
//!    `#[expect(lint, reason = "...")]`, never a bare `allow`.
//! 3. clippy on the eBPF crate for `bpfel-unknown-none` (it is not a host crate: a host
//!    clippy never sees it), with the toolchain that builds it (Debian's `rust-web-clippy`
//!    through the `debian-web` rustup link, or `$DATALAB_GUARD_BPF_TOOLCHAIN`).
//! 4. The policy core's purity: `datalab-guard-policy`'s normal dependency tree must not
//!    contain kube, k8s-openapi, aya or tokio (linkerd's `policy-controller/core` rule: the
//!    compiler, not a comment, keeps the core free of Kubernetes and the kernel).
//! 5. `cargo deny check licenses bans sources` with the checked-in `deny.toml`. Advisories
//!    need the RustSec database from GitHub, which our machines cannot reach; where it is
//!    reachable run `cargo deny check advisories` (README, "Linting").

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{
    setup::{self, BPF_TOOLCHAIN_ENV, DEBIAN_TOOLCHAIN},
    util::{self, cargo_cmd, run},
};

/// The eBPF crate, linted for its own target.
const EBPF_CRATE: &str = "datalab-guard-ebpf";
/// The pure policy core and what it must never depend on.
const POLICY_CRATE: &str = "datalab-guard-policy";
const IMPURE: &[&str] = &[
    "kube",
    "kube-client",
    "kube-runtime",
    "k8s-openapi",
    "aya",
    "tokio",
];

/// Runs every lint step; see the module docs.
pub fn run_all() -> Result<()> {
    run_all_but_deny()?;
    deny()?;
    println!("cargo xtask lint: all checks passed");
    Ok(())
}

/// What `cargo xtask test` runs first: every step but cargo-deny's, which it finishes at the
/// end ([`DeferredDeny::finish`]). Where cargo-deny still has to be built (a fresh
/// machine, CI: minutes of compiling), the build starts now in the background at the
/// lowest CPU priority, so that it takes the CPU the tests leave idle (most of their time is
/// spent waiting on agents, API fixtures and timeouts) instead of adding minutes of its own.
pub fn run_all_deferring_deny() -> Result<DeferredDeny> {
    run_all_but_deny()?;
    DeferredDeny::start()
}

fn run_all_but_deny() -> Result<()> {
    fmt()?;
    clippy_host()?;
    clippy_ebpf()?;
    policy_is_pure()
}

/// cargo-deny's step, started by [`run_all_deferring_deny`].
pub struct DeferredDeny {
    /// The background build and its log, while cargo-deny is being built.
    build: Option<(std::process::Child, std::path::PathBuf)>,
}

impl DeferredDeny {
    fn start() -> Result<DeferredDeny> {
        if setup::cargo_deny_present() {
            return Ok(DeferredDeny { build: None });
        }
        let log = util::workspace_root().join("target/cargo-deny-build.log");
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let install = setup::cargo_deny_install();
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "19"])
            .arg(install.get_program())
            .args(install.get_args())
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd.spawn().context("starting the cargo-deny build")?;
        println!(
            "lint: building cargo-deny in the background at the lowest CPU priority (log: {}); \
             its checks run after the tests",
            log.display()
        );
        Ok(DeferredDeny {
            build: Some((child, log)),
        })
    }

    /// Waits for the background build (if any), then runs cargo-deny's checks.
    pub fn finish(mut self) -> Result<()> {
        if let Some((mut child, log)) = self.build.take() {
            let status = child.wait().context("waiting for the cargo-deny build")?;
            if !status.success() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                bail!(
                    "building cargo-deny failed ({status}); the end of {}:\n{}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            println!("lint: cargo-deny built in the background");
        }
        deny()?;
        println!("cargo xtask lint: all checks passed");
        Ok(())
    }
}

impl Drop for DeferredDeny {
    /// A run that failed before [`DeferredDeny::finish`] stops the build it started.
    fn drop(&mut self) {
        if let Some((child, _)) = self.build.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn fmt() -> Result<()> {
    run(cargo_cmd().args(["fmt", "--all", "--check"]))
        .context("rustfmt: run `cargo fmt --all` and commit the result")
}

fn clippy_host() -> Result<()> {
    run(cargo_cmd().args([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--all-targets",
        "--all-features",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy (host workspace)")
}

/// The eBPF crate needs `-Z build-std=core`, hence the Debian toolchain (it ships
/// `rust-src`) and `RUSTC_BOOTSTRAP=1`, exactly as its build in `datalab-guard/build.rs`.
fn clippy_ebpf() -> Result<()> {
    let toolchain = std::env::var(BPF_TOOLCHAIN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| DEBIAN_TOOLCHAIN.to_owned());
    let target_dir = util::workspace_root().join("target").join("clippy-bpf");
    // Without rustup (only Debian's Rust, as `./x` installs it on a plain Debian 12) the
    // host cargo is already Debian's, which has rust-src: run it directly.
    let mut clippy = if setup::have_rustup() {
        let mut c = Command::new("rustup");
        c.args(["run", &toolchain, "cargo"]);
        c
    } else {
        Command::new("cargo")
    };
    run(clippy
        .args(["clippy", "--locked", "-p", EBPF_CRATE])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .args(["--", "-D", "warnings"])
        .current_dir(util::workspace_root())
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", target_dir)
        // rustup's proxies would otherwise pin the inner cargo to the outer toolchain.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC"))
    .context("clippy (eBPF crate, bpfel-unknown-none)")
}

fn policy_is_pure() -> Result<()> {
    let out = util::output(cargo_cmd().args([
        "tree",
        "--locked",
        "-p",
        POLICY_CRATE,
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]))?;
    if !out.status.success() {
        bail!(
            "`cargo tree -p {POLICY_CRATE}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let found = impure_dependencies(&tree);
    if !found.is_empty() {
        bail!(
            "{POLICY_CRATE} must stay pure (no Kubernetes, kernel or async runtime), but it \
             depends on {}",
            found.join(", ")
        );
    }
    println!(
        "lint: {POLICY_CRATE} depends on none of {}",
        IMPURE.join(", ")
    );
    Ok(())
}

/// The forbidden crates named in `cargo tree --prefix none --format {p}` output.
fn impure_dependencies(tree: &str) -> Vec<String> {
    let mut found: Vec<String> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| IMPURE.contains(name))
        .map(str::to_owned)
        .collect();
    found.sort();
    found.dedup();
    found
}

fn deny() -> Result<()> {
    setup::cargo_deny()?;
    run(cargo_cmd().args(["deny", "--locked", "check", "licenses", "bans", "sources"]))
        .context("cargo deny (deny.toml)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_forbidden_crates_in_tree_output() {
        let tree = "datalab-guard-policy v0.1.0 (/w/datalab-guard-policy)\n\
                    datalab-guard-common v0.1.0 (/w/datalab-guard-common)\n\
                    tokio v1.48.0\nkube-runtime v5.0.0\ntokio v1.48.0\n";
        assert_eq!(impure_dependencies(tree), ["kube-runtime", "tokio"]);
    }

    #[test]
    fn a_pure_tree_passes() {
        let tree = "datalab-guard-policy v0.1.0 (/w/datalab-guard-policy)\n\
                    datalab-guard-common v0.1.0 (/w/datalab-guard-common)\n\
                    aya-ebpf v0.2.1\n";
        assert!(impure_dependencies(tree).is_empty());
    }
}
