//! Starting programs inside a cgroup and a network namespace.
//!
//! The child joins the cgroup and the namespace in `pre_exec`, i.e. after `fork` and
//! *before* it execs the target program, so that even the program's very first packet or
//! syscall is covered by programs attached to that cgroup. (Moving a process after it has
//! started would leave a window in which it runs unguarded, and a test could pass by luck.)
//! Arguments are passed as an argv vector, never interpolated into a shell string.

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io,
    os::unix::{ffi::OsStrExt as _, io::AsRawFd as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Directory where `ip netns add` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Path of the handle of the named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Directories searched after `$PATH` for system tools: `ip` and `nft` live in `/usr/sbin`,
/// which a minimal environment (cron, CI, `env -i`) may leave out of `PATH`.
const SYSTEM_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The full path of the program `name` (searched in `$PATH`, then the system directories);
/// a name containing `/` is returned as is. If nothing is found, the bare name is returned
/// and starting it fails with a clear "cannot run" error.
pub fn tool(name: &OsStr) -> PathBuf {
    if name.as_bytes().contains(&b'/') {
        return PathBuf::from(name);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt as _;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A `Command` for `argv` whose child, before exec, moves itself into `cgroup` (if given) and
/// then enters the network namespace `netns` (if given). Stdio is left at the defaults.
pub fn command_in<S: AsRef<OsStr>>(
    cgroup: Option<&Path>,
    netns: Option<&str>,
    argv: &[S],
) -> Result<Command> {
    let Some((program, args)) = argv.split_first() else {
        bail!("command_in: empty argv");
    };
    let procs = match cgroup {
        Some(dir) => {
            let procs = dir.join("cgroup.procs");
            if !procs.exists() {
                bail!(
                    "{} is not a cgroup v2 directory (no cgroup.procs)",
                    dir.display()
                );
            }
            Some(CString::new(procs.as_os_str().as_bytes())?)
        }
        None => None,
    };
    let ns = match netns {
        Some(name) => {
            let path = netns_path(name);
            if !path.exists() {
                bail!(
                    "network namespace {name:?} does not exist ({} missing)",
                    path.display()
                );
            }
            Some(CString::new(path.as_os_str().as_bytes())?)
        }
        None => None,
    };
    let mut cmd = Command::new(tool(program.as_ref()));
    cmd.args(args);
    // SAFETY: the closure only calls async-signal-safe libc functions (open, write, setns,
    // close) on C strings allocated before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" moves the writing process itself (cgroup v2 semantics).
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            if let Some(ns) = &ns {
                let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let r = libc::setns(fd, libc::CLONE_NEWNET);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if r != 0 {
                    return Err(err);
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Spawns `argv` inside `cgroup` and (optionally) the network namespace `netns`, with stdin
/// closed and stdout/stderr piped (read them, or the child may block on a full pipe).
pub fn spawn_in<S: AsRef<OsStr>>(cgroup: &Path, netns: Option<&str>, argv: &[S]) -> Result<Child> {
    let mut cmd = command_in(Some(cgroup), netns, argv)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn()
        .with_context(|| format!("spawning {} in {}", display_argv(argv), cgroup.display()))
}

/// A child process killed and reaped when dropped (also when a test panics).
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `argv` to completion inside `cgroup` and (optionally) `netns`, collecting its output.
/// A non-zero exit is *not* an error here; check `output.status`.
pub fn run_in<S: AsRef<OsStr>>(cgroup: &Path, netns: Option<&str>, argv: &[S]) -> Result<Output> {
    let child = spawn_in(cgroup, netns, argv)?;
    child
        .wait_with_output()
        .with_context(|| format!("waiting for {}", display_argv(argv)))
}

/// Runs `argv` in the network namespace `netns` (no cgroup change) and returns its output;
/// fails with the command's stderr if it exits non-zero.
pub fn run_in_netns_checked<S: AsRef<OsStr>>(netns: &str, argv: &[S]) -> Result<Output> {
    let mut cmd = command_in(None, Some(netns), argv)?;
    run_checked(&mut cmd, &display_argv(argv), None)
}

/// Runs a command to completion, optionally feeding `stdin`, and fails (with its stderr in
/// the message) if it cannot start or exits non-zero.
pub fn run_checked(cmd: &mut Command, what: &str, stdin: Option<&[u8]>) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{what}`: is it installed?"))?;
    if let Some(data) = stdin {
        use std::io::Write as _;
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(data)
            .with_context(|| format!("writing stdin of `{what}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Runs `f` on a short-lived thread that has entered the network namespace `netns`, e.g. to
/// write `/proc/sys/net/...` of that namespace without spawning a process. Only the helper
/// thread changes namespace; the caller's threads are untouched.
pub fn with_netns_thread<T, F>(netns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let file = File::open(netns_path(netns))
        .with_context(|| format!("opening network namespace {netns:?}"))?;
    let handle = std::thread::spawn(move || -> Result<T> {
        // SAFETY: setns on a valid namespace fd; it affects only this thread, which ends
        // when `f` returns.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
        }
        f()
    });
    match handle.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Renders argv for messages (not for execution).
pub fn display_argv<S: AsRef<OsStr>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
