//! The rendered DaemonSet's pod template turned into the CRI `ContainerConfig` a kubelet
//! would send for its agent container: image, args, env (the downward API resolved), mounts
//! (each volume's source on this machine), securityContext, resources, log path.
//!
//! Every difference from what a kubelet on a Kubernetes node would send is added here, named
//! in [`ContainerPlan::deviations`], and printed by the test; anything in the template this
//! mapping does not know (a new volume type, a downward-API field, hostPID) is an error, so a
//! manifest change is either tested or fails the test — never silently ignored.

use std::{collections::HashMap, path::PathBuf};

use anyhow::{bail, ensure, Context as _, Result};
use k8s_cri::v1::{
    security_profile::ProfileType, Capability, ContainerConfig, ContainerMetadata, ImageSpec,
    Int64Value, KeyValue, LinuxContainerConfig, LinuxContainerResources,
    LinuxContainerSecurityContext, Mount, MountPropagation, NamespaceMode, NamespaceOption,
    SecurityProfile,
};
use serde_json::Value;

/// What the kubelet knows about the pod and node, for the downward API.
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
}

/// Where each kind of host path lives on this machine (see the test's module docs).
pub struct HostSources {
    /// The bpf filesystem the agent pins in (a private bpffs instance).
    pub bpffs: PathBuf,
    /// This machine's cgroup v2 mount.
    pub cgroup2: PathBuf,
    /// The directory the ConfigMap's keys were written to.
    pub config_dir: PathBuf,
    /// A fresh directory per emptyDir volume is made below this one.
    pub empty_dirs: PathBuf,
    /// The lab runtime's CRI socket, for a hostPath naming a runtime socket.
    pub runtime_socket: PathBuf,
}

/// The container config and how it differs from a kubelet's.
pub struct ContainerPlan {
    pub config: ContainerConfig,
    pub deviations: Vec<String>,
    /// The container's one listening port named `metrics` (containerPort).
    pub metrics_port: u16,
}

/// The kubelet's default masked and read-only /proc and /sys paths (procMount: Default),
/// which it sends explicitly.
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The pod template's spec.
pub fn pod_spec(daemonset: &Value) -> &Value {
    &daemonset["spec"]["template"]["spec"]
}

/// hostNetwork of the template; hostPID and hostIPC must be false (the lab's sandboxes run
/// with a pod IPC and container PID namespace, as the kubelet does for those).
pub fn host_network(daemonset: &Value) -> Result<bool> {
    let pod = pod_spec(daemonset);
    for ns in ["hostPID", "hostIPC"] {
        ensure!(
            pod[ns] != true,
            "the DaemonSet sets {ns}: the CRI lab's sandboxes cannot express it yet (extend \
             tests/src/cri_lab.rs PodSpec)"
        );
    }
    Ok(pod["hostNetwork"] == true)
}

/// The agent container's config; `extra_args` and `extra_mounts` are the test's own
/// additions (each must be listed in `deviations` by the caller).
pub fn container_plan(
    daemonset: &Value,
    configmaps: &[Value],
    pod: &PodIdentity,
    host: &HostSources,
) -> Result<ContainerPlan> {
    let spec = pod_spec(daemonset);
    let containers = spec["containers"].as_array().context("no containers")?;
    ensure!(
        containers.len() == 1,
        "expected one container in the DaemonSet, found {}",
        containers.len()
    );
    let c = &containers[0];
    let name = c["name"].as_str().context("container name")?;
    let image = c["image"].as_str().context("container image")?;
    let mut deviations = Vec::new();

    let mounts = mounts(spec, c, configmaps, host, &mut deviations)?;
    let envs = envs(c, pod)?;
    let security = security_context(c, host_network(daemonset)?)?;
    let metrics_port = c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "metrics")
        .and_then(|p| p["containerPort"].as_u64())
        .context("no port named metrics")? as u16;

    let mut labels: HashMap<String, String> = HashMap::from([
        ("io.kubernetes.pod.name".into(), pod.name.clone()),
        ("io.kubernetes.pod.namespace".into(), pod.namespace.clone()),
        ("io.kubernetes.pod.uid".into(), pod.uid.clone()),
        ("io.kubernetes.container.name".into(), name.to_owned()),
    ]);
    labels.retain(|_, v| !v.is_empty());
    let config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        // `command` unset: the image's ENTRYPOINT, as the manifest leaves it.
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        envs,
        mounts,
        labels,
        log_path: format!("{name}/0.log"),
        linux: Some(LinuxContainerConfig {
            resources: Some(resources(&c["resources"])?),
            security_context: Some(security),
        }),
        ..Default::default()
    };
    Ok(ContainerPlan {
        config,
        deviations,
        metrics_port,
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// Each volumeMount with its volume's source on this machine.
fn mounts(
    spec: &Value,
    c: &Value,
    configmaps: &[Value],
    host: &HostSources,
    deviations: &mut Vec<String>,
) -> Result<Vec<Mount>> {
    let volumes: HashMap<&str, &Value> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    let mut out = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vname = m["name"].as_str().context("volumeMount name")?;
        let volume = volumes
            .get(vname)
            .with_context(|| format!("volumeMount {vname} has no volume"))?;
        let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
            host_path_source(path, host, deviations)?
        } else if let Some(cm) = volume["configMap"]["name"].as_str() {
            let obj = configmaps
                .iter()
                .find(|d| d["metadata"]["name"] == cm)
                .with_context(|| format!("ConfigMap {cm} is not in the rendered manifests"))?;
            std::fs::create_dir_all(&host.config_dir)?;
            for (key, value) in obj["data"].as_object().into_iter().flatten() {
                std::fs::write(host.config_dir.join(key), value.as_str().unwrap_or(""))?;
            }
            host.config_dir.clone()
        } else if volume.get("emptyDir").is_some() {
            let dir = host.empty_dirs.join(vname);
            std::fs::create_dir_all(&dir)?;
            dir
        } else {
            bail!("volume {vname}: only hostPath, configMap and emptyDir are mapped: {volume}");
        };
        let propagation = match m["mountPropagation"].as_str() {
            None | Some("None") => MountPropagation::PropagationPrivate,
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => MountPropagation::PropagationBidirectional,
            Some(other) => bail!("mountPropagation {other}"),
        };
        out.push(Mount {
            container_path: m["mountPath"].as_str().context("mountPath")?.to_owned(),
            host_path: source.display().to_string(),
            readonly: m["readOnly"] == true,
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    Ok(out)
}

/// Where a hostPath of a Kubernetes node is on this machine.
fn host_path_source(
    path: &str,
    host: &HostSources,
    deviations: &mut Vec<String>,
) -> Result<PathBuf> {
    let source = match path {
        "/sys/fs/bpf" => {
            deviations.push(format!(
                "hostPath /sys/fs/bpf -> a private bpffs at {} (tests never pin in the machine's)",
                host.bpffs.display()
            ));
            host.bpffs.clone()
        }
        "/sys/fs/cgroup" => {
            if host.cgroup2 != std::path::Path::new(path) {
                deviations.push(format!(
                    "hostPath /sys/fs/cgroup -> {} (this machine mounts cgroup v2 there, hybrid \
                     mode; a Kubernetes node has it at /sys/fs/cgroup)",
                    host.cgroup2.display()
                ));
            }
            host.cgroup2.clone()
        }
        "/run/netns" | "/var/run/netns" => PathBuf::from(path),
        p if p.ends_with(".sock") && (p.contains("containerd") || p.contains("crio")) => {
            deviations.push(format!(
                "hostPath {p} -> the lab containerd's socket {}",
                host.runtime_socket.display()
            ));
            host.runtime_socket.clone()
        }
        // The runtime's socket directory (runtime.socket: auto looks for containerd.sock in
        // it): the lab's directory, which holds the lab containerd's socket.
        "/run/containerd" | "/run/k3s/containerd" | "/var/run/crio" => {
            let dir = host
                .runtime_socket
                .parent()
                .context("the lab socket has a directory")?
                .to_path_buf();
            deviations.push(format!(
                "hostPath {path} -> the lab containerd's directory {}",
                dir.display()
            ));
            dir
        }
        // The state cache (stateDir): a fresh directory, so that no earlier run's cache (or
        // the machine's) is read.
        "/var/lib/datalab-guard" => {
            let dir = host.empty_dirs.join("host-state-dir");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            deviations.push(format!(
                "hostPath {path} -> a fresh directory {}",
                dir.display()
            ));
            dir
        }
        other => bail!(
            "hostPath {other} is not mapped by tests/tests/image_runtime/pod_config.rs: say \
             where it lives on this machine"
        ),
    };
    Ok(source)
}

/// env with the downward API resolved as the kubelet does.
fn envs(c: &Value, pod: &PodIdentity) -> Result<Vec<KeyValue>> {
    let mut out = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let key = e["name"].as_str().context("env name")?.to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => pod.node.clone(),
                Some("metadata.uid") => pod.uid.clone(),
                Some("metadata.namespace") => pod.namespace.clone(),
                Some("metadata.name") => pod.name.clone(),
                _ => bail!("env {key}: only values and the fieldRefs spec.nodeName, metadata.uid, metadata.namespace, metadata.name are mapped: {e}"),
            }
        };
        out.push(KeyValue { key, value });
    }
    Ok(out)
}

/// The container's securityContext as the kubelet translates it.
fn security_context(c: &Value, host_network: bool) -> Result<LinuxContainerSecurityContext> {
    let sc = &c["securityContext"];
    let seccomp = match sc["seccompProfile"]["type"].as_str() {
        Some("RuntimeDefault") => ProfileType::RuntimeDefault,
        Some("Unconfined") | None => ProfileType::Unconfined,
        Some(other) => bail!("seccompProfile {other} is not mapped"),
    };
    let int = |k: &str| sc[k].as_i64().map(|value| Int64Value { value });
    Ok(LinuxContainerSecurityContext {
        capabilities: Some(Capability {
            add_capabilities: strings(&sc["capabilities"]["add"]),
            drop_capabilities: strings(&sc["capabilities"]["drop"]),
            ..Default::default()
        }),
        privileged: sc["privileged"] == true,
        namespace_options: Some(NamespaceOption {
            network: if host_network {
                NamespaceMode::Node
            } else {
                NamespaceMode::Pod
            } as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        }),
        run_as_user: int("runAsUser"),
        run_as_group: int("runAsGroup"),
        readonly_rootfs: sc["readOnlyRootFilesystem"] == true,
        // allowPrivilegeEscalation unset means true, as in Kubernetes.
        no_new_privs: sc["allowPrivilegeEscalation"] == false,
        masked_paths: MASKED_PATHS.iter().map(|p| (*p).to_owned()).collect(),
        readonly_paths: READONLY_PATHS.iter().map(|p| (*p).to_owned()).collect(),
        seccomp: Some(SecurityProfile {
            profile_type: seccomp as i32,
            localhost_ref: String::new(),
        }),
        ..Default::default()
    })
}

/// limits.memory and requests.cpu as the kubelet sends them (cgroupfs driver).
fn resources(r: &Value) -> Result<LinuxContainerResources> {
    let memory = r["limits"]["memory"]
        .as_str()
        .map(quantity_bytes)
        .transpose()?;
    let cpu_millis = r["requests"]["cpu"]
        .as_str()
        .map(|q| match q.strip_suffix('m') {
            Some(m) => m.parse::<i64>(),
            None => q.parse::<i64>().map(|c| c * 1000),
        })
        .transpose()
        .context("requests.cpu")?;
    Ok(LinuxContainerResources {
        memory_limit_in_bytes: memory.unwrap_or(0),
        // The kubelet's MilliCPUToShares (minimum 2).
        cpu_shares: cpu_millis.map_or(2, |m| (m * 1024 / 1000).max(2)),
        ..Default::default()
    })
}

/// "256Mi", "1Gi", "64M", "1000" → bytes.
fn quantity_bytes(q: &str) -> Result<i64> {
    let units = [
        ("Ki", 1i64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return Ok(n.parse::<i64>().context("quantity")? * factor);
        }
    }
    q.parse().with_context(|| format!("quantity {q}"))
}

#[test]
fn quantities_and_env() {
    assert_eq!(quantity_bytes("256Mi").unwrap(), 256 << 20);
    assert_eq!(quantity_bytes("64M").unwrap(), 64_000_000);
    let c = serde_json::json!({"env": [
        {"name": "A", "value": "x"},
        {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]});
    let pod = PodIdentity {
        namespace: "ns".into(),
        name: "p".into(),
        uid: "u".into(),
        node: "n1".into(),
    };
    let env = envs(&c, &pod).unwrap();
    assert_eq!((env[1].key.as_str(), env[1].value.as_str()), ("N", "n1"));
    let bad = serde_json::json!({"env": [{"name": "S", "valueFrom": {"secretKeyRef": {}}}]});
    assert!(envs(&bad, &pod).is_err(), "an unmapped source is an error");
}
