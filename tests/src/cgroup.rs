//! [`TestCgroup`]: a throw-away cgroup v2 subtree for a test.
//!
//! The directory is created directly under the cgroup2 mount (found in mountinfo, never
//! hard-coded) and named `<prefix>-<pid>-<counter>`. Nothing here enables controllers: the
//! guard only needs cgroup *membership* (BPF programs attach to any cgroup v2 directory), so
//! this works in hybrid mode, where the v2 hierarchy has no controllers at all.
//!
//! On drop, every process in the subtree is killed (through `cgroup.kill` when the kernel has
//! it, else by SIGKILLing each pid in every `cgroup.procs`), the kit waits until the subtree
//! is empty, then removes the directories deepest first.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::names;

/// The cgroup2 mount point of this machine (from `/proc/self/mountinfo`).
pub fn cgroup2_root() -> Result<PathBuf> {
    crate::mountinfo::cgroup2_mount()
}

/// The kernel cgroup id of a cgroup v2 directory: its inode number (what
/// `bpf_get_current_cgroup_id`/`bpf_skb_cgroup_id` return).
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(fs::metadata(dir)
        .with_context(|| format!("stat {}", dir.display()))?
        .ino())
}

/// A cgroup v2 directory owned by a test; see the module docs.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/dgkit-<pid>-<n>`.
    pub fn new() -> Result<Self> {
        Self::with_prefix(names::DEFAULT_PREFIX)
    }

    /// Creates `<cgroup2 mount>/<prefix>-<pid>-<n>`.
    pub fn with_prefix(prefix: &str) -> Result<Self> {
        let root = cgroup2_root()?;
        let path = root.join(names::unique_name(prefix));
        fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {} (are you root?)", path.display()))?;
        Ok(Self { path })
    }

    /// The directory of this cgroup.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel cgroup id (inode number) of this cgroup.
    pub fn id(&self) -> u64 {
        cgroup_id(&self.path).expect("test cgroup directory vanished")
    }

    /// Creates (if needed) the child cgroup `name` (may be nested, `a/b`) and returns its
    /// path. It is removed with the parent.
    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let rel = Path::new(name);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("child cgroup name must be a relative path without '..': {name:?}");
        }
        let path = self.path.join(rel);
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(path)
    }

    /// Pids listed in this cgroup's own `cgroup.procs` (not its children's).
    pub fn procs(&self) -> Result<Vec<u32>> {
        read_procs(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            // Drop cannot fail; say loudly what was left behind.
            eprintln!(
                "datalab-guard-tests: could not remove cgroup {}: {e:#}",
                self.path.display()
            );
        }
    }
}

/// Pids in one cgroup's `cgroup.procs`.
pub fn read_procs(dir: &Path) -> Result<Vec<u32>> {
    let text = fs::read_to_string(dir.join("cgroup.procs"))
        .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// All cgroup directories of the subtree rooted at `dir`, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Kills every process in the subtree, waits until it is empty, then removes it deepest
/// first. Used by `Drop` and by stale-leftover cleanup.
pub fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let kill_file = dir.join("cgroup.kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dirs = subtree(dir);
        let pids: Vec<u32> = dirs
            .iter()
            .flat_map(|d| read_procs(d).unwrap_or_default())
            .collect();
        if pids.is_empty() {
            break;
        }
        if kill_file.exists() {
            // Kills the whole subtree atomically, including processes forking right now.
            let _ = fs::write(&kill_file, "1");
        } else {
            for pid in &pids {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        if Instant::now() > deadline {
            bail!(
                "processes {pids:?} in {} survived SIGKILL for 10 s",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut dirs = subtree(dir);
    dirs.reverse();
    for d in dirs {
        // A just-killed task may still be leaving its cgroup; rmdir says EBUSY until then.
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).with_context(|| format!("rmdir {}", d.display())),
            }
        }
    }
    Ok(())
}

/// Removes top-level cgroups named `<prefix>-<pid>-<n>` whose owner process is gone.
pub fn cleanup_stale_cgroups(prefix: &str) -> Result<usize> {
    let root = cgroup2_root()?;
    let mut removed = 0;
    for e in fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir() && names::is_stale(&name, prefix) {
            remove_tree(&e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}
