//! Seeding the fixture at cluster scale (tens of thousands of namespaces and policies) in
//! one step: every object is written as the control methods write it (same validation,
//! server-set fields, managedFields and history), but under one lock of the store and with
//! one wake-up of the watches at the end, instead of one per object.

use serde_json::{json, Value};

use super::{FakeApiServer, Kind};

impl FakeApiServer {
    /// Creates or replaces every object of `objects` as [`FakeApiServer::apply_object`]
    /// does, in order (a namespace before what lives in it); returns how many were written.
    /// Panics on the first object the store refuses (test code).
    pub fn seed(&self, kind: Kind, objects: impl IntoIterator<Item = Value>) -> usize {
        self.shared.mutate(|store| {
            let mut n = 0;
            for obj in objects {
                if let Err(e) = store.fixture_put(kind, obj) {
                    panic!("fake API server: seed {}: {}", kind.plural(), e.message);
                }
                n += 1;
            }
            n
        })
    }

    /// Creates namespaces with the given labels (plus `kubernetes.io/metadata.name`).
    pub fn seed_namespaces<'a>(
        &self,
        namespaces: impl IntoIterator<Item = (String, Vec<(&'a str, &'a str)>)>,
    ) -> usize {
        self.seed(
            Kind::Namespace,
            namespaces.into_iter().map(|(name, labels)| {
                let labels: serde_json::Map<String, Value> = labels
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), json!(v)))
                    .collect();
                json!({"metadata": {"name": name, "labels": labels}})
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeding_writes_every_object_with_one_resource_version_each() {
        let api = FakeApiServer::start();
        let before = api.resource_version();
        let n = api.seed_namespaces(
            (0..50).map(|i| (format!("env-{i}"), vec![("datalab.io/environment", "true")])),
        );
        assert_eq!(n, 50);
        assert_eq!(api.resource_version(), before + 50);
        let ns = api.get(Kind::Namespace, None, "env-7").expect("seeded");
        assert_eq!(ns["metadata"]["labels"]["datalab.io/environment"], "true");
        assert_eq!(
            ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
            "env-7"
        );
        let policies = (0..50).map(|i| {
            json!({"metadata": {"name": "p", "namespace": format!("env-{i}")},
                   "spec": {"podSelector": {}}})
        });
        assert_eq!(api.seed(Kind::NetworkPolicy, policies), 50);
        assert_eq!(api.list(Kind::NetworkPolicy).len(), 50);
    }

    #[test]
    #[should_panic(expected = "seed networkpolicies")]
    fn seeding_into_a_missing_namespace_panics() {
        let api = FakeApiServer::start();
        api.seed(
            Kind::NetworkPolicy,
            [json!({"metadata": {"name": "p", "namespace": "nowhere"}})],
        );
    }
}
