//! `cargo xtask fresh-machine`: proves the README's "fresh Debian 12, two commands" promise
//! instead of assuming it, by following the README on a Debian 12 that has nothing of ours.
//!
//! 1. **A fresh root**: `debootstrap --variant=minbase` of bookworm into
//!    `target/fresh-machine/root`, plus only [`ROOT_EXTRAS`] (each justified there). No Rust,
//!    no rustup, no kubectl, no Python: the run checks that before it starts.
//! 2. **The machine's network, and nothing else of the machine** ([`MachineNetwork`]): the
//!    root shares this machine's network, so it reaches Debian's mirror and the crate and
//!    Python registries exactly as this machine does, through the configuration this
//!    machine has for that: its Debian apt sources, its apt `Acquire` settings, the extra CA
//!    certificates it trusts (this workplace reaches the registries through a TLS-inspecting
//!    egress whose CA is one of them), its pip and cargo client configuration, its DNS and
//!    hosts files, and its proxy and CA-bundle environment variables (names printed, never
//!    values). Everything carried in is printed.
//! 3. **Isolated**: a chroot inside a private mount namespace (`unshare --mount
//!    --propagation private`) with a fresh proc, the machine's /sys (its cgroup2 mount with
//!    it) and /dev bound in, a fresh bpffs on /sys/fs/bpf (a booted Debian 12 has one, empty)
//!    and a tmpfs /run. systemd-nspawn is not used: it is not installed here, and its
//!    defaults (read-only /sys, its own cgroup namespace, a capability bounding set and a
//!    seccomp filter without bpf) are exactly what the privileged tests need lifted.
//! 4. **As a newcomer**, inside ([`NEWCOMER_SCRIPT`]): `git clone` the repository at HEAD
//!    (a bundle of this checkout's HEAD: uncommitted changes are not part of the proof),
//!    `./x demo` (the README's first command: it runs the setup), then a small test run that
//!    covers what broke on fresh machines before: the manifests venv (`python3 -m venv`, the
//!    pinned kubectl), an API-fixture test that runs that kubectl, and privileged kit tests
//!    (network namespaces, cgroups). A missing tool fails the run; so does a skip. With
//!    `--full` (what CI runs) the README's whole test command, `./x test`, instead.
//! 5. **Cleanup**, also on failure and on Ctrl-C/SIGTERM: every process whose root is the
//!    fresh root (or in its mount namespace) is killed, the namespace and its mounts die
//!    with them, and the root is removed with `rm --one-file-system` after checking that
//!    nothing is mounted under it. `--keep` keeps the root for debugging.
//!
//! Downloads are cached in `target/fresh-machine/cache` (debootstrap's and apt's `.deb`
//! files, cargo's `.crate` files): what is proved is that the installs work, not that the
//! network is fast, and every cached file is still checked against a freshly fetched index
//! (apt and debootstrap by the Release file's hashes, cargo by the registry's checksum), so
//! a cache hit installs exactly what a download would. Indexes, builds and installed files
//! are never cached. CI starts from a fresh clone, so there the cache is empty anyway;
//! `--no-cache` empties it first.

use std::{
    fs,
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    test::require_root,
    util::{self, output, show},
};

/// Options of `cargo xtask fresh-machine`.
#[derive(Debug, clap::Args)]
pub struct FreshMachineArgs {
    /// Keep the root (target/fresh-machine/root) afterwards, for debugging; enter it with
    /// `unshare --mount --propagation private chroot target/fresh-machine/root` (mount
    /// proc, sys and dev first, as this command does).
    #[arg(long)]
    pub keep: bool,
    /// Empty the download cache (target/fresh-machine/cache) before starting.
    #[arg(long)]
    pub no_cache: bool,
    /// After the demo, run the README's whole test command (`./x test`: every test,
    /// privileged ones and the VM step included) in the fresh root instead of the smoke
    /// test. What CI does: the test command then runs exactly where a newcomer would run it,
    /// on a Debian 12 whose only Rust, tools and packages are those the setup installed.
    #[arg(long)]
    pub full: bool,
}

const SUITE: &str = "bookworm";
/// Beyond minbase, only what a newcomer needs before the README's first command:
/// - `git`: the README starts from a clone of the repository;
/// - `ca-certificates`: the trust store every networked Debian install has (the installer
///   and the cloud images include it); without it no HTTPS registry is reachable and the
///   machine's extra CA certificates cannot be added the way the machine adds them.
const ROOT_EXTRAS: &[&str] = &["git", "ca-certificates"];
/// Tools a fresh Debian 12 does not have and the README's setup must install: finding one
/// in the root before the setup would make the proof worthless.
const MUST_BE_ABSENT: &[&str] = &[
    "cargo",
    "rustc",
    "rustup",
    "kubectl",
    "python3",
    "bpf-linker",
];
/// The smoke test after the demo: the manifests step (venv with the pinned kubectl, which
/// every `./x test` runs first), the API-fixture test that runs that kubectl, and kit tests
/// that need root (network namespaces, veth, cgroups, a fake metadata host); the demo before
/// it loaded and attached the eBPF programs. Test files and names, so the run builds only
/// two test binaries; each name must report `ok` in the output.
const SMOKE_TEST_FILES: &[&str] = &["apiserver_fixture", "kit_smoke"];
const SMOKE_TESTS: &[&str] = &[
    "kubectl_as_another_field_manager",
    "http_v4_to_metadata_reaches_fake_server_and_is_counted",
    "spawned_process_is_in_cgroup_and_netns_before_exec",
    "everything_is_gone_after_drop",
];

/// What a newcomer types, run by bash inside the root as root in /root. `$FULL_TEST`,
/// `$SMOKE_FILES` and `$SMOKE_TESTS` are set by the caller.
const NEWCOMER_SCRIPT: &str = r#"set -euo pipefail
say() { printf '\n==> [fresh-machine %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
say "a fresh Debian $(cat /etc/debian_version): nothing of ours installed"
for tool in $MUST_BE_ABSENT; do
    if command -v "$tool" >/dev/null; then
        echo "fresh-machine: $tool is already in the fresh root ($(command -v "$tool")): the proof would be worthless" >&2
        exit 1
    fi
done
cd /root
say "git clone (the repository at HEAD)"
git clone --quiet /root/datalab-guard.bundle datalab-guard
cd datalab-guard
git log -1 --format='HEAD: %H %s'
say "README: ./x demo"
./x demo
if [ "$FULL_TEST" = 1 ]; then
    say "README: ./x test (every test)"
    ./x test 2>&1 | tee /root/test.log
    if ! grep -q "^cargo xtask test: all tests passed, none skipped" /root/test.log; then
        echo "fresh-machine: ./x test did not report every test passed" >&2
        exit 1
    fi
else
    say "smoke test: ./x test -p datalab-guard-tests $SMOKE_FILES -- $SMOKE_TESTS"
    ./x test -p datalab-guard-tests $SMOKE_FILES -- $SMOKE_TESTS 2>&1 | tee /root/smoke-test.log
    for name in $SMOKE_TESTS; do
        if ! grep -Eq "^test ([a-z_]+::)*$name \.\.\. ok" /root/smoke-test.log; then
            echo "fresh-machine: the smoke test $name did not report ok" >&2
            exit 1
        fi
    done
fi
say "what the setup installed"
command -v cargo rustc bpf-linker cargo-deny || true
cargo --version
ls target/manifests-venv/bin/kubectl 2>/dev/null || true
say "newcomer path passed"
"#;

/// Set by SIGINT, SIGTERM or SIGHUP: the wait loops stop the run and clean up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches Ctrl-C and termination so that cleanup runs. A handler (not SIG_IGN) so that the
/// children start with default dispositions again.
fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t,
            );
        }
    }
}

/// Runs `cargo xtask fresh-machine`.
pub fn run(args: &FreshMachineArgs) -> Result<()> {
    require_root("cargo xtask fresh-machine");
    ensure!(
        output(Command::new("sh").args(["-c", "command -v debootstrap && command -v unshare"]))
            .is_ok_and(|o| o.status.success()),
        "debootstrap or unshare is missing: run `cargo xtask setup` as root (it installs debootstrap)"
    );
    catch_interrupts();
    let started = Instant::now();
    let load_before = load_average();
    let work = util::workspace_root().join("target/fresh-machine");
    let cache = work.join("cache");
    if args.no_cache {
        let _ = fs::remove_dir_all(&cache);
    }
    for dir in ["debootstrap", "apt", "crates"] {
        fs::create_dir_all(cache.join(dir))?;
    }
    let root = work.join("root");
    // A root left by a run that was killed hard: remove it the same careful way.
    if root.exists() {
        println!(
            "fresh-machine: removing the root an earlier run left in {}",
            root.display()
        );
        remove_root(&root)?;
    }
    let network = MachineNetwork::read()?;
    network.print();
    let guard = RootGuard {
        root: root.clone(),
        keep: args.keep,
    };

    let mut phases = Vec::new();
    let t = Instant::now();
    bootstrap(&root, &cache, &network.mirror)?;
    phases.push(("debootstrap (minbase + git, ca-certificates)", t.elapsed()));

    let t = Instant::now();
    network.carry_into(&root)?;
    bundle_head(&root)?;
    phases.push(("carry in network config, bundle HEAD", t.elapsed()));

    let t = Instant::now();
    let result = run_newcomer(&root, &cache, &network, args.full);
    phases.push((
        if args.full {
            "newcomer: clone, ./x demo, ./x test"
        } else {
            "newcomer: clone, ./x demo, smoke test"
        },
        t.elapsed(),
    ));
    drop(guard);

    println!("\nfresh-machine timings:");
    for (name, d) in &phases {
        println!("  {name:<45} {:>6.0} s", d.as_secs_f64());
    }
    println!(
        "  {:<45} {:>6.0} s",
        "total (with cleanup)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  load average before: {load_before}; after: {}; {} CPUs",
        load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    result?;
    let tests = if args.full {
        "every test"
    } else {
        "the smoke test"
    };
    println!("fresh-machine: the README's setup and {tests} passed on a fresh Debian 12");
    Ok(())
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// Removes the root when dropped (unless `--keep`), whatever happened before.
struct RootGuard {
    root: PathBuf,
    keep: bool,
}

impl Drop for RootGuard {
    fn drop(&mut self) {
        // Processes go in any case: a kept root is for looking at, not for running in.
        if let Err(e) = kill_processes_in(&self.root) {
            eprintln!("fresh-machine: cleanup: {e:#}");
        }
        if self.keep {
            println!(
                "fresh-machine: kept the root in {} (--keep)",
                self.root.display()
            );
            return;
        }
        if let Err(e) = remove_root(&self.root) {
            eprintln!("fresh-machine: cleanup: {e:#}");
        }
    }
}

/// Kills every process left in the root, checks that nothing is mounted under it, then
/// deletes it without crossing into another file system.
fn remove_root(root: &Path) -> Result<()> {
    kill_processes_in(root)?;
    let mounted = mounts_under(root)?;
    ensure!(
        mounted.is_empty(),
        "not removing {}: still mounted under it: {mounted:?}",
        root.display()
    );
    util::run(
        Command::new("rm")
            .args(["-rf", "--one-file-system"])
            .arg(root),
    )?;
    println!("fresh-machine: removed {}", root.display());
    Ok(())
}

/// Mount points (of this mount namespace) at or under `dir`.
fn mounts_under(dir: &Path) -> Result<Vec<String>> {
    let dir = dir.to_string_lossy().into_owned();
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| *m == dir || m.starts_with(&format!("{dir}/")))
        .map(str::to_owned)
        .collect())
}

/// Kills (SIGKILL) every process whose root directory is `root`, or that shares a mount
/// namespace with one (the private namespace, and what the tests started in it), until none
/// is left. Their namespace, and with it every mount made in it, ends with the last of them.
fn kill_processes_in(root: &Path) -> Result<()> {
    let Ok(meta) = fs::metadata(root) else {
        return Ok(());
    };
    let root_id = (meta.dev(), meta.ino());
    let own_ns = fs::read_link("/proc/self/ns/mnt").ok();
    let own_pid = std::process::id();
    let mut namespaces = Vec::new();
    for round in 0..50 {
        let mut victims = Vec::new();
        for entry in fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == own_pid {
                continue;
            }
            let proc = entry.path();
            let in_root =
                fs::metadata(proc.join("root")).is_ok_and(|m| (m.dev(), m.ino()) == root_id);
            let ns = fs::read_link(proc.join("ns/mnt")).ok();
            if in_root {
                if let Some(ns) = &ns {
                    if Some(ns) != own_ns.as_ref() && !namespaces.contains(ns) {
                        namespaces.push(ns.clone());
                    }
                }
            }
            if in_root || ns.is_some_and(|ns| namespaces.contains(&ns)) {
                victims.push(pid);
            }
        }
        if victims.is_empty() {
            return Ok(());
        }
        if round == 0 {
            println!(
                "fresh-machine: killing {} process(es) left in the root",
                victims.len()
            );
        }
        for pid in victims {
            // SAFETY: kill has no memory preconditions; a pid that is gone gives ESRCH.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("processes in {} survived SIGKILL for 5 s", root.display())
}

/// Spawns `cmd` in its own process group and waits for it; on SIGINT/SIGTERM/SIGHUP kills
/// the group (and, through the guard, whatever left it) and fails.
fn run_interruptible(cmd: &mut Command, what: &str) -> Result<()> {
    println!("$ {}", show(cmd));
    let line = what;
    let mut child: Child = cmd
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            ensure!(status.success(), "`{line}` failed: {status}");
            return Ok(());
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            // SAFETY: kill has no memory preconditions; the group is the child's own.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.wait();
            bail!("interrupted while running `{line}`");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// debootstrap in a private mount namespace, so that the proc and sys mounts it makes in the
/// root end with it, even when it is killed.
fn bootstrap(root: &Path, cache: &Path, mirror: &str) -> Result<()> {
    fs::create_dir_all(root)?;
    run_interruptible(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "debootstrap"])
            .arg("--variant=minbase")
            .arg(format!("--include={}", ROOT_EXTRAS.join(",")))
            .arg(format!(
                "--cache-dir={}",
                cache.join("debootstrap").display()
            ))
            .arg(SUITE)
            .arg(root)
            .arg(mirror),
        "debootstrap",
    )
    .context("debootstrap of the fresh root failed")
}

/// The repository at HEAD as a git bundle in the root's /root, for the newcomer's clone.
fn bundle_head(root: &Path) -> Result<()> {
    util::run(
        Command::new("git")
            .current_dir(util::workspace_root())
            .args(["bundle", "create", "--quiet"])
            .arg(root.join("root/datalab-guard.bundle"))
            .arg("HEAD"),
    )
}

/// The in-root run: the mounts a booted machine has, then the newcomer's script, as
/// `env -i` + chroot so that nothing of this process's environment leaks in beyond what
/// [`MachineNetwork`] carries.
fn run_newcomer(root: &Path, cache: &Path, network: &MachineNetwork, full: bool) -> Result<()> {
    let script_path = root.join("root/newcomer.sh");
    fs::write(&script_path, NEWCOMER_SCRIPT)?;
    let r = root.display().to_string();
    let crates = format!("{r}/root/.cargo/registry/cache");
    fs::create_dir_all(&crates)?;
    // The root a mount point; proc fresh; the machine's /sys with its cgroup mounts (the privileged tests make
    // cgroups there); a fresh empty bpffs as a booted Debian 12 has (not the machine's
    // pins); /dev; a tmpfs /run; the download caches (see the module docs).
    // The root bound onto itself first: inside the chroot "/" must be a mount point, or
    // `ip netns exec`/`ip -n` (which remount / as a slave) fail with EINVAL.
    let mounts = format!(
        "set -e
mount --bind '{r}' '{r}'
mount -t proc proc '{r}/proc'
mount --rbind /sys '{r}/sys'
mount -t bpf bpf '{r}/sys/fs/bpf'
mount --rbind /dev '{r}/dev'
mount -t tmpfs -o mode=755 tmpfs '{r}/run'
mount --bind '{apt}' '{r}/var/cache/apt/archives'
mount --bind '{crates_cache}' '{crates}'
",
        apt = cache.join("apt").display(),
        crates_cache = cache.join("crates").display(),
    );
    let mut env = vec![
        "HOME=/root".to_owned(),
        "USER=root".to_owned(),
        "LOGNAME=root".to_owned(),
        // Debian's default PATH for root (/etc/profile would set the same).
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "TERM=dumb".to_owned(),
        format!("MUST_BE_ABSENT={}", MUST_BE_ABSENT.join(" ")),
        format!("FULL_TEST={}", u8::from(full)),
        format!(
            "SMOKE_FILES={}",
            SMOKE_TEST_FILES
                .iter()
                .map(|f| format!("--test {f}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        format!("SMOKE_TESTS={}", SMOKE_TESTS.join(" ")),
    ];
    env.extend(network.env.iter().map(|(k, v)| format!("{k}={v}")));
    let mut sh = format!("{mounts}exec chroot '{r}' /usr/bin/env -i");
    for kv in &env {
        sh.push(' ');
        sh.push_str(&shell_quote(kv));
    }
    sh.push_str(" /bin/bash -c 'update-ca-certificates >/dev/null && cd /root && exec bash /root/newcomer.sh'");
    run_interruptible(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(sh),
        "the newcomer's script in the chroot",
    )
    .context("the newcomer's path failed in the fresh Debian 12 root (see above)")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How this machine reaches Debian's mirror and the crate and Python registries: what the
/// fresh root gets of this machine, and nothing more.
struct MachineNetwork {
    /// The Debian mirror of the machine's apt sources, for debootstrap.
    mirror: String,
    /// (source on this machine, destination inside the root) files carried in.
    files: Vec<(PathBuf, String)>,
    /// Proxy, CA-bundle and registry-client variables of this machine's environment.
    env: Vec<(String, String)>,
}

/// Environment variables that say how this machine reaches the network: proxies, CA
/// bundles, and the registry clients' network settings. Exact names...
const NETWORK_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
];
/// ...and prefixes (cargo's `[http]`, `[net]`, registry and source settings).
const NETWORK_ENV_PREFIXES: &[&str] = &[
    "CARGO_HTTP_",
    "CARGO_NET_",
    "CARGO_REGISTRIES_",
    "CARGO_REGISTRY_",
    "CARGO_SOURCE_",
];
/// apt.conf.d settings about reaching the archive (proxies, TLS, the machine's mirror being
/// a snapshot whose Release files are past Valid-Until); other apt settings (cache
/// cleaning, index compression, languages) are this image's, not the network's.
const APT_NETWORK_KEYS: &[&str] = &[
    "proxy",
    "check-valid-until",
    "check-date",
    "cainfo",
    "verify-peer",
    "verify-host",
];

impl MachineNetwork {
    fn read() -> Result<Self> {
        let mut files = Vec::new();
        let mut mirror = None;
        // apt sources for Debian's own suites only: a third-party repository this machine
        // has configured is not part of a fresh Debian 12. debootstrap's own sources.list
        // (main only) is replaced by these, which have -updates and -security as every
        // installed Debian 12 has (rustc-web 1.96 and llvm-22 are in -security).
        let mut sources = vec![PathBuf::from("/etc/apt/sources.list")];
        if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
            let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
            more.sort();
            sources.extend(more);
        }
        for path in sources {
            let name = path.to_string_lossy().into_owned();
            if !(name.ends_with(".list") || name.ends_with(".sources")) {
                continue;
            }
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            let entries = apt_source_entries(&text);
            if entries.is_empty() || !entries.iter().all(|e| is_debian_suite(&e.suite)) {
                println!("fresh-machine: not carried in (not Debian {SUITE}): {name}");
                continue;
            }
            if mirror.is_none() {
                mirror = entries
                    .iter()
                    .find(|e| e.suite == SUITE)
                    .map(|e| e.uri.clone());
            }
            files.push((path.clone(), name));
        }
        let mirror = mirror.context(
            "this machine's apt sources have no Debian bookworm entry to take the mirror from",
        )?;
        if let Ok(dir) = fs::read_dir("/etc/apt/apt.conf.d") {
            for entry in dir.flatten() {
                let text = fs::read_to_string(entry.path()).unwrap_or_default();
                if is_apt_network_config(&text) {
                    let path = entry.path();
                    let dest = path.to_string_lossy().into_owned();
                    files.push((path, dest));
                }
            }
        }
        // The CA certificates this machine adds to the system store (update-ca-certificates
        // picks them up inside the root, as on the machine).
        collect_files(Path::new("/usr/local/share/ca-certificates"), &mut files);
        for path in [
            "/etc/pip.conf",
            "/etc/xdg/pip/pip.conf",
            "/etc/resolv.conf",
            "/etc/hosts",
        ] {
            if Path::new(path).is_file() {
                files.push((path.into(), path.into()));
            }
        }
        let cargo_home = std::env::var_os("CARGO_HOME").map_or_else(
            || {
                Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".cargo")
            },
            PathBuf::from,
        );
        for name in ["config.toml", "config"] {
            let path = cargo_home.join(name);
            if path.is_file() {
                files.push((path, format!("/root/.cargo/{name}")));
            }
        }
        let env = std::env::vars()
            .filter(|(k, _)| {
                NETWORK_ENV.contains(&k.as_str())
                    || NETWORK_ENV_PREFIXES.iter().any(|p| k.starts_with(p))
            })
            .collect();
        Ok(Self { mirror, files, env })
    }

    fn print(&self) {
        println!(
            "fresh-machine: Debian mirror (from this machine's apt sources): {}",
            self.mirror
        );
        for (src, dest) in &self.files {
            println!("fresh-machine: carried in: {} -> {dest}", src.display());
        }
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        println!(
            "fresh-machine: environment carried in (names only): {}",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(" ")
            }
        );
    }

    fn carry_into(&self, root: &Path) -> Result<()> {
        // debootstrap's one-line sources.list is replaced by the machine's Debian sources.
        fs::remove_file(root.join("etc/apt/sources.list")).ok();
        for (src, dest) in &self.files {
            let target = root.join(dest.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            // /etc/resolv.conf may be a symlink on the machine: copy what it points to.
            let _ = fs::remove_file(&target);
            fs::copy(src, &target)
                .with_context(|| format!("copying {} into the root", src.display()))?;
        }
        Ok(())
    }
}

fn collect_files(dir: &Path, files: &mut Vec<(PathBuf, String)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, files);
        } else if path.is_file() {
            let dest = path.to_string_lossy().into_owned();
            files.push((path, dest));
        }
    }
}

/// One apt source: a URI and one suite.
#[derive(Debug, PartialEq)]
struct AptSource {
    uri: String,
    suite: String,
}

/// The (URI, suite) pairs of a sources.list (one-line) or .sources (deb822) text; disabled
/// deb822 stanzas (`Enabled: no`) and `deb-src` lines are left out.
fn apt_source_entries(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let is_deb822 = lines.iter().any(|l| l.starts_with("Types:"));
    if !is_deb822 {
        for line in lines {
            let mut words = line.split_whitespace();
            if words.next() != Some("deb") {
                continue;
            }
            let mut rest: Vec<&str> = words.collect();
            if rest.first().is_some_and(|w| w.starts_with('[')) {
                let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
                rest.drain(..=end);
            }
            if let [uri, suite, ..] = rest[..] {
                out.push(AptSource {
                    uri: uri.to_owned(),
                    suite: suite.to_owned(),
                });
            }
        }
        return out;
    }
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
        };
        if !field("Types").is_some_and(|t| t.split_whitespace().any(|w| w == "deb"))
            || field("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        let uris = field("URIs").unwrap_or_default();
        let suites = field("Suites").unwrap_or_default();
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace() {
                out.push(AptSource {
                    uri: uri.to_owned(),
                    suite: suite.to_owned(),
                });
            }
        }
    }
    out
}

/// bookworm and its official companions (bookworm-updates, -security, -backports).
fn is_debian_suite(suite: &str) -> bool {
    suite == SUITE
        || ["updates", "security", "backports"]
            .iter()
            .any(|s| suite == format!("{SUITE}-{s}"))
}

/// Does this apt.conf.d text set how the archive is reached ([`APT_NETWORK_KEYS`])?
fn is_apt_network_config(text: &str) -> bool {
    text.lines()
        .map(|l| l.trim().to_ascii_lowercase())
        .filter(|l| l.starts_with("acquire"))
        .any(|l| APT_NETWORK_KEYS.iter().any(|k| l.contains(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_sources_give_each_uri_and_suite() {
        let text = "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
                    Types: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\n\n\
                    Types: deb\nEnabled: no\nURIs: http://off.invalid/\nSuites: nodistro\n";
        let entries = apt_source_entries(text);
        let pairs: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.uri.as_str(), e.suite.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("http://mirror.invalid/debian", "bookworm"),
                ("http://mirror.invalid/debian", "bookworm-updates"),
                ("http://mirror.invalid/debian-security", "bookworm-security"),
            ]
        );
    }

    #[test]
    fn one_line_sources_skip_options_and_deb_src() {
        let text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://a.invalid/debian bookworm main\n\
                    deb-src http://a.invalid/debian bookworm main\ndeb http://b.invalid/x cloud-sdk-bookworm main\n";
        let entries = apt_source_entries(text);
        assert_eq!(
            entries,
            [
                AptSource {
                    uri: "http://a.invalid/debian".into(),
                    suite: "bookworm".into()
                },
                AptSource {
                    uri: "http://b.invalid/x".into(),
                    suite: "cloud-sdk-bookworm".into()
                },
            ]
        );
        // A third-party suite that merely contains the name is not Debian's.
        assert!(!is_debian_suite("cloud-sdk-bookworm"));
        assert!(is_debian_suite("bookworm-security"));
        assert!(!is_debian_suite("nodistro"));
    }

    #[test]
    fn apt_network_settings_are_told_from_image_settings() {
        assert!(is_apt_network_config(
            "Acquire::Check-Valid-Until \"false\";\n"
        ));
        assert!(is_apt_network_config(
            "Acquire::http::Proxy \"http://proxy.invalid:3128\";\n"
        ));
        assert!(!is_apt_network_config("Acquire::GzipIndexes \"true\";\n"));
        assert!(!is_apt_network_config(
            "DPkg::Post-Invoke { \"rm -f /var/cache/apt/archives/*.deb\"; };\n"
        ));
        assert!(!is_apt_network_config("// Acquire::http::Proxy \"x\";\n"));
    }

    #[test]
    fn mounts_under_matches_the_directory_and_below_only() {
        // This process's own root is a mount point; a sibling prefix is not "under".
        assert!(mounts_under(Path::new("/"))
            .unwrap()
            .contains(&"/".to_owned()));
        assert!(mounts_under(Path::new("/nonexistent-fresh-machine-dir"))
            .unwrap()
            .is_empty());
    }
}
