//! The VM's three pieces, made from the host's own Debian packages and cached under
//! `target/vm/`: Debian 12's 6.1 kernel unpacked to its uncompressed vmlinux, a busybox
//! initramfs that mounts the root over 9p, and a minimal Debian 12 root (mmdebstrap). Each
//! sits beside a `.recipe` file holding the recipe it was built from; a piece is rebuilt
//! only when it is missing or its recipe changed (kernel package, script, package list).
//! Pieces are built beside their final path and renamed into place, so an interrupted build
//! never leaves a half piece that looks cached.
//!
//! The kernel's modules are not copied: the VM mounts the host's `/lib/modules/<version>`
//! read-only over 9p (see `vm_qemu`).

use std::{
    fs,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::util::{output, run, workspace_root};

/// The Debian package whose dependency names the kernel the VM boots.
const KERNEL_PACKAGE: &str = "linux-image-amd64";
/// Stage 1, the initramfs's /init.
const STAGE1_INIT: &str = include_str!("../vm/stage1-init");
/// Stage 2, installed in the root as [`GUEST_INIT_PATH`] before every boot.
pub const GUEST_INIT: &str = include_str!("../vm/guest-init");
/// Where stage 1 hands over (inside the root).
pub const GUEST_INIT_PATH: &str = "sbin/dg-guest-init";
/// Modules stage 1 loads (with their dependencies) to reach the 9p root.
const STAGE1_MODULES: [&str; 3] = ["virtio_pci", "9pnet_virtio", "9p"];
/// busybox applets stage 1 uses.
const STAGE1_APPLETS: [&str; 7] = [
    "sh",
    "mount",
    "umount",
    "insmod",
    "switch_root",
    "cat",
    "poweroff",
];
/// What the tests need in the root besides minbase: `ip` (namespaces, veth), `nft` (the
/// lab's arrival counters), modprobe for the kernel's module autoloading, busybox for
/// guest-init's cheap mounts, procps for debugging by hand, and the CA store the agent's
/// Kubernetes client loads at start (it refuses to start without one), and Python for the
/// socket_hooks step's MPTCP and SCM_RIGHTS peers.
const ROOT_PACKAGES: [&str; 7] = [
    "iproute2",
    "nftables",
    "kmod",
    "busybox",
    "procps",
    "ca-certificates",
    "python3",
];
/// The Debian release of the root: the host's, so host-built binaries run unchanged.
const SUITE: &str = "bookworm";

/// The built pieces.
#[derive(Debug, Clone)]
pub struct VmImage {
    /// Kernel release, e.g. `6.1.0-57-amd64`.
    pub kernel_release: String,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

impl VmImage {
    /// The host's module tree the VM mounts at the same path.
    pub fn modules_dir(&self) -> PathBuf {
        Path::new("/lib/modules").join(&self.kernel_release)
    }
}

/// `target/vm`, where the pieces and the runs' scratch directories live.
pub fn vm_dir() -> PathBuf {
    workspace_root().join("target").join("vm")
}

/// Builds whatever piece is missing or stale and returns them all.
pub fn ensure() -> Result<VmImage> {
    let kernel_release = kernel_release()?;
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{kernel_release}"));
    let dir = vm_dir().join(&kernel_release);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let kernel_stamp = file_stamp(&vmlinuz)?;

    let vmlinux = dir.join("vmlinux");
    cached(&vmlinux, &format!("vmlinux from {kernel_stamp}"), |tmp| {
        unpack_vmlinux(&vmlinuz, tmp)
    })?;

    let initrd = dir.join("initrd.cpio");
    let recipe = format!(
        "initramfs for {kernel_stamp}\nmodules {STAGE1_MODULES:?}\napplets {STAGE1_APPLETS:?}\nbusybox {}\n{STAGE1_INIT}",
        file_stamp(Path::new("/bin/busybox"))?
    );
    cached(&initrd, &recipe, |tmp| {
        build_initramfs(&kernel_release, tmp)
    })?;

    let rootfs = vm_dir().join("rootfs");
    let mirror = debian_mirror()?;
    let recipe = format!("mmdebstrap minbase {SUITE} {mirror} +{ROOT_PACKAGES:?}");
    cached(&rootfs, &recipe, |tmp| build_rootfs(&mirror, tmp))?;

    Ok(VmImage {
        kernel_release,
        vmlinux,
        initrd,
        rootfs,
    })
}

/// The kernel release `linux-image-amd64` depends on (`linux-image-6.1.0-57-amd64`).
fn kernel_release() -> Result<String> {
    let out = output(Command::new("dpkg-query").args(["-W", "-f=${Depends}", KERNEL_PACKAGE]))?;
    let depends = String::from_utf8_lossy(&out.stdout);
    let release = depends
        .split(&[',', '|', ' '][..])
        .find_map(|w| w.strip_prefix("linux-image-"))
        .filter(|r| out.status.success() && !r.is_empty());
    match release {
        Some(r) if Path::new(&format!("/boot/vmlinuz-{r}")).is_file() => Ok(r.to_owned()),
        _ => bail!(
            "no Debian kernel for the VM: {KERNEL_PACKAGE} is not installed (or its /boot/vmlinuz \
             is missing); run `cargo xtask setup` as root"
        ),
    }
}

/// Size and modification time: changes when the package is reinstalled or upgraded.
fn file_stamp(path: &Path) -> Result<String> {
    let m = fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    Ok(format!(
        "{} ({} bytes, mtime {})",
        path.display(),
        m.len(),
        m.mtime()
    ))
}

/// Builds `path` with `build` (into a temporary sibling, then renamed) unless its recipe
/// file says it was built from `recipe` already.
fn cached(path: &Path, recipe: &str, build: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let recipe_file = path.with_extension("recipe");
    let name = path.display();
    if path.exists() && fs::read_to_string(&recipe_file).is_ok_and(|r| r == recipe) {
        println!("vm: {name}: cached");
        return Ok(());
    }
    let tmp = path.with_extension("building");
    remove_any(&tmp)?;
    println!("vm: building {name}");
    let started = std::time::Instant::now();
    build(&tmp).with_context(|| format!("building {name}"))?;
    remove_any(path)?;
    fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))?;
    fs::write(&recipe_file, recipe)?;
    println!("vm: built {name} in {:.0?}", started.elapsed());
    Ok(())
}

fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    }
    .with_context(|| format!("cannot remove {}", path.display()))
}

/// Debian's amd64 bzImage carries the kernel as one xz stream; unpacked, it is an ELF with
/// a PVH entry note that QEMU boots directly, which skips ~3.5 s of in-guest decompression
/// under software emulation.
fn unpack_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let image = fs::read(vmlinuz)?;
    let magic = b"\xfd7zXZ\x00";
    let Some(start) = image.windows(magic.len()).position(|w| w == magic) else {
        bail!("{} has no xz payload", vmlinuz.display());
    };
    let mut xz = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out)?)
        .spawn()
        .context("cannot run xz (install xz-utils)")?;
    let mut stdin = xz.stdin.take().expect("piped");
    let payload = image[start..].to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let status = xz.wait()?;
    // xz stops reading after the stream: a broken pipe on the padding behind it is fine.
    let _ = writer.join();
    if !status.success() {
        bail!("xz failed to unpack {}: {status}", vmlinuz.display());
    }
    if fs::read(out)?.get(..4) != Some(b"\x7fELF") {
        bail!("{} did not unpack to an ELF kernel", vmlinuz.display());
    }
    Ok(())
}

/// Stage 1: static busybox, the virtio/9p modules in load order, and [`STAGE1_INIT`], as an
/// uncompressed newc archive (the kernel takes it as is; nothing to decompress under TCG).
fn build_initramfs(release: &str, out: &Path) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "proc", "sys", "dev", "newroot", "mods"] {
        cpio.dir(dir);
    }
    cpio.file(
        "bin/busybox",
        &fs::read("/bin/busybox")
            .context("cannot read /bin/busybox (the static one, from busybox-static)")?,
        0o755,
    );
    for applet in STAGE1_APPLETS {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    cpio.file("init", STAGE1_INIT.as_bytes(), 0o755);
    let mut order = String::new();
    for module in stage1_module_files(release)? {
        let name = module
            .file_name()
            .context("module path without a name")?
            .to_string_lossy()
            .into_owned();
        cpio.file(&format!("mods/{name}"), &fs::read(&module)?, 0o644);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("mods/order", order.as_bytes(), 0o644);
    fs::write(out, cpio.finish())?;
    Ok(())
}

/// The `.ko` files of [`STAGE1_MODULES`] and their dependencies, in load order, once each.
fn stage1_module_files(release: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = Vec::new();
    for module in STAGE1_MODULES {
        let out = output(Command::new("modprobe").args(["-S", release, "--show-depends", module]))?;
        if !out.status.success() {
            bail!(
                "modprobe --show-depends {module} for {release} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut words = line.split_whitespace();
            if let (Some("insmod"), Some(path)) = (words.next(), words.next()) {
                let path = PathBuf::from(path);
                if !files.contains(&path) {
                    files.push(path);
                }
            }
        }
    }
    Ok(files)
}

/// A minimal writer of the kernel's initramfs format (cpio "newc", no compression).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, b"");
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, target.as_bytes());
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name_len as u32,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.out
    }
}

/// The host's Debian mirror, from its apt sources (deb822 first, then sources.list).
fn debian_mirror() -> Result<String> {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .split("\n\n")
        .filter(|stanza| {
            stanza
                .lines()
                .any(|l| l.starts_with("Suites:") && l.split_whitespace().any(|s| s == SUITE))
        })
        .flat_map(|stanza| stanza.lines())
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|uris| uris.split_whitespace().next());
    let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    let from_list = list.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.len() >= 3 && w[0] == "deb" && w[2] == SUITE).then(|| w[1])
    });
    match from_deb822.or(from_list) {
        Some(m) => Ok(m.to_owned()),
        None => bail!(
            "cannot find a Debian {SUITE} mirror in /etc/apt/sources.list.d/debian.sources or \
             /etc/apt/sources.list (the VM's root is made with mmdebstrap from it)"
        ),
    }
}

/// minbase Debian 12 plus [`ROOT_PACKAGES`]; the same glibc as the host, so the host-built
/// binaries run in it unchanged.
fn build_rootfs(mirror: &str, out: &Path) -> Result<()> {
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={}", ROOT_PACKAGES.join(",")))
        .arg(SUITE)
        .arg(out)
        .arg(mirror))
    .context("mmdebstrap (install it with `cargo xtask setup`)")?;
    fs::write(out.join("etc/hostname"), "dg-vm\n")?;
    fs::create_dir_all(out.join("xfer"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", b"#!/bin/sh\n", 0o755);
        c.symlink("bin/sh", "busybox");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // The file's header: mode 0100755, size 10, name "init\0" (5 bytes).
        let at = out.windows(5).position(|w| w == b"init\0").unwrap();
        let header = std::str::from_utf8(&out[at - 110..at]).unwrap();
        assert_eq!(&header[14..22], "000081ed");
        assert_eq!(&header[54..62], "0000000a");
        assert_eq!(&header[94..102], "00000005");
        assert!(out.windows(11).any(|w| w == b"TRAILER!!!\0"));
    }
}
