//! `datalab-guard controller`: its arguments and their checks. The config file, the
//! kubeconfig and the identity are validated here (bad input: one line, exit 2) before
//! [`crate::controller::serve`] contacts the API server.

use std::path::PathBuf;

use clap::Args;

use super::Shared;
use crate::{
    controller::{self, leader, Plan},
    input::bad_input,
};

/// Default metrics address of the controller: Prometheus scrapes the pod IP.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9090";

#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// Config file (the node agent's format; keys the controller does not use are accepted).
    /// SIGHUP reloads it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// kubeconfig file [default: $KUBECONFIG, ~/.kube/config, else in-cluster].
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Leader-election identity [default: $POD_NAME, else the hostname].
    #[arg(long, value_name = "NAME")]
    pub identity: Option<String>,
}

pub fn run(shared: &Shared, args: &ControllerArgs) -> anyhow::Result<()> {
    let plan = validate(shared, args)?;
    crate::runtime::build()?.block_on(controller::serve(plan))
}

fn validate(shared: &Shared, args: &ControllerArgs) -> anyhow::Result<Plan> {
    let identity = match &args.identity {
        Some(identity) if identity.trim().is_empty() => {
            return Err(bad_input("--identity must not be empty"));
        }
        Some(identity) => identity.trim().to_owned(),
        None => leader::default_identity(),
    };
    let (config_source, config) = super::load_config(args.config.as_deref(), shared)?;
    super::check_kubeconfig(args.kubeconfig.as_deref())?;
    let metrics_addr = match shared.metrics_addr {
        Some(addr) => addr,
        None => DEFAULT_METRICS_ADDR.parse().expect("valid default address"),
    };
    Ok(Plan {
        identity,
        config_source,
        config,
        metrics_addr,
        kubeconfig: args.kubeconfig.clone(),
    })
}
