//! End to end on a real API server (hack/kube): the chart's CRDs, the controller as a separate
//! process authenticated as its ServiceAccount with the chart's RBAC, two nodes each with its
//! own `hoard-agent` process and kubelet directory, and a real S3 server on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use hoard_api::crd::{
    BackupConfiguration, BackupSession, ComponentPhase, RestorePhase, RestoreSession, SessionPhase, Snapshot,
    SnapshotPhase, Trigger,
};
use hoard_e2e::*;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::discovery::ApiResource;
use serde_json::json;

const CSI_DRIVER: &str = "e2e.csi.hoard.dev";

fn chart_crds() -> Vec<CustomResourceDefinition> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart/hoard/crds");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| serde_yaml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
        .collect()
}

fn dynamic(cluster: &TestCluster, ns: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "hoard.dev".into(),
        version: "v1alpha1".into(),
        api_version: "hoard.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::namespaced_with(cluster.client.clone(), ns, &ar)
}

/// The CRD files shipped in the chart install on a real API server, and the API server itself
/// refuses bad specs (enums, patterns, list-map keys, CEL rules, immutability).
#[tokio::test]
async fn chart_crds_apply_and_reject_invalid_specs() {
    let Some(cluster) = TestCluster::connect().await else { return };
    let crds = chart_crds();
    assert_eq!(crds.len(), 7, "seven hoard CRDs in chart/hoard/crds");
    cluster.apply_crds(&crds).await;
    let ns = cluster.namespace("e2e-crds").await;

    let configs = dynamic(&cluster, &ns, "BackupConfiguration", "backupconfigurations");
    let good = json!({
        "apiVersion": "hoard.dev/v1alpha1", "kind": "BackupConfiguration",
        "metadata": {"name": "good"},
        "spec": {
            "target": {"kind": "StatefulSet", "name": "db"},
            "backends": [{"name": "main", "storageRef": {"name": "s3"}}],
            "sessions": [{"name": "nightly", "scheduler": {"schedule": "0 2 * * *"},
                          "repositories": [{"name": "db-repo", "backend": "main", "encryptionSecret": {"name": "pw"}}]}]
        }
    });
    let created = configs.create(&PostParams::default(), &serde_json::from_value(good.clone()).unwrap()).await.unwrap();
    // Defaults come from the schema.
    assert_eq!(created.data["spec"]["paused"], json!(false));
    assert_eq!(created.data["spec"]["sessions"][0]["retryConfig"]["maxRetry"], json!(2));

    let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        v["metadata"]["name"] = json!("bad");
        f(&mut v);
        v
    };
    let bad_cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("unknown target kind", mutate(&|v| v["spec"]["target"]["kind"] = json!("CronJob")), "Unsupported value"),
        ("bad cron", mutate(&|v| v["spec"]["sessions"][0]["scheduler"]["schedule"] = json!("daily")), "should match"),
        (
            "duplicate backend",
            mutate(&|v| {
                let dup = v["spec"]["backends"][0].clone();
                v["spec"]["backends"].as_array_mut().unwrap().push(dup);
            }),
            "Duplicate value",
        ),
        (
            "repository names an unknown backend",
            mutate(&|v| v["spec"]["sessions"][0]["repositories"][0]["backend"] = json!("nope")),
            "must name one of spec.backends",
        ),
        (
            "directory escapes",
            mutate(&|v| v["spec"]["sessions"][0]["repositories"][0]["directory"] = json!("../other")),
            "should match",
        ),
        (
            "directory in the reserved hoard-meta/",
            mutate(&|v| v["spec"]["sessions"][0]["repositories"][0]["directory"] = json!("hoard-meta/x")),
            "hoard-meta/ is reserved",
        ),
        ("no sessions", mutate(&|v| v["spec"]["sessions"] = json!([])), "should have at least 1 items"),
        ("bad timeout", mutate(&|v| v["spec"]["sessions"][0]["backupTimeout"] = json!("1 day")), "should match"),
    ];
    for (what, body, expect) in bad_cases {
        let err = configs.create(&PostParams::default(), &serde_json::from_value(body).unwrap()).await.err();
        let msg = format!("{err:?}");
        assert!(err.is_some() && msg.contains(expect), "{what}: expected rejection containing {expect:?}, got {msg}");
    }

    let storages = dynamic(&cluster, &ns, "BackupStorage", "backupstorages");
    let storage = |provider: &str, block: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "BackupStorage", "metadata": {"name": format!("st-{provider}")},
            "spec": {"storage": {"provider": provider, "s3": block}}
        }))
        .unwrap()
    };
    storages.create(&PostParams::default(), &storage("s3", json!({"bucket": "backups"}))).await.unwrap();
    let mismatch = storages.create(&PostParams::default(), &storage("gcs", json!({"bucket": "backups"}))).await;
    assert!(format!("{mismatch:?}").contains("must be set exactly when provider is"), "{mismatch:?}");
    let bad_bucket = storages.create(&PostParams::default(), &storage("s3", json!({"bucket": "Not_A_Bucket"}))).await;
    assert!(bad_bucket.is_err(), "uppercase bucket names are refused");

    let retention = dynamic(&cluster, &ns, "RetentionPolicy", "retentionpolicies");
    let rp = |period: &str| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "RetentionPolicy", "metadata": {"name": format!("rp-{}", period.len())},
            "spec": {"maxRetentionPeriod": period, "successfulSnapshots": {"last": 5}}
        }))
        .unwrap()
    };
    retention.create(&PostParams::default(), &rp("30d12h")).await.unwrap();
    assert!(retention.create(&PostParams::default(), &rp("30 days")).await.is_err());

    // A session's spec cannot be edited after creation.
    let sessions = dynamic(&cluster, &ns, "BackupSession", "backupsessions");
    let s: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "hoard.dev/v1alpha1", "kind": "BackupSession", "metadata": {"name": "once"},
        "spec": {"invoker": {"name": "good"}, "session": "nightly"}
    }))
    .unwrap();
    let mut created = sessions.create(&PostParams::default(), &s).await.unwrap();
    assert_eq!(created.data["spec"]["invoker"]["kind"], json!("BackupConfiguration"));
    created.data["spec"]["session"] = json!("other");
    let edit = sessions.replace("once", &PostParams::default(), &created).await;
    assert!(format!("{edit:?}").contains("immutable"), "{edit:?}");

    // Claim overrides belong to VolumeSnapshot restores, and are shaped like a claim's.
    let restores = dynamic(&cluster, &ns, "RestoreSession", "restoresessions");
    let restore = |name: &str, data_source: serde_json::Value, claim: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession", "metadata": {"name": name},
            "spec": {"target": {"kind": "PersistentVolumeClaim", "name": "copy"}, "dataSource": data_source,
                     "claim": claim}
        }))
        .unwrap()
    };
    let from_vs = json!({"volumeSnapshot": "vs-1"});
    let ok = restore("vs-ok", from_vs.clone(), json!({"size": "20Gi", "accessModes": ["ReadWriteOncePod"]}));
    restores.create(&PostParams::default(), &ok).await.unwrap();
    let from_repo = restore("repo", json!({"repository": "r"}), json!({"size": "20Gi"}));
    let refused = restores.create(&PostParams::default(), &from_repo).await;
    assert!(format!("{refused:?}").contains("needs dataSource.volumeSnapshot"), "{refused:?}");
    for (name, claim) in [("bad-size", json!({"size": "20 GB"})), ("bad-mode", json!({"accessModes": ["Everyone"]}))] {
        let refused = restores.create(&PostParams::default(), &restore(name, from_vs.clone(), claim)).await;
        assert!(refused.is_err(), "{name} accepted");
    }
}

/// The whole flow: instant backup → Succeeded Snapshot with one component per volume; restore
/// on the other node brings back identical bytes; a paused configuration does not run; a
/// scheduled session fires at its time. The controller holds only the chart's permissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_across_two_nodes() {
    let test_started = chrono::Utc::now();
    let Some(cluster) = TestCluster::connect().await else { return };
    let Some(s3) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    let audit_log = hoard_testkit::require_service("HOARD_TEST_KUBE_DIR")
        .map(|d| std::path::PathBuf::from(d).join("logs/audit.log"));
    let client = cluster.client.clone();
    cluster.apply_crds(&chart_crds()).await;
    let tmp = tempfile::tempdir().unwrap();
    let system_ns = cluster.namespace("e2e-hoard").await;
    let app_ns = cluster.namespace("e2e-app").await;
    let suffix = app_ns.rsplit('-').next().unwrap().to_string();

    // Two nodes, each with its kubelet directory and its agent.
    let node_a = FakeNode::register(&client, &format!("e2e-a-{suffix}"), tmp.path().join("node-a/pods")).await;
    let node_b = FakeNode::register(&client, &format!("e2e-b-{suffix}"), tmp.path().join("node-b/pods")).await;
    let pki = hoard_testkit::make_cluster_pki(&tmp.path().join("pki"), &[&node_a.name, &node_b.name]);
    let (_agent_a, port_a) = start_agent(&node_a.name, &node_a.kubelet_root, &pki, &tmp.path().join("work"));
    let (_agent_b, port_b) = start_agent(&node_b.name, &node_b.kubelet_root, &pki, &tmp.path().join("work"));
    for (node, port) in [(&node_a.name, port_a), (&node_b.name, port_b)] {
        run_pod(
            &client,
            &system_ns,
            json!({
                "metadata": {"name": format!("hoard-agent-{node}"), "labels": {"app.kubernetes.io/name": "hoard-agent"}},
                "spec": {"nodeName": node, "automountServiceAccountToken": false,
                         "containers": [{"name": "agent", "image": "hoard-agent:e2e",
                                         "ports": [{"name": "grpc", "containerPort": port}]}]}
            }),
        )
        .await;
    }

    // The application: a pod on node A with two CSI volumes full of data.
    let pv_data = bound_claim(&client, &app_ns, "data", CSI_DRIVER).await;
    let pv_logs = bound_claim(&client, &app_ns, "logs", CSI_DRIVER).await;
    let app = run_pod(
        &client,
        &app_ns,
        json!({
            "metadata": {"name": "app", "labels": {"app": "demo"}},
            "spec": {"nodeName": node_a.name, "containers": [{"name": "app", "image": "busybox"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                                 {"name": "logs", "persistentVolumeClaim": {"claimName": "logs"}}]}
        }),
    )
    .await;
    let app_uid = app.metadata.uid.clone().unwrap();
    let data_dir = node_a.csi_mount(&app_uid, &pv_data, CSI_DRIVER);
    let logs_dir = node_a.csi_mount(&app_uid, &pv_logs, CSI_DRIVER);
    std::fs::create_dir_all(data_dir.join("db/base")).unwrap();
    for i in 0..20u64 {
        std::fs::write(
            data_dir.join(format!("db/base/{i}.dat")),
            hoard_testkit::random_bytes(64 * 1024 + i as usize, i),
        )
        .unwrap();
    }
    std::fs::write(data_dir.join("PG_VERSION"), b"17\n").unwrap();
    std::fs::write(logs_dir.join("app.log"), hoard_testkit::text_bytes(300_000, 7)).unwrap();

    // Storage, credentials, retention, and the configurations.
    secret(&client, &app_ns, "s3-creds", &[("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")])
        .await;
    secret(&client, &app_ns, "repo-pass", &[("RESTIC_PASSWORD", "e2e-correct-horse")]).await;
    let create = |kind: &str, plural: &str, body: serde_json::Value| {
        let api = dynamic(&cluster, &app_ns, kind, plural);
        let mut body = body;
        body["apiVersion"] = json!("hoard.dev/v1alpha1");
        body["kind"] = json!(kind);
        async move { api.create(&PostParams::default(), &serde_json::from_value(body).unwrap()).await.unwrap() }
    };
    create(
        "BackupStorage",
        "backupstorages",
        json!({"metadata": {"name": "s3"}, "spec": {"storage": {"provider": "s3", "s3": {
            "endpoint": s3, "bucket": "hoard-test", "prefix": format!("e2e-{suffix}"), "region": "us-east-1",
            "secretName": "s3-creds"}}}}),
    )
    .await;
    create(
        "RetentionPolicy",
        "retentionpolicies",
        json!({"metadata": {"name": "keep-3"}, "spec": {"successfulSnapshots": {"last": 3}}}),
    )
    .await;
    let session = |name: &str, schedule: &str, repo: &str| {
        json!({"name": name, "scheduler": {"schedule": schedule},
               "repositories": [{"name": repo, "backend": "main", "encryptionSecret": {"name": "repo-pass"}}]})
    };
    create(
        "BackupConfiguration",
        "backupconfigurations",
        json!({"metadata": {"name": "app"}, "spec": {
            "target": {"kind": "Pod", "name": "app"},
            "backends": [{"name": "main", "storageRef": {"name": "s3"}, "retentionPolicy": {"name": "keep-3"}}],
            "sessions": [session("manual", "0 0 1 1 *", "app-repo"), session("minutely", "* * * * *", "app-minutely")]}}),
    )
    .await;
    create(
        "BackupConfiguration",
        "backupconfigurations",
        json!({"metadata": {"name": "paused"}, "spec": {
            "target": {"kind": "Pod", "name": "app"}, "paused": true,
            "backends": [{"name": "main", "storageRef": {"name": "s3"}}],
            "sessions": [session("minutely", "* * * * *", "paused-repo")]}}),
    )
    .await;

    // The controller, as its ServiceAccount with exactly the chart's permissions.
    let allow = allowlist();
    let kubeconfig = service_account_kubeconfig(
        &cluster,
        &system_ns,
        "hoard-controller",
        &allow,
        &tmp.path().join("controller.kubeconfig"),
    )
    .await;
    let controller = start_controller(&kubeconfig, &system_ns, &pki, &tmp.path().join("work"), free_port());

    // Instant backup.
    let sessions_api = Api::<BackupSession>::namespaced(client.clone(), &app_ns);
    let now: BackupSession = serde_json::from_value(json!({
        "apiVersion": "hoard.dev/v1alpha1", "kind": "BackupSession", "metadata": {"name": "app-now"},
        "spec": {"invoker": {"name": "app"}, "session": "manual"}
    }))
    .unwrap();
    sessions_api.create(&PostParams::default(), &now).await.unwrap();
    let done = wait_for(&sessions_api, "app-now", Duration::from_secs(180), |s| {
        s.status.as_ref().and_then(|st| st.phase).is_some_and(SessionPhase::is_finished)
    })
    .await;
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, Some(SessionPhase::Succeeded), "{status:#?}\ncontroller log:\n{}", controller.log_text());
    assert_eq!(status.snapshots.len(), 1, "one Snapshot per repository: {status:#?}");
    let snap_name = status.snapshots[0].name.clone();
    let snapshots = Api::<Snapshot>::namespaced(client.clone(), &app_ns);
    let snap = snapshots.get(&snap_name).await.unwrap();
    let snap_status = snap.status.clone().unwrap();
    assert_eq!(snap_status.phase, Some(SnapshotPhase::Succeeded), "{snap_status:#?}");
    assert_eq!(snap_status.components.len(), 2, "one component per volume: {snap_status:#?}");
    for (name, c) in &snap_status.components {
        assert_eq!(c.phase, Some(ComponentPhase::Succeeded), "{name}: {c:#?}");
        assert_eq!(c.node.as_deref(), Some(node_a.name.as_str()), "{name} ran on the node of its volume");
        assert!(c.snapshot_id.as_ref().is_some_and(|id| id.len() >= 8), "{name} has a repository snapshot id");
    }
    let data_component = snap_status
        .components
        .iter()
        .find(|(_, c)| c.volume.as_deref() == Some("data"))
        .map(|(n, _)| n.clone())
        .unwrap();

    // Outside the cluster, the `hoard` CLI reads the same repository and restores the data
    // volume's snapshot byte-identical.
    let repo = Api::<hoard_api::crd::Repository>::namespaced(client.clone(), &app_ns).get("app-repo").await.unwrap();
    let location = format!("s3://hoard-test/e2e-{suffix}/{}", repo.spec.path);
    let data_snapshot_id = snap_status.components[&data_component].snapshot_id.clone().unwrap();
    let cli_target = tmp.path().join("cli-restore");
    let out = std::process::Command::new(bin("hoard"))
        .args(["-r", &location, "restore", &data_snapshot_id, "--target"])
        .arg(&cli_target)
        .env("HOARD_PASSWORD", "e2e-correct-horse")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_ENDPOINT_URL", &s3)
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    assert!(out.status.success(), "hoard restore: {}", String::from_utf8_lossy(&out.stderr));
    let restored_components: Vec<_> = std::fs::read_dir(&cli_target).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(restored_components.len(), 1, "one component in the data volume's snapshot");
    assert!(
        tree_contents(&restored_components[0]) == tree_contents(&data_dir),
        "hoard restore of {data_snapshot_id} differs from the volume"
    );

    // Restore the data volume into a fresh claim mounted by a pod on node B.
    let pv_copy = bound_claim(&client, &app_ns, "data-copy", CSI_DRIVER).await;
    let restored = run_pod(
        &client,
        &app_ns,
        json!({
            "metadata": {"name": "restored"},
            "spec": {"nodeName": node_b.name, "containers": [{"name": "app", "image": "busybox"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data-copy"}}]}
        }),
    )
    .await;
    let copy_dir = node_b.csi_mount(restored.metadata.uid.as_ref().unwrap(), &pv_copy, CSI_DRIVER);
    let restores = Api::<RestoreSession>::namespaced(client.clone(), &app_ns);
    let rs: RestoreSession = serde_json::from_value(json!({
        "apiVersion": "hoard.dev/v1alpha1", "kind": "RestoreSession", "metadata": {"name": "to-b"},
        "spec": {"target": {"kind": "Pod", "name": "restored"},
                 "dataSource": {"repository": "app-repo", "snapshot": "latest", "components": [data_component],
                                "volumeMap": {data_component.clone(): "data"}}}
    }))
    .unwrap();
    restores.create(&PostParams::default(), &rs).await.unwrap();
    let rs_done = wait_for(&restores, "to-b", Duration::from_secs(180), |r| {
        r.status.as_ref().and_then(|s| s.phase).is_some_and(RestorePhase::is_finished)
    })
    .await;
    let rs_status = rs_done.status.unwrap();
    assert_eq!(rs_status.phase, Some(RestorePhase::Succeeded), "{rs_status:#?}\n{}", controller.log_text());
    assert_eq!(rs_status.snapshot.as_deref(), Some(snap_name.as_str()), "latest resolved to the one snapshot");
    let (source, copy) = (tree_contents(&data_dir), tree_contents(&copy_dir));
    assert_eq!(source.len(), 21);
    assert!(source == copy, "restored files differ from the source volume");

    // A paused configuration: a manual session is Skipped and nothing is scheduled.
    let skipped: BackupSession = serde_json::from_value(json!({
        "apiVersion": "hoard.dev/v1alpha1", "kind": "BackupSession", "metadata": {"name": "paused-now"},
        "spec": {"invoker": {"name": "paused"}, "session": "minutely"}
    }))
    .unwrap();
    sessions_api.create(&PostParams::default(), &skipped).await.unwrap();
    let s = wait_for(&sessions_api, "paused-now", Duration::from_secs(60), |s| {
        s.status.as_ref().and_then(|st| st.phase).is_some_and(SessionPhase::is_finished)
    })
    .await;
    assert_eq!(s.status.unwrap().phase, Some(SessionPhase::Skipped));

    // The minutely session fires at its time (within ~60 s) and succeeds.
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    let scheduled = loop {
        let list = sessions_api.list(&ListParams::default()).await.unwrap();
        let fired: Vec<_> = list
            .items
            .into_iter()
            .filter(|s| s.spec.trigger == Trigger::Scheduled && s.spec.invoker.name == "app")
            .collect();
        if let Some(done) =
            fired.iter().find(|s| s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Succeeded))
        {
            break done.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled session succeeded: {fired:#?}\n{}",
            controller.log_text()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let at = scheduled.spec.scheduled_time.clone().expect("scheduled sessions record their time");
    assert!(at.ends_with(":00Z"), "fired on a minute boundary: {at}");
    // At its time: after the test began (no backfill of older minutes) and created within
    // seconds of the minute it is for (not late).
    let at = chrono::DateTime::parse_from_rfc3339(&at).expect("scheduledTime is RFC 3339").to_utc();
    let created = serde_json::to_value(&scheduled.metadata.creation_timestamp).unwrap();
    let created = chrono::DateTime::parse_from_rfc3339(created.as_str().expect("creationTimestamp is set"))
        .expect("creationTimestamp is RFC 3339")
        .to_utc();
    assert!(
        at + chrono::Duration::seconds(60) > test_started,
        "scheduled for {at}, before the test began at {test_started}"
    );
    let lag = created - at;
    assert!(
        lag >= chrono::Duration::seconds(-1) && lag <= chrono::Duration::seconds(20),
        "the session for {at} was created at {created} ({lag} late)"
    );
    let paused_runs = sessions_api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.spec.invoker.name == "paused" && s.spec.trigger == Trigger::Scheduled)
        .count();
    assert_eq!(paused_runs, 0, "a paused configuration is not scheduled");
    let config = Api::<BackupConfiguration>::namespaced(client.clone(), &app_ns).get("app").await.unwrap();
    let next = config.status.unwrap().sessions.into_iter().find(|s| s.name == "minutely").and_then(|s| s.next_schedule);
    assert!(next.is_some(), "status shows the next run");

    // Metrics: after backups and restores, both agents and the controller expose every metric
    // their docs list.
    let agent_metrics = documented_metrics("docs/agent.md", "hoard_agent_");
    for agent in [&_agent_a, &_agent_b] {
        let scraped = scrape(agent.metrics.as_deref().expect("the agent printed its metrics address"));
        let missing = missing_metrics(&agent_metrics, &scraped);
        assert!(missing.is_empty(), "docs/agent.md lists metrics the agent does not expose: {missing:?}");
    }
    let controller_metrics = documented_metrics("docs/controller.md", "hoard_controller_");
    let scraped = scrape(controller.metrics.as_deref().unwrap());
    let missing = missing_metrics(&controller_metrics, &scraped);
    assert!(missing.is_empty(), "docs/controller.md lists metrics the controller does not expose: {missing:?}");
    assert!(scraped.contains("hoard_controller_backup_sessions_total{phase=\"Succeeded\"}"), "{scraped}");

    // RBAC: nothing the controller asked for was refused; permissions it never used are reported.
    if let Some(audit_log) = audit_log {
        let user = format!("system:serviceaccount:{system_ns}:hoard-controller");
        let requests = audited_requests(&audit_log, &user);
        assert!(!requests.is_empty(), "the audit log shows the controller's requests");
        let refused: Vec<_> = requests.iter().filter(|r| !r.3).collect();
        assert!(refused.is_empty(), "the chart's RBAC refused the controller: {refused:?}");
        let mut unused = Vec::new();
        for rule in allow.cluster_rules.iter().chain(&allow.namespace_rules) {
            for group in &rule.api_groups {
                for resource in &rule.resources {
                    for verb in &rule.verbs {
                        let used = requests.iter().any(|(v, g, r, _)| v == verb && g == group && r == resource);
                        if !used {
                            let group = if group.is_empty() { String::new() } else { format!("{group}/") };
                            unused.push(format!("{verb} {group}{resource}"));
                        }
                    }
                }
            }
        }
        // A permission this scenario does not use must be listed, with the path that needs it, in
        // tests/rbac-unused.txt: a grant nobody can justify fails the test.
        eprintln!("RBAC permissions granted but not used in this run ({}): {}", unused.len(), unused.join(", "));
        let justified = justified_unused_permissions();
        let unjustified: Vec<_> = unused.iter().filter(|p| !justified.contains(p.as_str())).collect();
        assert!(
            unjustified.is_empty(),
            "the chart grants permissions the controller did not use and tests/rbac-unused.txt does not justify: \
             {unjustified:?} (used this run: {:?})",
            requests.iter().map(|(v, g, r, _)| format!("{v} {g}/{r}")).collect::<std::collections::BTreeSet<_>>()
        );
    }
}

/// Every YAML example in docs/concepts.md is accepted by the API server as written (only the
/// namespace is swapped for a fresh one), and `kubectl get hoard` lists the hoard objects.
#[tokio::test]
async fn concepts_doc_examples_are_accepted() {
    let Some(cluster) = TestCluster::connect().await else { return };
    cluster.apply_crds(&chart_crds()).await;
    let ns = cluster.namespace("e2e-docs").await;
    let doc =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/concepts.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), l) => {
                block.push_str(l);
                block.push('\n');
            }
            _ => {}
        }
    }
    assert!(blocks.len() >= 5, "found {} yaml blocks", blocks.len());
    let mut created = 0;
    for block in &blocks {
        for document in serde_yaml::Deserializer::from_str(block) {
            let mut obj: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
            obj["metadata"]["namespace"] = json!(ns);
            let api_version = obj["apiVersion"].as_str().unwrap().to_string();
            let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
            let gvk = kube::api::GroupVersionKind::gvk(group, version, obj["kind"].as_str().unwrap());
            let (ar, _) = kube::discovery::pinned_kind(&cluster.client, &gvk).await.unwrap();
            let api: Api<DynamicObject> = Api::namespaced_with(cluster.client.clone(), &ns, &ar);
            let name = obj["metadata"]["name"].clone();
            api.create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
                .await
                .unwrap_or_else(|e| panic!("docs/concepts.md example {name} refused: {e}"));
            created += 1;
        }
    }
    assert_eq!(created, 10, "objects in the examples");
    // Discovery may lag the CRDs applied just before (the `hoard` category): retry, bounded.
    let kube_cache = tempfile::tempdir().unwrap();
    let mut listed = String::new();
    for _ in 0..15 {
        let kubectl = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .arg("--cache-dir")
            .arg(kube_cache.path())
            .args(["get", "hoard", "-n", &ns, "-o", "name"])
            .output()
            .expect("kubectl runs");
        listed = String::from_utf8_lossy(&kubectl.stdout).into_owned();
        if kubectl.status.success() && listed.contains("restoresession.hoard.dev/") {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for expected in [
        "backupstorage.hoard.dev/s3",
        "retentionpolicy.hoard.dev/keep-a-month",
        "backupconfiguration.hoard.dev/postgres",
        "backupsession.hoard.dev/postgres-before-upgrade",
        "restoresession.hoard.dev/postgres-restore",
    ] {
        assert!(listed.contains(expected), "`kubectl get hoard` lacks {expected}: {listed}");
    }
}

/// The permissions `tests/rbac-unused.txt` justifies (`verb group/resource`, `#` starts a comment).
fn justified_unused_permissions() -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/rbac-unused.txt");
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}
