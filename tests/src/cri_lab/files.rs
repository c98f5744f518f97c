//! The files a lab's containerd runs from: its config, the CNI network, the busybox image.
//!
//! Everything lives in the lab's own directory; the recipe and the reasons for each setting
//! are in `CRI-LAB.md` (shared notes) and repeated here where they matter.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::process::{run_checked, tool};

/// The image every lab imports, and its sandbox ("pause") image at the same time.
pub const IMAGE: &str = "localhost/busybox:1";
/// Where Debian's containernetworking-plugins install the CNI binaries.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Programs a lab cannot run without, and the CNI plugins its network uses.
pub const REQUIRED_TOOLS: &[&str] = &[
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "umoci",
];
pub const REQUIRED_CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];
/// busybox-static's binary, copied into the image.
pub const BUSYBOX: &str = "/bin/busybox";
/// Applets linked in the image.
const APPLETS: &[&str] = &[
    "sh", "sleep", "wget", "nc", "ip", "cat", "ls", "hostname", "id", "echo", "true", "env",
    "ping", "timeout",
];

/// containerd 1.6 config: root, state, sockets, runc state and CNI config all under `dir`.
pub fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
oom_score = 0

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "info"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"

  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    # Pod netns bind mounts under /var/run/netns/cni-<uuid>, as on a real node.
    netns_mounts_under_state_dir = false
    # root here lacks CAP_SYS_RESOURCE: runc cannot set the sandbox's oom_score_adj -998.
    restrict_oom_score_adj = true

    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          # PID 1 is not systemd here: the kubelet would use the cgroupfs driver.
          SystemdCgroup = false
          Root = "{d}/runc"

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{CNI_BIN_DIR}"
      conf_dir = "{d}/cni"
      max_conf_num = 1
"#
    )
}

/// The CNI network: a bridge the lab created beforehand with the gateway address, so the
/// plugin runs with `isGateway: false` (true would turn on ip_forward machine-wide) and pods
/// get only an on-link route: nothing can leave the lab.
pub fn cni_conflist(
    network: &str,
    bridge: &str,
    subnet: &str,
    gateway: &str,
    ipam_dir: &Path,
) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": subnet, "gateway": gateway }]],
                    "dataDir": ipam_dir,
                }
            },
            { "type": "loopback" }
        ]
    })
    .to_string()
}

/// Builds the busybox OCI image with umoci (no registry) in `work` and returns the tar that
/// `ctr images import` takes. Default command: `sleep 2147483647`.
pub fn build_image(work: &Path) -> Result<PathBuf> {
    let umoci = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new(tool("umoci".as_ref()));
        cmd.current_dir(work).args(args);
        run_checked(&mut cmd, &format!("umoci {}", args.join(" ")), None)?;
        Ok(())
    };
    fs::create_dir_all(work)?;
    umoci(&["init", "--layout", "oci"])?;
    umoci(&["new", "--image", "oci:1"])?;
    umoci(&["unpack", "--image", "oci:1", "bundle"])?;
    let rootfs = work.join("bundle/rootfs");
    for d in ["bin", "tmp", "etc", "proc", "sys", "dev", "root"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::copy(BUSYBOX, rootfs.join("bin/busybox"))
        .with_context(|| format!("copying {BUSYBOX} (from busybox-static)"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnobody:x:65534:\n")?;
    umoci(&["repack", "--image", "oci:1", "bundle"])?;
    umoci(&[
        "config",
        "--image",
        "oci:1",
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--config.env",
        "PATH=/bin",
        "--config.workingdir",
        "/",
        "--config.cmd",
        "/bin/sleep",
        "--config.cmd",
        "2147483647",
    ])?;
    umoci(&["gc", "--layout", "oci"])?;
    let tar = work.join("busybox-oci.tar");
    let mut cmd = Command::new(tool("tar".as_ref()));
    cmd.args(["-C"])
        .arg(work.join("oci"))
        .args(["-cf"])
        .arg(&tar)
        .arg(".");
    run_checked(&mut cmd, "tar the OCI layout", None)?;
    // The unpacked bundle is only needed to build the layer.
    fs::remove_dir_all(work.join("bundle")).context("removing the image bundle")?;
    Ok(tar)
}

/// Panics, naming what is missing and how to install it, unless every program and plugin
/// the lab needs is there. A CRI test never skips: a machine without the runtime is a
/// machine where `cargo xtask setup` has not run.
pub fn require_tools() {
    let mut missing: Vec<String> = REQUIRED_TOOLS
        .iter()
        .filter(|t| !tool(t.as_ref()).is_absolute())
        .map(|t| (*t).to_owned())
        .collect();
    missing.extend(
        REQUIRED_CNI_PLUGINS
            .iter()
            .map(|p| Path::new(CNI_BIN_DIR).join(p))
            .chain([PathBuf::from(BUSYBOX)])
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string()),
    );
    assert!(
        missing.is_empty(),
        "the CRI lab needs {missing:?}: run `cargo xtask setup` as root (it installs the Debian \
         packages containerd runc containernetworking-plugins busybox-static umoci)"
    );
}
