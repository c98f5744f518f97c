//! `cargo xtask image`: builds the release image from `Containerfile` on a machine with no
//! registry and no container daemon, and saves it as an OCI archive.
//!
//! How, step by step (each step prints what it runs):
//! 1. a Debian 12 root made with `debootstrap --variant=minbase bookworm` (cached in
//!    `target/image/rootfs`; the apt sources are the `debian:bookworm` image's: main,
//!    updates and security, which has the Rust 1.96 the builder stage needs);
//! 2. base images made from that root, never pulled: the **runtime base**, the files of
//!    [`RUNTIME_PACKAGES`] only (glibc and libgcc_s: what the agent links against, as
//!    `gcr.io/distroless/cc-debian12` has them, without a shell or a package manager), and —
//!    with `--from-source` — the whole root as the **builder base**;
//! 3. the agent: by default built here on the host (`cargo build --release --locked -p
//!    datalab-guard`) and copied in by the Containerfile's `AGENT_BUILD=prebuilt` stage;
//!    with `--from-source` the Containerfile's default path, which builds it inside the
//!    builder stage exactly as a user's `docker build` does (apt, bpf-linker, a cold release
//!    build: about four times longer on 2 cores, so CI uses the host build — the same
//!    toolchain recipe, see the Containerfile);
//! 4. `buildah build` with the local bases as build arguments (the published defaults stay
//!    in the Containerfile for users), then `buildah push` to
//!    `target/image/datalab-guard-<version>.oci.tar` (an OCI image layout archive, which
//!    `ctr images import`, `podman load`, `skopeo` and `kind load image-archive` read).
//!
//! buildah runs rootful with private storage under `target/image/storage` (`vfs`: no
//! overlay mounts to leave behind) and `--isolation chroot` (RUN steps without a runtime).
//! `--record` writes the sizes and timings to `bench-results/image.md`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::util::{self, output, run};

/// The published base images (the Containerfile's defaults) and their local stand-ins.
const LOCAL_BUILDER_IMAGE: &str = "localhost/datalab-guard-base/debian:bookworm";
const LOCAL_RUNTIME_IMAGE: &str = "localhost/datalab-guard-base/runtime:bookworm";
/// Debian packages whose files make the runtime base: the C library and libgcc_s, which is
/// all `ldd datalab-guard` lists (libc, libm, libgcc_s, the loader).
const RUNTIME_PACKAGES: &[&str] = &["libc6", "libgcc-s1"];
/// Parts of those packages a static daemon never uses: documentation, locales, iconv modules,
/// the lintian overrides, and libc6's maintainer helper binaries.
const RUNTIME_SKIP: &[&str] = &[
    "/usr/share",
    "/usr/lib/x86_64-linux-gnu/gconv",
    "/usr/bin",
    "/usr/sbin",
    "/sbin",
    "/bin",
];
const SUITE: &str = "bookworm";
/// Overridable with `DATALAB_GUARD_DEBIAN_MIRROR` (e.g. a local mirror or snapshot).
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Build the agent inside the container (the Containerfile's default, what users get)
    /// instead of copying the host's release build in.
    #[arg(long)]
    from_source: bool,
    /// Write sizes and timings to bench-results/image.md.
    #[arg(long)]
    record: bool,
}

/// What one build produced, for the summary and `--record`.
struct Built {
    archive: PathBuf,
    reference: String,
    archive_bytes: u64,
    image_bytes: u64,
    files: Vec<String>,
    steps: Vec<(String, Duration)>,
}

pub fn run_image(args: &ImageArgs) -> Result<()> {
    ensure!(
        util::is_root(),
        "cargo xtask image needs root (debootstrap, and buildah's rootful storage)"
    );
    for tool in ["debootstrap", "buildah"] {
        ensure!(
            output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing: run `cargo xtask setup` as root (it installs debootstrap and buildah)"
        );
    }
    let started = Instant::now();
    let root = util::workspace_root();
    let work = root.join("target/image");
    fs::create_dir_all(&work)?;
    let version = crate_version(&root)?;
    let reference = format!("localhost/datalab-guard:{version}");
    let buildah = Buildah::new(&work);
    let mut steps = Vec::new();

    let t = Instant::now();
    let rootfs = debian_root(&work)?;
    steps.push((
        "debootstrap (cached after the first run)".to_owned(),
        t.elapsed(),
    ));

    let t = Instant::now();
    buildah.import_dir(&runtime_root(&rootfs, &work)?, LOCAL_RUNTIME_IMAGE)?;
    if args.from_source {
        buildah.import_dir(&rootfs, LOCAL_BUILDER_IMAGE)?;
    }
    steps.push(("base images from the Debian root".to_owned(), t.elapsed()));

    if !args.from_source {
        let t = Instant::now();
        // Without the CARGO_PKG_*/CARGO_MANIFEST_* variables cargo set for xtask itself: build
        // scripts that read them (ring's) would otherwise rebuild on every switch between this
        // and a plain `cargo build --release`.
        let mut build = util::cargo_cmd();
        build.args(["build", "--release", "--locked", "-p", "datalab-guard"]);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
            {
                build.env_remove(key);
            }
        }
        run(&mut build)?;
        steps.push(("host release build of the agent".to_owned(), t.elapsed()));
    }

    let t = Instant::now();
    let agent_build = if args.from_source {
        "source"
    } else {
        "prebuilt"
    };
    run(buildah
        .cmd()
        .args([
            "build",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--layers=false",
        ])
        .args(["--file", "Containerfile", "--tag", &reference])
        .args([
            "--build-arg",
            &format!("BUILDER_IMAGE={LOCAL_BUILDER_IMAGE}"),
        ])
        .args([
            "--build-arg",
            &format!("RUNTIME_IMAGE={LOCAL_RUNTIME_IMAGE}"),
        ])
        .args(["--build-arg", &format!("AGENT_BUILD={agent_build}")])
        .arg(&root))?;
    steps.push((
        format!("buildah build (AGENT_BUILD={agent_build})"),
        t.elapsed(),
    ));

    let t = Instant::now();
    let archive = work.join(format!("datalab-guard-{version}.oci.tar"));
    let _ = fs::remove_file(&archive);
    run(buildah
        .cmd()
        .args(["push", &reference])
        .arg(format!("oci-archive:{}:{reference}", archive.display())))?;
    steps.push(("buildah push oci-archive".to_owned(), t.elapsed()));
    steps.push(("total".to_owned(), started.elapsed()));

    let (files, image_bytes) = buildah.image_files(&reference, &work)?;
    let built = Built {
        archive_bytes: fs::metadata(&archive)?.len(),
        image_bytes,
        files,
        archive,
        reference,
        steps,
    };
    summary(&built);
    if args.record {
        record(&root.join("bench-results/image.md"), &built, agent_build)?;
    }
    Ok(())
}

/// The workspace version (the image tag the DaemonSet names).
fn crate_version(root: &Path) -> Result<String> {
    let text = fs::read_to_string(root.join("Cargo.toml"))?;
    let mut in_package = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if let Some(v) = line.strip_prefix("version").filter(|_| in_package) {
            return Ok(v
                .trim_start_matches([' ', '='])
                .trim_matches('"')
                .to_owned());
        }
    }
    bail!("no [workspace.package] version in Cargo.toml")
}

/// The minbase Debian root, made once (a stamp file marks it complete).
fn debian_root(work: &Path) -> Result<PathBuf> {
    let rootfs = work.join("rootfs");
    let stamp = work.join("rootfs.complete");
    if stamp.exists() {
        println!(
            "image: reusing the Debian {SUITE} root in {}",
            rootfs.display()
        );
        return Ok(rootfs);
    }
    let _ = fs::remove_dir_all(&rootfs);
    let mirror =
        std::env::var("DATALAB_GUARD_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
    run(Command::new("debootstrap")
        .args(["--variant=minbase", SUITE])
        .arg(&rootfs)
        .arg(&mirror))
    .context(
        "debootstrap failed (needs the Debian mirror over HTTP; set DATALAB_GUARD_DEBIAN_MIRROR)",
    )?;
    // The debian:bookworm image's sources: the security suite carries rustc-web 1.96.
    let security = mirror
        .trim_end_matches('/')
        .replace("/debian", "/debian-security");
    fs::remove_file(rootfs.join("etc/apt/sources.list")).ok();
    fs::write(
        rootfs.join("etc/apt/sources.list.d/debian.sources"),
        format!(
            "Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for entry in fs::read_dir(rootfs.join(dir))?.flatten() {
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
            }
        }
    }
    fs::write(&stamp, format!("{SUITE} {mirror}\n"))?;
    Ok(rootfs)
}

/// Debian 12 is merged-/usr: /lib, /lib64, /bin and /sbin are symlinks into /usr, while
/// dpkg still lists files under their old paths.
fn usr_merged(path: &str) -> String {
    for old in ["/lib", "/lib64", "/bin", "/sbin"] {
        if path == old || path.starts_with(&format!("{old}/")) {
            return format!("/usr{path}");
        }
    }
    path.to_owned()
}

/// A directory with only the runtime packages' files (see [`RUNTIME_PACKAGES`]) and the
/// few files every image has: passwd and group (root, nobody), os-release, a /tmp.
fn runtime_root(rootfs: &Path, work: &Path) -> Result<PathBuf> {
    let dir = work.join("runtime-root");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let listing = output(
        Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                rootfs.join("var/lib/dpkg").display()
            ))
            .arg("--listfiles")
            .args(RUNTIME_PACKAGES),
    )?;
    ensure!(
        listing.status.success(),
        "dpkg-query --listfiles {RUNTIME_PACKAGES:?} in {}: {}",
        rootfs.display(),
        String::from_utf8_lossy(&listing.stderr)
    );
    let mut copied = 0;
    for listed in String::from_utf8_lossy(&listing.stdout).lines() {
        let path = usr_merged(listed);
        let skip = RUNTIME_SKIP
            .iter()
            .any(|s| path == *s || path.starts_with(&format!("{s}/")));
        let source = rootfs.join(path.trim_start_matches('/'));
        let target = dir.join(path.trim_start_matches('/'));
        let meta = match fs::symlink_metadata(&source) {
            Ok(m) if !m.is_dir() && !skip && fs::symlink_metadata(&target).is_err() => m,
            _ => continue,
        };
        fs::create_dir_all(target.parent().context("a file without a directory")?)?;
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&source)?, &target)?;
        } else {
            fs::copy(&source, &target)?;
        }
        copied += 1;
    }
    ensure!(
        copied > 0,
        "no files of {RUNTIME_PACKAGES:?} found in {}",
        rootfs.display()
    );
    // The loader's path in every binary is /lib64/ld-linux-x86-64.so.2: keep the merged-/usr links.
    for link in ["lib", "lib64"] {
        let target = dir.join(link);
        if !target.exists() {
            std::os::unix::fs::symlink(format!("usr/{link}"), &target)?;
        }
    }
    fs::create_dir_all(dir.join("etc"))?;
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n")?;
    fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    fs::copy(
        rootfs.join("usr/lib/os-release"),
        dir.join("etc/os-release"),
    )?;
    for d in ["tmp", "root", "proc", "sys", "dev"] {
        fs::create_dir_all(dir.join(d))?;
    }
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(dir.join("root"), fs::Permissions::from_mode(0o700))?;
    println!(
        "image: runtime base: {copied} files of {} from the Debian root",
        RUNTIME_PACKAGES.join(" ")
    );
    Ok(dir)
}

/// buildah with the project's private storage.
struct Buildah {
    storage: PathBuf,
    runroot: PathBuf,
}

impl Buildah {
    fn new(work: &Path) -> Buildah {
        Buildah {
            storage: work.join("storage"),
            runroot: work.join("runroot"),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(&self.storage)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    /// Commits the directory `dir` as the single-layer image `name` (replacing it).
    fn import_dir(&self, dir: &Path, name: &str) -> Result<()> {
        let _ = output(self.cmd().args(["rmi", "--force", name]));
        let from = output(self.cmd().args(["from", "scratch"]))?;
        ensure!(
            from.status.success(),
            "buildah from scratch: {}",
            String::from_utf8_lossy(&from.stderr)
        );
        let container = String::from_utf8_lossy(&from.stdout).trim().to_owned();
        let result = (|| {
            run(self
                .cmd()
                .args(["copy", &container])
                .arg(format!("{}/.", dir.display()))
                .arg("/"))?;
            run(self
                .cmd()
                .args(["config", "--os", "linux", "--arch", "amd64", &container]))?;
            run(self.cmd().args(["commit", "--quiet", &container, name]))
        })();
        let _ = output(self.cmd().args(["rm", &container]));
        result
    }

    /// Every non-directory path in the image and the sum of the regular files' sizes (the
    /// unpacked size), from a mounted working container.
    fn image_files(&self, name: &str, work: &Path) -> Result<(Vec<String>, u64)> {
        let from = output(self.cmd().args(["from", "--pull-never", name]))?;
        ensure!(
            from.status.success(),
            "buildah from {name}: {}",
            String::from_utf8_lossy(&from.stderr)
        );
        let container = String::from_utf8_lossy(&from.stdout).trim().to_owned();
        let mount = output(self.cmd().args(["mount", &container]))?;
        let dir = PathBuf::from(String::from_utf8_lossy(&mount.stdout).trim());
        let (mut files, mut bytes) = (Vec::new(), 0);
        if mount.status.success() {
            walk(&dir, &dir, &mut files, &mut bytes)?;
        }
        let _ = output(self.cmd().args(["umount", &container]));
        let _ = output(self.cmd().args(["rm", &container]));
        ensure!(
            mount.status.success(),
            "buildah mount failed (storage in {})",
            work.display()
        );
        files.sort();
        Ok((files, bytes))
    }
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<String>, bytes: &mut u64) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &path, files, bytes)?;
        } else {
            if kind.is_file() {
                *bytes += entry.metadata()?.len();
            }
            files.push(format!("/{}", path.strip_prefix(root)?.display()));
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

fn summary(b: &Built) {
    println!(
        "\ncargo xtask image: {} -> {}",
        b.reference,
        b.archive.display()
    );
    println!(
        "  image size (unpacked): {}; archive: {}",
        mib(b.image_bytes),
        mib(b.archive_bytes)
    );
    println!(
        "  {} files, no shell: {}",
        b.files.len(),
        !b.files.iter().any(|f| f.ends_with("/sh"))
    );
    for (step, took) in &b.steps {
        println!("  {took:>8.1?}  {step}");
    }
    println!(
        "  import into containerd: ctr -n k8s.io images import {}",
        b.archive.display()
    );
}

fn record(path: &Path, b: &Built, agent_build: &str) -> Result<()> {
    let mut text = format!(
        "# Image size and build time\n\n\
         Written by `cargo xtask image --record` (AGENT_BUILD={agent_build}); the machine: 2 cores, \
         shared with other builds, so timings vary by tens of percent.\n\n\
         | | |\n|---|---|\n\
         | image | `{}` |\n| unpacked size | {} ({} bytes) |\n| OCI archive | {} |\n| files | {} |\n\n\
         ## Build steps\n\n| step | time |\n|---|---|\n",
        b.reference,
        mib(b.image_bytes),
        b.image_bytes,
        mib(b.archive_bytes),
        b.files.len()
    );
    for (step, took) in &b.steps {
        text.push_str(&format!("| {step} | {:.1} s |\n", took.as_secs_f64()));
    }
    text.push_str("\n## Every file in the image\n\nNo shell, no package manager: the C library, libgcc_s, the agent, passwd/group and os-release.\n\n```\n");
    for f in &b.files {
        text.push_str(f);
        text.push('\n');
    }
    text.push_str("```\n");
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("image: recorded in {}", path.display());
    Ok(())
}
