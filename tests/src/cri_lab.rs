//! [`CriLab`]: a real container runtime (containerd 1.6 + runc, Debian packages) that runs
//! kubelet-style pod sandboxes and containers, driven through the CRI v1 API from Rust the
//! way a kubelet drives it — real pod cgroups (`kubepods/<qos>/pod<uid>`, cgroupfs driver),
//! real runtime metadata, real pod network namespaces — with no registry and no kubelet.
//!
//! Each lab has its own containerd (own root, state, sockets and runc state under a private
//! directory `$TMPDIR/dgc-<pid>-<n>`), its own bridge named like the directory with a private
//! /24 that carries only an on-link route (the CNI bridge runs with `isGateway: false`, so
//! nothing turns on ip_forward and nothing can leave the lab), and the busybox-static image
//! built with umoci and imported with `ctr`; that image is also the sandbox image. The
//! verified recipe and its pitfalls are in the shared `CRI-LAB.md`.
//!
//! Cleanup: [`CriLab::shutdown`] removes everything and reports what it could not;
//! `Drop` does the same on a panicking test and prints problems. What the runtime creates
//! outside the lab directory (pod cgroups in every hierarchy, `/var/run/netns/cni-*`,
//! `/run/containerd/s`) is recorded as it is created and removed by [`cleanup`]; a later run
//! removes the leftovers of a crashed one. Within one process labs run one at a time (a
//! lock): they share the kubepods cgroup parents and `/run/containerd`.
//!
//! A missing piece (containerd, runc, CNI plugins, umoci, busybox-static) panics with a
//! message that says `cargo xtask setup` installs it: CRI tests never skip.

pub mod cleanup;
pub mod files;

use std::{
    collections::HashMap,
    fs,
    future::Future,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerMetadata,
    CreateContainerRequest, ImageSpec, LinuxContainerConfig, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    mountinfo, names,
    process::{run_checked, tool},
};

/// Bound on every CRI call the kit makes (RunPodSandbox takes ~0.1 s here).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long containerd may take to answer CRI after it starts (~0.2 s here).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Third octet range of the labs' subnets, `10.244.<n>.0/24` (CRI-LAB.md's lab.sh uses 77).
const SUBNET_OCTETS: std::ops::RangeInclusive<u32> = 128..=191;

/// One lab at a time per process (see the module docs). Poisoning (a panicking test) is
/// ignored: the panicking lab's `Drop` cleaned up before the lock was released.
static LAB_LOCK: Mutex<()> = Mutex::new(());
static UID_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The kubelet's QoS classes, which decide the pod cgroup's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A pod to run, as a kubelet would describe it to the runtime.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// The pod UID (the API UID; a static pod's config hash).
    pub uid: String,
    pub host_network: bool,
    pub qos: Qos,
    /// Pod labels (the kubelet adds its `io.kubernetes.pod.*` ones to these).
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
}

impl PodSpec {
    /// A burstable pod with a fresh UUID-style uid, on the pod network.
    pub fn new(namespace: &str, name: &str) -> PodSpec {
        PodSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: fresh_uid(),
            host_network: false,
            qos: Qos::Burstable,
            labels: HashMap::new(),
            annotations: HashMap::from([(
                "kubernetes.io/config.source".to_owned(),
                "api".to_owned(),
            )]),
        }
    }

    /// `hostNetwork: true`.
    pub fn host_network(mut self) -> PodSpec {
        self.host_network = true;
        self
    }

    /// A static pod as the kubelet runs one from a manifest file: its uid is the 32-hex
    /// config hash, recorded in the `config.hash` annotation, and its config source is `file`.
    pub fn static_pod(mut self) -> PodSpec {
        let uid = fresh_uid().replace('-', "");
        self.annotations = HashMap::from([
            ("kubernetes.io/config.source".to_owned(), "file".to_owned()),
            ("kubernetes.io/config.hash".to_owned(), uid.clone()),
        ]);
        self.uid = uid;
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The kubelet's cgroupfs-driver parent for this pod: `/kubepods[/<qos>]/pod<uid>`.
    pub fn cgroup_parent(&self) -> String {
        match self.qos {
            Qos::Guaranteed => format!("/kubepods/pod{}", self.uid),
            Qos::Burstable => format!("/kubepods/burstable/pod{}", self.uid),
            Qos::BestEffort => format!("/kubepods/besteffort/pod{}", self.uid),
        }
    }

    /// The labels the kubelet puts on every sandbox and container of the pod.
    fn kubelet_labels(&self) -> [(String, String); 3] {
        [
            ("io.kubernetes.pod.name".to_owned(), self.name.clone()),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                self.namespace.clone(),
            ),
            ("io.kubernetes.pod.uid".to_owned(), self.uid.clone()),
        ]
    }

    fn sandbox_config(&self, log_root: &Path) -> PodSandboxConfig {
        let mut labels = self.labels.clone();
        labels.extend(self.kubelet_labels());
        let network = match self.host_network {
            true => NamespaceMode::Node,
            false => NamespaceMode::Pod,
        };
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            // The kubelet leaves it empty for hostNetwork pods (they share the host's UTS).
            hostname: if self.host_network {
                String::new()
            } else {
                self.name.clone()
            },
            log_directory: log_root
                .join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
                .display()
                .to_string(),
            labels,
            annotations: self.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: network as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A container `name` running `argv` (the image's busybox applets) in this pod.
    fn container_config(&self, name: &str, argv: &[&str]) -> Result<ContainerConfig> {
        let (command, args) = argv.split_first().ok_or_else(|| anyhow!("empty argv"))?;
        let mut labels = HashMap::from(self.kubelet_labels());
        labels.insert("io.kubernetes.container.name".to_owned(), name.to_owned());
        Ok(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: files::IMAGE.to_owned(),
                ..Default::default()
            }),
            command: vec![(*command).to_owned()],
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            log_path: format!("{name}/0.log"),
            labels,
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// A running pod sandbox made by [`CriLab::run_pod`].
#[derive(Clone, Debug)]
pub struct LabPod {
    pub id: String,
    pub spec: PodSpec,
    /// How long RunPodSandbox took.
    pub run_took: Duration,
    /// When RunPodSandbox returned.
    pub ran_at: Instant,
    /// The pod's network namespace file (`/var/run/netns/cni-*`); `None` for hostNetwork.
    pub netns: Option<PathBuf>,
    config: PodSandboxConfig,
}

impl LabPod {
    /// The sandbox's log directory: a container's CRI log is `<this>/<its log_path>`.
    pub fn log_directory(&self) -> &str {
        &self.config.log_directory
    }
}

/// A private containerd; see the module docs.
pub struct CriLab {
    name: String,
    dir: PathBuf,
    socket: PathBuf,
    subnet_octet: u32,
    containerd: Option<Child>,
    rt: tokio::runtime::Runtime,
    /// Set once containerd answers CRI.
    client: Option<RuntimeServiceClient<Channel>>,
    /// How long containerd took to answer CRI after it was started.
    pub startup: Duration,
    /// How long building and importing the image took.
    pub image_setup: Duration,
    done: bool,
    _lock: MutexGuard<'static, ()>,
}

impl CriLab {
    /// Builds the image, creates the bridge, starts containerd and imports the image.
    /// Panics if a needed program is missing (with the `cargo xtask setup` hint).
    pub fn start() -> Result<CriLab> {
        files::require_tools();
        let lock = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        cleanup::cleanup_stale_labs();
        let name = names::unique_name(cleanup::LAB_PREFIX);
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(dir.join("cni"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the lab's tokio runtime")?;
        // The runtime makes /run/containerd/s (shim sockets) whatever its config says; if
        // this lab is the one that makes it, the lab removes it again (once empty).
        if !Path::new(cleanup::RUN_CONTAINERD).exists() {
            cleanup::record(&dir, "made", cleanup::RUN_CONTAINERD)?;
        }
        let mut lab = CriLab {
            socket: dir.join("containerd.sock"),
            name,
            dir,
            subnet_octet: 0,
            containerd: None,
            rt,
            client: None,
            startup: Duration::ZERO,
            image_setup: Duration::ZERO,
            done: false,
            _lock: lock,
        };
        // From here on, Drop cleans up whatever part was made.
        lab.launch()?;
        Ok(lab)
    }

    fn launch(&mut self) -> Result<()> {
        let started = Instant::now();
        let tar =
            files::build_image(&self.dir.join("image")).context("building the busybox image")?;
        let image_built = started.elapsed();
        self.subnet_octet = free_subnet_octet(&self.name)?;
        let gateway = format!("10.244.{}.1", self.subnet_octet);
        let subnet = format!("10.244.{}.0/24", self.subnet_octet);
        ip(&["link", "add", &self.name, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &self.name])?;
        ip(&["link", "set", &self.name, "up"])?;
        fs::write(
            self.dir.join("cni/10-lab.conflist"),
            files::cni_conflist(
                &self.name,
                &self.name,
                &subnet,
                &gateway,
                &self.dir.join("cni-ipam"),
            ),
        )?;
        let config = self.dir.join("config.toml");
        fs::write(&config, files::containerd_config(&self.dir))?;
        let log = fs::File::create(self.dir.join("containerd.log"))?;
        let t0 = Instant::now();
        let mut cmd = Command::new(tool("containerd".as_ref()));
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. containerd dies with the thread that started it,
        // so a killed test run does not leave it running (its shims are found by path).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.containerd = Some(cmd.spawn().context("starting containerd")?);
        self.client = Some(self.wait_for_cri()?);
        self.startup = t0.elapsed();
        let t1 = Instant::now();
        let mut ctr = Command::new(tool("ctr".as_ref()));
        ctr.arg("--address")
            .arg(&self.socket)
            .args([
                "-n",
                "k8s.io",
                "images",
                "import",
                "--base-name",
                "localhost/busybox",
            ])
            .arg(&tar);
        run_checked(&mut ctr, "ctr images import", None)?;
        self.image_setup = image_built + t1.elapsed();
        Ok(())
    }

    /// Connects once the socket answers `Version`; fails with containerd's log if it exits
    /// or does not answer within [`STARTUP_TIMEOUT`].
    fn wait_for_cri(&mut self) -> Result<RuntimeServiceClient<Channel>> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self
                .containerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "containerd exited ({status}) at start:\n{}",
                    self.log_tail(30)
                );
            }
            if self.socket.exists() {
                let socket = self.socket.clone();
                let attempt = self.rt.block_on(async {
                    let mut client = RuntimeServiceClient::new(connect(&socket).await?);
                    bounded(
                        Duration::from_secs(1),
                        client.version(VersionRequest::default()),
                    )
                    .await?;
                    anyhow::Ok(client)
                });
                if let Ok(client) = attempt {
                    return Ok(client);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not answer CRI within {STARTUP_TIMEOUT:?}:\n{}",
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The CRI socket (for the agent, or a client under test).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The lab's directory (containerd root, state, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lab's bridge (also its name).
    pub fn bridge(&self) -> &str {
        &self.name
    }

    /// The lab's gateway address on the bridge (pods reach it on-link).
    pub fn gateway(&self) -> String {
        format!("10.244.{}.1", self.subnet_octet)
    }

    /// Runs a pod sandbox (RunPodSandbox) as the kubelet would. Its cgroup parent and
    /// network namespace are recorded for cleanup before and right after the call.
    pub fn run_pod(&self, spec: &PodSpec) -> Result<LabPod> {
        let config = spec.sandbox_config(&self.dir.join("logs/pods"));
        cleanup::record(&self.dir, "cgroup", &spec.cgroup_parent())?;
        let mut client = self.client()?;
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let t0 = Instant::now();
        let id = self
            .block_on(client.run_pod_sandbox(request))
            .with_context(|| format!("RunPodSandbox {}/{}", spec.namespace, spec.name))?
            .pod_sandbox_id;
        let ran_at = Instant::now();
        let netns = self.netns_of(&id)?;
        if let Some(path) = &netns {
            cleanup::record(&self.dir, "netns", &path.display().to_string())?;
        }
        Ok(LabPod {
            id,
            spec: spec.clone(),
            run_took: ran_at - t0,
            ran_at,
            netns,
            config,
        })
    }

    /// The pod's network namespace file from the verbose sandbox status (`info` JSON); `None`
    /// for a hostNetwork pod, which joins the host's.
    fn netns_of(&self, id: &str) -> Result<Option<PathBuf>> {
        let mut client = self.client()?;
        let status = self.block_on(client.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: true,
        }))?;
        let info: serde_json::Value = match status.info.get("info") {
            Some(text) => {
                serde_json::from_str(text).context("parsing the sandbox's verbose info")?
            }
            None => return Ok(None),
        };
        // containerd 1.6: the sandbox's OCI spec names the network namespace it joins.
        let namespaces = info["runtimeSpec"]["linux"]["namespaces"].as_array();
        Ok(namespaces
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from))
    }

    /// Creates and starts a container `name` running `argv` in `pod`; returns its id.
    pub fn start_container(&self, pod: &LabPod, name: &str, argv: &[&str]) -> Result<String> {
        let config = pod.spec.container_config(name, argv)?;
        self.start_container_config(pod, config)
    }

    /// Creates and starts a container from a complete CRI `config` in `pod` (for a test that
    /// derives the config itself, e.g. from a manifest); returns its id.
    pub fn start_container_config(&self, pod: &LabPod, config: ContainerConfig) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut client = self.client()?;
        let id = self
            .block_on(client.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }))
            .with_context(|| format!("CreateContainer {name}"))?
            .container_id;
        self.block_on(client.start_container(StartContainerRequest {
            container_id: id.clone(),
        }))
        .with_context(|| format!("StartContainer {name}"))?;
        Ok(id)
    }

    /// Stops and removes a pod sandbox (and its containers).
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let mut client = self.client()?;
        self.block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .with_context(|| format!("StopPodSandbox {id}"))?;
        self.block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .with_context(|| format!("RemovePodSandbox {id}"))?;
        Ok(())
    }

    /// The pod's cgroup v2 directory: `<cgroup2 mount><cgroup parent>`.
    pub fn pod_cgroup_dir(&self, pod: &LabPod) -> Result<PathBuf> {
        let root = mountinfo::cgroup2_mount()?;
        Ok(root.join(pod.spec.cgroup_parent().trim_start_matches('/')))
    }

    /// The last `lines` lines of containerd's log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops every pod and containerd and removes everything the lab made; returns an error
    /// listing what could not be removed. Drop does the same for a test that panicked.
    pub fn shutdown(mut self) -> Result<()> {
        let problems = self.teardown();
        match problems.is_empty() {
            true => Ok(()),
            false => Err(anyhow!("CRI lab cleanup: {}", problems.join("; "))),
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        if std::mem::replace(&mut self.done, true) {
            return Vec::new();
        }
        let mut problems = Vec::new();
        if self.containerd_alive() {
            if let Err(e) = self.remove_all_pods() {
                problems.push(format!("removing pods: {e:#}"));
            }
        }
        if let Some(mut child) = self.containerd.take() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims, mounts, netns, cgroups, bridge, /run/containerd and the lab directory.
        problems.extend(cleanup::remove_leftovers(&self.dir));
        problems
    }

    fn containerd_alive(&mut self) -> bool {
        self.containerd
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Every sandbox this containerd has, stopped and removed (tests may have made some
    /// with their own client).
    fn remove_all_pods(&self) -> Result<()> {
        let mut client = self.client()?;
        let items = self
            .block_on(client.list_pod_sandbox(ListPodSandboxRequest { filter: None }))?
            .items;
        let mut failed = Vec::new();
        for sandbox in items {
            if let Err(e) = self.remove_pod(&sandbox.id) {
                failed.push(format!("{e:#}"));
            }
        }
        match failed.is_empty() {
            true => Ok(()),
            false => Err(anyhow!("{}", failed.join("; "))),
        }
    }

    fn client(&self) -> Result<RuntimeServiceClient<Channel>> {
        self.client
            .clone()
            .ok_or_else(|| anyhow!("containerd is not answering CRI"))
    }

    /// Runs one CRI call to completion within [`CALL_TIMEOUT`].
    fn block_on<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        self.rt.block_on(bounded(CALL_TIMEOUT, call))
    }
}

impl Drop for CriLab {
    fn drop(&mut self) {
        for p in self.teardown() {
            eprintln!("CRI lab {}: cleanup problem: {p}", self.name);
        }
    }
}

/// A tonic channel over the unix socket `path` (the URI is required but unused).
async fn connect(path: &Path) -> Result<Channel> {
    let path = path.to_owned();
    Ok(Endpoint::from_static("http://lab.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?)
}

async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(anyhow!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(anyhow!("no answer within {timeout:?}")),
    }
}

/// A pod uid in the API's UUID format, unique on this machine for this run.
pub fn fresh_uid() -> String {
    let n = UID_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let pid = std::process::id();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (nanos >> 16) as u32,
        pid & 0xffff,
        n & 0xfff,
        (pid >> 16) & 0xfff,
        nanos & 0xffff_ffff_ffff
    )
}

/// A third octet for `10.244.<n>.0/24` that no address or route on this host uses yet,
/// starting from one derived from the lab's name so that neighbours rarely probe the same.
fn free_subnet_octet(lab: &str) -> Result<u32> {
    let used = ip(&["-4", "-o", "addr", "show"])? + &ip(&["-4", "route", "show"])?;
    let span = SUBNET_OCTETS.end() - SUBNET_OCTETS.start() + 1;
    let seed = lab
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..span)
        .map(|i| SUBNET_OCTETS.start() + (seed + i) % span)
        .find(|o| !used.contains(&format!("10.244.{o}.")))
        .ok_or_else(|| anyhow!("no free 10.244.{SUBNET_OCTETS:?}.0/24 subnet for the CRI lab"))
}

/// Runs `ip ARGS`; fails with its stderr.
fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(tool("ip".as_ref()));
    cmd.args(args);
    let out = run_checked(&mut cmd, &format!("ip {}", args.join(" ")), None)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_valid_and_distinct() {
        let a = fresh_uid();
        let b = fresh_uid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-'), "{a}");
        let s = PodSpec::new("kube-system", "etcd-node").static_pod();
        assert_eq!(s.uid.len(), 32);
        assert_eq!(s.annotations["kubernetes.io/config.hash"], s.uid);
    }

    #[test]
    fn cgroup_parents_follow_the_kubelet() {
        let mut p = PodSpec::new("ns", "p");
        p.uid = "u1".into();
        assert_eq!(p.cgroup_parent(), "/kubepods/burstable/podu1");
        p.qos = Qos::Guaranteed;
        assert_eq!(p.cgroup_parent(), "/kubepods/podu1");
        p.qos = Qos::BestEffort;
        assert_eq!(p.cgroup_parent(), "/kubepods/besteffort/podu1");
    }

    #[test]
    fn host_network_pods_have_no_hostname() {
        let spec = PodSpec::new("ns", "h").host_network();
        let config = spec.sandbox_config(Path::new("/tmp/x"));
        assert_eq!(config.hostname, "");
        let ns = config
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(ns.network, NamespaceMode::Node as i32);
        assert_eq!(config.labels["io.kubernetes.pod.uid"], spec.uid);
    }
}
