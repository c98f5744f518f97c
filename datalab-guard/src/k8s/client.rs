//! Building the API client: `--kubeconfig FILE`, else `$KUBECONFIG` / `~/.kube/config`, else
//! in-cluster (service account), exactly as kube-rs infers it. A kubeconfig that cannot be
//! read or understood is bad input (exit 2), reported in one line.

use std::path::Path;

use anyhow::Context as _;
use kube::{config::KubeConfigOptions, Client, Config};

use crate::input::bad_input;

/// The field manager and event reporter name used for every write.
pub const MANAGER: &str = "datalab-guard";

pub async fn connect(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| bad_input(format!("--kubeconfig {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| bad_input(format!("--kubeconfig {}: {e}", path.display())))?
        }
        None => Config::infer().await.map_err(|e| {
            bad_input(format!(
                "no Kubernetes configuration (in-cluster or kubeconfig): {e}"
            ))
        })?,
    };
    Client::try_from(config).context("cannot build the Kubernetes client")
}
