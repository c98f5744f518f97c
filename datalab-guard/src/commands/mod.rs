//! The command line (DESIGN.md "Interfaces"): the options every command shares, and one
//! module per command that owns its arguments, checks them (bad input: exit code 2, before
//! the kernel is touched) and runs. Parsing errors are clap's (exit 2); `main` dispatches.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use datalab_guard_common::Mode;

use crate::blocklist::Preset;

pub mod check;
pub mod controller;
pub mod local;
pub mod node;
pub mod status;
pub mod uninstall;

/// Default bpffs directory holding the pinned maps and links.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/datalab-guard";

#[derive(Parser, Debug)]
#[command(
    name = "datalab-guard",
    version,
    about = "Keeps tenant workloads away from cloud instance metadata endpoints (cgroup eBPF)",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub shared: Shared,
}

/// Options every command accepts (before or after the command name).
#[derive(Args, Debug, Clone)]
pub struct Shared {
    /// Block this destination CIDR too (repeatable). 169.254.169.254/32 and
    /// fd00:ec2::254/128 are always blocked.
    #[arg(long = "block", value_name = "CIDR", global = true)]
    pub block: Vec<String>,
    /// Add the metadata endpoints of a cloud (repeatable).
    #[arg(long = "preset", value_enum, global = true)]
    pub preset: Vec<Preset>,
    /// enforce: drop and refuse; audit: let through, count and report [default: enforce,
    /// or the config file's `mode` in node mode].
    #[arg(long, value_enum, global = true)]
    pub mode: Option<ModeArg>,
    /// Drop every encapsulated packet (VXLAN, Geneve, Teredo, IPIP, 6in4, GRE) from guarded
    /// processes, not only those whose inner destination is blocked [node mode: sets the
    /// config file's `tunnels.denyAll`].
    #[arg(long, global = true)]
    pub deny_tunnels: bool,
    /// Address for /metrics, /healthz, /readyz [default: 127.0.0.1:9090 in local mode,
    /// 0.0.0.0:9090 in node mode].
    #[arg(long, value_name = "ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, value_name = "DIR", env = "DATALAB_GUARD_BPFFS", default_value = DEFAULT_BPFFS, global = true)]
    pub bpffs: PathBuf,
    /// Operational log format (stderr). Audit records are always JSON lines on stdout.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

impl Shared {
    /// `--mode`, when given (in node mode it overrides the config file).
    pub fn mode(&self) -> Option<Mode> {
        self.mode.map(Mode::from)
    }
}

/// The config file plus the shared `--block`/`--preset`/`--mode` flags, loaded once as bad
/// input (exit 2) on any problem; the source is kept for SIGHUP reloads.
pub(crate) fn load_config(
    path: Option<&std::path::Path>,
    shared: &Shared,
) -> anyhow::Result<(crate::config::ConfigSource, crate::config::Config)> {
    let source = crate::config::ConfigSource {
        path: path.map(std::path::Path::to_path_buf),
        blocks: shared.block.clone(),
        presets: shared.preset.clone(),
        mode: shared.mode(),
        deny_tunnels: shared.deny_tunnels,
    };
    let config = source
        .load()
        .map_err(|e| crate::input::bad_input(format!("{e:#}")))?;
    Ok((source, config))
}

/// Parses `--kubeconfig` now: a broken kubeconfig is bad input, found before anything runs.
pub(crate) fn check_kubeconfig(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    if let Some(path) = path {
        kube::config::Kubeconfig::read_from(path).map_err(|e| {
            crate::input::bad_input(format!("--kubeconfig {}: {e}", path.display()))
        })?;
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The Kubernetes DaemonSet agent: guards the pods of environment namespaces on this node.
    Node(node::NodeArgs),
    /// The cluster-wide reconciler (a Deployment): provisions and repairs allow-web-egress,
    /// checks Pod Security, reports bypassing policies; leader-elected with a Lease.
    Controller(controller::ControllerArgs),
    /// Guard every process under a cgroup, without Kubernetes.
    Local(local::LocalArgs),
    /// Show what is enforced now, read from the pinned state.
    Status(status::StatusArgs),
    /// Preflight: kernel, BTF, cgroup v2, bpffs, capabilities.
    Check,
    /// Detach the programs and remove every pin this tool made.
    Uninstall,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    Enforce,
    Audit,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Mode {
        match mode {
            ModeArg::Enforce => Mode::Enforce,
            ModeArg::Audit => Mode::Audit,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Operational logs on stderr, filtered by `DATALAB_GUARD_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::{fmt, EnvFilter};
    // kube-rs logs every failed request at ERROR without context ("failed with error client
    // error (Connect)"): during an outage that is a line per retry. Our own retry loops say
    // it once per failure streak, with the cause; DATALAB_GUARD_LOG can bring them back.
    let filter = EnvFilter::try_from_env("DATALAB_GUARD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second initialisation (a test that runs two commands) keeps the first.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}
