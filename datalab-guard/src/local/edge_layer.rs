//! The pod-edge layer in local mode (`--edge-iface`): every listed interface gets the edge
//! program with the guarded root's verdict; interfaces recorded under the bpffs directory
//! but no longer listed are detached. A listed interface that disappears (a sandbox
//! restarted) is attached again when an interface of that name comes back; meanwhile the
//! cgroup layer keeps enforcing.

use std::{collections::BTreeMap, time::Duration};

use datalab_guard_common::{EdgeEntry, Verdict};

use crate::bpf::{
    edge::{self, EdgeLayer, Preference},
    PinLayout,
};

/// How often listed interfaces are checked for a new ifindex.
const RESCAN_EVERY: Duration = Duration::from_secs(2);

/// The edge layer and the interfaces it should cover.
pub struct LocalEdge {
    layer: EdgeLayer,
    entry: EdgeEntry,
    /// Interface name → the ifindex it had when last attached (None: not attached now).
    attached: BTreeMap<String, Option<u32>>,
}

/// Attaches the listed interfaces (all must succeed: the operator asked for them) and
/// detaches recorded ones that are not listed. `None` when nothing is listed or recorded.
pub fn start(
    layout: &PinLayout,
    ifaces: &[String],
    root_cgroup_id: u64,
) -> anyhow::Result<Option<LocalEdge>> {
    let recorded = edge::attached(layout)?;
    if ifaces.is_empty() && recorded.is_empty() {
        return Ok(None);
    }
    let mut layer = EdgeLayer::new(layout, Preference::from_env())?;
    let entry = EdgeEntry {
        verdict: Verdict::Guard as u32,
        class: 0,
        cgroup_id: root_cgroup_id,
    };
    let mut attached = BTreeMap::new();
    for iface in ifaces {
        let backend = layer.attach(iface, entry)?;
        let ifindex = edge::ifindex_of(iface);
        tracing::info!(iface = %iface, ifindex, backend = backend.name(), "edge layer attached");
        attached.insert(iface.clone(), ifindex);
    }
    let wanted: Vec<u32> = attached.values().flatten().copied().collect();
    for record in recorded {
        if !wanted.contains(&record.ifindex) {
            layer.detach(record.ifindex)?;
            tracing::info!(
                ifindex = record.ifindex,
                "edge layer detached (interface no longer listed)"
            );
        }
    }
    Ok(Some(LocalEdge {
        layer,
        entry,
        attached,
    }))
}

impl LocalEdge {
    /// Re-attaches listed interfaces whose ifindex changed (recreated) or came back.
    fn rescan(&mut self) {
        for (iface, last) in self.attached.iter_mut() {
            let now = edge::ifindex_of(iface);
            if now == *last {
                continue;
            }
            match now {
                None => {
                    tracing::warn!(iface = %iface, "edge interface gone; the cgroup layer keeps enforcing");
                    *last = None;
                }
                Some(ifindex) => match self.layer.attach(iface, self.entry) {
                    Ok(backend) => {
                        tracing::info!(iface = %iface, ifindex, backend = backend.name(), "edge layer attached");
                        if let Some(old) = last.replace(ifindex) {
                            let _ = self.layer.detach(old);
                        }
                    }
                    Err(e) => {
                        // Remembered as tried: warned once per interface change, not per scan.
                        tracing::warn!(iface = %iface, error = %e, "cannot attach the edge layer; the cgroup layer keeps enforcing");
                        *last = Some(ifindex);
                    }
                },
            }
        }
    }
}

/// Rescans until shutdown.
pub async fn keep_attached(
    edge: Option<LocalEdge>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Some(mut edge) = edge else {
        return;
    };
    if edge.attached.is_empty() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RESCAN_EVERY) => edge.rescan(),
            _ = shutdown.changed() => return,
        }
    }
}
