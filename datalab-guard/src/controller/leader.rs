//! Leader election with a `coordination.k8s.io/v1` Lease, with the semantics of client-go's
//! `tools/leaderelection`, so that exactly one process in the cluster does the cluster-wide
//! writes (NetworkPolicy provisioning, Pod Security labels, Events on namespaces).
//!
//! # Expiry is judged by the candidate's own clock, never by the Lease's timestamps
//! Each candidate remembers the Lease record it last saw (holder, duration, acquire and renew
//! times, transitions) and *when it first saw that record*, on its own monotonic clock
//! ([`Candidate`]: client-go's `observedRecord` + `observedTime`). A holder is alive as long as
//! its record keeps changing; it has expired when the same record has been seen unchanged
//! for `leaseDurationSeconds` of local time. The `renewTime` written in the Lease is
//! informational only: a candidate whose wall clock is minutes ahead does not see a healthy
//! leader's lease as expired, and a leader whose wall clock is behind does not look dead to
//! the others. (The price, as in client-go: a standby that starts or first looks while the
//! holder is already dead waits a full lease duration from that first look.)
//!
//! # One attempt ([`Elector`]'s loop)
//! - A leader first renews optimistically: a PUT of the Lease it last wrote, with that
//!   object's `resourceVersion` (one request instead of two). A 409 Conflict — someone else
//!   wrote since — falls back to the full path.
//! - Full path: GET the Lease; absent → create it holding it ourselves; held by another
//!   whose record is still alive by our observation → stand by; otherwise (free, released,
//!   expired, or ours) → PUT it with our `holderIdentity`, a new `renewTime`, `acquireTime`
//!   and `leaseTransitions + 1` when it changes hands, and the `resourceVersion` we read
//!   (optimistic concurrency). A 409 means another candidate wrote first: we read the Lease
//!   again at once, which shows us the new holder.
//!
//! # Timing
//! The leader renews every `retryPeriod`. When it has not renewed for `renewDeadline` (API
//! unreachable or slow, conflicts) it steps down at once, whatever the Lease says; as
//! `renewDeadline < leaseDuration` it stops writing before any standby may take over. When it
//! sees another holder it steps down without waiting. Standbys look every `retryPeriod` plus
//! up to 1.2 × `retryPeriod` of jitter (client-go's `JitterFactor`), and wake right when the
//! lease they watch would expire by their observation. A standby sees the dead leader's last
//! renewal up to one look later than it was written, so a crashed leader is replaced within
//! `leaseDuration` + 2.4 × `retryPeriod` of its last renewal.
//!
//! On a clean shutdown the leader releases the Lease (empty holder,
//! `leaseDurationSeconds: 1`) so that a standby takes over at once.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{api::PostParams, Api, Client};
use tokio::{sync::watch, task::JoinHandle};

use crate::config::LeaderElectionConfig;

/// Environment variable naming the controller's pod (downward API): the default identity,
/// so that two replicas (or the old and new pod of a rollout) never share one.
pub const POD_NAME_ENV: &str = "POD_NAME";

/// The identity a controller campaigns with when `--identity` is not given: `POD_NAME`, else
/// the hostname (a pod's hostname is its name too), else a fixed name.
pub fn default_identity() -> String {
    std::env::var(POD_NAME_ENV)
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "datalab-guard-controller".to_owned())
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

// ---------------------------------------------------------------------------------------
// The pure core: what one candidate knows and decides. No client, no clock of its own:
// every method takes `now` from the local monotonic clock (a fake one in the tests).

/// What one look at the Lease says to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease: create it.
    Create,
    /// Another candidate holds a lease that is alive by our observation, until `until`
    /// (local monotonic time) unless its record changes again.
    Wait { holder: String, until: Instant },
    /// Ours to write: free, released, expired by our observation, or already ours.
    Write,
}

fn holder_of(spec: Option<&LeaseSpec>) -> Option<&str> {
    spec.and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// The Lease record a candidate last saw, and when it first saw it.
#[derive(Clone, Debug)]
struct Observation {
    record: LeaseSpec,
    since: Instant,
}

/// One candidate's view of the election (client-go's `LeaderElector` state).
#[derive(Clone, Debug)]
pub struct Candidate {
    identity: String,
    renew_deadline: Duration,
    observed: Option<Observation>,
    /// When our last write as the holder succeeded; `Some` exactly while we lead.
    renewed_at: Option<Instant>,
}

impl Candidate {
    pub fn new(identity: &str, renew_deadline: Duration) -> Candidate {
        Candidate {
            identity: identity.to_owned(),
            renew_deadline,
            observed: None,
            renewed_at: None,
        }
    }

    /// Notes the record just read. The observation time moves only when the record changed
    /// since the last look: an unchanged record keeps ageing.
    fn observe(&mut self, record: &LeaseSpec, now: Instant) {
        if self.observed.as_ref().is_some_and(|o| o.record == *record) {
            return;
        }
        self.observed = Some(Observation {
            record: record.clone(),
            since: now,
        });
    }

    /// Observes what a GET returned (`None`: no Lease, or a Lease without a spec counts as a
    /// free one) and decides.
    pub fn decide(&mut self, read: Option<&LeaseSpec>, now: Instant) -> Decision {
        let Some(record) = read else {
            self.observed = None;
            return Decision::Create;
        };
        self.observe(record, now);
        match holder_of(Some(record)) {
            None => Decision::Write,
            Some(holder) if holder == self.identity => Decision::Write,
            Some(holder) => {
                let seconds = record.lease_duration_seconds.unwrap_or(0).max(0);
                let since = self.observed.as_ref().map_or(now, |o| o.since);
                let until = since + Duration::from_secs(seconds.unsigned_abs().into());
                if until > now {
                    Decision::Wait {
                        holder: holder.to_owned(),
                        until,
                    }
                } else {
                    Decision::Write
                }
            }
        }
    }

    /// Our write of `record` succeeded: we hold the lease, renewed now.
    pub fn wrote(&mut self, record: &LeaseSpec, now: Instant) {
        self.observed = Some(Observation {
            record: record.clone(),
            since: now,
        });
        self.renewed_at = holder_of(Some(record))
            .filter(|h| *h == self.identity)
            .map(|_| now);
    }

    /// Whether we lead: our last successful write made us the holder, and we have not
    /// stepped down since.
    pub fn is_leading(&self) -> bool {
        self.renewed_at.is_some()
    }

    /// A leader that has not renewed within the renew deadline must step down.
    pub fn renew_overdue(&self, now: Instant) -> bool {
        self.renewed_at
            .is_some_and(|at| now.saturating_duration_since(at) >= self.renew_deadline)
    }

    /// How long the current attempt may take: a leader only until its renew deadline (at
    /// least a moment, so that it can still try), a standby a whole renew deadline.
    pub fn attempt_budget(&self, now: Instant) -> Duration {
        match self.renewed_at {
            Some(at) => self
                .renew_deadline
                .saturating_sub(now.saturating_duration_since(at))
                .max(Duration::from_millis(50)),
            None => self.renew_deadline,
        }
    }

    /// Stops leading (renew deadline passed, another holder seen, shutdown).
    pub fn step_down(&mut self) {
        self.renewed_at = None;
    }
}

/// The spec we write to hold (or keep holding) the lease. `now` is the wall clock: it goes
/// into `renewTime`/`acquireTime` for people to read; no candidate judges expiry by it.
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

// ---------------------------------------------------------------------------------------
// The running candidate.

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

    /// `true` while this replica holds the lease. Leader duties must stop as soon as it turns
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

/// The result of one attempt.
#[derive(Debug)]
enum Attempt {
    Held,
    /// Held by another candidate, alive by our observation until the given local time.
    HeldBy(String, Instant),
    /// Another writer was faster, twice in a row (409).
    Lost,
}

/// The loop's state besides the pure [`Candidate`].
struct Campaign {
    api: Api<Lease>,
    settings: LeaseSettings,
    candidate: Candidate,
    /// The Lease as the server returned it after our last successful write: the leader's
    /// optimistic renewal and the release PUT it with this `resourceVersion`.
    written: Option<Lease>,
    /// The holder last logged, so that standing by is logged once per leader.
    known_holder: Option<String>,
    /// The API fails: logged once until it answers again.
    failing: bool,
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
    let mut c = Campaign {
        candidate: Candidate::new(&settings.identity, settings.renew_deadline),
        api,
        settings,
        written: None,
        known_holder: None,
        failing: false,
    };
    loop {
        c.check_deadline(&tx);
        let budget = c.candidate.attempt_budget(Instant::now());
        let result = tokio::select! {
            r = tokio::time::timeout(budget, c.attempt()) => r,
            _ = stop.changed() => break,
        };
        let expires = c.follow(result, &tx);
        c.check_deadline(&tx);
        tokio::select! {
            _ = tokio::time::sleep(c.next_wait(expires)) => {},
            _ = stop.changed() => break,
        }
    }
    if c.candidate.is_leading() {
        // Duties stop before the lease is let go.
        c.candidate.step_down();
        let _ = tx.send(false);
        c.release_logged().await;
    }
}

impl Campaign {
    /// Steps down when the renew deadline has passed without a successful renewal.
    fn check_deadline(&mut self, tx: &watch::Sender<bool>) {
        if self.candidate.renew_overdue(Instant::now()) {
            self.candidate.step_down();
            self.known_holder = None;
            let _ = tx.send(false);
            tracing::warn!(
                lease = %self.settings.name,
                deadline = ?self.settings.renew_deadline,
                "leader election: stepped down, the lease was not renewed within the renew deadline"
            );
        }
    }

    /// Acts on the attempt's result; returns when the holder's lease runs out, if another
    /// candidate holds it.
    fn follow(
        &mut self,
        result: Result<Result<Attempt, kube::Error>, tokio::time::error::Elapsed>,
        tx: &watch::Sender<bool>,
    ) -> Option<Instant> {
        let name = &self.settings.name;
        match result {
            Ok(Ok(Attempt::Held)) => {
                if self.failing {
                    tracing::info!(lease = %name, "leader election: the API answers again");
                    self.failing = false;
                }
                if !*tx.borrow() {
                    self.known_holder = Some(self.settings.identity.clone());
                    tracing::info!(lease = %name, namespace = %self.settings.namespace, identity = %self.settings.identity, "leader election: became the leader");
                    let _ = tx.send(true);
                }
                None
            }
            Ok(Ok(Attempt::HeldBy(holder, until))) => {
                self.failing = false;
                if *tx.borrow() {
                    let _ = tx.send(false);
                    tracing::warn!(lease = %name, holder = %holder, "leader election: stepped down, the lease is held by another candidate");
                } else if self.known_holder.as_deref() != Some(holder.as_str()) {
                    tracing::info!(lease = %name, holder = %holder, "leader election: standing by; the leader is another candidate");
                }
                self.known_holder = Some(holder);
                Some(until)
            }
            Ok(Ok(Attempt::Lost)) => {
                tracing::debug!(lease = %name, "leader election: other candidates kept writing the lease first");
                None
            }
            Ok(Err(e)) => {
                if !self.failing {
                    tracing::warn!(lease = %name, namespace = %self.settings.namespace, error = %crate::cri::error::error_chain(&e), "leader election: cannot read or write the lease; retrying");
                    self.failing = true;
                }
                None
            }
            Err(_) => {
                if !self.failing {
                    tracing::warn!(lease = %name, "leader election: the API server did not answer in time; retrying");
                    self.failing = true;
                }
                None
            }
        }
    }

    /// How long to sleep before the next attempt.
    fn next_wait(&self, expires: Option<Instant>) -> Duration {
        let retry = self.settings.retry_period;
        let now = Instant::now();
        if self.candidate.is_leading() {
            // Renew every retryPeriod, but be awake at the renew deadline to step down on time.
            let left = self.settings.renew_deadline.saturating_sub(
                now.saturating_duration_since(self.candidate.renewed_at.unwrap_or(now)),
            );
            return retry.min(left.max(Duration::from_millis(10)));
        }
        let poll = jittered(retry, 1.2);
        match expires {
            // Wake when the watched lease runs out, plus a little jitter so that the
            // standbys do not all write in the same millisecond.
            Some(until) => {
                poll.min(until.saturating_duration_since(now) + jittered(retry, 0.2) - retry)
            }
            None => poll,
        }
    }

    /// One attempt: the leader's optimistic renewal, else the full read-decide-write, with
    /// one immediate re-read after a conflict.
    async fn attempt(&mut self) -> Result<Attempt, kube::Error> {
        if self.candidate.is_leading() {
            if let Some(mut lease) = self.written.clone() {
                lease.spec = Some(held_spec(
                    lease.spec.as_ref(),
                    &self.settings,
                    Timestamp::now(),
                ));
                match self.put(&lease).await {
                    Ok(()) => return Ok(Attempt::Held),
                    Err(e) if is_status(&e, 409) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        for _ in 0..2 {
            match self.read_decide_write().await? {
                Attempt::Lost => continue,
                done => return Ok(done),
            }
        }
        Ok(Attempt::Lost)
    }

    async fn read_decide_write(&mut self) -> Result<Attempt, kube::Error> {
        let current = self.api.get_opt(&self.settings.name).await?;
        let now = Instant::now();
        let read = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
        match self.candidate.decide(read.as_ref(), now) {
            Decision::Wait { holder, until } => {
                self.candidate.step_down();
                Ok(Attempt::HeldBy(holder, until))
            }
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(held_spec(None, &self.settings, Timestamp::now())),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(created) => {
                        self.record_write(created);
                        Ok(Attempt::Held)
                    }
                    Err(e) if is_status(&e, 409) => Ok(Attempt::Lost),
                    Err(e) => Err(e),
                }
            }
            Decision::Write => {
                let mut lease = current.expect("Write is only decided for an existing lease");
                lease.spec = Some(held_spec(
                    lease.spec.as_ref(),
                    &self.settings,
                    Timestamp::now(),
                ));
                // metadata.resourceVersion is the one we read: optimistic concurrency.
                match self.put(&lease).await {
                    Ok(()) => Ok(Attempt::Held),
                    Err(e) if is_status(&e, 409) => Ok(Attempt::Lost),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// PUTs `lease` (with its resourceVersion) and records the result as ours.
    async fn put(&mut self, lease: &Lease) -> Result<(), kube::Error> {
        let written = self
            .api
            .replace(&self.settings.name, &PostParams::default(), lease)
            .await?;
        self.record_write(written);
        Ok(())
    }

    fn record_write(&mut self, written: Lease) {
        let spec = written.spec.clone().unwrap_or_default();
        self.candidate.wrote(&spec, Instant::now());
        self.written = Some(written);
    }

    async fn release_logged(&mut self) {
        let name = self.settings.name.clone();
        match tokio::time::timeout(self.settings.renew_deadline, self.release()).await {
            Ok(Ok(true)) => {
                tracing::info!(lease = %name, "leader election: released the lease on shutdown");
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(lease = %name, error = %e, "leader election: cannot release the lease; it expires by itself");
            }
            Err(_) => {
                tracing::warn!(lease = %name, "leader election: releasing the lease timed out; it expires by itself");
            }
        }
    }

    /// Lets go of the lease we last wrote. `Ok(true)` when released; a 409 means someone
    /// else wrote it since: it is not ours to release any more.
    async fn release(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.written.take() else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_ref() else {
            return Ok(false);
        };
        if holder_of(Some(spec)) != Some(self.settings.identity.as_str()) {
            return Ok(false);
        }
        lease.spec = Some(released_spec(spec, Timestamp::now()));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// `base` plus up to `factor × base` (client-go's `wait.Jitter`).
fn jittered(base: Duration, factor: f64) -> Duration {
    // No RNG dependency for this: the clock's nanoseconds are random enough to spread peers.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base + base.mul_f64(factor * f64::from(nanos % 1000) / 1000.0)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

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

    /// A fake monotonic clock: a fixed origin plus the time the test lets pass.
    struct FakeClock {
        origin: Instant,
        elapsed: Duration,
    }

    impl FakeClock {
        fn new() -> FakeClock {
            FakeClock {
                origin: Instant::now(),
                elapsed: Duration::ZERO,
            }
        }
        fn now(&self) -> Instant {
            self.origin + self.elapsed
        }
        fn advance(&mut self, d: Duration) -> Instant {
            self.elapsed += d;
            self.now()
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Wall-clock time as some node writes it: `offset` seconds from a fixed point.
    fn wall(offset: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + offset).unwrap()
    }

    fn record(holder: &str, renewed: Timestamp, duration: i32, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            renew_time: Some(MicroTime(renewed)),
            acquire_time: Some(MicroTime(wall(-1000))),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn takes_over_after_expiry_as_observed_locally() {
        let mut clock = FakeClock::new();
        let mut b = Candidate::new("node-b", secs(10));
        let held = record("node-a", wall(0), 15, 0);
        assert_eq!(
            b.decide(Some(&held), clock.now()),
            Decision::Wait {
                holder: "node-a".into(),
                until: clock.now() + secs(15)
            }
        );
        // The same record, looked at again and again: it keeps ageing from the first look.
        let first_look = clock.now();
        for _ in 0..7 {
            clock.advance(secs(2));
            assert_eq!(
                b.decide(Some(&held), clock.now()),
                Decision::Wait {
                    holder: "node-a".into(),
                    until: first_look + secs(15)
                }
            );
        }
        clock.advance(secs(1)); // 15 s after the first look
        assert_eq!(b.decide(Some(&held), clock.now()), Decision::Write);
        assert!(!b.is_leading(), "deciding to write is not leading yet");
        let taken = held_spec(
            Some(&held),
            &LeaseSettings {
                identity: "node-b".into(),
                ..settings()
            },
            wall(15),
        );
        b.wrote(&taken, clock.now());
        assert!(b.is_leading());
        assert_eq!(taken.lease_transitions, Some(1));
    }

    #[test]
    fn a_renewing_holder_is_never_taken_over_whatever_its_timestamps_say() {
        // The holder's wall clock is 10 minutes behind ours (its renewTime looks long
        // expired), then 10 minutes ahead (it looks valid far into the future): only the
        // changes count.
        for skew in [-600, 600] {
            let mut clock = FakeClock::new();
            let mut b = Candidate::new("node-b", secs(10));
            for i in 0..60 {
                let renewed = wall(skew + 2 * i);
                let d = b.decide(Some(&record("node-a", renewed, 15, 0)), clock.now());
                assert_eq!(
                    d,
                    Decision::Wait {
                        holder: "node-a".into(),
                        until: clock.now() + secs(15)
                    },
                    "skew {skew}, look {i}"
                );
                clock.advance(secs(2));
            }
            // The holder stops renewing: its last record expires 15 s after we first saw
            // it — not when its renewTime says (10 minutes early or late).
            let last = record("node-a", wall(skew + 200), 15, 0);
            let seen = clock.now();
            assert!(matches!(b.decide(Some(&last), seen), Decision::Wait { .. }));
            clock.advance(secs(14));
            assert!(matches!(
                b.decide(Some(&last), clock.now()),
                Decision::Wait { .. }
            ));
            clock.advance(secs(1));
            assert_eq!(
                b.decide(Some(&last), clock.now()),
                Decision::Write,
                "skew {skew}"
            );
        }
    }

    #[test]
    fn any_change_of_the_record_restarts_the_count() {
        let mut clock = FakeClock::new();
        let mut b = Candidate::new("node-b", secs(10));
        let first = record("node-a", wall(0), 15, 0);
        b.decide(Some(&first), clock.now());
        clock.advance(secs(14));
        // Another candidate took it over (same renewTime by its clock, but a new holder).
        let other = record("node-c", wall(0), 15, 1);
        let t = clock.now();
        assert_eq!(
            b.decide(Some(&other), t),
            Decision::Wait {
                holder: "node-c".into(),
                until: t + secs(15)
            }
        );
        // A longer lease duration counts from the change too.
        clock.advance(secs(5));
        let longer = record("node-c", wall(0), 60, 1);
        let t = clock.now();
        assert_eq!(
            b.decide(Some(&longer), t),
            Decision::Wait {
                holder: "node-c".into(),
                until: t + secs(60)
            }
        );
    }

    #[test]
    fn free_released_missing_and_own_leases() {
        let now = Instant::now();
        let mut a = Candidate::new("node-a", secs(10));
        assert_eq!(a.decide(None, now), Decision::Create);
        // Released (empty holder) or never held: free at once.
        let released = released_spec(&record("node-b", wall(0), 15, 3), wall(1));
        assert_eq!(a.decide(Some(&released), now), Decision::Write);
        assert_eq!(a.decide(Some(&LeaseSpec::default()), now), Decision::Write);
        // Ours (after a restart, or after stepping down while the API was away): renew,
        // whatever the times say.
        assert_eq!(
            a.decide(Some(&record("node-a", wall(-10_000), 15, 0)), now),
            Decision::Write
        );
        // No duration: client-go's zero, expired at once.
        let mut no_duration = record("node-b", wall(0), 15, 0);
        no_duration.lease_duration_seconds = None;
        assert_eq!(a.decide(Some(&no_duration), now), Decision::Write);
    }

    #[test]
    fn a_leader_steps_down_after_the_renew_deadline_without_a_renewal() {
        let mut clock = FakeClock::new();
        let s = settings();
        let mut a = Candidate::new("node-a", s.renew_deadline);
        let held = held_spec(None, &s, wall(0));
        a.wrote(&held, clock.now());
        assert!(a.is_leading());
        assert_eq!(a.attempt_budget(clock.now()), secs(10));
        // Renewals every 2 s keep it leading.
        for i in 1..=5 {
            clock.advance(secs(2));
            assert!(!a.renew_overdue(clock.now()));
            a.wrote(&held_spec(Some(&held), &s, wall(2 * i)), clock.now());
        }
        // Then the renewals fail: still the leader up to the deadline, not at it.
        clock.advance(secs(6));
        assert!(!a.renew_overdue(clock.now()));
        assert_eq!(
            a.attempt_budget(clock.now()),
            secs(4),
            "an attempt never outlives the deadline"
        );
        clock.advance(Duration::from_millis(3999));
        assert!(!a.renew_overdue(clock.now()));
        assert_eq!(a.attempt_budget(clock.now()), Duration::from_millis(50));
        clock.advance(Duration::from_millis(1));
        assert!(a.renew_overdue(clock.now()));
        a.step_down();
        assert!(!a.is_leading() && !a.renew_overdue(clock.now()));
        assert_eq!(a.attempt_budget(clock.now()), secs(10));
        // A write that makes someone else the holder (a release) is not leading either.
        a.wrote(&released_spec(&held, wall(30)), clock.now());
        assert!(!a.is_leading());
    }

    #[test]
    fn a_leader_that_sees_another_holder_waits_like_a_standby() {
        let clock = FakeClock::new();
        let s = settings();
        let mut a = Candidate::new("node-a", s.renew_deadline);
        a.wrote(&held_spec(None, &s, wall(0)), clock.now());
        let stolen = record("node-b", wall(1), 15, 1);
        assert!(matches!(
            a.decide(Some(&stolen), clock.now()),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let s = settings();
        let taken = held_spec(Some(&record("node-b", wall(-20), 15, 4)), &s, wall(0));
        assert_eq!(taken.holder_identity.as_deref(), Some("node-a"));
        assert_eq!(taken.lease_transitions, Some(5));
        assert_eq!(taken.acquire_time, Some(MicroTime(wall(0))));
        assert_eq!(taken.renew_time, Some(MicroTime(wall(0))));
        assert_eq!(taken.lease_duration_seconds, Some(15));

        let renewed = held_spec(Some(&taken), &s, wall(2));
        assert_eq!(renewed.lease_transitions, Some(5));
        assert_eq!(
            renewed.acquire_time,
            Some(MicroTime(wall(0))),
            "acquireTime kept while we hold it"
        );
        assert_eq!(renewed.renew_time, Some(MicroTime(wall(2))));

        let created = held_spec(None, &s, wall(0));
        assert_eq!(created.lease_transitions, Some(0));

        // Taking a released lease is a transition too.
        let released = released_spec(&renewed, wall(3));
        assert_eq!(released.holder_identity.as_deref(), Some(""));
        assert_eq!(released.lease_duration_seconds, Some(1));
        assert_eq!(released.lease_transitions, Some(5));
        let other = LeaseSettings {
            identity: "node-b".into(),
            ..s
        };
        assert_eq!(
            held_spec(Some(&released), &other, wall(3)).lease_transitions,
            Some(6)
        );
        assert_eq!(
            released.renew_time.unwrap().0.duration_since(wall(0)),
            SignedDuration::from_secs(3)
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
