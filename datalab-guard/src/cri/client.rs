//! [`RuntimeClient`]: read-only CRI v1 calls over the runtime's unix socket, each bounded by
//! a timeout.

use std::{
    future::Future,
    io,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::{stream, StreamExt as _, TryStreamExt as _};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ListPodSandboxRequest, PodSandboxFilter,
    PodSandboxStatusRequest, VersionRequest,
};
use tokio::{net::UnixStream, time::Instant};
use tonic::transport::{Channel, Endpoint, Uri};

use super::{
    error::{bounded, error_chain},
    sandbox::current_sandbox,
    CriError, SandboxInfo, MAX_MESSAGE_BYTES, MAX_SANDBOXES, POD_UID_LABEL, STATUS_CONCURRENCY,
};
use crate::cgroups::pod::is_valid_uid;

/// The CRI API version this client speaks.
const CRI_API_VERSION: &str = "v1";
/// First and longest pause between lookups in [`RuntimeClient::wait_pod_of_cgroup`].
const WAIT_FIRST_PAUSE: Duration = Duration::from_millis(10);
const WAIT_MAX_PAUSE: Duration = Duration::from_millis(200);

/// What the runtime says it is (`Version`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// e.g. `containerd`, `cri-o`.
    pub runtime_name: String,
    pub runtime_version: String,
    /// The CRI API version it serves (`v1`).
    pub runtime_api_version: String,
}

/// A connection to the node's container runtime. Cheap to clone (clones share one HTTP/2
/// connection, which is re-established on the next call after the runtime restarts).
#[derive(Clone, Debug)]
pub struct RuntimeClient {
    service: RuntimeServiceClient<Channel>,
    socket: PathBuf,
    timeout: Duration,
    version: RuntimeVersion,
}

impl RuntimeClient {
    /// Connects to the CRI socket at `socket` and checks, with a `Version` call, that a CRI
    /// v1 runtime answers there. `timeout` bounds the connect and every later call.
    ///
    /// Errors: [`CriError::Socket`] if the path is missing or not a socket, `Connect` or
    /// `Call` if what answers is not a CRI v1 gRPC server, `Timeout` if it does not answer.
    pub async fn connect(socket: impl Into<PathBuf>, timeout: Duration) -> Result<Self, CriError> {
        let socket = socket.into();
        let socket_error = |source| CriError::Socket {
            path: socket.clone(),
            source,
        };
        // Checked first so that "no runtime here" is its own error, not a transport message
        // (one stat: no need for a blocking-pool round trip).
        let meta = std::fs::metadata(&socket).map_err(socket_error)?;
        if !meta.file_type().is_socket() {
            return Err(socket_error(io::Error::other("not a unix socket")));
        }
        let path = socket.clone();
        // The URI is required by tonic but unused: the connector below ignores it.
        let endpoint = Endpoint::from_static("http://cri.invalid")
            .connect_timeout(timeout)
            .timeout(timeout);
        let connecting = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }));
        let channel = with_timeout("connect", timeout, connecting)
            .await?
            .map_err(|e| CriError::Connect {
                path: socket.clone(),
                message: bounded(&error_chain(&e)),
            })?;
        let mut service =
            RuntimeServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let version = call(
            "Version",
            timeout,
            service.version(VersionRequest {
                version: CRI_API_VERSION.to_owned(),
            }),
        )
        .await?;
        Ok(RuntimeClient {
            service,
            socket,
            timeout,
            version: RuntimeVersion {
                runtime_name: bounded(&version.runtime_name),
                runtime_version: bounded(&version.runtime_version),
                runtime_api_version: bounded(&version.runtime_api_version),
            },
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the runtime reported at connect time.
    pub fn version(&self) -> &RuntimeVersion {
        &self.version
    }

    /// The pod whose cgroup is `pod<pod_uid>` (the uid as parsed from the cgroup directory
    /// name, e.g. by `cgroups::pod::parse_pod_dir_name`): its current sandbox, or `None` if the
    /// runtime has no sandbox for that uid (yet: see the module docs), or if `pod_uid` cannot
    /// be a pod uid at all.
    ///
    /// Two calls: `ListPodSandbox` filtered by the `io.kubernetes.pod.uid` label, then
    /// `PodSandboxStatus` of the current sandbox (for hostNetwork, which listings lack).
    pub async fn pod_of_cgroup(&self, pod_uid: &str) -> Result<Option<SandboxInfo>, CriError> {
        if !is_valid_uid(pod_uid) {
            return Ok(None);
        }
        let filter = PodSandboxFilter {
            label_selector: [(POD_UID_LABEL.to_owned(), pod_uid.to_owned())].into(),
            ..Default::default()
        };
        let listed = self.list(Some(filter)).await?;
        let Some(current) = current_sandbox(&listed, pod_uid) else {
            return Ok(None);
        };
        self.sandbox_status(&current.id).await
    }

    /// [`pod_of_cgroup`](Self::pod_of_cgroup), asked again with growing pauses (10 ms up to
    /// 200 ms) until the runtime knows the pod or `within` has passed: for a pod cgroup that
    /// has just appeared, whose sandbox the runtime lists only once it runs. Errors end the
    /// wait at once.
    pub async fn wait_pod_of_cgroup(
        &self,
        pod_uid: &str,
        within: Duration,
    ) -> Result<Option<SandboxInfo>, CriError> {
        let deadline = Instant::now() + within;
        let mut pause = WAIT_FIRST_PAUSE;
        loop {
            if let Some(found) = self.pod_of_cgroup(pod_uid).await? {
                return Ok(Some(found));
            }
            let now = Instant::now();
            if now >= deadline || !is_valid_uid(pod_uid) {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(WAIT_MAX_PAUSE);
        }
    }

    /// Every sandbox the runtime has (ready and stopped; at most [`MAX_SANDBOXES`]), with
    /// its status: for the startup scan, before the API server answers. A sandbox removed
    /// between the listing and its status is left out. Up to [`STATUS_CONCURRENCY`] status
    /// calls run at once, each bounded by the timeout.
    pub async fn list_sandboxes(&self) -> Result<Vec<SandboxInfo>, CriError> {
        let mut listed = self.list(None).await?;
        listed.truncate(MAX_SANDBOXES);
        let found: Vec<Option<SandboxInfo>> = stream::iter(listed)
            .map(|s| async move { self.sandbox_status(&s.id).await })
            .buffer_unordered(STATUS_CONCURRENCY)
            .try_collect()
            .await?;
        let mut sandboxes: Vec<SandboxInfo> = found.into_iter().flatten().collect();
        sandboxes.sort_by(|a, b| {
            (&a.namespace, &a.name, a.created_at_ns).cmp(&(&b.namespace, &b.name, b.created_at_ns))
        });
        Ok(sandboxes)
    }

    /// `PodSandboxStatus` of sandbox `id`; `None` if the runtime no longer has it.
    pub async fn sandbox_status(&self, id: &str) -> Result<Option<SandboxInfo>, CriError> {
        let mut service = self.service.clone();
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        };
        let answer = match call(
            "PodSandboxStatus",
            self.timeout,
            service.pod_sandbox_status(request),
        )
        .await
        {
            Err(CriError::Call {
                code: tonic::Code::NotFound,
                ..
            }) => return Ok(None),
            other => other?,
        };
        let status = answer.status.ok_or(CriError::Malformed {
            call: "PodSandboxStatus",
            missing: "a status",
        })?;
        SandboxInfo::from_status(status).map(Some)
    }

    async fn list(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> Result<Vec<k8s_cri::v1::PodSandbox>, CriError> {
        let mut service = self.service.clone();
        let answer = call(
            "ListPodSandbox",
            self.timeout,
            service.list_pod_sandbox(ListPodSandboxRequest { filter }),
        )
        .await?;
        Ok(answer.items)
    }
}

/// Runs one gRPC call with a hard deadline (on top of tonic's own `grpc-timeout`, which a
/// peer that never answers at the HTTP/2 level would not honour).
async fn call<T>(
    name: &'static str,
    timeout: Duration,
    request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CriError> {
    match with_timeout(name, timeout, request).await? {
        Ok(response) => Ok(response.into_inner()),
        Err(status) if status.code() == tonic::Code::Cancelled && is_deadline(&status) => {
            Err(CriError::Timeout {
                call: name,
                timeout,
            })
        }
        Err(status) => Err(CriError::call(name, &status)),
    }
}

async fn with_timeout<T>(
    name: &'static str,
    timeout: Duration,
    work: impl Future<Output = T>,
) -> Result<T, CriError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| CriError::Timeout {
            call: name,
            timeout,
        })
}

/// tonic reports its own request timeout as `Cancelled` "Timeout expired".
fn is_deadline(status: &tonic::Status) -> bool {
    status.message().to_ascii_lowercase().contains("timeout")
}

#[cfg(test)]
mod tests {
    //! Failures that need no runtime; a real containerd is exercised by the privileged
    //! `tests/tests/cri_runtime.rs`.

    use std::time::Instant as StdInstant;

    use tokio::{io::AsyncWriteExt as _, net::UnixListener};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(300);

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dg-cri-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn missing_socket_is_a_socket_error() {
        let dir = scratch("missing");
        let err = RuntimeClient::connect(dir.join("nope.sock"), TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "socket", "{err}");
        assert!(err.to_string().contains("nope.sock"), "{err}");
        std::fs::write(dir.join("file"), "").unwrap();
        let err = RuntimeClient::connect(dir.join("file"), TIMEOUT)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a unix socket"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A peer that writes junk and hangs up is an error well within the timeout; a peer
    /// that accepts and never answers is a timeout, not a stall.
    #[tokio::test]
    async fn garbage_and_silent_peers_fail_within_the_timeout() {
        let dir = scratch("peers");
        for (name, junk) in [
            (
                "junk",
                Some(b"HTTP/1.1 400 nope\r\n\r\n\x00\xff".as_slice()),
            ),
            ("silent", None),
        ] {
            let path = dir.join(format!("{name}.sock"));
            let listener = UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((mut conn, _)) = listener.accept().await {
                    match junk {
                        Some(bytes) => {
                            let _ = conn.write_all(bytes).await;
                        }
                        None => held.push(conn),
                    }
                }
            });
            let started = StdInstant::now();
            let err = RuntimeClient::connect(&path, TIMEOUT).await.unwrap_err();
            let took = started.elapsed();
            eprintln!("{name} peer: {err} (after {took:?})");
            assert!(
                took < TIMEOUT + Duration::from_millis(200),
                "{name}: {took:?}"
            );
            match junk {
                Some(_) => assert_ne!(err.kind(), "socket", "{name}: {err}"),
                None => assert_eq!(err.kind(), "timeout", "{name}: {err}"),
            }
            server.abort();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
