//! The CNI enforcement probe: does the CNI actually enforce the `allow-web-egress`
//! NetworkPolicy on this node? (DESIGN.md: "every node: CNI enforcement probe", the
//! `cni_enforcement{namespace, state}` metric.) This module owns the probe loop
//! ([`run_probe_loop`]) and its schedule; the parts live in:
//! - [`settings`]: what the loop is configured with ([`ProbeSettings`]) and the targets
//!   derived from the blocked set;
//! - [`netns`]: finding and entering network namespaces;
//! - [`attempt`]: the TCP handshakes from inside one namespace ([`probe_in_netns`]);
//! - [`classify`]: judging a namespace from the control's and the pod's outcomes;
//! - [`round`]: one round over all namespaces and writing its states.
//!
//! # What is probed
//! Every `probe.interval` (plus up to `probe.jitter`, so that nodes do not probe in
//! lockstep) the agent:
//! 1. connects from its **control** network namespace — its own, [`SELF_NETNS`] — to every
//!    target (the blocked destinations that are single addresses, on `probe.port`: see
//!    [`targets_from_blocked`]). If none connects, nothing below can be judged and every
//!    namespace is [`CniState::Inconclusive`] (IMDS unreachable from pods anyway, e.g. an
//!    IMDSv2 hop limit of 1, or no metadata service at all);
//! 2. for each environment namespace with a running pod on this node, enters that pod's
//!    network namespace and connects to the same targets. Only targets the control reached
//!    count. Any of them connected: [`CniState::NotEnforced`] (the CNI ignores the policy;
//!    the eBPF guard is the only line). All timed out or refused (ECONNREFUSED from a
//!    REJECT, EHOSTUNREACH/ENETUNREACH/EACCES/EPERM from a policy): [`CniState::Enforced`].
//!    A local failure of the probe itself (netns gone, socket error): inconclusive.
//!    The rules are [`classify()`], which is pure.
//!
//! A connect is a TCP handshake only (see [`attempt`]); all targets of one namespace are
//! probed in parallel, so one namespace costs at most one `probe.timeout`; up to
//! [`PARALLEL_NAMESPACES`] namespaces are probed at a time.
//!
//! The DaemonSet runs with `hostNetwork: false`, so the control namespace is the agent's own
//! *pod* network namespace: the same path to IMDS as a tenant pod's (pod interface → node →
//! metadata), minus the NetworkPolicy (the agent's namespace has none). That is a better
//! control than the host's namespace, whose path differs. Which privileges entering the
//! pods' namespaces takes, and why the DaemonSet uses the runtime's named namespaces, is in
//! [`netns`].
//!
//! # Reloads
//! The loop reads its [`ProbeSettings`] from a `watch` channel: a reloaded configuration
//! (SIGHUP) changes the interval, jitter, timeout, targets (blocked set and `probe.port`) and
//! `probe.enabled` from the next round on, and a new interval also reschedules a round that
//! is waiting. Settings that probe nothing (disabled, or no single-address target) make the
//! loop forget its results and wait for settings that do.
//!
//! # Why the guard does not see the probe as a tenant
//! The eBPF programs are attached at the pods' cgroup root (e.g. `kubepods.slice`), and the
//! agent's own pod lives below it — but its cgroup has an `Exempt` VERDICTS entry (the policy
//! core's own-pod rule). Changing the network namespace does not change the cgroup: on cgroup
//! v2 all threads of a process share the process's cgroup (unless moved into a threaded
//! subtree, which the agent never does). The connect hooks look at the calling task's
//! cgroup, and `cgroup_skb/egress` at the socket's, which is its creator's: both are the
//! agent's, so the guard passes the probe and what is measured is the CNI alone. Before the
//! agent has classified its own pod the default verdict (guard) applies: the control probe
//! then fails with EPERM and the round is inconclusive, never a false `not_enforced`.
//! The CNI, on the other hand, does see the probe as the pod's traffic: it leaves through the
//! pod's interface with the pod's address, which is what NetworkPolicy enforcement (iptables,
//! nftables or tc/eBPF on the pod's veth) keys on. A CNI that enforced egress policy by
//! socket cgroup instead would see the agent; none of the common ones does.
//!

pub mod attempt;
pub mod classify;
pub mod netns;
pub mod round;
pub mod settings;

use std::{
    collections::{hash_map::RandomState, BTreeMap},
    hash::{BuildHasher as _, Hasher as _},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use self::round::apply_round;
pub use self::{
    attempt::{probe_in_netns, ProbeOutcome, ProbeResult},
    classify::classify,
    netns::{netns_addresses, netns_of_cgroup},
    round::{probe_once, PARALLEL_NAMESPACES},
    settings::{targets_from_blocked, ProbeSettings},
};
use crate::baseline_state::{CniState, NamespaceStates};

/// The agent's own network namespace: the control of every round.
pub const SELF_NETNS: &str = "/proc/self/ns/net";

/// The probe task (spawn it on tokio; it runs until `shutdown` turns true or its sender is
/// dropped). It reads its settings from `settings` before every round and whenever they
/// change (see the module docs, "Reloads"); when the settings sender is dropped the last
/// settings stay.
///
/// Each round (the first after a random part of the jitter, the next `interval` plus a random
/// part of the jitter after the previous one ended) calls `list` on the blocking pool for the
/// (Kubernetes namespace, network namespace file) pairs of environment namespaces with a
/// running pod on this node, probes them ([`probe_once`], with `control_netns` —
/// [`SELF_NETNS`] in the agent — as the control), writes each state into `states` and calls
/// `on_change(namespace, old, new)` when it differs from the previous one (`old` is `None` on
/// the first result). A namespace no longer listed (no pod on this node any more), or every
/// namespace once the settings probe nothing, has its `cni` reset to `None`, without a
/// callback.
pub async fn run_probe_loop<L, C>(
    mut settings: watch::Receiver<ProbeSettings>,
    control_netns: PathBuf,
    list: L,
    states: NamespaceStates,
    mut on_change: C,
    mut shutdown: watch::Receiver<bool>,
) where
    L: Fn() -> Vec<(String, PathBuf)> + Send + Sync + 'static,
    C: FnMut(&str, Option<CniState>, CniState) + Send,
{
    let list = Arc::new(list);
    let mut current = settings.borrow_and_update().clone();
    log_settings(&current, None);
    // When the last round ended; `None` before the first one since probing (re)started.
    let mut last_round: Option<Instant> = None;
    let mut next = next_round_at(&current, last_round, Instant::now(), random_below);
    loop {
        tokio::select! {
            _ = wait_until(next) => {}
            new = settings_changed(&mut settings) => {
                if new == current {
                    continue;
                }
                log_settings(&new, Some(&current));
                if !new.probes() {
                    // Earlier results describe a probe that no longer runs: forget them, as
                    // if it had never run.
                    apply_round(&states, &BTreeMap::new(), &mut on_change);
                    last_round = None;
                }
                current = new;
                next = next_round_at(&current, last_round, Instant::now(), random_below);
                continue;
            }
            _ = shutdown_requested(&mut shutdown) => return,
        }
        let round = async {
            let lister = list.clone();
            let pods = tokio::task::spawn_blocking(move || lister())
                .await
                .unwrap_or_default();
            probe_once(&control_netns, &current.targets, current.timeout, pods).await
        };
        let results = tokio::select! {
            r = round => r,
            _ = shutdown_requested(&mut shutdown) => return,
        };
        apply_round(&states, &results, &mut on_change);
        last_round = Some(Instant::now());
        next = next_round_at(&current, last_round, Instant::now(), random_below);
    }
}

/// When the next round starts: `None` while `settings` probe nothing. Before the first round
/// (`last_round` is `None`: at start, or since probing was switched back on) `spread(jitter)`
/// after `now`; after a round, `interval + spread(jitter)` after it ended — also when the
/// settings changed in between, so a shorter interval can make the round due at once.
fn next_round_at(
    settings: &ProbeSettings,
    last_round: Option<Instant>,
    now: Instant,
    spread: impl FnOnce(Duration) -> Duration,
) -> Option<Instant> {
    if !settings.probes() {
        return None;
    }
    let jitter = spread(settings.jitter);
    Some(match last_round {
        None => now + jitter,
        Some(ended) => ended + settings.interval + jitter,
    })
}

/// Logs what the settings mean, at start (`old` is `None`) and when they change.
fn log_settings(new: &ProbeSettings, old: Option<&ProbeSettings>) {
    if !new.enabled {
        tracing::info!("CNI enforcement probe disabled (probe.enabled: false)");
    } else if new.targets.is_empty() {
        tracing::warn!(
            "CNI enforcement probe has no single-address blocked destination to probe; not running"
        );
    } else if old.is_some() {
        tracing::info!(
            interval = ?new.interval,
            jitter = ?new.jitter,
            timeout = ?new.timeout,
            targets = ?new.targets,
            "CNI enforcement probe settings changed"
        );
    }
}

/// Sleeps until `at`; never returns for `None`.
async fn wait_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves with the settings when they change; never once the sender is gone (the last
/// settings then stay in force).
async fn settings_changed(rx: &mut watch::Receiver<ProbeSettings>) -> ProbeSettings {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    rx.borrow_and_update().clone()
}

/// Resolves when shutdown is requested (the value turns true, or the sender is gone).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A uniformly spread duration in `[0, max)`; not cryptographic (std's per-process random
/// hash keys, fresh for every call).
fn random_below(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let random = RandomState::new().build_hasher().finish();
    Duration::from_nanos(random % nanos)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        net::SocketAddr,
        sync::{mpsc as std_mpsc, Mutex},
    };

    use tokio::sync::mpsc;

    use super::*;

    const V4: &str = "169.254.169.254:80";

    fn settings(enabled: bool, interval: Duration, targets: &[SocketAddr]) -> ProbeSettings {
        ProbeSettings {
            enabled,
            interval,
            jitter: Duration::ZERO,
            timeout: Duration::from_millis(500),
            targets: targets.to_vec(),
        }
    }

    #[test]
    fn random_delays_stay_below_the_bound_and_vary() {
        assert_eq!(random_below(Duration::ZERO), Duration::ZERO);
        let max = Duration::from_secs(30);
        let draws: BTreeSet<Duration> = (0..32).map(|_| random_below(max)).collect();
        assert!(draws.iter().all(|d| *d < max));
        assert!(draws.len() > 16, "{draws:?}");
    }

    #[test]
    fn rounds_are_scheduled_from_the_current_settings() {
        let target: SocketAddr = V4.parse().unwrap();
        let now = Instant::now();
        let minute = Duration::from_secs(60);
        let mut s = settings(true, minute, &[target]);
        s.jitter = Duration::from_secs(10);
        let spread = |jitter: Duration| jitter / 2;
        // The first round: the jitter's share alone.
        assert_eq!(
            next_round_at(&s, None, now, spread),
            Some(now + Duration::from_secs(5))
        );
        // After a round: from its end, interval plus the jitter's share.
        let ended = now - Duration::from_secs(20);
        assert_eq!(
            next_round_at(&s, Some(ended), now, spread),
            Some(ended + minute + Duration::from_secs(5))
        );
        // A reload to a shorter interval makes a round that ended long enough ago due now.
        s.interval = Duration::from_secs(1);
        let due = next_round_at(&s, Some(ended), now, spread).unwrap();
        assert!(due <= now, "{due:?} vs {now:?}");
        // Settings that probe nothing schedule nothing.
        assert_eq!(
            next_round_at(&settings(false, minute, &[target]), None, now, spread),
            None
        );
        assert_eq!(
            next_round_at(&settings(true, minute, &[]), Some(ended), now, spread),
            None
        );
    }

    /// A lister whose every call is reported on a channel and then held until the test
    /// releases it, so the test knows exactly when a round runs. Lists `pods`.
    #[expect(
        clippy::type_complexity,
        reason = "a test helper's one return value; an alias would only move the tuple"
    )]
    fn gated_lister(
        pods: Vec<(String, PathBuf)>,
    ) -> (
        impl Fn() -> Vec<(String, PathBuf)> + Send + Sync + 'static,
        mpsc::UnboundedReceiver<()>,
        std_mpsc::Sender<()>,
    ) {
        let (calls_tx, calls_rx) = mpsc::unbounded_channel();
        let (release_tx, release_rx) = std_mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let list = move || {
            let _ = calls_tx.send(());
            // Bounded, so a failing test cannot hang the blocking pool.
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(5));
            pods.clone()
        };
        (list, calls_rx, release_tx)
    }

    async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|| panic!("channel closed waiting for {what}"))
    }

    type Change = (String, Option<CniState>, CniState);

    fn recorder() -> (
        impl FnMut(&str, Option<CniState>, CniState) + Send,
        mpsc::UnboundedReceiver<Change>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let record = move |ns: &str, old: Option<CniState>, new: CniState| {
            let _ = tx.send((ns.to_owned(), old, new));
        };
        (record, rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_reaches_a_waiting_loop() {
        // No traffic at all: the control's namespace cannot be opened, so every round
        // judges the listed namespace inconclusive without a single connect.
        let target: SocketAddr = V4.parse().unwrap();
        let (list, mut calls, release) =
            gated_lister(vec![("lab".to_owned(), PathBuf::from("/nonexistent/pod"))]);
        let (record, mut changes) = recorder();
        let (settings_tx, settings_rx) =
            watch::channel(settings(false, Duration::from_secs(3600), &[target]));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let states = NamespaceStates::default();
        let task = tokio::spawn(run_probe_loop(
            settings_rx,
            PathBuf::from("/nonexistent/control"),
            list,
            states.clone(),
            record,
            shutdown_rx,
        ));

        // Started disabled; a reload enables it: the first round runs (jitter 0).
        settings_tx.send_modify(|s| s.enabled = true);
        next(&mut calls, "the first round after enabling").await;
        release.send(()).unwrap();
        assert_eq!(
            next(&mut changes, "the first result").await,
            ("lab".to_owned(), None, CniState::Inconclusive)
        );

        // The loop now waits an hour; a reload to 10 ms brings the next round at once.
        settings_tx.send_modify(|s| s.interval = Duration::from_millis(10));
        next(&mut calls, "a round at the reloaded interval").await;

        // Disabled while that round runs: the round finishes, then the loop forgets the
        // namespace's state and starts no further round.
        settings_tx.send_modify(|s| s.enabled = false);
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while states.snapshot().get("lab").and_then(|s| s.cni).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the state was not forgotten"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // At a 10 ms interval a loop that ignored the reload would list ~30 times here.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), calls.recv())
                .await
                .is_err(),
            "a disabled loop still runs rounds"
        );
        assert!(changes.try_recv().is_err(), "forgetting is not a change");

        shutdown_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("stops")
            .unwrap();
    }

    /// Accepts one connection on `listener` within 5 s (the probe's handshake, already
    /// closed by the probe).
    async fn accepted(listener: &tokio::net::TcpListener, what: &str) {
        tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .unwrap_or_else(|_| panic!("no probe connection to {what}"))
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_changes_the_probed_targets() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root (setns)");
            return;
        }
        // Loopback only, in our own namespace (control and "pod" alike): two listeners and a
        // port just closed.
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let second = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (first_addr, second_addr) = (first.local_addr().unwrap(), second.local_addr().unwrap());
        let (record, mut changes) = recorder();
        let (settings_tx, settings_rx) =
            watch::channel(settings(true, Duration::from_millis(50), &[first_addr]));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let pods = vec![("lab".to_owned(), PathBuf::from(SELF_NETNS))];
        let task = tokio::spawn(run_probe_loop(
            settings_rx,
            PathBuf::from(SELF_NETNS),
            move || pods.clone(),
            NamespaceStates::default(),
            record,
            shutdown_rx,
        ));
        let lab = |old, new| ("lab".to_owned(), old, new);

        // Both ends reach the first listener: not enforced.
        assert_eq!(
            next(&mut changes, "the first result").await,
            lab(None, CniState::NotEnforced)
        );
        accepted(&first, "the first target").await;
        // A reload to a closed port: the control reaches nothing, so inconclusive.
        settings_tx.send_modify(|s| s.targets = vec![closed]);
        assert_eq!(
            next(&mut changes, "the result for the closed port").await,
            lab(Some(CniState::NotEnforced), CniState::Inconclusive)
        );
        // A reload to the second listener: reached again, by the new target.
        settings_tx.send_modify(|s| s.targets = vec![second_addr]);
        assert_eq!(
            next(&mut changes, "the result for the second target").await,
            lab(Some(CniState::Inconclusive), CniState::NotEnforced)
        );
        accepted(&second, "the second target").await;

        shutdown_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_stops_waiting_and_disabled_loops() {
        let target: SocketAddr = V4.parse().unwrap();
        for probing in [true, false] {
            let (_settings_tx, settings_rx) =
                watch::channel(settings(probing, Duration::from_secs(3600), &[target]));
            let (shutdown_tx, shutdown_rx) = watch::channel(false);
            // Lists nothing, so even a round that starts probes nothing (no traffic leaves
            // this machine's namespace).
            let task = tokio::spawn(run_probe_loop(
                settings_rx,
                PathBuf::from(SELF_NETNS),
                Vec::new,
                NamespaceStates::default(),
                |_: &str, _, _| {},
                shutdown_rx,
            ));
            tokio::time::sleep(Duration::from_millis(50)).await;
            shutdown_tx.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .expect("stops")
                .unwrap();
        }
        // A dropped settings sender keeps the last settings; a dropped shutdown sender stops.
        let (settings_tx, settings_rx) =
            watch::channel(settings(true, Duration::from_secs(3600), &[target]));
        drop(settings_tx);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run_probe_loop(
            settings_rx,
            PathBuf::from(SELF_NETNS),
            Vec::new,
            NamespaceStates::default(),
            |_: &str, _, _| {},
            shutdown_rx,
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished(), "the loop outlives its settings sender");
        drop(shutdown_tx);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("stops")
            .unwrap();
    }
}
