//! [`BpffsDir`]: a private bpf filesystem for one test's pins.
//!
//! datalab-guard pins its programs, links and maps so that enforcement survives the agent.
//! Tests point the agent at a fresh directory (`--bpffs`) so they never see or disturb the
//! pins of a real installation or of a parallel test, and remove every pin on drop (an
//! unlinked link pin detaches its program once no fd holds it).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{mountinfo, names};

/// Tests never use the system's `/sys/fs/bpf`: each [`BpffsDir`] is a bpf filesystem of its
/// own, mounted on a fresh directory under the temp dir and unmounted on drop. Unmounting
/// releases every pin in it (links detach), so nothing survives a test, also when it fails,
/// and the machine's `/sys/fs/bpf` is left exactly as it was (mounted or not).
fn temp_root() -> PathBuf {
    std::env::temp_dir()
}

fn mount_bpffs(target: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let target_c = std::ffi::CString::new(target.as_os_str().as_bytes())?;
    let src = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target_c.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mount -t bpf bpf {} (needs root)", target.display()));
    }
    Ok(())
}

fn unmount(target: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let target_c = std::ffi::CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path. MNT_DETACH: a lingering fd never keeps it mounted.
    if unsafe { libc::umount2(target_c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("umount {}", target.display()));
    }
    fs::remove_dir(target).with_context(|| format!("rmdir {}", target.display()))
}

/// Files the kernel (CONFIG_BPF_PRELOAD) creates at the top of every bpffs mount.
const KERNEL_PRELOAD: [&str; 2] = ["maps.debug", "progs.debug"];

/// A private bpf filesystem (see the module docs), unmounted and removed on drop.
#[derive(Debug)]
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    /// Mounts a fresh bpffs at `<tmp>/dgkit-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        Self::with_prefix(names::DEFAULT_PREFIX)
    }

    /// Mounts a fresh bpffs at `<tmp>/<prefix>-<pid>-<n>`.
    pub fn with_prefix(prefix: &str) -> Result<Self> {
        let path = temp_root().join(names::unique_name(prefix));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        if let Err(e) = mount_bpffs(&path) {
            let _ = fs::remove_dir(&path);
            return Err(e);
        }
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Paths of everything (pins and directories) currently below the directory, except the
    /// iterator files the kernel's bpf_preload puts in every new bpffs (`maps.debug`,
    /// `progs.debug`), which nobody pinned.
    pub fn entries(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
                let e = e?;
                if dir == self.path
                    && KERNEL_PRELOAD.contains(&e.file_name().to_string_lossy().as_ref())
                {
                    continue;
                }
                if e.file_type()?.is_dir() {
                    stack.push(e.path());
                }
                out.push(e.path());
            }
        }
        out.sort();
        Ok(out)
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.path) {
            eprintln!(
                "datalab-guard-tests: could not remove {}: {e:#}",
                self.path.display()
            );
        }
    }
}

/// Unmounts and removes private bpffs directories named `<prefix>-<pid>-<n>` whose owner
/// process is gone (a test killed before its drop ran).
pub fn cleanup_stale_bpffs(prefix: &str) -> Result<usize> {
    let mounts = mountinfo::read()?;
    let mut removed = 0;
    for e in fs::read_dir(temp_root())? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir()
            && names::is_stale(&name, prefix)
            && mountinfo::is_mounted(&mounts, &e.path(), "bpf")
        {
            unmount(&e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}
