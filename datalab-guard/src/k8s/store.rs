//! Where a list-and-watch loop ([`super::informer`]) puts what it receives.
//!
//! [`WatchSink`] is the one thing the loop needs of a store. Two kinds exist:
//! - [`SlimWriter`]: a kube-runtime reflector store of the API's own objects, with the
//!   fields nobody reads stripped first (the controller's namespaces and NetworkPolicies);
//! - [`CompactStore`]: a map from a key to the agent's own small record, converted from the
//!   object as it arrives, so nothing of the API's object shape is kept. A node agent holds
//!   every namespace of the cluster (tens of thousands on a Datalab) and every pod of its
//!   node: a `PartialObjectMeta<Namespace>` costs over a kilobyte (an `ObjectMeta` with a
//!   dozen optional fields, a `BTreeMap` node of labels), its compact record a few dozen
//!   bytes, its labels shared with every namespace that has the same set.
//!
//! Both keep their previous contents during a relist until it is complete (`Init` …
//! `InitDone`), so a failed relist never changes what is enforced.

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use kube::{
    runtime::{reflector::store::Writer, watcher::Event},
    Resource,
};

/// What the list-and-watch loop hands each event to.
pub trait WatchSink<K>: Send {
    fn apply(&mut self, event: Event<K>);
}

/// A kube-runtime reflector store, fed objects with `slim` applied.
pub struct SlimWriter<K: Resource<DynamicType = ()> + Clone + 'static> {
    writer: Writer<K>,
    slim: fn(&mut K),
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> SlimWriter<K> {
    pub fn new(writer: Writer<K>, slim: fn(&mut K)) -> Self {
        SlimWriter { writer, slim }
    }
}

impl<K> WatchSink<K> for SlimWriter<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    fn apply(&mut self, mut event: Event<K>) {
        if let Event::Apply(obj) | Event::Delete(obj) | Event::InitApply(obj) = &mut event {
            (self.slim)(obj);
        }
        self.writer.apply_watcher_event(&event);
    }
}

/// How a [`CompactStore`] turns an object into its key and record. `record` returns
/// `None` for an object the agent cannot use (no name, no uid): it is not stored.
pub trait Compact<K>: Send + Sync + 'static {
    type Record: Clone + Send + Sync + 'static;
    fn key(obj: &K) -> Option<Box<str>>;
    fn record(&mut self, obj: K) -> Option<Self::Record>;
    /// Called after each complete list (a moment to drop what no record uses any more).
    fn after_list(&mut self) {}
}

/// The records, readable from any task while the loop writes.
pub struct CompactStore<R> {
    shared: Arc<Shared<R>>,
}

impl<R> Clone for CompactStore<R> {
    fn clone(&self) -> Self {
        CompactStore {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<R> {
    live: RwLock<HashMap<Box<str>, R>>,
    /// Bumped on every change: lets readers skip work when nothing changed.
    generation: AtomicU64,
    /// Whether a first list has completed.
    ready: tokio::sync::watch::Sender<bool>,
}

impl<R: Clone> CompactStore<R> {
    /// An empty store and the writer its list-and-watch loop feeds.
    pub fn new<K, C: Compact<K, Record = R>>(compact: C) -> (CompactStore<R>, CompactWriter<C, R>) {
        let shared = Arc::new(Shared {
            live: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            ready: tokio::sync::watch::Sender::new(false),
        });
        let writer = CompactWriter {
            shared: shared.clone(),
            compact,
            building: None,
        };
        (CompactStore { shared }, writer)
    }

    pub fn get<Q>(&self, key: &Q) -> Option<R>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.read().get(key).cloned()
    }

    /// Calls `f` on every record under the read lock (keep it short: the loop waits).
    pub fn for_each(&self, mut f: impl FnMut(&str, &R)) {
        for (key, record) in self.read().iter() {
            f(key, record);
        }
    }

    /// Every record (cheap clones: records are small or `Arc`s).
    pub fn values(&self) -> Vec<R> {
        self.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes so far (any apply, delete or completed list).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Resolves once the first list is complete.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.shared.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Box<str>, R>> {
        // A panic while holding the lock leaves a map that is still whole (every write is
        // one insert, remove or swap): keep serving it.
        self.shared
            .live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The loop's side of a [`CompactStore`].
pub struct CompactWriter<C, R> {
    shared: Arc<Shared<R>>,
    compact: C,
    /// The relist in progress: becomes the live map at `InitDone`.
    building: Option<HashMap<Box<str>, R>>,
}

impl<C, R> CompactWriter<C, R> {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Box<str>, R>> {
        self.shared
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self) {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl<K, C> WatchSink<K> for CompactWriter<C, C::Record>
where
    C: Compact<K>,
{
    fn apply(&mut self, event: Event<K>) {
        match event {
            Event::Init => self.building = Some(HashMap::new()),
            Event::InitApply(obj) => {
                let key = C::key(&obj);
                let record = self.compact.record(obj);
                if let (Some(building), Some(key), Some(record)) =
                    (self.building.as_mut(), key, record)
                {
                    building.insert(key, record);
                }
            }
            Event::InitDone => {
                if let Some(mut complete) = self.building.take() {
                    complete.shrink_to_fit();
                    *self.write() = complete;
                    self.compact.after_list();
                    self.changed();
                    self.shared.ready.send_replace(true);
                }
            }
            Event::Apply(obj) => {
                let Some(key) = C::key(&obj) else {
                    return;
                };
                match self.compact.record(obj) {
                    Some(record) => self.write().insert(key, record),
                    // An object changed into one the agent cannot use: forget it.
                    None => self.write().remove(&key),
                };
                self.changed();
            }
            Event::Delete(obj) => {
                if let Some(key) = C::key(&obj) {
                    self.write().remove(&key);
                    self.changed();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strings keyed by themselves, lengths as records; empty strings unusable.
    struct Lengths;

    impl Compact<String> for Lengths {
        type Record = usize;
        fn key(obj: &String) -> Option<Box<str>> {
            Some(obj.as_str().into())
        }
        fn record(&mut self, obj: String) -> Option<usize> {
            (!obj.is_empty()).then_some(obj.len())
        }
    }

    #[test]
    fn a_relist_replaces_the_contents_only_when_complete() {
        let (store, mut writer) = CompactStore::new(Lengths);
        writer.apply(Event::Init);
        writer.apply(Event::InitApply("abc".to_owned()));
        assert!(store.is_empty(), "nothing is live before InitDone");
        writer.apply(Event::InitDone);
        assert_eq!(store.get("abc"), Some(3));

        // An interrupted relist (a new Init before InitDone) never shows.
        writer.apply(Event::Init);
        writer.apply(Event::InitApply("de".to_owned()));
        assert_eq!(store.get("abc"), Some(3));
        assert_eq!(store.get("de"), None);
        writer.apply(Event::Init);
        writer.apply(Event::InitApply("fghi".to_owned()));
        writer.apply(Event::InitDone);
        assert_eq!(store.values(), vec![4]);
    }

    #[test]
    fn applies_and_deletes_change_the_generation() {
        let (store, mut writer) = CompactStore::new(Lengths);
        let g0 = store.generation();
        writer.apply(Event::Apply("abc".to_owned()));
        assert_eq!(store.get("abc"), Some(3));
        assert!(store.generation() > g0);
        let g1 = store.generation();
        writer.apply(Event::Delete("abc".to_owned()));
        assert_eq!(store.get("abc"), None);
        assert!(store.generation() > g1);
    }

    #[test]
    fn an_unusable_object_is_not_stored() {
        let (store, mut writer) = CompactStore::new(Lengths);
        writer.apply(Event::Apply(String::new()));
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn ready_after_the_first_complete_list() {
        let (store, mut writer) = CompactStore::new(Lengths);
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.wait_until_ready().await }
        });
        writer.apply(Event::Init);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        writer.apply(Event::InitDone);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("ready")
            .unwrap();
    }
}
