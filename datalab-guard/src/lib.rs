//! datalab-guard: keeps tenant workloads away from cloud instance metadata endpoints with
//! cgroup eBPF programs attached once at a cgroup root and driven by pinned maps.
//!
//! How data flows through the modules (see DESIGN.md):
//!
//! ```text
//! commands/      flags and config checked (bad input: exit 2), then one of:
//!   local        a cgroup and its exempt sub-cgroups ──────────────────────┐
//!   node/        k8s (API caches) → datalab_guard_policy (verdicts) → node::index        │
//!                (pods ↔ cgroups/ pod cgroups) ───────────────────────────┤
//!                                                                         ▼
//! bpf::session   verdict map + blocked set + config → kernel programs (bpf/)
//!                                                                         │
//! kernel         attempts → counters and the audit ring buffer ────────────┤
//!                                                                         ▼
//! audit          ring buffer → JSON lines (node::audit_sink: + pod, Events)
//! metrics, http  counters and health; node::state_file and status: on-call view
//! ```
//!
//! Beside the flow: `controller/` (the `controller` command: Lease election, provisioning of
//! allow-web-egress, Pod Security, bypass detection; the only writer of cluster state),
//! `blocklist` (CIDRs and presets), `config` (the config file of both commands),
//! `baseline_state` (each environment namespace's NetworkPolicy / Pod Security / CNI state,
//! shared by `controller::provision`, `probe` (the CNI enforcement probe), the metrics and the state file), `runtime`
//! (tokio and signals), `input` (what counts as bad input).

// Functions of at most ~120 lines (clippy.toml), checked by `cargo xtask lint`.
#![warn(clippy::too_many_lines)]

pub mod audit;
pub mod baseline_state;
pub mod blocklist;
pub mod bpf;
pub mod cgroups;
pub mod commands;
pub mod config;
pub mod controller;
pub mod cri;
pub mod http;
pub mod input;
pub mod k8s;
pub mod local;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod probe;
pub mod runtime;

/// Version reported by `--version` and the `build_info` metric.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
