//! `datalab-guard local`: its arguments and their checks. Everything is validated here
//! (exit 2, kernel untouched) before [`crate::local::serve`] runs.

use std::path::PathBuf;

use clap::Args;
use datalab_guard_common::{Mode, TunnelConfig, Verdict};

use super::Shared;
use crate::{
    blocklist,
    bpf::{edge, lsm, DatapathSettings},
    cgroups,
    input::bad_input,
    local::{self, Plan},
};

/// Default metrics address in local mode: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9090";

#[derive(Args, Debug)]
pub struct LocalArgs {
    /// The cgroup (v2 directory) whose whole subtree is guarded.
    #[arg(long, value_name = "DIR")]
    pub cgroup: PathBuf,
    /// A sub-cgroup of --cgroup whose processes may reach blocked destinations (repeatable).
    #[arg(long, value_name = "DIR")]
    pub exempt: Vec<PathBuf>,
    /// Refuse AF_PACKET and SOCK_RAW sockets to guarded processes (cgroup_skb cannot see
    /// AF_PACKET traffic).
    #[arg(long)]
    pub deny_raw_sockets: bool,
    /// Audit events per guarded cgroup per second; further attempts are still counted.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub audit_rate: u32,
    /// The host side of a veth whose far side is a guarded sandbox (repeatable): its ingress
    /// gets the pod-edge program, which drops frames to blocked destinations whatever sent
    /// them (AF_PACKET, AF_XDP), also from processes outside --cgroup.
    #[arg(long = "edge-iface", value_name = "IFACE")]
    pub edge_ifaces: Vec<String>,
}

pub fn run(shared: &Shared, args: &LocalArgs) -> anyhow::Result<()> {
    let plan = validate(shared, args)?;
    crate::runtime::build()?.block_on(local::serve(plan))
}

fn validate(shared: &Shared, args: &LocalArgs) -> anyhow::Result<Plan> {
    let blocked = blocklist::build_blocklist(&shared.block, &shared.preset).map_err(bad_input)?;
    let root = cgroups::validate_cgroup_dir(&args.cgroup)
        .map_err(|e| bad_input(format!("--cgroup: {e}")))?;
    let mut exempt = Vec::new();
    for dir in &args.exempt {
        let sub =
            cgroups::validate_cgroup_dir(dir).map_err(|e| bad_input(format!("--exempt: {e}")))?;
        if !cgroups::is_within(&sub, &root) {
            return Err(bad_input(format!(
                "--exempt {} is not inside --cgroup {}",
                dir.display(),
                root.path.display()
            )));
        }
        exempt.push(sub.path);
    }
    for iface in &args.edge_ifaces {
        edge::check_edge_iface(iface).map_err(|e| bad_input(format!("--edge-iface: {e}")))?;
    }
    if args.deny_raw_sockets {
        lsm::require_bpf_lsm().map_err(|e| bad_input(format!("--deny-raw-sockets: {e}")))?;
    }
    let metrics_addr = match shared.metrics_addr {
        Some(addr) => addr,
        None => DEFAULT_METRICS_ADDR.parse().expect("valid default address"),
    };
    Ok(Plan {
        bpffs: shared.bpffs.clone(),
        root,
        exempt,
        blocked,
        settings: DatapathSettings {
            mode: shared.mode().unwrap_or(Mode::Enforce),
            unknown_cgroup_verdict: Verdict::Guard,
            deny_raw_sockets: args.deny_raw_sockets,
            audit_events_per_second: args.audit_rate,
            // Local mode has no config file: the default tunnel ports, `--deny-tunnels`.
            tunnels: TunnelConfig {
                deny_all: u32::from(shared.deny_tunnels),
                ..TunnelConfig::defaults()
            },
        },
        metrics_addr,
        edge_ifaces: args.edge_ifaces.clone(),
    })
}
