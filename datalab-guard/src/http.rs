//! The HTTP endpoints on the metrics address: `/metrics`, `/healthz`, `/readyz`.
//!
//! - `/metrics` answers in the OpenMetrics text format
//!   (`application/openmetrics-text; version=1.0.0`), the format prometheus-client writes;
//!   Prometheus asks for it by default. It is encoded on a blocking thread because the
//!   collector reads BPF maps with syscalls.
//! - `/healthz` is 200 `ok` while the process serves HTTP at all (liveness).
//! - `/readyz` is 200 `ready` once the caller says the programs are attached and the maps
//!   hold the current verdicts, else 503 with the reason (readiness).
//!
//! [`bind`] is separate from [`serve_listener`] so that a bad or busy address fails the command
//! before anything touches the kernel.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};

use crate::metrics::SnapshotFn;

/// Content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// What the endpoints report: readiness and the metrics registry.
#[derive(Debug)]
pub struct HttpState {
    ready: AtomicBool,
    /// Why the agent is (not) ready; `/readyz` shows it while not ready.
    reason: Mutex<String>,
    registry: Arc<Registry>,
}

impl HttpState {
    /// State with the standard registry ([`crate::metrics::registry`]) around `snapshot`.
    /// Starts not ready ("starting").
    pub fn new(snapshot: SnapshotFn) -> Self {
        HttpState::with_registry(crate::metrics::registry(snapshot))
    }

    /// State with a registry the caller built (e.g. with more metrics registered).
    pub fn with_registry(registry: Registry) -> Self {
        HttpState {
            ready: AtomicBool::new(false),
            reason: Mutex::new("starting".to_owned()),
            registry: Arc::new(registry),
        }
    }

    /// Sets readiness and why (shown by `/readyz` while not ready).
    pub fn set_ready(&self, ready: bool, reason: impl Into<String>) {
        // Reason first, so a reader that sees the new flag finds the new reason.
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.into();
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// `Ok(())` when ready, else the reason.
    pub fn readiness(&self) -> Result<(), String> {
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(self
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone())
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

/// Binds the metrics address; the error names it. The IPv6 wildcard `[::]` is bound
/// dual-stack (`IPV6_V6ONLY` off, whatever the host's `net.ipv6.bindv6only` says), so one
/// listener answers IPv4 and IPv6 probes and scrapes on any cluster (hostNetwork: the node's
/// addresses of both families).
/// A host booted without IPv6 (`ipv6.disable=1`) cannot create an IPv6 socket at all;
/// there `[::]` ("every address") falls back to `0.0.0.0`, every address it has.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    let bound = match bind_std(addr) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && no_ipv6(&e) => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::info!(%addr, fallback = %v4, "no IPv6 on this host; listening on IPv4 only");
            bind_std(v4)
        }
        other => other,
    };
    bound
        .and_then(TcpListener::from_std)
        .map_err(|source| HttpError::Bind { addr, source })
}

fn no_ipv6(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAFNOSUPPORT)
}

fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // What tokio's TcpListener::bind does too: a restarted agent can bind at once.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The routes, for embedding or tests.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds `addr` and serves until shutdown (see [`serve_listener`]).
pub async fn serve(
    addr: SocketAddr,
    state: Arc<HttpState>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), HttpError> {
    serve_listener(bind(addr).await?, state, shutdown).await;
    Ok(())
}

/// Serves on an already bound listener until `shutdown` turns true or its sender is
/// dropped; in-flight requests are finished first. Once bound, serving cannot fail: axum
/// retries failed accepts itself.
pub async fn serve_listener(
    listener: TcpListener,
    state: Arc<HttpState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let signal = async move {
        // Err means the sender is gone: nobody can ask any more, so stop too.
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    // axum 0.8's serve future only ever resolves to Ok(()) (after the signal).
    let _ = axum::serve(listener, router(state))
        .with_graceful_shutdown(signal)
        .await;
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let registry = Arc::clone(&state.registry);
    match tokio::task::spawn_blocking(move || crate::metrics::encode(&registry)).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Ok(Err(_)) | Err(_) => {
            tracing::error!("encoding /metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed to encode metrics\n",
            )
                .into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    match state.readiness() {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;
    use crate::metrics::Snapshot;

    /// One HTTP/1.1 GET over a fresh connection; returns (status line, headers, body).
    async fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (
            status.to_owned(),
            headers.to_ascii_lowercase(),
            body.to_owned(),
        )
    }

    /// `--metrics-addr=[::]:9090` (the DaemonSet's) answers IPv4 clients too.
    #[tokio::test]
    async fn ipv6_wildcard_listener_answers_ipv4_clients() {
        let state = Arc::new(HttpState::new(Arc::new(|| Ok(Snapshot::default()))));
        let listener = bind("[::]:0".parse().unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve_listener(listener, state, stopped));
        for client in ["127.0.0.1", "[::1]"] {
            let (status, _, body) =
                get(format!("{client}:{port}").parse().unwrap(), "/healthz").await;
            assert_eq!(
                (status.as_str(), body.as_str()),
                ("HTTP/1.1 200 OK", "ok\n"),
                "{client}"
            );
        }
        // An explicit family stays that family.
        let v4 = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert!(v4.local_addr().unwrap().is_ipv4());
        let _ = stop.send(true);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let state = Arc::new(HttpState::new(Arc::new(|| {
            Ok(Snapshot {
                verdict_entries: 3,
                verdict_capacity: 8,
                namespaces: Vec::new(),
                ..Snapshot::default()
            })
        })));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve_listener(listener, Arc::clone(&state), stopped));

        let (status, headers, body) = get(addr, "/healthz").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "ok\n");
        assert!(headers.contains("content-type: text/plain"), "{headers}");

        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(body, "not ready: starting\n");

        state.set_ready(false, "programs not attached");
        assert_eq!(
            get(addr, "/readyz").await.2,
            "not ready: programs not attached\n"
        );

        state.set_ready(true, "attached");
        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "ready\n");

        let (status, headers, body) = get(addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers.contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")),
            "{headers}"
        );
        assert!(
            body.contains("\ndatalab_guard_verdict_map_entries 3\n"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"));

        assert_eq!(get(addr, "/nope").await.0, "HTTP/1.1 404 Not Found");

        stop.send(true).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_shutdown_sender_stops_the_server() {
        let state = Arc::new(HttpState::new(Arc::new(|| Ok(Snapshot::default()))));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve_listener(listener, state, stopped));
        drop(stop);
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("server stops")
            .unwrap();
    }

    #[tokio::test]
    async fn a_busy_address_is_a_clear_error() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = first.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("cannot listen on {addr}: ")),
            "{message}"
        );
        assert!(
            matches!(err, HttpError::Bind { source, .. } if source.kind() == io::ErrorKind::AddrInUse)
        );
    }
}
