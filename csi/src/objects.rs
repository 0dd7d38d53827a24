//! The objects the snapshot path creates for one volume of one BackupSession: names, labels
//! and the VolumeSnapshot and clone claim themselves. Pure.
//!
//! Every object is owned (as controller) by the session and carries [`SESSION_LABEL`], so the
//! controller finds all of a session's objects with one selector after a restart, and the
//! garbage collector removes them with the session.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Resource;
use serde_json::json;

use crate::types::{VolumeSnapshot, VolumeSnapshotSourceRef, VolumeSnapshotSpec};

/// On every object the snapshot path creates: the BackupSession's name (as a label value).
pub const SESSION_LABEL: &str = "hoard.dev/backup-session";
/// On every object the snapshot path creates: the component (volume) it serves.
pub const COMPONENT_LABEL: &str = "hoard.dev/component";
/// The pod volume name under which the exposer mounts the clone (named in the work order).
pub const EXPOSED_VOLUME: &str = "data";

/// `s` cut to a valid label value (≤ 63 characters, alphanumeric at both ends).
pub fn label_value(s: &str) -> String {
    let mut v: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(63)
        .collect();
    while v.ends_with(['-', '_', '.']) {
        v.pop();
    }
    v
}

/// The name of the snapshot path's objects (VolumeSnapshot, clone claim, exposer pod) for a
/// session's component: `hoard-<session>-<component>`, kept within 63 characters (a label
/// value and a DNS label, so it also works as a pod's hostname) by a stable hash suffix.
pub fn object_name(session: &str, component: &str) -> String {
    let full = format!("hoard-{session}-{component}");
    if full.len() <= 63 {
        return full;
    }
    let hash = fnv1a(full.as_bytes());
    let mut head: String = full.chars().take(63 - 9).collect();
    while head.ends_with(['-', '.']) {
        head.pop();
    }
    format!("{head}-{hash:08x}")
}

/// A stable 32-bit hash for names (FNV-1a): the same input gives the same name after a
/// controller restart.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// The labels of a session's objects for one component.
pub fn labels(session: &str, component: &str) -> BTreeMap<String, String> {
    [
        (SESSION_LABEL.to_string(), label_value(session)),
        (COMPONENT_LABEL.to_string(), label_value(component)),
        ("app.kubernetes.io/managed-by".to_string(), crate::MANAGED_BY.to_string()),
    ]
    .into()
}

/// The selector of every object of a session.
pub fn session_selector(session: &str) -> String {
    format!("{SESSION_LABEL}={}", label_value(session))
}

/// A VolumeSnapshot of `claim` with `class`, owned by `owner` (the BackupSession).
pub fn volume_snapshot<K: Resource<DynamicType = ()>>(
    owner: &K,
    component: &str,
    claim: &str,
    class: &str,
) -> VolumeSnapshot {
    let session = owner.meta().name.clone().unwrap_or_default();
    let mut vs = VolumeSnapshot::new(
        &object_name(&session, component),
        VolumeSnapshotSpec {
            source: VolumeSnapshotSourceRef {
                persistent_volume_claim_name: Some(claim.to_string()),
                volume_snapshot_content_name: None,
            },
            volume_snapshot_class_name: Some(class.to_string()),
        },
    );
    vs.metadata.namespace = owner.meta().namespace.clone();
    vs.metadata.labels = Some(labels(&session, component));
    vs.metadata.owner_references = owner.controller_owner_ref(&()).map(|o| vec![o]);
    vs
}

/// The claim restored from `snapshot`: the source claim's size (or the snapshot's restore size
/// when larger) and storage class unless `storage_class` names another; ReadWriteOnce, since
/// one exposer pod on one node mounts it (read-only).
pub fn clone_claim<K: Resource<DynamicType = ()>>(
    owner: &K,
    component: &str,
    source: &PersistentVolumeClaim,
    snapshot: &VolumeSnapshot,
    storage_class: Option<&str>,
) -> Result<PersistentVolumeClaim, serde_json::Error> {
    let session = owner.meta().name.clone().unwrap_or_default();
    let mut pvc = claim_from_snapshot(&object_name(&session, component), snapshot, Some(source), storage_class, None)?;
    pvc.metadata.namespace = owner.meta().namespace.clone();
    pvc.metadata.labels = Some(labels(&session, component));
    pvc.metadata.owner_references = owner.controller_owner_ref(&()).map(|o| vec![o]);
    Ok(pvc)
}

/// A claim `name` the CSI driver fills from `snapshot` (in the snapshot's namespace): the size
/// is the larger of the source claim's request and the snapshot's restore size (1Gi when
/// neither is known); the storage class is `storage_class`, else the source claim's (else the
/// cluster's default); access modes are `access_modes`, else ReadWriteOnce.
pub fn claim_from_snapshot(
    name: &str,
    snapshot: &VolumeSnapshot,
    source: Option<&PersistentVolumeClaim>,
    storage_class: Option<&str>,
    access_modes: Option<&[String]>,
) -> Result<PersistentVolumeClaim, serde_json::Error> {
    claim_from_snapshot_sized(name, snapshot, source, None, storage_class, access_modes)
}

/// [`claim_from_snapshot`] with an explicit size (`None`: the larger of the source claim's
/// request and the snapshot's restore size). The caller checks a given size against the
/// restore size ([`too_small_for`]).
pub fn claim_from_snapshot_sized(
    name: &str,
    snapshot: &VolumeSnapshot,
    source: Option<&PersistentVolumeClaim>,
    size: Option<&str>,
    storage_class: Option<&str>,
    access_modes: Option<&[String]>,
) -> Result<PersistentVolumeClaim, serde_json::Error> {
    let source_spec = source.and_then(|s| s.spec.as_ref());
    let requested = source_spec
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .cloned();
    let restore_size = snapshot.status.as_ref().and_then(|s| s.restore_size.clone());
    let size = match size {
        Some(s) => Quantity(s.to_string()),
        None => larger(requested, restore_size).unwrap_or_else(|| Quantity("1Gi".into())),
    };
    let class = storage_class.map(str::to_string).or_else(|| source_spec.and_then(|s| s.storage_class_name.clone()));
    let modes: Vec<String> = access_modes.map(<[String]>::to_vec).unwrap_or_else(|| vec!["ReadWriteOnce".into()]);
    let snapshot_name = snapshot.metadata.name.clone().unwrap_or_default();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": snapshot.metadata.namespace},
        "spec": {
            "accessModes": modes,
            "storageClassName": class,
            "resources": {"requests": {"storage": size}},
            "dataSource": {"apiGroup": crate::types::GROUP, "kind": "VolumeSnapshot", "name": snapshot_name},
        },
    }))
}

/// Whether `size` is smaller than what the snapshot needs (its `restoreSize`); `None` when it
/// is not, or either does not parse as a byte count.
pub fn too_small_for(size: &str, snapshot: &VolumeSnapshot) -> Option<String> {
    let restore = snapshot.status.as_ref().and_then(|s| s.restore_size.as_ref())?;
    match (bytes_of(size), bytes_of(&restore.0)) {
        (Some(a), Some(b)) if a < b => Some(restore.0.clone()),
        _ => None,
    }
}

/// Whether `claim` was made from VolumeSnapshot `snapshot` (its `dataSource` names it).
pub fn restored_from(claim: &PersistentVolumeClaim, snapshot: &str) -> bool {
    claim.spec.as_ref().and_then(|s| s.data_source.as_ref()).is_some_and(|d| {
        d.kind == "VolumeSnapshot" && d.name == snapshot && d.api_group.as_deref() == Some(crate::types::GROUP)
    })
}

/// The larger of two quantities when both parse as plain byte counts with a binary or decimal
/// suffix; otherwise the first one given.
fn larger(a: Option<Quantity>, b: Option<Quantity>) -> Option<Quantity> {
    match (a, b) {
        (Some(a), Some(b)) => match (bytes_of(&a.0), bytes_of(&b.0)) {
            (Some(x), Some(y)) if y > x => Some(b),
            _ => Some(a),
        },
        (a, b) => a.or(b),
    }
}

/// Bytes of a storage quantity such as `1Gi`, `500M` or `1073741824` (no fractions or exponents).
pub fn bytes_of(q: &str) -> Option<u128> {
    let digits_end = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let n: u128 = q[..digits_end].parse().ok()?;
    let mult: u128 = match &q[digits_end..] {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_api::crd::BackupSession;

    fn session(name: &str) -> BackupSession {
        serde_json::from_value(json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "BackupSession",
            "metadata": {"name": name, "namespace": "ns", "uid": "u-1"},
            "spec": {"invoker": {"name": "cfg"}, "session": "nightly"}}))
        .expect("session")
    }

    #[test]
    fn names_are_stable_and_short() {
        assert_eq!(object_name("s1", "data"), "hoard-s1-data");
        let long = object_name(&"x".repeat(80), "data");
        assert_eq!(long.len(), 63);
        assert_eq!(long, object_name(&"x".repeat(80), "data"), "stable across calls");
        assert_ne!(long, object_name(&"x".repeat(80), "data2"), "distinct per component");
        assert_eq!(label_value(&format!("-{}", "a".repeat(70))), "a".repeat(63));
    }

    #[test]
    fn snapshot_and_clone_are_owned_and_labelled() {
        let bs = session("nightly-1");
        let vs = volume_snapshot(&bs, "data", "data-web-0", "csi-snap");
        assert_eq!(vs.metadata.name.as_deref(), Some("hoard-nightly-1-data"));
        assert_eq!(vs.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(vs.spec.volume_snapshot_class_name.as_deref(), Some("csi-snap"));
        assert_eq!(vs.metadata.labels.as_ref().expect("labels")[SESSION_LABEL], "nightly-1");
        let owner = &vs.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("BackupSession", Some(true)));

        let source: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "data-web-0", "namespace": "ns"},
            "spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}}}))
        .expect("claim");
        let mut ready = vs.clone();
        ready.status = Some(serde_json::from_value(json!({"readyToUse": true, "restoreSize": "2Gi"})).expect("st"));
        let clone = clone_claim(&bs, "data", &source, &ready, None).expect("clone");
        let spec = clone.spec.expect("spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(spec.resources.and_then(|r| r.requests).expect("requests")["storage"], Quantity("2Gi".into()));
        let ds = spec.data_source.expect("dataSource");
        assert_eq!((ds.kind.as_str(), ds.name.as_str()), ("VolumeSnapshot", "hoard-nightly-1-data"));
        assert_eq!(ds.api_group.as_deref(), Some("snapshot.storage.k8s.io"));
        let clone = clone_claim(&bs, "data", &source, &vs, Some("other")).expect("clone");
        let spec = clone.spec.expect("spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some("other"));
        assert_eq!(spec.resources.and_then(|r| r.requests).expect("requests")["storage"], Quantity("1Gi".into()));
    }

    #[test]
    fn a_restored_claim_takes_the_overrides_and_refuses_too_small_a_size() {
        let bs = session("nightly-1");
        let mut vs = volume_snapshot(&bs, "data", "data-web-0", "csi-snap");
        assert_eq!(too_small_for("1Mi", &vs), None, "no restore size known: nothing to compare");
        vs.status = Some(serde_json::from_value(json!({"readyToUse": true, "restoreSize": "64Mi"})).expect("st"));
        assert_eq!(too_small_for("1Mi", &vs).as_deref(), Some("64Mi"));
        assert_eq!(too_small_for("64Mi", &vs), None);
        assert_eq!(too_small_for("1Gi", &vs), None);
        let modes = ["ReadWriteMany".to_string()];
        let pvc = claim_from_snapshot_sized("copy", &vs, None, Some("128Mi"), Some("slow"), Some(&modes)).expect("pvc");
        let spec = pvc.spec.expect("spec");
        assert_eq!(spec.resources.and_then(|r| r.requests).expect("requests")["storage"], Quantity("128Mi".into()));
        assert_eq!(spec.storage_class_name.as_deref(), Some("slow"));
        assert_eq!(spec.access_modes, Some(modes.to_vec()));
        let pvc = claim_from_snapshot_sized("copy", &vs, None, None, None, None).expect("pvc");
        let spec = pvc.spec.expect("spec");
        assert_eq!(spec.resources.and_then(|r| r.requests).expect("requests")["storage"], Quantity("64Mi".into()));
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
    }

    #[test]
    fn quantities() {
        assert_eq!(bytes_of("1Gi"), Some(1 << 30));
        assert_eq!(bytes_of("500M"), Some(500_000_000));
        assert_eq!(bytes_of("42"), Some(42));
        assert_eq!(bytes_of("1.5Gi"), None);
        assert_eq!(larger(Some(Quantity("1Gi".into())), Some(Quantity("1000M".into()))), Some(Quantity("1Gi".into())));
    }
}
