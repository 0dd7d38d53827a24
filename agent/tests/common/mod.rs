//! Shared by the agent's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use hoard_api::agent::v1::{
    CsiInlineSource, EmptyDirSource, PersistentVolumeSource, VolumeIdentity, persistent_volume_source::Plugin,
    volume_identity::Source,
};
use hoard_testkit::{KubeletVolume, KubeletVolumeKind};

pub const NODE: &str = "node-a";

/// The identity a controller would send for a fake kubelet volume.
pub fn identity(v: &KubeletVolume) -> VolumeIdentity {
    let source = match &v.kind {
        KubeletVolumeKind::Csi { pv_name, driver } => Source::Pvc(PersistentVolumeSource {
            claim_name: format!("claim-{}", v.volume_name),
            pv_name: pv_name.clone(),
            plugin: Some(Plugin::CsiDriver(driver.clone())),
        }),
        KubeletVolumeKind::InTree { pv_name, plugin } => Source::Pvc(PersistentVolumeSource {
            claim_name: format!("claim-{}", v.volume_name),
            pv_name: pv_name.clone(),
            plugin: Some(Plugin::InTreePlugin(plugin.clone())),
        }),
        KubeletVolumeKind::EmptyDir => Source::EmptyDir(EmptyDirSource {}),
        KubeletVolumeKind::CsiInline { driver } => Source::CsiInline(CsiInlineSource { driver: driver.clone() }),
    };
    VolumeIdentity {
        node_name: NODE.into(),
        pod_uid: v.pod_uid.clone(),
        volume_name: v.volume_name.clone(),
        namespace: "default".into(),
        pod_name: format!("pod-{}", &v.pod_uid[..8]),
        source: Some(source),
    }
}

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hoard_api::agent::v1::agent_client::AgentClient;
use hoard_api::agent::v1::{Phase, Progress, Repository as RepoMsg};
use hoard_core::crypto::KdfParams;
use hoard_core::repo::InitOptions;
use hoard_core::store::{StoreOptions, open_store};
use hoard_core::{Password, Repository};
use hoard_testkit::TestPki;
use tonic::transport::Channel;

pub const PASSWORD: &str = "agent-test-password";

/// A running `hoard-agent` process; killed when dropped.
pub struct Agent {
    pub child: Child,
    pub grpc: String,
    pub metrics: String,
    pub log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Starts the agent binary on loopback ports and waits (bounded) for its address line.
    pub fn start(kubelet_root: &Path, pki: &TestPki, work: &Path, extra: &[&str]) -> Agent {
        std::fs::create_dir_all(work).unwrap();
        let log = work.join(format!(
            "agent-{}.log",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_hoard-agent"))
            .args(["--node-name", NODE, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--kubelet-root")
            .arg(kubelet_root)
            .arg("--tls-ca")
            .arg(pki.pem("ca"))
            .arg("--tls-cert")
            .arg(pki.pem("agent"))
            .arg("--tls-key")
            .arg(pki.key("agent"))
            .arg("--scratch-dir")
            .arg(work.join("scratch"))
            .args(["--allow-file-repositories"])
            .args(if extra.iter().any(|a| a.starts_with("--grace-period")) {
                &[][..]
            } else {
                &["--grace-period", "20"][..]
            })
            // Completed orders are recorded in the work directory, which survives restarts.
            .arg("--state-dir")
            .arg(work.join("state"))
            // 128 MiB unless the test sizes the budget itself.
            .args(if extra.iter().any(|a| a.starts_with("--memory-budget") || a.starts_with("--cgroup-memory-max")) {
                &[][..]
            } else {
                &["--memory-budget", "128Mi"][..]
            })
            .args(extra)
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
        let field = |k: &str| {
            line.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string).unwrap_or_else(|| {
                panic!("agent did not start: {line:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
            })
        };
        let (grpc, metrics) = (field("grpc="), field("metrics="));
        Agent { child, grpc, metrics, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client with the controller's certificate.
    pub async fn client(&self, pki: &TestPki) -> AgentClient<Channel> {
        self.client_as(pki, "controller", NODE).await.expect("connect as controller")
    }

    /// A client with certificate `name` from `pki`, expecting the agent of `node`.
    pub async fn client_as(&self, pki: &TestPki, name: &str, node: &str) -> Result<AgentClient<Channel>, String> {
        let material = hoard_api::tls::TlsMaterial::from_pem(&pki.read("ca"), &pki.read(name), &pki.read_key(name))
            .map_err(|e| e.to_string())?;
        let cfg = hoard_api::tls::client_config(material, node).map_err(|e| e.to_string())?;
        hoard_api::client::connect(&self.grpc, Arc::new(cfg), Duration::from_secs(10)).await.map_err(|e| e.to_string())
    }

    /// GET a path on the metrics port (plain HTTP/1.0).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (code, body)
    }

    /// The value of one metric line (exact name with labels), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()))
            .unwrap_or(0.0)
    }
}

/// Creates a filesystem repository with cheap key derivation.
pub async fn init_repo(dir: &Path) -> Arc<Repository> {
    let store = open_store(dir.to_str().unwrap(), &StoreOptions { create_dir: true, ..Default::default() }).unwrap();
    let opts = InitOptions {
        kdf: KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 },
        allow_weak_kdf: true,
        ..Default::default()
    };
    Arc::new(Repository::init(store, &Password::new(PASSWORD), opts).await.unwrap())
}

pub async fn open_repo(dir: &Path) -> Arc<Repository> {
    let store = open_store(dir.to_str().unwrap(), &StoreOptions::default()).unwrap();
    Arc::new(Repository::open(store, &Password::new(PASSWORD)).await.unwrap())
}

pub fn repo_msg(dir: &Path) -> RepoMsg {
    RepoMsg { location: dir.to_str().unwrap().into(), password: PASSWORD.into(), ..Default::default() }
}

/// Reads a progress stream to its terminal event (bounded by `limit`).
pub async fn finish(
    stream: Result<tonic::Response<tonic::Streaming<Progress>>, tonic::Status>,
    limit: Duration,
) -> Result<Progress, tonic::Status> {
    let mut s = stream?.into_inner();
    let mut last = None;
    let r = tokio::time::timeout(limit, async {
        while let Some(ev) = s.message().await? {
            let terminal = Phase::try_from(ev.phase).is_ok_and(|p| p.is_terminal());
            last = Some(ev);
            if terminal {
                break;
            }
        }
        Ok::<_, tonic::Status>(())
    })
    .await;
    match r {
        Err(_) => panic!("order did not finish within {limit:?}; last event {last:?}"),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Ok(last.expect("no event")),
    }
}

/// Restores a snapshot's only component with hoard-core into `target`.
pub async fn core_restore(repo: &Arc<Repository>, snapshot: &str, target: &Path) {
    // Other processes wrote to the repository since it was opened.
    repo.load_index().await.unwrap();
    let (_, snap) = repo.find_snapshot(snapshot, &Default::default()).await.unwrap();
    let comp = &snap.components[0];
    let out = hoard_core::restore::restore(
        Arc::clone(repo),
        hoard_core::restore::RestoreSource::Tree(comp.root),
        hoard_core::restore::RestoreOptions::new(target),
    )
    .await
    .unwrap();
    assert!(out.failed.is_empty(), "{:?}", out.failed);
}

/// Total bytes of the pack files of a filesystem repository.
pub fn pack_bytes(repo: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![repo.join("packs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            // Staging files (`#` in the name) are not packs yet, and vanish when published.
            if e.file_name().to_string_lossy().contains('#') {
                continue;
            }
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// The `hoard` CLI binary, built beside the agent (`cargo test --workspace` builds every
/// binary; alone: `cargo build -p hoard --bin hoard`). Missing: fails in CI, skips elsewhere.
pub fn hoard_cli() -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join("hoard");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{} not built: in CI `cargo test --workspace` builds it", p.display());
    }
    eprintln!("SKIP: {} not built; run `cargo build -p hoard --bin hoard`", p.display());
    None
}
