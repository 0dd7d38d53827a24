//! Restoring a VolumeSnapshot of one namespace in another. A claim can be filled only from a
//! VolumeSnapshot of its own namespace, so the snapshot is imported: a pre-provisioned
//! VolumeSnapshotContent carrying the source's snapshot handle with `deletionPolicy: Retain`
//! (deleting it never deletes the storage system's snapshot), bound to a new VolumeSnapshot in
//! the target namespace. Pure: consent, the checks on the source, and the two objects.
//!
//! Guarantees:
//! * Consent: only namespaces listed in the source VolumeSnapshot's [`SHARE_ANNOTATION`]
//!   (comma-separated, exact names, no wildcard) may import it.
//! * A handle is taken only from the content the source is bound to *and* that names the source
//!   back (namespace, name and uid), so a VolumeSnapshot cannot lend out a handle that is not its
//!   own.
//! * The imported content never deletes the data, whatever happens to it.

use std::collections::BTreeMap;

use crate::types::{
    SnapshotRef, VolumeSnapshot, VolumeSnapshotContent, VolumeSnapshotContentSource, VolumeSnapshotContentSpec,
    VolumeSnapshotSourceRef, VolumeSnapshotSpec,
};

/// On a VolumeSnapshot: the namespaces that may restore it (`"team-b,team-c"`).
pub const SHARE_ANNOTATION: &str = "hoard.dev/restore-into-namespaces";
/// On an imported VolumeSnapshotContent (cluster-scoped): the namespace it was imported into.
pub const IMPORTED_INTO_LABEL: &str = "hoard.dev/imported-into";

/// Whether the owner of `vs` lets namespace `ns` restore it.
pub fn consents(vs: &VolumeSnapshot, ns: &str) -> bool {
    vs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SHARE_ANNOTATION))
        .is_some_and(|list| list.split(',').any(|n| n.trim() == ns))
}

/// What an import copies from the source's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub snapshot_handle: String,
    pub driver: String,
    pub class: Option<String>,
    pub source_volume_mode: Option<String>,
}

/// Where the source stands: `Ok(Some(handle))` to import, `Ok(None)` to wait (not ready, or its
/// content not seen yet), `Err(why)` when it must not be imported.
pub fn source_handle(vs: &VolumeSnapshot, content: Option<&VolumeSnapshotContent>) -> Result<Option<Handle>, String> {
    let name = vs.metadata.name.clone().unwrap_or_default();
    let ns = vs.metadata.namespace.clone().unwrap_or_default();
    if vs.metadata.deletion_timestamp.is_some() {
        return Err(format!("VolumeSnapshot {ns}/{name} is being deleted"));
    }
    if !vs.ready() {
        return Ok(None);
    }
    let Some(content) = content else { return Ok(None) };
    let back = &content.spec.volume_snapshot_ref;
    let names_it = back.namespace.as_deref() == Some(ns.as_str())
        && back.name.as_deref() == Some(name.as_str())
        && back.uid.as_deref().is_none_or(|u| Some(u) == vs.metadata.uid.as_deref());
    let bound = vs.status.as_ref().and_then(|s| s.bound_volume_snapshot_content_name.as_deref());
    if !names_it || bound != content.metadata.name.as_deref() {
        return Err(format!("VolumeSnapshot {ns}/{name} and its content do not name each other"));
    }
    let handle = content
        .status
        .as_ref()
        .and_then(|s| s.snapshot_handle.clone())
        .or_else(|| content.spec.source.snapshot_handle.clone());
    Ok(handle.map(|snapshot_handle| Handle {
        snapshot_handle,
        driver: content.spec.driver.clone(),
        class: content.spec.volume_snapshot_class_name.clone(),
        source_volume_mode: content.spec.source_volume_mode.clone(),
    }))
}

/// `(content, snapshot)` names of the import for RestoreSession `restore` in namespace `ns`:
/// fixed (a restarted controller finds them) and at most 63 characters; the content's name,
/// cluster-wide, includes the namespace.
pub fn import_names(ns: &str, restore: &str) -> (String, String) {
    (
        crate::objects::object_name(&format!("import-{ns}-{restore}"), "content"),
        crate::objects::object_name(&format!("restore-{restore}"), "snapshot"),
    )
}

/// The pre-provisioned content for the import: `handle`, bound to VolumeSnapshot `ns/snapshot`,
/// `Retain`. Cluster-scoped, so it has no owner; `labels` find it for cleanup.
pub fn imported_content(
    name: &str,
    handle: &Handle,
    ns: &str,
    snapshot: &str,
    mut labels: BTreeMap<String, String>,
) -> VolumeSnapshotContent {
    let mut c = VolumeSnapshotContent::new(
        name,
        VolumeSnapshotContentSpec {
            deletion_policy: "Retain".into(),
            driver: handle.driver.clone(),
            source: VolumeSnapshotContentSource {
                snapshot_handle: Some(handle.snapshot_handle.clone()),
                volume_handle: None,
            },
            volume_snapshot_ref: SnapshotRef {
                name: Some(snapshot.to_string()),
                namespace: Some(ns.to_string()),
                uid: None,
            },
            volume_snapshot_class_name: handle.class.clone(),
            source_volume_mode: handle.source_volume_mode.clone(),
        },
    );
    labels.insert(IMPORTED_INTO_LABEL.into(), crate::objects::label_value(ns));
    labels.insert("app.kubernetes.io/managed-by".into(), crate::MANAGED_BY.into());
    c.metadata.labels = Some(labels);
    c
}

/// The VolumeSnapshot in the target namespace that binds to the imported `content`.
pub fn imported_snapshot(name: &str, ns: &str, content: &str, mut labels: BTreeMap<String, String>) -> VolumeSnapshot {
    let mut vs = VolumeSnapshot::new(
        name,
        VolumeSnapshotSpec {
            source: VolumeSnapshotSourceRef {
                persistent_volume_claim_name: None,
                volume_snapshot_content_name: Some(content.to_string()),
            },
            volume_snapshot_class_name: None,
        },
    );
    vs.metadata.namespace = Some(ns.to_string());
    labels.insert("app.kubernetes.io/managed-by".into(), crate::MANAGED_BY.into());
    vs.metadata.labels = Some(labels);
    vs
}

/// Whether `content` is an import into `ns` that hoard may delete: it carries the label and
/// retains the data.
pub fn is_import_into(content: &VolumeSnapshotContent, ns: &str) -> bool {
    let labelled = content
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(IMPORTED_INTO_LABEL))
        .is_some_and(|v| *v == crate::objects::label_value(ns));
    labelled
        && content.spec.deletion_policy == "Retain"
        && content.spec.volume_snapshot_ref.namespace.as_deref() == Some(ns)
        && content.spec.source.snapshot_handle.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(annotation: Option<&str>) -> VolumeSnapshot {
        let mut vs: VolumeSnapshot = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "nightly", "namespace": "team-a", "uid": "vs-uid"},
            "spec": {"source": {"persistentVolumeClaimName": "data"}},
            "status": {"boundVolumeSnapshotContentName": "snapcontent-1", "readyToUse": true}}))
        .expect("vs");
        if let Some(a) = annotation {
            vs.metadata.annotations = Some([(SHARE_ANNOTATION.to_string(), a.to_string())].into());
        }
        vs
    }

    fn content(ns: &str, name: &str, uid: &str) -> VolumeSnapshotContent {
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1"},
            "spec": {"deletionPolicy": "Delete", "driver": "hostpath.csi.k8s.io",
                     "source": {"volumeHandle": "vol-1"}, "sourceVolumeMode": "Filesystem",
                     "volumeSnapshotClassName": "csi-snap",
                     "volumeSnapshotRef": {"name": name, "namespace": ns, "uid": uid}},
            "status": {"snapshotHandle": "snap-1", "readyToUse": true, "restoreSize": 67108864}}))
        .expect("content")
    }

    #[test]
    fn consent_lists_exact_namespaces() {
        assert!(!consents(&source(None), "team-b"));
        assert!(consents(&source(Some("team-b")), "team-b"));
        assert!(consents(&source(Some("team-c, team-b")), "team-b"));
        assert!(!consents(&source(Some("team-bb,*")), "team-b"), "no wildcard, no prefix match");
    }

    #[test]
    fn only_a_content_that_names_its_snapshot_back_lends_its_handle() {
        let vs = source(Some("team-b"));
        let ok = source_handle(&vs, Some(&content("team-a", "nightly", "vs-uid"))).expect("ok").expect("ready");
        assert_eq!((ok.snapshot_handle.as_str(), ok.driver.as_str()), ("snap-1", "hostpath.csi.k8s.io"));
        assert_eq!(ok.source_volume_mode.as_deref(), Some("Filesystem"));
        assert!(source_handle(&vs, Some(&content("team-x", "nightly", "vs-uid"))).is_err());
        assert!(source_handle(&vs, Some(&content("team-a", "other", "vs-uid"))).is_err());
        assert!(source_handle(&vs, Some(&content("team-a", "nightly", "old-uid"))).is_err());
        assert_eq!(source_handle(&vs, None), Ok(None), "content not seen yet: wait");
        let mut unready = vs.clone();
        unready.status.as_mut().expect("status").ready_to_use = Some(false);
        assert_eq!(source_handle(&unready, Some(&content("team-a", "nightly", "vs-uid"))), Ok(None));
    }

    #[test]
    fn the_import_retains_the_data_and_binds_to_the_new_snapshot() {
        let handle = source_handle(&source(Some("team-b")), Some(&content("team-a", "nightly", "vs-uid")))
            .expect("ok")
            .expect("ready");
        let (content_name, snapshot_name) = import_names("team-b", "back");
        assert!(content_name.len() <= 63 && snapshot_name.len() <= 63);
        assert_ne!(import_names("team-c", "back").0, content_name, "content names are per namespace");
        let labels: BTreeMap<String, String> = [("hoard.dev/restore-session".to_string(), "back".to_string())].into();
        let c = imported_content(&content_name, &handle, "team-b", &snapshot_name, labels.clone());
        assert_eq!(c.spec.deletion_policy, "Retain");
        assert_eq!(c.spec.source.snapshot_handle.as_deref(), Some("snap-1"));
        assert_eq!(c.spec.volume_snapshot_ref.namespace.as_deref(), Some("team-b"));
        assert!(is_import_into(&c, "team-b"));
        assert!(!is_import_into(&c, "team-a"));
        assert!(!is_import_into(&content("team-b", "x", "u"), "team-b"), "not an import: never deleted by hoard");
        let vs = imported_snapshot(&snapshot_name, "team-b", &content_name, labels);
        assert_eq!(vs.spec.source.volume_snapshot_content_name.as_deref(), Some(content_name.as_str()));
        assert_eq!(vs.spec.source.persistent_volume_claim_name, None);
        let wire = serde_json::to_value(&c).expect("json");
        assert_eq!(wire["spec"]["volumeSnapshotRef"]["name"], json!(snapshot_name));
        assert!(wire["spec"]["source"].get("volumeHandle").is_none());
    }
}
