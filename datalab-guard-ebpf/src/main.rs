//! datalab-guard eBPF programs. One file per attach point; `decide` holds the verdict,
//! counting and reporting they share; the destination classifier itself lives in
//! `datalab-guard-common` so the host tests exercise the same code.
//!
//! Built for the host (e.g. `cargo build --workspace`) it is an empty program, so workspace
//! wide commands work; only the bpfel build carries the programs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod bench_probes;
#[cfg(target_arch = "bpf")]
mod decide;
#[cfg(target_arch = "bpf")]
mod edge;
#[cfg(target_arch = "bpf")]
mod egress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mptcp;
#[cfg(target_arch = "bpf")]
mod packet_socket;
#[cfg(target_arch = "bpf")]
mod sock_addr;
#[cfg(target_arch = "bpf")]
mod sock_create;
#[cfg(target_arch = "bpf")]
mod stages;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
