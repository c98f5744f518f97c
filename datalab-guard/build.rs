//! Builds the eBPF programs from source (datalab-guard-ebpf) with aya-build, so a plain
//! `cargo build` produces an agent with its programs embedded.
//!
//! The eBPF target needs `-Z build-std=core`, hence a toolchain with the `rust-src`
//! component. `DATALAB_GUARD_BPF_TOOLCHAIN` names it (e.g. a rustup nightly with rust-src);
//! the default is `debian-web`, Debian's rustc-web linked into rustup by `cargo xtask setup`.
//! RUSTC_BOOTSTRAP=1 lets that stable compiler accept `-Z build-std`.

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=DATALAB_GUARD_BPF_TOOLCHAIN");
    let toolchain =
        std::env::var("DATALAB_GUARD_BPF_TOOLCHAIN").unwrap_or_else(|_| "debian-web".to_owned());
    // Only this build script's children see it (the eBPF cargo invocation).
    std::env::set_var("RUSTC_BOOTSTRAP", "1");

    let metadata = cargo_metadata_root()?;
    let ebpf_dir = format!("{metadata}/datalab-guard-ebpf");
    aya_build::build_ebpf(
        [Package { name: "datalab-guard-ebpf", root_dir: &ebpf_dir, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building the eBPF programs with toolchain `{toolchain}` failed; run `cargo xtask setup` \
             (installs bpf-linker and links Debian's rustc-web as `debian-web`) or set \
             DATALAB_GUARD_BPF_TOOLCHAIN to a toolchain with rust-src"
        )
    })
}

/// The workspace root: this crate's parent directory.
fn cargo_metadata_root() -> anyhow::Result<String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("{manifest} has no parent"))?;
    Ok(root.display().to_string())
}
