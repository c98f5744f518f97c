//! What can go wrong talking to the container runtime, as one typed error.

use std::{io, path::PathBuf, time::Duration};

/// Longest runtime-supplied text (a gRPC status message) kept in an error: a runtime that
/// answers garbage must not fill the agent's log.
const MAX_MESSAGE_CHARS: usize = 200;

/// A failed conversation with the container runtime. None of these is fatal to the agent:
/// it keeps the API path and the default verdict (guard) for what it cannot classify.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The socket is missing, not a socket, or cannot be connected to.
    #[error("container runtime socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    /// The runtime did not answer `call` within the timeout.
    #[error("container runtime did not answer {call} within {}ms", timeout.as_millis())]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    /// The HTTP/2 connection could not be set up (the peer is not a gRPC server).
    #[error("container runtime at {}: connection failed: {message}", path.display())]
    Connect { path: PathBuf, message: String },
    /// The call failed: the runtime refused it, does not implement CRI v1 (`Unimplemented`),
    /// or answered with something that is not gRPC (the transport's error lands here).
    #[error("container runtime {call} failed: {code:?}: {message}")]
    Call {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    /// The answer decoded but lacks what every CRI runtime sends (e.g. a status without
    /// metadata).
    #[error("container runtime {call} answered without {missing}")]
    Malformed {
        call: &'static str,
        missing: &'static str,
    },
}

impl CriError {
    /// A short, bounded label for metrics and for logging each kind of failure once:
    /// `socket`, `timeout`, `connect`, `unimplemented`, `call` or `malformed`.
    pub fn kind(&self) -> &'static str {
        match self {
            CriError::Socket { .. } => "socket",
            CriError::Timeout { .. } => "timeout",
            CriError::Connect { .. } => "connect",
            CriError::Call {
                code: tonic::Code::Unimplemented,
                ..
            } => "unimplemented",
            CriError::Call { .. } => "call",
            CriError::Malformed { .. } => "malformed",
        }
    }

    pub(super) fn call(call: &'static str, status: &tonic::Status) -> CriError {
        // A transport failure says only "transport error" at the top; the cause is below.
        let mut message = status.message().to_owned();
        if let Some(source) = std::error::Error::source(status) {
            message.push_str(": ");
            message.push_str(&error_chain(source));
        }
        CriError::Call {
            call,
            code: status.code(),
            message: bounded(&message),
        }
    }
}

/// `text` cut to [`MAX_MESSAGE_CHARS`] characters, control characters replaced, so that
/// whatever a broken runtime sends stays one short log line.
pub(super) fn bounded(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_MESSAGE_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(MAX_MESSAGE_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// An error and its sources on one line (kube-rs's "client error (Connect)" alone does not
/// say that the server's certificate was refused; its sources do).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_and_flattens() {
        assert_eq!(bounded("a\nb\tc"), "a b c");
        let long = "x".repeat(5000);
        let cut = bounded(&long);
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(bounded(&"y".repeat(MAX_MESSAGE_CHARS)), "y".repeat(200));
    }

    #[test]
    fn kinds_are_distinct_per_failure() {
        let unimplemented = CriError::call("Version", &tonic::Status::unimplemented("no v1"));
        let refused = CriError::call("Version", &tonic::Status::unavailable("gone"));
        assert_eq!(unimplemented.kind(), "unimplemented");
        assert_eq!(refused.kind(), "call");
        let timeout = CriError::Timeout {
            call: "ListPodSandbox",
            timeout: Duration::from_millis(1500),
        };
        assert_eq!(timeout.kind(), "timeout");
        assert_eq!(
            timeout.to_string(),
            "container runtime did not answer ListPodSandbox within 1500ms"
        );
    }
}
