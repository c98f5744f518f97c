//! Booting the VM once to run one shell script: QEMU with software emulation (this host's
//! `/dev/kvm` is a PVM hypervisor that runs no stock kernel), the root and host directories
//! shared over 9p at their host paths, the script's output streamed line by line from the
//! serial console, its exit status read back from the scratch share. A VM that reports no
//! status (panic, hang, timeout) is an error carrying the end of the console.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::vm_image::{vm_dir, VmImage, GUEST_INIT, GUEST_INIT_PATH};

/// The LSMs the guest kernel starts with: Debian's default list plus `bpf`, which Debian 12
/// builds in but leaves off.
const GUEST_LSMS: &str = "lockdown,capability,landlock,yama,bpf";
/// Console lines kept for the error when the VM reports no exit status.
const CONSOLE_TAIL: usize = 40;

/// A host directory the guest sees at the same path.
#[derive(Debug, Clone)]
pub struct Share {
    pub path: PathBuf,
    /// The guest is root on a read-write share: build trees are shared read-only.
    pub read_only: bool,
}

/// One boot.
#[derive(Debug, Clone)]
pub struct Boot {
    pub memory: String,
    pub cpus: u32,
    pub timeout: Duration,
    pub shares: Vec<Share>,
}

/// Boots `image`, runs `script` (bash) in it as root and returns its exit status. Every
/// line of the serial console (the script's stdout and stderr, and any kernel message) goes
/// to `on_line` as it arrives.
pub fn run_script(
    image: &VmImage,
    boot: &Boot,
    script: &str,
    mut on_line: impl FnMut(&str),
) -> Result<i32> {
    install_guest_init(&image.rootfs)?;
    let xfer = Scratch::new()?;
    fs::write(xfer.0.join("cmd"), script)?;
    let mut cmd = qemu_command(image, boot, &xfer.0)?;
    let mut child = Running(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context(
                "cannot run qemu-system-x86_64 (install qemu-system-x86: `cargo xtask setup`)",
            )?,
    );
    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        spawn_reader(child.0.stdout.take().expect("piped"), tx.clone()),
        spawn_reader(child.0.stderr.take().expect("piped"), tx),
    ];
    let deadline = Instant::now() + boot.timeout;
    let mut tail = VecDeque::with_capacity(CONSOLE_TAIL);
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                on_line(&line);
                if tail.len() == CONSOLE_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            // Both pipes closed: QEMU has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            timed_out = true;
            child.stop();
            break;
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.stop();
    let rc = fs::read_to_string(xfer.0.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match rc {
        Some(rc) if !timed_out => Ok(rc),
        _ => bail!(
            "the VM reported no exit status ({}; qemu {status}); end of its console:\n{}",
            if timed_out {
                format!("timed out after {:?}", boot.timeout)
            } else {
                "it stopped without one: kernel panic or boot failure".to_owned()
            },
            tail.into_iter().collect::<Vec<_>>().join("\n")
        ),
    }
}

fn qemu_command(image: &VmImage, boot: &Boot, xfer: &Path) -> Result<Command> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-m", &boot.memory, "-smp", &boot.cpus.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&image.vmlinux)
        .arg("-initrd")
        .arg(&image.initrd);
    cmd.arg("-virtfs")
        .arg(virtfs(&image.rootfs, "rootfs", true));
    cmd.arg("-virtfs").arg(virtfs(xfer, "xfer", false));
    // The modules (veth, nft, ...) are the host's: the kernel loads them from there.
    let mut shares = vec![Share {
        path: image.modules_dir(),
        read_only: true,
    }];
    shares.extend(boot.shares.iter().cloned());
    let mut listed = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        let path = share.path.to_str().filter(|p| !p.contains([',', ':', ' ']));
        let Some(path) = path else {
            bail!(
                "cannot share {} with the VM: its path has a comma, colon or space",
                share.path.display()
            );
        };
        // The mount point, made in the (read-only to the guest) root on the host side.
        let in_root = image.rootfs.join(path.trim_start_matches('/'));
        fs::create_dir_all(&in_root)
            .with_context(|| format!("cannot create {}", in_root.display()))?;
        let tag = format!("s{i}");
        cmd.arg("-virtfs")
            .arg(virtfs(&share.path, &tag, share.read_only));
        listed.push(format!(
            "{tag}:{path}:{}",
            if share.read_only { "ro" } else { "rw" }
        ));
    }
    cmd.arg("-append").arg(format!(
        "console=ttyS0 quiet panic=-1 lsm={GUEST_LSMS} dgshares={}",
        listed.join(",")
    ));
    Ok(cmd)
}

fn virtfs(path: &Path, tag: &str, read_only: bool) -> String {
    format!(
        "local,path={},mount_tag={tag},security_model=none{}",
        path.display(),
        if read_only { ",readonly=on" } else { "" }
    )
}

/// Stage 2 goes into the root before each boot (cheap, and editing it never forces a new
/// mmdebstrap run).
fn install_guest_init(rootfs: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = rootfs.join(GUEST_INIT_PATH);
    if fs::read_to_string(&path).ok().as_deref() != Some(GUEST_INIT) {
        fs::write(&path, GUEST_INIT).with_context(|| format!("cannot write {}", path.display()))?;
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Sends each line of `pipe` (serial console lines end in CR LF) to `tx`.
fn spawn_reader(
    pipe: impl std::io::Read + Send + 'static,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\r', '\n']).replace('\r', "");
            if tx.send(line).is_err() {
                return;
            }
            buf.clear();
        }
    })
}

/// The QEMU process; killed (by its own pid) if still running when dropped, so no VM
/// outlives xtask's error paths.
struct Running(Child);

impl Running {
    /// Kills QEMU if it still runs and reaps it; returns how it ended.
    fn stop(&mut self) -> String {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        match self.0.wait() {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The run's scratch share (`target/vm/run-<pid>`): the script in, the exit status out;
/// removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let dir = vm_dir().join(format!("run-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
