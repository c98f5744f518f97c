//! `datalab-guard node`: its arguments and their checks. The config file, kubeconfig,
//! cgroup root and driver are all validated here (exit 2, nothing touched) before
//! [`crate::node::serve`] runs.

use std::path::{Path, PathBuf};

use clap::Args;

use super::Shared;
use crate::{
    bpf::lsm,
    cgroups::{self, pod, pod::CgroupDriver, CgroupDir},
    config::{Config, DEFAULT_STATE_DIR},
    input::bad_input,
    node::{self, cache, state_file::DEFAULT_STATE_FILE, Plan},
};

/// Default metrics address in node mode: Prometheus scrapes the pod IP.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9090";

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
    /// Where to look for the pods' root when it is detected: the host's cgroup v2 hierarchy
    /// as mounted in the agent's container [default: /host/sys/fs/cgroup if it is a cgroup
    /// v2 mount, then this process's own cgroup2 mount].
    #[arg(long, value_name = "DIR")]
    pub cgroup_mount: Option<PathBuf>,
    /// Where the container runtime keeps pod network namespaces (the host's /run/netns,
    /// mounted read-only), for the CNI enforcement probe.
    #[arg(long, value_name = "DIR", default_value = "/run/netns")]
    pub netns_dir: PathBuf,
    /// Where the agent writes what `status` shows (this boot's enforcement: a file under
    /// /run, not in the state directory).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// Where the agent keeps what it knows across restarts and reboots (its state cache)
    /// [default: the config's stateDir, else /var/lib/datalab-guard]. Named here or in the
    /// config, it must be usable or the agent does not start; the default is only warned
    /// about.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

pub fn run(shared: &Shared, args: &NodeArgs) -> anyhow::Result<()> {
    let plan = validate(shared, args)?;
    crate::runtime::build()?.block_on(node::serve(plan))
}

fn validate(shared: &Shared, args: &NodeArgs) -> anyhow::Result<Plan> {
    let node = args
        .node_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| bad_input("the node name is required: --node-name or NODE_NAME"))?;
    // It names the Node object the agent patches (startup taint): an object name, nothing
    // that could change the request path.
    datalab_guard_policy::selector::validate_dns1123_subdomain(&node)
        .map_err(|e| bad_input(format!("node name {node:?} {e}")))?;
    let (config_source, config) = super::load_config(args.config.as_deref(), shared)?;
    super::check_kubeconfig(args.kubeconfig.as_deref())?;
    let state_dir = resolve_state_dir(args.state_dir.as_deref(), &config)?;
    let (root, driver) = resolve_root(
        args.cgroup_root.as_deref(),
        args.cgroup_mount.as_deref(),
        &config,
    )?;
    let metrics_addr = match shared.metrics_addr {
        Some(addr) => addr,
        None => DEFAULT_METRICS_ADDR.parse().expect("valid default address"),
    };
    if config.deny_raw_sockets {
        lsm::require_bpf_lsm().map_err(|e| bad_input(format!("denyRawSockets: {e}")))?;
    }
    Ok(Plan {
        node,
        config_source,
        config,
        root,
        driver,
        bpffs: shared.bpffs.clone(),
        metrics_addr,
        kubeconfig: args.kubeconfig.clone(),
        own_pod_uid: std::env::var("POD_UID").ok().filter(|s| !s.is_empty()),
        netns_dir: args.netns_dir.clone(),
        state_file: args.state_file.clone(),
        state_dir,
    })
}

/// The state directory: `--state-dir`, else the config's `stateDir`, each of which must be
/// usable (bad input otherwise); else the default, where a problem only costs the cache.
fn resolve_state_dir(flag: Option<&Path>, config: &Config) -> anyhow::Result<Option<PathBuf>> {
    let (dir, explicit) = match flag.or(config.state_dir.as_deref()) {
        Some(dir) => (dir.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_STATE_DIR), false),
    };
    match cache::prepare_state_dir(&dir) {
        Ok(()) => Ok(Some(dir)),
        Err(e) if explicit => Err(bad_input(format!(
            "state directory {} is not usable: {e}",
            dir.display()
        ))),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "default state directory not usable; running without a state cache (a restart without the API server starts from the pinned verdicts only, a reboot from none)");
            Ok(None)
        }
    }
}

/// The pods' cgroup root: `--cgroup-root`, else the config's `cgroup.root`, else detected
/// (see [`search_mounts`]); and the driver: the config's `cgroup.driver`, else told from the
/// root's name.
fn resolve_root(
    flag: Option<&Path>,
    mount_flag: Option<&Path>,
    config: &Config,
) -> anyhow::Result<(CgroupDir, CgroupDriver)> {
    let path = match flag
        .map(Path::to_path_buf)
        .or_else(|| config.cgroup.root_path().map(Path::to_path_buf))
    {
        Some(path) => path,
        None => pod::detect_pods_root_in(&search_mounts(mount_flag)?).map_err(bad_input)?,
    };
    let root =
        cgroups::validate_cgroup_dir(&path).map_err(|e| bad_input(format!("cgroup root: {e}")))?;
    let driver = match config.cgroup.driver {
        Some(driver) => driver,
        None => pod::detect_driver(&root.path).ok_or_else(|| {
            bad_input(format!(
                "cannot tell the cgroup driver from {} (expected kubepods, kubepods.slice or *-kubepods.slice); set cgroup.driver",
                root.path.display()
            ))
        })?,
    };
    Ok((root, driver))
}

/// Where `cgroup.root: auto` looks: `--cgroup-mount` alone if given; else the host's
/// hierarchy where the DaemonSet mounts it ([`pod::HOST_CGROUP_MOUNT`], when that is a
/// cgroup v2 directory), then this process's own cgroup2 mount (a host install, the tests).
fn search_mounts(flag: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(dir) = flag {
        let dir = cgroups::validate_cgroup_dir(dir)
            .map_err(|e| bad_input(format!("--cgroup-mount: {e}")))?;
        return Ok(vec![dir.path]);
    }
    let mut mounts = Vec::new();
    if let Ok(host) = cgroups::validate_cgroup_dir(Path::new(pod::HOST_CGROUP_MOUNT)) {
        mounts.push(host.path);
    }
    mounts.push(cgroups::cgroup2_mount().map_err(bad_input)?);
    Ok(mounts)
}
