//! Leader election with a `coordination.k8s.io/v1` Lease, the way client-go's
//! `leaderelection` package does it, so that exactly one agent in the cluster does the
//! cluster-wide writes (NetworkPolicy provisioning, Pod Security labels, Events on
//! namespaces) while every agent keeps guarding its own node.
//!
//! One attempt ([`Elector`]'s loop, every `retryPeriod`):
//! 1. GET the Lease; absent → create it holding it ourselves (a 409 AlreadyExists means
//!    another candidate was faster);
//! 2. held by someone else whose `renewTime + leaseDurationSeconds` is still ahead → wait;
//! 3. otherwise PUT it with our `holderIdentity`, `renewTime` (and `acquireTime`,
//!    `leaseTransitions + 1` when it changes hands) and the `resourceVersion` we read: a
//!    409 means another candidate wrote first, and we lost this round.
//!
//! The leader renews every `retryPeriod`. When it has not renewed for `renewDeadline` (API
//! unreachable, slow, or conflicts) it steps down at once — `renewDeadline < leaseDuration`,
//! so it stops writing before any standby may take over — and when it sees another holder
//! with a valid lease it steps down without waiting. On a clean shutdown it releases the
//! Lease (empty holder, `leaseDurationSeconds: 1`) so that a standby takes over at once
//! instead of after `leaseDuration`.
//!
//! Expiry is judged from the Lease's own `renewTime` and the local clock, as the issue asks;
//! this assumes node clocks agree to well within `leaseDuration - renewDeadline` (NTP). A
//! candidate that is ahead could take over early; the old leader then finds the Lease taken
//! at its next renewal (≤ `retryPeriod`) and steps down.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{api::PostParams, Api, Client};
use tokio::{sync::watch, task::JoinHandle};

use crate::config::LeaderElectionConfig;

/// Environment variable naming the agent's pod (downward API). When set it is the
/// candidate's identity, so that two agent pods on one node (a surge rollout) never share
/// one; otherwise the node name is.
pub const POD_NAME_ENV: &str = "POD_NAME";

/// The identity this agent campaigns with: `POD_NAME`, else the node name.
pub fn identity(node: &str) -> String {
    std::env::var(POD_NAME_ENV)
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| node.to_owned())
}

/// Everything one candidate needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// From the config file's `leaderElection` (namespace: configured, else `POD_NAMESPACE`).
    pub fn from_config(config: &LeaderElectionConfig, identity: &str) -> LeaseSettings {
        LeaseSettings {
            name: config.lease_name.clone(),
            namespace: config.resolved_namespace(),
            identity: identity.to_owned(),
            lease_duration: config.lease_duration.as_std(),
            renew_deadline: config.renew_deadline.as_std(),
            retry_period: config.retry_period.as_std(),
        }
    }

    fn duration_seconds(&self) -> i32 {
        // Whole seconds (the field's unit), rounded up: others may wait a little longer, never
        // less than the leader's renew deadline.
        let ms = self.lease_duration.as_millis().max(1);
        i32::try_from(ms.div_ceil(1000)).unwrap_or(i32::MAX)
    }
}

/// What one look at the Lease says to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease: create it.
    Create,
    /// Someone else holds a valid lease, until `until`.
    Wait { holder: String, until: Timestamp },
    /// Ours to write: free, expired, or already ours.
    Write,
}

fn holder_of(spec: Option<&LeaseSpec>) -> Option<&str> {
    spec.and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// When the current holder's lease runs out; `None` when it has no renew time.
pub fn expiry(spec: &LeaseSpec) -> Option<Timestamp> {
    let renew = spec.renew_time.as_ref()?.0;
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(0).max(0));
    renew.checked_add(SignedDuration::from_secs(seconds)).ok()
}

/// The pure core of one attempt.
pub fn decide(lease: Option<&Lease>, identity: &str, now: Timestamp) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.as_ref();
    match holder_of(spec) {
        None => Decision::Write,
        Some(holder) if holder == identity => Decision::Write,
        Some(holder) => match spec.and_then(expiry) {
            Some(until) if until > now => Decision::Wait {
                holder: holder.to_owned(),
                until,
            },
            _ => Decision::Write,
        },
    }
}

/// The spec we write to hold (or keep holding) the lease.
pub fn held_spec(old: Option<&LeaseSpec>, settings: &LeaseSettings, now: Timestamp) -> LeaseSpec {
    let ours = holder_of(old) == Some(settings.identity.as_str());
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(settings.duration_seconds()),
        acquire_time: if ours {
            old.and_then(|s| s.acquire_time.clone())
                .or(Some(MicroTime(now)))
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || old.is_none() {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..old.cloned().unwrap_or_default()
    }
}

/// The spec a leader writes when it lets go: no holder, a one-second lease.
pub fn released_spec(old: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(String::new()),
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        ..old.clone()
    }
}

/// The result of one attempt.
#[derive(Debug)]
enum Attempt {
    Held,
    /// Held by another agent, valid until the given time (by our clock).
    HeldBy(String, Timestamp),
    /// Another writer was faster (409).
    Lost,
}

/// A running candidate. Dropping it aborts the loop without releasing the Lease (use
/// [`Elector::shutdown`] for that).
pub struct Elector {
    is_leader: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Elector {
    /// Starts campaigning on the current tokio runtime.
    pub fn spawn(client: Client, settings: LeaseSettings) -> Elector {
        let (tx, rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
        let task = tokio::spawn(campaign(api, settings, tx, stop_rx));
        Elector {
            is_leader: rx,
            stop,
            task: Some(task),
        }
    }

    /// `true` while this agent holds the lease. Leader duties must stop as soon as it turns
    /// `false`.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.is_leader.clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.is_leader.borrow()
    }

    /// Steps down (the receivers see `false` first) and releases the Lease if held, so a
    /// standby takes over at once. Bounded by `timeout`.
    pub async fn shutdown(mut self, timeout: Duration) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(timeout, task).await.is_err() {
                abort.abort();
                tracing::warn!("leader election did not stop in time; the lease expires by itself");
            }
        }
    }
}

impl Drop for Elector {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn campaign(
    api: Api<Lease>,
    settings: LeaseSettings,
    tx: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!(
        lease = %settings.name,
        namespace = %settings.namespace,
        identity = %settings.identity,
        "leader election: campaigning"
    );
    let mut leading = false;
    let mut last_renew = Instant::now();
    let mut known_holder: Option<String> = None;
    let mut failing = false;
    loop {
        let mut expires: Option<Timestamp> = None;
        // A leader must never outlive its renew deadline, whatever the API does.
        let budget = if leading {
            settings
                .renew_deadline
                .saturating_sub(last_renew.elapsed())
                .max(Duration::from_millis(50))
        } else {
            settings.renew_deadline
        };
        let result = tokio::select! {
            r = tokio::time::timeout(budget, try_acquire_or_renew(&api, &settings)) => r,
            _ = stop.changed() => break,
        };
        match result {
            Ok(Ok(Attempt::Held)) => {
                last_renew = Instant::now();
                if failing {
                    tracing::info!(lease = %settings.name, "leader election: the API answers again");
                    failing = false;
                }
                if !leading {
                    leading = true;
                    known_holder = Some(settings.identity.clone());
                    tracing::info!(lease = %settings.name, namespace = %settings.namespace, identity = %settings.identity, "leader election: became the leader");
                    let _ = tx.send(true);
                }
            }
            Ok(Ok(Attempt::HeldBy(holder, until))) => {
                expires = Some(until);
                if leading {
                    leading = false;
                    let _ = tx.send(false);
                    tracing::warn!(lease = %settings.name, holder = %holder, "leader election: stepped down, the lease is held by another agent");
                } else if known_holder.as_deref() != Some(holder.as_str()) {
                    tracing::info!(lease = %settings.name, holder = %holder, "leader election: standing by; the leader is another agent");
                }
                known_holder = Some(holder);
            }
            Ok(Ok(Attempt::Lost)) => {
                tracing::debug!(lease = %settings.name, "leader election: another candidate wrote the lease first");
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(lease = %settings.name, namespace = %settings.namespace, error = %e, "leader election: cannot read or write the lease; retrying");
                    failing = true;
                }
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(lease = %settings.name, "leader election: the API server did not answer in time; retrying");
                    failing = true;
                }
            }
        }
        if leading && last_renew.elapsed() >= settings.renew_deadline {
            leading = false;
            known_holder = None;
            let _ = tx.send(false);
            tracing::warn!(
                lease = %settings.name,
                deadline = ?settings.renew_deadline,
                "leader election: stepped down, the lease was not renewed within the renew deadline"
            );
        }
        // client-go: renewals every retryPeriod; candidates with up to 1.2 × jitter so they
        // do not all hit the API server together. A standby also wakes right when the
        // holder's lease runs out (plus a little jitter), so that a dead leader is replaced
        // within leaseDuration + 0.2 × retryPeriod of its last renewal.
        let wait = if leading {
            settings.retry_period
        } else {
            let poll = jittered(settings.retry_period, 1.2);
            match expires.map(until_expiry) {
                Some(left) => {
                    poll.min(left + jittered(settings.retry_period, 0.2) - settings.retry_period)
                }
                None => poll,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            _ = stop.changed() => break,
        }
    }
    if leading {
        // Duties stop before the lease is let go.
        let _ = tx.send(false);
        match tokio::time::timeout(settings.renew_deadline, release(&api, &settings)).await {
            Ok(Ok(true)) => {
                tracing::info!(lease = %settings.name, "leader election: released the lease on shutdown")
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(lease = %settings.name, error = %e, "leader election: cannot release the lease; it expires by itself")
            }
            Err(_) => {
                tracing::warn!(lease = %settings.name, "leader election: releasing the lease timed out; it expires by itself")
            }
        }
    }
}

/// `base` plus up to `factor × base` (client-go's `wait.Jitter`).
fn jittered(base: Duration, factor: f64) -> Duration {
    // No RNG dependency for this: the clock's nanoseconds are random enough to spread peers.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(factor * f64::from(nanos % 1000) / 1000.0)
}

/// Time left until `until` by the local clock (zero when past).
fn until_expiry(until: Timestamp) -> Duration {
    let left = until.duration_since(Timestamp::now());
    Duration::try_from(left).unwrap_or(Duration::ZERO)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    settings: &LeaseSettings,
) -> Result<Attempt, kube::Error> {
    let current = api.get_opt(&settings.name).await?;
    let now = Timestamp::now();
    match decide(current.as_ref(), &settings.identity, now) {
        Decision::Wait { holder, until } => Ok(Attempt::HeldBy(holder, until)),
        Decision::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    namespace: Some(settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(held_spec(None, settings, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(e) if is_status(&e, 409) => Ok(Attempt::Lost),
                Err(e) => Err(e),
            }
        }
        Decision::Write => {
            let mut lease = current.expect("Write is only decided for an existing lease");
            lease.spec = Some(held_spec(lease.spec.as_ref(), settings, now));
            // metadata.resourceVersion is the one we read: optimistic concurrency.
            match api
                .replace(&settings.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(Attempt::Held),
                Err(e) if is_status(&e, 409) => Ok(Attempt::Lost),
                Err(e) => Err(e),
            }
        }
    }
}

/// Lets go of the lease if we still hold it. `Ok(true)` when released.
async fn release(api: &Api<Lease>, settings: &LeaseSettings) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        return Ok(false);
    };
    let Some(spec) = lease.spec.as_ref() else {
        return Ok(false);
    };
    if holder_of(Some(spec)) != Some(settings.identity.as_str()) {
        return Ok(false);
    }
    lease.spec = Some(released_spec(spec, Timestamp::now()));
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        // Someone else wrote it since: it is not ours to release any more.
        Err(e) if is_status(&e, 409) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LeaseSettings {
        LeaseSettings {
            name: "l".into(),
            namespace: "ns".into(),
            identity: "node-a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: i64, duration: i32, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: Some(MicroTime(at(renewed))),
                acquire_time: Some(MicroTime(at(renewed - 100))),
                lease_duration_seconds: Some(duration),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn decisions_follow_client_go() {
        assert_eq!(decide(None, "node-a", at(0)), Decision::Create);
        // Held by another, renewed 5 s ago, 15 s lease: wait.
        assert_eq!(
            decide(Some(&lease(Some("node-b"), -5, 15, 0)), "node-a", at(0)),
            Decision::Wait {
                holder: "node-b".into(),
                until: at(10)
            }
        );
        // Expired (renewed 16 s ago): take it.
        assert_eq!(
            decide(Some(&lease(Some("node-b"), -16, 15, 0)), "node-a", at(0)),
            Decision::Write
        );
        // Exactly at expiry: expired.
        assert_eq!(
            decide(Some(&lease(Some("node-b"), -15, 15, 0)), "node-a", at(0)),
            Decision::Write
        );
        // Ours: renew, whatever the times say.
        assert_eq!(
            decide(Some(&lease(Some("node-a"), -100, 15, 0)), "node-a", at(0)),
            Decision::Write
        );
        // Released (empty holder) or never held: free at once.
        assert_eq!(
            decide(Some(&lease(Some(""), 0, 1, 3)), "node-a", at(0)),
            Decision::Write
        );
        assert_eq!(
            decide(Some(&lease(None, 0, 15, 0)), "node-a", at(0)),
            Decision::Write
        );
        // No renew time: cannot be valid.
        let mut l = lease(Some("node-b"), 0, 15, 0);
        l.spec.as_mut().unwrap().renew_time = None;
        assert_eq!(decide(Some(&l), "node-a", at(0)), Decision::Write);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let s = settings();
        let taken = held_spec(lease(Some("node-b"), -20, 15, 4).spec.as_ref(), &s, at(0));
        assert_eq!(taken.holder_identity.as_deref(), Some("node-a"));
        assert_eq!(taken.lease_transitions, Some(5));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(taken.renew_time, Some(MicroTime(at(0))));
        assert_eq!(taken.lease_duration_seconds, Some(15));

        let renewed = held_spec(Some(&taken), &s, at(2));
        assert_eq!(renewed.lease_transitions, Some(5));
        assert_eq!(
            renewed.acquire_time,
            Some(MicroTime(at(0))),
            "acquireTime kept while we hold it"
        );
        assert_eq!(renewed.renew_time, Some(MicroTime(at(2))));

        let created = held_spec(None, &s, at(0));
        assert_eq!(created.lease_transitions, Some(0));

        // Taking a released lease is a transition too.
        let released = released_spec(&renewed, at(3));
        assert_eq!(released.holder_identity.as_deref(), Some(""));
        assert_eq!(released.lease_duration_seconds, Some(1));
        assert_eq!(released.lease_transitions, Some(5));
        let mut other = s.clone();
        other.identity = "node-b".into();
        assert_eq!(
            decide(
                Some(&Lease {
                    spec: Some(released.clone()),
                    ..Lease::default()
                }),
                "node-b",
                at(3)
            ),
            Decision::Write
        );
        assert_eq!(
            held_spec(Some(&released), &other, at(3)).lease_transitions,
            Some(6)
        );
    }

    #[test]
    fn durations_round_up_to_whole_seconds() {
        let mut s = settings();
        s.lease_duration = Duration::from_millis(500);
        assert_eq!(s.duration_seconds(), 1);
        s.lease_duration = Duration::from_millis(2500);
        assert_eq!(s.duration_seconds(), 3);
        s.lease_duration = Duration::from_secs(15);
        assert_eq!(s.duration_seconds(), 15);
    }

    #[test]
    fn jitter_stays_within_client_go_bounds() {
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(2), 1.2);
            assert!(
                j >= Duration::from_secs(2) && j <= Duration::from_millis(4400),
                "{j:?}"
            );
            let j = jittered(Duration::from_secs(2), 0.2);
            assert!(
                j >= Duration::from_secs(2) && j <= Duration::from_millis(2400),
                "{j:?}"
            );
        }
    }
}
