//! API errors and the `Status` objects the real API server answers them with.

use serde_json::{json, Value};

use super::resources::Kind;

/// An error response: HTTP status `code` with a `meta.k8s.io/v1` `Status` body.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

fn details(kind: Kind, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind.plural()});
    if !kind.group().is_empty() {
        d["group"] = json!(kind.group());
    }
    d
}

/// The `reason` the real API server uses for a status code.
pub(crate) fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

impl ApiError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason_for(code),
            message: message.into(),
            details: None,
        }
    }

    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }

    pub fn not_found(kind: Kind, name: &str) -> Self {
        Self {
            details: Some(details(kind, name)),
            ..Self::new(
                404,
                format!("{} \"{name}\" not found", kind.group_resource()),
            )
        }
    }

    pub fn path_not_found() -> Self {
        Self {
            details: Some(
                json!({"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]}),
            ),
            ..Self::new(404, "the server could not find the requested resource")
        }
    }

    pub fn already_exists(kind: Kind, name: &str) -> Self {
        Self {
            reason: "AlreadyExists",
            details: Some(details(kind, name)),
            ..Self::new(
                409,
                format!("{} \"{name}\" already exists", kind.group_resource()),
            )
        }
    }

    /// Optimistic-concurrency failure (stale `resourceVersion`, failed precondition).
    pub fn conflict_modified(kind: Kind, name: &str) -> Self {
        Self {
            details: Some(details(kind, name)),
            ..Self::new(
                409,
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    kind.group_resource()
                ),
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    pub fn invalid(kind: Kind, name: &str, field: &str, message: &str) -> Self {
        Self {
            details: Some({
                let mut d = details(kind, name);
                d["kind"] = json!(kind.kind_name());
                d["causes"] =
                    json!([{"reason": "FieldValueInvalid", "message": message, "field": field}]);
                d
            }),
            ..Self::new(
                422,
                format!(
                    "{} \"{name}\" is invalid: {field}: {message}",
                    kind.kind_name()
                ),
            )
        }
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, message)
    }

    /// A resourceVersion the server has not reached (the real one waits ~3 s first).
    pub fn too_large(rv: u64, current: u64) -> Self {
        Self {
            reason: "Timeout",
            details: Some(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            })),
            ..Self::new(
                504,
                format!("Too large resource version: {rv}, current: {current}"),
            )
        }
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(415, format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// Server-side apply conflicts: one cause per field, like the real API server.
    pub fn apply_conflict(kind: Kind, name: &str, conflicts: &[(String, String)]) -> Self {
        let api_version = kind.api_version();
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(field, manager)| {
                json!({
                    "reason": "FieldManagerConflict",
                    "message": format!("conflict with \"{manager}\" using {api_version}"),
                    "field": field,
                })
            })
            .collect();
        let lines: Vec<String> = conflicts
            .iter()
            .map(|(field, manager)| {
                format!("- conflict with \"{manager}\" using {api_version}: {field}")
            })
            .collect();
        let n = conflicts.len();
        let plural = if n == 1 { "conflict" } else { "conflicts" };
        Self {
            details: Some({
                let mut d = details(kind, name);
                d["causes"] = json!(causes);
                d
            }),
            ..Self::new(
                409,
                format!("Apply failed with {n} {plural}:\n{}", lines.join("\n")),
            )
        }
    }
}

/// The `Status` a real API server returns for a successful immediate DELETE.
pub(crate) fn success_status(kind: Kind, name: &str, uid: Option<&str>) -> Value {
    let mut d = details(kind, name);
    if let Some(uid) = uid {
        d["uid"] = json!(uid);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": d,
    })
}
