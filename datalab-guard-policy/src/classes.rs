//! Counter classes: small integers standing for environment namespaces in the in-kernel
//! per-CPU counters (see `datalab_guard_common::counters`), so `blocked_total{namespace}` is
//! exact and its label cardinality bounded.
//!
//! Class 0 is "everything else": pods outside environment namespaces, cgroups with no policy
//! entry, and environment namespaces that found every class taken (overflow).
//!
//! Classes go to environment namespaces that have guarded pods on this node (not to every
//! environment of the cluster, which may be far more than [`MAX_CLASSES`]). A namespace keeps
//! its class while it exists: [`NamespaceClasses::retain`] / [`NamespaceClasses::release`]
//! free it when the namespace is deleted or leaves the environment set. Only when every class
//! is taken does [`NamespaceClasses::claim`] take back the class of the namespace that has had
//! no pods here for longest, so overflow needs more namespaces with pods on one node at once
//! than there are classes.
//!
//! Fresh classes are handed out first, then freed ones in the order they were freed, so a
//! class is reused as late as possible. The kernel's counters for a class are not reset by
//! this module: whoever exports them must treat a class whose namespace changed as a new
//! series (zero the class's slots, or keep a baseline) — [`NamespaceClasses::generation`]
//! changes when that happens.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use datalab_guard_common::counters::MAX_CLASSES;

/// The class of everything unclassified (and of overflow).
pub const UNCLASSIFIED: u32 = 0;

/// Namespace name <-> counter class, bounded by [`MAX_CLASSES`].
#[derive(Clone, Debug)]
pub struct NamespaceClasses {
    /// Classes are `1..limit`.
    limit: u32,
    by_name: BTreeMap<String, u32>,
    /// Index = class; `names[0]` is always `None`.
    names: Vec<Option<String>>,
    /// How many times each class has been handed to a namespace.
    generations: Vec<u64>,
    /// Per class: the [`NamespaceClasses::claim`] round in which its namespace last had pods.
    last_active: Vec<u64>,
    round: u64,
    /// Next never-used class.
    next_fresh: u32,
    /// Freed classes, oldest first.
    free: VecDeque<u32>,
    /// Namespaces that wanted a class while none was free.
    overflowed: BTreeSet<String>,
}

impl Default for NamespaceClasses {
    fn default() -> Self {
        NamespaceClasses::new()
    }
}

impl NamespaceClasses {
    /// Classes `1..MAX_CLASSES`, as the kernel's COUNTERS array is laid out.
    pub fn new() -> NamespaceClasses {
        NamespaceClasses::with_limit(MAX_CLASSES)
    }

    /// Classes `1..limit` (`limit` at most [`MAX_CLASSES`]); small limits are for tests.
    pub fn with_limit(limit: u32) -> NamespaceClasses {
        let limit = limit.clamp(1, MAX_CLASSES);
        NamespaceClasses {
            limit,
            by_name: BTreeMap::new(),
            names: vec![None; limit as usize],
            generations: vec![0; limit as usize],
            last_active: vec![0; limit as usize],
            round: 0,
            next_fresh: 1,
            free: VecDeque::new(),
            overflowed: BTreeSet::new(),
        }
    }

    /// The namespace's class, giving it a fresh or freed one if it has none (never taking
    /// one back from another namespace); [`UNCLASSIFIED`] when none is free, and the name is
    /// then counted in [`NamespaceClasses::overflowed`].
    pub fn assign(&mut self, namespace: &str) -> u32 {
        if let Some(class) = self.by_name.get(namespace) {
            return *class;
        }
        let class = if self.next_fresh < self.limit {
            self.next_fresh += 1;
            self.next_fresh - 1
        } else if let Some(class) = self.free.pop_front() {
            class
        } else {
            if !self.overflowed.contains(namespace) {
                self.overflowed.insert(namespace.to_owned());
            }
            return UNCLASSIFIED;
        };
        self.give(namespace, class);
        class
    }

    fn give(&mut self, namespace: &str, class: u32) {
        self.overflowed.remove(namespace);
        self.by_name.insert(namespace.to_owned(), class);
        self.names[class as usize] = Some(namespace.to_owned());
        self.generations[class as usize] += 1;
        self.last_active[class as usize] = self.round;
    }

    /// One reconcile's worth of assignment: every namespace in `active` (environment
    /// namespaces with guarded pods on this node now) gets a class if at all possible —
    /// a fresh or freed one, else the class of the namespace idle for longest. Namespaces
    /// left without one are what [`NamespaceClasses::overflowed`] counts afterwards.
    pub fn claim<'a>(&mut self, active: impl IntoIterator<Item = &'a str>) {
        self.round += 1;
        let active: BTreeSet<&str> = active.into_iter().collect();
        let mut waiting = Vec::new();
        for name in &active {
            match self.by_name.get(*name) {
                Some(class) => self.last_active[*class as usize] = self.round,
                None => waiting.push(*name),
            }
        }
        for name in waiting {
            if self.assign(name) != UNCLASSIFIED {
                continue;
            }
            let idle = (1..self.limit)
                .filter(|c| {
                    self.names[*c as usize].is_some() && self.last_active[*c as usize] < self.round
                })
                .min_by_key(|c| self.last_active[*c as usize]);
            if let Some(class) = idle {
                let holder = self.names[class as usize].take().expect("filtered on Some");
                self.by_name.remove(&holder);
                self.give(name, class);
            }
        }
        self.overflowed.retain(|n| active.contains(n.as_str()));
    }

    /// The namespace's class without assigning one.
    pub fn get(&self, namespace: &str) -> Option<u32> {
        self.by_name.get(namespace).copied()
    }

    /// The namespace's class, [`UNCLASSIFIED`] when it has none.
    pub fn class_of(&self, namespace: &str) -> u32 {
        self.get(namespace).unwrap_or(UNCLASSIFIED)
    }

    /// The namespace holding a class (`None` for class 0 and free classes).
    pub fn name(&self, class: u32) -> Option<&str> {
        self.names.get(class as usize)?.as_deref()
    }

    /// How many namespaces have held this class; changes when the class is reused.
    pub fn generation(&self, class: u32) -> u64 {
        self.generations.get(class as usize).copied().unwrap_or(0)
    }

    /// Frees the namespace's class (namespace deleted or no longer an environment).
    pub fn release(&mut self, namespace: &str) -> Option<u32> {
        self.overflowed.remove(namespace);
        let class = self.by_name.remove(namespace)?;
        self.names[class as usize] = None;
        self.free.push_back(class);
        Some(class)
    }

    /// Keeps the classes of the namespaces for which `keep` is true and frees the others;
    /// returns the freed classes. Call it with "is still an environment namespace".
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) -> Vec<u32> {
        let gone: Vec<String> = self.by_name.keys().filter(|n| !keep(n)).cloned().collect();
        self.overflowed.retain(|n| keep(n));
        gone.iter().filter_map(|n| self.release(n)).collect()
    }

    /// Namespaces holding a class.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Namespaces currently folded into class 0 because no class was free.
    pub fn overflowed(&self) -> usize {
        self.overflowed.len()
    }

    /// (class, namespace) for every assigned class, by class.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.names
            .iter()
            .enumerate()
            .filter_map(|(class, name)| Some((class as u32, name.as_deref()?)))
    }

    /// An owned copy of class -> namespace, for readers on other threads (the exporter).
    pub fn snapshot(&self) -> BTreeMap<u32, String> {
        self.iter().map(|(c, n)| (c, n.to_owned())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_stable_and_start_at_one() {
        let mut c = NamespaceClasses::new();
        assert_eq!(c.assign("a"), 1);
        assert_eq!(c.assign("b"), 2);
        assert_eq!(c.assign("a"), 1);
        assert_eq!(c.get("b"), Some(2));
        assert_eq!(c.get("z"), None);
        assert_eq!(c.name(1), Some("a"));
        assert_eq!(c.name(0), None);
        assert_eq!(c.name(MAX_CLASSES + 5), None);
        assert_eq!(c.iter().collect::<Vec<_>>(), [(1, "a"), (2, "b")]);
    }

    #[test]
    fn the_full_range_is_used_then_overflow_goes_to_zero() {
        let mut c = NamespaceClasses::new();
        for i in 1..MAX_CLASSES {
            assert_eq!(c.assign(&format!("ns-{i}")), i);
        }
        assert_eq!(c.len(), (MAX_CLASSES - 1) as usize);
        assert_eq!(c.assign("late"), UNCLASSIFIED);
        assert_eq!(c.assign("late"), UNCLASSIFIED);
        assert_eq!(c.assign("later"), UNCLASSIFIED);
        assert_eq!(c.overflowed(), 2);
        assert_eq!(c.get("late"), None);
    }

    #[test]
    fn freed_classes_are_reused_after_fresh_ones_and_overflow_recovers() {
        let mut c = NamespaceClasses::with_limit(4); // classes 1, 2, 3
        assert_eq!([c.assign("a"), c.assign("b")], [1, 2]);
        assert_eq!(c.release("a"), Some(1));
        assert_eq!(c.name(1), None);
        assert_eq!(c.release("a"), None);
        // Fresh class 3 before reusing 1.
        assert_eq!(c.assign("c"), 3);
        assert_eq!(c.generation(1), 1);
        assert_eq!(c.assign("d"), 1);
        assert_eq!(c.generation(1), 2);
        assert_eq!(c.assign("e"), UNCLASSIFIED);
        assert_eq!(c.overflowed(), 1);
        // Freeing b lets e in on its next request.
        assert_eq!(c.retain(|n| n != "b"), vec![2]);
        assert_eq!(c.assign("e"), 2);
        assert_eq!(c.overflowed(), 0);
        assert_eq!(c.name(2), Some("e"));
    }

    #[test]
    fn claim_takes_back_the_longest_idle_class_only_when_full() {
        let mut c = NamespaceClasses::with_limit(3); // classes 1, 2
        c.claim(["a", "b"]);
        assert_eq!((c.class_of("a"), c.class_of("b")), (1, 2));
        c.claim(["a"]); // b idle since round 1
        c.claim(["b"]); // a idle since round 2
        assert_eq!((c.class_of("a"), c.class_of("b")), (1, 2));
        // Full: c takes a's class (idle longest), b keeps its own.
        c.claim(["b", "c"]);
        assert_eq!((c.class_of("b"), c.class_of("c"), c.get("a")), (2, 1, None));
        assert_eq!(c.generation(1), 2);
        assert_eq!(c.overflowed(), 0);
        // Everyone active at once and one too many: the extra one overflows, nobody active
        // loses a class.
        c.claim(["a", "b", "c"]);
        assert_eq!(
            (c.class_of("b"), c.class_of("c"), c.class_of("a")),
            (2, 1, UNCLASSIFIED)
        );
        assert_eq!(c.overflowed(), 1);
        // Once "a" is gone from the active set it is no longer counted as overflowed.
        c.claim(["b"]);
        assert_eq!(c.overflowed(), 0);
        assert_eq!(
            c.snapshot(),
            BTreeMap::from([(1, "c".to_owned()), (2, "b".to_owned())])
        );
    }

    #[test]
    fn claim_prefers_free_classes_to_taking_one_back() {
        let mut c = NamespaceClasses::with_limit(3);
        c.claim(["a", "b"]);
        c.release("a");
        c.claim(["c"]);
        assert_eq!((c.class_of("b"), c.class_of("c")), (2, 1));
    }

    #[test]
    fn retain_forgets_overflowed_names_that_went_away() {
        let mut c = NamespaceClasses::with_limit(2); // class 1 only
        c.assign("a");
        c.assign("b");
        assert_eq!(c.overflowed(), 1);
        assert!(c.retain(|n| n == "a").is_empty());
        assert_eq!(c.overflowed(), 0);
        assert_eq!(c.len(), 1);
    }
}
