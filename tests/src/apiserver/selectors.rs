//! Label and field selectors with the API server's syntax and semantics.
//!
//! Label selectors: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k` (exists) and
//! `!k` (does not exist), comma separated (AND). `!=` and `notin` also match objects without
//! the label, as on a real API server. Field selectors: `f=v`, `f==v`, `f!=v` over the
//! fields the real API server supports for each type; an unsupported field is a 400, as there.

use serde_json::Value;

use super::resources::Kind;

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: LabelOp,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for term in split_top_level(s) {
            let term = term.trim();
            if term.is_empty() {
                return Err(format!("unable to parse requirement: empty term in {s:?}"));
            }
            let req = if let Some(key) = term.strip_prefix('!') {
                Requirement {
                    key: key.trim().to_string(),
                    op: LabelOp::NotExists,
                }
            } else if let Some(open) = term.find('(') {
                let Some(inner) = term[open + 1..].strip_suffix(')') else {
                    return Err(format!(
                        "unable to parse requirement: missing ')' in {term:?}"
                    ));
                };
                let head: Vec<&str> = term[..open].split_whitespace().collect();
                let [key, op] = head.as_slice() else {
                    return Err(format!("unable to parse requirement: {term:?}"));
                };
                let values: Vec<String> = inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect();
                if values.is_empty() {
                    return Err(format!(
                        "for 'in', 'notin' operators, values set can't be empty: {term:?}"
                    ));
                }
                if let Some(bad) = values.iter().find(|v| !valid_value(v)) {
                    return Err(format!("invalid label value: {bad:?}"));
                }
                let op = match *op {
                    "in" => LabelOp::In(values),
                    "notin" => LabelOp::NotIn(values),
                    other => {
                        return Err(format!(
                            "unable to parse requirement: unknown operator {other:?}"
                        ))
                    }
                };
                Requirement {
                    key: key.to_string(),
                    op,
                }
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement {
                    key: k.trim().to_string(),
                    op: LabelOp::NotEq(v.trim().to_string()),
                }
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement {
                    key: k.trim().to_string(),
                    op: LabelOp::Eq(v.trim().to_string()),
                }
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement {
                    key: k.trim().to_string(),
                    op: LabelOp::Eq(v.trim().to_string()),
                }
            } else if term.contains(['<', '>']) {
                return Err(format!(
                    "unable to parse requirement: operators '<'/'>' are not supported by the fixture: {term:?}"
                ));
            } else {
                Requirement {
                    key: term.to_string(),
                    op: LabelOp::Exists,
                }
            };
            if !valid_key(&req.key) {
                return Err(format!("invalid label key {:?}", req.key));
            }
            if let LabelOp::Eq(v) | LabelOp::NotEq(v) = &req.op {
                if !valid_value(v) {
                    return Err(format!("invalid label value: {v:?}"));
                }
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Matches an object's `metadata.labels`.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match &r.op {
            LabelOp::Eq(v) => label(&r.key) == Some(v.as_str()),
            LabelOp::NotEq(v) => label(&r.key) != Some(v.as_str()),
            LabelOp::In(vs) => label(&r.key).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelOp::NotIn(vs) => !label(&r.key).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelOp::Exists => label(&r.key).is_some(),
            LabelOp::NotExists => label(&r.key).is_none(),
        })
    }
}

/// A parsed field selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Splits on commas not escaped with a backslash, and unescapes `\,`, `\=` and `\\`.
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                cur.push('\\');
                cur.push(n);
            }
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The field labels the real API server supports for each type (besides `metadata.name` and
/// `metadata.namespace`, which every type supports).
fn supported_fields(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Pod => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        ],
        Kind::Namespace => &["status.phase"],
        Kind::Node => &["spec.unschedulable"],
        Kind::Event | Kind::EventV1 => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingComponent",
            "reportingController",
            "source",
            "type",
        ],
        Kind::Lease | Kind::NetworkPolicy => &[],
    }
}

/// The string value the API server compares for a field label.
fn field_value(kind: Kind, obj: &Value, field: &str) -> String {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let b = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .to_string()
    };
    match field {
        "metadata.name" => s("/metadata/name"),
        "metadata.namespace" => s("/metadata/namespace"),
        "spec.hostNetwork" => b("/spec/hostNetwork"),
        "spec.unschedulable" => b("/spec/unschedulable"),
        "status.podIPs" => obj
            .pointer("/status/podIPs")
            .and_then(Value::as_array)
            .map(|ips| {
                ips.iter()
                    .filter_map(|ip| ip.get("ip").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        f if kind == Kind::EventV1 && f.starts_with("involvedObject.") => {
            let rest = &f["involvedObject.".len()..];
            s(&format!("/regarding/{rest}"))
        }
        f if kind == Kind::Event && f.starts_with("regarding.") => {
            let rest = &f["regarding.".len()..];
            s(&format!("/involvedObject/{rest}"))
        }
        "source" => obj
            .pointer("/source/component")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        f => s(&format!("/{}", f.replace('.', "/"))),
    }
}

impl FieldSelector {
    pub fn parse(s: &str, kind: Kind) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for term in split_escaped(s, ',') {
            let term = term.trim();
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            if field != "metadata.name"
                && field != "metadata.namespace"
                && !supported_fields(kind).contains(&field)
            {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push((field.to_string(), eq, unescape(value.trim())));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, kind: Kind, obj: &Value) -> bool {
        self.0
            .iter()
            .all(|(field, eq, value)| (field_value(kind, obj, field) == *value) == *eq)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "x", "labels": labels}})
    }

    #[test]
    fn label_selector_operators() {
        let o = obj(json!({"env": "prod", "tier": "web"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("env=prod"));
        assert!(m("env==prod,tier=web"));
        assert!(!m("env!=prod"));
        assert!(m("missing!=x"));
        assert!(m("env in (dev, prod)"));
        assert!(!m("env notin (dev,prod)"));
        assert!(m("missing notin (a)"));
        assert!(!m("missing in (a)"));
        assert!(m("env"));
        assert!(!m("!env"));
        assert!(m("!missing"));
        assert!(m("tier in (web),env"));
        assert!(LabelSelector::parse("env in (").is_err());
        assert!(LabelSelector::parse("a=b,,c").is_err());
        assert!(LabelSelector::parse("a foo (b)").is_err());
    }

    #[test]
    fn field_selector_pods() {
        let pod = json!({"metadata": {"name": "p", "namespace": "n"},
                         "spec": {"nodeName": "node-1"}, "status": {"phase": "Running"}});
        let m = |s: &str| {
            FieldSelector::parse(s, Kind::Pod)
                .unwrap()
                .matches(Kind::Pod, &pod)
        };
        assert!(m("spec.nodeName=node-1"));
        assert!(!m("spec.nodeName=node-2"));
        assert!(m("spec.nodeName!=node-2,metadata.namespace=n"));
        assert!(m("spec.hostNetwork=false"));
        assert!(m("status.phase==Running"));
        assert!(FieldSelector::parse("spec.bogus=1", Kind::Pod).is_err());
        assert!(FieldSelector::parse("spec.nodeName=x", Kind::Namespace).is_err());
    }
}
