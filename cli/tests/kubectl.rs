//! The `kubectl-hoard` binary against a real kube-apiserver (and, for `repo` verbs, a real S3
//! server). No controller runs: where a command reads status, the test writes it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod plugin_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use hoard_api::crd::{BackupConfiguration, BackupSession, RestoreSession, Snapshot, TargetKind};
use plugin_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_pause_resume_and_sessions() {
    let Some(c) = cluster().await else { return };
    let ns = c.namespace("kh-trigger").await;
    create::<BackupConfiguration>(&c, &ns, configuration("app", &["nightly", "hourly"])).await;

    // Two sessions: the plugin asks which, and says how.
    let out = kh_expect(&c, &ns, &["trigger", "app"], 2);
    assert!(stderr(&out).contains(&format!("kubectl hoard trigger app --session nightly -n {ns}")), "{}", stderr(&out));
    let out = kh_expect(&c, &ns, &["trigger", "app", "--session", "weekly"], 2);
    assert!(stderr(&out).contains("has no session \"weekly\" (it has: nightly, hourly)"), "{}", stderr(&out));

    // A missing configuration: exit 21 and the command that lists them.
    let out = kh_expect(&c, &ns, &["trigger", "nope"], 21);
    assert_eq!(
        stderr(&out).trim(),
        format!(
            "error: backupconfiguration \"nope\" not found in namespace \"{ns}\"; list them with: kubectl get backupconfigurations -n {ns}"
        )
    );

    let out = kh_expect(&c, &ns, &["trigger", "app", "--session", "nightly"], 0);
    let text = stdout(&out);
    let name = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("backupsession.hoard.dev/"))
        .and_then(|l| l.strip_suffix(" created"))
        .unwrap_or_else(|| panic!("{text}"))
        .to_string();
    assert!(name.starts_with("app-nightly-"), "{name}");
    assert!(text.contains(&format!("kubectl hoard watch {name} -n {ns}")), "{text}");
    let bs: BackupSession = get(&c, &ns, &name).await;
    // The controller's labels, so its history trimming and selectors see manual sessions too.
    let labels = bs.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("hoard.dev/configuration").map(String::as_str), Some("app"));
    assert_eq!(labels.get("hoard.dev/session").map(String::as_str), Some("nightly"));
    assert_eq!(bs.spec.invoker.name, "app");
    assert_eq!(bs.spec.invoker.kind, "BackupConfiguration");
    assert_eq!(bs.spec.invoker.api_group, "hoard.dev");
    assert_eq!(bs.spec.session, "nightly");
    assert_eq!(bs.spec.trigger, hoard_api::crd::Trigger::Manual);

    // -o json prints the created object.
    let out = kh_expect(&c, &ns, &["trigger", "app", "--session", "hourly", "-o", "json"], 0);
    let v = json(&out);
    assert_eq!(v["kind"], "BackupSession");
    assert_eq!(v["spec"]["session"], "hourly");
    let hourly = v["metadata"]["name"].as_str().unwrap().to_string();

    // pause / resume flip spec.paused; a second pause says so.
    let out = kh_expect(&c, &ns, &["pause", "app"], 0);
    assert!(stdout(&out).contains("backupconfiguration.hoard.dev/app paused"));
    assert!(stdout(&out).contains(&format!("kubectl hoard resume app -n {ns}")));
    assert!(get::<BackupConfiguration>(&c, &ns, "app").await.spec.paused);
    let out = kh_expect(&c, &ns, &["pause", "app"], 0);
    assert!(stdout(&out).contains("already paused"));
    // Triggering a paused configuration warns that the session will be skipped.
    let out = kh_expect(&c, &ns, &["trigger", "app", "--session", "nightly", "-o", "name"], 0);
    assert!(stderr(&out).contains("is paused"), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("backupsession.hoard.dev/app-nightly-"));
    kh_expect(&c, &ns, &["resume", "app"], 0);
    assert!(!get::<BackupConfiguration>(&c, &ns, "app").await.spec.paused);
    kh_expect(&c, &ns, &["pause", "nope"], 21);

    // sessions: a table, JSON that parses, filters.
    set_status::<BackupSession>(&c, &ns, &name, serde_json::json!({"phase": "Succeeded", "duration": "12s"})).await;
    let out = kh_expect(&c, &ns, &["sessions"], 0);
    let table = stdout(&out);
    let header = table.lines().next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["NAME", "CONFIG", "SESSION", "TRIGGER", "PHASE", "DURATION", "AGE"]
    );
    let row = table.lines().find(|l| l.starts_with(&name)).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..6], ["app", "nightly", "Manual", "Succeeded", "12s"]);
    assert_eq!(table.lines().count(), 4, "{table}");
    let v = json(&kh_expect(&c, &ns, &["sessions", "-o", "json"], 0));
    assert_eq!(v["kind"], "List");
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    assert!(v["items"][0]["metadata"].get("managedFields").is_none());
    let v = json(&kh_expect(&c, &ns, &["sessions", "--config", "app", "-o", "json"], 0));
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    let y = stdout(&kh_expect(&c, &ns, &["sessions", "-o", "yaml"], 0));
    assert!(y.contains(&format!("name: {hourly}")), "{y}");
    let wide = stdout(&kh_expect(&c, &ns, &["sessions", "-o", "wide"], 0));
    assert!(wide.lines().next().unwrap().contains("SNAPSHOTS"));
    let out = kh_expect(&c, &ns, &["sessions", "--config", "other"], 21);
    assert!(stderr(&out).contains(&format!("list them with: kubectl get backupconfigurations -n {ns}")));

    // -A adds the NAMESPACE column and finds these sessions among all.
    let all = stdout(&kh_expect(&c, &ns, &["sessions", "-A"], 0));
    assert!(all.lines().next().unwrap().starts_with("NAMESPACE"));
    assert!(all.lines().any(|l| l.starts_with(&ns) && l.contains(&name)));

    // An empty namespace: kubectl's message on stderr, nothing on stdout.
    let empty = c.namespace("kh-empty").await;
    let out = kh_expect(&c, &empty, &["sessions"], 0);
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out).trim(), format!("No resources found in {empty} namespace."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_describe() {
    let Some(c) = cluster().await else { return };
    let ns = c.namespace("kh-snap").await;
    create::<BackupConfiguration>(&c, &ns, configuration("app", &["nightly"])).await;
    create::<hoard_api::crd::Repository>(&c, &ns, repository("app-repo", "store", "x/app", "enc")).await;
    create::<hoard_api::crd::Repository>(&c, &ns, repository("other-repo", "store", "x/other", "enc")).await;
    create::<Snapshot>(&c, &ns, snapshot("app-repo-1", "app-repo", "app-nightly-1")).await;
    create::<Snapshot>(&c, &ns, snapshot("other-repo-1", "other-repo", "other-nightly-1")).await;
    set_status::<Snapshot>(
        &c,
        &ns,
        "app-repo-1",
        serde_json::json!({
            "phase": "Failed",
            "snapshotTime": "2026-01-02T03:04:05Z",
            "size": 3_145_728u64,
            "totalComponents": 2,
            "components": {
                "data": {"phase": "Succeeded", "node": "n1", "pod": "app-0", "volume": "data",
                          "snapshotId": "4f1c2a9be0d34e5f", "size": 3_145_728u64, "duration": "4.2s", "attempts": 1},
                "logs": {"phase": "Failed", "error": "volume logs: permission denied", "attempts": 3,
                          "warnings": ["skipped /var/log/secret: unreadable"]}
            },
            "conditions": [{"type": "Completed", "status": "True", "reason": "ComponentFailed",
                            "message": "1 of 2 components failed", "lastTransitionTime": "2026-01-02T03:05:00Z"}]
        }),
    )
    .await;

    let table = stdout(&kh_expect(&c, &ns, &["snapshots"], 0));
    assert_eq!(
        table.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["NAME", "REPOSITORY", "SESSION", "PHASE", "SIZE", "COMPONENTS", "AGE"]
    );
    let row: Vec<&str> = table.lines().find(|l| l.starts_with("app-repo-1")).unwrap().split_whitespace().collect();
    assert_eq!(&row[1..4], ["app-repo", "nightly", "Failed"]);
    assert_eq!(row[4..6].join(" "), "3.00 MiB");
    assert_eq!(row[6], "1/2");

    let v = json(&kh_expect(&c, &ns, &["snapshots", "--repository", "other-repo", "-o", "json"], 0));
    let names: Vec<&str> =
        v["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["other-repo-1"]);
    let v = json(&kh_expect(&c, &ns, &["snapshots", "--config", "app", "-o", "json"], 0));
    let names: Vec<&str> =
        v["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["app-repo-1"]);
    assert_eq!(v["items"][0]["apiVersion"], "hoard.dev/v1alpha1");
    assert_eq!(v["items"][0]["kind"], "Snapshot");
    let out = kh_expect(&c, &ns, &["snapshots", "--repository", "missing"], 21);
    assert!(stderr(&out).contains(&format!("kubectl get repositories.hoard.dev -n {ns}")), "{}", stderr(&out));
    let wide = stdout(&kh_expect(&c, &ns, &["snapshots", "-o", "wide"], 0));
    assert!(wide.contains("app-nightly-1") && wide.contains("2026-01-02T03:04:05Z"), "{wide}");

    let d = stdout(&kh_expect(&c, &ns, &["describe", "snapshot", "app-repo-1"], 0));
    for want in [
        "Name:           app-repo-1",
        "Repository:     app-repo",
        "BackupSession:  app-nightly-1",
        "Phase:          Failed",
        "Size:           3.00 MiB",
        "Components:     2 of 2 reported",
        "  data:",
        "    Snapshot ID:   4f1c2a9be0d34e5f",
        "    Source:        node n1, pod app-0, volume data",
        "  logs:",
        "    Error:         volume logs: permission denied",
        "    Attempts:      3",
        "    Warning:       skipped /var/log/secret: unreadable",
        "1 of 2 components failed",
    ] {
        assert!(d.contains(want), "missing {want:?} in\n{d}");
    }
    let v = json(&kh_expect(&c, &ns, &["describe", "snapshot", "app-repo-1", "-o", "json"], 0));
    assert_eq!(v["status"]["components"]["data"]["snapshotId"], "4f1c2a9be0d34e5f");
    let out = kh_expect(&c, &ns, &["describe", "snapshot", "nope"], 21);
    assert!(stderr(&out).contains(&format!(
        "snapshot \"nope\" not found in namespace \"{ns}\"; list them with: kubectl hoard snapshots -n {ns}"
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_creates_a_restore_session() {
    let Some(c) = cluster().await else { return };
    let ns = c.namespace("kh-restore").await;
    create::<hoard_api::crd::Repository>(&c, &ns, repository("app-repo", "store", "x/app", "enc")).await;
    create::<Snapshot>(&c, &ns, snapshot("app-repo-1", "app-repo", "s1")).await;
    create::<Snapshot>(&c, &ns, snapshot("app-repo-2", "app-repo", "s2")).await;
    set_status::<Snapshot>(&c, &ns, "app-repo-1", serde_json::json!({"phase": "Succeeded"})).await;
    set_status::<Snapshot>(&c, &ns, "app-repo-2", serde_json::json!({"phase": "Failed"})).await;
    create::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(
        &c,
        &ns,
        serde_json::json!({"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;

    let out = kh_expect(
        &c,
        &ns,
        &[
            "restore",
            "--snapshot",
            "app-repo-1",
            "--to",
            "pvc/data",
            "--include",
            "/data/etc",
            "--exclude",
            "*.tmp",
            "--overwrite",
        ],
        0,
    );
    let text = stdout(&out);
    let name = text
        .lines()
        .next()
        .unwrap()
        .strip_prefix("restoresession.hoard.dev/")
        .unwrap()
        .strip_suffix(" created")
        .unwrap();
    assert!(text.contains(&format!("kubectl hoard watch {name} -n {ns}")));
    let rs: RestoreSession = get(&c, &ns, name).await;
    assert_eq!(rs.spec.target.kind, TargetKind::PersistentVolumeClaim);
    assert_eq!(rs.spec.target.name, "data");
    assert_eq!(rs.spec.data_source.repository, "app-repo");
    assert_eq!(rs.spec.data_source.snapshot, "app-repo-1");
    assert_eq!(rs.spec.data_source.include, ["/data/etc"]);
    assert_eq!(rs.spec.data_source.exclude, ["*.tmp"]);
    assert_eq!(rs.spec.overwrite, hoard_api::crd::OverwritePolicy::Always, "--overwrite alone is always");

    // latest from a repository.
    let v = json(&kh_expect(&c, &ns, &["restore", "--repository", "app-repo", "--to", "pvc/data", "-o", "json"], 0));
    assert_eq!(v["spec"]["dataSource"]["snapshot"], "latest");
    assert_eq!(v["spec"]["overwrite"], "Never");
    let args = ["restore", "--repository", "app-repo", "--to", "pvc/data", "--overwrite", "if-changed", "-o", "json"];
    assert_eq!(json(&kh_expect(&c, &ns, &args, 0))["spec"]["overwrite"], "IfChanged");

    // Errors name the object and the next command.
    let out = kh_expect(&c, &ns, &["restore", "--snapshot", "app-repo-1", "--to", "pvc/missing"], 21);
    assert!(stderr(&out).contains(&format!(
        "persistentvolumeclaim \"missing\" not found in namespace \"{ns}\"; list them with: kubectl get pvc -n {ns}"
    )));
    let out = kh_expect(&c, &ns, &["restore", "--snapshot", "app-repo-1", "--to", "deployment/app"], 21);
    assert!(stderr(&out).contains(&format!("list them with: kubectl get deployments -n {ns}")));
    let out = kh_expect(&c, &ns, &["restore", "--snapshot", "app-repo-2", "--to", "pvc/data"], 2);
    assert!(stderr(&out).contains(&format!("kubectl hoard describe snapshot app-repo-2 -n {ns}")), "{}", stderr(&out));
    let out = kh_expect(&c, &ns, &["restore", "--snapshot", "nope", "--to", "pvc/data"], 21);
    assert!(stderr(&out).contains(&format!("kubectl hoard snapshots -n {ns}")));
    let out = kh_expect(&c, &ns, &["restore", "--to", "pvc/data"], 2);
    assert!(stderr(&out).contains("needs its repository"));
    kh_expect(&c, &ns, &["restore", "--repository", "app-repo", "--to", "daemonset/x"], 2);
    kh_expect(&c, &ns, &["restore", "--repository", "nope", "--to", "pvc/data"], 21);

    // From a CSI VolumeSnapshot: into a new claim, or an existing one (overrides only for new).
    let v = json(&kh_expect(
        &c,
        &ns,
        &["restore", "--from-volume-snapshot", "hoard-s-1-data", "--to", "pvc/fresh", "-o", "json"],
        0,
    ));
    assert_eq!(v["spec"]["dataSource"]["volumeSnapshot"], "hoard-s-1-data");
    assert_eq!(v["spec"]["target"]["name"], "fresh");
    assert!(v["spec"]["dataSource"].get("repository").is_none_or(|r| r == ""), "{v}");
    let v = json(&kh_expect(
        &c,
        &ns,
        &["restore", "--from-volume-snapshot", "s", "--to", "pvc/data", "--overwrite", "-o", "json"],
        0,
    ));
    assert_eq!(
        (&v["spec"]["target"]["name"], &v["spec"]["overwrite"]),
        (&serde_json::json!("data"), &serde_json::json!("Always")),
        "{v}"
    );
    let args =
        ["restore", "--from-volume-snapshot", "s", "--from-namespace", "team-a", "--to", "pvc/new", "-o", "json"];
    let v = json(&kh_expect(&c, &ns, &args, 0));
    assert_eq!(v["spec"]["dataSource"]["namespace"], "team-a", "{v}");
    let out = kh_expect(&c, &ns, &["restore", "--from-volume-snapshot", "s", "--to", "pvc/data", "--size", "1Gi"], 2);
    assert!(stderr(&out).contains("are for a new claim"), "{}", stderr(&out));
    kh_expect(&c, &ns, &["restore", "--from-volume-snapshot", "s", "--to", "deployment/app"], 2);
    kh_expect(&c, &ns, &["restore", "--from-volume-snapshot", "s", "--repository", "r", "--to", "pvc/x"], 2);
}

/// Starts `watch` in the background.
fn spawn_watch(c: &hoard_testkit::kube::TestCluster, ns: &str, args: &[&str]) -> std::process::Child {
    Command::new(plugin_bin())
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["-n", ns, "watch", "--interval", "100ms"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn wait_child(child: std::process::Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_sessions_to_their_end() {
    let Some(c) = cluster().await else { return };
    let ns = c.namespace("kh-watch").await;
    create::<BackupSession>(&c, &ns, backup_session("ok-1", "app")).await;
    create::<Snapshot>(&c, &ns, snapshot("app-repo-ok", "app-repo", "ok-1")).await;
    set_status::<BackupSession>(&c, &ns, "ok-1", serde_json::json!({"phase": "Running"})).await;

    let child = spawn_watch(&c, &ns, &["ok-1"]);
    let progress = |done: u64| {
        serde_json::json!({"phase": "Running", "components": {"data": {"phase": "Running", "progress": {
            "filesDone": done / 1000, "filesTotal": 100, "bytesDone": done * 1024, "bytesTotal": 100_000u64 * 1024,
            "bytesUploaded": done * 512, "bytesPerSecond": 1_048_576u64, "etaSeconds": 30}}}})
    };
    for done in [10_000u64, 50_000, 90_000] {
        set_status::<Snapshot>(&c, &ns, "app-repo-ok", progress(done)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    set_status::<Snapshot>(
        &c,
        &ns,
        "app-repo-ok",
        serde_json::json!({"phase": "Succeeded", "components": {"data": {"phase": "Succeeded", "progress": {
            "filesDone": 100, "filesTotal": 100, "bytesDone": 102_400_000u64, "bytesTotal": 102_400_000u64,
            "bytesUploaded": 51_200_000u64, "bytesPerSecond": 0}}}}),
    )
    .await;
    set_status::<BackupSession>(
        &c,
        &ns,
        "ok-1",
        serde_json::json!({"phase": "Succeeded", "duration": "3s", "snapshots": [{"name": "app-repo-ok", "repository": "app-repo", "phase": "Succeeded"}]}),
    )
    .await;
    let out = wait_child(child).await;
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(text.contains("backupsession/ok-1 Running"), "{text}");
    for pc in ["10%", "50%", "90%", "100%"] {
        assert!(text.contains("app-repo-ok/data  ") && text.contains(pc), "missing {pc}: {text}");
    }
    assert!(text.contains("1.00 MiB/s"), "{text}");
    assert!(text.trim_end().ends_with("backupsession \"ok-1\" Succeeded in 3s"), "{text}");

    // Failed: exit 30, the component's error, and where to look next.
    create::<BackupSession>(&c, &ns, backup_session("bad-1", "app")).await;
    create::<Snapshot>(&c, &ns, snapshot("app-repo-bad", "app-repo", "bad-1")).await;
    set_status::<Snapshot>(
        &c,
        &ns,
        "app-repo-bad",
        serde_json::json!({"phase": "Failed", "components": {"data": {"phase": "Failed", "error": "agent on n1: disk read error"}}}),
    )
    .await;
    set_status::<BackupSession>(
        &c,
        &ns,
        "bad-1",
        serde_json::json!({"phase": "Failed", "message": "1 component failed"}),
    )
    .await;
    let out = kh_expect(&c, &ns, &["watch", "bad-1"], 30);
    let err = stderr(&out);
    assert!(err.contains("app-repo-bad/data: agent on n1: disk read error"), "{err}");
    assert!(
        err.contains(&format!(
            "error: backupsession \"bad-1\" Failed: 1 component failed; see the details with: kubectl hoard describe snapshot app-repo-bad -n {ns}"
        )),
        "{err}"
    );

    // Skipped: exit 31 and how to resume.
    create::<BackupSession>(&c, &ns, backup_session("skip-1", "app")).await;
    set_status::<BackupSession>(&c, &ns, "skip-1", serde_json::json!({"phase": "Skipped", "message": "paused"})).await;
    let out = kh_expect(&c, &ns, &["watch", "skip-1"], 31);
    assert!(stderr(&out).contains(&format!("kubectl hoard resume app -n {ns}")));

    // A session that never ends: bounded by --timeout, exit 32.
    create::<BackupSession>(&c, &ns, backup_session("slow-1", "app")).await;
    let started = std::time::Instant::now();
    let out = kh_expect(&c, &ns, &["watch", "slow-1", "--timeout", "1s"], 32);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(stderr(&out).contains(&format!("keep watching with: kubectl hoard watch backupsession/slow-1 -n {ns}")));

    // -o json: one document per change, each parses.
    let out = kh_expect(&c, &ns, &["watch", "ok-1", "-o", "json"], 0);
    let docs: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(docs.last().unwrap()["phase"], "Succeeded");
    assert_eq!(docs.last().unwrap()["components"]["app-repo-ok/data"]["phase"], "Succeeded");

    // RestoreSessions: found by name; Failed exits 30.
    create::<RestoreSession>(
        &c,
        &ns,
        serde_json::json!({"metadata": {"name": "restore-1"}, "spec": {"target": {"kind": "PersistentVolumeClaim", "name": "data"},
            "dataSource": {"repository": "app-repo"}}}),
    )
    .await;
    let child = spawn_watch(&c, &ns, &["restore-1"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    set_status::<RestoreSession>(
        &c,
        &ns,
        "restore-1",
        serde_json::json!({"phase": "Failed", "message": "target volume is not empty",
            "components": {"data": {"phase": "Failed", "error": "not empty; pass --overwrite"}}}),
    )
    .await;
    let out = wait_child(child).await;
    assert_eq!(out.status.code(), Some(30), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stderr(&out).contains("restoresession \"restore-1\" Failed: target volume is not empty"),
        "{}",
        stderr(&out)
    );

    let out = kh_expect(&c, &ns, &["watch", "nope"], 21);
    assert!(stderr(&out).contains(&format!("kubectl hoard sessions -n {ns}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_and_context_errors() {
    let Some(c) = cluster().await else { return };
    let out =
        Command::new(plugin_bin()).args(["--kubeconfig", "/nonexistent/kubeconfig", "sessions"]).output().unwrap();
    assert_eq!(out.status.code(), Some(20));
    assert!(stderr(&out).contains("cannot read the kubeconfig /nonexistent/kubeconfig"));
    let out = Command::new(plugin_bin())
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["--context", "nope", "sessions"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(20), "{}", stderr(&out));
    assert!(stderr(&out).contains("kubectl config get-contexts"), "{}", stderr(&out));
    // The namespace defaults to the context's (here none: `default`), and KUBECONFIG is read.
    let out =
        Command::new(plugin_bin()).env("KUBECONFIG", &c.kubeconfig).args(["snapshots", "-o", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = Command::new(plugin_bin()).args(["sessions", "-o", "table"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `--context` selects a context other than the current one: here the current context points
/// at an API server that is not there (a closed loopback port), so only `--context good` (the
/// real server, and its namespace) can work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_flag_selects_a_non_current_context() {
    let Some(c) = cluster().await else { return };
    let ns = c.namespace("kh-context").await;
    create::<BackupSession>(&c, &ns, backup_session("app-nightly-ctx01", "app")).await;
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&c.kubeconfig).unwrap()).unwrap();
    let real_cluster = kc["clusters"][0].clone();
    let user = kc["users"][0]["name"].as_str().unwrap().to_string();
    // A loopback port nothing listens on: bound, then closed again.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut broken_cluster = real_cluster.clone();
    broken_cluster["name"] = "broken".into();
    broken_cluster["cluster"]["server"] = format!("https://{dead}").into();
    let mut good_cluster = real_cluster;
    good_cluster["name"] = "good".into();
    kc["clusters"] = vec![broken_cluster, good_cluster].into();
    kc["contexts"] = serde_yaml::from_str(&format!(
        "[{{name: broken, context: {{cluster: broken, user: {user}, namespace: nowhere}}}}, \
         {{name: good, context: {{cluster: good, user: {user}, namespace: {ns}}}}}]"
    ))
    .unwrap();
    kc["current-context"] = "broken".into();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("two-contexts.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    let run = |args: &[&str]| {
        Command::new(plugin_bin())
            .arg("--kubeconfig")
            .arg(&path)
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };

    // The current context really is broken: the plugin says it cannot reach the cluster.
    let out = run(&["sessions", "-o", "json"]);
    assert_eq!(out.status.code(), Some(20), "{}", stderr(&out));
    // --context good reaches the real server, in good's namespace (no -n given).
    let out = run(&["--context", "good", "sessions", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = json(&out);
    let names: Vec<&str> =
        v["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["app-nightly-ctx01"], "{v}");
    assert_eq!(v["items"][0]["metadata"]["namespace"], ns.as_str());
    // The flag also works after the subcommand, as kubectl allows, and -n still overrides.
    let out = run(&["sessions", "--context", "good", "-o", "name"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "backupsession.hoard.dev/app-nightly-ctx01");
    let other = c.namespace("kh-context-other").await;
    let out = run(&["--context", "good", "-n", &other, "sessions"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim(), format!("No resources found in {other} namespace."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repo_verbs_open_the_repository_with_the_cluster_credentials() {
    let Some(c) = cluster().await else { return };
    let Some(endpoint) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    let ns = c.namespace("kh-repo").await;
    let tmp = tempfile::tempdir().unwrap();
    let data = sample_tree(tmp.path());
    let repo = S3Repo::create(&endpoint, &unique("kh"), &format!("{ns}/app"), &data);
    repo.register(&c, &ns, "app-repo").await;

    let mut outputs = Vec::new();
    let out = kh_expect(&c, &ns, &["repo", "check", "app-repo", "--read-data"], 0);
    assert!(stdout(&out).contains("no errors were found"), "{}", stdout(&out));
    assert!(stderr(&out).contains(&format!("repository {ns}/app-repo: {}", repo.location())), "{}", stderr(&out));
    outputs.push(out);
    let out = kh_expect(&c, &ns, &["repo", "keys", "list", "app-repo", "-o", "json"], 0);
    let keys = json(&out);
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(keys[0]["current"], true);
    outputs.push(out);
    let out = kh_expect(&c, &ns, &["repo", "unlock", "app-repo"], 0);
    assert_eq!(stdout(&out), "removed 0 locks\n");
    outputs.push(out);
    let v = json(&kh_expect(&c, &ns, &["repo", "check", "app-repo", "-o", "json"], 0));
    assert_eq!(v["errors"].as_array().unwrap().len(), 0);

    // The same checks as `hoard check`: a damaged pack fails both with the same exit code.
    use object_store::ObjectStoreExt as _;
    let store = repo.object_store();
    let packs_prefix = object_store::path::Path::from(format!("{}/{}/packs", repo.prefix, repo.path));
    let packs: Vec<object_store::ObjectMeta> = {
        use futures::TryStreamExt as _;
        object_store::ObjectStore::list(&store, Some(&packs_prefix)).try_collect().await.unwrap()
    };
    let pack = packs.iter().max_by_key(|m| m.size).unwrap();
    let mut bytes = store.get(&pack.location).await.unwrap().bytes().await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    store.put(&pack.location, bytes.into()).await.unwrap();
    let local = repo.hoard(&["check", "--read-data"]);
    assert_ne!(local.status.code(), Some(0));
    let out = kh(&c, &ns, &["repo", "check", "app-repo", "--read-data"]);
    assert_eq!(out.status.code(), local.status.code(), "{}", stderr(&out));
    assert!(stderr(&out).contains("error: "), "{}", stderr(&out));
    outputs.push(out);

    // Wrong password in the Secret: hoard's exit code 12.
    create_secret(&c, &ns, "enc-wrong", &[("HOARD_PASSWORD", "not the password")]).await;
    create::<hoard_api::crd::Repository>(&c, &ns, repository("wrong-pw", "store", &repo.path, "enc-wrong")).await;
    outputs.push(kh_expect(&c, &ns, &["repo", "keys", "list", "wrong-pw"], 12));
    // A password Secret made from a file (trailing newline) opens it, as the controller reads it.
    create_secret(&c, &ns, "enc-file", &[("HOARD_PASSWORD", &format!("{PASSWORD}\n"))]).await;
    create::<hoard_api::crd::Repository>(&c, &ns, repository("from-file", "store", &repo.path, "enc-file")).await;
    outputs.push(kh_expect(&c, &ns, &["repo", "keys", "list", "from-file"], 0));
    // A Secret without the key: the error names the Secret and key, and how to add it.
    create_secret(&c, &ns, "enc-empty", &[("OTHER", "x")]).await;
    create::<hoard_api::crd::Repository>(&c, &ns, repository("no-key", "store", &repo.path, "enc-empty")).await;
    let out = kh_expect(&c, &ns, &["repo", "check", "no-key"], 1);
    assert!(stderr(&out).contains(&format!(
        "secret \"enc-empty\" in namespace \"{ns}\" (repository \"no-key\" spec.encryptionSecret) has no key HOARD_PASSWORD or RESTIC_PASSWORD"
    )), "{}", stderr(&out));
    outputs.push(out);
    // Missing objects along the chain.
    let out = kh_expect(&c, &ns, &["repo", "check", "nope"], 21);
    assert!(stderr(&out).contains(&format!("kubectl get repositories.hoard.dev -n {ns}")));
    create::<hoard_api::crd::Repository>(&c, &ns, repository("no-storage", "gone", &repo.path, "enc")).await;
    let out = kh_expect(&c, &ns, &["repo", "check", "no-storage"], 21);
    assert!(stderr(&out).contains(&format!(
        "backupstorage \"gone\" not found in namespace \"{ns}\"; list them with: kubectl get backupstorages -n {ns}"
    )));

    // No secret value is ever printed.
    for o in &outputs {
        for s in [stdout(o), stderr(o)] {
            assert!(!s.contains(PASSWORD) && !s.contains("not the password"), "secret printed: {s}");
        }
    }
}

/// RBAC: a ServiceAccount that may read configurations but not create sessions gets exit 22 and
/// the `kubectl auth can-i` command to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_requests_name_the_permission() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::{Api, PostParams};
    let Some(c) = cluster().await else { return };
    let ns = c.namespace("kh-rbac").await;
    create::<BackupConfiguration>(&c, &ns, configuration("app", &["nightly"])).await;
    create::<ServiceAccount>(&c, &ns, serde_json::json!({"metadata": {"name": "viewer"}})).await;
    create::<Role>(
        &c,
        &ns,
        serde_json::json!({"metadata": {"name": "viewer"}, "rules": [{"apiGroups": ["hoard.dev"],
            "resources": ["backupconfigurations"], "verbs": ["get", "list"]}]}),
    )
    .await;
    create::<RoleBinding>(
        &c,
        &ns,
        serde_json::json!({"metadata": {"name": "viewer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "viewer"},
            "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": ns}]}),
    )
    .await;
    let tr: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 600}})).unwrap();
    let token = Api::<ServiceAccount>::namespaced(c.client.clone(), &ns)
        .create_token_request("viewer", &PostParams::default(), &tr)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .unwrap();
    // The test kubeconfig with the ServiceAccount's token instead of the admin certificate.
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&c.kubeconfig).unwrap()).unwrap();
    for u in kc["users"].as_sequence_mut().unwrap() {
        u["user"] = serde_yaml::from_str(&format!("token: {token}")).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("viewer.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    let run = |args: &[&str]| {
        Command::new(plugin_bin()).arg("--kubeconfig").arg(&path).args(["-n", &ns]).args(args).output().unwrap()
    };
    let out = run(&["trigger", "app"]);
    assert_eq!(out.status.code(), Some(22), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("check with: kubectl auth can-i create backupsessions.hoard.dev -n {ns}")),
        "{}",
        stderr(&out)
    );
    let out = run(&["sessions"]);
    assert_eq!(out.status.code(), Some(22), "{}", stderr(&out));
    assert!(stderr(&out).contains("kubectl auth can-i list backupsessions.hoard.dev"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(&token));
}
