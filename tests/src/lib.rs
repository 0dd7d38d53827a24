//! End-to-end harness: the test plays the kubelet against a real API server (Node objects with
//! heartbeats, Pods bound to nodes and marked Running, volume directories laid out where the
//! kubelet would put them), while `hoard-controller` and one `hoard-agent` per node run as
//! separate processes over real sockets.
//!
//! Every wait is bounded; every process is killed when its handle drops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

pub use hoard_testkit::kube::{FakeNode, TestCluster};

pub mod realnode;
pub mod simkubelet;

/// A binary of the workspace, built next to this test (`cargo test --workspace` builds them).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo build --workspace --bins` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A child process that is killed when dropped; its stderr goes to `log`.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    /// `host:port` of its `/metrics` endpoint.
    pub metrics: Option<String>,
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hoard-agent` for `node` on loopback and returns it with its gRPC port.
pub fn start_agent(node: &str, kubelet_root: &Path, pki: &Path, work: &Path) -> (Proc, u16) {
    std::fs::create_dir_all(work).unwrap();
    let log = work.join(format!("agent-{node}.log"));
    let mut child = Command::new(bin("hoard-agent"))
        .args(["--node-name", node, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--kubelet-root")
        .arg(kubelet_root)
        .arg("--tls-ca")
        .arg(pki.join("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.join(format!("agent-{node}.pem")))
        .arg("--tls-key")
        .arg(pki.join(format!("agent-{node}-key.pem")))
        .arg("--scratch-dir")
        .arg(work.join(format!("scratch-{node}")))
        .args(["--grace-period", "5"])
        .env("HOARD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
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
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("agent {node} did not start: {line:?}\n{}", std::fs::read_to_string(&log).unwrap()));
    let metrics = line.split_whitespace().find_map(|w| w.strip_prefix("metrics=")).map(str::to_string);
    (Proc { child, log, metrics }, grpc)
}

/// Starts `hoard-controller` as a separate process with `kubeconfig` (a ServiceAccount token).
pub fn start_controller(kubeconfig: &Path, namespace: &str, pki: &Path, work: &Path, metrics_port: u16) -> Proc {
    start_controller_with(kubeconfig, namespace, pki, work, metrics_port, &[])
}

/// [`start_controller`] with more arguments (`--helper-image`, say). The log is appended to,
/// so a restarted controller keeps its predecessor's lines.
pub fn start_controller_with(
    kubeconfig: &Path,
    namespace: &str,
    pki: &Path,
    work: &Path,
    metrics_port: u16,
    extra: &[&str],
) -> Proc {
    std::fs::create_dir_all(work).unwrap();
    let log = work.join("controller.log");
    let append = |p: &Path| std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
    let child = Command::new(bin("hoard-controller"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--namespace", namespace])
        .arg("--tls-ca")
        .arg(pki.join("ca.pem"))
        .arg("--tls-cert")
        .arg(pki.join("controller.pem"))
        .arg("--tls-key")
        .arg(pki.join("controller-key.pem"))
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(extra)
        .env("HOARD_LOG", "info,hoard_controller=debug")
        .stdin(Stdio::null())
        .stdout(append(&work.join("controller.stdout")))
        .stderr(append(&log))
        .spawn()
        .unwrap();
    Proc { child, log, metrics: Some(format!("127.0.0.1:{metrics_port}")) }
}

/// The body of `GET /metrics` at `addr` (`host:port`), over a plain HTTP/1.0 connection;
/// bounded by 10 s.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200"), "GET {addr}/metrics: {head}");
    body.to_string()
}

/// The metric names the `## Metrics` table of a doc page lists (backticked names in a row's
/// first cell; `prefix` is added to names without it).
pub fn documented_metrics(page: &str, prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(page)).unwrap();
    let section = text.split("\n## Metrics").nth(1).unwrap_or_else(|| panic!("{page} has no Metrics section"));
    let section = section.split("\n## ").next().unwrap_or_default();
    let mut names = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cell = row.split('|').nth(1).unwrap_or_default();
        for name in cell.split('`').skip(1).step_by(2) {
            names.push(if name.starts_with(prefix) { name.to_string() } else { format!("{prefix}{name}") });
        }
    }
    assert!(!names.is_empty(), "{page} lists no metrics");
    names
}

/// The documented metrics `scraped` lacks (a counter's family may be exposed without `_total`).
pub fn missing_metrics<'a>(documented: &'a [String], scraped: &str) -> Vec<&'a str> {
    documented
        .iter()
        .map(String::as_str)
        .filter(|name| !scraped.contains(&format!(" {} ", name.trim_end_matches("_total"))))
        .collect()
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `name` until `done` says so; panics with the last object after `timeout`.
pub async fn wait_for<K>(api: &Api<K>, name: &str, timeout: Duration, mut done: impl FnMut(&K) -> bool) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(obj) = api.get(name).await {
            if done(&obj) {
                return obj;
            }
            last = Some(obj);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out after {timeout:?} waiting for {name}; last seen: {last:#?}");
}

pub fn from_json<T: DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// Creates `pod` (bound to its `spec.nodeName`) and marks it Running and Ready with pod IP
/// 127.0.0.1, as the kubelet would. Returns the pod as stored (with its UID).
pub async fn run_pod(client: &Client, namespace: &str, pod: serde_json::Value) -> Pod {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let created = pods.create(&PostParams::default(), &from_json(pod)).await.unwrap();
    mark_running(client, namespace, &created).await
}

/// Marks `created` Running and Ready (pod IP 127.0.0.1), as the kubelet would once its
/// containers started.
pub async fn mark_running(client: &Client, namespace: &str, created: &Pod) -> Pod {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let name = created.metadata.name.clone().unwrap();
    let now = now_rfc3339();
    let containers: Vec<serde_json::Value> = created
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .map(|c| {
            json!({"name": c.name, "image": c.image, "imageID": "", "ready": true, "restartCount": 0,
                         "started": true, "state": {"running": {"startedAt": now}}})
        })
        .collect();
    let status = json!({"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "hostIP": "127.0.0.1",
        "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now},
                       {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                       {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                       {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": containers,
    }});
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap()
}

/// A CSI PersistentVolume bound to a new claim `claim` in `namespace`; returns the PV name.
pub async fn bound_claim(client: &Client, namespace: &str, claim: &str, driver: &str) -> String {
    let pv_name = format!("pv-{namespace}-{claim}");
    let pv: PersistentVolume = from_json(json!({
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "e2e",
            "csi": {"driver": driver, "volumeHandle": format!("vol-{namespace}-{claim}")},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }));
    Api::<PersistentVolume>::all(client.clone()).create(&PostParams::default(), &pv).await.unwrap();
    let pvc: PersistentVolumeClaim = from_json(json!({
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "e2e", "volumeName": pv_name,
                 "resources": {"requests": {"storage": "1Gi"}}},
    }));
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace);
    claims.create(&PostParams::default(), &pvc).await.unwrap();
    let bound = json!({"status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"}}});
    claims.patch_status(claim, &PatchParams::default(), &Patch::Merge(&bound)).await.unwrap();
    pv_name
}

pub async fn secret(client: &Client, namespace: &str, name: &str, data: &[(&str, &str)]) {
    let string_data: serde_json::Map<String, serde_json::Value> =
        data.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let s: Secret = from_json(json!({"metadata": {"name": name, "namespace": namespace}, "stringData": string_data}));
    Api::<Secret>::namespaced(client.clone(), namespace).create(&PostParams::default(), &s).await.unwrap();
}

/// One RBAC rule of the allow-list.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
}

/// `chart/hoard/rbac-allowlist.yaml` (generated from controller/src/rbac.rs): the permissions
/// the controller's code needs, cluster-wide and in its own namespace. The chart check script
/// proves the chart grants exactly these.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowList {
    pub cluster_rules: Vec<Rule>,
    #[serde(default)]
    pub namespace_rules: Vec<Rule>,
}

pub fn allowlist() -> AllowList {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart/hoard/rbac-allowlist.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(&path).expect("chart/hoard/rbac-allowlist.yaml")).unwrap()
}

/// Creates ServiceAccount `sa` in `namespace` with exactly the allow-listed permissions and
/// returns a kubeconfig that authenticates as it (a token from the TokenRequest API).
pub async fn service_account_kubeconfig(
    cluster: &TestCluster,
    namespace: &str,
    sa: &str,
    rules: &AllowList,
    out: &Path,
) -> PathBuf {
    let client = &cluster.client;
    let account: ServiceAccount = from_json(json!({"metadata": {"name": sa, "namespace": namespace}}));
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let subject = json!([{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]);
    let cr_name = format!("{namespace}-{sa}");
    let cr: ClusterRole = from_json(json!({"metadata": {"name": cr_name}, "rules": rules.cluster_rules}));
    Api::<ClusterRole>::all(client.clone()).create(&PostParams::default(), &cr).await.unwrap();
    let crb: ClusterRoleBinding = from_json(json!({
        "metadata": {"name": cr_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cr_name},
        "subjects": subject,
    }));
    Api::<ClusterRoleBinding>::all(client.clone()).create(&PostParams::default(), &crb).await.unwrap();
    let role: Role =
        from_json(json!({"metadata": {"name": sa, "namespace": namespace}, "rules": rules.namespace_rules}));
    Api::<Role>::namespaced(client.clone(), namespace).create(&PostParams::default(), &role).await.unwrap();
    let rb: RoleBinding = from_json(json!({
        "metadata": {"name": sa, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
        "subjects": subject,
    }));
    Api::<RoleBinding>::namespaced(client.clone(), namespace).create(&PostParams::default(), &rb).await.unwrap();

    let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"expirationSeconds": 3600}});
    let url = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token");
    let req = http_post_json(&url, &request);
    let resp: serde_json::Value = client.request(req).await.unwrap();
    let token = resp["status"]["token"].as_str().expect("token in TokenRequest status").to_string();

    // Same server and CA as the admin kubeconfig, the ServiceAccount's token as the user.
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&cluster.kubeconfig).unwrap()).unwrap();
    let cluster_entry = admin["clusters"][0]["cluster"].clone();
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": serde_json::to_value(&cluster_entry).unwrap()}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": sa, "namespace": namespace}}],
        "current-context": "e2e",
    });
    std::fs::write(out, serde_yaml::to_string(&kubeconfig).unwrap()).unwrap();
    out.to_path_buf()
}

fn http_post_json(url: &str, body: &serde_json::Value) -> http::Request<Vec<u8>> {
    http::Request::post(url).header("content-type", "application/json").body(serde_json::to_vec(body).unwrap()).unwrap()
}

/// What the audit log says a user did: `(verb, group, resource[/subresource], allowed)`.
pub fn audited_requests(audit_log: &Path, user: &str) -> Vec<(String, String, String, bool)> {
    let text = std::fs::read_to_string(audit_log).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        // Watches are long-running: they log ResponseStarted when they begin.
        .filter(|e| {
            e["user"]["username"] == user && (e["stage"] == "ResponseComplete" || e["stage"] == "ResponseStarted")
        })
        .filter_map(|e| {
            let obj = &e["objectRef"];
            let resource = obj["resource"].as_str()?;
            let resource = match obj["subresource"].as_str() {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.to_string(),
            };
            let allowed = e["annotations"]["authorization.k8s.io/decision"] != "forbid";
            Some((
                e["verb"].as_str().unwrap_or_default().to_string(),
                obj["apiGroup"].as_str().unwrap_or_default().to_string(),
                resource,
                allowed,
            ))
        })
        .collect()
}

/// Files (relative path → bytes) under `dir`, for comparing a restore with its source.
pub fn tree_contents(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}
