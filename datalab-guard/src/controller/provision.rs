//! The cluster-wide baseline under the datapath: the `allow-web-egress` NetworkPolicy in
//! every environment namespace, Pod Security Admission labels, and other policies that
//! reopen metadata — verified by every controller replica, written by the elected leader only.
//!
//! The controller runs [`spawn`]: a leader-election candidate ([`super::leader`]), caches of
//! namespaces (metadata only: labels are all it reads) and NetworkPolicies fed by the shared
//! list-and-watch loop ([`crate::k8s::informer`]), and one reconcile loop that fills
//! [`NamespaceStates`] for each environment namespace (`policy`: ok | missing | drifted |
//! repaired | bypassed, `bypassed_by`, `psa`), so `networkpolicy_state` means the same on
//! every replica. Only while this replica holds the Lease does the loop write, and it stops
//! mid-reconcile when it loses it:
//! - server-side apply (field manager `datalab-guard`, forced) of the desired policy
//!   ([`desired`]) where it is missing or has drifted — deleted, edited, fields taken over by
//!   another manager. A first creation is *provisioning* (log line); putting back a policy
//!   that was there before is a *repair*: state `repaired` (held for [`REPAIRED_HOLD`] so a
//!   scrape sees it), a log line and a Warning Event `NetworkPolicyRepaired` on the namespace.
//!   A change of the desired policy itself (blocked set, dual-stack) is an update, not a repair.
//!   Repairs that keep being undone (a GitOps tool fighting us) back off exponentially;
//! - deletion of our policy from namespaces that stopped being environments
//!   (`removeWhenNotEnvironment`), only when it carries our label *and* our field manager;
//!   nothing else is ever deleted or edited, other policies in the namespace included;
//! - `PodSecurityTooWeak` Events (once per change of the label) and, with
//!   `podSecurity.setLabel`, an apply of the two labels we own on the namespace;
//! - `MetadataBypassPolicy` Events (once per change of the offending set) for tenant policies
//!   that reopen a blocked destination ([`holepunch`] finds them); they are reported, never
//!   touched.
//!
//! Events on namespaces go through [`NamespaceEvents`] (one per-process budget). The entry
//! point is [`spawn`], wired by [`super::serve`].

pub mod desired;
mod holepunch;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use datalab_guard_common::cidr::Cidr;
use datalab_guard_policy::PolicyConfig;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, ObjectReference},
    networking::v1::NetworkPolicy,
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    core::PartialObjectMeta,
    runtime::reflector::{self, Store},
    Api, Client,
};
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};

pub use self::desired::{desired_policy, is_ours, observe, Observed, MANAGED_BY_LABEL};
use super::{
    leader::{Elector, LeaseSettings},
    psa,
    write_limit::WriteLimiter,
};
use crate::{
    baseline_state::{NamespaceStates, PolicyState, PsaState},
    config::{Config, DualStack, NetworkPolicyConfig, PodSecurityConfig},
    k8s::{
        client::MANAGER,
        convert::{namespace_info, slim_namespace},
        events::{EventBudget, NamespaceEvents},
        informer::{Informer, WatchStats},
        retry,
        store::SlimWriter,
    },
    metrics::WatchSample,
};

/// A namespace as the controller caches it: metadata only.
type NamespaceMeta = PartialObjectMeta<Namespace>;

/// How long a repaired policy keeps the state `repaired` once it is right again, so that
/// the `networkpolicy_state` metric shows the repair to a Prometheus scraping every minute.
pub const REPAIRED_HOLD: Duration = Duration::from_secs(120);

/// Full re-check even without any change seen (missed events, backoffs ending).
const RESYNC: Duration = Duration::from_secs(30);

/// How often `dualStack: auto` looks at the Nodes again.
const DUAL_STACK_REFRESH: Duration = Duration::from_secs(300);

/// After a write, how long to wait for the watch to show it before judging again.
const WRITE_SETTLE: Duration = Duration::from_secs(5);

/// How long [`BaselineHandle::shutdown`] may take (stop writing, release the Lease).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// The part of the config this module follows (replaced on reload).
#[derive(Clone, Debug)]
struct Settings {
    policy: PolicyConfig,
    network_policy: NetworkPolicyConfig,
    pod_security: PodSecurityConfig,
    blocked: Vec<Cidr>,
}

impl Settings {
    fn new(config: &Config) -> Settings {
        Settings {
            policy: config.policy_config(None),
            network_policy: config.network_policy.clone(),
            pod_security: config.pod_security.clone(),
            blocked: config.blocklist(),
        }
    }
}

/// The controller's two caches and their watches' health.
#[derive(Clone)]
struct Caches {
    namespaces: Store<NamespaceMeta>,
    policies: Store<NetworkPolicy>,
    namespace_stats: Arc<WatchStats>,
    policy_stats: Arc<WatchStats>,
    /// `true` once both initial lists are complete. One task waits on the stores and sets it:
    /// several waiters on one kube-runtime store's readiness were seen not all to wake.
    synced: watch::Receiver<bool>,
}

impl Caches {
    /// Resolves once both initial lists are complete.
    async fn synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|s| *s).await;
    }
}

/// The running baseline controller of one replica.
/// Dropping it without [`BaselineHandle::shutdown`] stops everything at once, without
/// releasing the Lease (it then expires by itself).
pub struct BaselineHandle {
    elector: Option<Elector>,
    caches: Caches,
    settings: watch::Sender<Arc<Settings>>,
    /// Every write but the Lease waits for it (`controller.writesPerSecond`).
    writes: Arc<WriteLimiter>,
    stop: watch::Sender<bool>,
    /// The reconcile loop (stops at `stop`).
    reconciler: Option<JoinHandle<()>>,
    /// The list-and-watch loops (aborted).
    watchers: Vec<JoinHandle<()>>,
}

/// Starts leader election (as `identity`), the namespace and NetworkPolicy caches and the
/// reconcile loop on the current tokio runtime; returns at once.
///
/// `states` is shared with the metrics: this module writes the `policy`, `bypassed_by` and
/// `psa` fields of environment namespaces and drops the namespaces that are no longer
/// environments. Namespace Events spend from a budget of `audit.eventsPerMinutePerNode` a
/// minute (the same size as each node's).
pub fn spawn(
    client: Client,
    config: &Config,
    identity: &str,
    states: NamespaceStates,
) -> BaselineHandle {
    let elector = Elector::spawn(
        client.clone(),
        LeaseSettings::from_config(&config.leader_election, identity),
    );
    let (settings_tx, settings_rx) = watch::channel(Arc::new(Settings::new(config)));
    let (stop, stop_rx) = watch::channel(false);
    let changed = Arc::new(Notify::new());

    let (namespaces, ns_writer) = reflector::store::<NamespaceMeta>();
    let (policies, np_writer) = reflector::store::<NetworkPolicy>();
    let (synced_tx, synced) = watch::channel(false);
    let caches = Caches {
        namespaces: namespaces.clone(),
        policies: policies.clone(),
        namespace_stats: Arc::default(),
        policy_stats: Arc::default(),
        synced,
    };
    let watchers = vec![
        tokio::spawn(async move {
            let _ = namespaces.wait_until_ready().await;
            let _ = policies.wait_until_ready().await;
            synced_tx.send_replace(true);
        }),
        tokio::spawn(
            Informer::new(
                "namespaces",
                Api::<NamespaceMeta>::all(client.clone()),
                None,
                SlimWriter::new(ns_writer, slim_namespace),
                caches.namespace_stats.clone(),
                changed.clone(),
            )
            .failure_note("nothing is written until it answers")
            .run(),
        ),
        // Every policy, not only ours: other policies can reopen metadata. managedFields stay
        // (ownership is part of drift); the last-applied annotation can be large and goes.
        tokio::spawn(
            Informer::new(
                "networkpolicies",
                Api::<NetworkPolicy>::all(client.clone()),
                None,
                SlimWriter::new(np_writer, |np| np.metadata.annotations = None),
                caches.policy_stats.clone(),
                changed.clone(),
            )
            .failure_note("nothing is written until it answers")
            .run(),
        ),
    ];

    let budget = EventBudget::per_minute(config.audit.events_per_minute_per_node);
    let writes = Arc::new(WriteLimiter::new(&config.controller));
    let reconciler = Reconciler {
        writes: writes.clone(),
        events: NamespaceEvents::new(client.clone(), identity.to_owned(), budget),
        client,
        states,
        caches: caches.clone(),
        memory: BTreeMap::new(),
        dual_stack: None,
    };
    let reconciler = tokio::spawn(run(
        reconciler,
        settings_rx,
        elector.subscribe(),
        changed,
        stop_rx,
    ));
    BaselineHandle {
        elector: Some(elector),
        caches,
        settings: settings_tx,
        writes,
        stop,
        reconciler: Some(reconciler),
        watchers,
    }
}

impl BaselineHandle {
    /// `true` while this replica is the leader (the one that writes).
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.elector
            .as_ref()
            .expect("running until shutdown")
            .subscribe()
    }

    /// A future that resolves once the namespace and NetworkPolicy caches hold a complete
    /// list (readiness); it does not borrow the handle.
    pub fn synced(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let caches = self.caches.clone();
        async move { caches.synced().await }
    }

    /// The health of the two watches at each call, for the metrics.
    pub fn watch_samples(&self) -> impl Fn() -> Vec<WatchSample> + Send + Sync + 'static {
        let (namespaces, policies) = (
            self.caches.namespace_stats.clone(),
            self.caches.policy_stats.clone(),
        );
        move || {
            vec![
                WatchSample::of("namespaces", &namespaces),
                WatchSample::of("networkpolicies", &policies),
            ]
        }
    }

    /// Follows a reloaded config (environments, networkPolicy, podSecurity, blocked set). The
    /// `leaderElection` settings are read once at start.
    pub fn reload(&self, config: &Config) {
        self.settings.send_replace(Arc::new(Settings::new(config)));
        self.writes.set(&config.controller);
    }

    /// Stops all writes, then releases the Lease so a standby takes over at once.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(reconciler) = self.reconciler.take() {
            let abort = reconciler.abort_handle();
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, reconciler)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        for watcher in &self.watchers {
            watcher.abort();
        }
        if let Some(elector) = self.elector.take() {
            elector.shutdown(SHUTDOWN_TIMEOUT).await;
        }
    }
}

impl Drop for BaselineHandle {
    fn drop(&mut self) {
        if let Some(reconciler) = &self.reconciler {
            reconciler.abort();
        }
        for watcher in &self.watchers {
            watcher.abort();
        }
    }
}

/// Logs, once per distinct problem, that `namespace`'s `policy` is not as configured and is
/// not repaired here: report-only (`networkPolicy.manage` false), or not the leader (then
/// quietly: the leader reports).
fn report_unrepaired(
    mem: &mut Memory,
    leading: bool,
    (namespace, policy): (&str, &str),
    observed: &Observed,
) {
    if mem.logged.as_ref() == Some(observed) {
        return;
    }
    let what = describe(observed);
    if leading {
        tracing::warn!(namespace, policy, problem = %what, "NetworkPolicy not as configured (networkPolicy.manage is false: not repaired)");
    } else {
        tracing::debug!(namespace, policy, problem = %what, "NetworkPolicy not as configured; the leader repairs it");
    }
    mem.logged = Some(observed.clone());
}

/// What the loop remembers about one environment namespace.
#[derive(Default)]
struct Memory {
    /// Our policy has been seen (or written) here: its absence is then a deletion.
    seen: bool,
    /// A write the watch has not shown yet: (resourceVersion written, give up waiting at).
    pending: Option<(u64, Instant)>,
    /// The state decided at the last write, kept while the write is pending.
    pending_state: Option<PolicyState>,
    repaired_at: Option<Instant>,
    last_repair: Option<Instant>,
    repair_streak: u32,
    next_repair: Option<Instant>,
    /// Last policy problem logged, so each is logged once.
    logged: Option<Observed>,
    /// PSA weakness last reported with an Event (leader only).
    reported_psa: Option<PsaState>,
    psa_pending_until: Option<Instant>,
    /// Bypassing policies last reported with an Event (leader only).
    reported_bypass: Vec<String>,
}

impl Memory {
    /// Records a repair made at `now`. Repairs less than a minute apart form a streak; from
    /// the third on, the next repair waits (1 s doubling, at most 5 min), so that a fight
    /// with another controller over the object does not become a write storm. Returns that
    /// wait when one starts.
    fn note_repair(&mut self, now: Instant) -> Option<Duration> {
        self.repaired_at = Some(now);
        self.repair_streak = if self
            .last_repair
            .is_some_and(|t| now - t < Duration::from_secs(60))
        {
            self.repair_streak + 1
        } else {
            0
        };
        self.last_repair = Some(now);
        if self.repair_streak < 3 {
            return None;
        }
        let delay =
            Duration::from_secs(1 << (self.repair_streak - 3).min(8)).min(Duration::from_secs(300));
        self.next_repair = Some(now + delay);
        Some(delay)
    }
}

struct Reconciler {
    client: Client,
    /// Taken before every write (policy, namespace labels, Events).
    writes: Arc<WriteLimiter>,
    events: NamespaceEvents,
    states: NamespaceStates,
    caches: Caches,
    memory: BTreeMap<String, Memory>,
    /// `dualStack: auto`: (IPv6 seen on the Nodes, when looked).
    dual_stack: Option<(bool, Instant)>,
}

async fn run(
    mut r: Reconciler,
    mut settings: watch::Receiver<Arc<Settings>>,
    mut leader: watch::Receiver<bool>,
    changed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let caches = r.caches.clone();
    tokio::select! {
        () = caches.synced() => {},
        _ = stop.changed() => return,
    }
    tracing::info!(
        "baseline: namespaces and NetworkPolicies listed; verifying environment namespaces"
    );
    loop {
        let s = settings.borrow_and_update().clone();
        let leading = *leader.borrow_and_update();
        let wake: Option<Duration> = tokio::select! {
            w = r.reconcile(&s, leading) => w,
            // Leader duties stop the moment leadership is lost.
            _ = leader.wait_for(|l| !*l), if leading => {
                tracing::info!("baseline: no longer the leader; writes stopped");
                // Look again at once, read-only, so the states stay current.
                Some(Duration::ZERO)
            },
            _ = stop.changed() => return,
        };
        let next = tokio::time::Instant::now() + wake.map_or(RESYNC, |w: Duration| w.min(RESYNC));
        tokio::select! {
            _ = changed.notified() => {},
            _ = leader.changed() => {},
            _ = settings.changed() => {},
            _ = tokio::time::sleep_until(next) => {},
            _ = stop.changed() => return,
        }
    }
}

/// Where the namespace's policies stand, for the state and the reports.
struct PolicyOutcome {
    state: PolicyState,
    bypassed_by: Vec<String>,
}

impl Reconciler {
    /// One pass over every namespace. Returns how soon to look again (backoffs, pending
    /// writes), if sooner than the resync.
    async fn reconcile(&mut self, s: &Settings, leading: bool) -> Option<Duration> {
        let dual = self.dual_stack(s).await;
        // Shared with the cache, not copied: 20 000 policies per pass add up.
        let mut by_namespace: BTreeMap<String, Vec<Arc<NetworkPolicy>>> = BTreeMap::new();
        for p in self.caches.policies.state() {
            if let Some(ns) = p.metadata.namespace.clone() {
                by_namespace.entry(ns).or_default().push(p);
            }
        }
        let mut environments = BTreeSet::new();
        let mut wake: Option<Duration> = None;
        let mut soon = |d: Duration| wake = Some(wake.map_or(d, |w: Duration| w.min(d)));
        for ns in self.caches.namespaces.state() {
            let Some(info) = namespace_info(&ns.metadata) else {
                continue;
            };
            let terminating = ns.metadata.deletion_timestamp.is_some();
            let policies = by_namespace.remove(&info.name).unwrap_or_default();
            if !s.policy.is_environment(&info) {
                self.memory.remove(&info.name);
                let np = &s.network_policy;
                if leading && np.manage && np.remove_when_not_environment && !terminating {
                    if let Some(ours) = policies
                        .iter()
                        .find(|p| p.metadata.name.as_deref() == Some(np.name.as_str()))
                    {
                        self.remove(s, &info.name, ours).await;
                    }
                }
                continue;
            }
            environments.insert(info.name.clone());
            let outcome = self
                .reconcile_policy(s, &ns, &policies, dual, leading, terminating, &mut soon)
                .await;
            let psa_state = self.reconcile_psa(s, &ns, leading, terminating).await;
            self.states.update(&info.name, |st| {
                st.policy = Some(outcome.state);
                st.bypassed_by = outcome.bypassed_by;
                st.psa = Some(psa_state);
            });
        }
        self.memory.retain(|ns, _| environments.contains(ns));
        self.states.retain(|ns| environments.contains(ns));
        wake
    }

    /// `dualStack` resolved; `auto` looks at the Nodes now and then.
    async fn dual_stack(&mut self, s: &Settings) -> bool {
        match s.network_policy.dual_stack {
            DualStack::Enabled => true,
            DualStack::Disabled => false,
            DualStack::Auto => {
                if self
                    .dual_stack
                    .is_none_or(|(_, at)| at.elapsed() >= DUAL_STACK_REFRESH)
                {
                    let previous = self.dual_stack.map(|(d, _)| d);
                    let found = match cluster_has_ipv6(&self.client).await {
                        Ok(found) => found,
                        Err(e) => {
                            tracing::warn!(error = %e, "dualStack auto: cannot list Nodes; keeping {}", if previous == Some(true) { "dual-stack" } else { "IPv4 only" });
                            previous.unwrap_or(false)
                        }
                    };
                    if previous != Some(found) {
                        tracing::info!(
                            dual_stack = found,
                            "dualStack auto: {}",
                            if found {
                                "the Nodes have IPv6: policies carry the IPv6 rule"
                            } else {
                                "no IPv6 on the Nodes: IPv4 rule only"
                            }
                        );
                    }
                    self.dual_stack = Some((found, Instant::now()));
                }
                self.dual_stack.is_some_and(|(d, _)| d)
            }
        }
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one namespace's inputs, each used once; a struct would only rename them"
    )]
    async fn reconcile_policy(
        &mut self,
        s: &Settings,
        ns: &NamespaceMeta,
        policies: &[Arc<NetworkPolicy>],
        dual: bool,
        leading: bool,
        terminating: bool,
        soon: &mut impl FnMut(Duration),
    ) -> PolicyOutcome {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let np = &s.network_policy;
        let desired = desired_policy(&name, &np.name, &s.blocked, dual);
        let live = policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(np.name.as_str()))
            .map(|p| &**p);
        let observed = observe(live, &desired, np.manage);
        let now = Instant::now();
        let mem = self.memory.entry(name.clone()).or_default();

        let mut state = match observed {
            Observed::Ok => PolicyState::Ok,
            Observed::Missing => PolicyState::Missing,
            Observed::Drifted(_) => PolicyState::Drifted,
        };
        if live.is_some() {
            mem.seen = true;
        }
        // Our own write not visible yet: judge it when it is.
        let pending = mem.pending.filter(|(rv, until)| {
            now < *until
                && live
                    .and_then(resource_version)
                    .is_none_or(|have| have < *rv)
        });
        if pending.is_some() {
            state = mem.pending_state.unwrap_or(state);
        } else {
            mem.pending = None;
            mem.pending_state = None;
            if observed == Observed::Ok {
                mem.logged = None;
            } else {
                // What we applied under an earlier configuration (blocked set, dual-stack)?
                let ours_before = np.manage && observed.is_our_own_change();
                if leading && np.manage && !terminating {
                    if mem.next_repair.is_some_and(|t| now < t) {
                        soon(mem.next_repair.map_or(RESYNC, |t| t - now));
                    } else if !fresh_environment(&self.client, &name, &s.policy, soon)
                        .await
                        .is_some_and(|fresh| fresh)
                    {
                        // Not an environment any more (the cache lagged), or unreadable.
                    } else {
                        self.writes.acquire().await;
                        match apply_policy(&self.client, &name, &np.name, &desired).await {
                            Ok(written) => {
                                mem.pending =
                                    resource_version(&written).map(|rv| (rv, now + WRITE_SETTLE));
                                soon(WRITE_SETTLE);
                                state = if ours_before {
                                    tracing::info!(namespace = %name, policy = %np.name, "NetworkPolicy updated to the current configuration");
                                    PolicyState::Ok
                                } else if !mem.seen && observed == Observed::Missing {
                                    tracing::info!(namespace = %name, policy = %np.name, "NetworkPolicy provisioned");
                                    PolicyState::Ok
                                } else {
                                    let what = describe(&observed);
                                    tracing::warn!(namespace = %name, policy = %np.name, drift = %what, "NetworkPolicy repaired");
                                    if let Some(delay) = mem.note_repair(now) {
                                        tracing::warn!(namespace = %name, policy = %np.name, streak = mem.repair_streak, "NetworkPolicy keeps being changed back; next repair in {delay:?} at the earliest (another controller fighting over it?)");
                                    }
                                    let note = format!(
                                        "datalab-guard restored NetworkPolicy {}: {what}",
                                        np.name
                                    );
                                    publish(
                                        (&self.events, &self.writes),
                                        ns,
                                        ("NetworkPolicyRepaired", "RepairNetworkPolicy"),
                                        note,
                                        Some(policy_reference(&written)),
                                    )
                                    .await;
                                    PolicyState::Repaired
                                };
                                mem.seen = true;
                                mem.pending_state = Some(state);
                                mem.logged = None;
                            }
                            Err(e) => {
                                // Not sooner than the server asked (429 Retry-After), even
                                // if a watch event wakes the loop before.
                                let delay = retry::delay_after(&e, Duration::from_secs(2));
                                tracing::warn!(namespace = %name, policy = %np.name, error = %e, "cannot apply the NetworkPolicy; retrying in {delay:?}");
                                mem.next_repair = Some(now + delay);
                                soon(delay);
                            }
                        }
                    }
                } else if terminating {
                    // Being deleted: its content (our policy too) goes first; neither a
                    // repair (the create would be 403) nor a problem to report.
                } else if !ours_before {
                    report_unrepaired(mem, leading, (&name, &np.name), &observed);
                }
            }
        }
        if state == PolicyState::Ok && mem.repaired_at.is_some_and(|t| now - t < REPAIRED_HOLD) {
            state = PolicyState::Repaired;
            soon(REPAIRED_HOLD.saturating_sub(now - mem.repaired_at.unwrap_or(now)));
        }

        // Other policies reopening a blocked destination.
        let (bypassed_by, details) = bypasses(policies, &s.blocked, &np.name);
        if !bypassed_by.is_empty() && matches!(state, PolicyState::Ok | PolicyState::Repaired) {
            state = PolicyState::Bypassed;
        }
        if leading && mem.reported_bypass != bypassed_by {
            if !bypassed_by.is_empty() {
                let list = bypassed_by.join(", ");
                let rules = details.join("; ");
                tracing::warn!(namespace = %name, policies = %list, rules = %rules, "NetworkPolicy reopens a blocked metadata destination (left in place)");
                let note = format!("NetworkPolicy {list} reopens a blocked metadata destination ({rules}); datalab-guard still blocks it on the nodes");
                publish(
                    (&self.events, &self.writes),
                    ns,
                    ("MetadataBypassPolicy", "DetectBypass"),
                    note,
                    None,
                )
                .await;
            }
            mem.reported_bypass = bypassed_by.clone();
        }
        PolicyOutcome { state, bypassed_by }
    }

    async fn reconcile_psa(
        &mut self,
        s: &Settings,
        ns: &NamespaceMeta,
        leading: bool,
        terminating: bool,
    ) -> PsaState {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let required = s.pod_security.level;
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        let state = psa::check(&labels, required);
        let mem = self.memory.entry(name.clone()).or_default();
        if state.sufficient {
            mem.reported_psa = None;
            mem.psa_pending_until = None;
            return state;
        }
        if !leading {
            return state;
        }
        if mem.reported_psa.as_ref() != Some(&state) {
            let what = psa::describe_weakness(&state, required);
            let fix = if s.pod_security.set_label {
                "; setting it"
            } else {
                ""
            };
            tracing::warn!(namespace = %name, enforce = state.enforce.as_deref().unwrap_or("(none)"), required = required.as_str(), "Pod Security too weak: {what}{fix}");
            publish(
                (&self.events, &self.writes),
                ns,
                ("PodSecurityTooWeak", "CheckPodSecurity"),
                format!("{what}{fix}"),
                None,
            )
            .await;
            mem.reported_psa = Some(state.clone());
        }
        let due = mem.psa_pending_until.is_none_or(|t| Instant::now() >= t);
        if s.pod_security.set_label && !terminating && due && self.psa_still_weak(s, &name).await {
            let mem = self.memory.entry(name.clone()).or_default();
            let api: Api<Namespace> = Api::all(self.client.clone());
            let body = psa::label_apply_body(&name, required);
            self.writes.acquire().await;
            match api
                .patch(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(namespace = %name, level = required.as_str(), "Pod Security enforce label set");
                    mem.psa_pending_until = Some(Instant::now() + WRITE_SETTLE);
                }
                Err(e) => {
                    let delay = retry::delay_after(&e, Duration::from_secs(2));
                    tracing::warn!(namespace = %name, error = %e, "cannot set the Pod Security label; retrying in {delay:?}");
                    mem.psa_pending_until = Some(Instant::now() + delay);
                }
            }
        }
        state
    }

    /// Re-read from the API server (not the cache): still an environment whose enforce label
    /// is too weak?
    async fn psa_still_weak(&self, s: &Settings, name: &str) -> bool {
        match Api::<Namespace>::all(self.client.clone())
            .get_metadata_opt(name)
            .await
        {
            Ok(Some(fresh)) => {
                let labels = fresh.metadata.labels.clone().unwrap_or_default();
                fresh.metadata.deletion_timestamp.is_none()
                    && namespace_info(&fresh.metadata).is_some_and(|i| s.policy.is_environment(&i))
                    && !psa::check(&labels, s.pod_security.level).sufficient
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(namespace = name, error = %e, "cannot read the namespace before labelling it; retrying");
                false
            }
        }
    }

    /// Deletes our policy from a namespace that is no longer an environment — only if it is
    /// ours (label and field manager), only the version we looked at, and only when the API
    /// server (not just the cache) says the namespace is not an environment.
    async fn remove(&self, s: &Settings, namespace: &str, policy: &NetworkPolicy) {
        let name = policy.metadata.name.clone().unwrap_or_default();
        if !is_ours(policy) {
            tracing::debug!(namespace, policy = %name, "not an environment, but this policy is not ours: left alone");
            return;
        }
        if fresh_environment(&self.client, namespace, &s.policy, &mut |_| {}).await != Some(false) {
            return;
        }
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), namespace);
        let params = DeleteParams::default().preconditions(Preconditions {
            uid: policy.metadata.uid.clone(),
            resource_version: policy.metadata.resource_version.clone(),
        });
        self.writes.acquire().await;
        match api.delete(&name, &params).await {
            Ok(_) => {
                tracing::info!(namespace, policy = %name, "namespace is no longer an environment: NetworkPolicy removed");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!(namespace, policy = %name, "policy changed since it was read; looking again");
            }
            Err(e) => {
                tracing::warn!(namespace, policy = %name, error = %e, "cannot remove the NetworkPolicy; retrying");
            }
        }
    }
}

/// Whether the namespace is an environment according to the API server itself (the leader
/// re-reads it before a write so that it never acts on a cache lagging behind a
/// relabelling). `None` when it cannot tell (gone, terminating, unreadable: no write then).
async fn fresh_environment(
    client: &Client,
    name: &str,
    policy: &PolicyConfig,
    soon: &mut impl FnMut(Duration),
) -> Option<bool> {
    match Api::<Namespace>::all(client.clone())
        .get_metadata_opt(name)
        .await
    {
        Ok(Some(ns)) if ns.metadata.deletion_timestamp.is_none() => {
            namespace_info(&ns.metadata).map(|i| policy.is_environment(&i))
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(namespace = name, error = %e, "cannot read the namespace before writing; retrying");
            soon(Duration::from_secs(2));
            None
        }
    }
}

/// Other policies in the namespace that reopen a blocked destination: their names (sorted,
/// no duplicates) and one line per offending rule.
fn bypasses(
    policies: &[Arc<NetworkPolicy>],
    blocked: &[Cidr],
    our_name: &str,
) -> (Vec<String>, Vec<String>) {
    let found = holepunch::find_bypasses(policies.iter().map(|p| &**p), blocked, our_name);
    let names: BTreeSet<String> = found.iter().map(|b| b.policy.clone()).collect();
    let details = found
        .iter()
        .map(|b| {
            format!(
                "{} {} reopens {}",
                b.policy,
                b.rule,
                crate::blocklist::describe(&b.destination)
            )
        })
        .collect();
    (names.into_iter().collect(), details)
}

fn describe(observed: &Observed) -> String {
    match observed {
        Observed::Ok => "as configured".to_owned(),
        Observed::Missing => "missing (deleted)".to_owned(),
        Observed::Drifted(reasons) => reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    }
}

fn resource_version(p: &NetworkPolicy) -> Option<u64> {
    p.metadata.resource_version.as_deref()?.parse().ok()
}

async fn apply_policy(
    client: &Client,
    namespace: &str,
    name: &str,
    desired: &NetworkPolicy,
) -> Result<NetworkPolicy, kube::Error> {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), namespace);
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await
}

fn policy_reference(p: &NetworkPolicy) -> ObjectReference {
    ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("NetworkPolicy".into()),
        name: p.metadata.name.clone(),
        namespace: p.metadata.namespace.clone(),
        uid: p.metadata.uid.clone(),
        resource_version: p.metadata.resource_version.clone(),
        ..ObjectReference::default()
    }
}

/// A Warning Event on the namespace, in that namespace (see
/// [`crate::k8s::events::namespace_reference`]), within the controller's Event budget and
/// after a token of the write limit.
async fn publish(
    (events, writes): (&NamespaceEvents, &WriteLimiter),
    ns: &NamespaceMeta,
    reason_action: (&str, &str),
    note: String,
    related: Option<ObjectReference>,
) {
    let name = ns.metadata.name.as_deref().unwrap_or_default();
    writes.acquire().await;
    events
        .warn(
            name,
            ns.metadata.uid.as_deref(),
            reason_action,
            note,
            related,
        )
        .await;
}

/// Whether a Node shows IPv6: an IPv6 pod CIDR, or an IPv6 internal/external address.
pub fn node_has_ipv6(node: &Node) -> bool {
    let is_v6 = |s: &str| s.contains(':');
    let spec = node.spec.as_ref();
    let cidrs = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.as_ref()));
    if cidrs.map(String::as_str).any(is_v6) {
        return true;
    }
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .any(|a| {
            a.address
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_ipv6())
        })
}

/// Pages through the Nodes until one shows IPv6.
async fn cluster_has_ipv6(client: &Client) -> Result<bool, kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        if page.items.iter().any(node_has_ipv6) {
            return Ok(true);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};

    use super::*;

    fn node(cidrs: &[&str], addresses: &[(&str, &str)]) -> Node {
        Node {
            spec: Some(NodeSpec {
                pod_cidr: cidrs.first().map(|c| (*c).to_owned()),
                pod_cidrs: Some(cidrs.iter().map(|c| (*c).to_owned()).collect()),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).to_owned(),
                            address: (*a).to_owned(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn ipv6_is_seen_in_pod_cidrs_or_node_addresses() {
        assert!(!node_has_ipv6(&node(
            &["10.244.0.0/24"],
            &[("InternalIP", "10.0.0.1"), ("Hostname", "n1")]
        )));
        assert!(node_has_ipv6(&node(
            &["10.244.0.0/24", "fd00:10:244::/64"],
            &[("InternalIP", "10.0.0.1")]
        )));
        assert!(node_has_ipv6(&node(
            &[],
            &[("InternalIP", "10.0.0.1"), ("InternalIP", "2001:db8::1")]
        )));
        // A hostname that happens to contain ':' is not an address.
        assert!(!node_has_ipv6(&node(&[], &[("Hostname", "a:b")])));
        assert!(!node_has_ipv6(&Node::default()));
    }

    #[test]
    fn drift_descriptions_are_one_line() {
        assert_eq!(describe(&Observed::Missing), "missing (deleted)");
        let drift = Observed::Drifted(vec![
            desired::Drift::Spec("egress"),
            desired::Drift::Label(None),
        ]);
        assert_eq!(
            describe(&drift),
            "spec.egress differs; label app.kubernetes.io/managed-by is missing"
        );
    }
}
