//! A real node for end-to-end tests, nothing simulated: `hack/kube/up.sh --with-csi
//! --with-node` in a state directory of the test's own starts etcd, the API server, KCM, the
//! scheduler, the CSI hostpath stack, containerd with runc and a kubelet; hoard's images are
//! made from the workspace's binaries (`hack/kube/images.py`, the same files the production
//! Dockerfiles copy, plus the libraries `ldd` lists) and imported into that containerd; `helm`
//! is the one hack/kube builds. Dropping a [`RealNode`] runs `down.sh --rm`, which deletes the
//! node's pods, removes every container, stops every process and unmounts what is left.
//!
//! Every command and wait is bounded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The repository root (hack/, chart/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `true` when this process may start containerd and a kubelet.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// Runs `cmd` with a time limit; panics with its output when it fails or overruns.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Drain the pipes on threads so a chatty command cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut b);
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() };
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A cluster with one real kubelet node, started for one test.
pub struct RealNode {
    pub dir: PathBuf,
    /// The `export` lines up.sh printed (KUBECONFIG, HOARD_NODE_NAME, HOARD_KUBELET_ROOT...).
    pub env: BTreeMap<String, String>,
    pub kubeconfig: PathBuf,
    pub client: Client,
    bin_dir: PathBuf,
}

impl std::fmt::Debug for RealNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNode").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl RealNode {
    /// Starts the cluster in `dir` (keep it short: unix socket paths live under it) with the
    /// hack/kube binaries of `bin_dir`.
    pub async fn up(bin_dir: &Path, dir: &Path) -> RealNode {
        let mut cmd = Command::new(repo_root().join("hack/kube/up.sh"));
        cmd.args(["--with-csi", "--with-node", "--dir"]).arg(dir).env("HOARD_KUBE_BIN", bin_dir);
        cmd.env_remove("KUBECONFIG").env("HOARD_KUBE_READY_TIMEOUT", "120");
        let out = run(cmd, Duration::from_secs(300));
        let env: BTreeMap<String, String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let kubeconfig = PathBuf::from(&env["KUBECONFIG"]);
        let config =
            Config::from_custom_kubeconfig(Kubeconfig::read_from(&kubeconfig).unwrap(), &KubeConfigOptions::default())
                .await
                .unwrap();
        let client = Client::try_from(config).unwrap();
        RealNode { dir: dir.to_path_buf(), env, kubeconfig, client, bin_dir: bin_dir.to_path_buf() }
    }

    pub fn var(&self, name: &str) -> &str {
        self.env.get(name).unwrap_or_else(|| panic!("up.sh did not export {name}: {:?}", self.env))
    }

    /// `kubectl` of the control plane's release, pointed at this cluster.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin_dir.join("kubectl"));
        c.arg("--kubeconfig").arg(&self.kubeconfig).arg("--request-timeout=30s");
        c
    }

    /// `helm`, pointed at this cluster, with its caches and config inside the state dir.
    pub fn helm(&self) -> Command {
        let mut c = Command::new(self.bin_dir.join("helm"));
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        c
    }

    /// `kubectl apply` of `yaml` (written to a file in the state dir first).
    pub fn apply(&self, yaml: &str) {
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let file = self.dir.join(format!("apply-{n}-{:x}.yaml", yaml.len()));
        std::fs::write(&file, yaml).unwrap();
        let mut c = self.kubectl();
        c.arg("apply").arg("-f").arg(&file);
        run(c, Duration::from_secs(90));
    }

    /// A process of the workspace (`kubectl-hoard`, `hoard`) with KUBECONFIG set to this cluster.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(crate::bin(name));
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// Builds a one-layer image holding `files` (workspace binaries → image paths, with their
    /// libraries, and the machine's CA bundle as distroless has one) and imports it into the node's containerd under `tag`.
    pub fn image(&self, tag: &str, files: &[(PathBuf, &str)], entrypoint: &str, user: Option<&str>) {
        let tar = self.dir.join("images").join(format!("{}.tar", tag.replace(['/', ':'], "_")));
        let mut cmd = Command::new("python3");
        cmd.arg(repo_root().join("hack/kube/images.py")).arg("--out").arg(&tar).args(["--tag", tag, "--ldd"]);
        for (src, dest) in files {
            cmd.arg("--file").arg(format!("{}:{dest}", src.display()));
        }
        // distroless (the production base) carries the CA bundle; HTTP clients load it.
        cmd.args(["--file", "/etc/ssl/certs/ca-certificates.crt"]);
        cmd.args(["--entrypoint", &serde_json::json!([entrypoint]).to_string()]);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        run(cmd, Duration::from_secs(120));
        let mut import = Command::new("ctr");
        import.args(["--address", self.var("HOARD_CONTAINERD_SOCK"), "-n", "k8s.io", "images", "import"]).arg(&tar);
        run(import, Duration::from_secs(120));
    }

    /// The logs of a pod's container (the kubelet serves them; this is a real read).
    pub async fn logs(&self, namespace: &str, pod: &str, container: Option<&str>) -> String {
        let pods = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let lp = LogParams { container: container.map(str::to_string), ..LogParams::default() };
        pods.logs(pod, &lp).await.unwrap_or_else(|e| format!("<no logs: {e}>"))
    }

    /// Pods in `namespace` matching `selector`, waiting (bounded) until `count` are Running and
    /// Ready.
    pub async fn ready_pods(&self, namespace: &str, selector: &str, count: usize, timeout: Duration) -> Vec<Pod> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let deadline = Instant::now() + timeout;
        loop {
            let list = pods.list(&ListParams::default().labels(selector)).await.unwrap().items;
            let ready: Vec<Pod> = list
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .cloned()
                .collect();
            if ready.len() == count {
                return ready;
            }
            if Instant::now() > deadline {
                let mut why = String::new();
                for p in &list {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    why += &format!("\n{name}: {:?}\n{}", p.status, self.logs(namespace, &name, None).await);
                }
                panic!("{count} Ready pods {selector} in {namespace} not reached within {timeout:?}:{why}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits (bounded) for a pod that runs to completion; returns its phase and logs.
    pub async fn finished_pod(&self, namespace: &str, name: &str, timeout: Duration) -> (String, String) {
        let pods = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let deadline = Instant::now() + timeout;
        loop {
            let pod = pods.get(name).await.unwrap();
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            if phase == "Succeeded" || phase == "Failed" {
                return (phase, self.logs(namespace, name, None).await);
            }
            assert!(
                Instant::now() < deadline,
                "pod {namespace}/{name} still {phase} after {timeout:?}: {:?}",
                pod.status
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let status = Command::new(repo_root().join("hack/kube/down.sh"))
            .arg("--dir")
            .arg(&self.dir)
            .arg("--rm")
            .stdin(Stdio::null())
            .status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("hack/kube/down.sh --dir {} --rm failed: {status:?}", self.dir.display());
        }
    }
}
