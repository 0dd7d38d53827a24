//! The short-lived pod a restore creates when its target claim is mounted by no running pod:
//! a writable [`hoard_csi::exposer`] pod, named and labelled after the RestoreSession, deleted
//! when the restore finished.

use k8s_openapi::api::core::v1::Pod;
use kube::Resource;

pub use hoard_csi::exposer::{ExposerState as HelperState, node_for, state};

/// Label on helper pods (value: the RestoreSession's name, shortened to a label value).
pub const HELPER_LABEL: &str = "hoard.dev/restore-session";

/// The helper pod's name for a RestoreSession (a DNS subdomain: at most 253 characters).
pub fn pod_name(restore: &str) -> String {
    let mut n = format!("hoard-restore-{restore}");
    n.truncate(253);
    n.trim_end_matches(['-', '.']).to_string()
}

/// The helper Pod: mounts `claim` (writable) as volume `volume` on `node`, owned by the
/// RestoreSession `owner`.
pub fn pod<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: &str,
    claim: &str,
    volume: &str,
    node: &str,
    image: &str,
    args: &[String],
) -> Result<Pod, serde_json::Error> {
    let label = hoard_csi::objects::label_value(owner.meta().name.as_deref().unwrap_or_default());
    let spec = hoard_csi::exposer::ExposerSpec {
        name,
        claim,
        volume,
        node,
        image,
        args,
        read_only: false,
        labels: [(HELPER_LABEL.to_string(), label)].into(),
        target: None,
    };
    hoard_csi::exposer::pod(owner, &spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_pod_is_a_writable_exposer_named_after_the_restore() {
        let rs: hoard_api::crd::RestoreSession = serde_json::from_value(serde_json::json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession",
            "metadata": {"name": "back", "namespace": "ns", "uid": "u-1"},
            "spec": {"target": {"kind": "PersistentVolumeClaim", "name": "c"},
                     "dataSource": {"repository": "r", "snapshot": "latest"}}}))
        .expect("restore");
        let p = pod(&rs, &pod_name("back"), "c", "data", "n1", "img:1", &["--pause".into()]).expect("pod");
        assert_eq!(p.metadata.name.as_deref(), Some("hoard-restore-back"));
        assert_eq!(p.metadata.labels.as_ref().expect("labels")[HELPER_LABEL], "back");
        let spec = p.spec.expect("spec");
        assert_eq!(spec.containers[0].volume_mounts.as_ref().expect("mounts")[0].read_only, Some(false));
        assert_eq!(pod_name(&"x".repeat(300)).len(), 253);
    }
}
