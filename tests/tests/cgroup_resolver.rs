//! Privileged tests of the cgroup resolver (`cgroups::pod`) and watcher (`cgroups::watch`) on fake
//! kubelet trees: real cgroup2 directories, laid out the way the kubelet and the container
//! runtimes name them, inside a [`TestCgroup`] (removed with everything in it on drop).
//!
//! No kubelet runs here, so the trees are built by hand with the same naming functions the
//! agent uses *and* with literal names copied from real nodes, so that a naming bug cannot
//! hide behind itself.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use datalab_guard::cgroups::{
    self,
    pod::{
        detect_driver, detect_pods_root, pod_cgroup_dir, qos_cgroup_dir, scan_pods, CgroupDriver,
        ContainerDirKind, DiscoveredPod, PodCgroupError, QosClass, Runtime,
    },
    watch::{CgroupEvent, CgroupWatcher, WatchConfig, WatcherThread},
};
use datalab_guard_tests::{cgroup_id, require_root, TestCgroup};

const UID_G: &str = "0b9f6a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
const UID_B: &str = "1c2d3e4f-5a6b-4c7d-8e9f-a0b1c2d3e4f5";
const UID_BE: &str = "2d3e4f5a-6b7c-4d8e-9fa0-b1c2d3e4f5a6";

fn cid(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// A TestCgroup's canonical path (the watcher and the scan report canonical paths).
fn canonical(cg: &TestCgroup) -> PathBuf {
    fs::canonicalize(cg.path()).unwrap()
}

fn mkdirs(paths: &[PathBuf]) {
    for p in paths {
        fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    }
}

// ---------------------------------------------------------------------------------------
// detect_pods_root
// ---------------------------------------------------------------------------------------

/// Each layout, built inside its own TestCgroup standing in for the cgroup2 mount.
#[test]
fn detects_the_pods_root_in_every_layout() {
    if !require_root() {
        return;
    }
    let cases: &[(&str, &[&str], CgroupDriver)] = &[
        // Plain systemd node.
        (
            "kubepods.slice",
            &[
                "system.slice/containerd.service",
                "user.slice/user-0.slice",
                "init.scope",
            ],
            CgroupDriver::Systemd,
        ),
        // Plain cgroupfs node.
        (
            "kubepods",
            &["system.slice/kubelet.service"],
            CgroupDriver::Cgroupfs,
        ),
        // kind (systemd driver, --cgroup-root=/kubelet).
        (
            "kubelet.slice/kubelet-kubepods.slice",
            &[
                "system.slice/containerd.service",
                "kubelet.slice/kubelet.service",
            ],
            CgroupDriver::Systemd,
        ),
        // kind-style with cgroupfs.
        (
            "kubelet/kubepods",
            &["system.slice"],
            CgroupDriver::Cgroupfs,
        ),
        // A kubelet in a slice several levels down (depth 4, the limit).
        (
            "system.slice/k8s.service/node/kubepods.slice",
            &["system.slice/other.service/a/b"],
            CgroupDriver::Systemd,
        ),
    ];
    for (root_rel, others, driver) in cases {
        let mount = TestCgroup::new().unwrap();
        let base = canonical(&mount);
        let root = base.join(root_rel);
        // The QoS directories below the root must not be mistaken for roots.
        let mut dirs = vec![
            qos_cgroup_dir(&root, *driver, QosClass::Burstable),
            qos_cgroup_dir(&root, *driver, QosClass::BestEffort),
            pod_cgroup_dir(&root, *driver, QosClass::Guaranteed, UID_G),
        ];
        dirs.extend(others.iter().map(|o| base.join(o)));
        mkdirs(&dirs);
        let found = detect_pods_root(&base).unwrap_or_else(|e| panic!("{root_rel}: {e}"));
        assert_eq!(found, root, "{root_rel}");
        assert_eq!(detect_driver(&found), Some(*driver), "{root_rel}");
    }
}

#[test]
fn pods_root_detection_is_bounded_and_refuses_to_guess() {
    if !require_root() {
        return;
    }
    // Nothing.
    let mount = TestCgroup::new().unwrap();
    let base = canonical(&mount);
    mkdirs(&[base.join("system.slice/a.service"), base.join("user.slice")]);
    let err = detect_pods_root(&base).unwrap_err();
    assert!(matches!(err, PodCgroupError::NoPodsRoot { .. }), "{err}");
    assert!(err.to_string().contains("pass --cgroup-root"), "{err}");

    // Too deep (depth 5) counts as nothing.
    mkdirs(&[base.join("a/b/c/d/kubepods.slice")]);
    assert!(matches!(
        detect_pods_root(&base),
        Err(PodCgroupError::NoPodsRoot { .. })
    ));

    // Two roots (a node that switched drivers, or two kind nodes seen from the host).
    mkdirs(&[base.join("kubepods.slice"), base.join("kubelet/kubepods")]);
    match detect_pods_root(&base) {
        Err(PodCgroupError::AmbiguousPodsRoot { candidates, .. }) => assert_eq!(
            candidates,
            vec![base.join("kubelet/kubepods"), base.join("kubepods.slice")]
        ),
        other => panic!("expected ambiguity, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// scan_pods
// ---------------------------------------------------------------------------------------

/// What a fake tree should scan to: (uid, qos, [(container dir name, runtime, kind, id)]).
type Expected = Vec<(
    &'static str,
    QosClass,
    Vec<(String, Runtime, ContainerDirKind, String)>,
)>;

fn check_scan(root: &Path, driver: CgroupDriver, expected: &Expected) {
    let root_dir = cgroups::validate_cgroup_dir(root).unwrap();
    let pods = scan_pods(root, driver).unwrap();
    let got: Vec<(&str, QosClass)> = pods.iter().map(|p| (p.uid.as_str(), p.qos)).collect();
    let mut want: Vec<(&str, QosClass)> = expected.iter().map(|(u, q, _)| (*u, *q)).collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    want.sort();
    assert_eq!(got_sorted, want, "{}", root.display());
    for (uid, qos, containers) in expected {
        let pod = pods.iter().find(|p| p.uid == *uid).unwrap();
        let dir = pod_cgroup_dir(root, driver, *qos, uid);
        assert_eq!(pod.dir.path, dir);
        // The id from readdir is the id from stat, i.e. what BPF sees.
        assert_eq!(pod.dir.id, cgroup_id(&dir).unwrap());
        let depth = dir.strip_prefix(root).unwrap().components().count() as u32;
        assert_eq!(pod.dir.level, root_dir.level + depth);
        let mut got: Vec<_> = pod
            .containers
            .iter()
            .map(|c| {
                assert_eq!(c.dir.id, cgroup_id(&c.dir.path).unwrap());
                assert_eq!(c.dir.level, pod.dir.level + 1);
                let name = c.dir.path.file_name().unwrap().to_str().unwrap().to_owned();
                (name, c.runtime, c.kind, c.id.clone())
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let mut want = containers.clone();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "containers of {uid}");
    }
}

#[test]
fn scans_a_systemd_tree_with_every_qos_class_and_runtime() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let root = canonical(&cg).join("kubepods.slice");
    // Literal names, as on a real systemd node.
    let g = root.join("kubepods-pod0b9f6a3e_1c2d_4e5f_8a9b_0c1d2e3f4a5b.slice");
    let b = root.join(
        "kubepods-burstable.slice/kubepods-burstable-pod1c2d3e4f_5a6b_4c7d_8e9f_a0b1c2d3e4f5.slice",
    );
    let be = root.join("kubepods-besteffort.slice/kubepods-besteffort-pod2d3e4f5a_6b7c_4d8e_9fa0_b1c2d3e4f5a6.slice");
    mkdirs(&[
        g.join(format!("cri-containerd-{}.scope", cid(1))),
        g.join(format!("cri-containerd-{}.scope", cid(2))),
        b.join(format!("crio-{}.scope/container", cid(3))),
        b.join(format!("crio-conmon-{}.scope", cid(3))),
        be.join(format!("docker-{}.scope", cid(4))),
        // Not pods: another prefix, a stray slice, a QoS-looking name in the wrong place.
        root.join("kubelet-kubepods-pod99.slice"),
        root.join("kubepods-besteffort.slice/kubepods-burstable-pod98.slice"),
        root.join("kubepods-besteffort.slice/misc.slice"),
        root.join("kubepods-system.slice"),
        // Not containers: reported pods ignore them.
        be.join("helper"),
    ]);
    let expected: Expected = vec![
        (
            UID_G,
            QosClass::Guaranteed,
            vec![
                (
                    format!("cri-containerd-{}.scope", cid(1)),
                    Runtime::Containerd,
                    ContainerDirKind::Container,
                    cid(1),
                ),
                (
                    format!("cri-containerd-{}.scope", cid(2)),
                    Runtime::Containerd,
                    ContainerDirKind::Container,
                    cid(2),
                ),
            ],
        ),
        (
            UID_B,
            QosClass::Burstable,
            vec![
                (
                    format!("crio-{}.scope", cid(3)),
                    Runtime::CriO,
                    ContainerDirKind::Container,
                    cid(3),
                ),
                (
                    format!("crio-conmon-{}.scope", cid(3)),
                    Runtime::CriO,
                    ContainerDirKind::RuntimeMonitor,
                    cid(3),
                ),
            ],
        ),
        (
            UID_BE,
            QosClass::BestEffort,
            vec![(
                format!("docker-{}.scope", cid(4)),
                Runtime::Docker,
                ContainerDirKind::Container,
                cid(4),
            )],
        ),
    ];
    check_scan(&root, CgroupDriver::Systemd, &expected);
}

#[test]
fn scans_a_cgroupfs_tree_with_every_qos_class() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let root = canonical(&cg).join("kubepods");
    mkdirs(&[
        root.join(format!("pod{UID_G}/{}", cid(1))),
        root.join(format!("burstable/pod{UID_B}/{}", cid(2))),
        root.join(format!("burstable/pod{UID_B}/crio-conmon-{}", cid(2))),
        root.join(format!("besteffort/pod{UID_BE}/crio-{}", cid(3))),
        // A static pod (config-hash UID), no containers yet.
        root.join("besteffort/pod6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f"),
        // Not pods.
        root.join("burstable/kubepods-burstable-pod97.slice"),
        root.join("system"),
        root.join("besteffort/pod_x"),
    ]);
    let expected: Expected = vec![
        (
            UID_G,
            QosClass::Guaranteed,
            vec![(
                cid(1),
                Runtime::Unknown,
                ContainerDirKind::Container,
                cid(1),
            )],
        ),
        (
            UID_B,
            QosClass::Burstable,
            vec![
                (
                    format!("crio-conmon-{}", cid(2)),
                    Runtime::CriO,
                    ContainerDirKind::RuntimeMonitor,
                    cid(2),
                ),
                (
                    cid(2),
                    Runtime::Unknown,
                    ContainerDirKind::Container,
                    cid(2),
                ),
            ],
        ),
        (
            UID_BE,
            QosClass::BestEffort,
            vec![(
                format!("crio-{}", cid(3)),
                Runtime::CriO,
                ContainerDirKind::Container,
                cid(3),
            )],
        ),
        (
            "6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f",
            QosClass::BestEffort,
            vec![],
        ),
    ];
    check_scan(&root, CgroupDriver::Cgroupfs, &expected);
}

#[test]
fn scans_kind_style_nested_roots() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let base = canonical(&cg);
    // systemd: kubelet.slice/kubelet-kubepods.slice (literal kind names).
    let root = base.join("kubelet.slice/kubelet-kubepods.slice");
    mkdirs(&[
        root.join(format!(
            "kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod2d3e4f5a_6b7c_4d8e_9fa0_b1c2d3e4f5a6.slice/cri-containerd-{}.scope",
            cid(5)
        )),
        root.join("kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod1c2d3e4f_5a6b_4c7d_8e9f_a0b1c2d3e4f5.slice"),
        root.join("kubelet-kubepods-pod0b9f6a3e_1c2d_4e5f_8a9b_0c1d2e3f4a5b.slice"),
        // A plain-prefix name inside the kind root is not the kubelet's.
        root.join("kubepods-pod96.slice"),
    ]);
    assert_eq!(detect_pods_root(&base).unwrap(), root);
    let expected: Expected = vec![
        (UID_G, QosClass::Guaranteed, vec![]),
        (UID_B, QosClass::Burstable, vec![]),
        (
            UID_BE,
            QosClass::BestEffort,
            vec![(
                format!("cri-containerd-{}.scope", cid(5)),
                Runtime::Containerd,
                ContainerDirKind::Container,
                cid(5),
            )],
        ),
    ];
    check_scan(&root, CgroupDriver::Systemd, &expected);

    // cgroupfs: kubelet/kubepods.
    let cg2 = TestCgroup::new().unwrap();
    let root = canonical(&cg2).join("kubelet/kubepods");
    mkdirs(&[root.join(format!("burstable/pod{UID_B}/{}", cid(6)))]);
    check_scan(
        &root,
        CgroupDriver::Cgroupfs,
        &vec![(
            UID_B,
            QosClass::Burstable,
            vec![(
                cid(6),
                Runtime::Unknown,
                ContainerDirKind::Container,
                cid(6),
            )],
        )],
    );
}

#[test]
fn scan_of_a_missing_root_is_an_error_naming_it() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let missing = canonical(&cg).join("kubepods.slice");
    let err = scan_pods(&missing, CgroupDriver::Systemd).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cgroup directory {} does not exist", missing.display())
    );
    // An empty root is no pods, not an error.
    fs::create_dir(&missing).unwrap();
    assert_eq!(
        scan_pods(&missing, CgroupDriver::Systemd).unwrap(),
        Vec::<DiscoveredPod>::new()
    );
}

// ---------------------------------------------------------------------------------------
// CgroupWatcher
// ---------------------------------------------------------------------------------------

/// A systemd-style tree: `<cg>/kubepods.slice` with both QoS slices.
fn systemd_tree(cg: &TestCgroup) -> PathBuf {
    let root = canonical(cg).join("kubepods.slice");
    mkdirs(&[
        qos_cgroup_dir(&root, CgroupDriver::Systemd, QosClass::Burstable),
        qos_cgroup_dir(&root, CgroupDriver::Systemd, QosClass::BestEffort),
    ]);
    root
}

/// Waits for `want`, skipping other events; returns how long it took.
fn wait_for(w: &WatcherThread, want: &CgroupEvent, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let left = within.saturating_sub(start.elapsed());
        match w.recv_timeout(left) {
            Some(ev) if &ev == want => return start.elapsed(),
            Some(_) => continue,
            None => panic!("no {want:?} within {within:?}"),
        }
    }
}

fn first_rescan(w: &WatcherThread) -> Vec<DiscoveredPod> {
    match w.recv_timeout(Duration::from_secs(2)) {
        Some(CgroupEvent::Rescan(pods)) => pods,
        other => panic!("the first event must be the initial rescan, got {other:?}"),
    }
}

fn uid(n: usize) -> String {
    format!("{n:08x}-0000-4000-8000-{n:012x}")
}

#[test]
fn watcher_reports_new_pods_and_containers_within_100ms() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let root = systemd_tree(&cg);
    let w = CgroupWatcher::spawn_thread(WatchConfig::new(&root, CgroupDriver::Systemd)).unwrap();
    assert!(first_rescan(&w).is_empty());

    for (i, qos) in QosClass::ALL.into_iter().enumerate() {
        let pod = pod_cgroup_dir(&root, CgroupDriver::Systemd, qos, &uid(i));
        let start = Instant::now();
        fs::create_dir(&pod).unwrap();
        wait_for(
            &w,
            &CgroupEvent::Created(pod.clone()),
            Duration::from_millis(100),
        );
        let container = pod.join(format!("cri-containerd-{}.scope", cid(i as u8)));
        fs::create_dir(&container).unwrap();
        wait_for(
            &w,
            &CgroupEvent::Created(container.clone()),
            Duration::from_millis(100),
        );
        eprintln!(
            "{qos}: pod and container reported within {:?}",
            start.elapsed()
        );

        fs::remove_dir(&container).unwrap();
        wait_for(
            &w,
            &CgroupEvent::Removed(container),
            Duration::from_millis(100),
        );
        fs::remove_dir(&pod).unwrap();
        wait_for(&w, &CgroupEvent::Removed(pod), Duration::from_millis(100));
    }
}

/// A runtime creating the container cgroup right after the kubelet made the pod's: the
/// container may exist before the watcher has a watch on the pod; it must still be reported.
#[test]
fn watcher_does_not_miss_containers_created_before_the_pod_watch() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let root = systemd_tree(&cg);
    let w = CgroupWatcher::spawn_thread(WatchConfig::new(&root, CgroupDriver::Systemd)).unwrap();
    first_rescan(&w);
    for i in 0..50 {
        let pod = pod_cgroup_dir(&root, CgroupDriver::Systemd, QosClass::BestEffort, &uid(i));
        let container = pod.join(format!("crio-{}.scope", cid(i as u8)));
        fs::create_dir_all(&container).unwrap();
        wait_for(&w, &CgroupEvent::Created(pod), Duration::from_secs(1));
        wait_for(&w, &CgroupEvent::Created(container), Duration::from_secs(1));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Creation-to-event latency over 200 pod directories, printed (run with `--nocapture`);
/// asserted only loosely.
#[test]
fn watcher_latency_distribution() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let root = systemd_tree(&cg);
    let w = CgroupWatcher::spawn_thread(WatchConfig::new(&root, CgroupDriver::Systemd)).unwrap();
    first_rescan(&w);
    let mut created = Vec::new();
    let mut removed = Vec::new();
    for i in 0..200 {
        let qos = QosClass::ALL[i % 3];
        let pod = pod_cgroup_dir(&root, CgroupDriver::Systemd, qos, &uid(1000 + i));
        let start = Instant::now();
        fs::create_dir(&pod).unwrap();
        wait_for(
            &w,
            &CgroupEvent::Created(pod.clone()),
            Duration::from_secs(1),
        );
        created.push(start.elapsed());
        let start = Instant::now();
        fs::remove_dir(&pod).unwrap();
        wait_for(&w, &CgroupEvent::Removed(pod), Duration::from_secs(1));
        removed.push(start.elapsed());
    }
    for (what, samples) in [
        ("mkdir -> Created", &mut created),
        ("rmdir -> Removed", &mut removed),
    ] {
        samples.sort();
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        eprintln!(
            "cgroup watcher latency, {what}, n={}: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}, mean {:?}",
            samples.len(),
            percentile(samples, 0.50),
            percentile(samples, 0.90),
            percentile(samples, 0.99),
            samples[samples.len() - 1],
            mean,
        );
        // Measured here: p50 ~45 µs, p99 ~0.3-3 ms (2 shared cores). The bounds leave room
        // for a loaded machine but catch a watcher that fell back to polling or a 100x
        // slower event path (each wait above gives up at 1 s, so a bound of 1 s could not).
        assert!(
            percentile(samples, 0.50) < Duration::from_millis(2),
            "{what}: median {:?}: {samples:?}",
            percentile(samples, 0.50)
        );
        assert!(
            percentile(samples, 0.99) < Duration::from_millis(100),
            "{what}: p99 {:?}: {samples:?}",
            percentile(samples, 0.99)
        );
    }
}

#[test]
fn rescan_reports_the_full_tree_periodically() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let root = canonical(&cg).join("kubepods");
    let pod_b = root.join(format!("burstable/pod{UID_B}"));
    mkdirs(&[pod_b.join(cid(1)), root.join(format!("pod{UID_G}"))]);
    let mut config = WatchConfig::new(&root, CgroupDriver::Cgroupfs);
    config.rescan_interval = Duration::from_millis(150);
    let w = CgroupWatcher::spawn_thread(config).unwrap();
    let initial = first_rescan(&w);
    // Sorted by path: `burstable/pod…` before `pod…`.
    let uids: Vec<(&str, QosClass)> = initial.iter().map(|p| (p.uid.as_str(), p.qos)).collect();
    assert_eq!(
        uids,
        vec![(UID_B, QosClass::Burstable), (UID_G, QosClass::Guaranteed)]
    );
    assert_eq!(initial[0].containers.len(), 1);
    assert!(initial[1].containers.is_empty());

    // The next rescan (150 ms later) sees a change made meanwhile, and so does the one after.
    mkdirs(&[root.join(format!("besteffort/pod{UID_BE}"))]);
    let started = Instant::now();
    let mut rescans = 0;
    let mut saw_new_pod = false;
    while rescans < 3 {
        match w.recv_timeout(Duration::from_secs(2)) {
            Some(CgroupEvent::Rescan(pods)) => {
                rescans += 1;
                saw_new_pod |= pods
                    .iter()
                    .any(|p| p.uid == UID_BE && p.qos == QosClass::BestEffort);
                assert!(pods.len() >= 2);
            }
            Some(_) => {}
            None => panic!("rescans stopped after {rescans}"),
        }
    }
    assert!(saw_new_pod);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "3 rescans at 150 ms took {elapsed:?}"
    );
}

/// Past the watch cap, new pods are still reported (their parents are watched), but their
/// containers only show up in the rescan.
#[test]
fn rescan_covers_what_the_watch_cap_leaves_out() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let root = systemd_tree(&cg);
    let mut config = WatchConfig::new(&root, CgroupDriver::Systemd);
    config.max_watches = 3; // root + the two QoS slices
    config.rescan_interval = Duration::from_millis(200);
    let w = CgroupWatcher::spawn_thread(config).unwrap();
    first_rescan(&w);
    let pod = pod_cgroup_dir(&root, CgroupDriver::Systemd, QosClass::Burstable, UID_B);
    fs::create_dir(&pod).unwrap();
    wait_for(
        &w,
        &CgroupEvent::Created(pod.clone()),
        Duration::from_millis(100),
    );
    let container = pod.join(format!("cri-containerd-{}.scope", cid(7)));
    fs::create_dir(&container).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match w.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Some(CgroupEvent::Created(p)) if p == container => {
                panic!("the container's pod has no watch under the cap; it cannot be reported directly")
            }
            Some(CgroupEvent::Rescan(pods)) => {
                let found = pods.iter().any(|p| {
                    p.uid == UID_B && p.containers.iter().any(|c| c.dir.path == container)
                });
                if found {
                    break;
                }
            }
            Some(_) => {}
            None => panic!("no rescan showed {}", container.display()),
        }
    }
}

#[test]
fn watcher_setup_errors_are_clear() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let missing = canonical(&cg).join("kubepods.slice");
    let err =
        CgroupWatcher::spawn_thread(WatchConfig::new(&missing, CgroupDriver::Systemd)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "pods root: cgroup directory {} does not exist",
            missing.display()
        )
    );
}

/// What one rescan costs on a busy node's worth of directories (300 pods, 3 containers
/// each), printed, with a bound that catches an order-of-magnitude regression.
#[test]
fn scan_cost_of_a_busy_node() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new().unwrap();
    let root = systemd_tree(&cg);
    let mut dirs = Vec::new();
    for i in 0..300 {
        let pod = pod_cgroup_dir(&root, CgroupDriver::Systemd, QosClass::ALL[i % 3], &uid(i));
        for c in 0..3 {
            dirs.push(pod.join(format!("cri-containerd-{}.scope", cid((i * 3 + c) as u8))));
        }
    }
    // Distinct container ids are not needed for the cost; distinct pods are.
    mkdirs(&dirs);
    let mut times = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        let pods = scan_pods(&root, CgroupDriver::Systemd).unwrap();
        times.push(start.elapsed());
        assert_eq!(pods.len(), 300);
        assert!(pods.iter().all(|p| !p.containers.is_empty()));
    }
    times.sort();
    eprintln!(
        "scan_pods of 300 pods / ~1200 directories: median {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    // Measured here: median ~6 ms. 100 ms still passes on a loaded machine and fails on a
    // 20x regression (e.g. a stat per file, or walking past the pod level).
    assert!(
        times[times.len() / 2] < Duration::from_millis(100),
        "median {:?}",
        times[times.len() / 2]
    );
}
