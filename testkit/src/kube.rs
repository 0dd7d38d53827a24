//! A real API server for tests (feature `kube`): the cluster `hack/test.sh` starts with
//! `hack/kube/up.sh` and names in `HOARD_TEST_KUBECONFIG` (cluster-admin).
//!
//! Tests share the one cluster: each works in namespaces of its own ([`TestCluster::namespace`])
//! and applies the CRDs idempotently (server-side apply), so tests may run in parallel. The
//! namespaces a [`TestCluster`] made are deleted when its last clone is dropped — at the end of
//! the test, passed or panicked — so no test sees another's leftovers.
//! [`FakeNode`] plays a node's kubelet for Pods bound to it (without a Ready Node, the
//! controller-manager's pod garbage collector deletes such Pods as orphans).

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

/// The test cluster, or `None` (skip) outside CI when none is running.
#[derive(Clone)]
pub struct TestCluster {
    pub client: Client,
    pub kubeconfig: std::path::PathBuf,
    made: std::sync::Arc<Janitor>,
}

/// The namespaces a [`TestCluster`] made; deletes them when dropped.
#[derive(Debug)]
struct Janitor {
    kubeconfig: PathBuf,
    namespaces: std::sync::Mutex<Vec<String>>,
}

impl Drop for Janitor {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|p| p.into_inner()));
        if names.is_empty() {
            return;
        }
        // A runtime of its own on a thread of its own: drop may run inside or outside one.
        let path = self.kubeconfig.clone();
        let deleting = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let Ok(kubeconfig) = Kubeconfig::read_from(&path) else { return };
                let Ok(config) = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await else {
                    return;
                };
                let Ok(client) = Client::try_from(config) else { return };
                let api = Api::<Namespace>::all(client);
                let params = kube::api::DeleteParams::background();
                for name in names {
                    let delete = api.delete(&name, &params);
                    let _ = tokio::time::timeout(Duration::from_secs(20), delete).await;
                }
            });
        });
        let _ = deleting.join();
    }
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster").field("kubeconfig", &self.kubeconfig).finish()
    }
}

impl TestCluster {
    pub async fn connect() -> Option<TestCluster> {
        let path = crate::require_service("HOARD_TEST_KUBECONFIG")?;
        let kubeconfig = Kubeconfig::read_from(&path).expect("read HOARD_TEST_KUBECONFIG");
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kubeconfig usable");
        let client = Client::try_from(config).expect("kube client");
        let made = std::sync::Arc::new(Janitor { kubeconfig: path.clone().into(), namespaces: Default::default() });
        Some(TestCluster { client, kubeconfig: path.into(), made })
    }

    /// Creates a fresh namespace named `<prefix>-<random>` and returns its name; it is deleted
    /// when the last clone of this cluster handle is dropped.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{:08x}", rand_u32());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"hoard.dev/test": prefix}}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &ns).await.unwrap();
        self.made.namespaces.lock().unwrap_or_else(|p| p.into_inner()).push(name.clone());
        // Pods need the `default` ServiceAccount; without kube-controller-manager nobody makes it
        // (with it, its controller may win the race: either way it exists afterwards).
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap();
        let _ = Api::<ServiceAccount>::namespaced(self.client.clone(), &name).create(&PostParams::default(), &sa).await;
        name
    }

    /// Applies `crds` (server-side, idempotent) and waits until each is Established.
    pub async fn apply_crds(&self, crds: &[CustomResourceDefinition]) {
        let api = Api::<CustomResourceDefinition>::all(self.client.clone());
        let params = PatchParams::apply("hoard-tests").force();
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap();
            api.patch(&name, &params, &Patch::Apply(crd)).await.unwrap();
        }
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let got = api.get(&name).await.unwrap();
                let established = got
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "CRD {name} not established in 30 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // /dev/urandom via getrandom is not a dependency here; the clock and pid are unique enough
    // for namespace names within one test run.
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let seed = t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32);
    let mixed = blake3::hash(&seed.to_le_bytes());
    b.copy_from_slice(&mixed.as_bytes()[..4]);
    u32::from_le_bytes(b)
}

/// The test's kubelet for one node: a Node object kept Ready by a heartbeat task (node status
/// and the node Lease, as a kubelet renews them), and the node's pod directory.
#[derive(Debug)]
pub struct FakeNode {
    pub name: String,
    pub kubelet_root: PathBuf,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl FakeNode {
    pub async fn register(client: &Client, name: &str, kubelet_root: PathBuf) -> FakeNode {
        std::fs::create_dir_all(&kubelet_root).unwrap();
        let nodes = Api::<Node>::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "hoard.dev/test-node": "true"}},
        }))
        .unwrap();
        if nodes.create(&PostParams::default(), &node).await.is_err() {
            // A node left by an earlier run with the same name: reuse it.
            nodes.get(name).await.unwrap();
        }
        heartbeat_once(client, name).await;
        let (client, node_name) = (client.clone(), name.to_string());
        let heartbeat = tokio::spawn(async move {
            // Bounded by the test's lifetime: the handle is aborted when the FakeNode drops.
            for _ in 0..10_000 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                heartbeat_once(&client, &node_name).await;
            }
        });
        FakeNode { name: name.to_string(), kubelet_root, heartbeat }
    }

    /// The directory the kubelet would mount CSI volume `pv_name` (driver `driver`) of
    /// `pod_uid` at, with the `vol_data.json` the kubelet writes beside it.
    pub fn csi_mount(&self, pod_uid: &str, pv_name: &str, driver: &str) -> PathBuf {
        let volume = self.kubelet_root.join(pod_uid).join("volumes/kubernetes.io~csi").join(pv_name);
        std::fs::create_dir_all(volume.join("mount")).unwrap();
        let vol_data = json!({"attachmentID": format!("csi-{pv_name}"), "driverName": driver, "nodeName": self.name,
                              "specVolID": pv_name, "volumeHandle": format!("handle-{pv_name}"),
                              "volumeLifecycleMode": "Persistent"});
        std::fs::write(volume.join("vol_data.json"), vol_data.to_string()).unwrap();
        volume.join("mount")
    }
}

async fn heartbeat_once(client: &Client, name: &str) {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test kubelet",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
    }});
    let _ = Api::<Node>::all(client.clone()).patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await;
    let leases = Api::<Lease>::namespaced(client.clone(), "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    }))
    .unwrap();
    let _ = leases.patch(name, &PatchParams::apply("hoard-test-kubelet").force(), &Patch::Apply(&lease)).await;
}
