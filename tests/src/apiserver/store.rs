//! The object store: every object, the global resourceVersion, the bounded change history
//! that watches replay from, and the write semantics of the API (create, update, patch,
//! apply, delete) with the checks and server-set fields of the real API server.
//!
//! resourceVersions are one global counter, bumped by every change, like etcd revisions.
//! The history keeps the old and new object of each change, which is enough both to replay
//! watches and to rebuild a consistent snapshot at an older resourceVersion (for `continue`
//! tokens and `resourceVersionMatch=Exact`).

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Map, Value};

use super::{apply, resources::Kind, status::ApiError, termination, validation};

/// How many changes the history keeps before the oldest are forgotten (then a watch from a
/// resourceVersion older than the history gets 410 Gone, as after an etcd compaction).
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 10_000;

/// The field manager of changes made through the fixture's control methods.
pub(crate) const FIXTURE_MANAGER: &str = "datalab-guard-tests";

/// The namespaces every cluster has.
pub(crate) const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

type Key = (Kind, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change: the resourceVersion it produced, the object before (None when added) and
/// after (for a deletion: the last state, with the deletion's resourceVersion).
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub kind: Kind,
    pub ty: ChangeType,
    pub old: Option<Value>,
    pub new: Value,
}

struct Stored {
    obj: Value,
    /// Creation order (for `events()`), which resourceVersions lose on update.
    seq: u64,
}

/// The patch types of `PATCH` requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchType {
    Apply,
    Merge,
    Strategic,
    Json,
}

/// Who writes and how.
pub(crate) struct Writer<'a> {
    pub manager: &'a str,
    pub dry_run: bool,
    /// Client writes go through the API's rules (status and deletion state are kept);
    /// fixture writes set the object as given.
    pub client: bool,
}

pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// A watch or Exact list from a resourceVersion below this is answered 410 Gone.
    oldest_rv: u64,
    /// The newest change no longer in the history: an open watch that has not yet seen it
    /// has a gap, and gets 410 Gone.
    max_trimmed_rv: u64,
    seq: u64,
    uid_counter: u64,
}

pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_rfc3339(secs)
}

/// Seconds since the epoch as `2006-01-02T15:04:05Z` (civil-from-days, H. Hinnant).
pub(crate) fn format_rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// A v4-shaped UUID, unique per process.
fn make_uid(counter: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x =
        nanos ^ (u64::from(std::process::id()) << 32) ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let a = next();
    let b = next();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(key)?.as_str()
}

fn name_of(obj: &Value) -> String {
    meta_str(obj, "name").unwrap_or_default().to_string()
}

fn ns_of(obj: &Value) -> String {
    meta_str(obj, "namespace").unwrap_or_default().to_string()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was just made an object"),
    }
}

/// An object without its resourceVersion and managedFields timestamps: two objects that are
/// equal this way make a no-op write, which the real API server does not record.
fn normalized(obj: &Value) -> Value {
    let mut o = obj.clone();
    let meta = meta_mut(&mut o);
    meta.remove("resourceVersion");
    if let Some(Value::Array(mf)) = meta.get_mut("managedFields") {
        for e in mf {
            if let Some(m) = e.as_object_mut() {
                m.remove("time");
            }
        }
    }
    o
}

impl Store {
    pub fn new() -> Self {
        let mut s = Self {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: DEFAULT_HISTORY_LIMIT,
            oldest_rv: 0,
            max_trimmed_rv: 0,
            seq: 0,
            uid_counter: 0,
        };
        for ns in SYSTEM_NAMESPACES {
            let _ = s.fixture_put(Kind::Namespace, json!({"metadata": {"name": ns}}));
        }
        s
    }

    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn oldest_rv(&self) -> u64 {
        self.oldest_rv
    }

    pub fn set_history_limit(&mut self, limit: usize) {
        self.history_limit = limit.max(1);
        self.trim();
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .map(|s| &s.obj)
    }

    /// Objects of `kind` (in `ns` if given), in key order (namespace, name).
    pub fn objects(&self, kind: Kind, ns: Option<&str>) -> Vec<&Value> {
        self.objects
            .range((kind, String::new(), String::new())..)
            .take_while(|((k, _, _), _)| *k == kind)
            .filter(|((_, n, _), _)| ns.is_none_or(|ns| n == ns))
            .map(|(_, s)| &s.obj)
            .collect()
    }

    /// Objects of the given kinds in creation order.
    pub fn by_creation(&self, kinds: &[Kind]) -> Vec<Value> {
        let mut v: Vec<&Stored> = self
            .objects
            .iter()
            .filter(|((k, _, _), _)| kinds.contains(k))
            .map(|(_, s)| s)
            .collect();
        v.sort_by_key(|s| s.seq);
        v.into_iter().map(|s| s.obj.clone()).collect()
    }

    /// Every object of `kind` as it was at resourceVersion `rv`, in key order.
    pub fn snapshot_at(&self, kind: Kind, rv: u64) -> Result<Vec<Value>, ApiError> {
        if rv < self.oldest_rv {
            return Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.oldest_rv
            )));
        }
        if rv > self.rv {
            return Err(ApiError::too_large(rv, self.rv));
        }
        let mut map: BTreeMap<(String, String), Value> = self
            .objects(kind, None)
            .into_iter()
            .map(|o| ((ns_of(o), name_of(o)), o.clone()))
            .collect();
        for ch in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if ch.kind != kind {
                continue;
            }
            let key = (ns_of(&ch.new), name_of(&ch.new));
            match (ch.ty, &ch.old) {
                (ChangeType::Added, _) => {
                    map.remove(&key);
                }
                (_, Some(old)) => {
                    map.insert(key, old.clone());
                }
                (_, None) => {}
            }
        }
        Ok(map.into_values().collect())
    }

    /// The changes after `cursor`, or None when some of them were forgotten (compaction or
    /// history limit): the watch has a gap and must be answered 410 Gone.
    pub fn changes_after(&self, cursor: u64) -> Option<Vec<Change>> {
        if cursor < self.max_trimmed_rv {
            return None;
        }
        let start = self.history.partition_point(|c| c.rv <= cursor);
        Some(self.history.iter().skip(start).cloned().collect())
    }

    /// Forgets the history, like an etcd compaction followed by more writes: every
    /// resourceVersion handed out so far becomes too old to watch from. Open watches that
    /// have delivered every change keep going.
    pub fn compact(&mut self) {
        if let Some(last) = self.history.back() {
            self.max_trimmed_rv = self.max_trimmed_rv.max(last.rv);
        }
        self.history.clear();
        self.rv += 1;
        self.oldest_rv = self.rv;
    }

    fn trim(&mut self) {
        while self.history.len() > self.history_limit {
            if let Some(c) = self.history.pop_front() {
                self.max_trimmed_rv = self.max_trimmed_rv.max(c.rv);
                self.oldest_rv = self.oldest_rv.max(c.rv);
            }
        }
    }

    fn record(&mut self, kind: Kind, ty: ChangeType, old: Option<Value>, new: Value) {
        self.history.push_back(Change {
            rv: self.rv,
            kind,
            ty,
            old,
            new,
        });
        self.trim();
    }

    fn next_uid(&mut self) -> String {
        self.uid_counter += 1;
        make_uid(self.uid_counter)
    }

    // ---- validation and server-set fields ----

    fn check_body(
        kind: Kind,
        ns: &str,
        url_name: Option<&str>,
        body: &Value,
    ) -> Result<(), ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the request body must be an object"));
        }
        if let Some(v) = body.get("apiVersion").and_then(Value::as_str) {
            if v != kind.api_version() {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({})",
                    kind.api_version()
                )));
            }
        }
        if let Some(k) = body.get("kind").and_then(Value::as_str) {
            if k != kind.kind_name() {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    kind.kind_name()
                )));
            }
        }
        if kind.is_namespaced() {
            if let Some(n) = meta_str(body, "namespace") {
                if !n.is_empty() && n != ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
            }
        }
        if let (Some(url), Some(n)) = (url_name, meta_str(body, "name")) {
            if url != n {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({url})"
                )));
            }
        }
        Ok(())
    }

    /// NamespaceLifecycle: no new content in a Terminating namespace (see `termination`).
    fn check_not_terminating(&self, kind: Kind, name: &str, ns: &str) -> Result<(), ApiError> {
        match self.get(Kind::Namespace, "", ns) {
            Some(n) if termination::is_terminating(n) => {
                Err(termination::forbidden(kind, name, ns))
            }
            _ => Ok(()),
        }
    }

    fn check_namespace_exists(&self, kind: Kind, ns: &str) -> Result<(), ApiError> {
        if kind.is_namespaced() && self.get(Kind::Namespace, "", ns).is_none() {
            return Err(ApiError::not_found(Kind::Namespace, ns));
        }
        Ok(())
    }

    /// Type, scope and per-kind defaults (namespace label, finalizers, phases).
    fn normalize(kind: Kind, ns: &str, obj: &mut Value) {
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind_name());
        let name = name_of(obj);
        let meta = meta_mut(obj);
        if kind.is_namespaced() {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        match kind {
            Kind::Namespace => {
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if !labels.is_object() {
                    *labels = json!({});
                }
                labels["kubernetes.io/metadata.name"] = json!(name);
                if obj.pointer("/spec/finalizers").is_none() {
                    obj["spec"] = json!({"finalizers": ["kubernetes"]});
                }
                if obj.pointer("/status/phase").is_none() {
                    obj["status"] = json!({"phase": "Active"});
                }
            }
            Kind::Pod if obj.pointer("/status/phase").is_none() => {
                if !obj.get("status").is_some_and(Value::is_object) {
                    obj["status"] = json!({});
                }
                obj["status"]["phase"] = json!("Pending");
            }
            _ => {}
        }
    }

    fn check_precondition(kind: Kind, old: &Value, body: &Value) -> Result<(), ApiError> {
        if let Some(rv) = meta_str(body, "resourceVersion") {
            if !rv.is_empty() && Some(rv) != meta_str(old, "resourceVersion") {
                return Err(ApiError::conflict_modified(kind, &name_of(old)));
            }
        }
        if let Some(uid) = meta_str(body, "uid") {
            if !uid.is_empty() && Some(uid) != meta_str(old, "uid") {
                return Err(ApiError::conflict_modified(kind, &name_of(old)));
            }
        }
        Ok(())
    }

    // ---- commits: the only places objects change ----

    fn commit_create(&mut self, kind: Kind, mut obj: Value, dry_run: bool) -> Value {
        let now = now_rfc3339();
        let uid = match meta_str(&obj, "uid") {
            Some(u) if !u.is_empty() => u.to_string(),
            _ => self.next_uid(),
        };
        let meta = meta_mut(&mut obj);
        meta.insert("uid".into(), json!(uid));
        meta.entry("creationTimestamp").or_insert(json!(now));
        if kind.info().has_generation {
            meta.insert("generation".into(), json!(1));
        }
        if dry_run {
            return obj;
        }
        self.rv += 1;
        self.seq += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let key = (kind, ns_of(&obj), name_of(&obj));
        self.objects.insert(
            key,
            Stored {
                obj: obj.clone(),
                seq: self.seq,
            },
        );
        self.record(kind, ChangeType::Added, None, obj.clone());
        obj
    }

    /// `new` already carries its managedFields. Keeps identity and server-set metadata.
    fn commit_update(&mut self, kind: Kind, old: &Value, mut new: Value, w: &Writer<'_>) -> Value {
        {
            let old_meta = old.get("metadata").cloned().unwrap_or_default();
            let meta = meta_mut(&mut new);
            for key in ["uid", "creationTimestamp"] {
                if let Some(v) = old_meta.get(key) {
                    meta.insert(key.into(), v.clone());
                }
            }
            if w.client {
                for key in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
                    match old_meta.get(key) {
                        Some(v) => meta.insert(key.into(), v.clone()),
                        None => meta.remove(key),
                    };
                }
            }
            meta.remove("resourceVersion");
        }
        if w.client && kind.info().has_status {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        if kind.info().has_generation {
            let r#gen = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let r#gen = if old.get("spec") != new.get("spec") {
                r#gen + 1
            } else {
                r#gen
            };
            meta_mut(&mut new).insert("generation".into(), json!(r#gen));
        }
        if let Some(rv) = old.pointer("/metadata/resourceVersion") {
            meta_mut(&mut new).insert("resourceVersion".into(), rv.clone());
        }
        if normalized(&new) == normalized(old) || w.dry_run {
            return if w.dry_run { new } else { old.clone() };
        }
        self.rv += 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let key = (kind, ns_of(&new), name_of(&new));
        if let Some(s) = self.objects.get_mut(&key) {
            s.obj = new.clone();
        }
        self.record(kind, ChangeType::Modified, Some(old.clone()), new.clone());
        new
    }

    fn commit_delete(&mut self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let key = (kind, ns.to_string(), name.to_string());
        if !self.objects.contains_key(&key) {
            return None;
        }
        if kind == Kind::Namespace {
            // The namespace controller's job, done at once: everything in it goes first.
            let contents: Vec<Key> = self
                .objects
                .keys()
                .filter(|(k, n, _)| k.is_namespaced() && n == name)
                .cloned()
                .collect();
            for (k, n, o) in contents {
                self.commit_delete(k, &n, &o);
            }
        }
        let stored = self.objects.remove(&key)?;
        self.rv += 1;
        let mut last = stored.obj.clone();
        meta_mut(&mut last).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(kind, ChangeType::Deleted, Some(stored.obj), last.clone());
        Some(last)
    }

    // ---- API writes ----

    pub fn create(
        &mut self,
        kind: Kind,
        ns: &str,
        mut body: Value,
        w: &Writer<'_>,
    ) -> Result<Value, ApiError> {
        Self::check_body(kind, ns, None, &body)?;
        let mut name = meta_str(&body, "name").unwrap_or("").to_string();
        if name.is_empty() {
            let Some(prefix) = meta_str(&body, "generateName").filter(|g| !g.is_empty()) else {
                return Err(ApiError::invalid(
                    kind,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            };
            let suffix: String = self
                .next_uid()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(5)
                .collect();
            name = format!("{prefix}{suffix}");
            meta_mut(&mut body).insert("name".into(), json!(name));
        }
        self.check_namespace_exists(kind, ns)?;
        if w.client && kind.is_namespaced() {
            self.check_not_terminating(kind, &name, ns)?;
        }
        let key_ns = if kind.is_namespaced() { ns } else { "" };
        if self.get(kind, key_ns, &name).is_some() {
            return Err(ApiError::already_exists(kind, &name));
        }
        if w.client {
            let meta = meta_mut(&mut body);
            for key in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "managedFields",
            ] {
                meta.remove(key);
            }
            // The server owns status: a client's create starts from the defaults.
            if kind.info().has_status {
                if let Some(m) = body.as_object_mut() {
                    m.remove("status");
                }
            }
        }
        Self::normalize(kind, key_ns, &mut body);
        if w.client {
            validation::validate(kind, &body)?;
        }
        apply::record_update(
            None,
            &mut body,
            w.manager,
            kind.api_version(),
            &now_rfc3339(),
        );
        Ok(self.commit_create(kind, body, w.dry_run))
    }

    pub fn replace(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        mut body: Value,
        w: &Writer<'_>,
    ) -> Result<Value, ApiError> {
        Self::check_body(kind, ns, Some(name), &body)?;
        let Some(old) = self.get(kind, ns, name).cloned() else {
            return Err(ApiError::not_found(kind, name));
        };
        Self::check_precondition(kind, &old, &body)?;
        meta_mut(&mut body).insert("name".into(), json!(name));
        Self::normalize(kind, ns, &mut body);
        validation::validate(kind, &body)?;
        Ok(self.finish_update(kind, &old, body, w))
    }

    /// Managed fields of a non-apply update, then the commit.
    fn finish_update(&mut self, kind: Kind, old: &Value, mut new: Value, w: &Writer<'_>) -> Value {
        apply::record_update(
            Some(old),
            &mut new,
            w.manager,
            kind.api_version(),
            &now_rfc3339(),
        );
        self.commit_update(kind, old, new, w)
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the arguments of one PATCH request, as the handler parsed them"
    )]
    pub fn patch(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        patch_type: PatchType,
        body: Value,
        force: bool,
        w: &Writer<'_>,
    ) -> Result<(Value, bool), ApiError> {
        let old = self.get(kind, ns, name).cloned();
        if patch_type == PatchType::Apply {
            Self::check_body(kind, ns, Some(name), &body)?;
            if body.get("apiVersion").is_none() || body.get("kind").is_none() {
                return Err(ApiError::bad_request(
                    "apiVersion and kind must be set in an apply patch",
                ));
            }
            if body
                .pointer("/metadata/managedFields")
                .is_some_and(|m| !m.is_null())
            {
                return Err(ApiError::bad_request(
                    "metadata.managedFields must be nil in an apply patch",
                ));
            }
            if let Some(old) = &old {
                Self::check_precondition(kind, old, &body)?;
            } else {
                self.check_namespace_exists(kind, ns)?;
            }
            let now = now_rfc3339();
            let mut new = apply::apply(
                old.as_ref(),
                &body,
                w.manager,
                force,
                kind.api_version(),
                &now,
            )
            .map_err(|c| ApiError::apply_conflict(kind, name, &c))?;
            meta_mut(&mut new).insert("name".into(), json!(name));
            Self::normalize(kind, ns, &mut new);
            validation::validate(kind, &new)?;
            if old.is_none() && kind.is_namespaced() {
                self.check_not_terminating(kind, name, ns)?;
            }
            return Ok(match old {
                Some(old) => (self.commit_update(kind, &old, new, w), false),
                None => (self.commit_create(kind, new, w.dry_run), true),
            });
        }
        let Some(old) = old else {
            return Err(ApiError::not_found(kind, name));
        };
        let mut new = old.clone();
        match patch_type {
            PatchType::Merge | PatchType::Strategic => apply::merge_patch(&mut new, &body),
            PatchType::Json => apply::json_patch(&mut new, &body).map_err(|e| {
                ApiError::new(422, format!("the JSON patch could not be applied: {e}"))
            })?,
            PatchType::Apply => unreachable!("handled above"),
        }
        if name_of(&new) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                name_of(&new)
            )));
        }
        Self::check_body(kind, ns, Some(name), &new)?;
        // A resourceVersion in a patch is a precondition, as on the real API server.
        Self::check_precondition(kind, &old, &new)?;
        Self::normalize(kind, ns, &mut new);
        validation::validate(kind, &new)?;
        Ok((self.finish_update(kind, &old, new, w), false))
    }

    pub fn delete(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        options: &Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.get(kind, ns, name).cloned() else {
            return Err(ApiError::not_found(kind, name));
        };
        if let Some(pre) = options.get("preconditions") {
            let want_uid = pre.get("uid").and_then(Value::as_str);
            let want_rv = pre.get("resourceVersion").and_then(Value::as_str);
            if want_uid.is_some_and(|u| Some(u) != meta_str(&old, "uid"))
                || want_rv.is_some_and(|r| Some(r) != meta_str(&old, "resourceVersion"))
            {
                return Err(ApiError::conflict_modified(kind, name));
            }
        }
        if dry_run {
            return Ok(old);
        }
        self.commit_delete(kind, ns, name)
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    // ---- fixture writes (the "cluster" acting, not a client) ----

    /// Creates or replaces `obj` as given (status included). A changed uid is a deletion
    /// followed by a creation, as when a pod is recreated under the same name.
    pub fn fixture_put(&mut self, kind: Kind, mut obj: Value) -> Result<Value, ApiError> {
        let name = name_of(&obj);
        if name.is_empty() {
            return Err(ApiError::bad_request("metadata.name is required"));
        }
        let ns = if kind.is_namespaced() {
            ns_of(&obj)
        } else {
            String::new()
        };
        if kind.is_namespaced() && ns.is_empty() {
            return Err(ApiError::bad_request("metadata.namespace is required"));
        }
        self.check_namespace_exists(kind, &ns)?;
        Self::normalize(kind, &ns, &mut obj);
        let w = Writer {
            manager: FIXTURE_MANAGER,
            dry_run: false,
            client: false,
        };
        match self.get(kind, &ns, &name).cloned() {
            Some(old) => {
                let new_uid = meta_str(&obj, "uid").filter(|u| !u.is_empty());
                if new_uid.is_some_and(|u| Some(u) != meta_str(&old, "uid")) {
                    self.commit_delete(kind, &ns, &name);
                    return self.fixture_put(kind, obj);
                }
                meta_mut(&mut obj).remove("managedFields");
                Ok(self.finish_update(kind, &old, obj, &w))
            }
            None => {
                meta_mut(&mut obj).remove("managedFields");
                meta_mut(&mut obj).remove("resourceVersion");
                apply::record_update(
                    None,
                    &mut obj,
                    FIXTURE_MANAGER,
                    kind.api_version(),
                    &now_rfc3339(),
                );
                Ok(self.commit_create(kind, obj, false))
            }
        }
    }

    pub fn fixture_delete(&mut self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let ns = if kind.is_namespaced() { ns } else { "" };
        self.commit_delete(kind, ns, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Writer<'static> {
        Writer {
            manager: "test",
            dry_run: false,
            client: true,
        }
    }

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn snapshots_and_history() {
        let mut s = Store::new();
        let rv0 = s.rv();
        s.fixture_put(Kind::Namespace, json!({"metadata": {"name": "a"}}))
            .unwrap();
        let rv1 = s.rv();
        s.fixture_put(
            Kind::Namespace,
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}}),
        )
        .unwrap();
        s.fixture_delete(Kind::Namespace, "", "kube-public");
        let names = |v: Vec<Value>| v.iter().map(name_of).collect::<Vec<_>>();
        assert!(!names(s.snapshot_at(Kind::Namespace, rv0).unwrap()).contains(&"a".to_string()));
        let at1 = s.snapshot_at(Kind::Namespace, rv1).unwrap();
        assert!(names(at1.clone()).contains(&"kube-public".to_string()));
        let a = at1.iter().find(|o| name_of(o) == "a").unwrap();
        assert!(a.pointer("/metadata/labels/x").is_none());
        assert_eq!(s.changes_after(rv0).unwrap().len(), 3);
        s.compact();
        assert!(s.snapshot_at(Kind::Namespace, rv1).is_err());
        assert!(s.changes_after(rv1).is_none());
        assert_eq!(s.changes_after(s.rv()).unwrap().len(), 0);
    }

    #[test]
    fn no_op_update_keeps_resource_version() {
        let mut s = Store::new();
        let body = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                          "metadata": {"name": "l", "namespace": "default"},
                          "spec": {"holderIdentity": "a"}});
        let created = s.create(Kind::Lease, "default", body, &client()).unwrap();
        let rv = s.rv();
        let again = s
            .replace(Kind::Lease, "default", "l", created.clone(), &client())
            .unwrap();
        assert_eq!(s.rv(), rv);
        assert_eq!(
            again["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        let mut stale = created;
        stale["spec"]["holderIdentity"] = json!("b");
        s.replace(Kind::Lease, "default", "l", stale.clone(), &client())
            .unwrap();
        let err = s
            .replace(Kind::Lease, "default", "l", stale, &client())
            .unwrap_err();
        assert_eq!(err.code, 409);
    }

    #[test]
    fn namespace_deletion_cascades() {
        let mut s = Store::new();
        s.fixture_put(Kind::Namespace, json!({"metadata": {"name": "t"}}))
            .unwrap();
        s.fixture_put(
            Kind::Pod,
            json!({"metadata": {"name": "p", "namespace": "t"}}),
        )
        .unwrap();
        s.fixture_delete(Kind::Namespace, "", "t").unwrap();
        assert!(s.get(Kind::Pod, "t", "p").is_none());
        assert!(s
            .fixture_put(
                Kind::Pod,
                json!({"metadata": {"name": "p", "namespace": "t"}})
            )
            .is_err());
    }
}
