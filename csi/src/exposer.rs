//! The short-lived, unprivileged pod that mounts a claim on a node with a hoard agent, so the
//! agent can read it (a snapshot's clone, or a claim no pod mounts) or write it (a restore into
//! a claim no pod mounts). It sleeps until the controller deletes it. Pure: which node, the Pod
//! object, and where the pod stands.
//!
//! Node choice. The claim's `volume.kubernetes.io/selected-node` annotation is written by the
//! scheduler, but a tenant can write it too, and the pod is bound with `nodeName` (it bypasses
//! the scheduler and its taints), so the annotation only counts where the volume's own topology
//! cannot say: a bound PersistentVolume's required node affinity on `kubernetes.io/hostname`
//! (local volumes) decides among its nodes (the annotation only picks one of them); a bound
//! volume with no required node affinity (network storage) goes to the first node (by name)
//! with a Ready agent, whatever the annotation says; the annotation is followed for a claim not
//! bound yet (WaitForFirstConsumer) and for volumes restricted by other topology keys (zones),
//! which hoard cannot check without reading Node objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::Resource;
use serde_json::json;

pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const HOSTNAME: &str = "kubernetes.io/hostname";
/// Where the pod mounts the claim (the agent reads the kubelet's mount, not this path).
pub const MOUNT_PATH: &str = "/data";
/// Where the pod mounts its second, writable claim ([`ExposerSpec::target`]).
pub const TARGET_MOUNT_PATH: &str = "/target";

/// The node the helper pod is bound to; `agents` are the nodes with a Ready agent.
pub fn node_for(
    claim: &PersistentVolumeClaim,
    pv: Option<&PersistentVolume>,
    agents: &[String],
) -> Result<String, String> {
    if agents.is_empty() {
        return Err("no node has a Ready hoard agent".into());
    }
    let selected = claim.metadata.annotations.as_ref().and_then(|a| a.get(SELECTED_NODE));
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
        hosts.retain(|h| agents.contains(h));
        if let Some(n) = selected.filter(|n| hosts.contains(n)) {
            return Ok(n.clone());
        }
        return hosts
            .into_iter()
            .next()
            .ok_or_else(|| "the volume's node affinity names no node with a Ready hoard agent".into());
    }
    // Unbound (the scheduler's choice is all there is) or zone-restricted: the annotation.
    if let Some(n) = selected.filter(|_| pv.is_none() || !terms.is_empty()) {
        return if agents.contains(n) {
            Ok(n.clone())
        } else {
            Err(format!("the claim is bound to node {n}, which has no Ready hoard agent"))
        };
    }
    let mut sorted = agents.to_vec();
    sorted.sort();
    Ok(sorted.swap_remove(0))
}

/// What the exposer pod mounts and where it runs.
#[derive(Debug, Clone)]
pub struct ExposerSpec<'a> {
    pub name: &'a str,
    pub claim: &'a str,
    /// The pod volume's name (the agent's work order names it).
    pub volume: &'a str,
    pub node: &'a str,
    pub image: &'a str,
    pub args: &'a [String],
    /// Mount the claim read-only (backups); restores need it writable.
    pub read_only: bool,
    /// Labels besides `app.kubernetes.io/name` and `managed-by`.
    pub labels: BTreeMap<String, String>,
    /// A second claim, mounted writable: `(claim, pod volume name)` — the claim a copy from a
    /// VolumeSnapshot's clone writes into, when no running pod mounts it.
    pub target: Option<(&'a str, &'a str)>,
}

/// The exposer Pod, owned (as controller) by `owner`: least privilege, tiny requests, sleeps
/// (`image` with `args`) until deleted.
pub fn pod<K: Resource<DynamicType = ()>>(owner: &K, spec: &ExposerSpec<'_>) -> Result<Pod, serde_json::Error> {
    let mut labels = spec.labels.clone();
    labels.insert("app.kubernetes.io/name".into(), "hoard-exposer".into());
    labels.insert("app.kubernetes.io/managed-by".into(), crate::MANAGED_BY.into());
    let owner_ref = owner.controller_owner_ref(&());
    let mut mounts = vec![json!({"name": spec.volume, "mountPath": MOUNT_PATH, "readOnly": spec.read_only})];
    let mut volumes = vec![
        json!({"name": spec.volume, "persistentVolumeClaim": {"claimName": spec.claim, "readOnly": spec.read_only}}),
    ];
    if let Some((claim, volume)) = spec.target {
        mounts.push(json!({"name": volume, "mountPath": TARGET_MOUNT_PATH, "readOnly": false}));
        volumes.push(json!({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": false}}));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": spec.name,
            "namespace": owner.meta().namespace,
            "labels": labels,
            "ownerReferences": owner_ref.map(|o| vec![o]).unwrap_or_default(),
        },
        "spec": {
            "nodeName": spec.node,
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "hold",
                "image": spec.image,
                "args": spec.args,
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"requests": {"cpu": "1m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    }))
}

/// Where the exposer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExposerState {
    /// Running on a node: its volume can be named in a work order.
    Running,
    /// Created, not running yet (message for status).
    Waiting(String),
    /// Ended or being deleted: it cannot serve this restore.
    Gone(String),
}

/// Whether a pod can serve as a volume's source: Running, on a node, not terminating, with a
/// UID.
pub fn pod_is_usable(pod: &Pod) -> bool {
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| !n.is_empty());
    running && node && pod.metadata.deletion_timestamp.is_none() && pod.metadata.uid.is_some()
}

pub fn state(p: &Pod) -> ExposerState {
    let name = p.metadata.name.clone().unwrap_or_default();
    if p.metadata.deletion_timestamp.is_some() {
        return ExposerState::Gone(format!("exposer pod {name} is being deleted"));
    }
    match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Running") if pod_is_usable(p) => ExposerState::Running,
        Some(ph @ ("Succeeded" | "Failed")) => ExposerState::Gone(format!("exposer pod {name} ended ({ph})")),
        ph => ExposerState::Waiting(format!("waiting for exposer pod {name} ({})", ph.unwrap_or("Pending"))),
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
    fn the_annotation_cannot_steer_a_bound_volume_outside_its_topology() {
        let agents = vec!["n1".to_string(), "n2".to_string(), "n3".to_string(), "x-control-plane".to_string()];
        let network_pv: PersistentVolume =
            serde_json::from_value(json!({"metadata": {"name": "pv"}, "spec": {}})).unwrap();
        let steered = claim(Some("x-control-plane"));
        assert_eq!(
            node_for(&steered, Some(&network_pv), &agents),
            Ok("n1".into()),
            "network storage: annotation ignored"
        );
        assert_eq!(node_for(&steered, Some(&local_pv(&["n2"])), &agents), Ok("n2".into()), "a local volume's node");
        assert_eq!(node_for(&claim(Some("n3")), Some(&local_pv(&["n2", "n3"])), &agents), Ok("n3".into()));
        let zonal: PersistentVolume =
            serde_json::from_value(json!({"metadata": {"name": "pv"}, "spec": {"nodeAffinity":
            {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"]}]}]}}}}))
            .unwrap();
        assert_eq!(node_for(&claim(Some("n3")), Some(&zonal), &agents), Ok("n3".into()), "zones: the scheduler's pick");
    }

    #[test]
    fn exposer_pod_shape() {
        let rs: hoard_api::crd::RestoreSession = serde_json::from_value(json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession",
            "metadata": {"name": "back", "namespace": "ns", "uid": "u-1"},
            "spec": {"target": {"kind": "PersistentVolumeClaim", "name": "c"},
                     "dataSource": {"repository": "r", "snapshot": "latest"}}}))
        .unwrap();
        let args = ["--pause".to_string()];
        let spec = ExposerSpec {
            name: "hoard-restore-back",
            claim: "c",
            volume: "data",
            node: "n1",
            image: "img:1",
            args: &args,
            read_only: true,
            labels: [("hoard.dev/restore-session".to_string(), "back".to_string())].into(),
            target: None,
        };
        let p = pod(&rs, &spec).unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("hoard-restore-back"));
        let pod_spec = p.spec.clone().unwrap();
        assert_eq!(pod_spec.node_name.as_deref(), Some("n1"));
        let volume = &pod_spec.volumes.unwrap()[0];
        let claim = volume.persistent_volume_claim.as_ref().unwrap();
        assert_eq!((claim.claim_name.as_str(), claim.read_only), ("c", Some(true)));
        let container = &pod_spec.containers[0];
        assert_eq!(container.args.as_deref(), Some(&args[..]));
        assert_eq!(container.volume_mounts.as_ref().unwrap()[0].read_only, Some(true));
        let owner = &p.metadata.owner_references.clone().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("RestoreSession", "u-1", Some(true)));
        let labels = p.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["hoard.dev/restore-session"], "back");
        assert_eq!(labels["app.kubernetes.io/managed-by"], crate::MANAGED_BY);
        assert!(matches!(state(&p), ExposerState::Waiting(_)));

        // A copy's exposer: the clone read-only first, the target claim writable second.
        let p = pod(&rs, &ExposerSpec { target: Some(("c2", "target")), ..spec }).unwrap();
        let pod_spec = p.spec.unwrap();
        let volumes = pod_spec.volumes.unwrap();
        let claims: Vec<_> =
            volumes.iter().map(|v| v.persistent_volume_claim.clone().map(|c| (c.claim_name, c.read_only))).collect();
        assert_eq!(claims, [Some(("c".into(), Some(true))), Some(("c2".into(), Some(false)))]);
        let mounts = pod_spec.containers[0].volume_mounts.clone().unwrap();
        assert_eq!((mounts[1].mount_path.as_str(), mounts[1].read_only), (TARGET_MOUNT_PATH, Some(false)));
    }
}
