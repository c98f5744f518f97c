//! The released image under a real container runtime, with exactly the DaemonSet's
//! privileges: what `kubectl apply -k deploy/` would run on a node.
//!
//! 1. The OCI archive of `cargo xtask image` is imported into the CRI lab's containerd
//!    (`ctr images import`) and tagged with the name the kubelet resolves the manifest's
//!    `image:` to.
//! 2. `deploy/` is rendered with `kubectl kustomize`; the DaemonSet's pod template becomes a
//!    pod sandbox (its host namespaces, labels, cgroup parent) and a `ContainerConfig`
//!    (image, args, env, mounts, securityContext, resources) by
//!    `image_runtime/pod_config.rs`, as the kubelet would send them. The agent's config is
//!    the rendered ConfigMap.
//! 3. The agent talks to the API server fixture; a tenant pod sandbox in an environment
//!    namespace is refused the (fake) metadata host with zero packets arriving there, a
//!    kube-system sandbox reaches it, the audit line for the attempt is in the container's
//!    CRI log, and `/metrics` counts it.
//!
//! Under `cargo xtask test` the image holds the test run's debug build of the agent,
//! stripped, where `cargo xtask image` puts the release build (the same Containerfile stage,
//! `AGENT_BINARY`): a cold release build costs CI minutes, and what is tested here is the
//! image's packaging, privileges and behaviour.
//!
//! Deviations from a kubelet on a Kubernetes node (each printed by the test):
//! - the API server is reached through a kubeconfig in an extra read-only mount
//!   (`/var/run/datalab-guard-test`) and `--kubeconfig` instead of the service-account token
//!   and `KUBERNETES_SERVICE_*` (the fixture speaks plain HTTP on loopback). With
//!   `hostNetwork: false` the fixture listens on loopback *inside the agent pod's network
//!   namespace*, so nothing leaves it;
//! - `--cgroup-root` names `kubepods`, not `kubepods.slice`: the lab runtime uses the
//!   cgroupfs driver (PID 1 here is not systemd), which is what the example overlay's patch
//!   does for such nodes;
//! - hostPath `/sys/fs/bpf` is a private bpffs, and `/sys/fs/cgroup` is this machine's cgroup
//!   v2 mount (hybrid mode: `/sys/fs/cgroup/unified`);
//! - the downward API's node name is a made-up node; no service-account token is mounted.
//!
//! The fake metadata host: each test pod's network namespace (made by the runtime's CNI)
//! gets the tenant end of a kit `Lab`'s veth pair, moved in from the lab, so 169.254.169.254
//! is on-link there and the lab's nftables counters see every packet that arrives.
//!
//! Run (root, after `cargo xtask image`):
//! `cargo test -p datalab-guard-tests --test image_runtime -- --test-threads=1 --nocapture`

#[path = "shipped/manifests.rs"]
mod manifests;
#[path = "image_runtime/pod_config.rs"]
mod pod_config;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use datalab_guard_tests::{
    apiserver::{FakeApiServer, PodBuilder},
    bins::workspace_root,
    free_loopback_addr, http_get,
    mountinfo::cgroup2_mount,
    probe_in,
    process::{run_checked, tool, with_netns_thread},
    require_root, BpffsDir, CriLab, Lab, LabPod, PodSpec, ProbeResult,
};
use manifests::ScratchDir;
use pod_config::{container_plan, host_network, HostSources, PodIdentity};
use serde_json::Value;

const NODE: &str = "image-node-1";
const ENV_LABEL: (&str, &str) = ("datalab.io/environment", "true");
const IMDS4: &str = "169.254.169.254";
/// Where the test's kubeconfig is mounted in the agent container (a deviation, see above).
const TEST_MOUNT: &str = "/var/run/datalab-guard-test";

/// The archive `cargo xtask image` writes (or `$DATALAB_GUARD_IMAGE_ARCHIVE`).
fn image_archive() -> PathBuf {
    if let Some(p) = std::env::var_os("DATALAB_GUARD_IMAGE_ARCHIVE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let version = env!("CARGO_PKG_VERSION");
    let path = workspace_root().join(format!("target/image/datalab-guard-{version}.oci.tar"));
    assert!(
        path.is_file(),
        "{} is missing: build the image first with `cargo xtask image` (as root)",
        path.display()
    );
    path
}

/// The name containerd's CRI resolves a manifest's `image:` to (docker.io/library/ for a
/// bare name), which is what the imported image must be tagged as.
fn normalized_image(image: &str) -> String {
    let (first, _) = image.split_once('/').unwrap_or(("", image));
    if !image.contains('/') {
        format!("docker.io/library/{image}")
    } else if first.contains('.') || first.contains(':') || first == "localhost" {
        image.to_owned()
    } else {
        format!("docker.io/{image}")
    }
}

fn ctr(lab: &CriLab, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(tool("ctr".as_ref()));
    cmd.arg("--address")
        .arg(lab.socket())
        .args(["-n", "k8s.io"])
        .args(args);
    let out = run_checked(&mut cmd, &format!("ctr {}", args.join(" ")), None)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Imports the archive and tags its image as `name`.
fn import_image(lab: &CriLab, archive: &Path, name: &str) -> Result<()> {
    let t = Instant::now();
    let out = ctr(lab, &["images", "import", &archive.display().to_string()])?;
    // ctr prints `unpacking <name> (sha256:...)...done` per image.
    let imported = out
        .lines()
        .find_map(|l| l.strip_prefix("unpacking ")?.split_whitespace().next())
        .with_context(|| format!("ctr images import named no image: {out}"))?
        .to_owned();
    if imported != name {
        ctr(lab, &["images", "tag", "--force", &imported, name])?;
    }
    eprintln!("imported {imported} as {name} in {:?}", t.elapsed());
    Ok(())
}

/// The network namespace name of a bridged sandbox (`/var/run/netns/<name>`).
fn netns_name(pod: &LabPod) -> String {
    let path = pod.netns.as_ref().expect("a bridged pod has a netns");
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// Gives `pod` an on-link path to a fake metadata host: the tenant end of `lab`'s veth pair
/// moves into the pod's namespace (see the module docs).
fn wire_metadata_host(lab: &Lab, pod: &LabPod) -> Result<()> {
    let ns = netns_name(pod);
    let ip = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new(tool("ip".as_ref()));
        cmd.args(args);
        run_checked(&mut cmd, &format!("ip {}", args.join(" ")), None).map(|_| ())
    };
    ip(&[
        "-n",
        lab.tenant_ns(),
        "link",
        "set",
        "veth-tenant",
        "netns",
        &ns,
    ])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        "169.254.1.2/16",
        "dev",
        "veth-tenant",
    ])?;
    ip(&["-n", &ns, "link", "set", "veth-tenant", "up"])?;
    Ok(())
}

/// The sandbox's own cgroup (v2): where a process of the pod runs.
fn sandbox_cgroup(lab: &CriLab, pod: &LabPod) -> PathBuf {
    lab.pod_cgroup_dir(pod).unwrap().join(&pod.id)
}

fn probe(pod: &LabPod, cgroup: &Path, kind: &str) -> ProbeResult {
    probe_in(cgroup, Some(&netns_name(pod)), kind, IMDS4, 80, Some(1000))
        .unwrap_or_else(|e| panic!("probe from {}: {e:#}", pod.spec.name))
}

/// GET from the agent's point of view: inside its pod network namespace (loopback there),
/// or on the host's loopback for a hostNetwork pod.
fn agent_get(netns: Option<&str>, addr: SocketAddr, path: &str) -> Result<String> {
    let path = path.to_owned();
    let get = move || -> Result<String> {
        let r = http_get(addr, &path, Duration::from_secs(2))?;
        if r.status != 200 {
            bail!("GET {path}: {} {}", r.status, r.body);
        }
        Ok(r.body)
    };
    match netns {
        Some(ns) => with_netns_thread(ns, get),
        None => get(),
    }
}

/// The container's CRI log (`<time> <stream> <tag> <line>` per line), message part only.
fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_owned))
        .collect()
}

fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> T {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            panic!("{what}: not within {timeout:?} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn metric(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter(|l| label.is_none_or(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn released_image_runs_with_the_daemonsets_privileges_and_guards_cri_pods() {
    if !require_root() {
        return;
    }
    let archive = image_archive();
    let docs = manifests::render(&[]).expect("rendering deploy/");
    let ds = manifests::one(&docs, "DaemonSet", None).unwrap().clone();
    let configmaps: Vec<Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .cloned()
        .collect();
    let host_net = host_network(&ds).unwrap();
    let ds_namespace = ds["metadata"]["namespace"].as_str().unwrap().to_owned();

    // The metadata hosts (kit labs) first: they also make /run/netns a shared mount
    // (iproute2 does on `ip netns add`), which the netns volume's HostToContainer needs.
    let mut tenant_md = Lab::new().expect("lab");
    tenant_md.start_fake_imds().expect("fake imds");
    let mut system_md = Lab::new().expect("lab");
    system_md.start_fake_imds().expect("fake imds");

    let lab = CriLab::start().expect("CRI lab");
    let bpffs = BpffsDir::new().expect("bpffs");
    // HostToContainer needs a shared (or slave) source mount, as the host's /sys/fs/bpf is on
    // a systemd node.
    let mut make_shared = Command::new(tool("mount".as_ref()));
    make_shared.arg("--make-shared").arg(bpffs.path());
    run_checked(&mut make_shared, "mount --make-shared bpffs", None).unwrap();
    let scratch = ScratchDir::new("image-runtime");

    let container = &pod_config::pod_spec(&ds)["containers"][0];
    let image = normalized_image(container["image"].as_str().unwrap());
    import_image(&lab, &archive, &image).expect("importing the image");

    // The agent's pod: the template's labels, hostNetwork, the DaemonSet's namespace.
    let mut agent_spec = PodSpec::new(&ds_namespace, "datalab-guard-x7k2p");
    if host_net {
        agent_spec = agent_spec.host_network();
    }
    for (k, v) in ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        agent_spec = agent_spec.label(k, v.as_str().unwrap_or(""));
    }
    let agent_pod = lab.run_pod(&agent_spec).expect("agent sandbox");
    let agent_netns = (!host_net).then(|| netns_name(&agent_pod));

    // The API server: on loopback where the agent is (its pod's namespace, or the host's).
    let api = match &agent_netns {
        Some(ns) => with_netns_thread(ns, || Ok(FakeApiServer::start())).unwrap(),
        None => FakeApiServer::start(),
    };
    api.apply_node(NODE, &["10.244.0.0/16"]);
    api.apply_namespace(&ds_namespace, &[]);
    api.apply_namespace("team-a", &[ENV_LABEL]);
    let announce = |pod: &LabPod| {
        api.apply_pod(
            PodBuilder::new(&pod.spec.namespace, &pod.spec.name)
                .uid(&pod.spec.uid)
                .node(NODE)
                .qos_class("Burstable")
                .host_network(pod.spec.host_network)
                .container("main", None)
                .build(),
        );
    };
    announce(&agent_pod);
    let kube_dir = scratch.path().join("kube");
    std::fs::create_dir_all(&kube_dir).unwrap();
    api.write_kubeconfig(kube_dir.join("kubeconfig")).unwrap();

    let identity = PodIdentity {
        namespace: ds_namespace,
        name: agent_spec.name.clone(),
        uid: agent_spec.uid,
        node: NODE.into(),
    };
    let cgroup2 = cgroup2_mount().unwrap();
    let host = HostSources {
        bpffs: bpffs.path().to_path_buf(),
        cgroup2,
        config_dir: scratch.path().join("config"),
        empty_dirs: scratch.path().join("empty"),
        runtime_socket: lab.socket().to_path_buf(),
    };
    let mut plan = container_plan(&ds, &configmaps, &identity, &host).expect("DaemonSet -> CRI");
    adapt_to_the_lab(&mut plan, &kube_dir, host_net, &host.config_dir);
    eprintln!("deviations from a kubelet on a Kubernetes node:");
    for d in &plan.deviations {
        eprintln!("  - {d}");
    }
    eprintln!("container args: {:?}", plan.config.args);
    let log = Path::new(agent_pod.log_directory()).join(&plan.config.log_path);
    let metrics_addr: SocketAddr = match host_net {
        true => plan_metrics_addr(&plan),
        false => SocketAddr::from(([127, 0, 0, 1], plan.metrics_port)),
    };
    let started = Instant::now();
    lab.start_container_config(&agent_pod, plan.config.clone())
        .unwrap_or_else(|e| panic!("starting the agent container: {e:#}\n{}", lab.log_tail(20)));

    eventually(
        "the agent container's /readyz",
        Duration::from_secs(60),
        || match agent_get(agent_netns.as_deref(), metrics_addr, "/readyz") {
            Ok(_) => Ok(Some(())),
            Err(e) => Err(e.context(format!("container log:\n{}", log_lines(&log).join("\n")))),
        },
    );
    eprintln!(
        "agent container ready {:?} after StartContainer",
        started.elapsed()
    );
    let metrics = agent_get(agent_netns.as_deref(), metrics_addr, "/metrics").unwrap();
    assert!(metrics.contains("datalab_guard_build_info"), "{metrics}");

    // A tenant pod in an environment namespace and a system pod, through CRI.
    let tenant = lab
        .run_pod(&PodSpec::new("team-a", "notebook-0"))
        .expect("tenant sandbox");
    let system = lab
        .run_pod(&PodSpec::new("kube-system", "aws-node-4xk9z"))
        .expect("system sandbox");
    announce(&tenant);
    announce(&system);
    wire_metadata_host(&tenant_md, &tenant).unwrap();
    wire_metadata_host(&system_md, &system).unwrap();
    let (tenant_cg, system_cg) = (sandbox_cgroup(&lab, &tenant), sandbox_cgroup(&lab, &system));

    // Fail closed: refused at once, whether or not the agent has classified the pod yet.
    let r = probe(&tenant, &tenant_cg, "tcp");
    assert!(
        r.is_eperm(),
        "the tenant sandbox must be refused: {}",
        r.raw
    );
    // The system pod is exempt once the agent classified it (unknown cgroups are guarded).
    eventually(
        "the kube-system sandbox reaches the metadata host",
        Duration::from_secs(20),
        || Ok(probe(&system, &system_cg, "http").ok.then_some(())),
    );
    // Once the tenant is classified too, its attempts are attributed to it in the audit.
    eventually(
        "the tenant pod classified (guarded_pods)",
        Duration::from_secs(20),
        || {
            let m = agent_get(agent_netns.as_deref(), metrics_addr, "/metrics")?;
            Ok((metric(&m, "datalab_guard_guarded_pods", None) >= 1.0).then_some(()))
        },
    );
    for kind in ["tcp", "udp-sendto"] {
        let r = probe(&tenant, &tenant_cg, kind);
        assert!(
            r.is_eperm(),
            "the tenant sandbox must be refused ({kind}): {}",
            r.raw
        );
    }
    assert_eq!(
        tenant_md.imds_packets(),
        0,
        "no packet of the tenant reached the metadata host"
    );
    assert!(
        system_md.imds_packets() > 0,
        "the system pod's packets arrive"
    );

    // The audit line, from the container's CRI log.
    let line = eventually(
        "an audit line for notebook-0 in the container log",
        Duration::from_secs(10),
        || {
            let lines = log_lines(&log);
            match lines
                .iter()
                .find(|l| l.contains("egress_blocked") && l.contains("notebook-0"))
            {
                Some(l) => Ok(Some(l.clone())),
                // The log so far, for the failure message.
                None => bail!("container log:\n{}", lines.join("\n")),
            }
        },
    );
    let record: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (record["namespace"].as_str(), record["pod"].as_str()),
        (Some("team-a"), Some("notebook-0")),
        "{line}"
    );
    assert_eq!(record["node"], NODE, "{line}");

    let metrics = agent_get(agent_netns.as_deref(), metrics_addr, "/metrics").unwrap();
    assert!(
        metric(
            &metrics,
            "datalab_guard_blocked_total",
            Some(("namespace", "team-a"))
        ) >= 2.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "datalab_guard_guarded_pods", None) >= 1.0,
        "{metrics}"
    );
    assert_eq!(tenant_md.imds_packets(), 0, "still nothing from the tenant");

    drop(api);
    lab.shutdown().expect("CRI lab cleanup");
}

/// The test's own additions (see the module docs); each is recorded as a deviation.
fn adapt_to_the_lab(
    plan: &mut pod_config::ContainerPlan,
    kube_dir: &Path,
    host_net: bool,
    config_dir: &Path,
) {
    let c = &mut plan.config;
    c.mounts.push(k8s_cri::v1::Mount {
        container_path: TEST_MOUNT.into(),
        host_path: kube_dir.display().to_string(),
        readonly: true,
        ..Default::default()
    });
    c.args.push(format!("--kubeconfig={TEST_MOUNT}/kubeconfig"));
    plan.deviations.push(format!(
        "extra read-only mount {TEST_MOUNT} and --kubeconfig (the API fixture instead of a \
         service-account token)"
    ));
    for arg in c
        .args
        .iter_mut()
        .filter(|a| a.starts_with("--cgroup-root="))
    {
        let (dir, _) = arg.rsplit_once('/').expect("--cgroup-root=<dir>/<root>");
        let new = format!("{dir}/kubepods");
        plan.deviations
            .push(format!("{arg} -> {new} (cgroupfs driver here)"));
        *arg = new;
    }
    if host_net {
        // On the host's network the default 0.0.0.0:9090 would be the machine's; and the
        // CNI probe's control attempt would go to the machine's real metadata route.
        let addr = free_loopback_addr().unwrap();
        // In place of the manifest's own --metrics-addr (a flag given twice is bad input).
        c.args.retain(|a| !a.starts_with("--metrics-addr"));
        c.args.push(format!("--metrics-addr={addr}"));
        plan.deviations.push(format!(
            "--metrics-addr={addr} (hostNetwork: loopback only)"
        ));
        let file = config_dir.join("config.yaml");
        let mut config: Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        if config.is_null() {
            config = serde_json::json!({});
        }
        config["probe"]["enabled"] = false.into();
        std::fs::write(&file, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
        plan.deviations.push(
            "probe.enabled=false in the shipped config (hostNetwork: its control attempt would \
             leave through this machine's real network)"
                .into(),
        );
    }
}

fn plan_metrics_addr(plan: &pod_config::ContainerPlan) -> SocketAddr {
    plan.config
        .args
        .iter()
        .rev()
        .find_map(|a| a.strip_prefix("--metrics-addr=")?.parse().ok())
        .expect("a --metrics-addr")
}
