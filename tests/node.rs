//! End to end on a real node, nothing simulated: a kubelet with containerd and runc
//! (hack/kube `--with-node`), the CSI hostpath driver publishing volumes into pods, hoard
//! installed with `helm install` of chart/hoard from images built out of the workspace's
//! binaries, a StatefulSet and a Deployment writing to CSI volumes, and S3 on loopback.
//! `kubectl hoard` triggers, watches and restores; pods check the restored data themselves.
//! The chart's defaults are kept where they matter: agents start backup-only (a restore is
//! refused, naming the setting) and restores work after the documented `helm upgrade`.
//!
//! Test-cluster settings (not hoard's defaults): both hoard pods use `hostNetwork` (the test
//! node has no pod network; see hack/kube/README.md) and the controller reaches the API server
//! through `KUBERNETES_SERVICE_HOST` (no kube-proxy runs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use hoard_api::crd::{BackupSession, SessionPhase, Snapshot};
use hoard_e2e::realnode::{RealNode, is_root, repo_root, run};
use hoard_e2e::*;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

const NS: &str = "app";
const SYSTEM_NS: &str = "hoard-system";
const TAG: &str = "e2e";
const STORAGE_CLASS: &str = "hoard-hostpath";
const SNAPSHOT_CLASS: &str = "hostpath-snap";

/// Writes a tree of random files once, then a MANIFEST of their md5 sums, then sleeps: the
/// pod must never restart, and a restored copy can be checked against the MANIFEST.
const WRITER: &str = r#"
if [ ! -f /data/MANIFEST ]; then
  mkdir -p /data/sub/deeper
  i=0
  while [ $i -lt 30 ]; do head -c $((i * 4099 + 1)) /dev/urandom > /data/sub/f$i; i=$((i + 1)); done
  head -c 3000000 /dev/urandom > /data/sub/deeper/big
  echo "written by $(hostname)" > /data/hello.txt
  touch /data/sub/suid && chmod 4755 /data/sub/suid
  cd /data && find . -type f | sort | xargs md5sum > /tmp/MANIFEST && mv /tmp/MANIFEST /data/MANIFEST
fi
exec sleep 2147483647
"#;

/// Exits 0 only if every file of the MANIFEST is there with its sum, and nothing else is.
const CHECKER: &str = r#"
cd /data || exit 1
md5sum -c MANIFEST || exit 1
files=$(find . -type f ! -name MANIFEST | wc -l)
listed=$(wc -l < MANIFEST)
[ "$files" -eq "$listed" ] || { echo "found $files files, MANIFEST lists $listed"; exit 1; }
echo "CHECKED $listed files"
echo "MODE $(stat -c %a sub/suid)"
echo "HELLO $(cat hello.txt)"
"#;

fn busybox_container(name: &str, script: &str, read_only: bool) -> Value {
    json!({"name": name, "image": "localhost/busybox:1", "imagePullPolicy": "Never",
           "args": ["-c", script],
           "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": read_only}]})
}

fn claim(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": NS},
           "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": STORAGE_CLASS,
                    "resources": {"requests": {"storage": "64Mi"}}}})
}

fn apply(node: &RealNode, objects: &[Value]) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    node.apply(&list.to_string());
}

/// Runs a checker pod on `claim` and returns (phase, logs).
async fn check_claim(node: &RealNode, pod: &str, claim: &str) -> (String, String) {
    apply(
        node,
        &[json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": NS},
                 "spec": {"restartPolicy": "Never", "automountServiceAccountToken": false,
                          "terminationGracePeriodSeconds": 1,
                          "containers": [busybox_container("check", CHECKER, true)],
                          "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]}})],
    );
    node.finished_pod(NS, pod, Duration::from_secs(120)).await
}

/// Pod name → (uid, total restarts) of the workload pods.
async fn workload_pods(node: &RealNode) -> BTreeMap<String, (String, i32)> {
    let pods = Api::<Pod>::namespaced(node.client.clone(), NS);
    pods.list(&ListParams::default().labels("role=workload"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum());
            (p.metadata.name.unwrap(), (p.metadata.uid.unwrap(), restarts))
        })
        .collect()
}

/// The object name a `kubectl hoard` command printed as `<kind>.hoard.dev/<name> created`.
fn created_name(stdout: &[u8], kind: &str) -> String {
    let text = String::from_utf8_lossy(stdout);
    let prefix = format!("{kind}.hoard.dev/");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.strip_suffix(" created").map(str::to_string))
        .unwrap_or_else(|| panic!("no `{prefix}NAME created` in: {text}"))
}

/// `kubectl hoard trigger` + `kubectl hoard watch`; returns the finished session.
async fn backup_now(node: &RealNode, config: &str, session: &str) -> BackupSession {
    let mut trigger = node.tool("kubectl-hoard");
    trigger.args(["trigger", config, "--session", session, "-n", NS]);
    let name = created_name(&run(trigger, Duration::from_secs(60)).stdout, "backupsession");
    let mut watch = node.tool("kubectl-hoard");
    watch.args(["watch", &name, "-n", NS, "--timeout", "4m"]);
    let watched = watch.output().unwrap();
    let sessions = Api::<BackupSession>::namespaced(node.client.clone(), NS);
    let done = sessions.get(&name).await.unwrap();
    if !watched.status.success() {
        let controller = node_logs(node, "app.kubernetes.io/name=hoard-controller").await;
        let agent = node_logs(node, "app.kubernetes.io/name=hoard-agent").await;
        panic!(
            "kubectl hoard watch {name}: {}\n{}\nstatus: {:#?}\ncontroller:\n{controller}\nagent:\n{agent}",
            String::from_utf8_lossy(&watched.stdout),
            String::from_utf8_lossy(&watched.stderr),
            done.status
        );
    }
    assert_eq!(done.status.as_ref().and_then(|s| s.phase), Some(SessionPhase::Succeeded), "{:#?}", done.status);
    done
}

async fn node_logs(node: &RealNode, selector: &str) -> String {
    let pods = Api::<Pod>::namespaced(node.client.clone(), SYSTEM_NS);
    let mut out = String::new();
    for p in pods.list(&ListParams::default().labels(selector)).await.unwrap().items {
        let name = p.metadata.name.unwrap();
        let text = node.logs(SYSTEM_NS, &name, None).await;
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        out += &format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    out
}

/// The components of the one Snapshot a session wrote, as JSON (name → status).
async fn snapshot_components(node: &RealNode, session: &BackupSession) -> (String, serde_json::Map<String, Value>) {
    let status = session.status.as_ref().unwrap();
    assert_eq!(status.snapshots.len(), 1, "{status:#?}");
    let name = status.snapshots[0].name.clone();
    let snap = Api::<Snapshot>::namespaced(node.client.clone(), NS).get(&name).await.unwrap();
    let json = serde_json::to_value(snap.status.unwrap()).unwrap();
    (name, json["components"].as_object().cloned().unwrap_or_default())
}

/// `kubectl hoard restore --snapshot S --to pvc/C`, then `kubectl hoard watch` until it ends:
/// the RestoreSession's name and the watch's output.
fn restore_and_watch(node: &RealNode, snapshot: &str, claim_name: &str) -> (String, std::process::Output) {
    let mut restore = node.tool("kubectl-hoard");
    restore.args(["restore", "--snapshot", snapshot, "--to", &format!("pvc/{claim_name}"), "-n", NS]);
    let name = created_name(&run(restore, Duration::from_secs(60)).stdout, "restoresession");
    let mut watch = node.tool("kubectl-hoard");
    watch.args(["watch", &name, "-n", NS, "--timeout", "4m"]);
    let watched = watch.output().unwrap();
    (name, watched)
}

/// `kubectl hoard restore --snapshot S --to pvc/C` + watch, then a pod checks the claim;
/// returns the checker's output.
async fn restore_and_check(node: &RealNode, snapshot: &str, claim_name: &str) -> String {
    apply(node, &[claim(claim_name)]);
    // The check can fail: on the empty claim it does.
    let (phase, logs) = check_claim(node, &format!("precheck-{claim_name}"), claim_name).await;
    assert_eq!(phase, "Failed", "the checker must fail on an empty claim: {logs}");

    let (name, watched) = restore_and_watch(node, snapshot, claim_name);
    assert!(
        watched.status.success(),
        "kubectl hoard watch {name}: {}\n{}\ncontroller:\n{}\nagent:\n{}",
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr),
        node_logs(node, "app.kubernetes.io/name=hoard-controller").await,
        node_logs(node, "app.kubernetes.io/name=hoard-agent").await
    );
    let (phase, logs) = check_claim(node, &format!("check-{claim_name}"), claim_name).await;
    assert_eq!(phase, "Succeeded", "restored {snapshot} into {claim_name}, the pod's check failed:\n{logs}");
    assert!(logs.contains("CHECKED 33 files"), "{logs}");
    logs
}

/// The agent process has exactly the capabilities `bits`, no_new_privs and a seccomp filter.
fn assert_agent_rights(node: &RealNode, bits: &[u32]) {
    let proc_status = agent_process_status(node);
    let cap_eff = u64::from_str_radix(&proc_status["CapEff"], 16).unwrap();
    let expected = bits.iter().fold(0u64, |m, bit| m | 1 << bit);
    assert_eq!(cap_eff, expected, "agent capabilities: {proc_status:?}");
    assert_eq!(proc_status["NoNewPrivs"], "1", "{proc_status:?}");
    assert_eq!(proc_status["Seccomp"], "2", "RuntimeDefault seccomp filter: {proc_status:?}");
}

/// A restore against backup-only agents (the chart's default) fails with a reason that names
/// the setting, and writes nothing.
async fn restore_refused(node: &RealNode, snapshot: &str, claim_name: &str) {
    apply(node, &[claim(claim_name)]);
    let (name, watched) = restore_and_watch(node, snapshot, claim_name);
    assert!(!watched.status.success(), "a restore through backup-only agents succeeded");
    let sessions: Api<hoard_api::crd::RestoreSession> = Api::namespaced(node.client.clone(), NS);
    let status = serde_json::to_string(&sessions.get(&name).await.unwrap().status).unwrap();
    assert!(status.contains("agent.restore.enabled"), "the failure must name the setting: {status}");
    let (phase, logs) = check_claim(node, &format!("refused-{claim_name}"), claim_name).await;
    assert_eq!(phase, "Failed", "nothing may be restored: {logs}");
}

/// The agent container's process as the runtime started it: uid, effective capabilities,
/// no_new_privs and seccomp mode from /proc.
fn agent_process_status(node: &RealNode) -> BTreeMap<String, String> {
    let sock = node.var("HOARD_CONTAINERD_SOCK");
    let mut ls = Command::new("ctr");
    ls.args(["--address", sock, "-n", "k8s.io", "containers", "ls", "-q"])
        .arg(r#"labels."io.kubernetes.container.name"==agent"#);
    let ids = String::from_utf8(run(ls, Duration::from_secs(30)).stdout).unwrap();
    let mut tasks = Command::new("ctr");
    tasks.args(["--address", sock, "-n", "k8s.io", "tasks", "ls"]);
    let tasks = String::from_utf8(run(tasks, Duration::from_secs(30)).stdout).unwrap();
    let pid = tasks
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && ids.lines().any(|id| id == f[0]) && f[2] == "RUNNING").then(|| f[1].to_string())
        })
        .next()
        .unwrap_or_else(|| panic!("no running agent container: {ids}\n{tasks}"));
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installed_hoard_backs_up_and_restores_workloads_on_a_real_node() {
    let Some(bin_dir) = hoard_testkit::require_service("HOARD_TEST_KUBE_BIN_DIR") else { return };
    let Some(s3) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    if !is_root() {
        assert!(std::env::var("CI").is_err(), "the real-node test needs root (containerd, kubelet, mounts)");
        eprintln!("SKIP: the real-node test needs root");
        return;
    }
    // Short: containerd's and the CSI registration's unix sockets live under it.
    let tmp = tempfile::Builder::new().prefix("hn").tempdir_in("/tmp").unwrap();
    let node = RealNode::up(std::path::Path::new(&bin_dir), &tmp.path().join("k")).await;
    let node_name = node.var("HOARD_NODE_NAME").to_string();

    // hoard's images, from the binaries this test run built (same files as images/*.Dockerfile).
    let agent_files = [
        (bin("hoard-agent"), "/usr/local/bin/hoard-agent"),
        (bin("hoard-agent-cert"), "/usr/local/bin/hoard-agent-cert"),
    ];
    node.image(&format!("docker.io/hoard/hoard-agent:{TAG}"), &agent_files, "/usr/local/bin/hoard-agent", None);
    let controller_files = [(bin("hoard-controller"), "/usr/local/bin/hoard-controller")];
    node.image(
        &format!("docker.io/hoard/hoard-controller:{TAG}"),
        &controller_files,
        "/usr/local/bin/hoard-controller",
        Some("65532:65532"),
    );

    // helm install, for real: the DaemonSet and the Deployment run as pods on the node.
    let values = tmp.path().join("values.yaml");
    let values_yaml = format!(
        "image: {{tag: {TAG}, pullPolicy: Never}}\n\
         controller:\n  hostNetwork: true\n  metricsPort: {}\n  extraEnv:\n\
         \x20   - {{name: KUBERNETES_SERVICE_HOST, value: 127.0.0.1}}\n\
         \x20   - {{name: KUBERNETES_SERVICE_PORT, value: \"{}\"}}\n\
         agent:\n  hostNetwork: true\n  kubeletRoot: {}/pods\n  grpcPort: {}\n  metricsPort: {}\n",
        free_port(),
        node.var("HOARD_APISERVER_PORT"),
        node.var("HOARD_KUBELET_ROOT"),
        free_port(),
        free_port(),
    );
    std::fs::write(&values, values_yaml).unwrap();
    let mut install = node.helm();
    install
        .args(["install", "hoard"])
        .arg(repo_root().join("chart/hoard"))
        .args(["-n", SYSTEM_NS, "--create-namespace", "--wait", "--timeout", "3m", "-f"])
        .arg(&values);
    run(install, Duration::from_secs(240));
    let agents = node.ready_pods(SYSTEM_NS, "app.kubernetes.io/name=hoard-agent", 1, Duration::from_secs(60)).await;
    assert_eq!(agents[0].spec.as_ref().unwrap().node_name.as_deref(), Some(node_name.as_str()));
    node.ready_pods(SYSTEM_NS, "app.kubernetes.io/name=hoard-controller", 1, Duration::from_secs(60)).await;

    // The agent runs with exactly the chart's rights: by default backup-only (root with
    // DAC_READ_SEARCH alone), no_new_privs, a seccomp filter.
    assert_agent_rights(&node, &[2]); // DAC_READ_SEARCH

    // The workloads: a StatefulSet and a Deployment writing to CSI volumes of the node.
    let pod_spec = |claim: Option<&str>| {
        let mut spec = json!({"automountServiceAccountToken": false, "terminationGracePeriodSeconds": 2,
            "containers": [busybox_container("app", WRITER, false)]});
        spec["containers"][0]["readinessProbe"] =
            json!({"exec": {"command": ["test", "-f", "/data/MANIFEST"]}, "periodSeconds": 1});
        if let Some(c) = claim {
            spec["volumes"] = json!([{"name": "data", "persistentVolumeClaim": {"claimName": c}}]);
        }
        spec
    };
    apply(
        &node,
        &[
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
            claim("web-data"),
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": NS},
                   "spec": {"serviceName": "db", "replicas": 1, "selector": {"matchLabels": {"app": "db"}},
                            "template": {"metadata": {"labels": {"app": "db", "role": "workload"}}, "spec": pod_spec(None)},
                            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim("x")["spec"]}]}}),
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": NS},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                            "template": {"metadata": {"labels": {"app": "web", "role": "workload"}},
                                         "spec": pod_spec(Some("web-data"))}}}),
            json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
                   "metadata": {"name": SNAPSHOT_CLASS}, "driver": node.var("HOARD_CSI_DRIVER"),
                   "deletionPolicy": "Delete"}),
        ],
    );
    node.ready_pods(NS, "role=workload", 2, Duration::from_secs(120)).await;
    let before = workload_pods(&node).await;
    assert_eq!(before.len(), 2, "{before:?}");

    // Storage and the configurations: the StatefulSet read live; the Deployment live and
    // through a CSI VolumeSnapshot.
    let suffix =
        format!("{:08x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos());
    let secret = |name: &str, data: Value| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "stringData": data});
    let hoard = |kind: &str, name: &str, spec: Value| json!({"apiVersion": "hoard.dev/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec});
    let session = |name: &str, repo: &str| {
        json!({"name": name, "scheduler": {"schedule": "0 0 1 1 *"},
               "repositories": [{"name": repo, "backend": "main", "encryptionSecret": {"name": "repo-pass"}}]})
    };
    let mut snap_session = session("snap", "web-snap");
    snap_session["volumeSnapshot"] = json!({"className": SNAPSHOT_CLASS});
    let backends = json!([{"name": "main", "storageRef": {"name": "s3"}}]);
    apply(
        &node,
        &[
            secret("s3-creds", json!({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})),
            secret("repo-pass", json!({"RESTIC_PASSWORD": "node-e2e-pass"})),
            hoard(
                "BackupStorage",
                "s3",
                json!({"storage": {"provider": "s3", "s3": {
                "endpoint": s3, "bucket": "hoard-test", "prefix": format!("node-{suffix}"), "region": "us-east-1",
                "secretName": "s3-creds"}}}),
            ),
            hoard(
                "BackupConfiguration",
                "db",
                json!({"target": {"kind": "StatefulSet", "name": "db"},
                "backends": backends, "sessions": [session("manual", "db-repo")]}),
            ),
            hoard(
                "BackupConfiguration",
                "web",
                json!({"target": {"kind": "Deployment", "name": "web"},
                "backends": backends, "sessions": [session("live", "web-live"), snap_session]}),
            ),
        ],
    );

    // Backups through the DaemonSet's agent pod.
    let db = backup_now(&node, "db", "manual").await;
    let (db_snapshot, db_components) = snapshot_components(&node, &db).await;
    assert_eq!(db_components.len(), 1, "{db_components:#?}");
    for (name, c) in &db_components {
        assert_eq!(c["node"], json!(node_name), "{name}: {c:#}");
        assert_eq!(c["readFrom"], json!("Live"), "{name}: {c:#}");
    }
    let web_snap = backup_now(&node, "web", "snap").await;
    let (web_snapshot, web_components) = snapshot_components(&node, &web_snap).await;
    assert_eq!(web_components.len(), 1, "{web_components:#?}");
    for (name, c) in &web_components {
        assert_eq!(c["readFrom"], json!("VolumeSnapshot"), "{name}: {c:#}");
        assert!(c["volumeSnapshot"]["name"].is_string(), "{name}: {c:#}");
    }
    backup_now(&node, "web", "live").await;

    // Never restarted: same pods, no container restarts.
    assert_eq!(workload_pods(&node).await, before, "backups must not restart or replace workload pods");

    // The chart's default agents only back up: a restore is refused, with the reason.
    restore_refused(&node, &db_snapshot, "db-refused").await;

    // Restores turned on as docs/install.md says: helm upgrade --reuse-values --set
    // agent.restore.enabled=true. The upgrade reuses the generated CAs (the chart's `lookup`
    // path) and rolls the agent, which now has the write capabilities.
    let secrets = Api::<Secret>::namespaced(node.client.clone(), SYSTEM_NS);
    let tls_before =
        (secrets.get("hoard-controller-tls").await.unwrap().data, secrets.get("hoard-agent-ca").await.unwrap().data);
    let mut upgrade = node.helm();
    upgrade.args(["upgrade", "hoard"]).arg(repo_root().join("chart/hoard")).args([
        "-n",
        SYSTEM_NS,
        "--reuse-values",
        "--set",
        "agent.restore.enabled=true",
        "--wait",
        "--timeout",
        "3m",
    ]);
    run(upgrade, Duration::from_secs(240));
    let tls_after =
        (secrets.get("hoard-controller-tls").await.unwrap().data, secrets.get("hoard-agent-ca").await.unwrap().data);
    assert!(tls_before == tls_after, "helm upgrade must keep the generated certificates");
    let new_agents =
        node.ready_pods(SYSTEM_NS, "app.kubernetes.io/name=hoard-agent", 1, Duration::from_secs(120)).await;
    assert_ne!(new_agents[0].metadata.uid, agents[0].metadata.uid, "the upgrade rolled the agent");
    // CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID MKNOD SETFCAP
    assert_agent_rights(&node, &[0, 1, 2, 3, 4, 27, 31]);

    // Restores into new claims, checked by new pods. Confined by default: the set-user-id bit
    // of sub/suid is not recreated; once an administrator labels the namespace, it is.
    let confined = restore_and_check(&node, &db_snapshot, "db-restored").await;
    assert!(confined.contains("MODE 755"), "a confined restore clears set-id bits: {confined}");
    let mut label = node.kubectl();
    label.args(["label", "namespace", NS, "hoard.dev/restore-metadata=full"]);
    run(label, Duration::from_secs(60));
    let full = restore_and_check(&node, &web_snapshot, "web-restored").await;
    assert!(full.contains("MODE 4755"), "with the namespace label everything is restored: {full}");

    // A CSI VolumeSnapshot of the Deployment's claim restored into an existing claim that holds
    // the StatefulSet's data (the same file names, other content), with `--overwrite`: the
    // exposer pod mounts the clone and the claim through the kubelet, the agent copies one
    // into the other, and a new pod finds the Deployment's files there.
    apply(
        &node,
        &[json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                 "metadata": {"name": "web-now", "namespace": NS},
                 "spec": {"source": {"persistentVolumeClaimName": "web-data"},
                          "volumeSnapshotClassName": SNAPSHOT_CLASS}})],
    );
    let snaps = Api::<hoard_csi::types::VolumeSnapshot>::namespaced(node.client.clone(), NS);
    wait_for(&snaps, "web-now", Duration::from_secs(120), |v| v.ready()).await;
    let mut restore = node.tool("kubectl-hoard");
    restore.args(["restore", "--from-volume-snapshot", "web-now", "--to", "pvc/db-restored", "--overwrite", "-n", NS]);
    let name = created_name(&run(restore, Duration::from_secs(60)).stdout, "restoresession");
    let mut watch = node.tool("kubectl-hoard");
    watch.args(["watch", &name, "-n", NS, "--timeout", "4m"]);
    let watched = watch.output().unwrap();
    assert!(
        watched.status.success(),
        "kubectl hoard watch {name}: {}\n{}\ncontroller:\n{}\nagent:\n{}",
        String::from_utf8_lossy(&watched.stdout),
        String::from_utf8_lossy(&watched.stderr),
        node_logs(&node, "app.kubernetes.io/name=hoard-controller").await,
        node_logs(&node, "app.kubernetes.io/name=hoard-agent").await
    );
    let (phase, logs) = check_claim(&node, "check-copied", "db-restored").await;
    assert_eq!(phase, "Succeeded", "the VolumeSnapshot copied into db-restored fails its check:\n{logs}");
    assert!(logs.contains("CHECKED 33 files") && logs.contains("HELLO written by web-"), "{logs}");
    let temporary = ListParams::default().labels(&format!("hoard.dev/restore-session={name}"));
    let claims = Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::namespaced(node.client.clone(), NS);
    let pods_ns = Api::<Pod>::namespaced(node.client.clone(), NS);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !(pods_ns.list(&temporary).await.unwrap().items.is_empty()
        && claims.list(&temporary).await.unwrap().items.is_empty())
    {
        assert!(std::time::Instant::now() < deadline, "restore {name} left its clone or exposer pod behind");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    backup_now(&node, "db", "manual").await;
    assert_eq!(workload_pods(&node).await, before, "backups must not restart or replace workload pods");

    // helm uninstall removes hoard's pods; the workloads stay.
    let mut uninstall = node.helm();
    uninstall.args(["uninstall", "hoard", "-n", SYSTEM_NS, "--wait", "--timeout", "2m"]);
    run(uninstall, Duration::from_secs(180));
    let pods = Api::<Pod>::namespaced(node.client.clone(), SYSTEM_NS);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let left = pods.list(&ListParams::default()).await.unwrap().items;
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pods left after helm uninstall: {:?}",
            left.iter().map(|p| &p.metadata.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(workload_pods(&node).await, before);
}
