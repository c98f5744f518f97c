//! The probe connection itself: from inside one network namespace, a TCP handshake to every
//! target at once, each ending as [`ProbeResult`] within the timeout.
//!
//! A connect is a TCP handshake only: non-blocking `connect`, `poll` until the timeout, then
//! the socket is closed at once. No byte of payload is sent. All targets of one namespace
//! are probed in parallel, so one namespace costs at most one timeout.
//!
//! A REJECT that answers with an ICMP error (rather than a TCP reset) is seen only when the
//! SYN is first retransmitted, after 1 s: the error to the first SYN comes back while
//! `connect` still holds the socket, where TCP keeps it as a soft error. With a timeout under
//! a second such a refusal shows as a timeout, which classifies the same (enforced).

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::AsFd as _,
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::netns::on_netns_thread;

/// What one TCP connect attempt ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// The handshake completed: the destination is reachable.
    Connected,
    /// No answer within the timeout (dropped by a policy, or nothing there).
    TimedOut,
    /// Refused on the way or by the peer: ECONNREFUSED (RST, e.g. a REJECT rule),
    /// EHOSTUNREACH / ENETUNREACH (ICMP unreachable from a REJECT, or no route),
    /// EACCES / EPERM (a local policy said no).
    Refused(i32),
    /// The probe itself failed (namespace handle, `setns`, `socket`, an unexpected connect
    /// error): says nothing about the network.
    Error(i32),
}

impl ProbeResult {
    /// For logs: `connected`, `timed out`, `refused: Connection refused (os error 111)`, ...
    pub fn describe(&self) -> String {
        match self {
            ProbeResult::Connected => "connected".to_owned(),
            ProbeResult::TimedOut => "timed out".to_owned(),
            ProbeResult::Refused(e) => format!("refused: {}", io::Error::from_raw_os_error(*e)),
            ProbeResult::Error(e) => format!("probe error: {}", io::Error::from_raw_os_error(*e)),
        }
    }
}

/// One target's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub target: SocketAddr,
    pub result: ProbeResult,
}

/// Connects to every target from inside the network namespace `netns` (a namespace file such
/// as `/proc/<pid>/ns/net` or `/run/netns/<name>`), all in parallel, each given `timeout`,
/// and closes each socket as soon as its handshake ends. Runs on a dedicated OS thread that
/// alone enters the namespace (see [`super::netns`]); blocks the caller for at most about
/// `timeout`. Never fails as a whole: a namespace that cannot be entered gives
/// [`ProbeResult::Error`] for every target. Outcomes are in `targets` order.
pub fn probe_in_netns(
    netns: &Path,
    targets: &[SocketAddr],
    timeout: Duration,
) -> Vec<ProbeOutcome> {
    let all = |result: ProbeResult| -> Vec<ProbeOutcome> {
        targets
            .iter()
            .map(|&target| ProbeOutcome { target, result })
            .collect()
    };
    if targets.is_empty() {
        return Vec::new();
    }
    let file = match File::open(netns) {
        Ok(f) => f,
        Err(e) => return all(ProbeResult::Error(errno_of(&e))),
    };
    let owned = targets.to_vec();
    let entered = on_netns_thread("dg-cniprobe", move |thread| {
        thread.enter(&file)?;
        drop(file);
        Ok(connect_all(&owned, timeout))
    });
    // A spawn failure, a panic (none is expected) or a refused setns: reported per target.
    match entered.and_then(|inside| inside) {
        Ok(outcomes) => outcomes,
        Err(e) => all(ProbeResult::Error(errno_of(&e))),
    }
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Maps a connect error to a result (see [`ProbeResult`]).
fn connect_errno(e: i32) -> ProbeResult {
    match e {
        libc::ECONNREFUSED
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::EACCES
        | libc::EPERM => ProbeResult::Refused(e),
        // The kernel gave up retrying SYNs (only after minutes; here for completeness).
        libc::ETIMEDOUT => ProbeResult::TimedOut,
        _ => ProbeResult::Error(e),
    }
}

enum Started {
    Done(ProbeResult),
    Pending(Socket),
}

/// Non-blocking connects to all targets from the calling thread's network namespace, then
/// one `poll` loop until all finished or the deadline passed.
fn connect_all(targets: &[SocketAddr], timeout: Duration) -> Vec<ProbeOutcome> {
    let deadline = Instant::now() + timeout;
    let mut results: Vec<Option<ProbeResult>> = vec![None; targets.len()];
    let mut pending: Vec<(usize, Socket)> = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        match start_connect(target) {
            Started::Done(r) => results[i] = Some(r),
            Started::Pending(socket) => pending.push((i, socket)),
        }
    }
    while !pending.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let ready = match poll_writable(&pending, deadline - now) {
            Ok(ready) => ready,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                for (i, _) in pending.drain(..) {
                    results[i] = Some(ProbeResult::Error(e as i32));
                }
                break;
            }
        };
        let mut still = Vec::with_capacity(pending.len());
        for ((i, socket), ready) in pending.into_iter().zip(ready) {
            if !ready {
                still.push((i, socket));
                continue;
            }
            results[i] = Some(match socket.take_error() {
                Ok(None) => ProbeResult::Connected,
                Ok(Some(e)) => connect_errno(errno_of(&e)),
                Err(e) => ProbeResult::Error(errno_of(&e)),
            });
            // `socket` is dropped here: closed at once, handshake only.
        }
        pending = still;
    }
    for (i, _) in pending {
        results[i] = Some(ProbeResult::TimedOut);
    }
    targets
        .iter()
        .zip(results)
        .map(|(&target, result)| ProbeOutcome {
            target,
            result: result.unwrap_or(ProbeResult::TimedOut),
        })
        .collect()
}

/// Waits up to `wait` for any pending connect to finish; says which did (any event: writable,
/// error or hang-up).
fn poll_writable(pending: &[(usize, Socket)], wait: Duration) -> Result<Vec<bool>, Errno> {
    // Round up, so that a sub-millisecond rest does not spin with a 0 ms poll.
    let wait_ms = wait.as_micros().div_ceil(1000);
    let timeout = PollTimeout::try_from(wait_ms).unwrap_or(PollTimeout::MAX);
    let mut fds: Vec<PollFd<'_>> = pending
        .iter()
        .map(|(_, socket)| PollFd::new(socket.as_fd(), PollFlags::POLLOUT))
        .collect();
    nix::poll::poll(&mut fds, timeout)?;
    // Flags nix does not know still mean "something happened": only an empty set waits on.
    Ok(fds
        .iter()
        .map(|fd| !fd.revents().is_some_and(|r| r.is_empty()))
        .collect())
}

fn start_connect(target: &SocketAddr) -> Started {
    // socket2 adds SOCK_CLOEXEC itself.
    let socket = match Socket::new(
        Domain::for_address(*target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    ) {
        Ok(socket) => socket,
        Err(e) => return Started::Done(ProbeResult::Error(errno_of(&e))),
    };
    match socket.connect(&SockAddr::from(*target)) {
        Ok(()) => Started::Done(ProbeResult::Connected),
        // EINTR: the connect goes on asynchronously, as for EINPROGRESS.
        Err(e) => match errno_of(&e) {
            libc::EINPROGRESS | libc::EINTR => Started::Pending(socket),
            e => Started::Done(connect_errno(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{ProbeResult::*, *};
    use crate::probe::SELF_NETNS;

    const V4: &str = "169.254.169.254:80";
    const V6: &str = "[fd00:ec2::254]:80";

    #[test]
    fn connect_errors_map_to_results() {
        assert_eq!(
            connect_errno(libc::ECONNREFUSED),
            Refused(libc::ECONNREFUSED)
        );
        assert_eq!(
            connect_errno(libc::EHOSTUNREACH),
            Refused(libc::EHOSTUNREACH)
        );
        assert_eq!(connect_errno(libc::ENETUNREACH), Refused(libc::ENETUNREACH));
        assert_eq!(connect_errno(libc::EACCES), Refused(libc::EACCES));
        assert_eq!(connect_errno(libc::EPERM), Refused(libc::EPERM));
        assert_eq!(connect_errno(libc::ETIMEDOUT), TimedOut);
        assert_eq!(connect_errno(libc::EAFNOSUPPORT), Error(libc::EAFNOSUPPORT));
        assert_eq!(
            connect_errno(libc::EADDRNOTAVAIL),
            Error(libc::EADDRNOTAVAIL)
        );
        assert!(Refused(libc::ECONNREFUSED)
            .describe()
            .starts_with("refused: "));
        assert_eq!(TimedOut.describe(), "timed out");
    }

    #[test]
    fn a_missing_namespace_is_an_error_for_every_target() {
        let targets: Vec<SocketAddr> = vec![V4.parse().unwrap(), V6.parse().unwrap()];
        let out = probe_in_netns(
            Path::new("/nonexistent/netns/x"),
            &targets,
            Duration::from_millis(100),
        );
        assert_eq!(
            out,
            targets
                .iter()
                .map(|&target| ProbeOutcome {
                    target,
                    result: Error(libc::ENOENT)
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(
            probe_in_netns(Path::new("/nonexistent"), &[], Duration::from_millis(100)),
            []
        );
    }

    #[test]
    fn a_file_that_is_no_network_namespace_is_an_error() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root (setns)");
            return;
        }
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // The mount namespace handle: setns(CLONE_NEWNET) refuses it with EINVAL.
        let out = probe_in_netns(
            Path::new("/proc/self/ns/mnt"),
            &[target],
            Duration::from_millis(100),
        );
        assert_eq!(out[0].result, Error(libc::EINVAL));
    }

    #[test]
    fn loopback_connect_and_refusal_in_our_own_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root (setns)");
            return;
        }
        // Loopback only: a listener we own, and a port we just closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let started = Instant::now();
        let out = probe_in_netns(
            Path::new(SELF_NETNS),
            &[open, closed],
            Duration::from_secs(2),
        );
        assert_eq!(
            out[0],
            ProbeOutcome {
                target: open,
                result: Connected
            }
        );
        assert_eq!(
            out[1],
            ProbeOutcome {
                target: closed,
                result: Refused(libc::ECONNREFUSED)
            }
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // The probe only did a handshake: the accepted connection is closed with no data.
        listener.set_nonblocking(false).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16];
        use std::io::Read as _;
        assert_eq!(conn.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn an_unanswered_connect_times_out_at_the_deadline() {
        // Straight from this thread's namespace (no setns, no root): a loopback listener
        // whose backlog is full leaves further SYNs unanswered, so the connect neither
        // completes nor fails before the deadline.
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener
            .bind(&SockAddr::from(
                "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            ))
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        // Fill the backlog (a 0 backlog admits one) and keep those connections open.
        let fillers: Vec<std::net::TcpStream> = (0..2)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
            })
            .collect();
        assert!(!fillers.is_empty());
        let started = Instant::now();
        let out = connect_all(&[addr], Duration::from_millis(300));
        let took = started.elapsed();
        assert_eq!(out[0].result, TimedOut, "{out:?}");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
