//! VolumeSnapshots kept after their session (`volumeSnapshot.keepLast`): how one is marked
//! kept, and which kept ones retention deletes. Pure.
//!
//! A kept VolumeSnapshot loses its owner reference to the BackupSession (so neither the
//! session's cleanup nor the garbage collector deletes it with the session), is owned instead by
//! the Snapshot objects that describe it (so it goes once the last of them is deleted), and gains
//! [`KEPT_LABEL`] with the value of [`keep_group`]: one group per BackupConfiguration session.
//! Retention keeps the newest `keepLast` of each volume (component) in a group, by the time the
//! storage system cut them, and deletes the rest — never one of another group.

use std::collections::BTreeMap;

use crate::objects::{COMPONENT_LABEL, label_value};
use crate::types::VolumeSnapshot;

/// On a kept VolumeSnapshot: the group it is retained in (see [`keep_group`]).
pub const KEPT_LABEL: &str = "hoard.dev/kept";

/// The group of a BackupConfiguration's session, as a label value: `<config>.<session>`,
/// shortened with a stable hash when longer than a label value may be.
pub fn keep_group(config: &str, session: &str) -> String {
    let full = format!("{config}.{session}");
    if full.len() <= 63 {
        return label_value(&full);
    }
    let hash = fnv(full.as_bytes());
    let head: String = full.chars().take(54).collect();
    format!("{}-{hash:08x}", label_value(&head))
}

fn fnv(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// The labels to merge into a VolumeSnapshot that is kept in `group`.
pub fn kept_labels(group: &str) -> BTreeMap<String, String> {
    [(KEPT_LABEL.to_string(), group.to_string())].into()
}

/// When the snapshot was cut: the driver's `status.creationTime`, else the object's creation.
fn cut_at(vs: &VolumeSnapshot) -> String {
    vs.status
        .as_ref()
        .and_then(|s| s.creation_time.clone())
        .or_else(|| vs.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()))
        .unwrap_or_default()
}

/// The names of the kept VolumeSnapshots of `group` to delete so that each component keeps its
/// newest `keep_last`. Snapshots of other groups, ones already being deleted, and ones not yet
/// ready (still being cut) are never chosen, and none of those counts as kept.
pub fn to_delete(kept: &[VolumeSnapshot], group: &str, keep_last: u32) -> Vec<String> {
    let mut by_component: BTreeMap<String, Vec<&VolumeSnapshot>> = BTreeMap::new();
    for vs in kept {
        let labels = vs.metadata.labels.as_ref();
        if labels.and_then(|l| l.get(KEPT_LABEL)).map(String::as_str) != Some(group)
            || vs.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let component = labels.and_then(|l| l.get(COMPONENT_LABEL)).cloned().unwrap_or_default();
        by_component.entry(component).or_default().push(vs);
    }
    let mut out = Vec::new();
    for mut list in by_component.into_values() {
        // RFC 3339 in UTC sorts by time; the name breaks ties so the order is total.
        list.sort_by_key(|vs| std::cmp::Reverse((cut_at(vs), vs.metadata.name.clone())));
        out.extend(
            list.into_iter().filter(|vs| vs.ready()).skip(keep_last as usize).filter_map(|vs| vs.metadata.name.clone()),
        );
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kept(name: &str, group: &str, component: &str, at: &str, ready: bool) -> VolumeSnapshot {
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {KEPT_LABEL: group, COMPONENT_LABEL: component}},
            "spec": {"source": {"persistentVolumeClaimName": "data"}},
            "status": {"readyToUse": ready, "creationTime": at}}))
        .expect("vs")
    }

    #[test]
    fn keeps_the_newest_per_component_of_its_group_only() {
        let g = keep_group("app", "nightly");
        let list = vec![
            kept("d1", &g, "data", "2026-12-01T00:00:00Z", true),
            kept("d3", &g, "data", "2026-12-03T00:00:00Z", true),
            kept("d2", &g, "data", "2026-12-02T00:00:00Z", true),
            kept("w1", &g, "wal", "2026-12-01T00:00:00Z", true),
            kept("other", &keep_group("app", "hourly"), "data", "2026-11-01T00:00:00Z", true),
        ];
        assert_eq!(to_delete(&list, &g, 2), ["d1"]);
        assert_eq!(to_delete(&list, &g, 1), ["d1", "d2"]);
        assert!(to_delete(&list, &g, 3).is_empty());
        assert_eq!(to_delete(&list, &g, 0), ["d1", "d2", "d3", "w1"]);
    }

    #[test]
    fn unready_and_deleting_snapshots_are_left_alone() {
        let g = keep_group("app", "nightly");
        let mut deleting = kept("gone", &g, "data", "2026-12-05T00:00:00Z", true);
        deleting.metadata.deletion_timestamp = serde_json::from_value(json!("2026-12-06T00:00:00Z")).expect("time");
        let list = vec![
            deleting,
            kept("cutting", &g, "data", "2026-12-04T00:00:00Z", false),
            kept("new", &g, "data", "2026-12-03T00:00:00Z", true),
            kept("old", &g, "data", "2026-12-01T00:00:00Z", true),
        ];
        // Neither "cutting" (not ready) nor "gone" (being deleted) counts or is chosen.
        assert_eq!(to_delete(&list, &g, 1), ["old"]);
        assert_eq!(to_delete(&list, &g, 2), Vec::<String>::new());
    }

    #[test]
    fn groups_are_valid_label_values() {
        assert_eq!(keep_group("app", "nightly"), "app.nightly");
        let long = keep_group(&"c".repeat(60), "nightly");
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, keep_group(&"c".repeat(60), "hourly"));
        assert_eq!(long, keep_group(&"c".repeat(60), "nightly"));
    }
}
