//! Server-side apply, field ownership (`metadata.managedFields`) and the other patch types.
//!
//! Field ownership is tracked at this granularity (a simplification of the real structured
//! merge, see the module docs of [`super`]):
//! - each key of `metadata.labels` and `metadata.annotations` is its own field;
//! - other user-settable metadata (`ownerReferences`, `finalizers`) is one atomic field each;
//! - each key directly under a top-level object (`spec.podSelector`, `spec.egress`,
//!   `spec.holderIdentity`, ...) is one atomic field, whatever it holds; a top-level scalar or
//!   list (`reason`, `note`, ...) is one atomic field.
//!
//! For NetworkPolicy this is exactly the real behaviour at the top of `spec`: `podSelector` is
//! an atomic struct and `ingress`, `egress` and `policyTypes` are atomic lists.
//! `status` is never owned through the main resource.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

/// A field path, e.g. `["spec", "egress"]` or `["metadata", "labels", "app"]`.
pub(crate) type FieldPath = Vec<String>;

/// Metadata keys set by the server or identifying the object: never owned.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The owned fields present in `obj`.
pub(crate) fn field_set(obj: &Value) -> BTreeSet<FieldPath> {
    let mut set = BTreeSet::new();
    let Some(map) = obj.as_object() else {
        return set;
    };
    for (top, value) in map {
        match top.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                let Some(meta) = value.as_object() else {
                    continue;
                };
                for (k, v) in meta {
                    if SERVER_METADATA.contains(&k.as_str()) || v.is_null() {
                        continue;
                    }
                    if k == "labels" || k == "annotations" {
                        if let Some(m) = v.as_object() {
                            for key in m.keys() {
                                set.insert(vec!["metadata".into(), k.clone(), key.clone()]);
                            }
                        }
                    } else {
                        set.insert(vec!["metadata".into(), k.clone()]);
                    }
                }
            }
            _ => match value {
                Value::Object(inner) => {
                    for (k, v) in inner {
                        if !v.is_null() {
                            set.insert(vec![top.clone(), k.clone()]);
                        }
                    }
                }
                Value::Null => {}
                _ => {
                    set.insert(vec![top.clone()]);
                }
            },
        }
    }
    set
}

pub(crate) fn get_path<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path {
        cur = cur.as_object()?.get(seg)?;
    }
    Some(cur)
}

fn set_path(obj: &mut Value, path: &[String], value: Value) {
    let mut cur = obj;
    for seg in &path[..path.len() - 1] {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(m) = cur else { return };
        cur = m
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !cur.is_object() {
        *cur = Value::Object(Map::new());
    }
    if let Value::Object(m) = cur {
        m.insert(path[path.len() - 1].clone(), value);
    }
}

fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for seg in parents {
        match cur.as_object_mut().and_then(|m| m.get_mut(seg)) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// `.spec.egress`, `.metadata.labels.app` — how the API server prints a field in conflicts.
pub(crate) fn path_string(path: &[String]) -> String {
    path.iter().map(|s| format!(".{s}")).collect()
}

/// One `metadata.managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ManagedEntry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub fields: BTreeSet<FieldPath>,
}

fn encode_fields(fields: &BTreeSet<FieldPath>) -> Value {
    let mut root = Value::Object(Map::new());
    for path in fields {
        let prefixed: Vec<String> = path.iter().map(|s| format!("f:{s}")).collect();
        set_path(&mut root, &prefixed, json!({}));
    }
    root
}

fn decode_fields(v: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    let Some(m) = v.as_object() else { return };
    let children: Vec<_> = m.iter().filter(|(k, _)| k.starts_with("f:")).collect();
    if children.is_empty() {
        if !prefix.is_empty() {
            out.insert(prefix.clone());
        }
        return;
    }
    for (k, child) in children {
        prefix.push(k[2..].to_string());
        decode_fields(child, prefix, out);
        prefix.pop();
    }
}

pub(crate) fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let mut fields = BTreeSet::new();
            if let Some(f) = e.get("fieldsV1") {
                decode_fields(f, &mut Vec::new(), &mut fields);
            }
            ManagedEntry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                time: s("time"),
                fields,
            }
        })
        .collect()
}

pub(crate) fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": encode_fields(&e.fields),
            })
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// A field another manager owns with a different value: `(".spec.egress", "kubectl")`.
pub(crate) type Conflicts = Vec<(String, String)>;

/// Server-side apply of `patch` by `manager` onto `current` (None: the object is created).
///
/// Returns the new object with its `managedFields` updated, or the conflicts when another
/// manager owns a field the patch sets to a different value and `force` is not set. With
/// `force`, ownership of the conflicting fields moves to `manager`. Fields this manager
/// applied before and no longer applies are removed unless another manager owns them.
pub(crate) fn apply(
    current: Option<&Value>,
    patch: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    now: &str,
) -> Result<Value, Conflicts> {
    let applied = field_set(patch);
    let mut entries = current.map(read_managed).unwrap_or_default();

    let mut conflicts: Vec<(FieldPath, String)> = Vec::new();
    if let Some(cur) = current {
        for path in &applied {
            let new_value = get_path(patch, path);
            if get_path(cur, path) == new_value {
                continue; // same value: ownership is shared, never a conflict
            }
            for e in &entries {
                if e.manager != manager && e.fields.contains(path) {
                    conflicts.push((path.clone(), e.manager.clone()));
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts
            .into_iter()
            .map(|(p, m)| (path_string(&p), m))
            .collect());
    }

    let mut obj = match current {
        Some(c) => c.clone(),
        None => json!({"metadata": {}}),
    };
    for key in ["apiVersion", "kind"] {
        if let Some(v) = patch.get(key) {
            obj[key] = v.clone();
        }
    }
    for key in ["name", "namespace"] {
        if let Some(v) = patch.pointer(&format!("/metadata/{key}")) {
            obj["metadata"][key] = v.clone();
        }
    }

    let previous: BTreeSet<FieldPath> = entries
        .iter()
        .find(|e| e.manager == manager && e.operation == "Apply")
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    for path in previous.difference(&applied) {
        let owned_by_other = entries
            .iter()
            .any(|e| !(e.manager == manager && e.operation == "Apply") && e.fields.contains(path));
        if !owned_by_other {
            remove_path(&mut obj, path);
        }
    }
    for path in &applied {
        if let Some(v) = get_path(patch, path) {
            set_path(&mut obj, path, v.clone());
        }
    }
    prune_empty_maps(&mut obj);

    // Forced: the conflicting fields leave their previous owners.
    for (path, owner) in &conflicts {
        for e in entries.iter_mut().filter(|e| &e.manager == owner) {
            e.fields.remove(path);
        }
    }
    match entries
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == "Apply")
    {
        Some(e) => {
            e.fields = applied;
            e.time = now.to_string();
            e.api_version = api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version: api_version.to_string(),
            time: now.to_string(),
            fields: applied,
        }),
    }
    let present = field_set(&obj);
    for e in &mut entries {
        e.fields.retain(|p| present.contains(p));
    }
    write_managed(&mut obj, &entries);
    Ok(obj)
}

/// Removes `metadata.labels`/`metadata.annotations` left empty by a removal.
fn prune_empty_maps(obj: &mut Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for key in ["labels", "annotations"] {
            if meta
                .get(key)
                .and_then(Value::as_object)
                .is_some_and(Map::is_empty)
            {
                meta.remove(key);
            }
        }
    }
}

/// Ownership after a non-apply write (create, PUT, merge/JSON patch) by `manager`: it takes
/// every field it changed, which leaves every other manager (updates never conflict).
pub(crate) fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    now: &str,
) {
    let mut entries = old.map(read_managed).unwrap_or_default();
    let new_fields = field_set(new);
    let changed: BTreeSet<FieldPath> = match old {
        None => new_fields.clone(),
        Some(old) => new_fields
            .union(&field_set(old))
            .filter(|p| get_path(old, p) != get_path(new, p))
            .cloned()
            .collect(),
    };
    if changed.is_empty() && old.is_some() {
        write_managed(new, &entries);
        return;
    }
    for e in &mut entries {
        if !(e.manager == manager && e.operation == "Update") {
            e.fields.retain(|p| !changed.contains(p));
        }
    }
    let taken: BTreeSet<FieldPath> = changed.intersection(&new_fields).cloned().collect();
    match entries
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == "Update")
    {
        Some(e) => {
            e.fields.extend(taken);
            e.time = now.to_string();
            e.api_version = api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: manager.to_string(),
            operation: "Update".into(),
            api_version: api_version.to_string(),
            time: now.to_string(),
            fields: taken,
        }),
    }
    for e in &mut entries {
        e.fields.retain(|p| new_fields.contains(p));
    }
    write_managed(new, &entries);
}

/// RFC 7386 JSON merge patch. Also used for strategic merge patches (lists are replaced).
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn unescape_pointer_token(t: &str) -> String {
    t.replace("~1", "/").replace("~0", "~")
}

/// RFC 6902 JSON patch: `add`, `remove`, `replace`, `move`, `copy`, `test`.
pub(crate) fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be a list of operations")?;
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("operation without 'op'")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or("operation without 'path'")?;
        match kind {
            "add" | "replace" => {
                let value = op
                    .get("value")
                    .cloned()
                    .ok_or("operation without 'value'")?;
                pointer_set(target, path, value, kind == "add")?;
            }
            "remove" => {
                pointer_remove(target, path)?;
            }
            "test" => {
                let value = op.get("value").ok_or("operation without 'value'")?;
                if target.pointer(path) != Some(value) {
                    return Err(format!("test operation failed at {path}"));
                }
            }
            "move" | "copy" => {
                let from = op
                    .get("from")
                    .and_then(Value::as_str)
                    .ok_or("operation without 'from'")?;
                let value = target
                    .pointer(from)
                    .cloned()
                    .ok_or(format!("missing path {from}"))?;
                if kind == "move" {
                    pointer_remove(target, from)?;
                }
                pointer_set(target, path, value, true)?;
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    let idx = path
        .rfind('/')
        .ok_or(format!("invalid JSON pointer {path:?}"))?;
    Ok((
        path[..idx].to_string(),
        unescape_pointer_token(&path[idx + 1..]),
    ))
}

fn pointer_set(target: &mut Value, path: &str, value: Value, add: bool) -> Result<(), String> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    let parent = target
        .pointer_mut(&parent)
        .ok_or(format!("missing path {parent:?}"))?;
    match parent {
        Value::Object(m) => {
            if !add && !m.contains_key(&last) {
                return Err(format!("replace of missing path {path:?}"));
            }
            m.insert(last, value);
        }
        Value::Array(a) => {
            if last == "-" && add {
                a.push(value);
            } else {
                let i: usize = last.parse().map_err(|_| format!("bad index in {path:?}"))?;
                if add && i <= a.len() {
                    a.insert(i, value);
                } else if !add && i < a.len() {
                    a[i] = value;
                } else {
                    return Err(format!("index out of range in {path:?}"));
                }
            }
        }
        _ => return Err(format!("parent of {path:?} is not a container")),
    }
    Ok(())
}

fn pointer_remove(target: &mut Value, path: &str) -> Result<(), String> {
    let (parent, last) = split_pointer(path)?;
    let parent = target
        .pointer_mut(&parent)
        .ok_or(format!("missing path {parent:?}"))?;
    match parent {
        Value::Object(m) => m
            .remove(&last)
            .map(|_| ())
            .ok_or(format!("remove of missing path {path:?}")),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| format!("bad index in {path:?}"))?;
            if i < a.len() {
                a.remove(i);
                Ok(())
            } else {
                Err(format!("index out of range in {path:?}"))
            }
        }
        _ => Err(format!("parent of {path:?} is not a container")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: &str = "networking.k8s.io/v1";

    fn np(egress: Value) -> Value {
        json!({"apiVersion": V, "kind": "NetworkPolicy",
               "metadata": {"name": "p", "namespace": "n"},
               "spec": {"podSelector": {}, "egress": egress}})
    }

    #[test]
    fn fields_round_trip_through_managed_fields() {
        let obj = json!({"metadata": {"name": "x", "labels": {"a": "1", "b.io/c": "2"}},
                         "spec": {"podSelector": {}, "egress": []}, "status": {"x": 1}});
        let fields = field_set(&obj);
        assert_eq!(fields.len(), 4);
        let mut o = obj;
        let e = ManagedEntry {
            manager: "m".into(),
            operation: "Apply".into(),
            api_version: "v1".into(),
            time: "t".into(),
            fields,
        };
        write_managed(&mut o, std::slice::from_ref(&e));
        assert_eq!(read_managed(&o), vec![e]);
    }

    #[test]
    fn apply_conflicts_and_force() {
        let a = apply(None, &np(json!([{"to": []}])), "guard", false, V, "t").unwrap();
        // Same value by another manager: shared, no conflict.
        let shared = apply(Some(&a), &np(json!([{"to": []}])), "kubectl", false, V, "t").unwrap();
        assert_eq!(read_managed(&shared).len(), 2);
        // Different value: conflict on .spec.egress only (podSelector is equal).
        let err = apply(Some(&a), &np(json!([])), "kubectl", false, V, "t").unwrap_err();
        assert_eq!(err, vec![(".spec.egress".to_string(), "guard".to_string())]);
        let forced = apply(Some(&a), &np(json!([])), "kubectl", true, V, "t").unwrap();
        let m = read_managed(&forced);
        let guard = m.iter().find(|e| e.manager == "guard").unwrap();
        assert!(!guard
            .fields
            .contains(&vec!["spec".to_string(), "egress".to_string()]));
        assert_eq!(forced["spec"]["egress"], json!([]));
    }

    #[test]
    fn apply_removes_fields_no_longer_applied() {
        let first = json!({"metadata": {"name": "ns", "labels": {"a": "1", "b": "2"}}});
        let o = apply(None, &first, "guard", false, "v1", "t").unwrap();
        let second = json!({"metadata": {"name": "ns", "labels": {"a": "1"}}});
        let o = apply(Some(&o), &second, "guard", false, "v1", "t").unwrap();
        assert_eq!(o["metadata"]["labels"], json!({"a": "1"}));
    }

    #[test]
    fn update_takes_ownership() {
        let o = apply(None, &np(json!([])), "guard", false, V, "t").unwrap();
        let mut n = o.clone();
        n["spec"]["egress"] = json!([{"to": []}]);
        record_update(Some(&o), &mut n, "kubectl", V, "t");
        let m = read_managed(&n);
        let k = m.iter().find(|e| e.manager == "kubectl").unwrap();
        assert_eq!(k.operation, "Update");
        assert!(k
            .fields
            .contains(&vec!["spec".to_string(), "egress".to_string()]));
        // Re-applying the old value now conflicts with kubectl.
        assert!(apply(Some(&n), &np(json!([])), "guard", false, V, "t").is_err());
    }

    #[test]
    fn patches() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(t, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
        json_patch(
            &mut t,
            &json!([{"op": "add", "path": "/l/-", "value": 4},
                    {"op": "replace", "path": "/a/c", "value": 5},
                    {"op": "remove", "path": "/a/d"}]),
        )
        .unwrap();
        assert_eq!(t, json!({"a": {"c": 5}, "l": [3, 4]}));
        assert!(json_patch(&mut t, &json!([{"op": "test", "path": "/a/c", "value": 0}])).is_err());
    }
}
