//! Where things live under the bpffs directory (`--bpffs`, default
//! /sys/fs/bpf/datalab-guard):
//!
//! ```text
//! <dir>/maps/<MAP_NAME>      every map, pinned by name (see datalab_guard_common::maps)
//! <dir>/links/<program>      one bpf_link per attached program
//! <dir>/links/<program>-next a replacement link during an upgrade (briefly; bpffs
//!                            refuses names with a dot)
//! ```
//! Pinned links keep the programs attached, and pinned maps keep the verdicts, after the
//! agent exits: enforcement never depends on the agent being alive.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> PinLayout {
        PinLayout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    pub fn next_link(&self, program: &str) -> PathBuf {
        self.links_dir().join(format!("{program}-next"))
    }

    /// Anything pinned here at all?
    pub fn exists(&self) -> bool {
        self.map(datalab_guard_common::maps::META).exists()
    }

    /// Names of the pinned links (including `-next` leftovers of an interrupted upgrade).
    pub fn pinned_links(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        match std::fs::read_dir(self.links_dir()) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name().to_string_lossy().into_owned();
                    names.push(name);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        names.sort();
        Ok(names)
    }

    /// Creates the directories, after checking they are on a bpf filesystem.
    pub fn create_dirs(&self) -> anyhow::Result<()> {
        let parent = self.root.parent().unwrap_or(Path::new("/"));
        ensure_on_bpffs(parent)?;
        for dir in [self.root.clone(), self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(())
    }
}

/// Checks that `dir` exists on a bpf filesystem. When it is /sys/fs/bpf (or below) and
/// bpffs is not mounted there, mounts it: that is where every BPF tool expects it and
/// mounting it changes no enforcement.
pub fn ensure_on_bpffs(dir: &Path) -> anyhow::Result<()> {
    let sys_fs_bpf = Path::new("/sys/fs/bpf");
    if !is_bpffs(dir) && dir.starts_with(sys_fs_bpf) && !is_bpffs(sys_fs_bpf) {
        mount_bpffs(sys_fs_bpf)?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    if !dir.exists() {
        // Parents of the pin directory below the mount may be created by us.
        let mut probe = dir.to_path_buf();
        while !probe.exists() {
            if !probe.pop() {
                break;
            }
        }
        if !is_bpffs(&probe) {
            return Err(crate::input::bad_input(format!(
                "{} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        return Ok(());
    }
    if !is_bpffs(dir) {
        return Err(crate::input::bad_input(format!(
            "{} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)",
            dir.display()
        )));
    }
    Ok(())
}

/// `true` when `path` exists and lives on bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: libc::statfs is plain integers, for which all-zero bytes are a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL terminated and stat is a valid out pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    // f_type's width and signedness differ between architectures (i64 here: comparing it as
    // i64 is a trivial cast); the magic fits in 32 bits.
    rc == 0 && stat.f_type as u64 & 0xffff_ffff == BPF_FS_MAGIC
}

fn mount_bpffs(target: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let target_c = std::ffi::CString::new(target.as_os_str().as_bytes())?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cannot mount bpffs at {}", target.display()));
    }
    Ok(())
}
