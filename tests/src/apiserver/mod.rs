//! A Kubernetes API server fixture that speaks the real HTTP protocol on loopback.
//!
//! Our machines have no kube-apiserver, kind, k3s or envtest (see `TOOLCHAIN.md`), so the
//! Kubernetes side of datalab-guard is tested against [`FakeApiServer`]: an in-process HTTP/1.1
//! server on `127.0.0.1` (plain, or HTTPS with a per-fixture CA in the kubeconfig:
//! [`FakeApiServer::start_tls`], see [`tls`]), on its own tokio runtime (usable from sync and async tests), that
//! answers kube-rs — and the real `datalab-guard node` binary through
//! [`FakeApiServer::write_kubeconfig`] — the way a Kubernetes 1.33 API server does.
//!
//! What it serves:
//! - core/v1 `namespaces`, `pods`, `nodes`, `events`; `events.k8s.io/v1` `events`;
//!   `coordination.k8s.io/v1` `leases`; `networking.k8s.io/v1` `networkpolicies` — get, list,
//!   watch, create, update (PUT), patch (server-side apply, JSON merge, strategic merge, JSON
//!   patch), delete, deletecollection; cluster-wide and per-namespace collection paths, and the
//!   legacy `/watch/` paths;
//! - discovery: `/version`, `/api`, `/apis`, `/api/v1`, `/apis/{group}[/{version}]`, and
//!   `/healthz`, `/livez`, `/readyz`;
//! - lists: `{kind: XList, apiVersion, metadata: {resourceVersion, continue,
//!   remainingItemCount}, items}` with items in (namespace, name) order and without
//!   apiVersion/kind (as on the wire), `labelSelector`, `fieldSelector`, `limit` + `continue`
//!   (real token format, consistent snapshot at the first page's resourceVersion, 410 when
//!   compacted), `resourceVersion` + `resourceVersionMatch` (`NotOlderThan`, `Exact`);
//! - watches: see [`watch`] (history replay, BOOKMARKs about once a minute, `timeoutSeconds`
//!   honoured and a random 5–10 min lifetime without it, `sendInitialEvents` streaming lists
//!   with the `k8s.io/initial-events-end` bookmark, ERROR 410 `Expired` events or an HTTP
//!   410, selector-driven ADDED/DELETED transitions);
//! - outages as a real cluster has them: refused connections ([`FakeApiServer::go_down`]),
//!   a blackholed server that answers nothing ([`FakeApiServer::go_dark`]), a quiet return
//!   ([`FakeApiServer::come_back`] sends nothing), a restart that loses the watch history
//!   ([`FakeApiServer::restart`]: every old resourceVersion gets 410), compaction, dropped
//!   and stalled watch streams, injected error statuses and latency, 429 + Retry-After
//!   ([`FakeApiServer::throttle`]), a lagging watch cache ([`watch_cache`]: stale
//!   `resourceVersion=0` lists, 504 "Too large resource version" after 3 s);
//! - Terminating namespaces ([`termination`]: creates in them are 403) and Event validation
//!   per API group ([`validation`]: 422);
//! - `Accept: ...;as=PartialObjectMetadata[List];g=meta.k8s.io` (kube-rs metadata watchers);
//! - optimistic concurrency: a stale `metadata.resourceVersion` in a PUT or patch is a 409,
//!   an existing name on create is a 409 `AlreadyExists`; no-op writes do not bump the
//!   resourceVersion (no MODIFIED event), as on a real API server;
//! - server-side apply with `metadata.managedFields` (see [`apply`] for the
//!   ownership granularity), 409 with one cause per conflicting field, `force=true` moving
//!   ownership; non-apply writers take ownership of what they change (`fieldManager`, else
//!   the user agent's first word, as the real server does; else `unknown`).
//!
//! Simplifications (deliberate; a test that needs more should extend the fixture):
//! - Field ownership is tracked per label/annotation key and per field directly under a
//!   top-level object (`spec.podSelector`, `spec.egress`, ...), each treated as atomic, not
//!   with the full structured-merge schema. Strategic merge patches are applied as JSON merge
//!   patches (lists replaced, no `$patch` directives). `managedFields` sent by a client are
//!   ignored (ownership is always computed from the stored object).
//! - Deletion is immediate: no graceful pod termination (use
//!   [`FakeApiServer::mark_pod_terminating`] for the `deletionTimestamp` phase), no finalizers;
//!   deleting a namespace deletes its objects at once (each with a DELETED event).
//! - core/v1 and events.k8s.io/v1 Events are stored apart (a real server converts between
//!   them); [`FakeApiServer::events`] returns both.
//! - Authentication by bearer token only (no client certificates, no anonymous user): a
//!   request without a token, or with one the fixture did not issue, is a 401. Each
//!   [`rbac::Identity`] has its own token: the test admin ([`FakeApiServer::kubeconfig_yaml`],
//!   `system:masters`, allowed everything) and the node agent's and controller's
//!   ServiceAccounts ([`FakeApiServer::kubeconfig_yaml_as`]), which get exactly what the RBAC
//!   of the rendered manifests grants them (see [`rbac`]); anything else is a 403. A
//!   ServiceAccount's 403 fails the test when the server is dropped, and every call the
//!   ServiceAccounts were granted is appended to `target/api-calls-observed/` (see
//!   [`observed`]) for `cargo xtask test` to check against deploy/api-calls.yaml.
//!   [`FakeApiServer::requests`] records identity, verb, group, resource, subresource and
//!   namespace of each request.
//! - No admission but NamespaceLifecycle, no validation beyond type/name/namespace
//!   consistency and Events; subresources (`status`, `scale`, ...) are 404. A DELETE of a
//!   namespace through the API is still immediate (only the control methods make one
//!   Terminating).
//! - Responses are JSON only (no protobuf, no Table, no aggregated discovery: clients fall
//!   back to the legacy documents).

pub mod apply;
pub mod bulk;
pub mod discovery;
pub mod faults;
pub mod observed;
pub mod rbac;
pub mod resources;
pub mod selectors;
pub mod server;
pub mod status;
pub mod store;
pub mod termination;
pub mod throttle;
pub mod tls;
pub mod traffic;
pub mod validation;
pub mod watch;
pub mod watch_cache;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{atomic::AtomicUsize, Arc, Mutex, MutexGuard, OnceLock, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use serde_json::{json, Value};

pub use self::resources::Kind;
use self::{faults::Faults, store::Store};

pub(crate) type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Locks, ignoring poisoning: the fixture must keep answering after a bug in one request.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The bearer token in the kubeconfig the fixture writes.
pub const FAKE_TOKEN: &str = "datalab-guard-fixture-token";

/// The default interval between BOOKMARK events on watches that allow them: about a
/// minute, as a real API server's watch cache sends them.
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(60);

/// How long a watch without `timeoutSeconds` (or with 0) lasts: a random time in this
/// range, as the real API server picks one between `--min-request-timeout` and twice that
/// (here the 5–10 min client-go asks for, so a test never sees a watch that lasts forever).
pub const DEFAULT_WATCH_TIMEOUT: (Duration, Duration) =
    (Duration::from_secs(300), Duration::from_secs(600));

/// How a watch from a resourceVersion older than the history is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExpiredWatch {
    /// HTTP 200, one ERROR event carrying a 410 `Expired` Status, end of stream: what the
    /// real API server's watch cache does.
    #[default]
    ErrorEvent,
    /// HTTP 410 `Expired` on the watch request itself (what a watch served from etcd, or an
    /// aggregated API server, can answer).
    HttpGone,
}

pub(crate) struct Settings {
    pub bookmark_interval: Duration,
    pub default_watch_timeout: (Duration, Duration),
    pub expired_watch: ExpiredWatch,
    /// The resourceVersion the watch cache is stuck at ([`FakeApiServer::lag_watch_cache`]).
    pub cache_frozen_at: Option<u64>,
}

impl Settings {
    /// A watch's lifetime: `requested` if the client asked for one, else a random pick in
    /// the default range.
    pub fn watch_timeout(&self, requested: Option<Duration>) -> Duration {
        if let Some(t) = requested.filter(|t| !t.is_zero()) {
            return t;
        }
        let (min, max) = self.default_watch_timeout;
        min + (max.saturating_sub(min)).mul_f64(unit_random())
    }
}

/// A number in [0, 1): std's randomly keyed SipHash of nothing (no rand crate in the kit).
pub(crate) fn unit_random() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// State shared by the handle, the accept loops, the connections and the watch tasks.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    /// The store's resourceVersion after each change: wakes the watch tasks.
    pub changed: tokio::sync::watch::Sender<u64>,
    /// Bumped by `drop_watches()` and `go_down()`: every open watch ends.
    pub dropper: tokio::sync::watch::Sender<u64>,
    /// Bumped by `stall_watches()`: every open watch stops sending, without ending.
    pub staller: tokio::sync::watch::Sender<u64>,
    /// True while the server is blackholed (`go_dark()`): requests are held unanswered and
    /// their connections cut when it comes back.
    pub dark: tokio::sync::watch::Sender<bool>,
    pub faults: Mutex<Faults>,
    pub requests: Mutex<Vec<RequestLog>>,
    /// When each request came and how many bytes its response took ([`traffic`]).
    pub traffic: traffic::Traffic,
    pub settings: Mutex<Settings>,
    pub open_watches: AtomicUsize,
    pub token: String,
    /// Every bearer token issued, and whose it is.
    pub tokens: Mutex<BTreeMap<String, rbac::Identity>>,
    /// The rendered manifests whose RBAC is enforced (`target/manifests/<variant>.yaml`).
    pub rbac_variant: Mutex<String>,
    /// Set by [`FakeApiServer::expect_forbidden`]: a 403 does not fail the test on drop.
    pub forbidden_expected: std::sync::atomic::AtomicBool,
    /// Set by [`FakeApiServer::insecure_port_admin`].
    pub insecure_port_admin: std::sync::atomic::AtomicBool,
    /// Set once the first bind has picked the port; every rebind uses the same one.
    pub addr: OnceLock<SocketAddr>,
    /// HTTPS with a per-fixture CA ([`FakeApiServer::start_tls`]); plain HTTP without.
    pub tls: Option<Arc<tls::ServerTls>>,
}

impl Shared {
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .get()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Runs a write against the store and wakes the watches if it changed anything.
    pub fn mutate<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let (r, before, after) = {
            let mut store = lock(&self.store);
            let before = store.rv();
            let r = f(&mut store);
            (r, before, store.rv())
        };
        if after != before {
            self.changed.send_replace(after);
        }
        r
    }
}

/// One request the fixture answered, as an audit log would show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    /// The URL path, e.g. `/api/v1/namespaces/default/pods`.
    pub path: String,
    /// The raw (percent-encoded) query string; see [`RequestLog::param`].
    pub query: String,
    /// The HTTP status answered (200 for a watch that started streaming).
    pub status: u16,
    /// The Kubernetes verb: get, list, watch, create, update, patch, delete,
    /// deletecollection; empty for non-resource requests (discovery, health).
    pub verb: String,
    /// Who sent it: deploy/api-calls.yaml's identity name (`node-agent`, `controller`) or
    /// `admin`; None when authentication failed (401).
    pub user: Option<String>,
    /// For a granted resource request of a ServiceAccount: where the grant came from, as
    /// api-calls.yaml's `scope` (`cluster`, `agent-namespace`).
    pub grant_scope: Option<String>,
    /// Verbs the request was authorized as besides `verb`: `create` for a server-side
    /// apply that creates its object.
    pub also_authorized_as: Vec<String>,
    /// The API group (`""` for core) for resource requests.
    pub api_group: Option<String>,
    /// The resource (`pods`, `leases`, or `namespaces/status` for a subresource).
    pub resource: Option<String>,
    /// The subresource alone (`status`), if any.
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub user_agent: Option<String>,
    pub bearer_token: Option<String>,
    /// Answered by `fail_next` rather than by the API.
    pub injected_fault: bool,
}

impl RequestLog {
    /// A decoded query parameter.
    pub fn param(&self, key: &str) -> Option<String> {
        server::parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub fn is_watch(&self) -> bool {
        self.verb == "watch"
    }

    /// POST, PUT, PATCH or DELETE.
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }

    /// Sent by a process whose `User-Agent` is `datalab-guard-<component>/...` (`node` or
    /// `controller`).
    pub fn sent_by(&self, component: &str) -> bool {
        self.user_agent
            .as_deref()
            .is_some_and(|ua| ua.starts_with(&format!("datalab-guard-{component}/")))
    }

    /// Whether the request asked for metadata only (`as=PartialObjectMetadata[List]`).
    pub fn metadata_only(&self) -> bool {
        self.accept
            .as_deref()
            .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
    }
}

/// The requests of a node agent (on `node`) that break its read-only contract (issue 10): any
/// write but an Event (create/patch) or a patch of its own Node (the startup taint); any
/// request for Leases or NetworkPolicies; listing or watching Nodes; namespaces read other
/// than as metadata. Empty when the agent kept to it.
pub fn node_agent_violations(requests: &[RequestLog], node: &str) -> Vec<RequestLog> {
    requests
        .iter()
        .filter(|r| r.sent_by("node"))
        .filter(|r| {
            let resource = r.resource.as_deref().unwrap_or_default();
            let allowed_write = match resource {
                "events" => matches!(r.method.as_str(), "POST" | "PATCH"),
                "nodes" => r.method == "PATCH" && r.name.as_deref() == Some(node),
                _ => false,
            };
            let forbidden_read = match resource {
                "leases" | "networkpolicies" => true,
                "nodes" => r.verb == "list" || r.verb == "watch",
                "namespaces" => !r.metadata_only(),
                _ => false,
            };
            (r.is_write() && !allowed_write) || forbidden_read
        })
        .cloned()
        .collect()
}

/// A pod as the fixture's control methods create it: what datalab-guard reads from pods
/// (node, labels, hostNetwork, QoS class, phase, container IDs) without the rest.
#[derive(Clone, Debug)]
pub struct PodBuilder {
    namespace: String,
    name: String,
    uid: Option<String>,
    node_name: Option<String>,
    labels: BTreeMap<String, String>,
    host_network: bool,
    qos_class: String,
    phase: String,
    pod_ip: Option<String>,
    containers: Vec<(String, Option<String>)>,
}

impl PodBuilder {
    /// A Running BestEffort pod with one container `main` (with a containerd container ID),
    /// not scheduled until [`PodBuilder::node`] is called.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: None,
            node_name: None,
            labels: BTreeMap::new(),
            host_network: false,
            qos_class: "BestEffort".into(),
            phase: "Running".into(),
            pod_ip: None,
            containers: Vec::new(),
        }
    }

    /// Without it the server keeps the existing pod's uid, or generates one.
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_string());
        self
    }

    /// `spec.nodeName`.
    pub fn node(mut self, node: &str) -> Self {
        self.node_name = Some(node.to_string());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn host_network(mut self, host_network: bool) -> Self {
        self.host_network = host_network;
        self
    }

    /// `status.qosClass`: `Guaranteed`, `Burstable` or `BestEffort`.
    pub fn qos_class(mut self, qos: &str) -> Self {
        self.qos_class = qos.to_string();
        self
    }

    /// `status.phase`: `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_string();
        self
    }

    pub fn pod_ip(mut self, ip: &str) -> Self {
        self.pod_ip = Some(ip.to_string());
        self
    }

    /// A container and its `containerStatuses[].containerID` (e.g. `containerd://<64 hex>`;
    /// None: not started yet).
    pub fn container(mut self, name: &str, container_id: Option<&str>) -> Self {
        self.containers
            .push((name.to_string(), container_id.map(str::to_string)));
        self
    }

    pub fn build(&self) -> Value {
        let containers = if self.containers.is_empty() {
            let id: String = format!("{}{}", self.namespace, self.name)
                .bytes()
                .cycle()
                .take(32)
                .map(|b| format!("{b:02x}"))
                .collect();
            vec![("main".to_string(), Some(format!("containerd://{id}")))]
        } else {
            self.containers.clone()
        };
        let now = store::now_rfc3339();
        let mut metadata = json!({"name": self.name, "namespace": self.namespace});
        if let Some(uid) = &self.uid {
            metadata["uid"] = json!(uid);
        }
        if !self.labels.is_empty() {
            metadata["labels"] = json!(self.labels);
        }
        let mut spec = json!({
            "containers": containers.iter().map(|(n, _)| json!({
                "name": n,
                "image": "registry.invalid/datalab/test:latest",
            })).collect::<Vec<_>>(),
        });
        if let Some(node) = &self.node_name {
            spec["nodeName"] = json!(node);
        }
        if self.host_network {
            spec["hostNetwork"] = json!(true);
        }
        let mut status = json!({
            "phase": self.phase,
            "qosClass": self.qos_class,
            "containerStatuses": containers.iter().map(|(n, id)| {
                let mut s = json!({
                    "name": n,
                    "image": "registry.invalid/datalab/test:latest",
                    "imageID": "",
                    "ready": id.is_some(),
                    "restartCount": 0,
                    "started": id.is_some(),
                    "state": if id.is_some() {
                        json!({"running": {"startedAt": now}})
                    } else {
                        json!({"waiting": {"reason": "ContainerCreating"}})
                    },
                });
                if let Some(id) = id {
                    s["containerID"] = json!(id);
                }
                s
            }).collect::<Vec<_>>(),
        });
        if let Some(ip) = &self.pod_ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status})
    }
}

impl From<PodBuilder> for Value {
    fn from(p: PodBuilder) -> Value {
        p.build()
    }
}

impl From<&PodBuilder> for Value {
    fn from(p: &PodBuilder) -> Value {
        p.build()
    }
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

/// The API server fixture. Dropping it stops the server.
///
/// Control methods act as the cluster would (a controller, kubelet or admin): they bump the
/// global resourceVersion and emit watch events exactly as API writes do, and appear in
/// `managedFields` as the `Update` manager `datalab-guard-tests`. They panic on misuse (e.g. a
/// pod in a namespace that does not exist): they are test code.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    listener: Mutex<Option<server::Listener>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    /// Starts the server on `127.0.0.1:<ephemeral port>` with the system namespaces
    /// (`default`, `kube-system`, `kube-public`, `kube-node-lease`), plain HTTP.
    pub fn start() -> FakeApiServer {
        Self::start_with(None)
    }

    /// Like [`FakeApiServer::start`], but serving HTTPS with a certificate from a CA made
    /// for this fixture; [`FakeApiServer::kubeconfig_yaml`] then carries that CA as
    /// `certificate-authority-data`, so clients verify the server as on a real cluster.
    pub fn start_tls() -> FakeApiServer {
        Self::start_with(Some(tls::ServerTls::generate()))
    }

    fn start_with(tls: Option<tls::ServerTls>) -> FakeApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .expect("fake API server: tokio runtime");
        let store = Store::new();
        let rv = store.rv();
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changed: tokio::sync::watch::Sender::new(rv),
            dropper: tokio::sync::watch::Sender::new(0),
            staller: tokio::sync::watch::Sender::new(0),
            dark: tokio::sync::watch::Sender::new(false),
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
            traffic: traffic::Traffic::default(),
            settings: Mutex::new(Settings {
                bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
                default_watch_timeout: DEFAULT_WATCH_TIMEOUT,
                expired_watch: ExpiredWatch::default(),
                cache_frozen_at: None,
            }),
            open_watches: AtomicUsize::new(0),
            token: FAKE_TOKEN.to_string(),
            tokens: Mutex::new(
                [
                    rbac::Identity::Admin,
                    rbac::Identity::NodeAgent,
                    rbac::Identity::Controller,
                ]
                .into_iter()
                .map(|i| (i.default_token().to_string(), i))
                .collect(),
            ),
            rbac_variant: Mutex::new(rbac::DEFAULT_VARIANT.to_string()),
            forbidden_expected: std::sync::atomic::AtomicBool::new(false),
            insecure_port_admin: std::sync::atomic::AtomicBool::new(false),
            addr: OnceLock::new(),
            tls: tls.map(Arc::new),
        });
        let (addr, listener) = server::spawn_listener(
            &runtime,
            shared.clone(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .expect("fake API server: bind 127.0.0.1:0");
        let _ = shared.addr.set(addr);
        FakeApiServer {
            shared,
            listener: Mutex::new(Some(listener)),
            runtime: Some(runtime),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr()
    }

    /// `http://127.0.0.1:<port>`, or `https://` after [`FakeApiServer::start_tls`].
    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.shared.addr())
    }

    /// The PEM of the CA that signed the server's certificate (HTTPS fixtures only).
    pub fn ca_pem(&self) -> Option<String> {
        self.shared.tls.as_ref().map(|t| t.ca_pem())
    }

    /// Connections the HTTPS fixture refused before HTTP: plaintext ones and failed
    /// handshakes (all zero for a plain HTTP fixture).
    pub fn tls_stats(&self) -> Option<Arc<tls::TlsStats>> {
        self.shared.tls.as_ref().map(|t| t.stats.clone())
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// A kubeconfig for this server as the test admin: bearer token [`FAKE_TOKEN`], default
    /// namespace `default`; for an HTTPS fixture, the fixture's CA as
    /// `certificate-authority-data`. kube-rs sends the token over http too (it only refuses
    /// https without a TLS stack).
    pub fn kubeconfig_yaml(&self) -> String {
        self.kubeconfig_yaml_with_token(&self.shared.token)
    }

    /// [`FakeApiServer::kubeconfig_yaml`] with `ca_pem` as the cluster's CA (a wrong one,
    /// for tests of what a client does when it cannot verify the server), or none.
    pub fn kubeconfig_yaml_trusting(&self, ca_pem: Option<&str>) -> String {
        self.kubeconfig(&self.shared.token, ca_pem)
    }

    /// A kubeconfig that authenticates as `who` (its first token). For a ServiceAccount,
    /// the RBAC this server enforces is loaded now, so a missing or stale render fails here
    /// with the command that fixes it.
    pub fn kubeconfig_yaml_as(&self, who: rbac::Identity) -> String {
        if who != rbac::Identity::Admin {
            let variant = lock(&self.shared.rbac_variant).clone();
            if let Err(e) = rbac::rendered_policy(&variant) {
                panic!("fake API server: {e}");
            }
        }
        self.kubeconfig_yaml_with_token(who.default_token())
    }

    /// Writes [`FakeApiServer::kubeconfig_yaml_as`] to `path`.
    pub fn write_kubeconfig_as(
        &self,
        path: impl AsRef<Path>,
        who: rbac::Identity,
    ) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml_as(who))
    }

    /// Accepts `token` as another token of `who` from now on (two replicas of one
    /// Deployment hold different tokens of the same ServiceAccount; the request log's
    /// `bearer_token` tells them apart). Panics if the token belongs to someone else.
    pub fn add_token(&self, who: rbac::Identity, token: &str) {
        let old = lock(&self.shared.tokens).insert(token.to_string(), who);
        assert!(
            old.is_none_or(|o| o == who),
            "fake API server: token {token:?} already belongs to {old:?}"
        );
    }

    /// Enforces the RBAC of `target/manifests/<variant>.yaml` (e.g. `base_psa-labels`)
    /// instead of the base's. Panics if it cannot be read.
    pub fn use_rbac_variant(&self, variant: &str) {
        if let Err(e) = rbac::rendered_policy(variant) {
            panic!("fake API server: {e}");
        }
        *lock(&self.shared.rbac_variant) = variant.to_string();
    }

    /// A request without credentials is the admin, as on the API server's old insecure
    /// port: for kubectl, whose client-go never sends a bearer token over plain http. Only
    /// for tests that run no agent (an agent that lost its token would pass as the admin).
    pub fn insecure_port_admin(&self) {
        self.shared
            .insecure_port_admin
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// This test provokes 403s on purpose: they do not fail it when the server is dropped.
    pub fn expect_forbidden(&self) {
        self.shared
            .forbidden_expected
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A kubeconfig carrying `token` (and, for an HTTPS fixture, its CA).
    pub fn kubeconfig_yaml_with_token(&self, token: &str) -> String {
        self.kubeconfig(token, self.ca_pem().as_deref())
    }

    fn kubeconfig(&self, token: &str, ca_pem: Option<&str>) -> String {
        use base64::Engine as _;
        let ca = ca_pem.map_or_else(String::new, |pem| {
            format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            )
        });
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n{ca}\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             preferences: {{}}\n\
             users:\n\
             - name: fake\n  user:\n    token: {token}\n",
            url = self.url(),
        )
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv()
    }

    // ---- state ----

    fn put(&self, kind: Kind, obj: Value, what: &str) -> Value {
        self.shared
            .mutate(|s| s.fixture_put(kind, obj))
            .unwrap_or_else(|e| panic!("fake API server: {what}: {}", e.message))
    }

    /// Creates the namespace or replaces its labels with `labels` (plus the automatic
    /// `kubernetes.io/metadata.name`).
    pub fn apply_namespace(&self, name: &str, labels: &[(&str, &str)]) -> Value {
        let obj = match self.get(Kind::Namespace, None, name) {
            Some(mut ns) => {
                ns["metadata"]["labels"] = labels_json(labels);
                ns
            }
            None => json!({"metadata": {"name": name, "labels": labels_json(labels)}}),
        };
        self.put(Kind::Namespace, obj, "apply_namespace")
    }

    /// Replaces the labels of an existing namespace (panics if it does not exist).
    pub fn set_namespace_labels(&self, name: &str, labels: &[(&str, &str)]) -> Value {
        let mut ns = self.get(Kind::Namespace, None, name).unwrap_or_else(|| {
            panic!("fake API server: set_namespace_labels: no namespace {name:?}")
        });
        ns["metadata"]["labels"] = labels_json(labels);
        self.put(Kind::Namespace, ns, "set_namespace_labels")
    }

    /// Starts deleting the namespace as a real cluster does (see [`termination`]): it gets a
    /// `deletionTimestamp` and the phase `Terminating` and stays, with everything in it,
    /// until [`FakeApiServer::delete_namespace`]; meanwhile creates in it are refused (403).
    pub fn terminate_namespace(&self, name: &str) -> Value {
        let ns = self.get(Kind::Namespace, None, name).unwrap_or_else(|| {
            panic!("fake API server: terminate_namespace: no namespace {name:?}")
        });
        self.put(
            Kind::Namespace,
            termination::mark_terminating(ns),
            "terminate_namespace",
        )
    }

    /// Deletes the namespace and everything in it.
    pub fn delete_namespace(&self, name: &str) -> Option<Value> {
        self.delete(Kind::Namespace, None, name)
    }

    /// Creates or replaces a pod ([`PodBuilder`] or a full JSON object). Its namespace must
    /// exist. A different uid than the existing pod's is a delete and a re-create.
    pub fn apply_pod(&self, pod: impl Into<Value>) -> Value {
        self.put(Kind::Pod, pod.into(), "apply_pod")
    }

    /// Sets `metadata.deletionTimestamp` (graceful deletion started; the pod still exists).
    pub fn mark_pod_terminating(&self, namespace: &str, name: &str) -> Value {
        let mut pod = self
            .get(Kind::Pod, Some(namespace), name)
            .unwrap_or_else(|| panic!("fake API server: no pod {namespace}/{name}"));
        pod["metadata"]["deletionTimestamp"] = json!(store::now_rfc3339());
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        self.put(Kind::Pod, pod, "mark_pod_terminating")
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.delete(Kind::Pod, Some(namespace), name)
    }

    /// Creates or replaces a Ready node with `spec.podCIDR(s)` (one per family for
    /// dual-stack) and an InternalIP address.
    pub fn apply_node(&self, name: &str, pod_cidrs: &[&str]) -> Value {
        let mut spec = json!({"podCIDRs": pod_cidrs});
        if let Some(first) = pod_cidrs.first() {
            spec["podCIDR"] = json!(first);
        }
        let node = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": spec,
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.10"}, {"type": "Hostname", "address": name}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        });
        self.put(Kind::Node, node, "apply_node")
    }

    /// Creates or replaces any object of a served kind, exactly as given.
    pub fn apply_object(&self, kind: Kind, obj: Value) -> Value {
        self.put(kind, obj, "apply_object")
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds).
    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        self.shared
            .mutate(|s| s.fixture_delete(kind, namespace.unwrap_or(""), name))
    }

    /// The stored object (with apiVersion and kind).
    pub fn get(&self, kind: Kind, namespace: Option<&str>, name: &str) -> Option<Value> {
        let ns = if kind.is_namespaced() {
            namespace.unwrap_or("")
        } else {
            ""
        };
        lock(&self.shared.store).get(kind, ns, name).cloned()
    }

    /// Every stored object of `kind`, in (namespace, name) order.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        lock(&self.shared.store)
            .objects(kind, None)
            .into_iter()
            .cloned()
            .collect()
    }

    /// Every Event posted (core/v1 and events.k8s.io/v1), oldest first.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.shared.store).by_creation(&[Kind::Event, Kind::EventV1])
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestLog> {
        lock(&self.shared.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared
            .open_watches
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Interval between BOOKMARK events, for watches started from now on (default
    /// [`DEFAULT_BOOKMARK_INTERVAL`], about a minute).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        lock(&self.shared.settings).bookmark_interval = interval.max(Duration::from_millis(10));
    }

    /// The range a watch's lifetime is picked from when the client sends no `timeoutSeconds`
    /// (or 0), for watches started from now on (default [`DEFAULT_WATCH_TIMEOUT`]). An
    /// explicit `timeoutSeconds` is always honoured.
    pub fn set_default_watch_timeout(&self, min: Duration, max: Duration) {
        lock(&self.shared.settings).default_watch_timeout = (min, max.max(min));
    }

    /// How watches from an expired resourceVersion are refused from now on (default: an
    /// ERROR 410 event in a 200 stream).
    pub fn set_expired_watch(&self, how: ExpiredWatch) {
        lock(&self.shared.settings).expired_watch = how;
    }

    /// The watch cache stops following etcd (see [`watch_cache`]): from now on, lists with
    /// `resourceVersion=0` are served as of now (stale once anything changes), watches
    /// deliver nothing newer, and a request from a newer resourceVersion (e.g. one a
    /// consistent list handed out) waits 3 s, then gets 504 "Too large resource version".
    pub fn lag_watch_cache(&self) {
        let rv = self.resource_version();
        lock(&self.shared.settings).cache_frozen_at = Some(rv);
    }

    /// The watch cache catches up: held requests go on and every open watch receives the
    /// changes it missed.
    pub fn catch_up_watch_cache(&self) {
        lock(&self.shared.settings).cache_frozen_at = None;
        let rv = self.resource_version();
        self.shared.changed.send_replace(rv);
    }

    /// How many changes the watch history keeps (default 10 000); older resourceVersions
    /// then get 410 Gone.
    pub fn set_history_limit(&self, limit: usize) {
        lock(&self.shared.store).set_history_limit(limit);
    }

    // ---- faults ----

    /// Ends every open watch stream now (cleanly, as when an API server instance restarts
    /// its watch cache); clients re-watch from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.dropper.send_modify(|g| *g += 1);
    }

    /// Every open watch stream goes silent (no event, no bookmark) without ending, as when a
    /// load balancer or NAT in between forgets the flow. New watches are not affected.
    pub fn stall_watches(&self) {
        self.shared.staller.send_modify(|g| *g += 1);
    }

    /// Answers the next `n` requests (any path) with `status` and a Status body.
    pub fn fail_next(&self, n: u32, status: u16) {
        lock(&self.shared.faults).fail_next(n, status);
    }

    /// API Priority and Fairness turns a flow away: for `window`, every request whose verb
    /// is in `verbs` (`list`, `watch`, `get`, `create`, `update`, `patch`, `delete`, ...) gets
    /// `429 Too Many Requests` with `Retry-After: <retry_after in s>` (header and
    /// `details.retryAfterSeconds`), logged with `injected_fault`.
    pub fn throttle(&self, verbs: &[&str], retry_after: Duration, window: Duration) {
        lock(&self.shared.faults).throttle =
            Some(throttle::Throttle::new(verbs, retry_after, window));
    }

    /// Delays every response by `latency` (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.shared.faults).latency = latency;
    }

    /// Forgets the watch history: every resourceVersion handed out so far becomes too old,
    /// so watches from them get an ERROR 410 Expired event and `continue` tokens a 410.
    /// Open watches are not interrupted.
    pub fn compact(&self) {
        // Deliberately no wake-up: open watches must not move past the compaction by
        // themselves, so that a client re-watching from its last bookmark gets 410.
        lock(&self.shared.store).compact();
    }

    /// The API server goes away: the listening socket is closed (connections are refused)
    /// and every open connection, watch streams included, is cut. State is kept.
    pub fn go_down(&self) {
        let listener = lock(&self.listener).take();
        if let Some(l) = listener {
            self.drop_watches();
            l.shutdown();
            // Nothing can open a new watch now: wait for the streams' tasks to finish, so
            // that the server is really gone when this returns.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.open_watches() > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// The API server becomes unreachable the way a network partition does: every open
    /// watch is cut, then every request (on new or kept-alive connections) is held without
    /// an answer until [`FakeApiServer::come_back`], which cuts those connections. Clients
    /// see no refusal, only silence: they must time out by themselves.
    pub fn go_dark(&self) {
        self.shared.dark.send_replace(true);
        self.drop_watches();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.open_watches() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// An API server restart: connections refused for a moment, every watch cut, and the
    /// watch history lost, so every client re-watching from a resourceVersion it had gets
    /// 410 Gone and must relist (the new instance's watch cache starts at the current
    /// resourceVersion). Objects are kept (they live in etcd).
    pub fn restart(&self) {
        self.go_down();
        self.compact();
        self.come_back();
    }

    /// The API server is back on the same address, with the same state (after
    /// [`FakeApiServer::go_down`] or [`FakeApiServer::go_dark`]). Nothing is sent to
    /// clients because of it: a client that re-watches from its last resourceVersion gets
    /// no event until something changes (or the next bookmark).
    pub fn come_back(&self) {
        self.shared.dark.send_replace(false);
        let mut slot = lock(&self.listener);
        if slot.is_some() {
            return;
        }
        let Some(rt) = self.runtime.as_ref() else {
            return;
        };
        *slot = Some(bind_retrying(rt, &self.shared, self.shared.addr()));
    }

    /// Down ([`FakeApiServer::go_down`]) or dark ([`FakeApiServer::go_dark`]).
    pub fn is_down(&self) -> bool {
        lock(&self.listener).is_none() || *self.shared.dark.borrow()
    }
}

fn bind_retrying(
    rt: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
    addr: SocketAddr,
) -> server::Listener {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match server::spawn_listener(rt, shared.clone(), addr) {
            Ok((_, l)) => return l,
            // Nothing else should hold our port, but give a straggler a moment.
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("fake API server: cannot bind {addr}: {e}"),
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(l) = lock(&self.listener).take() {
            self.shared.dropper.send_modify(|g| *g += 1);
            l.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            // Safe in async tests too (a plain drop would block inside a runtime).
            rt.shutdown_background();
        }
        let requests = self.requests();
        if let Err(e) = observed::append(&requests) {
            eprintln!("fake API server: cannot record the observed API calls: {e}");
        }
        let expected = self
            .shared
            .forbidden_expected
            .load(std::sync::atomic::Ordering::SeqCst);
        let denied = observed::forbidden(&requests);
        if !denied.is_empty() && !expected && std::thread::panicking() {
            // Not a second panic (it would abort the test binary), but the likely cause.
            eprintln!(
                "fake API server: the API server refused {} call(s) of datalab-guard's \
                 ServiceAccounts (403), which may be why this test failed:\n{}",
                denied.len(),
                denied.join("\n")
            );
        } else if !denied.is_empty() && !expected {
            panic!(
                "the API server refused {} call(s) of datalab-guard's ServiceAccounts (403): \
                 the RBAC in deploy/ does not grant them (a real cluster would refuse them \
                 too):\n{}",
                denied.len(),
                denied.join("\n")
            );
        }
    }
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url())
            .field("down", &self.is_down())
            .finish()
    }
}
