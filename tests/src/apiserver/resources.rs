//! The resource types the fixture serves: their group, version, plural, kind and scope, as
//! the real API server's discovery documents them (Kubernetes 1.33).

/// A resource type served by the fixture.
///
/// `Event` is core/v1 `events`; `EventV1` is `events.k8s.io/v1` `events` (what kube-runtime's
/// `Recorder` writes). A real API server stores both in one table with two representations;
/// the fixture keeps them apart (see the simplifications in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    Node,
    Event,
    EventV1,
    Lease,
    NetworkPolicy,
}

pub(crate) struct ResourceInfo {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Whether writes through the main resource keep the stored `status` (the real API
    /// server only changes it through the `status` subresource).
    pub has_status: bool,
    /// Whether `metadata.generation` is maintained (bumped when `spec` changes).
    pub has_generation: bool,
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Node,
        Kind::Event,
        Kind::EventV1,
        Kind::Lease,
        Kind::NetworkPolicy,
    ];

    pub(crate) fn info(self) -> &'static ResourceInfo {
        match self {
            Kind::Namespace => &ResourceInfo {
                group: "",
                version: "v1",
                plural: "namespaces",
                singular: "namespace",
                kind: "Namespace",
                namespaced: false,
                short_names: &["ns"],
                has_status: true,
                has_generation: false,
            },
            Kind::Pod => &ResourceInfo {
                group: "",
                version: "v1",
                plural: "pods",
                singular: "pod",
                kind: "Pod",
                namespaced: true,
                short_names: &["po"],
                has_status: true,
                has_generation: true,
            },
            Kind::Node => &ResourceInfo {
                group: "",
                version: "v1",
                plural: "nodes",
                singular: "node",
                kind: "Node",
                namespaced: false,
                short_names: &["no"],
                has_status: true,
                has_generation: false,
            },
            Kind::Event => &ResourceInfo {
                group: "",
                version: "v1",
                plural: "events",
                singular: "event",
                kind: "Event",
                namespaced: true,
                short_names: &["ev"],
                has_status: false,
                has_generation: false,
            },
            Kind::EventV1 => &ResourceInfo {
                group: "events.k8s.io",
                version: "v1",
                plural: "events",
                singular: "event",
                kind: "Event",
                namespaced: true,
                short_names: &["ev"],
                has_status: false,
                has_generation: false,
            },
            Kind::Lease => &ResourceInfo {
                group: "coordination.k8s.io",
                version: "v1",
                plural: "leases",
                singular: "lease",
                kind: "Lease",
                namespaced: true,
                short_names: &[],
                has_status: false,
                has_generation: false,
            },
            Kind::NetworkPolicy => &ResourceInfo {
                group: "networking.k8s.io",
                version: "v1",
                plural: "networkpolicies",
                singular: "networkpolicy",
                kind: "NetworkPolicy",
                namespaced: true,
                short_names: &["netpol"],
                has_status: false,
                has_generation: true,
            },
        }
    }

    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Pod | Kind::Node | Kind::Event => "v1",
            Kind::EventV1 => "events.k8s.io/v1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
        }
    }

    /// The `kind` field of objects of this type (`Pod`, `Lease`, ...).
    pub fn kind_name(self) -> &'static str {
        self.info().kind
    }

    /// The resource name in URLs (`pods`, `networkpolicies`, ...).
    pub fn plural(self) -> &'static str {
        self.info().plural
    }

    /// The API group (`""` for core).
    pub fn group(self) -> &'static str {
        self.info().group
    }

    pub fn is_namespaced(self) -> bool {
        self.info().namespaced
    }

    /// `pods` or `leases.coordination.k8s.io`, as the API server names resources in messages.
    pub(crate) fn group_resource(self) -> String {
        let info = self.info();
        if info.group.is_empty() {
            info.plural.to_string()
        } else {
            format!("{}.{}", info.plural, info.group)
        }
    }

    pub(crate) fn lookup(group: &str, version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| {
            let i = k.info();
            i.group == group && i.version == version && i.plural == plural
        })
    }

    pub(crate) fn verbs() -> &'static [&'static str] {
        VERBS
    }
}
