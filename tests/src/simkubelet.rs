//! SIMULATION of the node's kubelet volume mounting, for the CSI tests until a real kubelet
//! node runs them (issue 10). Everything else in those tests is real: API server, KCM, the CSI
//! hostpath driver, its provisioner and snapshotter, the snapshot controller, the hoard
//! controller and agents.
//!
//! What it plays: for every pod bound to one of its [`FakeNode`]s it lays the kubelet's
//! directory out — `<kubelet root>/<pod uid>/volumes/kubernetes.io~csi/<pv>/mount` with the
//! `vol_data.json` beside it — and bind-mounts the claim's real hostpath volume directory
//! (`<driver state dir>/<volume handle>`) there, as NodePublishVolume would; then it marks the
//! pod Running. A pod being deleted is unmounted and its deletion finished (grace 0), as the
//! kubelet confirms a deletion. Mounts are lazily unmounted when this drops.
//!
//! Bounded: it polls every 250 ms, at most [`MAX_PASSES`] times, and stops when dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hoard_testkit::kubelet::{TestMount, bind_mount};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};

use crate::{FakeNode, mark_running};

pub const MAX_PASSES: u32 = 40_000;

/// Label of the pods the hoard controller creates to mount a clone or an unmounted claim.
const EXPOSER: (&str, &str) = ("app.kubernetes.io/name", "hoard-exposer");

#[derive(Debug)]
pub struct SimKubelet {
    task: tokio::task::JoinHandle<()>,
    /// While set, exposer pods are left Pending (a test acts between steps).
    pub hold_exposers: Arc<AtomicBool>,
    mounts: Arc<Mutex<BTreeMap<String, Vec<TestMount>>>>,
}

impl Drop for SimKubelet {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(mut m) = self.mounts.lock() {
            m.clear();
        }
    }
}

#[derive(Debug, Clone)]
struct NodeDir {
    name: String,
    kubelet_root: PathBuf,
}

impl SimKubelet {
    /// Plays the kubelet of `nodes` for pods in `namespace`; CSI volumes of driver
    /// `hostpath_driver` are mounted from `state_dir`, volumes of other drivers get an empty
    /// directory of their own.
    pub fn start(
        client: &Client,
        namespace: &str,
        nodes: &[&FakeNode],
        hostpath_driver: &str,
        state_dir: PathBuf,
    ) -> Self {
        let nodes: Vec<NodeDir> =
            nodes.iter().map(|n| NodeDir { name: n.name.clone(), kubelet_root: n.kubelet_root.clone() }).collect();
        let hold = Arc::new(AtomicBool::new(false));
        let mounts: Arc<Mutex<BTreeMap<String, Vec<TestMount>>>> = Arc::default();
        let (client, ns, driver) = (client.clone(), namespace.to_string(), hostpath_driver.to_string());
        let (hold2, mounts2) = (Arc::clone(&hold), Arc::clone(&mounts));
        let task = tokio::spawn(async move {
            for _ in 0..MAX_PASSES {
                pass(&client, &ns, &nodes, &driver, &state_dir, &hold2, &mounts2).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        SimKubelet { task, hold_exposers: hold, mounts }
    }
}

async fn pass(
    client: &Client,
    ns: &str,
    nodes: &[NodeDir],
    driver: &str,
    state_dir: &std::path::Path,
    hold: &AtomicBool,
    mounts: &Mutex<BTreeMap<String, Vec<TestMount>>>,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(list) = pods.list(&ListParams::default()).await else { return };
    let alive: Vec<String> = list.items.iter().filter_map(|p| p.metadata.uid.clone()).collect();
    if let Ok(mut m) = mounts.lock() {
        m.retain(|uid, _| alive.contains(uid));
    }
    for pod in list.items {
        let (Some(name), Some(uid)) = (pod.metadata.name.clone(), pod.metadata.uid.clone()) else { continue };
        let Some(node) =
            pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).and_then(|n| nodes.iter().find(|d| &d.name == n))
        else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            if let Ok(mut m) = mounts.lock() {
                m.remove(&uid);
            }
            let _ = pods.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase == Some("Running") || mounts.lock().map(|m| m.contains_key(&uid)).unwrap_or(true) {
            continue;
        }
        let exposer = pod.metadata.labels.as_ref().and_then(|l| l.get(EXPOSER.0)).is_some_and(|v| v == EXPOSER.1);
        if exposer && hold.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(made) = mount_volumes(client, ns, node, &pod, &uid, driver, state_dir).await {
            if let Ok(mut m) = mounts.lock() {
                m.insert(uid.clone(), made);
            }
            mark_running(client, ns, &pod).await;
        }
    }
}

/// Lays out and mounts every claim of `pod`; `None` while one is not bound yet.
async fn mount_volumes(
    client: &Client,
    ns: &str,
    node: &NodeDir,
    pod: &Pod,
    uid: &str,
    driver: &str,
    state_dir: &std::path::Path,
) -> Option<Vec<TestMount>> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let mut made = Vec::new();
    for vol in pod.spec.as_ref()?.volumes.iter().flatten() {
        let Some(pvc) = &vol.persistent_volume_claim else { continue };
        let claim = claims.get(&pvc.claim_name).await.ok()?;
        let pv_name = claim.spec.as_ref()?.volume_name.clone().filter(|n| !n.is_empty())?;
        let pv = pvs.get(&pv_name).await.ok()?;
        let csi = pv.spec.as_ref()?.csi.as_ref()?;
        let volume = node.kubelet_root.join(uid).join("volumes/kubernetes.io~csi").join(&pv_name);
        let mount = volume.join("mount");
        std::fs::create_dir_all(&mount).ok()?;
        let vol_data = serde_json::json!({"attachmentID": format!("csi-{pv_name}"), "driverName": csi.driver,
            "nodeName": node.name, "specVolID": pv_name, "volumeHandle": csi.volume_handle,
            "volumeLifecycleMode": "Persistent"});
        std::fs::write(volume.join("vol_data.json"), vol_data.to_string()).ok()?;
        let source = if csi.driver == driver {
            state_dir.join(&csi.volume_handle)
        } else {
            node.kubelet_root.join("../other-drivers").join(&csi.volume_handle)
        };
        std::fs::create_dir_all(&source).ok()?;
        made.push(bind_mount(&source, &mount).ok()?);
    }
    Some(made)
}
