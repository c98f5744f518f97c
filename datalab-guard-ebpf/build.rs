use std::env;

use which::which;

/// Rebuild the eBPF object when bpf-linker changes (a linker upgrade changes the object) —
/// the same trick aya-template uses. A missing bpf-linker is reported by the link step.
fn main() {
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
