//! The command line (DESIGN.md "Interfaces"). Parsing errors are clap's (exit 2); every
//! other check of the operator's input happens in the command before the kernel is touched.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{blocklist::Preset, local, node};

pub mod check;
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
    /// The mode to enforce when no config file says otherwise.
    pub fn mode_or_default(&self) -> ModeArg {
        self.mode.unwrap_or(ModeArg::Enforce)
    }

    /// Whether `--mode` was given (it then overrides the config file).
    pub fn mode_explicit(&self) -> bool {
        self.mode.is_some()
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The Kubernetes DaemonSet agent: guards the pods of environment namespaces on this node.
    Node(NodeArgs),
    /// Guard every process under a cgroup, without Kubernetes.
    Local(LocalArgs),
    /// Show what is enforced now, read from the pinned state.
    Status(StatusArgs),
    /// Preflight: kernel, BTF, cgroup v2, bpffs, capabilities.
    Check,
    /// Detach the programs and remove every pin this tool made.
    Uninstall,
}

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
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Config file (YAML; every key optional, unknown keys are errors). SIGHUP reloads it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// kubeconfig file [default: $KUBECONFIG, ~/.kube/config, else in-cluster].
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The pods' cgroup root (e.g. /sys/fs/cgroup/kubepods.slice) [default: detected].
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// Where the container runtime keeps pod network namespaces (the host's /run/netns,
    /// mounted read-only), for the CNI enforcement probe.
    #[arg(long, value_name = "DIR", default_value = "/run/netns")]
    pub netns_dir: PathBuf,
    /// Where the agent writes the per-namespace state `status` shows.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

/// The node agent's state file (policy, Pod Security and CNI state per environment).
pub const DEFAULT_STATE_FILE: &str = "/run/datalab-guard/state.json";

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// The node agent's state file (per environment namespace: NetworkPolicy, Pod Security,
    /// CNI enforcement); shown when present.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    Enforce,
    Audit,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.shared.log_format);
    match cli.command {
        Command::Node(args) => node::run(&cli.shared, &args),
        Command::Local(args) => local::run(&cli.shared, &args),
        Command::Status(args) => status::run(&cli.shared, args.output, &args.state_file),
        Command::Check => {
            let lines = check::run(&cli.shared.bpffs);
            if check::print(&lines) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("preflight failed"))
            }
        }
        Command::Uninstall => uninstall::run(&cli.shared.bpffs),
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter =
        EnvFilter::try_from_env("DATALAB_GUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // Ignore a second initialisation (tests call run() more than once).
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}
