//! Privileged tests of the agent's CRI client (`datalab_guard::cri`) against a real container
//! runtime: a private containerd started by the kit ([`CriLab`]) runs kubelet-style pod
//! sandboxes, and the client must find each one from its real pod cgroup directory
//! (`<cgroup2 mount>/kubepods/burstable/pod<uid>`), without any API server.
//!
//! Run: `cargo test -p datalab-guard-tests --test cri_runtime -- --test-threads=1 --nocapture`
//! (as root; `cargo xtask setup` installs containerd, runc, the CNI plugins, busybox-static
//! and umoci).

use std::{
    fs,
    io::Write as _,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use datalab_guard::{
    cgroups::pod::{parse_container_dir_name, parse_pod_dir_name},
    cri::{CriError, RuntimeClient, SandboxInfo},
};
use datalab_guard_tests::{
    cri_lab::{cleanup::cgroup_hierarchies, LabPod},
    require_root, CriLab, PodSpec,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The pod uid as the agent gets it: parsed from the pod cgroup directory's name.
fn uid_from_cgroup_dir(dir: &Path) -> String {
    let name = dir.file_name().unwrap().to_str().unwrap();
    let (_qos, uid) =
        parse_pod_dir_name(name).unwrap_or_else(|| panic!("{name} is not a pod cgroup name"));
    uid
}

/// Checks the runtime's answer for `pod`, found from its cgroup directory.
fn assert_resolves(
    rt: &tokio::runtime::Runtime,
    client: &RuntimeClient,
    lab: &CriLab,
    pod: &LabPod,
) -> SandboxInfo {
    let dir = lab.pod_cgroup_dir(pod).unwrap();
    assert!(
        dir.is_dir(),
        "the runtime did not create the pod cgroup {}",
        dir.display()
    );
    // The sandbox's own container cgroup sits inside the pod's (cgroupfs: the bare id).
    let leaves: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| parse_container_dir_name(e.file_name().to_str()?))
        .map(|c| c.id)
        .collect();
    assert!(
        leaves.contains(&pod.id),
        "sandbox {} has no container cgroup in {}: {leaves:?}",
        pod.id,
        dir.display()
    );
    let uid = uid_from_cgroup_dir(&dir);
    let info = rt
        .block_on(client.pod_of_cgroup(&uid))
        .unwrap()
        .unwrap_or_else(|| panic!("runtime does not know pod cgroup {}", dir.display()));
    let spec = &pod.spec;
    assert_eq!(info.id, pod.id);
    assert_eq!(info.uid, spec.uid, "the sandbox's uid is the cgroup's");
    assert_eq!(info.namespace, spec.namespace);
    assert_eq!(info.name, spec.name);
    assert_eq!(info.host_network, spec.host_network, "{}", spec.name);
    assert!(info.ready && info.labels_complete);
    assert_eq!(info.labels["io.kubernetes.pod.namespace"], spec.namespace);
    for (k, v) in &spec.labels {
        assert_eq!(info.labels.get(k), Some(v), "label {k}");
    }
    info
}

/// Bridged, hostNetwork and static pods, created through CRI, are found from their real
/// pod cgroups with the right uid, namespace, name and hostNetwork; a removed pod and an
/// unknown uid are not found; everything the lab made is gone after shutdown; and a client
/// whose runtime went away gets an error within its timeout.
#[test]
fn runtime_resolves_real_sandboxes_from_their_pod_cgroups() {
    if !require_root() {
        return;
    }
    let lab = CriLab::start().expect("starting the CRI lab");
    eprintln!(
        "containerd answered CRI after {:?}; image built and imported in {:?}",
        lab.startup, lab.image_setup
    );
    let tenant = lab
        .run_pod(&PodSpec::new("team-a", "notebook-0").label("app", "jupyter"))
        .unwrap();
    lab.start_container(&tenant, "notebook", &["/bin/sleep", "3600"])
        .unwrap();
    let cni_agent = lab
        .run_pod(
            &PodSpec::new("kube-system", "aws-node-x7k2p")
                .host_network()
                .label("k8s-app", "aws-node"),
        )
        .unwrap();
    let static_pod = lab
        .run_pod(
            &PodSpec::new("kube-system", "kms-plugin-node-1")
                .host_network()
                .static_pod(),
        )
        .unwrap();
    assert!(tenant.netns.is_some(), "a bridged pod has its own netns");
    assert!(cni_agent.netns.is_none(), "a hostNetwork pod has none");

    let rt = runtime();
    let client = rt
        .block_on(RuntimeClient::connect(lab.socket(), TIMEOUT))
        .unwrap();
    eprintln!("runtime: {:?}", client.version());
    assert_eq!(client.version().runtime_name, "containerd");
    assert_eq!(client.version().runtime_api_version, "v1");

    let info = assert_resolves(&rt, &client, &lab, &tenant);
    assert!(!info.static_pod);
    assert!(!assert_resolves(&rt, &client, &lab, &cni_agent).static_pod);
    // A static pod: cgroup, sandbox metadata and label all carry the 32-hex config hash.
    let info = assert_resolves(&rt, &client, &lab, &static_pod);
    assert!(info.static_pod && info.uid.len() == 32, "{info:?}");

    let all = rt.block_on(client.list_sandboxes()).unwrap();
    for pod in [&tenant, &cni_agent, &static_pod] {
        let listed = all.iter().find(|s| s.id == pod.id).expect("listed");
        assert_eq!(
            (&listed.namespace, listed.host_network),
            (&pod.spec.namespace, pod.spec.host_network)
        );
    }
    assert_eq!(
        rt.block_on(client.pod_of_cgroup("00000000-0000-4000-8000-000000000000"))
            .unwrap(),
        None
    );
    assert_eq!(rt.block_on(client.pod_of_cgroup("../x")).unwrap(), None);

    lab.remove_pod(&cni_agent.id).unwrap();
    assert_eq!(
        rt.block_on(client.pod_of_cgroup(&cni_agent.spec.uid))
            .unwrap(),
        None,
        "a removed sandbox is not reported"
    );

    let made: Vec<PathBuf> = [&tenant, &cni_agent, &static_pod]
        .iter()
        .map(|p| lab.pod_cgroup_dir(p).unwrap())
        .collect();
    let netns = tenant.netns.clone().unwrap();
    let (bridge, dir) = (lab.bridge().to_owned(), lab.dir().to_owned());
    lab.shutdown().expect("CRI lab cleanup");
    assert_lab_gone(&bridge, &dir, &netns, &made);

    // The runtime went away under a connected client: an error, quickly, never a hang.
    let started = Instant::now();
    let err = rt
        .block_on(client.pod_of_cgroup(&tenant.spec.uid))
        .unwrap_err();
    eprintln!("after the runtime stopped: {err} ({:?})", started.elapsed());
    assert!(started.elapsed() < TIMEOUT + Duration::from_millis(500));
}

fn assert_lab_gone(bridge: &str, dir: &Path, netns: &Path, pod_cgroups: &[PathBuf]) {
    assert!(
        !Path::new("/sys/class/net").join(bridge).exists(),
        "bridge {bridge} left"
    );
    assert!(!dir.exists(), "lab directory {} left", dir.display());
    assert!(!netns.exists(), "pod netns {} left", netns.display());
    for cg in pod_cgroups {
        assert!(!cg.exists(), "pod cgroup {} left", cg.display());
    }
    // And in the v1 hierarchies, where the runtime made the same directories.
    for h in cgroup_hierarchies().unwrap() {
        for cg in pod_cgroups {
            let name = cg.file_name().unwrap();
            for qos in ["kubepods/burstable", "kubepods"] {
                let p = h.join(qos).join(name);
                assert!(!p.exists(), "pod cgroup {} left", p.display());
            }
        }
    }
}

/// A missing socket, a file that is not a socket, a peer that writes junk and one that
/// never answers: each is a typed error within the timeout, never a panic or a stall.
#[test]
fn missing_and_garbage_sockets_fail_cleanly_within_the_timeout() {
    if !require_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("dg-cri-bad-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _guard = RemoveDir(dir.clone());

    fs::write(dir.join("plain-file"), "").unwrap();
    let junk = dir.join("junk.sock");
    let junk_listener = UnixListener::bind(&junk).unwrap();
    std::thread::spawn(move || {
        for mut conn in junk_listener.incoming().flatten() {
            let _ = conn.write_all(b"220 smtp.invalid ESMTP\r\n\x00\xff\xfe garbage\r\n");
        }
    });
    let silent = dir.join("silent.sock");
    let silent_listener = UnixListener::bind(&silent).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent_listener.incoming().flatten() {
            held.push(conn); // accepted, never answered
        }
    });

    let rt = runtime();
    let timeout = Duration::from_millis(500);
    let cases: [(&str, PathBuf, &[&str]); 4] = [
        ("missing", dir.join("nope.sock"), &["socket"]),
        ("plain file", dir.join("plain-file"), &["socket"]),
        ("junk", junk, &["call", "connect"]),
        ("silent", silent, &["timeout"]),
    ];
    for (what, path, kinds) in cases {
        let started = Instant::now();
        let result: Result<RuntimeClient, CriError> =
            rt.block_on(RuntimeClient::connect(&path, timeout));
        let took = started.elapsed();
        let err = result.expect_err(what);
        eprintln!("{what}: {err} [{}] after {took:?}", err.kind());
        assert!(kinds.contains(&err.kind()), "{what}: {err}");
        assert!(err.to_string().lines().count() == 1, "{what}: one line");
        assert!(
            took < timeout + Duration::from_millis(250),
            "{what} took {took:?}"
        );
    }
}

/// Time from RunPodSandbox returning to `pod_of_cgroup` answering, over a few sandboxes
/// (bridged and hostNetwork alternately), and the cost of one lookup. Printed, not
/// asserted tightly: numbers for the bench and the report.
#[test]
fn timings_from_run_pod_sandbox_to_resolution() {
    if !require_root() {
        return;
    }
    let lab = CriLab::start().expect("starting the CRI lab");
    let rt = runtime();
    let client = rt
        .block_on(RuntimeClient::connect(lab.socket(), TIMEOUT))
        .unwrap();
    let mut to_answer = Vec::new();
    let mut lookups = Vec::new();
    let mut runs = Vec::new();
    for i in 0..6 {
        let mut spec = PodSpec::new("timing", &format!("pod-{i}"));
        if i % 2 == 1 {
            spec = spec.host_network();
        }
        let pod = lab.run_pod(&spec).unwrap();
        runs.push(pod.run_took);
        let uid = uid_from_cgroup_dir(&lab.pod_cgroup_dir(&pod).unwrap());
        let info = loop {
            let t = Instant::now();
            let answer = rt.block_on(client.pod_of_cgroup(&uid)).unwrap();
            lookups.push(t.elapsed());
            if let Some(info) = answer {
                break info;
            }
            assert!(
                pod.ran_at.elapsed() < Duration::from_secs(5),
                "pod {i} not resolved within 5 s of RunPodSandbox"
            );
        };
        to_answer.push(pod.ran_at.elapsed());
        assert_eq!(info.host_network, spec.host_network);
    }
    let from_cgroup = from_cgroup_appearing(&lab, &rt, &client);
    for (what, mut v) in [
        ("RunPodSandbox", runs),
        (
            "RunPodSandbox returned -> pod_of_cgroup answered",
            to_answer,
        ),
        ("one pod_of_cgroup lookup", lookups),
        (
            "pod cgroup appeared -> wait_pod_of_cgroup answered",
            from_cgroup,
        ),
    ] {
        v.sort();
        eprintln!(
            "TIMING {what}: p50 {:?} max {:?} (n={})",
            v[v.len() / 2],
            v[v.len() - 1],
            v.len()
        );
    }
    lab.shutdown().expect("CRI lab cleanup");
}

/// Time from the pod cgroup's appearance (what the agent's watcher sees) to
/// `wait_pod_of_cgroup` answering: RunPodSandbox runs on another thread while this one
/// polls for the directory, as the agent's cgroup watcher would see it.
fn from_cgroup_appearing(
    lab: &CriLab,
    rt: &tokio::runtime::Runtime,
    client: &RuntimeClient,
) -> Vec<Duration> {
    let root = datalab_guard_tests::cgroup2_root().unwrap();
    (0..4)
        .map(|i| {
            let spec = PodSpec::new("timing", &format!("watched-{i}"));
            let dir = root.join(spec.cgroup_parent().trim_start_matches('/'));
            std::thread::scope(|s| {
                let running = s.spawn(|| lab.run_pod(&spec).unwrap());
                let deadline = Instant::now() + Duration::from_secs(10);
                while !dir.exists() {
                    assert!(
                        Instant::now() < deadline,
                        "{} never appeared",
                        dir.display()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                let appeared = Instant::now();
                let info = rt
                    .block_on(
                        client
                            .wait_pod_of_cgroup(&uid_from_cgroup_dir(&dir), Duration::from_secs(5)),
                    )
                    .unwrap()
                    .expect("resolved within 5 s of the cgroup appearing");
                let took = appeared.elapsed();
                assert_eq!(info.id, running.join().unwrap().id);
                took
            })
        })
        .collect()
}

/// What a lab made outside its directory, to check it is gone afterwards.
struct Made {
    bridge: String,
    dir: PathBuf,
    netns: PathBuf,
    pod_cgroup: PathBuf,
}

impl Made {
    fn of(lab: &CriLab, pod: &LabPod) -> Made {
        Made {
            bridge: lab.bridge().to_owned(),
            dir: lab.dir().to_owned(),
            netns: pod.netns.clone().expect("a bridged pod has a netns"),
            pod_cgroup: lab.pod_cgroup_dir(pod).unwrap(),
        }
    }

    fn to_line(&self) -> String {
        [&self.dir, &self.netns, &self.pod_cgroup]
            .iter()
            .map(|p| p.display().to_string())
            .chain([self.bridge.clone()])
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn from_line(line: &str) -> Made {
        let f: Vec<&str> = line.split(' ').collect();
        Made {
            dir: f[0].into(),
            netns: f[1].into(),
            pod_cgroup: f[2].into(),
            bridge: f[3].to_owned(),
        }
    }

    fn assert_gone(&self) {
        assert_lab_gone(
            &self.bridge,
            &self.dir,
            &self.netns,
            std::slice::from_ref(&self.pod_cgroup),
        );
    }
}

/// A lab with a running container whose test panics leaves nothing behind (Drop).
#[test]
fn lab_cleans_up_after_a_panicking_test() {
    if !require_root() {
        return;
    }
    let made = std::sync::Mutex::new(None);
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            let lab = CriLab::start().expect("starting the CRI lab");
            let pod = lab.run_pod(&PodSpec::new("panics", "victim")).unwrap();
            lab.start_container(&pod, "sleeper", &["/bin/sleep", "3600"])
                .unwrap();
            *made.lock().unwrap() = Some(Made::of(&lab, &pod));
            panic!("deliberate panic with a running pod");
        })
        .join()
    });
    assert!(outcome.is_err(), "the test thread panicked");
    made.into_inner()
        .unwrap()
        .expect("lab was up")
        .assert_gone();
}

/// Env var that turns [`crashed_lab_child`] into the crashing half of
/// [`crashed_lab_is_removed_by_the_next_lab`]: the file it writes what it made to.
const CRASH_CHILD_ENV: &str = "DG_CRI_CRASH_CHILD_OUT";

/// Not a test of its own: the child process of [`crashed_lab_is_removed_by_the_next_lab`],
/// which starts a lab with a running pod and exits without any cleanup, like a test run
/// killed by a signal or an abort.
#[test]
#[ignore = "child process of crashed_lab_is_removed_by_the_next_lab"]
fn crashed_lab_child() {
    let out = std::env::var(CRASH_CHILD_ENV).expect("run only by its parent test");
    let lab = CriLab::start().expect("starting the CRI lab");
    let pod = lab.run_pod(&PodSpec::new("crashes", "orphan")).unwrap();
    lab.start_container(&pod, "sleeper", &["/bin/sleep", "3600"])
        .unwrap();
    fs::write(out, Made::of(&lab, &pod).to_line()).unwrap();
    // No Drop, no unwinding: containerd dies with us (parent-death signal), its shim and
    // the pod's processes, cgroups, netns and bridge stay behind.
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe { libc::_exit(0) };
}

/// The leftovers of a lab whose process died without cleaning up are removed when the
/// next lab starts.
#[test]
fn crashed_lab_is_removed_by_the_next_lab() {
    if !require_root() {
        return;
    }
    let out = std::env::temp_dir().join(format!("dg-cri-crash-{}", std::process::id()));
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crashed_lab_child", "--ignored", "--nocapture"])
        .env(CRASH_CHILD_ENV, &out)
        .status()
        .unwrap();
    assert!(status.success(), "child: {status}");
    let made = Made::from_line(&fs::read_to_string(&out).unwrap());
    fs::remove_file(&out).unwrap();
    assert!(
        made.netns.exists() && made.pod_cgroup.exists(),
        "the crashed lab left its pod behind (else this test proves nothing)"
    );
    let next = CriLab::start().expect("starting the next CRI lab");
    made.assert_gone();
    next.shutdown().expect("CRI lab cleanup");
}
