//! Layout of the per-CPU COUNTERS array: one u64 per (class, action, family, hook).
//!
//! Counting happens in the kernel before any rate limiting, so the exported totals are exact
//! even when audit events are suppressed or lost. The class dimension (a namespace index
//! assigned by the agent) is bounded by [`MAX_CLASSES`], which bounds label cardinality too.

use crate::{Action, Family, Hook};

/// Counter classes (namespaces with their own counters). Class 0 collects everything
/// unclassified; classes beyond the last are folded into 0 by the agent before writing.
pub const MAX_CLASSES: u32 = 512;

/// Counters per class.
pub const SLOTS_PER_CLASS: u32 = (Action::COUNT * Family::COUNT * Hook::COUNT) as u32;

/// Entries of the COUNTERS array.
pub const COUNTER_ENTRIES: u32 = MAX_CLASSES * SLOTS_PER_CLASS;

/// Index into COUNTERS. Out-of-range classes land in class 0 rather than nowhere.
#[inline(always)]
pub fn counter_index(class: u32, action: Action, family: Family, hook: Hook) -> u32 {
    let class = if class < MAX_CLASSES { class } else { 0 };
    let slot =
        ((action as u32) * Family::COUNT as u32 + family as u32) * Hook::COUNT as u32 + hook as u32;
    class * SLOTS_PER_CLASS + slot
}

/// Inverse of [`counter_index`] for the slot part, used by the agent when exporting.
pub fn slot_labels(slot: u32) -> Option<(Action, Family, Hook)> {
    let hook = Hook::from_raw((slot % Hook::COUNT as u32) as u8)?;
    let rest = slot / Hook::COUNT as u32;
    let family = Family::from_raw((rest % Family::COUNT as u32) as u8)?;
    let action = Action::from_raw((rest / Family::COUNT as u32) as u8)?;
    Some((action, family, hook))
}

/// Indices of the per-CPU STATS array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Stat {
    /// The ring buffer was full: the event is lost (the counter above still counted it).
    EventsLost = 0,
    /// The per-cgroup rate limit suppressed the event.
    EventsSuppressed = 1,
    /// Packets that left the fast path and were fully classified (not blocked after all).
    SlowPathPassed = 2,
}

impl Stat {
    pub const COUNT: usize = 3;
    pub const ALL: [Stat; Stat::COUNT] = [
        Stat::EventsLost,
        Stat::EventsSuppressed,
        Stat::SlowPathPassed,
    ];
}

/// Entries of the STATS array: one per [`Stat`].
pub const STAT_ENTRIES: u32 = Stat::COUNT as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_round_trips_and_indices_are_distinct() {
        let mut seen = [false; SLOTS_PER_CLASS as usize];
        for action in Action::ALL {
            for family in Family::ALL {
                for hook in Hook::ALL {
                    let idx = counter_index(0, action, family, hook);
                    assert!(idx < SLOTS_PER_CLASS);
                    assert!(!seen[idx as usize], "slot {idx} used twice");
                    seen[idx as usize] = true;
                    assert_eq!(slot_labels(idx), Some((action, family, hook)));
                    let in_class_7 = counter_index(7, action, family, hook);
                    assert_eq!(in_class_7, 7 * SLOTS_PER_CLASS + idx);
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn every_stat_has_its_own_slot_in_the_array() {
        for (i, stat) in Stat::ALL.into_iter().enumerate() {
            assert_eq!(stat as usize, i, "Stat::ALL in index order");
            // Exhaustive: a new variant does not compile until it is placed here and in ALL.
            let listed = match stat {
                Stat::EventsLost | Stat::EventsSuppressed | Stat::SlowPathPassed => true,
            };
            assert!(listed);
        }
        assert_eq!(STAT_ENTRIES as usize, Stat::ALL.len());
    }

    #[test]
    fn out_of_range_class_folds_into_class_zero() {
        let idx = counter_index(MAX_CLASSES + 3, Action::Blocked, Family::Ipv4, Hook::Egress);
        assert_eq!(
            idx,
            counter_index(0, Action::Blocked, Family::Ipv4, Hook::Egress)
        );
        assert!(
            counter_index(
                MAX_CLASSES - 1,
                Action::Audited,
                Family::Packet,
                Hook::SockCreate
            ) < COUNTER_ENTRIES
        );
    }
}
