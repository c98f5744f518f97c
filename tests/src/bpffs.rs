//! [`BpffsDir`]: a private directory under `/sys/fs/bpf` for one test's pins.
//!
//! datalab-guard pins its programs, links and maps so that enforcement survives the agent.
//! Tests point the agent at a fresh directory (`--bpffs`) so they never see or disturb the
//! pins of a real installation or of a parallel test, and remove every pin on drop (an
//! unlinked link pin detaches its program once no fd holds it).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::{mountinfo, names};

/// Where bpffs is expected.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Mounts bpffs at `/sys/fs/bpf` unless a bpf filesystem is already mounted there.
pub fn ensure_bpffs_mounted() -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if mountinfo::is_mounted(&mountinfo::read()?, root, "bpf") {
        return Ok(());
    }
    fs::create_dir_all(root).with_context(|| format!("creating {BPFFS_ROOT}"))?;
    let src = c"bpf";
    let target = c"/sys/fs/bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .context("mount -t bpf bpf /sys/fs/bpf (needs root)");
    }
    Ok(())
}

/// A unique directory under `/sys/fs/bpf`, removed with everything pinned below it on drop.
#[derive(Debug)]
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    /// Creates `/sys/fs/bpf/dgkit-<pid>-<n>`, mounting bpffs first if needed.
    pub fn new() -> Result<Self> {
        Self::with_prefix(names::DEFAULT_PREFIX)
    }

    /// Creates `/sys/fs/bpf/<prefix>-<pid>-<n>`, mounting bpffs first if needed.
    pub fn with_prefix(prefix: &str) -> Result<Self> {
        ensure_bpffs_mounted()?;
        let path = Path::new(BPFFS_ROOT).join(names::unique_name(prefix));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Paths of everything (pins and directories) currently below the directory.
    pub fn entries(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
                let e = e?;
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
        if let Err(e) = remove_pins(&self.path) {
            eprintln!(
                "datalab-guard-tests: could not remove {}: {e:#}",
                self.path.display()
            );
        }
    }
}

/// Unlinks every pin below `dir` and removes the directories, deepest first.
pub fn remove_pins(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.starts_with(BPFFS_ROOT) {
        bail!("refusing to remove {} outside {BPFFS_ROOT}", dir.display());
    }
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_pins(&e.path())?;
        } else {
            fs::remove_file(e.path())
                .with_context(|| format!("unlinking {}", e.path().display()))?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))
}

/// Removes bpffs directories named `<prefix>-<pid>-<n>` whose owner process is gone.
pub fn cleanup_stale_bpffs(prefix: &str) -> Result<usize> {
    let root = Path::new(BPFFS_ROOT);
    if !mountinfo::is_mounted(&mountinfo::read()?, root, "bpf") {
        return Ok(0);
    }
    let mut removed = 0;
    for e in fs::read_dir(root)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir() && names::is_stale(&name, prefix) {
            remove_pins(&e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}
