//! Target resolution: from a workload (or a Pod or a claim) to the volumes to back up or
//! restore, each named by the identity the node agent resolves under its kubelet directory.
//!
//! [`resolve`] is pure: it takes the pods the selector matched and the claims and volumes the
//! shell fetched. Rules:
//! * Only pods that are Running, scheduled to a node, and not being deleted count.
//! * PVC-backed volumes are taken when `wanted` is empty or names them; emptyDir and inline
//!   CSI volumes only when `wanted` names them (scratch space is rarely worth a backup).
//!   hostPath and other volume types are never taken; naming one in `wanted` is an error.
//! * A claim mounted by several pods (ReadWriteMany) is backed up once, from the first pod by
//!   name, so a Deployment with three replicas makes one component, not three.
//! * Components are named after the pod volume; when the same volume name resolves to
//!   different data in different pods (a StatefulSet's per-replica claims) the pod name is
//!   appended: `data-web-0`, `data-web-1`.
//! * A claim must be Bound to a PersistentVolume; its CSI driver or in-tree plugin goes into
//!   the identity so the agent can check the kubelet's own record of the mount.

use std::collections::{BTreeMap, BTreeSet};

use hoard_api::agent::v1::{
    CsiInlineSource, EmptyDirSource, PersistentVolumeSource, VolumeIdentity, persistent_volume_source::Plugin,
    volume_identity::Source,
};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::error::{Error, Result};

/// One volume of the target, ready to become a work order.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetVolume {
    /// Component name inside the repository snapshot and the Snapshot object.
    pub component: String,
    pub identity: VolumeIdentity,
    /// The claim, for PVC-backed volumes.
    pub claim: Option<String>,
}

impl TargetVolume {
    pub fn node(&self) -> &str {
        &self.identity.node_name
    }
}

pub use hoard_csi::exposer::pod_is_usable;

/// A label selector in the API server's query syntax (`a=b,c in (d,e),!f`).
pub fn selector_string(sel: &LabelSelector) -> Result<String> {
    let mut parts = Vec::new();
    for (k, v) in sel.match_labels.iter().flatten() {
        parts.push(format!("{k}={v}"));
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => return Err(Error::invalid("selector", format!("unknown operator {op}"))),
        });
    }
    if parts.is_empty() {
        // An empty selector would match every pod of the namespace: never what a workload means.
        return Err(Error::invalid("selector", "the workload has an empty selector"));
    }
    Ok(parts.join(","))
}

/// How the agent recognises `pv`'s mount: its CSI driver, or its in-tree plugin; `None` for
/// types hoard cannot read (hostPath, unknown).
pub fn pv_plugin(pv: &PersistentVolume) -> Option<Plugin> {
    match pv.spec.as_ref().and_then(|s| s.csi.as_ref()) {
        Some(csi) => Some(Plugin::CsiDriver(csi.driver.clone())),
        None => in_tree_plugin(pv).map(|p| Plugin::InTreePlugin(p.into())),
    }
}

fn in_tree_plugin(pv: &PersistentVolume) -> Option<&'static str> {
    let s = pv.spec.as_ref()?;
    Some(if s.nfs.is_some() {
        "kubernetes.io/nfs"
    } else if s.local.is_some() {
        "kubernetes.io/local-volume"
    } else if s.iscsi.is_some() {
        "kubernetes.io/iscsi"
    } else if s.fc.is_some() {
        "kubernetes.io/fc"
    } else if s.cephfs.is_some() {
        "kubernetes.io/cephfs"
    } else if s.rbd.is_some() {
        "kubernetes.io/rbd"
    } else {
        return None;
    })
}

/// Resolves `pods` into volumes. `claims` and `pvs` are keyed by name (claims of the pods'
/// namespace). `only_claim` restricts the result to one claim (a PersistentVolumeClaim target).
pub fn resolve(
    pods: &[Pod],
    claims: &BTreeMap<String, PersistentVolumeClaim>,
    pvs: &BTreeMap<String, PersistentVolume>,
    wanted: &[String],
    only_claim: Option<&str>,
) -> Result<Vec<TargetVolume>> {
    let mut pods: Vec<&Pod> = pods.iter().filter(|p| pod_is_usable(p)).collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut seen_claims = BTreeSet::new();
    let mut found: Vec<(String, String, TargetVolume)> = Vec::new(); // (volume name, data key, volume)
    for pod in &pods {
        let (Some(spec), Some(uid), Some(pod_name)) = (&pod.spec, &pod.metadata.uid, &pod.metadata.name) else {
            continue;
        };
        let node = spec.node_name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        for vol in spec.volumes.iter().flatten() {
            let listed = wanted.iter().any(|w| w == &vol.name);
            let (source, claim, key) = if let Some(pvc) = &vol.persistent_volume_claim {
                if !(wanted.is_empty() || listed) || only_claim.is_some_and(|c| c != pvc.claim_name) {
                    continue;
                }
                if !seen_claims.insert(pvc.claim_name.clone()) {
                    continue;
                }
                let claim = claims
                    .get(&pvc.claim_name)
                    .ok_or_else(|| Error::NotFound(format!("PersistentVolumeClaim {}", pvc.claim_name)))?;
                let pv_name = claim
                    .spec
                    .as_ref()
                    .and_then(|s| s.volume_name.clone())
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| Error::Transient(format!("claim {} is not bound yet", pvc.claim_name)))?;
                let pv = pvs.get(&pv_name).ok_or_else(|| Error::NotFound(format!("PersistentVolume {pv_name}")))?;
                let plugin = pv_plugin(pv).ok_or_else(|| {
                    Error::invalid(
                        "volume",
                        format!("PersistentVolume {pv_name} has a type hoard cannot read (hostPath or unknown)"),
                    )
                })?;
                let source = Source::Pvc(PersistentVolumeSource {
                    claim_name: pvc.claim_name.clone(),
                    pv_name,
                    plugin: Some(plugin),
                });
                (source, Some(pvc.claim_name.clone()), format!("claim:{}", pvc.claim_name))
            } else if !listed || only_claim.is_some() {
                continue;
            } else if vol.empty_dir.is_some() {
                (Source::EmptyDir(EmptyDirSource {}), None, format!("pod:{uid}"))
            } else if let Some(csi) = &vol.csi {
                (Source::CsiInline(CsiInlineSource { driver: csi.driver.clone() }), None, format!("pod:{uid}"))
            } else {
                return Err(Error::invalid(
                    "volumes",
                    format!("volume {} of pod {pod_name} is not a PVC, emptyDir or CSI volume", vol.name),
                ));
            };
            let identity = VolumeIdentity {
                node_name: node.clone(),
                pod_uid: uid.clone(),
                volume_name: vol.name.clone(),
                namespace: namespace.clone(),
                pod_name: pod_name.clone(),
                source: Some(source),
            };
            found.push((vol.name.clone(), key, TargetVolume { component: vol.name.clone(), identity, claim }));
        }
    }
    for w in wanted {
        if !found.iter().any(|(name, _, _)| name == w) && pods.iter().all(|p| !has_volume(p, w)) {
            return Err(Error::invalid("volumes", format!("no pod of the target has a volume named {w}")));
        }
    }
    // Same volume name, different data: qualify by pod.
    let mut keys_by_name: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, key, _) in &found {
        keys_by_name.entry(name.as_str()).or_default().insert(key.as_str());
    }
    let ambiguous: BTreeSet<String> =
        keys_by_name.iter().filter(|(_, k)| k.len() > 1).map(|(n, _)| (*n).to_string()).collect();
    let mut out: Vec<TargetVolume> = found
        .into_iter()
        .map(|(name, _, mut v)| {
            if ambiguous.contains(&name) {
                v.component = format!("{name}-{}", v.identity.pod_name);
            }
            v
        })
        .collect();
    out.sort_by(|a, b| a.component.cmp(&b.component));
    Ok(out)
}

fn has_volume(pod: &Pod, name: &str) -> bool {
    pod.spec.as_ref().is_some_and(|s| s.volumes.iter().flatten().any(|v| v.name == name))
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn pod(name: &str, uid: &str, node: &str, volumes: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "demo", "uid": uid},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}], "volumes": volumes},
            "status": {"phase": "Running"}
        }))
        .expect("pod")
    }

    pub fn claim(name: &str, pv: &str) -> (String, PersistentVolumeClaim) {
        let c = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"volumeName": pv}
        }))
        .expect("claim");
        (name.to_string(), c)
    }

    pub fn csi_pv(name: &str, driver: &str) -> (String, PersistentVolume) {
        let v = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"csi": {"driver": driver, "volumeHandle": name}}
        }))
        .expect("pv");
        (name.to_string(), v)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use serde_json::json;

    fn pvc_vol(name: &str, claim: &str) -> serde_json::Value {
        json!({"name": name, "persistentVolumeClaim": {"claimName": claim}})
    }

    #[test]
    fn deployment_with_shared_claim_is_one_component() {
        let pods = [
            pod("web-b", "uid-b", "n2", json!([pvc_vol("data", "shared"), {"name": "tmp", "emptyDir": {}}])),
            pod("web-a", "uid-a", "n1", json!([pvc_vol("data", "shared"), {"name": "tmp", "emptyDir": {}}])),
        ];
        let claims = [claim("shared", "pv-1")].into();
        let pvs = [csi_pv("pv-1", "ebs")].into();
        let got = resolve(&pods, &claims, &pvs, &[], None).expect("resolves");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].component, "data");
        assert_eq!(got[0].identity.pod_name, "web-a", "first pod by name");
        assert_eq!(got[0].node(), "n1");
        match &got[0].identity.source {
            Some(Source::Pvc(p)) => {
                assert_eq!(p.pv_name, "pv-1");
                assert_eq!(p.plugin, Some(Plugin::CsiDriver("ebs".into())));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn statefulset_claims_are_qualified_by_pod() {
        let pods = [
            pod("db-0", "u0", "n1", json!([pvc_vol("data", "data-db-0")])),
            pod("db-1", "u1", "n2", json!([pvc_vol("data", "data-db-1")])),
        ];
        let claims = [claim("data-db-0", "pv-0"), claim("data-db-1", "pv-1")].into();
        let pvs = [csi_pv("pv-0", "d"), csi_pv("pv-1", "d")].into();
        let got = resolve(&pods, &claims, &pvs, &[], None).expect("resolves");
        let names: Vec<_> = got.iter().map(|v| v.component.as_str()).collect();
        assert_eq!(names, ["data-db-0", "data-db-1"]);
    }

    #[test]
    fn empty_dir_only_when_listed_and_host_path_refused() {
        let pods = [pod(
            "p",
            "u",
            "n",
            json!([{"name": "cache", "emptyDir": {}}, {"name": "host", "hostPath": {"path": "/"}}]),
        )];
        let none = BTreeMap::new();
        assert!(resolve(&pods, &none, &BTreeMap::new(), &[], None).expect("ok").is_empty());
        let got = resolve(&pods, &none, &BTreeMap::new(), &["cache".into()], None).expect("ok");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].identity.source, Some(Source::EmptyDir(EmptyDirSource {})));
        assert!(resolve(&pods, &none, &BTreeMap::new(), &["host".into()], None).is_err());
        assert!(resolve(&pods, &none, &BTreeMap::new(), &["nope".into()], None).is_err());
    }

    #[test]
    fn unusable_pods_and_unbound_claims() {
        let mut p = pod("p", "u", "n", json!([pvc_vol("data", "c")]));
        p.status = Some(serde_json::from_value(json!({"phase": "Pending"})).expect("status"));
        assert!(resolve(&[p], &BTreeMap::new(), &BTreeMap::new(), &[], None).expect("ok").is_empty());
        let p = pod("p", "u", "n", json!([pvc_vol("data", "c")]));
        let unbound: BTreeMap<_, _> = [(
            "c".to_string(),
            serde_json::from_value::<PersistentVolumeClaim>(json!({"metadata": {"name": "c"}, "spec": {}})).expect("c"),
        )]
        .into();
        let e = resolve(&[p], &unbound, &BTreeMap::new(), &[], None).expect_err("unbound");
        assert!(e.is_retryable(), "{e}");
    }

    #[test]
    fn claim_target_takes_only_that_claim() {
        let pods = [pod("p", "u", "n", json!([pvc_vol("a", "ca"), pvc_vol("b", "cb")]))];
        let claims = [claim("ca", "pa"), claim("cb", "pb")].into();
        let pvs = [csi_pv("pa", "d"), csi_pv("pb", "d")].into();
        let got = resolve(&pods, &claims, &pvs, &[], Some("cb")).expect("ok");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].claim.as_deref(), Some("cb"));
    }

    #[test]
    fn selectors_render_like_kubectl() {
        let sel: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}, {"key": "x", "operator": "DoesNotExist"}]
        }))
        .expect("sel");
        assert_eq!(selector_string(&sel).expect("ok"), "app=web,tier in (a,b),!x");
        assert!(selector_string(&LabelSelector::default()).is_err());
    }
}
