//! What each client cost the fixture, over time: one [`TrafficEntry`] per answered request
//! with the time it arrived and the bytes of its response body, watch streams included
//! (counted as their events are sent, so a stream open for minutes keeps adding).
//!
//! The request log ([`super::RequestLog`]) says *what* was asked; this says *when* and *how
//! much*, so a benchmark can compute writes per second or bytes per minute in a time window
//! (e.g. a node agent's steady state) without the fixture's own work in the number.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use http::Response;
use http_body_util::BodyExt as _;
use hyper::body::Body as _;

use super::{lock, Body, FakeApiServer, RequestLog};

/// One answered request.
#[derive(Clone, Debug)]
pub struct TrafficEntry {
    /// When the request arrived (before any injected latency).
    pub at: Instant,
    /// The user agent's first word, e.g. `datalab-guard-node`.
    pub client: String,
    pub method: String,
    /// The Kubernetes verb (see [`RequestLog::verb`]); empty for discovery and health.
    pub verb: String,
    pub resource: Option<String>,
    pub status: u16,
    /// Response body bytes sent so far (final once the response has ended).
    bytes: Arc<AtomicU64>,
}

impl TrafficEntry {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// POST, PUT, PATCH or DELETE.
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }

    /// Sent by `datalab-guard-<component>` (`node` or `controller`).
    pub fn sent_by(&self, component: &str) -> bool {
        self.client == format!("datalab-guard-{component}")
    }
}

/// Every request's entry, oldest first.
#[derive(Default)]
pub(crate) struct Traffic {
    entries: Mutex<Vec<TrafficEntry>>,
}

impl Traffic {
    /// Records the request of `log` (arrived at `at`) and returns `resp` with its body
    /// counted as it is sent.
    pub fn record(&self, at: Instant, log: &RequestLog, resp: Response<Body>) -> Response<Body> {
        let bytes = Arc::new(AtomicU64::new(0));
        lock(&self.entries).push(TrafficEntry {
            at,
            client: log
                .user_agent
                .as_deref()
                .and_then(|ua| ua.split('/').next())
                .unwrap_or_default()
                .to_owned(),
            method: log.method.clone(),
            verb: log.verb.clone(),
            resource: log.resource.clone(),
            status: log.status,
            bytes: bytes.clone(),
        });
        resp.map(|body| {
            if let Some(n) = body.size_hint().exact() {
                // A whole body (every response but a watch stream): counted now and left as
                // it is, so that it keeps its Content-Length (a real API server sends one).
                bytes.fetch_add(n, Ordering::Relaxed);
                return body;
            }
            body.map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                frame
            })
            .boxed()
        })
    }

    pub fn entries(&self) -> Vec<TrafficEntry> {
        lock(&self.entries).clone()
    }
}

impl FakeApiServer {
    /// Every answered request with its arrival time and response bytes, oldest first.
    pub fn traffic(&self) -> Vec<TrafficEntry> {
        self.shared.traffic.entries()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_request_is_recorded_with_its_response_bytes() {
        let api = FakeApiServer::start();
        // A plain GET without a token: this test is about the traffic log, not about
        // authentication.
        api.insecure_port_admin();
        let before = Instant::now();
        let resp = crate::http_get(api.addr(), "/api/v1/namespaces", Duration::from_secs(5))
            .expect("list namespaces");
        assert_eq!(resp.status, 200);
        let traffic = api.traffic();
        assert_eq!(traffic.len(), 1, "{traffic:?}");
        let entry = &traffic[0];
        assert!(entry.at >= before);
        assert_eq!(
            (entry.method.as_str(), entry.verb.as_str()),
            ("GET", "list")
        );
        assert_eq!(entry.resource.as_deref(), Some("namespaces"));
        assert_eq!(entry.status, 200);
        assert!(!entry.is_write());
        assert_eq!(entry.bytes(), resp.body.len() as u64);
    }
}
