//! The controller against a real API server (`HOARD_TEST_KUBECONFIG`), a real `hoard-agent`
//! process reading a fake kubelet tree, and S3 on loopback (`HOARD_TEST_S3_ENDPOINT`). The
//! test plays the kubelet: it creates the agent's Pod object and patches its status (podIP,
//! Ready, the `grpc` port), and lays out the workload pod's volume under the agent's kubelet
//! root using the UID the API server gave the pod. This supersedes the tower-test mock the
//! issue first asked for: the same scenarios run against the real API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hoard_api::crd::{BackupConfiguration, BackupSession, RestoreSession, SessionPhase, Snapshot, SnapshotPhase};
use hoard_controller::{Clock, Config, Context, metrics::Metrics, orders::Credentials, reconcile};
use hoard_testkit::kube::{FakeNode, TestCluster};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

const NODE: &str = "node-a";
const DRIVER: &str = "csi.hoard.test";

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent binary next to this test's (built on demand with the same cargo).
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("hoard-agent");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo).args(["build", "-p", "hoard-agent"]).status().unwrap().success();
        assert!(ok, "cargo build -p hoard-agent");
    }
    bin
}

fn start_agent(root: &Path, pki: &hoard_testkit::TestPki, work: &Path) -> (Agent, u16) {
    let log = std::fs::File::create(work.join("agent.log")).unwrap();
    let mut child = Command::new(agent_binary())
        .args(["--node-name", NODE, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--kubelet-root")
        .arg(root)
        .arg("--tls-ca")
        .arg(pki.pem("ca"))
        .arg("--tls-cert")
        .arg(pki.pem("agent"))
        .arg("--tls-key")
        .arg(pki.key("agent"))
        .arg("--scratch-dir")
        .arg(work.join("scratch"))
        .args(["--allow-file-repositories", "--memory-budget", "134217728"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    let grpc = line.split_whitespace().find_map(|w| w.strip_prefix("grpc=")).unwrap_or_else(|| {
        panic!("agent did not start: {line:?} {}", std::fs::read_to_string(work.join("agent.log")).unwrap_or_default())
    });
    let port = grpc.rsplit(':').next().unwrap().parse().unwrap();
    (Agent(child), port)
}

/// The agent's Pod object on [`NODE`], Ready at 127.0.0.1 with the agent's gRPC port (the test
/// plays the kubelet).
async fn agent_pod(pods: &Api<Pod>, port: u16) {
    pods.create(
        &PostParams::default(),
        &obj(json!({
            "metadata": {"name": "hoard-agent-a", "labels": {"app.kubernetes.io/name": "hoard-agent"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "agent", "image": "hoard-agent",
                     "ports": [{"name": "grpc", "containerPort": port}]}]}
        })),
    )
    .await
    .unwrap();
    let st = json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status("hoard-agent-a", &PatchParams::default(), &Patch::Merge(&st)).await.unwrap();
}

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// A workload pod with one PVC volume backed by a CSI PV; returns the pod's UID.
async fn workload(client: &Client, ns: &str, pod: &str, volume: &str) -> (String, String) {
    let pv_name = format!("pv-{ns}-{pod}");
    let claim = format!("{pod}-claim");
    Api::<PersistentVolume>::all(client.clone())
        .create(
            &PostParams::default(),
            &obj(json!({
                "metadata": {"name": pv_name},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                         "csi": {"driver": DRIVER, "volumeHandle": pv_name}}
            })),
        )
        .await
        .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &obj(json!({
                "metadata": {"name": claim},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                         "volumeName": pv_name, "storageClassName": ""}
            })),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p = pods
        .create(
            &PostParams::default(),
            &obj(json!({
                "metadata": {"name": pod, "labels": {"app": pod}},
                "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}],
                         "volumes": [{"name": volume, "persistentVolumeClaim": {"claimName": claim}}]}
            })),
        )
        .await
        .unwrap();
    let status = json!({"status": {"phase": "Running", "podIP": "10.0.0.9",
        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    (p.uid().unwrap(), pv_name)
}

/// Lays out the kubelet's CSI mount for (pod uid, pv) and returns the data directory.
fn kubelet_volume(root: &Path, uid: &str, pv: &str) -> PathBuf {
    let d = root.join(uid).join("volumes/kubernetes.io~csi").join(pv);
    std::fs::create_dir_all(d.join("mount")).unwrap();
    let meta = json!({"driverName": DRIVER, "nodeName": NODE, "specVolID": pv, "volumeHandle": pv,
                      "volumeLifecycleMode": "Persistent"});
    std::fs::write(d.join("vol_data.json"), meta.to_string()).unwrap();
    d.join("mount")
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn session_phase(api: &Api<BackupSession>, name: &str) -> Option<SessionPhase> {
    api.get(name).await.ok()?.status?.phase
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_pause_and_schedule_against_a_real_api_server() {
    let Some(cluster) = TestCluster::connect().await else { return };
    let Some(s3) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    let _serial = ONE_CONTROLLER.lock().await;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("HOARD_LOG").unwrap_or_else(|_| "hoard_controller=info".into()))
        .with_test_writer()
        .try_init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    cluster.apply_crds(&hoard_api::crd::definitions()).await;
    let client = cluster.client.clone();
    let ns = cluster.namespace("ctrl").await;
    // No controller-manager runs: the ServiceAccount pod admission looks up (the testkit may
    // have made it already).
    let _ = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &obj(json!({"metadata": {"name": "default"}})))
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let pki = hoard_testkit::make_test_pki(&tmp.path().join("pki"), NODE);
    // A Ready node for the Pods bound to it: without one, the pod garbage collector deletes
    // them as orphans within a minute.
    let node = FakeNode::register(&client, NODE, tmp.path().join("kubelet/pods")).await;
    let kubelet = node.kubelet_root.clone();

    // The workload and its data, the restore target (empty).
    let (uid, pv) = workload(&client, &ns, "app", "data").await;
    let data = kubelet_volume(&kubelet, &uid, &pv);
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("hello.txt"), b"hello from the controller test\n").unwrap();
    std::fs::write(data.join("sub/blob.bin"), hoard_testkit::random_bytes(200_000, 7)).unwrap();
    let (ruid, rpv) = workload(&client, &ns, "restored", "target").await;
    let target = kubelet_volume(&kubelet, &ruid, &rpv);

    // The agent process, and its Pod object (the test plays the kubelet).
    let (_agent, port) = start_agent(&kubelet, &pki, tmp.path());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    agent_pod(&pods, port).await;

    // Secrets, storage, policy, configuration.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, data) in [
        ("repo-pass", json!({"RESTIC_PASSWORD": "controller-test-password"})),
        ("s3-creds", json!({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})),
    ] {
        secrets
            .create(&PostParams::default(), &obj(json!({"metadata": {"name": name}, "stringData": data})))
            .await
            .unwrap();
    }
    let apply = |kind: &str, name: &str, spec: serde_json::Value| {
        let client = client.clone();
        let ns = ns.clone();
        let body = json!({"apiVersion": "hoard.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec});
        let plural = format!("{}s", kind.to_lowercase()).replace("policys", "policies");
        async move {
            let ar = kube::api::ApiResource {
                group: "hoard.dev".into(),
                version: "v1alpha1".into(),
                api_version: "hoard.dev/v1alpha1".into(),
                kind: kind_owned(&body),
                plural,
            };
            let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client, &ns, &ar);
            api.patch(name_of(&body).as_str(), &PatchParams::apply("test").force(), &Patch::Apply(&body))
                .await
                .unwrap();
        }
    };
    apply(
        "BackupStorage",
        "s3",
        json!({"storage": {"provider": "s3", "s3": {"endpoint": s3, "bucket": "hoard-test",
               "prefix": format!("controller/{ns}"), "secretName": "s3-creds"}}}),
    )
    .await;
    apply("RetentionPolicy", "keep", json!({"successfulSnapshots": {"last": 5}})).await;
    apply(
        "BackupConfiguration",
        "app",
        json!({"target": {"kind": "Pod", "name": "app"},
               "backends": [{"name": "s3", "storageRef": {"name": "s3"}, "retentionPolicy": {"name": "keep"}}],
               "sessions": [{"name": "daily", "scheduler": {"schedule": "0 0 1 1 *"},
                             "repositories": [{"name": "app-repo", "backend": "s3", "encryptionSecret": {"name": "repo-pass"}}]}]}),
    )
    .await;

    // The controller, in-process so the test can move its clock.
    let creds = Credentials { ca: pki.read("ca"), cert: pki.read("controller"), key: pki.read_key("controller") };
    let clock = Arc::new(Clock::default());
    let config = Config {
        namespace: ns.clone(),
        agent_selector: "app.kubernetes.io/name=hoard-agent".into(),
        max_orders_per_node: 2,
        allow_file_repositories: false,
        identity: "controller-test".into(),
        helper_image: "hoard-controller:test".into(),
        helper_args: vec!["--pause".into()],
        check_interval: std::time::Duration::from_secs(24 * 3600),
        admin_namespaces: Vec::new(),
    };
    let ctx = Context::new(client.clone(), config, creds, Arc::new(Metrics::new()), Arc::clone(&clock));
    let controller = tokio::spawn(reconcile::run(Arc::clone(&ctx)));

    // A manual BackupSession → Succeeded, with a Snapshot that names a repository snapshot.
    let sessions: Api<BackupSession> = Api::namespaced(client.clone(), &ns);
    let manual = |name: &str| {
        obj::<BackupSession>(json!({"apiVersion": "hoard.dev/v1alpha1", "kind": "BackupSession",
            "metadata": {"name": name}, "spec": {"invoker": {"name": "app"}, "session": "daily"}}))
    };
    sessions.create(&PostParams::default(), &manual("first")).await.unwrap();
    let phase = wait_for("first session to finish", Duration::from_secs(180), || async {
        session_phase(&sessions, "first").await.filter(|p| p.is_finished())
    })
    .await;
    let snaps: Api<Snapshot> = Api::namespaced(client.clone(), &ns);
    let snap = snaps.get("app-repo-first").await.unwrap();
    assert_eq!(
        phase,
        SessionPhase::Succeeded,
        "session: {:?}\nsnapshot: {:?}",
        sessions.get("first").await.unwrap().status,
        snap.status
    );
    let st = snap.status.unwrap();
    assert_eq!(st.phase, Some(SnapshotPhase::Succeeded));
    let comp = &st.components["data"];
    let snapshot_id = comp.snapshot_id.clone().expect("repository snapshot id");
    assert!(comp.size.unwrap_or(0) >= 200_000, "{comp:?}");

    // The repository snapshot is in the bucket and readable with hoard-core.
    let creds = hoard_api::agent::v1::S3Credentials {
        endpoint: s3.clone(),
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        ..Default::default()
    };
    let store = hoard_controller::reconcile::repo::open_store(
        &format!("s3://hoard-test/controller/{ns}/{ns}/app-repo"),
        Some(&hoard_controller::storage::StorageCredentials::S3(creds)),
    )
    .unwrap();
    let repo =
        hoard_core::Repository::open(store, &hoard_core::Password::new("controller-test-password")).await.unwrap();
    let id = hoard_core::Id::from_hex(&snapshot_id).unwrap();
    let s = repo.load_snapshot(&id).await.unwrap();
    assert_eq!(s.labels.get("hoard.dev/component").map(String::as_str), Some("data"));

    // Restore into the other pod's empty volume → the same bytes.
    let restores: Api<RestoreSession> = Api::namespaced(client.clone(), &ns);
    restores
        .create(
            &PostParams::default(),
            &obj(json!({"apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession", "metadata": {"name": "back"},
                "spec": {"target": {"kind": "Pod", "name": "restored"},
                         "dataSource": {"repository": "app-repo", "snapshot": "latest", "volumeMap": {"data": "target"}}}})),
        )
        .await
        .unwrap();
    let rphase = wait_for("restore to finish", Duration::from_secs(120), || async {
        let st = restores.get("back").await.ok()?.status;
        eprintln!("restore status: {st:?}");
        st?.phase.filter(|p| p.is_finished())
    })
    .await;
    assert_eq!(rphase, hoard_api::crd::RestorePhase::Succeeded, "{:?}", restores.get("back").await.unwrap().status);
    assert_eq!(std::fs::read(target.join("hello.txt")).unwrap(), b"hello from the controller test\n");
    assert_eq!(std::fs::read(target.join("sub/blob.bin")).unwrap(), hoard_testkit::random_bytes(200_000, 7));

    // Paused configuration: a manual session is Skipped.
    let configs: Api<BackupConfiguration> = Api::namespaced(client.clone(), &ns);
    let pause = |paused: bool, schedule: &str| {
        json!({"apiVersion": "hoard.dev/v1alpha1", "kind": "BackupConfiguration", "metadata": {"name": "app"},
               "spec": {"paused": paused, "target": {"kind": "Pod", "name": "app"},
               "backends": [{"name": "s3", "storageRef": {"name": "s3"}, "retentionPolicy": {"name": "keep"}}],
               "sessions": [{"name": "daily", "scheduler": {"schedule": schedule},
                             "repositories": [{"name": "app-repo", "backend": "s3", "encryptionSecret": {"name": "repo-pass"}}]}]}})
    };
    configs.patch("app", &PatchParams::apply("test").force(), &Patch::Apply(pause(true, "0 0 1 1 *"))).await.unwrap();
    sessions.create(&PostParams::default(), &manual("while-paused")).await.unwrap();
    let p = wait_for("paused session", Duration::from_secs(30), || async {
        session_phase(&sessions, "while-paused").await.filter(|p| p.is_finished())
    })
    .await;
    assert_eq!(p, SessionPhase::Skipped);

    // The scheduler: every minute, clock moved past the next minute → a Scheduled session.
    clock.advance(chrono::Duration::seconds(61));
    configs.patch("app", &PatchParams::apply("test").force(), &Patch::Apply(pause(false, "* * * * *"))).await.unwrap();
    let scheduled = wait_for("a scheduled session", Duration::from_secs(30), || async {
        sessions
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|s| s.spec.trigger == hoard_api::crd::Trigger::Scheduled && s.spec.scheduled_time.is_some())
    })
    .await;
    assert!(scheduled.name_any().starts_with("app-daily-"), "{}", scheduled.name_any());
    let cfg = configs.get("app").await.unwrap();
    let sched = &cfg.status.unwrap().sessions[0];
    assert!(sched.next_schedule.is_some() && sched.last_session.as_deref() == Some(scheduled.name_any().as_str()));
    // Pause again so the every-minute schedule stops creating sessions.
    configs.patch("app", &PatchParams::apply("test").force(), &Patch::Apply(pause(true, "0 0 1 1 *"))).await.unwrap();

    // Restore into a fresh claim that no pod mounts: the controller creates a helper pod bound
    // to the agent's node; the test plays the kubelet for it (Running, podIP, the volume tree).
    let fresh_pv = format!("pv-{ns}-fresh");
    Api::<PersistentVolume>::all(client.clone())
        .create(
            &PostParams::default(),
            &obj(json!({"metadata": {"name": fresh_pv},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                         "csi": {"driver": DRIVER, "volumeHandle": fresh_pv}}})),
        )
        .await
        .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &obj(json!({"metadata": {"name": "fresh"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                         "volumeName": fresh_pv, "storageClassName": ""}})),
        )
        .await
        .unwrap();
    restores
        .create(
            &PostParams::default(),
            &obj(json!({"apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession", "metadata": {"name": "fresh"},
                "spec": {"target": {"kind": "PersistentVolumeClaim", "name": "fresh"},
                         "dataSource": {"repository": "app-repo", "snapshot": "latest"}}})),
        )
        .await
        .unwrap();
    let helper = wait_for("the helper pod", Duration::from_secs(120), || async {
        pods.get_opt("hoard-restore-fresh").await.ok()?
    })
    .await;
    let hspec = helper.spec.clone().unwrap();
    assert_eq!(hspec.node_name.as_deref(), Some(NODE));
    assert_eq!(hspec.containers[0].image.as_deref(), Some("hoard-controller:test"));
    assert_eq!(hspec.volumes.as_ref().unwrap()[0].persistent_volume_claim.as_ref().unwrap().claim_name, "fresh");
    let owner = &helper.metadata.owner_references.clone().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("RestoreSession", "fresh"));
    assert_eq!(restores.get("fresh").await.unwrap().status.unwrap().phase, Some(hoard_api::crd::RestorePhase::Pending));
    let fresh_dir = kubelet_volume(&kubelet, &helper.uid().unwrap(), &fresh_pv);
    let st = json!({"status": {"phase": "Running", "podIP": "10.0.0.10", "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status("hoard-restore-fresh", &PatchParams::default(), &Patch::Merge(&st)).await.unwrap();
    let fphase = wait_for("the fresh-claim restore", Duration::from_secs(120), || async {
        restores.get("fresh").await.ok()?.status?.phase.filter(|p| p.is_finished())
    })
    .await;
    assert_eq!(fphase, hoard_api::crd::RestorePhase::Succeeded, "{:?}", restores.get("fresh").await.unwrap().status);
    assert_eq!(std::fs::read(fresh_dir.join("hello.txt")).unwrap(), b"hello from the controller test\n");
    assert_eq!(std::fs::read(fresh_dir.join("sub/blob.bin")).unwrap(), hoard_testkit::random_bytes(200_000, 7));
    // Deleted afterwards (no kubelet here: it stays Terminating, or is gone).
    let gone = pods.get_opt("hoard-restore-fresh").await.unwrap();
    assert!(gone.is_none_or(|p| p.metadata.deletion_timestamp.is_some()), "helper pod not deleted");

    controller.abort();
    cleanup(&client, &ns).await;
}

/// Deletes what would keep running in later tests sharing the API server (configurations
/// schedule sessions), then the namespace.
async fn cleanup(client: &Client, ns: &str) {
    let dp = kube::api::DeleteParams::default();
    let lp = kube::api::ListParams::default();
    let _ = Api::<BackupConfiguration>::namespaced(client.clone(), ns).delete_collection(&dp, &lp).await;
    let _ = Api::<BackupSession>::namespaced(client.clone(), ns).delete_collection(&dp, &lp).await;
    let _ = Api::<RestoreSession>::namespaced(client.clone(), ns).delete_collection(&dp, &lp).await;
    let _ = Api::<hoard_api::crd::BackupStorage>::namespaced(client.clone(), ns).delete_collection(&dp, &lp).await;
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone()).delete(ns, &dp).await;
}

/// The hot-loop regression: a BackupStorage whose endpoint refuses connections is looked at
/// with exponential back-off (2 s, 4 s, 8 s, ...), and its status patches do not retrigger it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_storage_backs_off_instead_of_looping() {
    let Some((cluster, _serial)) = exclusive_cluster().await else { return };
    let client = cluster.client.clone();
    let ns = cluster.namespace("ctrl-loop").await;
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &obj(json!({"metadata": {"name": "s3-creds"},
                "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}})),
        )
        .await
        .unwrap();
    let storages: Api<hoard_api::crd::BackupStorage> = Api::namespaced(client.clone(), &ns);
    storages
        .create(
            &PostParams::default(),
            &obj(json!({"apiVersion": "hoard.dev/v1alpha1", "kind": "BackupStorage", "metadata": {"name": "far"},
                "spec": {"storage": {"provider": "s3", "s3": {"endpoint": "http://127.0.0.1:9", "bucket": "nowhere",
                         "secretName": "s3-creds"}}}})),
        )
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pki = hoard_testkit::make_test_pki(&tmp.path().join("pki"), NODE);
    let creds = Credentials { ca: pki.read("ca"), cert: pki.read("controller"), key: pki.read_key("controller") };
    let config = Config {
        namespace: ns.clone(),
        agent_selector: "app.kubernetes.io/name=hoard-agent".into(),
        max_orders_per_node: 2,
        allow_file_repositories: false,
        identity: "controller-loop-test".into(),
        helper_image: String::new(),
        helper_args: vec![],
        check_interval: std::time::Duration::from_secs(24 * 3600),
        admin_namespaces: Vec::new(),
    };
    let ctx = Context::new(client.clone(), config, creds, Arc::new(Metrics::new()), Arc::new(Clock::default()));
    let controller = tokio::spawn(reconcile::run(Arc::clone(&ctx)));
    let key = format!("backupstorage/{ns}/far");
    let status = wait_for("NotReady status", Duration::from_secs(60), || async {
        let st = storages.get("far").await.ok()?.status?;
        (st.phase == Some(hoard_api::crd::StoragePhase::NotReady)).then_some(st)
    })
    .await;
    assert!(!status.conditions.is_empty());
    // The status is written before the error policy counts the failure: wait for the count.
    let first = wait_for("the failure counted", Duration::from_secs(10), || async {
        let n = ctx.failures.get(&key);
        (n >= 1).then_some(n)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    let passes = ctx.failures.get(&key) - first;
    // Back-off 2 s, 4 s, 8 s: at most 3 more passes in 9 s (the hot loop made ~50).
    assert!(passes <= 3, "{passes} reconciles of an unreachable storage in 9 s");
    // The API server saw as few status writes (the audit log, when the harness has one).
    if let Ok(dir) = std::env::var("HOARD_TEST_KUBE_DIR") {
        let audit = std::fs::read_to_string(Path::new(&dir).join("logs/audit.log")).unwrap_or_default();
        let writes = audit
            .lines()
            .filter(|l| {
                l.contains("\"ResponseComplete\"") && l.contains(&format!("/namespaces/{ns}/backupstorages/far/status"))
            })
            .count();
        assert!(writes <= 6, "{writes} status writes");
    }
    controller.abort();
    cleanup(&client, &ns).await;
}

fn kind_owned(body: &serde_json::Value) -> String {
    body["kind"].as_str().unwrap().to_string()
}

fn name_of(body: &serde_json::Value) -> String {
    body["metadata"]["name"].as_str().unwrap().to_string()
}

/// Tests in this file each run a whole controller that watches every namespace: run one at a
/// time so no controller acts on another test's objects.
static ONE_CONTROLLER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The test cluster with hoard's CRDs, held by this test alone ([`ONE_CONTROLLER`]) while the
/// guard lives; `None` (a skip) outside CI without a cluster.
async fn exclusive_cluster() -> Option<(TestCluster, tokio::sync::MutexGuard<'static, ()>)> {
    let cluster = TestCluster::connect().await?;
    let serial = ONE_CONTROLLER.lock().await;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    cluster.apply_crds(&hoard_api::crd::definitions()).await;
    Some((cluster, serial))
}

/// Server-side apply of a hoard object in `ns`.
async fn apply_in(client: &Client, ns: &str, kind: &str, name: &str, spec: serde_json::Value) {
    let body = json!({"apiVersion": "hoard.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec});
    let ar = kube::api::ApiResource {
        group: "hoard.dev".into(),
        version: "v1alpha1".into(),
        api_version: "hoard.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: match kind.to_lowercase().strip_suffix('y') {
            Some(stem) => format!("{stem}ies"),
            None => format!("{}s", kind.to_lowercase()),
        },
    };
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&body)).await.unwrap();
}

fn controller_config(ns: &str, identity: &str) -> Config {
    Config {
        namespace: ns.into(),
        agent_selector: "app.kubernetes.io/name=hoard-agent".into(),
        max_orders_per_node: 2,
        allow_file_repositories: false,
        identity: identity.into(),
        helper_image: String::new(),
        helper_args: vec![],
        check_interval: std::time::Duration::from_secs(24 * 3600),
        admin_namespaces: Vec::new(),
    }
}

/// The phase and message a configuration's status settles on.
async fn config_verdict(client: &Client, ns: &str, name: &str) -> (String, String) {
    let configs: Api<BackupConfiguration> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("a verdict on {ns}/{name}"), Duration::from_secs(60), || async {
        let st = configs.get(name).await.ok()?.status?;
        let phase = format!("{:?}", st.phase?);
        let message = st.conditions.first().map(|c| c.message.clone()).unwrap_or_default();
        Some((phase, message))
    })
    .await
}

/// A directory of the shared storage, as a user with the bucket's keys.
fn bucket_dir(s3: &str, prefix: &str, path: &str) -> Arc<dyn hoard_core::store::Store> {
    let creds = hoard_api::agent::v1::S3Credentials {
        endpoint: s3.into(),
        access_key_id: "testing".into(),
        secret_access_key: "testing".into(),
        ..Default::default()
    };
    hoard_controller::reconcile::repo::open_store(
        &format!("s3://hoard-test/{prefix}/{path}"),
        Some(&hoard_controller::storage::StorageCredentials::S3(creds)),
    )
    .unwrap()
}

/// Opens a repository of the shared storage with hoard-core, as a user with the bucket's keys.
async fn open_repo(s3: &str, prefix: &str, path: &str) -> hoard_core::Repository {
    let store = bucket_dir(s3, prefix, path);
    hoard_core::Repository::open(store, &hoard_core::Password::new("tenant-password")).await.unwrap()
}

/// Multi-tenancy, retention, Snapshot WipeOut, repository status and repository sync, against
/// the real API server, a real agent and S3 on loopback. A storage in namespace `owner` admits
/// namespaces labelled `hoard.dev/test=tenant`; a namespace it does not admit, a path outside
/// the tenant's directory and a Secret of another namespace are all refused; a tenant's
/// repository is not readable from elsewhere. Two sessions with `last: 1` leave one snapshot;
/// deleting a WipeOut Snapshot object forgets its data, deleting a WipeOut Repository removes
/// only its own objects; a fresh controller, after the tenant's Repository and Snapshot objects
/// are gone, re-creates them from the bucket once the tenant consents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_retention_wipeout_and_repository_sync_against_a_real_api_server() {
    let Some(s3) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    let Some((cluster, _serial)) = exclusive_cluster().await else { return };
    let client = cluster.client.clone();
    let owner = cluster.namespace("owner").await;
    let tenant = cluster.namespace("tenant").await;
    let intruder = cluster.namespace("intruder").await;
    let tmp = tempfile::tempdir().unwrap();
    let pki = hoard_testkit::make_test_pki(&tmp.path().join("pki"), NODE);
    // A Ready node for the Pods bound to it: without one, the pod garbage collector deletes
    // them as orphans within a minute.
    let node = FakeNode::register(&client, NODE, tmp.path().join("kubelet/pods")).await;
    let kubelet = node.kubelet_root.clone();

    // The tenant's workload and the agent (in the owner namespace, where the controller looks).
    let (uid, pv) = workload(&client, &tenant, "app", "data").await;
    let data = kubelet_volume(&kubelet, &uid, &pv);
    std::fs::write(data.join("ledger.txt"), b"tenant data\n").unwrap();
    std::fs::write(data.join("blob.bin"), hoard_testkit::random_bytes(150_000, 11)).unwrap();
    let (_agent, port) = start_agent(&kubelet, &pki, tmp.path());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &owner);
    agent_pod(&pods, port).await;

    // The bucket's keys live with the storage's owner; each tenant holds its own password.
    let secret = |ns: &str, name: &str, data: serde_json::Value| {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let body = obj::<Secret>(json!({"metadata": {"name": name}, "stringData": data}));
        async move { api.create(&PostParams::default(), &body).await.unwrap() }
    };
    secret(&owner, "s3-creds", json!({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})).await;
    secret(&owner, "owner-pass", json!({"RESTIC_PASSWORD": "the owner's password"})).await;
    secret(&tenant, "repo-pass", json!({"RESTIC_PASSWORD": "tenant-password"})).await;
    secret(&intruder, "repo-pass", json!({"RESTIC_PASSWORD": "intruder-password"})).await;
    let prefix = format!("controller/{owner}");
    apply_in(
        &client,
        &owner,
        "BackupStorage",
        "shared",
        json!({"storage": {"provider": "s3", "s3": {"endpoint": s3, "bucket": "hoard-test", "prefix": prefix,
               "secretName": "s3-creds"}},
               "usagePolicy": {"allowedNamespaces": {"from": "Selector",
                               "selector": {"matchLabels": {"hoard.dev/test": "tenant"}}}}}),
    )
    .await;
    apply_in(&client, &tenant, "RetentionPolicy", "keep-one", json!({"successfulSnapshots": {"last": 1}})).await;
    let config = |repos: serde_json::Value| {
        json!({"target": {"kind": "Pod", "name": "app"},
               "backends": [{"name": "shared", "storageRef": {"name": "shared", "namespace": owner},
                             "retentionPolicy": {"name": "keep-one"}}],
               "sessions": [{"name": "nightly", "scheduler": {"schedule": "0 0 1 1 *"}, "repositories": repos}]})
    };

    let ctx = Context::new(
        client.clone(),
        controller_config(&owner, "controller-tenancy"),
        Credentials { ca: pki.read("ca"), cert: pki.read("controller"), key: pki.read_key("controller") },
        Arc::new(Metrics::new()),
        Arc::new(Clock::default()),
    );
    let controller = tokio::spawn(reconcile::run(Arc::clone(&ctx)));

    // Refused: a namespace the storage does not admit, a directory outside the tenant's own, a
    // Secret of another namespace.
    let repo = |name: &str, extra: serde_json::Value| {
        let mut r = json!({"name": name, "backend": "shared", "encryptionSecret": {"name": "repo-pass"}});
        r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        r
    };
    apply_in(&client, &intruder, "BackupConfiguration", "grab", config(json!([repo("grab", json!({}))]))).await;
    let (phase, message) = config_verdict(&client, &intruder, "grab").await;
    assert_eq!(phase, "Invalid", "{message}");
    assert!(message.contains("does not admit namespace"), "{message}");
    apply_in(
        &client,
        &tenant,
        "BackupConfiguration",
        "escape",
        config(json!([repo("escape", json!({"directory": format!("{owner}/escape")}))])),
    )
    .await;
    let (phase, message) = config_verdict(&client, &tenant, "escape").await;
    assert_eq!(phase, "Invalid", "{message}");
    assert!(message.contains(&format!("must lie under {tenant}/")), "{message}");
    apply_in(
        &client,
        &tenant,
        "BackupConfiguration",
        "borrow",
        config(json!([repo("borrow", json!({"encryptionSecret": {"name": "owner-pass", "namespace": owner}}))])),
    )
    .await;
    let (phase, message) = config_verdict(&client, &tenant, "borrow").await;
    assert_eq!(phase, "Invalid", "{message}");
    assert!(message.contains("must be in the namespace"), "{message}");
    for (ns, name) in [(&intruder, "grab"), (&tenant, "escape"), (&tenant, "borrow")] {
        let api: Api<hoard_api::crd::Repository> = Api::namespaced(client.clone(), ns);
        assert!(api.get_opt(name).await.unwrap().is_none(), "no Repository {ns}/{name} for a refused configuration");
    }

    // Two repositories: `kept` (data stays when objects go) and `wiped` (WipeOut).
    apply_in(
        &client,
        &tenant,
        "BackupConfiguration",
        "app",
        config(json!([repo("kept", json!({})), repo("wiped", json!({"deletionPolicy": "WipeOut"}))])),
    )
    .await;
    let sessions: Api<BackupSession> = Api::namespaced(client.clone(), &tenant);
    for name in ["first", "second"] {
        let s = obj::<BackupSession>(json!({"apiVersion": "hoard.dev/v1alpha1", "kind": "BackupSession",
            "metadata": {"name": name}, "spec": {"invoker": {"name": "app"}, "session": "nightly"}}));
        sessions.create(&PostParams::default(), &s).await.unwrap();
        let phase = wait_for(&format!("session {name}"), Duration::from_secs(180), || async {
            session_phase(&sessions, name).await.filter(|p| p.is_finished())
        })
        .await;
        assert_eq!(phase, SessionPhase::Succeeded, "{:?}", sessions.get(name).await.unwrap().status);
    }

    // Retention (`last: 1`) ran for both repositories: one repository snapshot each, and the
    // first session's Snapshot objects are gone (the WipeOut one through its finalizer).
    let second = sessions.get("second").await.unwrap().status.unwrap();
    assert_eq!(second.retention_policy.len(), 2, "{second:?}");
    assert!(second.retention_policy.iter().all(|r| r.removed == 1 && r.error.is_none()), "{second:?}");
    let snaps: Api<Snapshot> = Api::namespaced(client.clone(), &tenant);
    for gone in ["kept-first", "wiped-first"] {
        wait_for(&format!("{gone} deleted"), Duration::from_secs(30), || async {
            snaps.get_opt(gone).await.unwrap().is_none().then_some(())
        })
        .await;
    }
    for repo_name in ["kept", "wiped"] {
        let r = open_repo(&s3, &prefix, &format!("{tenant}/{repo_name}")).await;
        assert_eq!(r.list_snapshots().await.unwrap().len(), 1, "{repo_name}");
    }
    let wiped_second = snaps.get("wiped-second").await.unwrap();
    assert!(wiped_second.finalizers().iter().any(|f| f == "hoard.dev/wipe-out-snapshot"), "{wiped_second:?}");
    assert!(snaps.get("kept-second").await.unwrap().finalizers().is_empty(), "Delete snapshots carry no finalizer");

    // Every transition is an Event on the object it concerns.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &tenant);
    for (kind, name, reason) in [
        ("BackupSession", "second", "ComponentSucceeded"),
        ("BackupSession", "second", "Succeeded"),
        ("Snapshot", "kept-second", "Succeeded"),
        ("Repository", "kept", "Initialised"),
        ("BackupConfiguration", "escape", "Invalid"),
    ] {
        wait_for(&format!("Event {reason} on {kind} {name}"), Duration::from_secs(30), || async {
            events.list(&Default::default()).await.ok()?.items.into_iter().find(|e| {
                let regarding = e.regarding.as_ref();
                e.reason.as_deref() == Some(reason)
                    && regarding.and_then(|r| r.kind.as_deref()) == Some(kind)
                    && regarding.and_then(|r| r.name.as_deref()) == Some(name)
            })
        })
        .await;
    }

    // Repository status: stored bytes and a clean structural check.
    let repos: Api<hoard_api::crd::Repository> = Api::namespaced(client.clone(), &tenant);
    let kept_status = wait_for("kept repository status", Duration::from_secs(60), || async {
        let st = repos.get("kept").await.ok()?.status?;
        (st.total_size.unwrap_or(0) > 100_000 && st.snapshot_count == Some(1)).then_some(st)
    })
    .await;
    assert_eq!(kept_status.integrity, Some(true), "{kept_status:?}");
    assert!(kept_status.last_check_time.is_some() && kept_status.integrity_problems.is_empty(), "{kept_status:?}");

    // Another namespace cannot restore from the tenant's repository (its usage policy is unset).
    let restores: Api<RestoreSession> = Api::namespaced(client.clone(), &intruder);
    restores
        .create(
            &PostParams::default(),
            &obj(json!({"apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession", "metadata": {"name": "peek"},
                "spec": {"target": {"kind": "Pod", "name": "app"},
                         "dataSource": {"repository": "kept", "namespace": tenant, "snapshot": "latest"}}})),
        )
        .await
        .unwrap();
    let refused = wait_for("the cross-namespace restore refused", Duration::from_secs(60), || async {
        let st = restores.get("peek").await.ok()?.status?;
        (st.phase? == hoard_api::crd::RestorePhase::Invalid).then_some(st.message.unwrap_or_default())
    })
    .await;
    assert!(refused.contains(&format!("Repository {tenant}/kept does not admit namespace {intruder}")), "{refused}");

    // Deleting a WipeOut Snapshot object forgets its repository snapshot.
    snaps.delete("wiped-second", &Default::default()).await.unwrap();
    wait_for("wiped-second deleted", Duration::from_secs(60), || async {
        snaps.get_opt("wiped-second").await.unwrap().is_none().then_some(())
    })
    .await;
    let wiped = open_repo(&s3, &prefix, &format!("{tenant}/wiped")).await;
    assert!(wiped.list_snapshots().await.unwrap().is_empty(), "the WipeOut snapshot's data was forgotten");

    // Deleting a WipeOut Repository (a stand-alone one, so no configuration re-creates it)
    // removes the repository's own objects; another object in its directory stays.
    apply_in(
        &client,
        &tenant,
        "Repository",
        "scratch",
        json!({"storageRef": {"name": "shared", "namespace": owner}, "path": format!("{tenant}/scratch"),
               "encryptionSecret": {"name": "repo-pass"}, "deletionPolicy": "WipeOut"}),
    )
    .await;
    let scratch_dir = bucket_dir(&s3, &prefix, &format!("{tenant}/scratch"));
    wait_for("Repository scratch initialised", Duration::from_secs(60), || async {
        let listed = scratch_dir.list("").await.ok()?;
        listed.iter().any(|o| o.key == "config").then_some(())
    })
    .await;
    scratch_dir.put("not-hoards/notes.txt", bytes::Bytes::from_static(b"someone else's")).await.unwrap();
    repos.delete("scratch", &Default::default()).await.unwrap();
    wait_for("Repository scratch deleted", Duration::from_secs(60), || async {
        repos.get_opt("scratch").await.unwrap().is_none().then_some(())
    })
    .await;
    let left: Vec<String> = scratch_dir.list("").await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(left, vec!["not-hoards/notes.txt".to_string()]);

    // Disaster recovery: the tenant's objects are gone (and no controller ran meanwhile); a
    // fresh controller re-creates them from the bucket's metadata object.
    controller.abort();
    let _ = controller.await;
    let configs: Api<BackupConfiguration> = Api::namespaced(client.clone(), &tenant);
    configs.delete("app", &Default::default()).await.unwrap();
    // The Snapshot first: it is owned by the Repository, so the garbage collector (when a
    // controller-manager runs) would take it with the Repository anyway.
    snaps.delete("kept-second", &Default::default()).await.unwrap();
    let strip = json!({"metadata": {"finalizers": null}});
    repos.patch("kept", &PatchParams::default(), &Patch::Merge(&strip)).await.unwrap();
    repos.delete("kept", &Default::default()).await.unwrap();
    wait_for("the tenant's objects deleted", Duration::from_secs(30), || async {
        (repos.get_opt("kept").await.unwrap().is_none() && snaps.get_opt("kept-second").await.unwrap().is_none())
            .then_some(())
    })
    .await;
    let ctx = Context::new(
        client.clone(),
        controller_config(&owner, "controller-recovered"),
        Credentials { ca: pki.read("ca"), cert: pki.read("controller"), key: pki.read_key("controller") },
        Arc::new(Metrics::new()),
        Arc::new(Clock::default()),
    );
    let controller = tokio::spawn(reconcile::run(Arc::clone(&ctx)));
    // The bucket's owner may not create Repositories in the tenant's namespace until the tenant
    // consents, on its encryption Secret.
    let storage: Api<hoard_api::crd::BackupStorage> = Api::namespaced(client.clone(), &owner);
    let refused = wait_for("sync of kept waits for consent", Duration::from_secs(90), || async {
        let listed = storage.get("shared").await.ok()?.status?.repositories;
        listed.into_iter().find(|r| r.name == "kept" && r.namespace == tenant && !r.synced)?.error
    })
    .await;
    assert!(refused.contains("has not consented"), "{refused}");
    assert!(repos.get_opt("kept").await.unwrap().is_none());
    let consent =
        json!({"metadata": {"annotations": {"hoard.dev/repository-sync-from": format!("other/x, {owner}/shared")}}});
    Api::<Secret>::namespaced(client.clone(), &tenant)
        .patch("repo-pass", &PatchParams::default(), &Patch::Merge(&consent))
        .await
        .unwrap();
    let synced = wait_for("kept re-created by repository sync", Duration::from_secs(90), || async {
        repos.get_opt("kept").await.ok()?
    })
    .await;
    assert_eq!(synced.spec.path, format!("{tenant}/kept"));
    assert_eq!(synced.spec.storage_ref.namespace.as_deref(), Some(owner.as_str()));
    let snap = wait_for("kept-second re-created by repository sync", Duration::from_secs(90), || async {
        snaps.get_opt("kept-second").await.ok()?.filter(|s| s.status.is_some())
    })
    .await;
    let st = snap.status.unwrap();
    assert_eq!(st.phase, Some(SnapshotPhase::Succeeded));
    let kept = open_repo(&s3, &prefix, &format!("{tenant}/kept")).await;
    let (id, _) = kept.list_snapshots().await.unwrap().pop().unwrap();
    assert_eq!(st.components["data"].snapshot_id.as_deref(), Some(id.to_hex().as_str()));
    // The storage's status is written after the whole sync pass, which re-created the objects
    // above on its way: wait for it.
    wait_for("the storage's status lists kept as synced", Duration::from_secs(60), || async {
        let listed = storage.get("shared").await.ok()?.status?.repositories;
        listed.iter().any(|r| r.name == "kept" && r.namespace == tenant && r.synced).then_some(())
    })
    .await;

    controller.abort();
    for ns in [&tenant, &intruder, &owner] {
        cleanup(&client, ns).await;
    }
}

/// A controller over `ns` whose structural check runs every 2 s (`dir` holds its PKI).
fn checking_controller(client: &Client, ns: &str, identity: &str, dir: &Path) -> tokio::task::JoinHandle<()> {
    let mut config = controller_config(ns, identity);
    config.check_interval = Duration::from_secs(2);
    let pki = hoard_testkit::make_test_pki(&dir.join("pki"), NODE);
    let creds = Credentials { ca: pki.read("ca"), cert: pki.read("controller"), key: pki.read_key("controller") };
    let ctx = Context::new(client.clone(), config, creds, Arc::new(Metrics::new()), Arc::new(Clock::default()));
    tokio::spawn(reconcile::run(ctx))
}

/// Repository `app` of `ns` in BackupStorage `storage`, directory `<ns>/app`, password Secret
/// `repo-pass`.
async fn repository_in(client: &Client, ns: &str, storage: &str) {
    let spec = json!({"storageRef": {"name": storage}, "path": format!("{ns}/app"), "encryptionSecret": {"name": "repo-pass"}});
    apply_in(client, ns, "Repository", "app", spec).await;
}

/// Integrity through the controller: a Repository whose structural check passes turns
/// `integrity: false` once a pack of it is deleted from the bucket, and its status names the
/// missing pack, the snapshot the damage reaches and files of it; an event says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_pack_turns_the_repository_unhealthy_naming_snapshot_and_files() {
    let Some(s3) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    let Some((cluster, _serial)) = exclusive_cluster().await else { return };
    let client = cluster.client.clone();
    let ns = cluster.namespace("ctrl-integrity").await;
    let secret = |name: &str, data: serde_json::Value| {
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let body = obj::<Secret>(json!({"metadata": {"name": name}, "stringData": data}));
        async move { api.create(&PostParams::default(), &body).await.unwrap() }
    };
    secret("s3-creds", json!({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})).await;
    secret("repo-pass", json!({"RESTIC_PASSWORD": "tenant-password"})).await;
    let prefix = format!("controller/{ns}");
    apply_in(
        &client,
        &ns,
        "BackupStorage",
        "s3",
        json!({"storage": {"provider": "s3", "s3": {"endpoint": s3, "bucket": "hoard-test", "prefix": prefix,
               "secretName": "s3-creds"}}}),
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let controller = checking_controller(&client, &ns, "controller-integrity", tmp.path());

    // The controller initialises the repository; a backup goes into it with hoard-core.
    repository_in(&client, &ns, "s3").await;
    let dir = bucket_dir(&s3, &prefix, &format!("{ns}/app"));
    wait_for("the repository initialised", Duration::from_secs(60), || async {
        dir.list("").await.ok()?.iter().any(|o| o.key == "config").then_some(())
    })
    .await;
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("db")).unwrap();
    for i in 0..8u64 {
        std::fs::write(data.join(format!("db/{i}.dat")), hoard_testkit::random_bytes(300_000, i)).unwrap();
    }
    let core = Arc::new(open_repo(&s3, &prefix, &format!("{ns}/app")).await);
    let opts = hoard_core::backup::BackupOptions {
        sources: vec![hoard_core::backup::Source::Path { name: "data".into(), path: data.clone() }],
        host: "integrity-test".into(),
        ..Default::default()
    };
    let outcome = hoard_core::backup::backup(Arc::clone(&core), opts).await.unwrap();
    let short: String = outcome.snapshot_id.to_hex().chars().take(8).collect();
    let repos: Api<hoard_api::crd::Repository> = Api::namespaced(client.clone(), &ns);
    let checked_after = |t: chrono::DateTime<chrono::Utc>| {
        let repos = repos.clone();
        async move {
            let st = repos.get("app").await.ok()?.status?;
            let at = st.last_check_time.as_deref().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())?;
            (at > t).then_some(st)
        }
    };
    let backed_up = chrono::Utc::now();
    let healthy = wait_for("a check after the backup", Duration::from_secs(60), || checked_after(backed_up)).await;
    assert_eq!(healthy.integrity, Some(true), "{healthy:#?}");

    // Lose the largest pack (file data).
    let packs = dir.list("packs/").await.unwrap();
    let largest = packs.iter().max_by_key(|o| o.size).expect("a pack").key.clone();
    dir.delete(&largest).await.unwrap();
    let pack_id = largest.rsplit('/').next().unwrap().to_string();
    let lost = chrono::Utc::now();
    let damaged = wait_for("a check after the loss", Duration::from_secs(60), || checked_after(lost)).await;
    assert_eq!(damaged.integrity, Some(false), "{damaged:#?}");
    let problems = damaged.integrity_problems.join("\n");
    assert!(problems.contains(&pack_id[..16]), "the lost pack is named:\n{problems}");
    let line = damaged
        .integrity_problems
        .iter()
        .find(|p| p.starts_with(&format!("snapshot {short}:")))
        .unwrap_or_else(|| panic!("the affected snapshot {short} is named:\n{problems}"));
    assert!(line.contains("/data/db/") && line.contains("file(s) affected"), "{line}");
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    let failed = wait_for("an IntegrityCheckFailed event", Duration::from_secs(30), || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| e.reason.as_deref() == Some("IntegrityCheckFailed"))
    })
    .await;
    assert!(failed.note.as_deref().unwrap_or_default().contains("damaged object"), "{failed:?}");
    controller.abort();
    cleanup(&client, &ns).await;
}

/// A BackupStorage of `storage` (credentials in Secret `store-key` with `key_data`) backs a
/// Repository the controller initialises and checks; the repository is then found at
/// `location` with `creds` and opens with its password.
async fn emulated_storage_holds_a_checked_repository(
    prefix: &str,
    storage: impl Fn(&str) -> serde_json::Value,
    key_data: serde_json::Value,
    location: impl Fn(&str) -> String,
    creds: hoard_controller::storage::StorageCredentials,
) {
    let Some((cluster, _serial)) = exclusive_cluster().await else { return };
    let client = cluster.client.clone();
    let ns = cluster.namespace(prefix).await;
    for (name, data) in [("store-key", key_data), ("repo-pass", json!({"RESTIC_PASSWORD": "tenant-password"}))] {
        let body = obj::<Secret>(json!({"metadata": {"name": name}, "stringData": data}));
        Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &body).await.unwrap();
    }
    let store_prefix = format!("controller/{ns}");
    apply_in(&client, &ns, "BackupStorage", "store", storage(&store_prefix)).await;
    let tmp = tempfile::tempdir().unwrap();
    let controller = checking_controller(&client, &ns, prefix, tmp.path());
    repository_in(&client, &ns, "store").await;
    let repos: Api<hoard_api::crd::Repository> = Api::namespaced(client.clone(), &ns);
    let st = wait_for("the repository checked", Duration::from_secs(60), || async {
        let st = repos.get("app").await.ok()?.status?;
        (st.phase == Some(hoard_api::crd::RepositoryPhase::Ready) && st.integrity.is_some()).then_some(st)
    })
    .await;
    assert_eq!(st.integrity, Some(true), "{st:#?}");
    let store =
        hoard_controller::reconcile::repo::open_store(&location(&format!("{store_prefix}/{ns}/app")), Some(&creds))
            .unwrap();
    assert!(store.list("").await.unwrap().iter().any(|o| o.key == "config"));
    hoard_core::Repository::open(store, &hoard_core::Password::new("tenant-password")).await.unwrap();
    controller.abort();
    cleanup(&client, &ns).await;
}

/// Provider `gcs` against the GCS emulator (`hack/gcs-up.sh`; `HOARD_TEST_GCS_KEY`, bucket
/// `hoard-test`): the service account key comes from the Secret's `GOOGLE_SERVICE_ACCOUNT_JSON`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gcs_storage_holds_a_repository_the_controller_initialises_and_checks() {
    let Some(key) = hoard_testkit::require_service("HOARD_TEST_GCS_KEY") else { return };
    let creds = hoard_controller::storage::StorageCredentials::Gcs(hoard_api::agent::v1::GcsCredentials {
        service_account_json: key.clone(),
    });
    emulated_storage_holds_a_checked_repository(
        "ctrl-gcs",
        |prefix| json!({"storage": {"provider": "gcs", "gcs": {"bucket": "hoard-test", "prefix": prefix, "secretName": "store-key"}}}),
        json!({"GOOGLE_SERVICE_ACCOUNT_JSON": key}),
        |path| format!("gs://hoard-test/{path}"),
        creds,
    )
    .await;
}

/// Provider `azure` against Azurite (`hack/azure-up.sh`; `HOARD_TEST_AZURITE_URL`, container
/// `hoard-test`): the account key comes from the Secret's `AZURE_ACCOUNT_KEY`, the endpoint
/// from the storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_storage_holds_a_repository_the_controller_initialises_and_checks() {
    let Some(url) = hoard_testkit::require_service("HOARD_TEST_AZURITE_URL") else { return };
    const ACCOUNT: &str = "devstoreaccount1";
    // Azurite's published development key.
    const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    let endpoint = format!("{url}/{ACCOUNT}");
    let creds = hoard_controller::storage::StorageCredentials::Azure(hoard_api::agent::v1::AzureCredentials {
        account: ACCOUNT.into(),
        access_key: KEY.into(),
        sas_token: String::new(),
        endpoint: endpoint.clone(),
    });
    emulated_storage_holds_a_checked_repository(
        "ctrl-azure",
        |prefix| {
            json!({"storage": {"provider": "azure", "azure": {"storageAccount": ACCOUNT, "container": "hoard-test",
                   "prefix": prefix, "endpoint": endpoint, "secretName": "store-key"}}})
        },
        json!({"AZURE_ACCOUNT_KEY": KEY}),
        |path| format!("az://hoard-test/{path}"),
        creds,
    )
    .await;
}
