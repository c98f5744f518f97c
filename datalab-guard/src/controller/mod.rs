//! `datalab-guard controller`: the cluster-wide reconciler, run as a small Deployment
//! (2 replicas, its own ServiceAccount). It owns every write to cluster state besides the
//! nodes' Events and startup taint: exactly one replica, elected with a Lease ([`leader`]),
//! server-side applies `allow-web-egress`, repairs and removes it, checks (and optionally
//! sets) Pod Security labels, reports bypassing policies and emits the namespace Events
//! ([`provision`], [`psa`]); every replica keeps its caches and the per-namespace states
//! current, so `networkpolicy_state` ([`metrics`]) and `/readyz` mean the same on each.
//!
//! It guards nothing in the kernel, so waiting is always safe: without an API server it
//! keeps retrying (bounded backoff) and becomes ready when its caches are synced.
//! Leadership is the `datalab_guard_leader{identity}` gauge, not readiness.

pub mod leader;
pub mod metrics;
pub mod provision;
pub mod psa;
pub mod write_limit;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    baseline_state::NamespaceStates,
    config::{Config, ConfigSource},
    http::{self, HttpState},
    input::bad_input,
    k8s,
    runtime::{Hangup, Termination},
};

/// Everything `commands::controller` validated before the API server is contacted.
pub struct Plan {
    /// The leader-election identity (and Events' reporting instance).
    pub identity: String,
    pub config_source: ConfigSource,
    pub config: Config,
    pub metrics_addr: SocketAddr,
    pub kubeconfig: Option<PathBuf>,
}

const NOT_SYNCED: &str = "waiting for the first full list of namespaces and NetworkPolicies";

/// Runs until SIGTERM/SIGINT; a leader releases the Lease on the way out.
pub async fn serve(plan: Plan) -> anyhow::Result<()> {
    let mut hangup = Hangup::new()?;
    let mut termination = Termination::new()?;
    let listener = http::bind(plan.metrics_addr).await.map_err(bad_input)?;
    let client = k8s::connect(plan.kubeconfig.as_deref(), "controller").await?;
    for warning in plan.config.warnings() {
        tracing::warn!("{warning}");
    }
    tracing::info!(identity = %plan.identity, "controller starting; {NOT_SYNCED}");

    let states = NamespaceStates::default();
    let baseline = provision::spawn(client, &plan.config, &plan.identity, states.clone());
    let http_state = Arc::new(HttpState::with_registry(metrics::registry(
        &plan.identity,
        baseline.is_leader(),
        states,
        Arc::new(baseline.watch_samples()),
    )));
    http_state.set_ready(false, NOT_SYNCED);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(http::serve_listener(
        listener,
        http_state.clone(),
        shutdown_rx,
    ));
    let synced = baseline.synced();
    let ready = tokio::spawn(async move {
        synced.await;
        http_state.set_ready(true, "caches synced");
        tracing::info!("namespaces and NetworkPolicies listed; ready");
    });

    let config_source = plan.config_source;
    loop {
        tokio::select! {
            () = hangup.received() => reload(&config_source, &plan.config, &baseline),
            () = termination.terminated() => break,
        }
    }
    ready.abort();
    baseline.shutdown().await;
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    tracing::info!("controller stopped");
    Ok(())
}

/// SIGHUP: read the config again; a config that does not load is rejected and the previous
/// one stays in force. `leaderElection` is read once at start (a changed Lease would split
/// the election): a change there is reported, not applied.
fn reload(source: &ConfigSource, started_with: &Config, baseline: &provision::BaselineHandle) {
    let config = match source.load() {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "reloaded configuration rejected; keeping the previous one");
            return;
        }
    };
    if config.leader_election != started_with.leader_election {
        tracing::warn!(
            "leaderElection changed in the reloaded configuration: it applies at the next restart"
        );
    }
    baseline.reload(&config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    tracing::info!("configuration reloaded (SIGHUP)");
}
