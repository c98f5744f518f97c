//! Building the API client: `--kubeconfig FILE`, else `$KUBECONFIG` / `~/.kube/config`, else
//! in-cluster (service account), exactly as kube-rs infers it. A kubeconfig that cannot be
//! read or understood is bad input (exit 2), reported in one line. Each process says which
//! it is in its `User-Agent` (`datalab-guard-node/<version>`,
//! `datalab-guard-controller/<version>`), so API server audit logs tell the two identities'
//! requests apart even before looking at the ServiceAccount.

use std::path::Path;

use anyhow::Context as _;
// axum's `http` is the `http` crate kube's Config takes headers from.
use axum::http::{header::USER_AGENT, HeaderValue};
use kube::{config::KubeConfigOptions, Client, Config};

use crate::input::bad_input;

/// The field manager and event reporter name used for every write.
pub const MANAGER: &str = "datalab-guard";

/// The client of `component` (`node` or `controller`: the user agent's name).
pub async fn connect(kubeconfig: Option<&Path>, component: &str) -> anyhow::Result<Client> {
    let mut config = match kubeconfig {
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
    // kube-rs retries 429/503/504 inside a request, up to 15 times with a backoff growing to
    // minutes. Our loops own retries instead (informer, controller writes, lease, taint):
    // they honour Retry-After (`retry`), keep the node's staleness bound of a few seconds,
    // and must see a 504 "Too large resource version" at once to relist.
    config.default_retry = false;
    let agent = format!("datalab-guard-{component}/{}", crate::VERSION);
    if let Ok(value) = HeaderValue::from_str(&agent) {
        config.headers.push((USER_AGENT, value));
    }
    Client::try_from(config).context("cannot build the Kubernetes client")
}
