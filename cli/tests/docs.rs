//! docs/cli.md is executable: every ```sh block runs, in order, as one bash script (`set -euo
//! pipefail`, so every command must succeed) with `hoard` and `kubectl-hoard` on PATH, against a
//! real kube-apiserver whose kubeconfig context points at a fresh namespace and a real S3 server.
//! Blocks that show output are ```text and are not run.
//!
//! The objects the page names (BackupConfiguration `app`, Repository `app-repo`, Snapshot
//! `app-repo-4xk2p`, BackupSession `app-nightly-4xk2p`, RestoreSession `restore-data-9fz2q`, PVC
//! `data`, Deployment `app`) are created here first; no controller runs, so their status is
//! written here too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod plugin_common;

use std::path::Path;
use std::process::{Command, Stdio};

use hoard_api::crd::{BackupConfiguration, BackupSession, RestoreSession, Snapshot};
use plugin_common::*;

const DOC: &str = include_str!("../../docs/cli.md");

/// `(line number, body)` of each ```sh block.
fn sh_blocks(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in md.lines().enumerate() {
        let fence = line.trim_end();
        match current.as_mut() {
            Some((n, body)) if fence == "```" => {
                out.push((*n, std::mem::take(body)));
                current = None;
            }
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None if fence == "```sh" => current = Some((i + 1, String::new())),
            None => {}
        }
    }
    assert!(current.is_none(), "docs/cli.md: unterminated ```sh block");
    out
}

#[test]
fn the_page_shows_every_verb() {
    let blocks: String = sh_blocks(DOC).into_iter().map(|(_, b)| b).collect();
    for verb in [
        "hoard init",
        "hoard backup",
        "hoard snapshots",
        "hoard ls",
        "hoard diff",
        "hoard restore",
        "hoard dump",
        "hoard stats",
        "hoard check",
        "hoard forget",
        "hoard prune",
        "hoard key list",
        "hoard key add",
        "hoard copy",
        "hoard unlock",
        "hoard repair index",
        "kubectl hoard trigger",
        "kubectl hoard pause",
        "kubectl hoard resume",
        "kubectl hoard sessions",
        "kubectl hoard snapshots",
        "kubectl hoard describe snapshot",
        "kubectl hoard restore",
        "kubectl hoard watch",
        "kubectl hoard repo check",
        "kubectl hoard repo unlock",
        "kubectl hoard repo keys list",
    ] {
        assert!(blocks.contains(verb), "docs/cli.md runs no `{verb}`");
    }
}

fn write_sample(work: &Path) {
    std::fs::create_dir_all(work.join("app/conf")).unwrap();
    std::fs::create_dir_all(work.join("app/data")).unwrap();
    std::fs::write(work.join("app/conf/app.yaml"), "listen: :8080\nlog: info\n").unwrap();
    std::fs::write(work.join("app/data/records.bin"), hoard_testkit::random_bytes(200_000, 7)).unwrap();
    std::fs::write(work.join("app.sql"), "CREATE TABLE t (id int);\nINSERT INTO t VALUES (1);\n").unwrap();
}

/// A copy of the test kubeconfig whose current context defaults to `ns`.
fn kubeconfig_for(src: &Path, ns: &str, dst: &Path) {
    let mut v: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    let current = v["current-context"].as_str().unwrap().to_string();
    for ctx in v["contexts"].as_sequence_mut().unwrap() {
        if ctx["name"].as_str() == Some(current.as_str()) {
            ctx["context"]["namespace"] = ns.into();
        }
    }
    std::fs::write(dst, serde_yaml::to_string(&v).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sh_block_in_docs_cli_md_runs() {
    let Some(c) = cluster().await else { return };
    let Some(endpoint) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    let ns = c.namespace("docs").await;
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    write_sample(&work);
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(hoard_bin(), bin.join("hoard")).unwrap();
    std::os::unix::fs::symlink(plugin_bin(), bin.join("kubectl-hoard")).unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    kubeconfig_for(&c.kubeconfig, &ns, &kubeconfig);

    // The cluster side of the page.
    let repo = S3Repo::create(&endpoint, &unique("docs"), &format!("{ns}/app"), &sample_tree(tmp.path()));
    repo.register(&c, &ns, "app-repo").await;
    let repo_snapshot: serde_json::Value =
        serde_json::from_slice(&repo.hoard(&["snapshots", "--json"]).stdout).unwrap();
    let snapshot_id = repo_snapshot[0]["id"].as_str().unwrap().to_string();
    let mut bc = configuration("app", &["nightly"]);
    bc["spec"]["sessions"][0]["repositories"][0]["name"] = "app-repo".into();
    create::<BackupConfiguration>(&c, &ns, bc).await;
    create::<BackupSession>(&c, &ns, backup_session("app-nightly-4xk2p", "app")).await;
    create::<Snapshot>(&c, &ns, snapshot("app-repo-4xk2p", "app-repo", "app-nightly-4xk2p")).await;
    set_status::<Snapshot>(
        &c,
        &ns,
        "app-repo-4xk2p",
        serde_json::json!({"phase": "Succeeded", "snapshotTime": "2026-01-02T03:04:05Z", "size": 320_000u64,
            "totalComponents": 1, "components": {"data": {"phase": "Succeeded", "node": "node-1", "pod": "app-7c9d-x2",
            "volume": "data", "snapshotId": snapshot_id, "size": 320_000u64, "duration": "2.1s", "attempts": 1}}}),
    )
    .await;
    set_status::<BackupSession>(
        &c,
        &ns,
        "app-nightly-4xk2p",
        serde_json::json!({"phase": "Succeeded", "duration": "41s",
            "snapshots": [{"name": "app-repo-4xk2p", "repository": "app-repo", "phase": "Succeeded"}]}),
    )
    .await;
    create::<RestoreSession>(
        &c,
        &ns,
        serde_json::json!({"metadata": {"name": "restore-data-9fz2q"}, "spec": {
            "target": {"kind": "PersistentVolumeClaim", "name": "data"},
            "dataSource": {"repository": "app-repo", "snapshot": "app-repo-4xk2p"}}}),
    )
    .await;
    set_status::<RestoreSession>(
        &c,
        &ns,
        "restore-data-9fz2q",
        serde_json::json!({"phase": "Succeeded", "duration": "9s", "components": {"data": {"phase": "Succeeded"}}}),
    )
    .await;
    create::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(
        &c,
        &ns,
        serde_json::json!({"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;
    create::<k8s_openapi::api::apps::v1::Deployment>(
        &c,
        &ns,
        serde_json::json!({"metadata": {"name": "app"}, "spec": {"selector": {"matchLabels": {"app": "app"}},
            "template": {"metadata": {"labels": {"app": "app"}}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}}),
    )
    .await;

    let blocks = sh_blocks(DOC);
    assert!(blocks.len() >= 10, "docs/cli.md: only {} ```sh blocks found", blocks.len());
    let mut script = String::from("set -euo pipefail\n");
    for (line, body) in &blocks {
        script.push_str(&format!("echo '>>> docs/cli.md:{line}' >&2\n{body}"));
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&work)
        .env("PATH", path)
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("HOARD_PASSWORD_FILE")
        .env_remove("HOARD_REPOSITORY")
        .env_remove("HOARD_PASSWORD")
        .env_remove("HOARD_S3_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (so, se) = (stdout(&out), stderr(&out));
    if std::env::var("HOARD_TEST_VERBOSE").is_ok() {
        eprintln!("{so}\n{se}");
    }
    assert!(
        out.status.success(),
        "a docs/cli.md block failed (exit {:?}); the last `>>>` marks it\nstdout:\n{so}\nstderr:\n{se}",
        out.status.code()
    );
    // The repository password and the S3 secret given to the cluster never show up.
    assert!(!so.contains(PASSWORD) && !se.contains(PASSWORD));
}

const CONCEPTS: &str = include_str!("../../docs/concepts.md");

/// The commands docs/concepts.md shows inline (`kubectl ...` and `hoard ...` in backticks),
/// whitespace-normalised (one wraps over two lines).
fn inline_commands(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_fence = false;
    let mut prose = String::new();
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            prose.push('\n');
            continue;
        }
        if !in_fence {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    for (i, span) in prose.split('`').enumerate() {
        let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
        if i % 2 == 1 && (span.starts_with("kubectl ") || span.starts_with("hoard ")) {
            out.push(span);
        }
    }
    out
}

/// The inline commands of docs/concepts.md run as written: `kubectl hoard trigger postgres`
/// against the page's own BackupConfiguration (created from its YAML, in a fresh namespace that
/// the kubeconfig's context defaults to), `kubectl get hoard`, and the disaster-recovery
/// `hoard -r s3://team-backups/cluster-1/demo/postgres snapshots` against a repository at
/// exactly that location on the real S3 server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_of_docs_concepts_md_run() {
    let Some(c) = cluster().await else { return };
    let Some(endpoint) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    // `hoard forget`, `kubectl hoard restore`, `kubectl apply` name a verb in passing; docs/cli.md's
    // blocks run each hoard verb named.
    let is_verb = |c: &String| {
        let words = c.split(' ').count();
        (c.starts_with("kubectl hoard ") && words == 3) || words == 2
    };
    let (verbs, cmds): (Vec<String>, Vec<String>) = inline_commands(CONCEPTS).into_iter().partition(is_verb);
    let cli_blocks: String = sh_blocks(DOC).into_iter().map(|(_, b)| b).collect();
    for verb in verbs.iter().filter(|v| v.contains("hoard")) {
        assert!(cli_blocks.contains(verb.as_str()), "docs/concepts.md names `{verb}`, which docs/cli.md never runs");
    }
    assert_eq!(
        cmds,
        [
            "kubectl hoard trigger postgres",
            "hoard -r s3://team-backups/cluster-1/demo/postgres snapshots",
            "kubectl get hoard",
        ],
        "docs/concepts.md shows other inline commands: run them here"
    );
    let ns = c.namespace("docs-concepts").await;
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(hoard_bin(), bin.join("hoard")).unwrap();
    std::os::unix::fs::symlink(plugin_bin(), bin.join("kubectl-hoard")).unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    kubeconfig_for(&c.kubeconfig, &ns, &kubeconfig);

    // The page's BackupConfiguration `postgres`, as written but in the test namespace.
    let mut config = None;
    for block in CONCEPTS.split("```yaml\n").skip(1).map(|b| b.split("```").next().unwrap()) {
        for document in serde_yaml::Deserializer::from_str(block) {
            let v: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
            if v["kind"] == "BackupConfiguration" && v["metadata"]["name"] == "postgres" {
                config = Some(v);
            }
        }
    }
    let mut config = config.expect("docs/concepts.md has the BackupConfiguration postgres");
    config["metadata"]["namespace"] = ns.as_str().into();
    create::<BackupConfiguration>(&c, &ns, config).await;

    // The repository the page's BackupStorage (bucket team-backups, prefix cluster-1) and
    // configuration (directory demo/postgres) describe, on the test S3 server.
    let out = Command::new("curl")
        .args(["-sS", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
        .arg(format!("{S3_KEY_ID}:{S3_SECRET}"))
        .args(["-X", "PUT", &format!("{endpoint}/team-backups"), "-o", "/dev/null", "-w", "%{http_code}"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "200", "creating the bucket: {}", stderr(&out));
    let repo = S3Repo {
        endpoint: endpoint.clone(),
        bucket: "team-backups".into(),
        prefix: "cluster-1".into(),
        path: "demo/postgres".into(),
    };
    // A previous run against the same server may have created it already.
    let init = repo.hoard(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf"]);
    assert!(init.status.success() || stderr(&init).contains("already"), "init: {}", stderr(&init));
    let data = sample_tree(tmp.path());
    let out = repo.hoard(&["backup", data.to_str().unwrap(), "--name", "data", "--host", "concepts-doc"]);
    assert!(out.status.success(), "backup: {}", stderr(&out));

    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let kube_cache = tmp.path().join("kube-cache");
    let try_run = |cmd: &str| {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", cmd])
            .env("PATH", &path)
            .env("KUBECONFIG", &kubeconfig)
            // A fresh discovery cache: one kept from another cluster on the same port would hide the CRDs.
            .env("KUBECACHEDIR", &kube_cache)
            .env("HOARD_PASSWORD", PASSWORD)
            .env("HOARD_S3_ENDPOINT", &endpoint)
            .env("HOARD_CACHE_DIR", tmp.path().join("hoard-cache"))
            .env("AWS_ACCESS_KEY_ID", S3_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env("AWS_REGION", "us-east-1")
            .env_remove("HOARD_PASSWORD_FILE")
            .env_remove("HOARD_REPOSITORY")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let run = |cmd: &str| {
        // The API server's discovery may lag the CRDs applied just before (the `hoard`
        // category): retry that one error, bounded to ~30 s.
        let mut out = try_run(cmd);
        for _ in 0..15 {
            if out.status.success() || !stderr(&out).contains("doesn't have a resource type") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
            out = try_run(cmd);
        }
        assert!(out.status.success(), "docs/concepts.md: `{cmd}` exited {:?}\n{}", out.status.code(), stderr(&out));
        stdout(&out)
    };
    let triggered = run(&cmds[0]);
    let session = triggered
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("backupsession.hoard.dev/"))
        .and_then(|l| l.strip_suffix(" created"))
        .unwrap_or_else(|| panic!("{triggered}"))
        .to_string();
    assert!(session.starts_with("postgres-hourly-"), "{session}");
    let bs: BackupSession = get(&c, &ns, &session).await;
    assert_eq!((bs.spec.invoker.name.as_str(), bs.spec.session.as_str()), ("postgres", "hourly"));
    let listed = run(&cmds[2]);
    assert!(listed.contains("backupconfiguration.hoard.dev/postgres"), "{listed}");
    assert!(listed.contains(&format!("backupsession.hoard.dev/{session}")), "{listed}");
    let snapshots = run(&cmds[1]);
    assert!(snapshots.contains("concepts-doc"), "{snapshots}");
    assert!(!snapshots.contains(PASSWORD));
}
