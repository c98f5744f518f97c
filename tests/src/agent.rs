//! [`Agent`]: the real `datalab-guard` binary as a child process of a test.
//!
//! The agent's stdout carries its audit records (one JSON line per blocked attempt) and is
//! captured line by line into a shared buffer, as is stderr, by reader threads; tests look at
//! them while the agent runs. Its HTTP endpoints (`/readyz`, `/metrics`) are read with a tiny
//! std-only HTTP/1.0 client that refuses anything but loopback addresses, so that a test can
//! never be pointed at a real network by mistake. Dropping an `Agent` SIGKILLs and reaps it
//! if it is still running (its pins stay, as in production; [`crate::BpffsDir`] removes them).

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::bins;

/// A free TCP address on 127.0.0.1 (for `--metrics-addr`). The port is released before it is
/// returned, so another process could in principle take it first; fine for tests.
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// An HTTP response as read by [`http_get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header lines, as `(lower-cased name, value)`.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked if the server used chunked encoding).
    pub body: String,
}

/// `GET path` over HTTP/1.0 to a loopback address; refuses any other address.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    if !addr.ip().is_loopback() {
        bail!("http_get only talks to loopback addresses, not {addr}");
    }
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // One write: a request split over several segments invites resets from strict servers.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading GET {path} from {addr}"))?;
    parse_response(&raw).with_context(|| format!("GET http://{addr}{path}"))
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (proto, code) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if !proto.starts_with("HTTP/") {
        bail!("not an HTTP response: {status_line:?}");
    }
    let status = code
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

type Lines = Arc<Mutex<Vec<String>>>;

fn capture(pipe: impl std::io::Read + Send + 'static, lines: Lines) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    })
}

/// A running `datalab-guard` process; see the module docs.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    exit: Option<ExitStatus>,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
    argv: String,
}

impl Agent {
    /// The agent binary (`$DATALAB_GUARD_BIN`, else the newest workspace build).
    pub fn bin() -> Result<PathBuf> {
        bins::agent_bin()
    }

    /// Starts `datalab-guard ARGS` (in the caller's cgroup and network namespace).
    pub fn spawn<S: AsRef<OsStr>>(args: &[S]) -> Result<Self> {
        Self::spawn_with(&Self::bin()?, args, &[])
    }

    /// Starts `datalab-guard ARGS` inside network namespace `netns` (entered before exec,
    /// no mount changes, unlike `ip netns exec`), e.g. where a test's "node" interfaces live.
    pub fn spawn_in_netns<S: AsRef<OsStr>>(
        netns: &str,
        args: &[S],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let bin = Self::bin()?;
        let mut argv: Vec<&OsStr> = vec![bin.as_os_str()];
        argv.extend(args.iter().map(AsRef::as_ref));
        let mut cmd = crate::process::command_in(None, Some(netns), &argv)?;
        cmd.envs(envs.iter().copied());
        let shown = format!(
            "(netns {netns}) {} {}",
            bin.display(),
            crate::process::display_argv(args)
        );
        Self::spawn_command(cmd, shown)
    }

    /// Starts `bin ARGS` with extra environment variables.
    pub fn spawn_with<S: AsRef<OsStr>>(
        bin: &Path,
        args: &[S],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(args).envs(envs.iter().copied());
        let argv = format!("{} {}", bin.display(), crate::process::display_argv(args));
        Self::spawn_command(cmd, argv)
    }

    fn spawn_command(mut cmd: Command, argv: String) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {argv}"))?;
        let stdout: Lines = Arc::default();
        let stderr: Lines = Arc::default();
        let readers = vec![
            capture(child.stdout.take().expect("piped"), Arc::clone(&stdout)),
            capture(child.stderr.take().expect("piped"), Arc::clone(&stderr)),
        ];
        Ok(Self {
            child,
            exit: None,
            stdout,
            stderr,
            readers,
            argv,
        })
    }

    /// Runs `datalab-guard ARGS` to completion (for one-shot commands: `status`, `check`,
    /// `uninstall`, bad-usage checks) and returns its output.
    pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Result<Output> {
        let bin = Self::bin()?;
        Command::new(&bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| {
                format!(
                    "running {} {}",
                    bin.display(),
                    crate::process::display_argv(args)
                )
            })
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Polls `http://ADDR/readyz` until it answers 200. Fails early, with the agent's
    /// stderr, if the agent exits; fails with the last answer seen on timeout.
    pub fn wait_ready(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        self.wait_ready_in(None, addr, timeout)
    }

    /// [`Agent::wait_ready`] for an agent started in network namespace `netns` (its
    /// loopback is that namespace's): asked from a thread that entered it.
    pub fn wait_ready_in_netns(
        &mut self,
        netns: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<()> {
        self.wait_ready_in(Some(netns), addr, timeout)
    }

    fn wait_ready_in(
        &mut self,
        netns: Option<&str>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<()> {
        let readyz = move || http_get(addr, "/readyz", Duration::from_millis(500));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                self.join_readers(Duration::from_secs(1));
                bail!(
                    "{} exited with {status} before becoming ready; stderr:\n{}\nstdout:\n{}",
                    self.argv,
                    self.stderr_lines().join("\n"),
                    self.stdout_lines().join("\n")
                );
            }
            let answer = match netns {
                None => readyz(),
                Some(ns) => crate::process::with_netns_thread(ns, readyz),
            };
            let last = match answer {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("HTTP {} {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "{} not ready at http://{addr}/readyz after {timeout:?} (last: {last}); stderr:\n{}",
                    self.argv,
                    self.stderr_lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The Prometheus text of `http://ADDR/metrics`.
    pub fn metrics(&self, addr: SocketAddr) -> Result<String> {
        let r = http_get(addr, "/metrics", Duration::from_secs(5))?;
        if r.status != 200 {
            bail!("GET /metrics answered {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// SIGKILLs the agent (simulating a crash) and reaps it.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Ok(s);
        }
        self.child.kill().context("SIGKILL datalab-guard")?;
        let status = self.child.wait()?;
        self.exit = Some(status);
        self.join_readers(Duration::from_secs(2));
        Ok(status)
    }

    /// Sends SIGTERM (graceful shutdown); use [`Agent::wait_exit`] to wait for it.
    pub fn sigterm(&mut self) -> Result<()> {
        if self.try_status().is_some() {
            bail!("datalab-guard already exited");
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("SIGTERM datalab-guard");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the agent to exit; then all its output has been captured.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                self.join_readers(Duration::from_secs(2));
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "datalab-guard (pid {}) still running after {timeout:?}",
                    self.pid()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn join_readers(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.readers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for h in std::mem::take(&mut self.readers) {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// Lines the agent printed on stdout so far (its audit records).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Lines the agent printed on stderr so far (its logs).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Stdout lines that parse as JSON objects with an `event` field (audit records).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        self.stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("event").is_some())
            .collect()
    }

    /// Waits until some stdout line satisfies `pred` and returns it.
    pub fn wait_for_stdout(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stdout.lock().unwrap().iter().find(|l| pred(l)) {
                return Ok(l.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching stdout line from datalab-guard within {timeout:?}; stdout:\n{}",
                    self.stdout_lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r =
            parse_response(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nready\n").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "ready\n");
        assert_eq!(r.headers[0], ("content-type".into(), "text/plain".into()));
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn http_get_talks_to_a_loopback_server() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "request cut short: {req:?}");
                req.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&req).starts_with("GET /readyz HTTP/1.0\r\n"));
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nok").unwrap();
        });
        let r = http_get(addr, "/readyz", Duration::from_secs(5)).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        server.join().unwrap();
    }

    #[test]
    fn http_get_refuses_non_loopback() {
        let err = http_get(
            "192.0.2.1:80".parse().unwrap(),
            "/",
            Duration::from_millis(10),
        )
        .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    #[test]
    fn free_addr_is_loopback() {
        assert!(free_loopback_addr().unwrap().ip().is_loopback());
    }
}
