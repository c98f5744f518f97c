//! datalab-guard: keeps tenant workloads away from cloud instance metadata endpoints with
//! cgroup eBPF programs attached once at a cgroup root and driven by pinned maps.
//!
//! Module map (see DESIGN.md): `bpf` loads, attaches, pins and reads the kernel side;
//! `blocklist` turns `--block`/`--preset` into CIDRs; `cgroups` knows the cgroup v2
//! filesystem; `audit` turns ring-buffer events into JSON lines; `metrics` and `http`
//! export counters and health; `check`, `status`, `uninstall` and `local` are the commands.

pub mod audit;
pub mod blocklist;
pub mod bpf;
pub mod cgroups;
pub mod cgroupwatch;
pub mod check;
pub mod cli;
pub mod cniprobe;
pub mod config;
pub mod cri;
pub mod http;
pub mod input;
pub mod k8s;
pub mod local;
pub mod metrics;
pub mod node;

pub mod podcgroup;
pub mod policy;
pub mod runtime;
pub mod status;
pub mod uninstall;

/// Version reported by `--version` and the `build_info` metric.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
