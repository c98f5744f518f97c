//! Tests of the API server fixture itself, with kube-rs as the client: if these fail, the
//! Kubernetes-side tests of datalab-guard built on the fixture cannot be trusted either way.
//!
//! No root needed: the fixture only binds 127.0.0.1.

use std::{
    borrow::Borrow,
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use datalab_guard_tests::{
    apiserver::{rbac::Identity, Kind, FAKE_TOKEN},
    FakeApiServer, PodBuilder,
};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Namespace, ObjectReference, Pod},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    api::{
        Api, DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams, PostParams,
        WatchEvent, WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector,
        reflector::Store,
        watcher, WatchStreamExt as _,
    },
    Client, Config, ResourceExt as _,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn client(server: &FakeApiServer) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig_yaml()).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube-rs accepts the kubeconfig");
    Client::try_from(config).expect("client")
}

/// Polls `cond` until it holds, or panics after `timeout` with `what`.
async fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn names<K: kube::Resource>(objs: impl IntoIterator<Item = impl Borrow<K>>) -> BTreeSet<String> {
    objs.into_iter()
        .map(|o| o.borrow().meta().name.clone().unwrap_or_default())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A pod reflector as the agent runs it: pods of one node, default watcher config, default
/// backoff. Returns the store and the task driving it.
async fn pod_reflector(client: Client, node: &str) -> (Store<Pod>, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store::<Pod>();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = reflector(
        writer,
        watcher(Api::<Pod>::all(client), config).default_backoff(),
    );
    let task = tokio::spawn(async move {
        stream.for_each(|_| async {}).await;
    });
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .expect("reflector ready in time")
        .expect("writer alive");
    (reader, task)
}

fn pod_names(store: &Store<Pod>) -> BTreeSet<String> {
    names::<Pod>(store.state())
}

fn list_count(server: &FakeApiServer, resource: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.verb == "list" && r.resource.as_deref() == Some(resource))
        .count()
}

/// One raw HTTP/1.1 request with `Connection: close`: status and body.
fn raw(
    server: &FakeApiServer,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {FAKE_TOKEN}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr(),
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn kubeconfig_discovery_and_token() {
    let server = FakeApiServer::start();
    let dir = std::env::temp_dir().join(format!("dg-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    let client = Client::try_from(config).unwrap();

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );
    let core = client.list_core_api_versions().await.unwrap();
    assert_eq!(core.versions, vec!["v1".to_string()]);
    let groups = client.list_api_groups().await.unwrap();
    let group_names: BTreeSet<_> = groups.groups.iter().map(|g| g.name.as_str()).collect();
    for g in ["coordination.k8s.io", "events.k8s.io", "networking.k8s.io"] {
        assert!(group_names.contains(g), "{g} missing from {group_names:?}");
    }
    let res = client
        .list_api_group_resources("networking.k8s.io/v1")
        .await
        .unwrap();
    assert!(res
        .resources
        .iter()
        .any(|r| r.name == "networkpolicies" && r.namespaced));
    let core_res = client.list_core_api_resources("v1").await.unwrap();
    assert!(core_res
        .resources
        .iter()
        .any(|r| r.name == "namespaces" && !r.namespaced));

    // The bearer token travels over plain http.
    let reqs = server.requests();
    assert!(
        reqs.iter()
            .all(|r| r.bearer_token.as_deref() == Some(FAKE_TOKEN)),
        "{reqs:?}"
    );
    assert!(reqs.iter().any(|r| r.path == "/version" && r.status == 200));

    // A wrong token is a 401 with a Status body.
    let mut s = TcpStream::connect(server.addr()).unwrap();
    write!(
        s,
        "GET /api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
}

/// One GET with `token` (None: no Authorization header): status and body as JSON (Null
/// when not JSON).
fn get_as(server: &FakeApiServer, token: Option<&str>, path: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn service_accounts_get_only_what_the_rendered_rbac_grants() {
    let server = FakeApiServer::start();
    // This test provokes 403s on purpose.
    server.expect_forbidden();
    server.apply_namespace("datalab-guard", &[]);
    let node = Some(Identity::NodeAgent.default_token());
    let controller = Some(Identity::Controller.default_token());

    // Granted by the base's ClusterRole: list pods everywhere.
    assert_eq!(get_as(&server, node, "/api/v1/pods").0, 200);
    // Discovery: any authenticated user.
    assert_eq!(get_as(&server, node, "/apis").0, 200);
    // No token, or one the server never issued: 401 with a Status.
    let (code, body) = get_as(&server, None, "/api/v1/pods");
    assert_eq!((code, body["reason"].as_str()), (401, Some("Unauthorized")));
    assert_eq!(get_as(&server, Some("made-up"), "/version").0, 401);

    // The node agent may not read NetworkPolicies (the controller may).
    let np = "/apis/networking.k8s.io/v1/networkpolicies";
    let (code, body) = get_as(&server, node, np);
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["reason"], "Forbidden");
    assert_eq!(
        body["message"],
        "networkpolicies.networking.k8s.io is forbidden: User \
         \"system:serviceaccount:datalab-guard:datalab-guard-node\" cannot list resource \
         \"networkpolicies\" in API group \"networking.k8s.io\" at the cluster scope"
    );
    assert_eq!(get_as(&server, controller, np).0, 200);

    // The controller's Lease: its Role holds in its own namespace, for its Lease's name only.
    let lease = |ns: &str, name: &str| {
        format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}")
    };
    // Authorized, then not found: the Role granted it.
    assert_eq!(
        get_as(
            &server,
            controller,
            &lease("datalab-guard", "datalab-guard-leader")
        )
        .0,
        404
    );
    assert_eq!(
        get_as(&server, controller, &lease("datalab-guard", "other")).0,
        403
    );
    let (code, body) = get_as(
        &server,
        controller,
        &lease("kube-system", "datalab-guard-leader"),
    );
    assert_eq!(code, 403);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .ends_with("in the namespace \"kube-system\""),
        "{body}"
    );
    assert_eq!(
        get_as(
            &server,
            node,
            &lease("datalab-guard", "datalab-guard-leader")
        )
        .0,
        403
    );
    // The admin may do anything.
    assert_eq!(get_as(&server, Some(FAKE_TOKEN), np).0, 200);

    // The log says who asked, and where a grant came from.
    let log = server.requests();
    let denied: Vec<_> = log.iter().filter(|r| r.status == 403).collect();
    assert_eq!(denied.len(), 4, "{denied:?}");
    assert!(denied.iter().all(|r| r.grant_scope.is_none()));
    let leader = log
        .iter()
        .find(|r| r.status == 404 && r.resource.as_deref() == Some("leases"))
        .unwrap();
    assert_eq!(leader.user.as_deref(), Some("controller"));
    assert_eq!(leader.grant_scope.as_deref(), Some("agent-namespace"));
    let pods = log
        .iter()
        .find(|r| r.path == "/api/v1/pods" && r.status == 200)
        .unwrap();
    assert_eq!(
        (pods.user.as_deref(), pods.grant_scope.as_deref()),
        (Some("node-agent"), Some("cluster"))
    );
}

#[test]
#[should_panic(expected = "refused 1 call(s) of datalab-guard's ServiceAccounts (403)")]
fn a_forbidden_agent_call_fails_the_test() {
    let server = FakeApiServer::start();
    let node = Some(Identity::NodeAgent.default_token());
    assert_eq!(
        get_as(&server, node, "/apis/networking.k8s.io/v1/networkpolicies").0,
        403
    );
    // Dropping the server fails the test, naming the call.
    drop(server);
}

#[tokio::test]
async fn namespaces_list_and_watch_with_label_selectors() {
    let server = FakeApiServer::start();
    server.set_bookmark_interval(Duration::from_millis(200));
    server.apply_namespace(
        "env-a",
        &[("datalab.io/environment", "true"), ("tier", "gold")],
    );
    server.apply_namespace(
        "env-b",
        &[("datalab.io/environment", "true"), ("tier", "silver")],
    );
    server.apply_namespace("plain", &[("tier", "gold")]);
    let api: Api<Namespace> = Api::all(client(&server).await);

    let list = |sel: &'static str| {
        let api = api.clone();
        async move {
            names::<Namespace>(
                api.list(&ListParams::default().labels(sel))
                    .await
                    .unwrap()
                    .items
                    .iter(),
            )
        }
    };
    assert_eq!(
        list("datalab.io/environment=true").await,
        set(&["env-a", "env-b"])
    );
    assert_eq!(
        list("datalab.io/environment==true,tier=gold").await,
        set(&["env-a"])
    );
    assert_eq!(
        list("tier in (gold, silver),datalab.io/environment").await,
        set(&["env-a", "env-b"])
    );
    assert_eq!(list("tier notin (gold),tier").await, set(&["env-b"]));
    assert_eq!(list("!datalab.io/environment,tier").await, set(&["plain"]));
    assert_eq!(list("tier!=gold,tier").await, set(&["env-b"]));
    assert_eq!(
        list("kubernetes.io/metadata.name=default").await,
        set(&["default"]),
        "the automatic namespace name label"
    );
    let all = api.list(&ListParams::default()).await.unwrap();
    for ns in [
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "env-a",
        "env-b",
        "plain",
    ] {
        assert!(all.items.iter().any(|n| n.name_any() == ns), "{ns} missing");
    }
    let bad = api
        .list(&ListParams::default().labels("tier in ("))
        .await
        .unwrap_err();
    assert_eq!(api_error(bad).code, 400);

    let rv = all.metadata.resource_version.clone().unwrap();
    let wp = WatchParams::default().labels("datalab.io/environment=true");
    let mut stream = api.watch(&wp, &rv).await.unwrap().boxed();

    server.set_namespace_labels("plain", &[("datalab.io/environment", "true")]); // starts matching
    server.set_namespace_labels("env-a", &[("tier", "gold")]); // stops matching
    server.set_namespace_labels("env-b", &[("datalab.io/environment", "true"), ("x", "y")]);
    server.apply_namespace("unrelated", &[]);
    server.delete_namespace("env-b");

    let mut seen = Vec::new();
    let mut bookmark = false;
    while seen.len() < 4 || !bookmark {
        let ev = tokio::time::timeout(WAIT, stream.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev {
            WatchEvent::Added(n) => seen.push(("ADDED", n.name_any())),
            WatchEvent::Modified(n) => seen.push(("MODIFIED", n.name_any())),
            WatchEvent::Deleted(n) => seen.push(("DELETED", n.name_any())),
            WatchEvent::Bookmark(b) => {
                let rv: u64 = b.metadata.resource_version.parse().unwrap();
                assert!(rv <= server.resource_version());
                bookmark = true;
            }
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            ("ADDED", "plain".to_string()),
            ("DELETED", "env-a".to_string()),
            ("MODIFIED", "env-b".to_string()),
            ("DELETED", "env-b".to_string()),
        ]
    );
    let w = server
        .requests()
        .into_iter()
        .find(|r| r.is_watch())
        .unwrap();
    assert_eq!(w.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(w.param("resourceVersion"), Some(rv));
    assert_eq!(
        w.param("labelSelector").as_deref(),
        Some("datalab.io/environment=true")
    );
}

#[tokio::test]
async fn pods_field_selector_on_node_name() {
    let server = FakeApiServer::start();
    server.apply_namespace("lab", &[]);
    server.apply_pod(
        PodBuilder::new("lab", "mine")
            .node("node-a")
            .label("app", "x"),
    );
    server.apply_pod(PodBuilder::new("lab", "other").node("node-b"));
    server.apply_pod(PodBuilder::new("default", "unscheduled"));
    let client = client(&server).await;
    let api: Api<Pod> = Api::all(client.clone());
    let lp = ListParams::default().fields("spec.nodeName=node-a");
    let list = api.list(&lp).await.unwrap();
    assert_eq!(names::<Pod>(list.items.iter()), set(&["mine"]));
    let pod = &list.items[0];
    assert_eq!(
        pod.status.as_ref().unwrap().qos_class.as_deref(),
        Some("BestEffort")
    );
    assert!(pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .as_deref()
        .unwrap()
        .starts_with("containerd://"));
    let in_ns: Api<Pod> = Api::namespaced(client.clone(), "lab");
    assert_eq!(
        names::<Pod>(
            in_ns
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
        ),
        set(&["mine", "other"])
    );
    let err = api
        .list(&ListParams::default().fields("spec.bogus=1"))
        .await
        .unwrap_err();
    assert_eq!(api_error(err).code, 400);

    let (store, task) = pod_reflector(client, "node-a").await;
    assert_eq!(pod_names(&store), set(&["mine"]));
    server.apply_pod(PodBuilder::new("lab", "elsewhere").node("node-b"));
    server.apply_pod(
        PodBuilder::new("lab", "mine-2")
            .node("node-a")
            .host_network(true),
    );
    eventually(WAIT, "mine-2 in the reflector", || {
        pod_names(&store).contains("mine-2")
    })
    .await;
    // Rescheduled away from the node: gone from the node's view.
    server.apply_pod(PodBuilder::new("lab", "mine").node("node-b"));
    eventually(WAIT, "mine leaves the reflector", || {
        pod_names(&store) == set(&["mine-2"])
    })
    .await;
    assert!(!pod_names(&store).contains("elsewhere"));
    assert!(!pod_names(&store).contains("other"));
    task.abort();
}

#[tokio::test]
async fn reflector_converges_after_creates_and_deletes() {
    let server = FakeApiServer::start();
    server.apply_namespace("t1", &[]);
    server.apply_namespace("t2", &[]);
    for i in 0..5 {
        server.apply_pod(PodBuilder::new("t1", &format!("p{i}")).node("n"));
    }
    let (store, task) = pod_reflector(client(&server).await, "n").await;
    assert_eq!(pod_names(&store).len(), 5);
    for i in 0..5 {
        server.apply_pod(
            PodBuilder::new("t2", &format!("q{i}"))
                .node("n")
                .phase("Pending"),
        );
    }
    server.delete_pod("t1", "p0");
    server.delete_pod("t1", "p1");
    server.mark_pod_terminating("t1", "p2");
    server.apply_pod(PodBuilder::new("t2", "q0").node("n").phase("Running"));
    server.delete_namespace("t2"); // cascades
    let want = set(&["p2", "p3", "p4"]);
    eventually(WAIT, "reflector == server", || pod_names(&store) == want).await;
    let p2 = store
        .state()
        .into_iter()
        .find(|p| p.name_any() == "p2")
        .unwrap();
    assert!(p2.metadata.deletion_timestamp.is_some());

    // What kube-rs's default watcher really sends.
    let reqs = server.requests();
    let list = reqs.iter().find(|r| r.verb == "list").unwrap();
    assert_eq!(list.path, "/api/v1/pods");
    assert_eq!(
        list.param("fieldSelector").as_deref(),
        Some("spec.nodeName=n")
    );
    assert_eq!(list.param("limit").as_deref(), Some("500"));
    let watch = reqs.iter().find(|r| r.is_watch()).unwrap();
    assert_eq!(watch.param("watch").as_deref(), Some("true"));
    assert_eq!(watch.param("timeoutSeconds").as_deref(), Some("290"));
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert!(watch.param("sendInitialEvents").is_none());
    for r in &reqs {
        eprintln!("{} {} ?{} -> {}", r.method, r.path, r.query, r.status);
    }
    task.abort();
}

#[tokio::test]
async fn dropped_watches_resume_and_compaction_forces_relist() {
    let server = FakeApiServer::start();
    server.apply_namespace("t", &[]);
    server.apply_pod(PodBuilder::new("t", "a").node("n"));
    server.apply_pod(PodBuilder::new("t", "b").node("n"));
    let (store, task) = pod_reflector(client(&server).await, "n").await;
    eventually(WAIT, "a watch is open", || server.open_watches() == 1).await;
    let lists = list_count(&server, "pods");
    assert_eq!(lists, 1);

    // Dropped without compaction: the watcher re-watches from its resourceVersion, and the
    // history replays what it missed; no re-list.
    server.drop_watches();
    server.apply_pod(PodBuilder::new("t", "c").node("n"));
    eventually(WAIT, "c after drop", || {
        pod_names(&store) == set(&["a", "b", "c"])
    })
    .await;
    assert_eq!(
        list_count(&server, "pods"),
        1,
        "no re-list after a plain drop"
    );

    // Compacted then dropped: the re-watch gets ERROR 410 Expired and the watcher re-lists.
    eventually(WAIT, "the watch is re-established", || {
        server.open_watches() == 1
    })
    .await;
    server.compact();
    let compacted_at = server.resource_version();
    server.drop_watches();
    server.delete_pod("t", "a");
    server.apply_pod(PodBuilder::new("t", "d").node("n"));
    eventually(WAIT, "re-listed after 410", || {
        list_count(&server, "pods") >= 2
    })
    .await;
    // The sequence that led there: a re-watch from a pre-compaction resourceVersion (answered
    // 200 + ERROR 410 in the stream), then the re-list.
    let reqs = server.requests();
    let relist = reqs.iter().rposition(|r| r.verb == "list").unwrap();
    let rewatch = &reqs[relist - 1];
    assert!(rewatch.is_watch(), "{rewatch:?}");
    assert!(
        rewatch
            .param("resourceVersion")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            < compacted_at
    );
    eventually(WAIT, "store after re-list", || {
        pod_names(&store) == set(&["b", "c", "d"])
    })
    .await;
    server.apply_pod(PodBuilder::new("t", "e").node("n"));
    eventually(WAIT, "watching again", || {
        pod_names(&store) == set(&["b", "c", "d", "e"])
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn watch_from_compacted_version_gets_410_error_event() {
    let server = FakeApiServer::start();
    let api: Api<Namespace> = Api::all(client(&server).await);
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    server.compact();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected an ERROR 410 event, got {other:?}"),
    }
    assert!(
        stream.try_next().await.unwrap().is_none(),
        "the stream ends after the error"
    );
    // A fresh list is at the post-compaction resourceVersion and can be watched from.
    let rv2 = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    assert!(rv2.parse::<u64>().unwrap() > rv.parse::<u64>().unwrap());
    let mut stream = api
        .watch(&WatchParams::default(), &rv2)
        .await
        .unwrap()
        .boxed();
    server.apply_namespace("after", &[]);
    match tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Added(ns)) => assert_eq!(ns.name_any(), "after"),
        other => panic!("expected ADDED, got {other:?}"),
    }
}

#[tokio::test]
async fn pagination_with_continue_tokens() {
    let server = FakeApiServer::start();
    server.apply_namespace("p", &[]);
    for i in 0..7 {
        server.apply_pod(PodBuilder::new("p", &format!("pod-{i}")).node("n"));
    }
    let api: Api<Pod> = Api::namespaced(client(&server).await, "p");
    let first = api.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    let token = first.metadata.continue_.clone().unwrap();
    // Changes after the first page do not show in later pages (consistent snapshot).
    server.apply_pod(PodBuilder::new("p", "pod-9").node("n"));
    server.delete_pod("p", "pod-5");
    let mut all = names::<Pod>(first.items.iter());
    let mut token = Some(token);
    while let Some(t) = token {
        let page = api
            .list(&ListParams::default().limit(3).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        all.extend(names::<Pod>(page.items.iter()));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
    }
    assert_eq!(all, (0..7).map(|i| format!("pod-{i}")).collect());

    let second = api.list(&ListParams::default().limit(2)).await.unwrap();
    server.compact();
    let err = api
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn watcher_recovers_when_the_server_goes_down_and_comes_back() {
    let server = FakeApiServer::start();
    server.apply_namespace("t", &[]);
    server.apply_pod(PodBuilder::new("t", "a").node("n"));
    let (store, task) = pod_reflector(client(&server).await, "n").await;
    eventually(WAIT, "a watch is open", || server.open_watches() == 1).await;

    server.go_down();
    assert!(server.is_down());
    assert_eq!(server.open_watches(), 0);
    assert!(
        TcpStream::connect(server.addr()).is_err(),
        "connections are refused while down"
    );
    server.apply_pod(PodBuilder::new("t", "b").node("n"));
    server.delete_pod("t", "a");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pod_names(&store),
        set(&["a"]),
        "nothing reaches the client while down"
    );

    server.come_back();
    assert!(!server.is_down());
    eventually(WAIT, "store after come_back", || {
        pod_names(&store) == set(&["b"])
    })
    .await;
    server.apply_pod(PodBuilder::new("t", "c").node("n"));
    eventually(WAIT, "watching again", || {
        pod_names(&store) == set(&["b", "c"])
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn injected_failures_are_survived() {
    let server = FakeApiServer::start();
    server.apply_namespace("t", &[]);
    server.apply_pod(PodBuilder::new("t", "a").node("n"));
    let (store, task) = pod_reflector(client(&server).await, "n").await;
    eventually(WAIT, "a watch is open", || server.open_watches() == 1).await;

    // 503: kube-rs's client retries these itself; 500: the watcher backs off and retries.
    for status in [503, 500] {
        server.fail_next(3, status);
        server.drop_watches();
        let injected = || {
            server
                .requests()
                .into_iter()
                .filter(|r| r.injected_fault && r.status == status)
                .collect::<Vec<_>>()
        };
        eventually(WAIT, "three failed re-watches", || injected().len() == 3).await;
        assert!(injected().iter().all(|r| r.is_watch()), "{:?}", injected());
        let name = format!("after-{status}");
        server.apply_pod(PodBuilder::new("t", &name).node("n"));
        eventually(WAIT, &name, || pod_names(&store).contains(&name)).await;
    }
    server.set_latency(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let api: Api<Pod> = Api::namespaced(client(&server).await, "t");
    api.get("a").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    server.set_latency(Duration::ZERO);
    task.abort();
}

fn netpol(egress_cidr: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-web-egress", "namespace": "env"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [egress_cidr]}}]}],
        },
    })
}

fn owners(np: &NetworkPolicy, field: &str) -> BTreeSet<String> {
    np.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .and_then(|f| f.0.pointer(&format!("/f:spec/f:{field}")))
                .is_some()
        })
        .map(|m| m.manager.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn server_side_apply_ownership_and_conflicts() {
    let server = FakeApiServer::start();
    server.apply_namespace("env", &[("datalab.io/environment", "true")]);
    let client = client(&server).await;
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), "env");
    let guard = PatchParams::apply("datalab-guard");

    let created = api
        .patch(
            "allow-web-egress",
            &guard,
            &Patch::Apply(netpol("169.254.169.254/32")),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(owners(&created, "egress"), set(&["datalab-guard"]));
    let apply_req = server
        .requests()
        .into_iter()
        .find(|r| r.verb == "patch")
        .unwrap();
    assert_eq!(
        apply_req.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        apply_req.param("fieldManager").as_deref(),
        Some("datalab-guard")
    );
    assert_eq!(apply_req.status, 201);

    // Re-applying the same thing is a no-op: same resourceVersion, no event.
    let again = api
        .patch(
            "allow-web-egress",
            &guard.clone().force(),
            &Patch::Apply(netpol("169.254.169.254/32")),
        )
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );

    // Another manager, other value, no force: 409 naming the field and the owner.
    let kubectl = PatchParams::apply("kubectl");
    let err = api
        .patch(
            "allow-web-egress",
            &kubectl,
            &Patch::Apply(netpol("10.0.0.0/8")),
        )
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status.message.contains(".spec.egress"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("datalab-guard"),
        "{}",
        status.message
    );

    // With force, ownership of the conflicting field moves; equal fields become shared.
    let forced = api
        .patch(
            "allow-web-egress",
            &kubectl.clone().force(),
            &Patch::Apply(netpol("10.0.0.0/8")),
        )
        .await
        .unwrap();
    assert_eq!(owners(&forced, "egress"), set(&["kubectl"]));
    assert_eq!(
        owners(&forced, "podSelector"),
        set(&["datalab-guard", "kubectl"])
    );
    assert_eq!(forced.metadata.generation, Some(2));

    // The agent's drift repair: conflict without force, takes it back with force.
    let err = api
        .patch(
            "allow-web-egress",
            &guard,
            &Patch::Apply(netpol("169.254.169.254/32")),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(err).code, 409);
    let repaired = api
        .patch(
            "allow-web-egress",
            &guard.clone().force(),
            &Patch::Apply(netpol("169.254.169.254/32")),
        )
        .await
        .unwrap();
    assert_eq!(owners(&repaired, "egress"), set(&["datalab-guard"]));

    // A merge patch (kubectl edit/patch) takes ownership of what it changes, no conflict.
    let edit = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    let edited = api
        .patch(
            "allow-web-egress",
            &edit,
            &Patch::Merge(json!({"spec": {"policyTypes": ["Egress", "Ingress"]}})),
        )
        .await
        .unwrap();
    assert_eq!(owners(&edited, "policyTypes"), set(&["kubectl-edit"]));
    assert!(edited
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some("kubectl-edit")
            && m.operation.as_deref() == Some("Update")));

    // A plain PUT by a user agent without fieldManager is owned by the agent's name.
    let (code, body) = raw(
        &server,
        "GET",
        "/apis/networking.k8s.io/v1/namespaces/env/networkpolicies/allow-web-egress",
        "application/json",
        "",
    );
    assert_eq!(code, 200, "{body}");
    let mut current: Value = serde_json::from_str(&body).unwrap();
    current["spec"]["egress"] = json!([]);
    let mut s = TcpStream::connect(server.addr()).unwrap();
    let payload = current.to_string();
    write!(
        s,
        "PUT /apis/networking.k8s.io/v1/namespaces/env/networkpolicies/allow-web-egress HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {FAKE_TOKEN}\r\n\
         User-Agent: kubectl/v1.33.0 (linux/amd64)\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{payload}",
        payload.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let np = api.get("allow-web-egress").await.unwrap();
    assert_eq!(owners(&np, "egress"), set(&["kubectl"]));

    // Watchers see the changes; deletion works and is gone from the store.
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    api.delete("allow-web-egress", &DeleteParams::default())
        .await
        .unwrap();
    assert!(server
        .get(Kind::NetworkPolicy, Some("env"), "allow-web-egress")
        .is_none());

    // Namespace label SSA: the agent's labels merge with the others, each key owned apart.
    let ns_api: Api<Namespace> = Api::all(client);
    let psa = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "env", "labels": {"pod-security.kubernetes.io/enforce": "baseline"}},
    });
    let ns = ns_api
        .patch(
            "env",
            &PatchParams::apply("datalab-guard").force(),
            &Patch::Apply(psa),
        )
        .await
        .unwrap();
    let labels = ns.labels();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("baseline")
    );
    assert_eq!(
        labels.get("datalab.io/environment").map(String::as_str),
        Some("true")
    );
    let other = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "env", "labels": {"pod-security.kubernetes.io/enforce": "privileged"}},
    });
    let err = ns_api
        .patch("env", &PatchParams::apply("someone"), &Patch::Apply(other))
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!(status.code, 409);
    assert!(
        status
            .message
            .contains(".metadata.labels.pod-security.kubernetes.io/enforce"),
        "{}",
        status.message
    );
    // Dropping the label from the agent's apply removes it (nobody else owns it).
    let none = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "env"}});
    let ns = ns_api
        .patch(
            "env",
            &PatchParams::apply("datalab-guard").force(),
            &Patch::Apply(none),
        )
        .await
        .unwrap();
    assert!(!ns
        .labels()
        .contains_key("pod-security.kubernetes.io/enforce"));
    assert!(ns.labels().contains_key("datalab.io/environment"));
}

#[tokio::test]
async fn recorder_events_are_recorded() {
    let server = FakeApiServer::start();
    server.apply_namespace("env", &[]);
    let pod = server.apply_pod(
        PodBuilder::new("env", "nb")
            .node("n")
            .uid("0c0ffee0-0000-4000-8000-000000000001"),
    );
    let recorder = Recorder::new(
        client(&server).await,
        Reporter {
            controller: "datalab-guard".into(),
            instance: Some("node-a".into()),
        },
    );
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some("nb".into()),
        namespace: Some("env".into()),
        uid: pod
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .map(str::to_string),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "EgressBlocked".into(),
        note: Some("connect to 169.254.169.254:80 blocked".into()),
        action: "Block".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap(); // same key: a series PATCH

    let events = server.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["apiVersion"], "events.k8s.io/v1");
    assert_eq!(e["reason"], "EgressBlocked");
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["regarding"]["name"], "nb");
    assert_eq!(e["reportingController"], "datalab-guard");
    assert_eq!(e["reportingInstance"], "node-a");
    assert_eq!(e["series"]["count"], 2);
    let writes: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.resource.as_deref() == Some("events"))
        .map(|r| (r.verb, r.api_group.unwrap(), r.path, r.status))
        .collect();
    assert_eq!(writes[0].0, "create");
    assert_eq!(writes[0].1, "events.k8s.io");
    assert_eq!(writes[0].2, "/apis/events.k8s.io/v1/namespaces/env/events");
    assert_eq!(writes[0].3, 201);
    assert_eq!((writes[1].0.as_str(), writes[1].3), ("patch", 200));

    // A core/v1 Event shows up in events() too.
    let core: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(client(&server).await, "env");
    core.create(
        &PostParams::default(),
        &k8s_openapi::api::core::v1::Event {
            metadata: ObjectMeta {
                generate_name: Some("nb.".into()),
                ..Default::default()
            },
            involved_object: reference.clone(),
            reason: Some("Legacy".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let events = server.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["reason"], "Legacy");
    assert!(events[1]["metadata"]["name"]
        .as_str()
        .unwrap()
        .starts_with("nb."));
}

#[tokio::test]
async fn lease_optimistic_concurrency() {
    let server = FakeApiServer::start();
    let api: Api<Lease> = Api::namespaced(client(&server).await, "kube-system");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("datalab-guard-leader".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("node-a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let created = api.create(&PostParams::default(), &lease).await.unwrap();
    let err = api
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );

    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
    let updated = api
        .replace("datalab-guard-leader", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );

    // Another candidate still holding the old resourceVersion loses.
    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("node-c".into());
    let err = api
        .replace("datalab-guard-leader", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    let status = api_error(err);
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status.message.contains("the object has been modified"),
        "{}",
        status.message
    );
    let now = api.get("datalab-guard-leader").await.unwrap();
    assert_eq!(now.spec.unwrap().holder_identity.as_deref(), Some("node-b"));
    let missing = api.get("nope").await.unwrap_err();
    assert_eq!(api_error(missing).code, 404);
}

#[tokio::test]
async fn streaming_lists_and_metadata_watchers() {
    let server = FakeApiServer::start();
    server.apply_namespace("env-x", &[("datalab.io/environment", "true")]);
    let client = client(&server).await;
    let api: Api<Namespace> = Api::all(client.clone());

    let (reader, writer) = reflector::store::<Namespace>();
    let cfg = watcher::Config::default()
        .streaming_lists()
        .labels("datalab.io/environment=true");
    let stream = reflector(writer, watcher(api.clone(), cfg).default_backoff());
    let task = tokio::spawn(async move { stream.for_each(|_| async {}).await });
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names::<Namespace>(reader.state()), set(&["env-x"]));
    server.apply_namespace("env-y", &[("datalab.io/environment", "true")]);
    eventually(WAIT, "env-y streamed", || {
        names::<Namespace>(reader.state()) == set(&["env-x", "env-y"])
    })
    .await;
    let w = server
        .requests()
        .into_iter()
        .find(|r| r.is_watch())
        .unwrap();
    assert_eq!(w.param("sendInitialEvents").as_deref(), Some("true"));
    assert_eq!(
        w.param("resourceVersionMatch").as_deref(),
        Some("NotOlderThan")
    );
    task.abort();

    let meta_api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
    let mut meta = watcher(meta_api, watcher::Config::default())
        .applied_objects()
        .boxed();
    let first = tokio::time::timeout(WAIT, meta.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.metadata.name.is_some());
    let meta_list = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.verb == "list")
        .unwrap();
    assert!(meta_list
        .accept
        .unwrap()
        .contains("as=PartialObjectMetadataList"));
    for r in server.requests() {
        eprintln!(
            "{} {} ?{} accept={:?} -> {}",
            r.method, r.path, r.query, r.accept, r.status
        );
    }
}

#[tokio::test]
async fn unknown_and_malformed_requests_get_status_bodies() {
    let server = FakeApiServer::start();
    let status_of = |body: &str| -> Value { serde_json::from_str(body).unwrap_or(Value::Null) };
    for (method, path, ct, body, want) in [
        (
            "GET",
            "/apis/example.com/v1/widgets",
            "application/json",
            "",
            404,
        ),
        ("GET", "/no/such/path", "application/json", "", 404),
        ("GET", "/api/v1/pods/x", "application/json", "", 404),
        (
            "GET",
            "/api/v1/namespaces/default/pods/x/log",
            "application/json",
            "",
            404,
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/json",
            "{not json",
            400,
        ),
        (
            "POST",
            "/api/v1/namespaces/nope/pods",
            "application/json",
            r#"{"metadata":{"name":"p"}}"#,
            404,
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/json",
            r#"{"apiVersion":"v2","metadata":{"name":"p"}}"#,
            400,
        ),
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/json",
            r#"{"metadata":{}}"#,
            422,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default",
            "text/plain",
            "{}",
            415,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default",
            "application/apply-patch+yaml",
            "metadata: {}",
            400,
        ),
        (
            "PATCH",
            "/api/v1/namespaces/default",
            "application/json-patch+json",
            r#"[{"op":"bogus","path":"/x"}]"#,
            422,
        ),
        (
            "DELETE",
            "/api/v1/namespaces/default/pods/none",
            "application/json",
            "",
            404,
        ),
        (
            "PUT",
            "/api/v1/namespaces/default/pods",
            "application/json",
            "{}",
            405,
        ),
        (
            "GET",
            "/api/v1/pods?watch=true&resourceVersion=abc",
            "application/json",
            "",
            400,
        ),
        ("GET", "/api/v1/pods?limit=x", "application/json", "", 400),
        (
            "GET",
            "/api/v1/pods?continue=garbage",
            "application/json",
            "",
            400,
        ),
        (
            "GET",
            "/api/v1/pods?resourceVersion=999999&resourceVersionMatch=Exact",
            "application/json",
            "",
            504,
        ),
        ("POST", "/version", "application/json", "", 405),
    ] {
        let (code, body) = raw(&server, method, path, ct, body);
        assert_eq!(code, want, "{method} {path}: {body}");
        let s = status_of(&body);
        assert_eq!(s["kind"], "Status", "{method} {path}: {body}");
        assert_eq!(s["code"], want);
    }
    // A YAML apply patch works, like kubectl's.
    let (code, body) = raw(
        &server,
        "PATCH",
        "/api/v1/namespaces/yaml-made?fieldManager=kubectl",
        "application/apply-patch+yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: yaml-made\n  labels:\n    a: b\n",
    );
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        server.get(Kind::Namespace, None, "yaml-made").unwrap()["metadata"]["labels"]["a"],
        "b"
    );
    // Still healthy, and everything was logged.
    let (code, _) = raw(&server, "GET", "/healthz", "text/plain", "");
    assert_eq!(code, 200);
    let logged = server.requests();
    assert!(logged
        .iter()
        .any(|r| r.path == "/no/such/path" && r.status == 404));
    let watch_log = logged
        .iter()
        .find(|r| r.query.contains("resourceVersion=abc"))
        .unwrap();
    assert_eq!(
        (watch_log.verb.as_str(), watch_log.resource.as_deref()),
        ("watch", Some("pods"))
    );
}

#[tokio::test]
async fn watch_timeout_ends_the_stream() {
    let server = FakeApiServer::start();
    let api: Api<Namespace> = Api::all(client(&server).await);
    let rv = server.resource_version().to_string();
    let started = std::time::Instant::now();
    let mut stream = api
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    let end = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_none(), "no events, then the end: {end:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(server.open_watches(), 0);
}

/// kubectl is a real client-go client: the fixture must satisfy it too (legacy discovery,
/// lists without Table support, server-side apply conflicts as kubectl prints them). Also
/// shows the fixture in a plain sync test.
#[test]
fn kubectl_as_another_field_manager() {
    // `cargo xtask test` sets KUBECTL to the pinned kubectl its manifests step installs.
    let kubectl = std::env::var_os("KUBECTL").map_or_else(
        || datalab_guard_tests::process::tool("kubectl".as_ref()),
        std::path::PathBuf::from,
    );
    if !kubectl.is_absolute() || !kubectl.exists() {
        if std::env::var(datalab_guard_tests::ALLOW_SKIP_ENV).as_deref() == Ok("1") {
            let _ = std::io::stderr()
                .write_all(b"SKIPPED: needs kubectl (kubectl_as_another_field_manager)\n");
            return;
        }
        panic!("kubectl (client only) not found: run `cargo xtask manifests` (it installs the pinned one) and set KUBECTL, or run through `cargo xtask test`");
    }
    let server = FakeApiServer::start();
    // client-go sends no bearer token over plain http.
    server.insecure_port_admin();
    server.apply_namespace("env", &[("datalab.io/environment", "true")]);
    let dir = std::env::temp_dir().join(format!("dg-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let run = |args: &[&str], stdin: Option<&str>| -> (bool, String) {
        let mut cmd = std::process::Command::new(&kubectl);
        cmd.arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl starts");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let np = |except: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-web-egress\n  namespace: env\n\
             spec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: 0.0.0.0/0\n        except: [{except}]\n"
        )
    };
    let apply = ["apply", "--server-side", "--validate=false", "-f", "-"];

    let (ok, out) = run(&["version"], None);
    assert!(ok && out.contains("Server Version: v1.33.0"), "{out}");
    let (ok, out) = run(&["get", "namespaces", "-o", "name"], None);
    assert!(
        ok && out.contains("namespace/env") && out.contains("namespace/kube-system"),
        "{out}"
    );

    let (ok, out) = run(
        &[&apply[..], &["--field-manager=datalab-guard"]].concat(),
        Some(&np("169.254.169.254/32")),
    );
    assert!(ok, "{out}");
    let (ok, out) = run(&apply, Some(&np("10.0.0.0/8")));
    assert!(!ok, "{out}");
    assert!(
        out.contains("conflict with \"datalab-guard\"") && out.contains(".spec.egress"),
        "{out}"
    );
    let (ok, out) = run(
        &[&apply[..], &["--force-conflicts"]].concat(),
        Some(&np("10.0.0.0/8")),
    );
    assert!(ok, "{out}");
    let stored = server
        .get(Kind::NetworkPolicy, Some("env"), "allow-web-egress")
        .unwrap();
    let np_obj: NetworkPolicy = serde_json::from_value(stored).unwrap();
    assert_eq!(owners(&np_obj, "egress"), set(&["kubectl"]));

    let (ok, out) = run(&["label", "namespace", "env", "team=data"], None);
    assert!(ok, "{out}");
    assert_eq!(
        server.get(Kind::Namespace, None, "env").unwrap()["metadata"]["labels"]["team"],
        "data"
    );
    let (ok, out) = run(
        &["delete", "networkpolicy", "-n", "env", "allow-web-egress"],
        None,
    );
    assert!(ok, "{out}");
    assert!(server
        .get(Kind::NetworkPolicy, Some("env"), "allow-web-egress")
        .is_none());
    let patches: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.verb == "patch")
        .collect();
    assert!(patches.iter().all(|r| r
        .user_agent
        .as_deref()
        .unwrap_or("")
        .starts_with("kubectl/")));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The next item of a watch stream, or None if nothing arrives within `within`.
async fn next_within(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Namespace>>> + Unpin),
    within: Duration,
) -> Option<Option<WatchEvent<Namespace>>> {
    tokio::time::timeout(within, stream.try_next())
        .await
        .ok()
        .map(|r| r.expect("watch stream item"))
}

#[tokio::test]
async fn bookmarks_come_about_once_a_minute_and_watches_end_by_default() {
    let server = FakeApiServer::start();
    let api: Api<Namespace> = Api::all(client(&server).await);
    let rv = server.resource_version().to_string();

    // Default cadence: a quiet watch gets no bookmark within seconds (a real watch cache
    // sends one about every minute), so a client cannot rely on frequent bookmarks.
    let mut quiet = api
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(
        next_within(&mut quiet, Duration::from_secs(3))
            .await
            .is_none(),
        "no bookmark within 3 s by default"
    );
    drop(quiet);

    // Configurable cadence, for tests that need it.
    server.set_bookmark_interval(Duration::from_millis(200));
    let mut stream = api
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();
    match next_within(&mut stream, Duration::from_secs(2)).await {
        Some(Some(WatchEvent::Bookmark(b))) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    drop(stream);

    // Without timeoutSeconds (or with 0) the server still ends the watch, after a time it
    // picks in its default range. (kube-rs always sends timeoutSeconds, 290 unless set, so
    // the first form is a raw request.)
    server.set_default_watch_timeout(Duration::from_secs(1), Duration::from_secs(2));
    let started = std::time::Instant::now();
    // Blocking here is fine: the fixture runs on its own runtime.
    let path = format!("/api/v1/namespaces?watch=true&resourceVersion={rv}");
    let (status, body) = raw(&server, "GET", &path, "application/json", "");
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(
        !body.contains("\"type\""),
        "no events, then the end: {body}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let started = std::time::Instant::now();
    let mut stream = api
        .watch(&WatchParams::default().timeout(0).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    let end = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_none(), "no events, then the end: {end:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn dark_server_cuts_watches_and_leaves_requests_unanswered() {
    let server = FakeApiServer::start();
    let api: Api<Namespace> = Api::all(client(&server).await);
    let rv = server.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    eventually(WAIT, "a watch is open", || server.open_watches() == 1).await;

    server.go_dark();
    assert!(server.is_down());
    assert_eq!(server.open_watches(), 0);
    assert!(
        matches!(next_within(&mut stream, WAIT).await, Some(None)),
        "the open watch is cut"
    );
    // Not refused: the connection opens, the request goes out, and nothing comes back.
    let held = std::thread::spawn({
        let addr = server.addr();
        move || {
            let mut s = TcpStream::connect(addr).expect("a dark server still accepts");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            write!(
                s,
                "GET /api/v1/namespaces HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {FAKE_TOKEN}\r\n\r\n"
            )
            .unwrap();
            let started = std::time::Instant::now();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            (started.elapsed(), out)
        }
    });
    let answered = tokio::time::timeout(Duration::from_secs(2), api.list(&ListParams::default()))
        .await
        .is_ok();
    assert!(!answered, "kube-rs gets no answer while dark");

    server.come_back();
    assert!(!server.is_down());
    let (waited, out) = held.join().unwrap();
    assert!(
        out.is_empty(),
        "the held request is cut without an answer: {:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(
        waited >= Duration::from_secs(1),
        "held until come_back: {waited:?}"
    );

    // Back quietly: a re-watch from the last resourceVersion gets nothing at all.
    let mut rewatch = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(
        next_within(&mut rewatch, Duration::from_secs(2))
            .await
            .is_none(),
        "a quiet reconnect delivers no event"
    );
    server.apply_namespace("after-dark", &[]);
    match next_within(&mut rewatch, WAIT).await {
        Some(Some(WatchEvent::Added(ns))) => assert_eq!(ns.name_any(), "after-dark"),
        other => panic!("expected ADDED, got {other:?}"),
    }
}

#[tokio::test]
async fn restart_loses_history_and_refuses_old_versions_either_way() {
    let server = FakeApiServer::start();
    server.apply_namespace("before", &[]);
    let api: Api<Namespace> = Api::all(client(&server).await);
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut open = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    eventually(WAIT, "a watch is open", || server.open_watches() == 1).await;

    server.restart();
    assert!(!server.is_down());
    assert!(
        matches!(next_within(&mut open, WAIT).await, Some(None)),
        "a restart ends open watches"
    );
    // The default: 200, then ERROR 410 Expired in the stream.
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next_within(&mut stream, WAIT).await {
        Some(Some(WatchEvent::Error(e))) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    // The other form: HTTP 410 on the watch request.
    server.set_expired_watch(datalab_guard_tests::apiserver::ExpiredWatch::HttpGone);
    let status = api_error(
        api.watch(&WatchParams::default(), &rv)
            .await
            .err()
            .expect("HTTP 410"),
    );
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    // Objects survive a restart (they live in etcd).
    let after = api.list(&ListParams::default()).await.unwrap();
    assert!(names::<Namespace>(after.items.iter()).contains("before"));
}

#[tokio::test]
async fn stalled_watches_go_silent_without_ending() {
    let server = FakeApiServer::start();
    server.set_bookmark_interval(Duration::from_millis(100));
    let api: Api<Namespace> = Api::all(client(&server).await);
    let rv = server.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next_within(&mut stream, WAIT).await,
        Some(Some(WatchEvent::Bookmark(_)))
    ));

    server.stall_watches();
    // Drain what was in flight, then silence: no bookmark, no event, no end.
    while let Some(Some(WatchEvent::Bookmark(_))) =
        next_within(&mut stream, Duration::from_millis(300)).await
    {}
    server.apply_namespace("unseen", &[]);
    assert!(
        next_within(&mut stream, Duration::from_secs(2))
            .await
            .is_none(),
        "a stalled stream delivers nothing and does not end"
    );
    assert_eq!(server.open_watches(), 1);

    // A new watch is served as usual.
    let mut fresh = api
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    match next_within(&mut fresh, WAIT).await {
        Some(Some(WatchEvent::Added(ns))) => assert_eq!(ns.name_any(), "unseen"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    drop(stream);
    eventually(
        WAIT,
        "the stalled stream ends when the client leaves",
        || server.open_watches() == 1,
    )
    .await;
}

/// Metadata-only list and watch, as both datalab-guard processes read namespaces: the list
/// is a `PartialObjectMetadataList` and every watch event a `PartialObjectMetadata`, with the
/// labels and none of spec or status, like the real API server answers
/// `Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`.
#[tokio::test]
async fn metadata_only_list_and_watch() {
    let server = FakeApiServer::start();
    server.apply_namespace("env-a", &[("datalab.io/environment", "true")]);
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(client(&server).await);
    let list = api.list(&ListParams::default()).await.unwrap();
    let a = list
        .items
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("env-a"))
        .expect("env-a listed");
    assert_eq!(
        a.metadata.labels.as_ref().unwrap()["datalab.io/environment"],
        "true"
    );
    let list_request = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.verb == "list")
        .unwrap();
    assert!(list_request.metadata_only(), "{:?}", list_request.accept);

    let rv = list.metadata.resource_version.clone().unwrap();
    let mut events = api
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    server.set_namespace_labels("env-a", &[("datalab.io/environment", "false")]);
    let event = tokio::time::timeout(WAIT, events.try_next())
        .await
        .unwrap()
        .unwrap()
        .expect("an event");
    let WatchEvent::Modified(obj) = event else {
        panic!("expected MODIFIED, got {event:?}");
    };
    assert_eq!(
        obj.metadata.labels.as_ref().unwrap()["datalab.io/environment"],
        "false"
    );
    let watch_request = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.is_watch())
        .unwrap();
    assert!(watch_request.metadata_only(), "{:?}", watch_request.accept);

    // On the wire: the list and watch objects carry the meta.k8s.io kinds and no spec/status.
    let raw = http_get_with_accept(
        &server,
        "/api/v1/namespaces",
        "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
    );
    assert_eq!(raw["kind"], "PartialObjectMetadataList");
    assert_eq!(raw["apiVersion"], "meta.k8s.io/v1");
    for item in raw["items"].as_array().unwrap() {
        assert!(
            item.get("spec").is_none() && item.get("status").is_none(),
            "{item}"
        );
        assert_eq!(item["kind"], "PartialObjectMetadata");
    }
}

/// One GET with an Accept header over a fresh connection; the JSON body.
fn http_get_with_accept(server: &FakeApiServer, path: &str, accept: &str) -> Value {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect(server.addr()).unwrap();
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: fixture\r\nAccept: {accept}\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (_, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}
