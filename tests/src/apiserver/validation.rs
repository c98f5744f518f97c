//! Validation the real API server does on what a client writes, where our agent writes it:
//! Events. An Event missing a field its API group requires is `422 Invalid`, with one
//! `FieldValueRequired` cause per missing field, as `ValidateEventCreate`/`Update` answer:
//!
//! - `events.k8s.io/v1`: `eventTime`, `reportingController`, `reportingInstance`, `action`,
//!   `reason` and `regarding` (its `kind` and `name`) are required, and `type` is `Normal`
//!   or `Warning`;
//! - core/v1: `involvedObject` (its `kind` and `name`) is required; an Event with an
//!   `eventTime` (the new-style fields) also needs `reportingController` and
//!   `reportingInstance`.
//!
//! A fixture that accepted either group's reference in either group would pass an agent
//! whose Events a real cluster rejects.

use serde_json::{json, Value};

use super::{resources::Kind, status::ApiError};

/// Checks `obj` (the object as it will be stored) before a client's create or update.
pub(crate) fn validate(kind: Kind, obj: &Value) -> Result<(), ApiError> {
    let missing = match kind {
        Kind::EventV1 => missing_v1_event_fields(obj),
        Kind::Event => missing_core_event_fields(obj),
        _ => return Ok(()),
    };
    let mut causes: Vec<Value> = missing
        .iter()
        .map(|field| {
            json!({"reason": "FieldValueRequired", "message": "Required value", "field": field})
        })
        .collect();
    let mut messages: Vec<String> = missing
        .iter()
        .map(|f| format!("{f}: Required value"))
        .collect();
    if kind == Kind::EventV1 {
        let ty = obj.get("type").and_then(Value::as_str).unwrap_or("");
        if ty != "Normal" && ty != "Warning" {
            causes.push(json!({"reason": "FieldValueNotSupported", "message": "Unsupported value", "field": "type"}));
            messages.push(format!(
                "type: Unsupported value: {ty:?}: supported values: \"Normal\", \"Warning\""
            ));
        }
    }
    if causes.is_empty() {
        return Ok(());
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let group = if kind.group().is_empty() {
        String::new()
    } else {
        format!(".{}", kind.group())
    };
    Err(ApiError {
        details: Some(json!({
            "name": name,
            "group": kind.group(),
            "kind": kind.kind_name(),
            "causes": causes,
        })),
        ..ApiError::new(
            422,
            format!(
                "{}{group} \"{name}\" is invalid: [{}]",
                kind.kind_name(),
                messages.join(", ")
            ),
        )
    })
}

fn is_blank(obj: &Value, pointer: &str) -> bool {
    obj.pointer(pointer)
        .is_none_or(|v| v.is_null() || v.as_str().is_some_and(str::is_empty))
}

fn missing_v1_event_fields(obj: &Value) -> Vec<&'static str> {
    let mut missing = Vec::new();
    for (pointer, field) in [
        ("/eventTime", "eventTime"),
        ("/reportingController", "reportingController"),
        ("/reportingInstance", "reportingInstance"),
        ("/action", "action"),
        ("/reason", "reason"),
        ("/regarding/kind", "regarding.kind"),
        ("/regarding/name", "regarding.name"),
    ] {
        if is_blank(obj, pointer) {
            missing.push(field);
        }
    }
    missing
}

fn missing_core_event_fields(obj: &Value) -> Vec<&'static str> {
    let mut missing = Vec::new();
    for (pointer, field) in [
        ("/involvedObject/kind", "involvedObject.kind"),
        ("/involvedObject/name", "involvedObject.name"),
    ] {
        if is_blank(obj, pointer) {
            missing.push(field);
        }
    }
    if !is_blank(obj, "/eventTime") {
        for (pointer, field) in [
            ("/reportingComponent", "reportingComponent"),
            ("/reportingInstance", "reportingInstance"),
        ] {
            if is_blank(obj, pointer) {
                missing.push(field);
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_event() -> Value {
        json!({
            "metadata": {"name": "e1", "namespace": "a"},
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "reportingController": "datalab.io/guard",
            "reportingInstance": "guard-node-1",
            "action": "Block",
            "reason": "MetadataBlocked",
            "type": "Warning",
            "regarding": {"kind": "Pod", "name": "p", "namespace": "a"},
        })
    }

    #[test]
    fn each_required_v1_field_is_checked() {
        assert!(validate(Kind::EventV1, &v1_event()).is_ok());
        for field in [
            "eventTime",
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
            "regarding",
        ] {
            let mut e = v1_event();
            e.as_object_mut().unwrap().remove(field);
            let err = validate(Kind::EventV1, &e).unwrap_err();
            assert_eq!((err.code, err.reason), (422, "Invalid"), "{field}");
            assert!(err.message.contains(field), "{field}: {}", err.message);
        }
        // The core/v1 reference does not stand in for `regarding`.
        let mut e = v1_event();
        let r = e.as_object_mut().unwrap().remove("regarding").unwrap();
        e["involvedObject"] = r;
        assert!(validate(Kind::EventV1, &e).is_err());
        let mut e = v1_event();
        e["type"] = json!("Bad");
        assert!(validate(Kind::EventV1, &e).is_err());
    }

    #[test]
    fn core_events_need_involved_object() {
        let ok = json!({"metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "name": "p"}, "reason": "X"});
        assert!(validate(Kind::Event, &ok).is_ok());
        let bad = json!({"metadata": {"name": "e"}, "regarding": {"kind": "Pod", "name": "p"}});
        let err = validate(Kind::Event, &bad).unwrap_err();
        assert!(err.message.contains("involvedObject"), "{}", err.message);
        let new_style = json!({"metadata": {"name": "e"}, "involvedObject": {"kind": "Pod", "name": "p"}, "eventTime": "2026-01-01T00:00:00Z"});
        assert!(validate(Kind::Event, &new_style).is_err());
    }
}
