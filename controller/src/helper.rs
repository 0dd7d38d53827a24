//! The short-lived pod a restore creates when its target claim is mounted by no running pod:
//! it mounts the claim on a node with a hoard agent and sleeps until the controller deletes it
//! (after the restore finished). Pure: which node, and the Pod object.
//!
//! Node choice, in order: the claim's `volume.kubernetes.io/selected-node` annotation (the
//! scheduler already bound a WaitForFirstConsumer claim there); the bound PersistentVolume's
//! required node affinity on `kubernetes.io/hostname` (local volumes); otherwise the first node
//! (by name) that runs a Ready agent. The pod is bound with `nodeName` — it bypasses the
//! scheduler, so the chosen node must be able to attach the volume; volumes restricted by
//! other topology keys (zones) should be pre-bound with the annotation.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::Resource;
use serde_json::json;

pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const HOSTNAME: &str = "kubernetes.io/hostname";
/// Label on helper pods (value: the RestoreSession's name, shortened to a label value).
pub const HELPER_LABEL: &str = "hoard.dev/restore-session";
/// Where the helper mounts the claim (the agent reads the kubelet's mount, not this path).
pub const MOUNT_PATH: &str = "/restore";

/// The helper pod's name for a RestoreSession (a DNS subdomain: at most 253 characters).
pub fn pod_name(restore: &str) -> String {
    let mut n = format!("hoard-restore-{restore}");
    n.truncate(253);
    n.trim_end_matches(['-', '.']).to_string()
}

/// The node the helper pod is bound to; `agents` are the nodes with a Ready agent.
pub fn node_for(
    claim: &PersistentVolumeClaim,
    pv: Option<&PersistentVolume>,
    agents: &[String],
) -> Result<String, String> {
    if agents.is_empty() {
        return Err("no node has a Ready hoard agent".into());
    }
    if let Some(n) = claim.metadata.annotations.as_ref().and_then(|a| a.get(SELECTED_NODE)) {
        return if agents.contains(n) {
            Ok(n.clone())
        } else {
            Err(format!("the claim is bound to node {n}, which has no Ready hoard agent"))
        };
    }
    let terms = pv
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    let mut hosts: Vec<String> = terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == HOSTNAME && e.operator == "In")
        .flat_map(|e| e.values.iter().flatten().cloned())
        .collect();
    if !hosts.is_empty() {
        hosts.sort();
        return hosts
            .into_iter()
            .find(|h| agents.contains(h))
            .ok_or_else(|| "the volume's node affinity names no node with a Ready hoard agent".into());
    }
    let mut sorted = agents.to_vec();
    sorted.sort();
    Ok(sorted.swap_remove(0))
}

/// The helper Pod: mounts `claim` as volume `volume` on `node`, owned by the RestoreSession
/// (`owner`), least privilege, tiny requests, sleeps (`image` with `args`) until deleted.
pub fn pod<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: &str,
    claim: &str,
    volume: &str,
    node: &str,
    image: &str,
    args: &[String],
) -> Result<Pod, serde_json::Error> {
    let owner_name = owner.meta().name.clone().unwrap_or_default();
    let mut label = owner_name.chars().take(63).collect::<String>();
    while label.ends_with(['-', '.', '_']) {
        label.pop();
    }
    let owner_ref = owner.controller_owner_ref(&());
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": owner.meta().namespace,
            "labels": {
                "app.kubernetes.io/name": "hoard-restore-helper",
                "app.kubernetes.io/managed-by": crate::FIELD_MANAGER,
                HELPER_LABEL: label,
            },
            "ownerReferences": owner_ref.map(|o| vec![o]).unwrap_or_default(),
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "hold",
                "image": image,
                "args": args,
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}},
                "volumeMounts": [{"name": volume, "mountPath": MOUNT_PATH}],
            }],
            "volumes": [{"name": volume, "persistentVolumeClaim": {"claimName": claim}}],
        },
    }))
}

/// Where the helper stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelperState {
    /// Running on a node: the restore can be dispatched.
    Running,
    /// Created, not running yet (message for status).
    Waiting(String),
    /// Ended or being deleted: it cannot serve this restore.
    Gone(String),
}

pub fn state(p: &Pod) -> HelperState {
    let name = p.metadata.name.clone().unwrap_or_default();
    if p.metadata.deletion_timestamp.is_some() {
        return HelperState::Gone(format!("helper pod {name} is being deleted"));
    }
    match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Running") if crate::target::pod_is_usable(p) => HelperState::Running,
        Some(ph @ ("Succeeded" | "Failed")) => HelperState::Gone(format!("helper pod {name} ended ({ph})")),
        ph => HelperState::Waiting(format!("waiting for helper pod {name} ({})", ph.unwrap_or("Pending"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(selected: Option<&str>) -> PersistentVolumeClaim {
        let mut c: PersistentVolumeClaim =
            serde_json::from_value(json!({"metadata": {"name": "c", "namespace": "ns"}})).unwrap();
        if let Some(n) = selected {
            c.metadata.annotations = Some([(SELECTED_NODE.to_string(), n.to_string())].into());
        }
        c
    }

    fn local_pv(hosts: &[&str]) -> PersistentVolume {
        serde_json::from_value(json!({"metadata": {"name": "pv"}, "spec": {"nodeAffinity": {"required": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": HOSTNAME, "operator": "In", "values": hosts}]}]}}}}))
        .unwrap()
    }

    #[test]
    fn node_choice() {
        let agents = vec!["n2".to_string(), "n1".to_string(), "n3".to_string()];
        assert_eq!(node_for(&claim(None), None, &agents), Ok("n1".into()), "any agent node, by name");
        assert_eq!(node_for(&claim(Some("n3")), None, &agents), Ok("n3".into()), "the selected node");
        assert!(node_for(&claim(Some("n9")), None, &agents).is_err(), "selected node without an agent");
        assert_eq!(node_for(&claim(None), Some(&local_pv(&["n9", "n2"])), &agents), Ok("n2".into()));
        assert!(node_for(&claim(None), Some(&local_pv(&["n9"])), &agents).is_err());
        assert!(node_for(&claim(None), None, &[]).is_err());
    }

    #[test]
    fn helper_pod_shape() {
        let rs: hoard_api::crd::RestoreSession = serde_json::from_value(json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession",
            "metadata": {"name": "back", "namespace": "ns", "uid": "u-1"},
            "spec": {"target": {"kind": "PersistentVolumeClaim", "name": "c"},
                     "dataSource": {"repository": "r", "snapshot": "latest"}}}))
        .unwrap();
        let p = pod(&rs, &pod_name("back"), "c", "data", "n1", "img:1", &["--pause".into()]).unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("hoard-restore-back"));
        let spec = p.spec.clone().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.volumes.unwrap()[0].persistent_volume_claim.as_ref().unwrap().claim_name, "c");
        assert_eq!(spec.containers[0].args.as_deref(), Some(&["--pause".to_string()][..]));
        let owner = &p.metadata.owner_references.clone().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("RestoreSession", "u-1", Some(true)));
        assert_eq!(p.metadata.labels.as_ref().unwrap()[HELPER_LABEL], "back");
        assert!(matches!(state(&p), HelperState::Waiting(_)));
        assert_eq!(pod_name(&"x".repeat(300)).len(), 253);
    }
}
