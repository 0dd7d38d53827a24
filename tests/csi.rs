//! CSI VolumeSnapshots end to end, against real components: the API server, KCM, the CSI
//! hostpath driver with its provisioner and snapshotter, the snapshot controller (all started
//! by `hack/kube/up.sh --with-csi`), the hoard controller as its ServiceAccount with the
//! chart's RBAC, two hoard agents, S3 on loopback.
//!
//! SIMULATED: the node's kubelet mounting (see `hoard_e2e::simkubelet`): pods are marked Running
//! by the test, which bind-mounts each claim's real hostpath volume directory where the kubelet
//! would publish it. Everything the hoard controller and agents do is real.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use hoard_api::crd::{
    BackupSession, ComponentPhase, Condition, ReadFrom, RestorePhase, RestoreSession, SessionPhase, Snapshot,
    SnapshotPhase,
};
use hoard_csi::types::VolumeSnapshot;
use hoard_e2e::simkubelet::SimKubelet;
use hoard_e2e::*;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use serde_json::json;

const PASSWORD: &str = "csi-correct-horse";

fn chart_crds() -> Vec<CustomResourceDefinition> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart/hoard/crds");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| serde_yaml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect()
}

/// The CSI stack `hack/kube/up.sh --with-csi` started.
struct Csi {
    driver: String,
    storage_class: String,
    state_dir: PathBuf,
}

/// Held by each test for its whole run: a hoard controller reconciles every namespace, so two
/// tests' controllers would act on each other's sessions (and find no agents of theirs there).
static ONE_CONTROLLER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test's world: its namespaces, two nodes with agents, the controller, the simulated
/// kubelet mounts, S3 storage and a repository password. Dropping it stops the processes and
/// unmounts; [`Harness::finish`] also deletes the namespaces and cluster objects it made.
struct Harness {
    cluster: TestCluster,
    client: kube::Client,
    tmp: tempfile::TempDir,
    system_ns: String,
    ns: String,
    nodes: Vec<FakeNode>,
    _agents: Vec<Proc>,
    controller: Option<Proc>,
    controller_kubeconfig: PathBuf,
    pki: PathBuf,
    csi: Csi,
    kubelet: Option<SimKubelet>,
    classes: Vec<String>,
    /// Namespaces besides `ns` a test made (deleted by [`Harness::finish`]).
    other_namespaces: Vec<String>,
    _exclusive: tokio::sync::MutexGuard<'static, ()>,
}

impl Harness {
    async fn new(prefix: &str) -> Option<Harness> {
        let cluster = TestCluster::connect().await?;
        let exclusive = ONE_CONTROLLER_AT_A_TIME.lock().await;
        let s3 = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT")?;
        let csi = Csi {
            driver: hoard_testkit::require_service("HOARD_TEST_CSI_DRIVER")?,
            storage_class: hoard_testkit::require_service("HOARD_TEST_CSI_STORAGE_CLASS")?,
            state_dir: hoard_testkit::require_service("HOARD_TEST_CSI_STATE_DIR")?.into(),
        };
        let client = cluster.client.clone();
        cluster.apply_crds(&chart_crds()).await;
        let tmp = tempfile::tempdir().unwrap();
        let system_ns = cluster.namespace(&format!("{prefix}-sys")).await;
        let ns = cluster.namespace(prefix).await;
        let suffix = ns.rsplit('-').next().unwrap().to_string();
        let mut nodes = Vec::new();
        for n in ["a", "b"] {
            let root = tmp.path().join(format!("node-{n}/pods"));
            nodes.push(FakeNode::register(&client, &format!("{prefix}-{n}-{suffix}"), root).await);
        }
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let pki = hoard_testkit::make_cluster_pki(&tmp.path().join("pki"), &names);
        let mut agents = Vec::new();
        for node in &nodes {
            let (agent, port) = start_agent(&node.name, &node.kubelet_root, &pki, &tmp.path().join("work"));
            agents.push(agent);
            run_pod(
                &client,
                &system_ns,
                json!({
                    "metadata": {"name": format!("hoard-agent-{}", node.name),
                                 "labels": {"app.kubernetes.io/name": "hoard-agent"}},
                    "spec": {"nodeName": node.name, "automountServiceAccountToken": false,
                             "containers": [{"name": "agent", "image": "hoard-agent:e2e",
                                             "ports": [{"name": "grpc", "containerPort": port}]}]}
                }),
            )
            .await;
        }
        let node_refs: Vec<&FakeNode> = nodes.iter().collect();
        let kubelet = SimKubelet::start(&client, &ns, &node_refs, &csi.driver, csi.state_dir.clone());

        secret(&client, &ns, "s3-creds", &[("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")])
            .await;
        secret(&client, &ns, "repo-pass", &[("RESTIC_PASSWORD", PASSWORD)]).await;
        let allow = allowlist();
        let controller_kubeconfig = service_account_kubeconfig(
            &cluster,
            &system_ns,
            "hoard-controller",
            &allow,
            &tmp.path().join("controller.kubeconfig"),
        )
        .await;
        let h = Harness {
            cluster,
            client,
            tmp,
            system_ns,
            ns,
            nodes,
            _agents: agents,
            controller: None,
            controller_kubeconfig,
            pki,
            csi,
            kubelet: Some(kubelet),
            classes: Vec::new(),
            other_namespaces: Vec::new(),
            _exclusive: exclusive,
        };
        h.create(
            "BackupStorage",
            "backupstorages",
            json!({"metadata": {"name": "s3"}, "spec": {"storage": {"provider": "s3", "s3": {
                "endpoint": s3, "bucket": "hoard-test", "prefix": format!("csi-{suffix}"), "region": "us-east-1",
                "secretName": "s3-creds"}}}}),
        )
        .await;
        Some(h)
    }

    fn start_controller(&mut self) {
        self.controller = Some(start_controller_with(
            &self.controller_kubeconfig,
            &self.system_ns,
            &self.pki,
            &self.tmp.path().join("work"),
            free_port(),
            &["--helper-image", "hoard-controller:e2e"],
        ));
    }

    fn controller_log(&self) -> String {
        self.controller.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    async fn create(&self, kind: &str, plural: &str, body: serde_json::Value) {
        let ar = ApiResource {
            group: "hoard.dev".into(),
            version: "v1alpha1".into(),
            api_version: "hoard.dev/v1alpha1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &self.ns, &ar);
        let mut body = body;
        body["apiVersion"] = json!("hoard.dev/v1alpha1");
        body["kind"] = json!(kind);
        api.create(&PostParams::default(), &serde_json::from_value(body).unwrap()).await.unwrap();
    }

    /// A BackupConfiguration of `target` with one session `now` into repository `repo`.
    async fn configuration(&self, name: &str, target: serde_json::Value, repo: &str, snapshot: serde_json::Value) {
        let mut session = json!({"name": "now", "scheduler": {"schedule": "0 0 1 1 *"},
            "repositories": [{"name": repo, "backend": "main", "encryptionSecret": {"name": "repo-pass"}}]});
        if !snapshot.is_null() {
            session["volumeSnapshot"] = snapshot;
        }
        self.create(
            "BackupConfiguration",
            "backupconfigurations",
            json!({"metadata": {"name": name}, "spec": {"target": target,
                "backends": [{"name": "main", "storageRef": {"name": "s3"}}], "sessions": [session]}}),
        )
        .await;
    }

    /// Starts a BackupSession of `config` (not waiting).
    async fn trigger(&self, config: &str, name: &str) {
        let bs: BackupSession = serde_json::from_value(json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "BackupSession", "metadata": {"name": name},
            "spec": {"invoker": {"name": config}, "session": "now"}}))
        .unwrap();
        Api::<BackupSession>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &bs)
            .await
            .unwrap();
    }

    /// Waits (bounded) until session `name` has finished; on timeout panics with its status and
    /// the controller's log.
    async fn finished(&self, name: &str, timeout: Duration) -> BackupSession {
        let api = Api::<BackupSession>::namespaced(self.client.clone(), &self.ns);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let bs = api.get_opt(name).await.unwrap();
            let status = bs.as_ref().and_then(|b| b.status.clone());
            if let Some(bs) =
                bs.filter(|_| status.as_ref().and_then(|s| s.phase).is_some_and(SessionPhase::is_finished))
            {
                return bs;
            }
            if std::time::Instant::now() > deadline {
                panic!("{name} not finished after {timeout:?}: {status:#?}\n{}", self.controller_log());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits for the session's `VolumesReady` condition to have `reason`.
    async fn volumes_condition(&self, name: &str, reason: &str, timeout: Duration) -> Condition {
        let api = Api::<BackupSession>::namespaced(self.client.clone(), &self.ns);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let status = api.get_opt(name).await.unwrap().and_then(|b| b.status);
            let found = status.iter().flat_map(|s| s.conditions.iter()).find(|c| c.type_ == "VolumesReady");
            if let Some(c) = found.filter(|c| c.reason == reason) {
                return c.clone();
            }
            if std::time::Instant::now() > deadline {
                panic!("{name}: no VolumesReady condition with reason {reason} after {timeout:?}: {status:#?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A claim of the hostpath driver's StorageClass, bound by the real provisioner; returns
    /// the volume's directory (the hostpath driver keeps a volume as a plain directory).
    async fn claim(&self, name: &str) -> PathBuf {
        let claims = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &self.ns);
        let pvc: PersistentVolumeClaim = from_json(json!({
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": self.csi.storage_class,
                     "resources": {"requests": {"storage": "64Mi"}}}}));
        claims.create(&PostParams::default(), &pvc).await.unwrap();
        self.volume_dir(name, Duration::from_secs(60)).await
    }

    /// The hostpath directory of bound claim `name`.
    async fn volume_dir(&self, name: &str, timeout: Duration) -> PathBuf {
        self.volume_dir_in(&self.ns, name, timeout).await
    }

    /// The hostpath directory of claim `name` of namespace `ns`, once bound.
    async fn volume_dir_in(&self, ns: &str, name: &str, timeout: Duration) -> PathBuf {
        let claims = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns);
        let bound =
            wait_for(&claims, name, timeout, |c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
                .await;
        let pv_name = bound.spec.unwrap().volume_name.unwrap();
        let pv = Api::<PersistentVolume>::all(self.client.clone()).get(&pv_name).await.unwrap();
        let handle = pv.spec.unwrap().csi.unwrap().volume_handle;
        self.csi.state_dir.join(handle)
    }

    /// A VolumeSnapshotClass for `driver` (cluster-scoped; deleted by [`Harness::finish`]).
    async fn snapshot_class(&mut self, name: &str, driver: &str, default: bool) {
        let mut meta = json!({"name": name});
        if default {
            meta["annotations"] = json!({"snapshot.storage.kubernetes.io/is-default-class": "true"});
        }
        let class: hoard_csi::types::VolumeSnapshotClass = from_json(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
            "metadata": meta, "driver": driver, "deletionPolicy": "Delete"}));
        Api::<hoard_csi::types::VolumeSnapshotClass>::all(self.client.clone())
            .create(&PostParams::default(), &class)
            .await
            .unwrap();
        self.classes.push(name.to_string());
    }

    /// Waits (bounded) until no pod, claim or VolumeSnapshot of session `bs` is left.
    async fn assert_cleaned_up(&self, bs: &str) {
        self.assert_cleaned_up_except_deleting(bs, false).await;
    }

    /// [`Harness::assert_cleaned_up`], where `deleting_snapshots_ok` accepts VolumeSnapshots
    /// whose deletion hoard requested but a driver with no snapshotter can never finish.
    async fn assert_cleaned_up_except_deleting(&self, bs: &str, deleting_snapshots_ok: bool) {
        let lp = ListParams::default().labels(&format!("hoard.dev/backup-session={bs}"));
        let (pods, claims, snaps) = (
            Api::<Pod>::namespaced(self.client.clone(), &self.ns),
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &self.ns),
            Api::<VolumeSnapshot>::namespaced(self.client.clone(), &self.ns),
        );
        let mut left = Vec::new();
        for _ in 0..120 {
            left.clear();
            left.extend(
                pods.list(&lp).await.unwrap().items.into_iter().map(|p| format!("pod {}", name_of(&p.metadata))),
            );
            left.extend(
                claims.list(&lp).await.unwrap().items.into_iter().map(|c| format!("claim {}", name_of(&c.metadata))),
            );
            left.extend(
                snaps
                    .list(&lp)
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .filter(|s| !(deleting_snapshots_ok && s.metadata.deletion_timestamp.is_some()))
                    .map(|s| format!("snapshot {}", name_of(&s.metadata))),
            );
            if left.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("session {bs} left {left:?} behind\n{}", self.controller_log());
    }

    /// What an administrator does about a driver that is gone: drops the finalizers of the
    /// session's VolumeSnapshots and their contents, so their deletion (and the namespace's)
    /// can finish.
    async fn release_stuck_snapshots(&self, bs: &str) {
        let lp = ListParams::default().labels(&format!("hoard.dev/backup-session={bs}"));
        let snaps = Api::<VolumeSnapshot>::namespaced(self.client.clone(), &self.ns);
        let contents: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &ApiResource {
                group: "snapshot.storage.k8s.io".into(),
                version: "v1".into(),
                api_version: "snapshot.storage.k8s.io/v1".into(),
                kind: "VolumeSnapshotContent".into(),
                plural: "volumesnapshotcontents".into(),
            },
        );
        let release = Patch::Merge(json!({"metadata": {"finalizers": null}}));
        for vs in snaps.list(&lp).await.unwrap().items {
            let content = vs.status.as_ref().and_then(|s| s.bound_volume_snapshot_content_name.clone());
            let _ = snaps.patch(&name_of(&vs.metadata), &PatchParams::default(), &release).await;
            if let Some(content) = content {
                let _ = contents.patch(&content, &PatchParams::default(), &release).await;
                let _ = contents.delete(&content, &DeleteParams::default()).await;
            }
        }
    }

    /// Deletes what the test made outside its temporary directory.
    async fn finish(mut self) {
        self.controller = None;
        for class in &self.classes {
            let _ = Api::<hoard_csi::types::VolumeSnapshotClass>::all(self.client.clone())
                .delete(class, &DeleteParams::default())
                .await;
        }
        let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client.clone());
        for ns in [&self.ns, &self.system_ns].into_iter().chain(&self.other_namespaces) {
            let _ = namespaces.delete(ns, &DeleteParams::default()).await;
        }
        // The simulated kubelet finishes pod deletions while the namespaces go away.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let pods = Api::<Pod>::namespaced(self.client.clone(), &self.ns).list(&ListParams::default()).await;
            if pods.map(|l| l.items.is_empty()).unwrap_or(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.kubelet = None;
        for node in &self.nodes {
            let _ = Api::<k8s_openapi::api::core::v1::Node>::all(self.client.clone())
                .delete(&node.name, &DeleteParams::default())
                .await;
        }
        let _ = &self.cluster;
    }
}

fn name_of(m: &kube::api::ObjectMeta) -> String {
    m.name.clone().unwrap_or_default()
}

fn write_tree(dir: &Path, seed: u64, marker: &str) {
    std::fs::create_dir_all(dir.join("db")).unwrap();
    for i in 0..12u64 {
        std::fs::write(dir.join(format!("db/{i}.dat")), hoard_testkit::random_bytes(40_000 + i as usize, seed + i))
            .unwrap();
    }
    std::fs::write(dir.join("marker.txt"), marker).unwrap();
}

async fn snapshot_of(h: &Harness, bs: &BackupSession) -> Snapshot {
    let status = bs.status.clone().unwrap();
    assert_eq!(status.snapshots.len(), 1, "{status:#?}");
    Api::<Snapshot>::namespaced(h.client.clone(), &h.ns).get(&status.snapshots[0].name).await.unwrap()
}

/// Restores repository `repo`'s latest snapshot into a new claim no pod mounts and returns its
/// directory.
/// A VolumeSnapshot of one namespace restores into a new claim of another only with its
/// owner's consent (an annotation naming that namespace): without it the RestoreSession is
/// Invalid and nothing is made; with it hoard imports the snapshot (a pre-provisioned content
/// that retains the data, bound to a VolumeSnapshot of the target namespace), the claim holds
/// the snapshot's content, and the import is deleted afterwards while the source and the
/// storage system's snapshot stay: a second restore from it succeeds too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_snapshot_restores_into_another_namespace_with_consent() {
    let Some(mut h) = Harness::new("csi-share").await else { return };
    let class = format!("{}-share", h.ns);
    let driver = h.csi.driver.clone();
    h.snapshot_class(&class, &driver, false).await;
    let data = h.claim("data").await;
    write_tree(&data, 77, "shared generation");
    let expected = tree_contents(&data);
    let snaps = Api::<VolumeSnapshot>::namespaced(h.client.clone(), &h.ns);
    let vs: VolumeSnapshot = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot", "metadata": {"name": "shared"},
        "spec": {"source": {"persistentVolumeClaimName": "data"}, "volumeSnapshotClassName": class}}));
    snaps.create(&PostParams::default(), &vs).await.unwrap();
    wait_for(&snaps, "shared", Duration::from_secs(60), |v| v.ready()).await;
    write_tree(&data, 78, "moved on");
    let other = h.cluster.namespace("csi-share-b").await;
    h.other_namespaces.push(other.clone());
    h.start_controller();

    let restores = Api::<RestoreSession>::namespaced(h.client.clone(), &other);
    let restore = |name: &str, claim: &str| -> RestoreSession {
        from_json(json!({"apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession", "metadata": {"name": name},
            "spec": {"target": {"kind": "PersistentVolumeClaim", "name": claim},
                     "dataSource": {"namespace": h.ns, "volumeSnapshot": "shared"}}}))
    };
    let finished = |name: &str| {
        let (restores, name) = (restores.clone(), name.to_string());
        async move {
            wait_for(&restores, &name, Duration::from_secs(120), |r| {
                r.status.as_ref().and_then(|s| s.phase).is_some_and(RestorePhase::is_finished)
            })
            .await
            .status
            .unwrap()
        }
    };
    let claims_b = Api::<PersistentVolumeClaim>::namespaced(h.client.clone(), &other);
    let contents = Api::<hoard_csi::types::VolumeSnapshotContent>::all(h.client.clone());

    // No consent: Invalid, naming the annotation; nothing made in either namespace.
    restores.create(&PostParams::default(), &restore("no-consent", "copy")).await.unwrap();
    let st = finished("no-consent").await;
    assert_eq!(st.phase, Some(RestorePhase::Invalid), "{st:#?}");
    assert!(st.message.as_deref().unwrap_or_default().contains("hoard.dev/restore-into-namespaces"), "{st:#?}");
    assert!(claims_b.get_opt("copy").await.unwrap().is_none());
    let (content_name, _) = hoard_csi::share::import_names(&other, "no-consent");
    assert!(contents.get_opt(&content_name).await.unwrap().is_none());

    // Consent for namespace `other`: the new claim holds the snapshot's content.
    let patch = json!({"metadata": {"annotations": {"hoard.dev/restore-into-namespaces": other}}});
    snaps.patch("shared", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    for (name, claim) in [("consented", "copy"), ("again", "copy-2")] {
        restores.create(&PostParams::default(), &restore(name, claim)).await.unwrap();
        let st = finished(name).await;
        assert_eq!(st.phase, Some(RestorePhase::Succeeded), "{name}: {st:#?}\n{}", h.controller_log());
        let c = &st.components[claim];
        assert_eq!(c.volume_snapshot.as_ref().map(|v| v.name.as_str()), Some("shared"), "{c:#?}");
        let restored = h.volume_dir_in(&other, claim, Duration::from_secs(30)).await;
        assert!(tree_contents(&restored) == expected, "{name}: the claim differs from the snapshot");
        // The import goes; the source stays.
        let (content_name, local_name) = hoard_csi::share::import_names(&other, name);
        let local = Api::<VolumeSnapshot>::namespaced(h.client.clone(), &other);
        let mut gone = false;
        for _ in 0..120 {
            let c = contents.get_opt(&content_name).await.unwrap();
            let l = local.get_opt(&local_name).await.unwrap();
            if c.is_none() && l.is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(gone, "{name}: the import was left behind\n{}", h.controller_log());
        assert!(snaps.get("shared").await.unwrap().ready(), "the source VolumeSnapshot changed");
    }
    h.finish().await;
}

async fn restore_into_new_claim(h: &Harness, repo: &str, claim: &str) -> PathBuf {
    let dir = h.claim(claim).await;
    let rs: RestoreSession = serde_json::from_value(json!({
        "apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession", "metadata": {"name": format!("to-{claim}")},
        "spec": {"target": {"kind": "PersistentVolumeClaim", "name": claim},
                 "dataSource": {"repository": repo, "snapshot": "latest"}}}))
    .unwrap();
    let restores = Api::<RestoreSession>::namespaced(h.client.clone(), &h.ns);
    restores.create(&PostParams::default(), &rs).await.unwrap();
    let done = wait_for(&restores, &format!("to-{claim}"), Duration::from_secs(180), |r| {
        r.status.as_ref().and_then(|s| s.phase).is_some_and(RestorePhase::is_finished)
    })
    .await;
    let st = done.status.unwrap();
    assert_eq!(st.phase, Some(RestorePhase::Succeeded), "{st:#?}\n{}", h.controller_log());
    dir
}

/// A pod's claim is backed up through a VolumeSnapshot while the pod keeps writing: the
/// repository holds the data as it was when the snapshot was cut, not what the volume holds
/// when the agent reads. Afterwards the exposer pod, the clone and the VolumeSnapshot are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_backup_holds_the_point_in_time() {
    let Some(mut h) = Harness::new("csi-pit").await else { return };
    let class = format!("pit-{}", h.ns);
    let driver = h.csi.driver.clone();
    h.snapshot_class(&class, &driver, false).await;
    let data = h.claim("data").await;
    write_tree(&data, 1, "at snapshot time");
    let before = tree_contents(&data);
    let node_a = h.nodes[0].name.clone();
    let app = run_pod_pending(
        &h,
        json!({
        "metadata": {"name": "app"},
        "spec": {"nodeName": node_a, "containers": [{"name": "app", "image": "busybox"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}),
    )
    .await;
    wait_running(&h, "app").await;
    h.configuration("app", json!({"kind": "Pod", "name": "app"}), "app-repo", json!({"className": class})).await;
    // The test acts between "snapshot ready" and "the agent reads": exposers wait until then.
    h.kubelet.as_ref().unwrap().hold_exposers.store(true, Ordering::SeqCst);
    h.start_controller();
    h.trigger("app", "pit-1").await;

    let snaps = Api::<VolumeSnapshot>::namespaced(h.client.clone(), &h.ns);
    let vs = wait_for(&snaps, "hoard-pit-1-data", Duration::from_secs(120), VolumeSnapshot::ready).await;
    assert_eq!(vs.spec.volume_snapshot_class_name.as_deref(), Some(class.as_str()));
    // The workload goes on writing after the snapshot.
    write_tree(&data, 100, "written after the snapshot");
    std::fs::write(data.join("new-file"), b"not in the snapshot").unwrap();
    // The component says what it waits for: the held exposer pod.
    let hoard_snaps = Api::<Snapshot>::namespaced(h.client.clone(), &h.ns);
    let waiting = wait_for(&hoard_snaps, "app-repo-pit-1", Duration::from_secs(60), |s| {
        s.status
            .as_ref()
            .and_then(|st| st.components.get("data"))
            .and_then(|c| c.waiting_for.as_deref())
            .is_some_and(|w| w.starts_with("waiting for exposer pod hoard-pit-1-data"))
    })
    .await;
    assert_eq!(waiting.status.unwrap().components["data"].phase, Some(ComponentPhase::Pending));
    h.kubelet.as_ref().unwrap().hold_exposers.store(false, Ordering::SeqCst);

    let done = h.finished("pit-1", Duration::from_secs(180)).await;
    let st = done.status.clone().unwrap();
    assert_eq!(st.phase, Some(SessionPhase::Succeeded), "{st:#?}\n{}", h.controller_log());
    let snap = snapshot_of(&h, &done).await;
    let c = &snap.status.as_ref().unwrap().components["data"];
    assert_eq!(c.phase, Some(ComponentPhase::Succeeded), "{c:#?}");
    assert_eq!(c.read_from, Some(ReadFrom::VolumeSnapshot));
    assert_eq!(c.waiting_for, None, "cleared once the order went out");
    let from = c.volume_snapshot.clone().expect("the component names its VolumeSnapshot");
    assert_eq!((from.name.as_str(), from.class_name.as_deref()), ("hoard-pit-1-data", Some(class.as_str())));
    assert!(from.creation_time.is_some(), "{from:?}");
    assert_eq!(
        app.metadata.uid,
        Api::<Pod>::namespaced(h.client.clone(), &h.ns).get("app").await.unwrap().metadata.uid
    );
    h.assert_cleaned_up("pit-1").await;

    let restored = restore_into_new_claim(&h, "app-repo", "restored").await;
    let got = tree_contents(&restored);
    assert_eq!(got.len(), before.len(), "{:?}", got.keys().collect::<Vec<_>>());
    assert!(got == before, "the restore differs from the volume at snapshot time");
    assert_ne!(tree_contents(&data), before, "the live volume did change after the snapshot");
    h.finish().await;
}

/// A claim no pod mounts is backed up live through an exposer pod and restored into another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_claim_backs_up_and_restores() {
    let Some(mut h) = Harness::new("csi-alone").await else { return };
    let data = h.claim("lonely").await;
    write_tree(&data, 7, "nobody mounts me");
    h.configuration("lonely", json!({"kind": "PersistentVolumeClaim", "name": "lonely"}), "lonely-repo", json!(null))
        .await;
    h.start_controller();
    h.trigger("lonely", "alone-1").await;
    let done = h.finished("alone-1", Duration::from_secs(180)).await;
    let st = done.status.clone().unwrap();
    assert_eq!(st.phase, Some(SessionPhase::Succeeded), "{st:#?}\n{}", h.controller_log());
    let snap = snapshot_of(&h, &done).await;
    let c = &snap.status.as_ref().unwrap().components["lonely"];
    assert_eq!(c.read_from, Some(ReadFrom::Claim), "{c:#?}");
    assert!(c.volume_snapshot.is_none());
    h.assert_cleaned_up("alone-1").await;
    let restored = restore_into_new_claim(&h, "lonely-repo", "lonely-copy").await;
    assert!(tree_contents(&restored) == tree_contents(&data), "restore differs from the claim");
    h.finish().await;
}

/// VolumeSnapshotClass selection: the driver's one default is used; no default, or two, fail
/// the session with a message naming the driver and the classes — never a silent live read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_class_selection_outcomes() {
    let Some(mut h) = Harness::new("csi-class").await else { return };
    // Claims of drivers that exist only in their PersistentVolumes: selection fails before any
    // snapshot is asked of them.
    let none_driver = format!("none.{}.hoard.test", h.ns);
    let two_driver = format!("two.{}.hoard.test", h.ns);
    bound_claim(&h.client, &h.ns, "no-default", &none_driver).await;
    bound_claim(&h.client, &h.ns, "two-defaults", &two_driver).await;
    h.snapshot_class(&format!("{}-plain", h.ns), &none_driver, false).await;
    h.snapshot_class(&format!("{}-x", h.ns), &two_driver, true).await;
    h.snapshot_class(&format!("{}-y", h.ns), &two_driver, true).await;
    for claim in ["no-default", "two-defaults"] {
        h.configuration(
            claim,
            json!({"kind": "PersistentVolumeClaim", "name": claim}),
            &format!("{claim}-repo"),
            json!({}),
        )
        .await;
    }
    h.start_controller();
    h.trigger("no-default", "class-none").await;
    h.trigger("two-defaults", "class-two").await;
    let none = h.finished("class-none", Duration::from_secs(120)).await;
    let c = snapshot_of(&h, &none).await.status.unwrap().components["no-default"].clone();
    assert_eq!(none.status.as_ref().unwrap().phase, Some(SessionPhase::Failed));
    let msg = c.error.unwrap_or_default();
    assert!(
        msg.contains(&format!("no default VolumeSnapshotClass for CSI driver {none_driver}"))
            && msg.contains(&format!("{}-plain", h.ns)),
        "{msg}"
    );
    let two = h.finished("class-two", Duration::from_secs(120)).await;
    assert_eq!(two.status.as_ref().unwrap().phase, Some(SessionPhase::Failed));
    let c = snapshot_of(&h, &two).await.status.unwrap().components["two-defaults"].clone();
    let msg = c.error.unwrap_or_default();
    assert!(msg.contains(&format!("2 VolumeSnapshotClasses are the default for CSI driver {two_driver}")), "{msg}");
    h.assert_cleaned_up("class-none").await;

    // The real driver's default class is chosen when the configuration names none.
    let default_class = format!("{}-default", h.ns);
    let driver = h.csi.driver.clone();
    h.snapshot_class(&default_class, &driver, true).await;
    let data = h.claim("real").await;
    write_tree(&data, 3, "default class");
    h.configuration("real", json!({"kind": "PersistentVolumeClaim", "name": "real"}), "real-repo", json!({})).await;
    h.trigger("real", "class-default").await;
    let ok = h.finished("class-default", Duration::from_secs(180)).await;
    assert_eq!(ok.status.as_ref().unwrap().phase, Some(SessionPhase::Succeeded), "{ok:#?}\n{}", h.controller_log());
    let c = snapshot_of(&h, &ok).await.status.unwrap().components["real"].clone();
    assert_eq!(c.volume_snapshot.and_then(|v| v.class_name), Some(default_class));
    h.assert_cleaned_up("class-default").await;
    h.finish().await;
}

/// A snapshot that never becomes ready fails the session at the readyTimeout and leaves
/// nothing behind; a controller killed between steps continues where it was after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_faults_timeout_and_controller_restart() {
    let Some(mut h) = Harness::new("csi-fault").await else { return };
    // No snapshotter serves this driver: its VolumeSnapshots never become ready.
    let dead_driver = format!("dead.{}.hoard.test", h.ns);
    bound_claim(&h.client, &h.ns, "stuck", &dead_driver).await;
    let dead_class = format!("{}-dead", h.ns);
    h.snapshot_class(&dead_class, &dead_driver, false).await;
    h.configuration(
        "stuck",
        json!({"kind": "PersistentVolumeClaim", "name": "stuck"}),
        "stuck-repo",
        json!({"className": dead_class, "readyTimeout": "8s"}),
    )
    .await;
    let live_class = format!("{}-live", h.ns);
    let driver = h.csi.driver.clone();
    h.snapshot_class(&live_class, &driver, false).await;
    let data = h.claim("data").await;
    write_tree(&data, 5, "survives a restart");
    h.configuration(
        "data",
        json!({"kind": "PersistentVolumeClaim", "name": "data"}),
        "data-repo",
        json!({"className": live_class}),
    )
    .await;

    h.start_controller();
    h.trigger("stuck", "stuck-1").await;
    // While it waits, the session says so and for what.
    let waiting = h.volumes_condition("stuck-1", "Waiting", Duration::from_secs(60)).await;
    assert!(waiting.message.starts_with("stuck: ") && waiting.status == "False", "{waiting:?}");
    let failed = h.finished("stuck-1", Duration::from_secs(90)).await;
    let st = failed.status.clone().unwrap();
    assert_eq!(st.phase, Some(SessionPhase::Failed), "{st:#?}");
    let last = st.conditions.iter().find(|c| c.type_ == "VolumesReady").expect("VolumesReady kept");
    assert_eq!(last.reason, "NotReadable", "{last:?}\n{}", h.controller_log());
    assert!(last.message.contains("readyTimeout"), "{last:?}");
    let c = snapshot_of(&h, &failed).await.status.unwrap().components["stuck"].clone();
    assert!(c.error.as_deref().unwrap_or_default().contains("readyTimeout"), "{c:#?}");
    // Deletion is requested; the dead driver's VolumeSnapshot cannot finish it by itself.
    h.assert_cleaned_up_except_deleting("stuck-1", true).await;
    h.release_stuck_snapshots("stuck-1").await;
    h.assert_cleaned_up("stuck-1").await;

    // Killed once the VolumeSnapshot exists (exposers held, so the session is mid-way).
    h.kubelet.as_ref().unwrap().hold_exposers.store(true, Ordering::SeqCst);
    h.trigger("data", "restart-1").await;
    let pods = Api::<Pod>::namespaced(h.client.clone(), &h.ns);
    wait_for(&pods, "hoard-restart-1-data", Duration::from_secs(120), |_| true).await;
    h.controller = None;
    h.kubelet.as_ref().unwrap().hold_exposers.store(false, Ordering::SeqCst);
    h.start_controller();
    let done = h.finished("restart-1", Duration::from_secs(180)).await;
    assert_eq!(done.status.as_ref().unwrap().phase, Some(SessionPhase::Succeeded), "{done:#?}\n{}", h.controller_log());
    let ready = done.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "VolumesReady").cloned();
    assert_eq!(ready.map(|c| (c.status, c.reason)), Some(("True".to_string(), "Ready".to_string())));
    let snap = snapshot_of(&h, &done).await;
    assert_eq!(snap.status.as_ref().unwrap().phase, Some(SnapshotPhase::Succeeded));
    h.assert_cleaned_up("restart-1").await;
    h.finish().await;
}

/// Creates a pod bound to its node (the simulated kubelet starts it).
async fn run_pod_pending(h: &Harness, pod: serde_json::Value) -> Pod {
    Api::<Pod>::namespaced(h.client.clone(), &h.ns).create(&PostParams::default(), &from_json(pod)).await.unwrap()
}

async fn wait_running(h: &Harness, name: &str) -> Pod {
    let pods = Api::<Pod>::namespaced(h.client.clone(), &h.ns);
    wait_for(&pods, name, Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
}

/// Snapshot-only (`upload: false, keepLast: 2`): each session's VolumeSnapshot is the backup —
/// no clone, no exposer, nothing uploaded — and retention keeps the newest two (the oldest
/// Snapshot object goes with its VolumeSnapshot). A RestoreSession from a kept VolumeSnapshot
/// fills a new claim with the content of that time, and an existing claim through a clone and
/// an agent's copy (refused without overwrite). Combined
/// (`keepLast: 1`, uploading): the VolumeSnapshot is kept and the repository has the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_snapshots_retention_and_restore_into_new_and_existing_claims() {
    let Some(mut h) = Harness::new("csi-keep").await else { return };
    let class = format!("{}-keep", h.ns);
    let driver = h.csi.driver.clone();
    h.snapshot_class(&class, &driver, false).await;
    let data = h.claim("data").await;
    let target = json!({"kind": "PersistentVolumeClaim", "name": "data"});
    h.configuration("only", target.clone(), "only-repo", json!({"className": class, "upload": false, "keepLast": 2}))
        .await;
    h.start_controller();
    let snaps = Api::<VolumeSnapshot>::namespaced(h.client.clone(), &h.ns);
    let mut generations = Vec::new();
    for i in 1..=3u64 {
        write_tree(&data, 10 * i, &format!("generation {i}"));
        generations.push(tree_contents(&data));
        let bs = format!("only-{i}");
        h.trigger("only", &bs).await;
        let done = h.finished(&bs, Duration::from_secs(120)).await;
        let st = done.status.clone().unwrap();
        assert_eq!(st.phase, Some(SessionPhase::Succeeded), "{st:#?}\n{}", h.controller_log());
        let c = snapshot_of(&h, &done).await.status.unwrap().components["data"].clone();
        assert_eq!((c.phase, c.read_from), (Some(ComponentPhase::Succeeded), Some(ReadFrom::VolumeSnapshot)));
        assert!(c.snapshot_id.is_none(), "snapshot-only uploads nothing: {c:#?}");
        let from = c.volume_snapshot.expect("names its VolumeSnapshot");
        assert_eq!((from.name.as_str(), from.kept), (format!("hoard-{bs}-data").as_str(), true));
        // Kept: owned by its Snapshot object, not the session, so neither cleanup nor the garbage
        // collector takes it with the session.
        let vs = snaps.get(&from.name).await.unwrap();
        let owners: Vec<(String, String)> =
            vs.metadata.owner_references.unwrap_or_default().into_iter().map(|o| (o.kind, o.name)).collect();
        assert_eq!(owners, [("Snapshot".to_string(), format!("only-repo-{bs}"))]);
        // Nothing else was made: no clone claim, no exposer pod.
        let lp = ListParams::default().labels(&format!("hoard.dev/backup-session={bs}"));
        assert!(Api::<Pod>::namespaced(h.client.clone(), &h.ns).list(&lp).await.unwrap().items.is_empty());
        assert!(
            Api::<PersistentVolumeClaim>::namespaced(h.client.clone(), &h.ns).list(&lp).await.unwrap().items.is_empty()
        );
    }
    // Retention: the newest two are kept; the first and its Snapshot object are gone.
    let kept_names = || async {
        let lp = ListParams::default().labels("hoard.dev/kept=only.now");
        let mut names: Vec<String> = snaps
            .list(&lp)
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .map(|s| name_of(&s.metadata))
            .collect();
        names.sort();
        names
    };
    assert_eq!(kept_names().await, ["hoard-only-2-data", "hoard-only-3-data"]);
    let hoard_snaps = Api::<Snapshot>::namespaced(h.client.clone(), &h.ns);
    let mut first_gone = false;
    for _ in 0..60 {
        if hoard_snaps.get_opt("only-repo-only-1").await.unwrap().is_none() {
            first_gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(first_gone, "the Snapshot object of the deleted VolumeSnapshot stays");
    assert!(hoard_snaps.get_opt("only-repo-only-2").await.unwrap().is_some());

    // Restore the second generation into a new claim (the volume has moved on to the third).
    let restores = Api::<RestoreSession>::namespaced(h.client.clone(), &h.ns);
    let restore_with = |name: &str, claim: &str, vs: &str, overrides: serde_json::Value| -> RestoreSession {
        let mut spec = json!({"target": {"kind": "PersistentVolumeClaim", "name": claim},
                              "dataSource": {"volumeSnapshot": vs}});
        if !overrides.is_null() {
            spec["claim"] = overrides;
        }
        serde_json::from_value(json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession", "metadata": {"name": name}, "spec": spec}))
        .unwrap()
    };
    let restore = |name: &str, claim: &str, vs: &str| restore_with(name, claim, vs, serde_json::Value::Null);
    // A size below the snapshot's restore size (the source claim's 64Mi) is refused up front.
    let small = json!({"size": "1Mi"});
    restores.create(&PostParams::default(), &restore_with("small", "small", "hoard-only-2-data", small)).await.unwrap();
    let refused = wait_for(&restores, "small", Duration::from_secs(60), |r| {
        r.status.as_ref().and_then(|s| s.phase).is_some_and(RestorePhase::is_finished)
    })
    .await
    .status
    .unwrap();
    assert_eq!(refused.phase, Some(RestorePhase::Invalid), "{refused:#?}");
    assert!(refused.message.as_deref().unwrap_or_default().contains("restore size 64Mi"), "{refused:#?}");
    let claims = Api::<PersistentVolumeClaim>::namespaced(h.client.clone(), &h.ns);
    assert!(claims.get_opt("small").await.unwrap().is_none(), "no claim for a refused restore");
    // Size and access modes overridden; the storage class stays the source claim's.
    let overrides = json!({"size": "128Mi", "accessModes": ["ReadWriteMany"]});
    restores
        .create(&PostParams::default(), &restore_with("gen-2", "gen-2", "hoard-only-2-data", overrides))
        .await
        .unwrap();
    let done = wait_for(&restores, "gen-2", Duration::from_secs(120), |r| {
        r.status.as_ref().and_then(|s| s.phase).is_some_and(RestorePhase::is_finished)
    })
    .await;
    let st = done.status.unwrap();
    assert_eq!(st.phase, Some(RestorePhase::Succeeded), "{st:#?}\n{}", h.controller_log());
    let restored = h.volume_dir("gen-2", Duration::from_secs(10)).await;
    assert!(tree_contents(&restored) == generations[1], "the new claim differs from generation 2");
    let spec = claims.get("gen-2").await.unwrap().spec.unwrap();
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteMany".to_string()]));
    let requested = spec.resources.and_then(|r| r.requests).and_then(|r| r.get("storage").cloned());
    assert_eq!(requested.map(|q| q.0), Some("128Mi".to_string()));
    assert_eq!(spec.storage_class_name, claims.get("data").await.unwrap().spec.unwrap().storage_class_name);
    // Into an existing claim: a clone of the VolumeSnapshot, mounted with the claim by one
    // exposer pod, copied by the agent. Without overwrite the non-empty claim is refused and
    // untouched; with it the claim holds generation 2 again, and nothing temporary remains.
    restores.create(&PostParams::default(), &restore("over", "data", "hoard-only-2-data")).await.unwrap();
    let refused = wait_for(&restores, "over", Duration::from_secs(120), |r| {
        r.status.as_ref().and_then(|s| s.phase).is_some_and(RestorePhase::is_finished)
    })
    .await
    .status
    .unwrap();
    assert_eq!(refused.phase, Some(RestorePhase::Failed), "{refused:#?}\n{}", h.controller_log());
    assert!(refused.message.as_deref().unwrap_or_default().contains("not empty"), "{refused:#?}");
    assert!(tree_contents(&data) == generations[2]);
    let mut over = restore("over-always", "data", "hoard-only-2-data");
    over.spec.overwrite = hoard_api::crd::OverwritePolicy::Always;
    restores.create(&PostParams::default(), &over).await.unwrap();
    let done = wait_for(&restores, "over-always", Duration::from_secs(180), |r| {
        r.status.as_ref().and_then(|s| s.phase).is_some_and(RestorePhase::is_finished)
    })
    .await
    .status
    .unwrap();
    assert_eq!(done.phase, Some(RestorePhase::Succeeded), "{done:#?}\n{}", h.controller_log());
    let c = &done.components["data"];
    assert_eq!((c.read_from, c.size.is_some_and(|s| s > 400_000)), (Some(ReadFrom::VolumeSnapshot), true), "{c:#?}");
    assert_eq!(c.volume_snapshot.as_ref().map(|v| v.name.as_str()), Some("hoard-only-2-data"));
    assert!(tree_contents(&data) == generations[1], "the claim is not generation 2 again");
    assert!(generations[1] != generations[2]);
    for name in ["over", "over-always"] {
        let lp = ListParams::default().labels(&format!("hoard.dev/restore-session={name}"));
        let mut left = usize::MAX;
        for _ in 0..60 {
            let pods = Api::<Pod>::namespaced(h.client.clone(), &h.ns).list(&lp).await.unwrap().items;
            let pvcs = claims.list(&lp).await.unwrap().items;
            left = pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).count()
                + pvcs.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).count();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(left, 0, "restore {name} left its clone or exposer behind");
    }

    // Combined: uploaded and kept (the claim holds generation 2 again).
    h.configuration("both", target, "both-repo", json!({"className": class, "keepLast": 1})).await;
    h.trigger("both", "both-1").await;
    let done = h.finished("both-1", Duration::from_secs(180)).await;
    assert_eq!(done.status.as_ref().unwrap().phase, Some(SessionPhase::Succeeded), "{}", h.controller_log());
    let c = snapshot_of(&h, &done).await.status.unwrap().components["data"].clone();
    assert!(c.snapshot_id.is_some(), "{c:#?}");
    assert!(c.volume_snapshot.as_ref().is_some_and(|v| v.kept && v.name == "hoard-both-1-data"), "{c:#?}");
    assert!(snaps.get_opt("hoard-both-1-data").await.unwrap().is_some());
    let lp = ListParams::default().labels("hoard.dev/backup-session=both-1");
    for _ in 0..60 {
        let pods = Api::<Pod>::namespaced(h.client.clone(), &h.ns).list(&lp).await.unwrap().items;
        let claims = Api::<PersistentVolumeClaim>::namespaced(h.client.clone(), &h.ns).list(&lp).await.unwrap().items;
        if pods.is_empty() && claims.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let restored = restore_into_new_claim(&h, "both-repo", "both-copy").await;
    assert!(tree_contents(&restored) == generations[1]);

    // Deleting the Snapshot object that describes a kept VolumeSnapshot deletes it too (the
    // garbage collector follows the owner reference).
    hoard_snaps.delete("both-repo-both-1", &Default::default()).await.unwrap();
    let mut vs_gone = false;
    for _ in 0..120 {
        if snaps.get_opt("hoard-both-1-data").await.unwrap().is_none_or(|v| v.metadata.deletion_timestamp.is_some()) {
            vs_gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(vs_gone, "the kept VolumeSnapshot outlived its Snapshot object\n{}", h.controller_log());
    h.finish().await;
}
