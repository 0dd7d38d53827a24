//! A real API server for tests (feature `kube`): the cluster `hack/test.sh` starts with
//! `hack/kube/up.sh` and names in `HOARD_TEST_KUBECONFIG` (cluster-admin).
//!
//! Tests share the one cluster: each works in namespaces of its own ([`TestCluster::namespace`])
//! and applies the CRDs idempotently (server-side apply), so tests may run in parallel.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The test cluster, or `None` (skip) outside CI when none is running.
#[derive(Clone)]
pub struct TestCluster {
    pub client: Client,
    pub kubeconfig: std::path::PathBuf,
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
        Some(TestCluster { client, kubeconfig: path.into() })
    }

    /// Creates a fresh namespace named `<prefix>-<random>` and returns its name.
    pub async fn namespace(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{:08x}", rand_u32());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"hoard.dev/test": prefix}}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client.clone()).create(&PostParams::default(), &ns).await.unwrap();
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
