//! End-to-end: the `hoard` binary against filesystem and S3 repositories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use hoard_testkit::{compare, make_fidelity_fixture, manifest, random_bytes, text_bytes};

#[test]
fn fidelity_round_trip_preserves_every_kind_of_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    let info = make_fidelity_fixture(&src);
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let summary = h.backup_json(&[src.to_str().unwrap(), "--tag", "fidelity"], 0);
    assert_eq!(summary["summary"]["warnings"], 0, "{summary}");
    let target = tmp.path().join("restore");
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let before = manifest(&src);
    let after = manifest(&target.join("data"));
    let diffs = compare(&before, &after);
    assert!(diffs.is_empty(), "restore differs:\n{}", diffs.join("\n"));
    // The fixture really exercised what it claims.
    assert!(info.deep_path_len > 4096);
    assert!(before.values().any(|e| e.kind == "socket") && before.values().any(|e| e.kind == "fifo"));
    if rustix::process::geteuid().is_root() {
        assert!(info.ownership && info.devices, "{info:?}");
    }
    assert!(info.xattrs, "xattrs unsupported on the test filesystem");
    // The sparse file stayed sparse.
    let sparse = &after[&b"sparse.img".to_vec()];
    assert!(sparse.blocks * 512 < 1024 * 1024, "sparse file allocated {} blocks", sparse.blocks);
}

#[test]
fn unchanged_rebackup_reads_nothing_and_uploads_under_one_percent() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("d/f{i}")), random_bytes(200_000, i)).unwrap();
    }
    std::fs::write(src.join("big"), random_bytes(20 << 20, 99)).unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let first = h.backup_json(&[src.to_str().unwrap()], 0);
    let total = first["summary"]["total_bytes"].as_u64().unwrap();
    assert!(first["summary"]["bytes_stored"].as_u64().unwrap() > total / 2);
    let second = h.backup_json(&[src.to_str().unwrap()], 0);
    assert_eq!(second["summary"]["bytes_read"], 0, "{second}");
    assert_eq!(second["summary"]["files_unmodified"], 51);
    let stored = second["summary"]["bytes_stored"].as_u64().unwrap();
    assert!(stored * 100 < total, "re-backup stored {stored} of {total}");
}

#[test]
fn insertion_in_a_large_file_reuploads_only_a_few_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = random_bytes(48 << 20, 7);
    std::fs::write(src.join("db"), &data).unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap()], 0);
    data.splice(24 << 20..24 << 20, b"a few inserted bytes".iter().copied());
    std::fs::write(src.join("db"), &data).unwrap();
    let s = h.backup_json(&[src.to_str().unwrap()], 0);
    let new = s["summary"]["bytes_new"].as_u64().unwrap();
    assert!(new < 6 << 20, "inserting 20 bytes re-stored {new} bytes");
    let target = tmp.path().join("r");
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(std::fs::read(target.join("data/db")).unwrap(), data);
}

#[test]
fn stdin_stream_round_trips_through_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let payload = text_bytes(5 << 20, 11);
    let mut child = h
        .cmd(&["--json", "backup", "--stdin", "--stdin-name", "app.sql"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&payload).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let dumped = h.ok(&["dump", "latest", "app.sql"]);
    assert_eq!(dumped.stdout, payload);
    let ls = stdout(&h.ok(&["ls", "latest"]));
    assert!(ls.contains("/app.sql/app.sql"), "{ls}");
}

#[test]
fn listing_diff_include_exclude_and_snapshot_selection() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("app");
    std::fs::create_dir_all(src.join("logs")).unwrap();
    std::fs::create_dir_all(src.join("conf")).unwrap();
    std::fs::write(src.join("logs/a.log"), "log").unwrap();
    std::fs::write(src.join("conf/app.yaml"), "x: 1").unwrap();
    std::fs::write(src.join("cache.tmp"), "tmp").unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let first = h.backup_json(&[src.to_str().unwrap(), "--exclude", "*.tmp", "--tag", "one"], 0);
    let first_id = first["snapshot_id"].as_str().unwrap().to_string();
    let ls = stdout(&h.ok(&["ls", &first_id[..8]]));
    assert!(ls.contains("/app/conf/app.yaml") && !ls.contains("cache.tmp"), "{ls}");
    std::fs::write(src.join("conf/app.yaml"), "x: 2").unwrap();
    std::fs::write(src.join("conf/new.yaml"), "y").unwrap();
    std::fs::remove_file(src.join("logs/a.log")).unwrap();
    h.backup_json(&[src.to_str().unwrap(), "--exclude", "*.tmp", "--tag", "two"], 0);
    let d = stdout(&h.ok(&["diff", &first_id[..8], "latest"]));
    assert!(d.contains("M    /app/conf/app.yaml"), "{d}");
    assert!(d.contains("+    /app/conf/new.yaml"), "{d}");
    assert!(d.contains("-    /app/logs/a.log"), "{d}");
    // Snapshot listing as JSON, filtered by tag.
    let snaps: serde_json::Value =
        serde_json::from_slice(&h.ok(&["--json", "snapshots", "--tag", "one"]).stdout).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    // Include only conf, from the first snapshot, by sub-path.
    let t = tmp.path().join("t");
    h.ok(&["restore", &format!("{}:/app/conf", &first_id[..8]), "--target", t.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(t.join("app.yaml")).unwrap(), "x: 1");
    let t2 = tmp.path().join("t2");
    h.ok(&["restore", "latest", "--target", t2.to_str().unwrap(), "--include", "app/conf/new.yaml"]);
    assert!(t2.join("app/conf/new.yaml").exists());
    assert!(!t2.join("app/conf/app.yaml").exists() && !t2.join("app/logs").exists());
    // An ambiguous or unknown snapshot is a clear error.
    let out = h.expect(&["ls", "zzzz"], 1);
    assert!(stderr(&out).contains("no snapshot matches"), "{}", stderr(&out));
    // Stats run.
    let stats: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "stats", "latest"]).stdout).unwrap();
    assert_eq!(stats["snapshots"], 2);
    assert_eq!(stats["snapshot"]["files"], 2);
}

#[test]
fn unreadable_and_vanishing_files_are_warnings_with_exit_code_3() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok.txt"), "fine").unwrap();
    std::fs::write(src.join("locked.txt"), "no access").unwrap();
    std::fs::set_permissions(src.join("locked.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let repo = tmp.path().join("repo");
    let h = Hoard::new(repo.to_str().unwrap());
    h.init();
    // Run as an unprivileged user when we are root, so the mode really denies access.
    let is_root = rustix::process::geteuid().is_root();
    let out = if is_root {
        for p in [tmp.path(), &src, &repo] {
            std::process::Command::new("chmod").args(["-R", "a+rwX"]).arg(p).status().unwrap();
        }
        std::fs::set_permissions(src.join("locked.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_hoard"),
            "--repo",
            repo.to_str().unwrap(),
            "--json",
            "backup",
            src.to_str().unwrap(),
        ]);
        c.env("HOARD_PASSWORD", PASSWORD);
        c.output().unwrap()
    } else {
        h.run(&["--json", "backup", src.to_str().unwrap()])
    };
    assert_eq!(out.status.code(), Some(3), "{}\n{}", stdout(&out), stderr(&out));
    let s = last_json(&out, "summary");
    assert_eq!(s["summary"]["warnings"], 1);
    assert!(s["warnings"][0].as_str().unwrap().contains("locked.txt"), "{s}");
    // The snapshot is valid and has the readable file.
    let ls = stdout(&h.ok(&["ls", "latest"]));
    assert!(ls.contains("/data/ok.txt") && !ls.contains("locked.txt"), "{ls}");
}

#[test]
fn a_missing_source_among_several_is_a_warning_and_all_missing_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f.txt"), "kept").unwrap();
    let gone = tmp.path().join("gone");
    let (src_s, gone_s) = (src.to_str().unwrap(), gone.to_str().unwrap());
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();

    let s = h.backup_json(&[src_s, gone_s], 3);
    assert_eq!(s["summary"]["warnings"], 1, "{s}");
    let w = s["warnings"][0].as_str().unwrap();
    assert!(w.contains(gone_s) && w.contains("does not exist"), "{s}");
    let snaps: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    let snap = &snaps[0];
    assert_eq!(snap["components"].as_array().unwrap().len(), 1, "{snap}");
    assert_eq!(snap["components"][0]["name"], "data");
    assert!(snap["warnings"][0].as_str().unwrap().contains(gone_s), "{snap}");
    assert!(stdout(&h.ok(&["ls", "latest"])).contains("/data/f.txt"));

    // Without --json the warning is printed.
    let out = h.expect(&["backup", gone_s, src_s], 3);
    assert!(stderr(&out).contains(&format!("warning: backup source {gone_s} does not exist")), "{}", stderr(&out));

    // Nothing to back up: a failure, and no snapshot.
    let out = h.expect(&["backup", gone_s, tmp.path().join("gone2").to_str().unwrap()], 1);
    assert!(stderr(&out).contains(gone_s), "{}", stderr(&out));
    let snaps: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 2);
}

#[test]
fn restore_never_writes_through_a_planted_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("a/passwd"), "restored content").unwrap();
    std::fs::write(src.join("file"), "plain").unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap()], 0);
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim"), "untouched").unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir_all(target.join("data")).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("data/a")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), target.join("data/file")).unwrap();
    // By default the planted entries are kept (and reported); replacing them writes through none.
    let out = h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(stdout(&out).contains("2 existing entries were left as they were"), "{}", stdout(&out));
    assert!(std::fs::symlink_metadata(target.join("data/file")).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "untouched");
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap(), "--overwrite", "always"]);
    assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "untouched");
    assert!(!outside.join("passwd").exists());
    assert!(std::fs::symlink_metadata(target.join("data/a")).unwrap().is_dir());
    assert_eq!(std::fs::read_to_string(target.join("data/a/passwd")).unwrap(), "restored content");
    assert_eq!(std::fs::read_to_string(target.join("data/file")).unwrap(), "plain");
}

/// The same round trip on an object store: init (twice: the second is refused), backup, an
/// incremental backup that reads nothing, restore compared by manifest, check --read-data, and a
/// wrong password refused.
fn object_store_round_trip(h: &Hoard) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    make_fidelity_fixture(&src);
    h.init();
    let out = h.expect(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf"], 1);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    h.backup_json(&[src.to_str().unwrap()], 0);
    let second = h.backup_json(&[src.to_str().unwrap()], 0);
    assert_eq!(second["summary"]["bytes_read"], 0);
    let target = tmp.path().join("restore");
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let diffs = compare(&manifest(&src), &manifest(&target.join("data")));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    h.ok(&["check", "--read-data"]);
    let mut bad = Hoard::new(h.repo.clone());
    bad.envs = h.envs.clone();
    bad.password = "wrong".into();
    bad.expect(&["snapshots"], 12);
}

/// Against a real S3-compatible server on loopback (moto, started by `hack/s3-up.sh`;
/// `HOARD_TEST_S3_ENDPOINT` names it and the bucket `hoard-test` exists).
#[test]
fn s3_round_trip() {
    let cache = tempfile::tempdir().unwrap();
    let Some(h) = moto_repo("rt", cache.path()) else { return };
    object_store_round_trip(&h);
}

/// A repository in the test bucket of the moto server, whose cache is `cache`; `None` (a skip,
/// or a failure in CI) without the server.
fn moto_repo(name: &str, cache: &std::path::Path) -> Option<Hoard> {
    let endpoint = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT")?;
    let mut h = Hoard::new(format!("s3://hoard-test/{name}-{}", std::process::id()));
    h.envs = vec![
        ("HOARD_S3_ENDPOINT".into(), endpoint),
        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("HOARD_CACHE_DIR".into(), cache.to_str().unwrap().into()),
    ];
    Some(h)
}

/// The cache of a remote repository (moto S3): index files, snapshots and the tree blobs an
/// incremental backup reads are kept after the first read; a damaged copy is fetched again and
/// repaired; a snapshot forgotten by another host (here `--no-cache`) leaves the listing and the
/// cache; `--no-cache` writes no cache.
#[test]
fn s3_index_files_and_snapshots_are_kept_in_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let Some(h) = moto_repo("cache", &cache) else { return };
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), random_bytes(300_000, 1)).unwrap();
    h.init();
    let first = h.backup_json(&[src.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    std::fs::write(src.join("b"), random_bytes(300_000, 2)).unwrap();
    let second = h.backup_json(&[src.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();

    // The cache holds one directory per repository, with `index/` and `snapshots/` in it.
    let kept = |dir: &str| -> Vec<std::path::PathBuf> {
        list_files(&cache)
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.parent().and_then(|d| d.file_name()).is_some_and(|n| n == dir))
            .collect()
    };
    let snaps = kept("snapshots");
    let names: Vec<_> = snaps.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(names.contains(&first) && names.contains(&second) && names.len() == 2, "{names:?}");
    assert!(!kept("index").is_empty(), "no index file kept");
    assert!(kept("packs").is_empty(), "packs are not kept");
    // The second backup read the first one's tree blobs: kept as ranges of their pack, sealed.
    let ranges: Vec<_> =
        list_files(&cache).into_iter().filter(|(p, _)| p.components().any(|c| c.as_os_str() == "ranges")).collect();
    assert!(!ranges.is_empty(), "no tree blob kept");
    // Damaged: a backup on the first snapshot reads its root tree again, fetches the range
    // anew and repairs the copy.
    assert_eq!(ranges.len(), 1, "one tree read: the first snapshot's root");
    let (damaged, _) = &ranges[0];
    let good_range = std::fs::read(damaged).unwrap();
    std::fs::write(damaged, b"damaged").unwrap();
    let third = h.backup_json(&[src.to_str().unwrap(), "--parent", &first], 0);
    assert_eq!((&third["summary"]["files_unmodified"], &third["summary"]["files_new"]), (&1.into(), &1.into()));
    assert_eq!(third["summary"]["blobs_new"], 0, "{third}");
    assert_eq!(std::fs::read(damaged).unwrap(), good_range, "the range copy was not repaired");
    h.ok(&["--no-cache", "forget", third["snapshot_id"].as_str().unwrap()]);

    // A damaged copy: the listing is still right, and the copy is repaired.
    let copy = snaps.iter().find(|p| p.ends_with(&first)).unwrap();
    let good = std::fs::read(copy).unwrap();
    std::fs::write(copy, b"damaged").unwrap();
    let ids = || -> Vec<String> {
        let listed: serde_json::Value = serde_json::from_str(&stdout(&h.ok(&["--json", "snapshots"]))).unwrap();
        let mut ids: Vec<String> =
            listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
        ids.sort();
        ids
    };
    let mut both = vec![first.clone(), second.clone()];
    both.sort();
    assert_eq!(ids(), both);
    assert_eq!(std::fs::read(copy).unwrap(), good);

    // Forgotten elsewhere: gone from the listing and from the cache.
    h.ok(&["--no-cache", "forget", &first]);
    assert_eq!(ids(), std::slice::from_ref(&second));
    assert!(!copy.exists(), "the forgotten snapshot's copy stayed");

    let target = tmp.path().join("restore");
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(std::fs::read(target.join("data/b")).unwrap(), std::fs::read(src.join("b")).unwrap());
    h.ok(&["check"]);

    let mut uncached = Hoard::new(h.repo.clone());
    uncached.envs = h.envs.clone();
    let other = tmp.path().join("other-cache");
    uncached.envs.retain(|(k, _)| k != "HOARD_CACHE_DIR");
    uncached.envs.push(("HOARD_CACHE_DIR".into(), other.to_str().unwrap().into()));
    uncached.ok(&["--no-cache", "snapshots"]);
    assert!(!other.exists(), "--no-cache wrote a cache");
}

/// Against Azurite, the Azure Blob Storage emulator (started by `hack/azure-up.sh`;
/// `HOARD_TEST_AZURITE_URL` names it and the container `hoard-test` exists).
#[test]
fn azure_round_trip() {
    let Some(url) = hoard_testkit::require_service("HOARD_TEST_AZURITE_URL") else { return };
    let mut h = Hoard::new(format!("az://hoard-test/rt-{}", std::process::id()));
    h.envs = vec![("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()), ("AZURITE_BLOB_STORAGE_URL".into(), url)];
    let cache = tempfile::tempdir().unwrap();
    h.envs.push(("HOARD_CACHE_DIR".into(), cache.path().to_str().unwrap().into()));
    object_store_round_trip(&h);
}

/// Against fake-gcs-server, a Google Cloud Storage emulator (started by `hack/gcs-up.sh`;
/// `HOARD_TEST_GCS_KEY` is a service account key that names it, and the bucket `hoard-test`
/// exists). The key comes from the environment, as a user's would.
#[test]
fn gcs_round_trip() {
    let Some(key) = hoard_testkit::require_service("HOARD_TEST_GCS_KEY") else { return };
    let mut h = Hoard::new(format!("gs://hoard-test/rt-{}", std::process::id()));
    h.envs = vec![("GOOGLE_SERVICE_ACCOUNT_KEY".into(), key)];
    let cache = tempfile::tempdir().unwrap();
    h.envs.push(("HOARD_CACHE_DIR".into(), cache.path().to_str().unwrap().into()));
    object_store_round_trip(&h);
}

/// `--json` progress: status lines at least once a second while work is under way.
#[test]
fn json_progress_lines_while_backing_up() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let mut child = h
        .cmd(&["--json", "backup", "--stdin", "--stdin-name", "slow.bin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // A slow producer: 2.5 s of data in small pieces.
        for i in 0..25u64 {
            stdin.write_all(&random_bytes(100_000, i)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let status: Vec<&serde_json::Value> = lines.iter().filter(|v| v["message_type"] == "status").collect();
    assert!(status.len() >= 2, "expected status lines, got {lines:?}");
    assert!(status.iter().any(|s| s["bytes_done"].as_u64().unwrap() > 0));
    assert_eq!(lines.last().unwrap()["message_type"], "summary");
}

/// A file that keeps growing while it is read (a log written by a concurrent process): the
/// backup warns and exits 3. The writer appends every millisecond during the whole backup, so
/// the read of a 48 MiB file overlaps a write; bounded retries absorb a scheduler that starves
/// the writer for the whole read.
#[test]
fn file_changing_while_read_warns_with_exit_code_3() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("steady.txt"), "unchanging").unwrap();
    let log = src.join("growing.log");
    std::fs::write(&log, random_bytes(48 << 20, 5)).unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, log) = (std::sync::Arc::clone(&stop), log.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            // Bounded: at most 10 minutes of appends even if the test never stops it.
            for _ in 0..600_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                f.write_all(b"x").unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let mut outcome = None;
    for _attempt in 0..3 {
        let out = h.run(&["--json", "backup", src.to_str().unwrap()]);
        if out.status.code() == Some(3) {
            outcome = Some(out);
            break;
        }
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let out = outcome.expect("no backup saw the file change in 3 attempts");
    let s = last_json(&out, "summary");
    assert_eq!(s["summary"]["warnings"], 1, "{s}");
    let w = s["warnings"][0].as_str().unwrap();
    assert!(w.contains("growing.log") && w.contains("changed while being read"), "{w}");
    // The snapshot is complete: both files are in it.
    let ls = stdout(&h.ok(&["ls", "latest"]));
    assert!(ls.contains("/data/growing.log") && ls.contains("/data/steady.txt"), "{ls}");
}

/// `--exclude-file`: patterns one per line, comments and blank lines ignored, name patterns at
/// any depth, path patterns below the component root; a missing exclude file is an error.
#[test]
fn exclude_file_patterns_are_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("app");
    for d in ["logs", "build/out", "build/keep", "conf"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("logs/a.log"), "log").unwrap();
    std::fs::write(src.join("conf/deep.log"), "log").unwrap();
    std::fs::write(src.join("conf/app.yaml"), "x: 1").unwrap();
    std::fs::write(src.join("build/out/bin"), "binary").unwrap();
    std::fs::write(src.join("build/keep/readme"), "keep").unwrap();
    std::fs::write(src.join("# not a comment"), "a file").unwrap();
    let excludes = tmp.path().join("excludes.txt");
    std::fs::write(&excludes, "# build outputs\n*.log\n\n  build/out  \n").unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap(), "--exclude-file", excludes.to_str().unwrap()], 0);
    let ls = stdout(&h.ok(&["ls", "latest"]));
    assert!(!ls.contains(".log"), "{ls}");
    assert!(!ls.contains("/app/build/out"), "{ls}");
    for kept in ["/app/conf/app.yaml", "/app/build/keep/readme", "/app/logs", "/app/# not a comment"] {
        assert!(ls.lines().any(|l| l == kept), "{kept} missing:\n{ls}");
    }
    let out = h.expect(&["backup", src.to_str().unwrap(), "--exclude-file", "/nonexistent/excludes"], 1);
    assert!(stderr(&out).contains("read exclude file /nonexistent/excludes"), "{}", stderr(&out));
}

/// `backup --include` (repeatable): only what the patterns match is stored, with the
/// directories leading to it (a matching directory whole); `--exclude` still wins; a bad
/// pattern is refused.
#[test]
fn backup_include_keeps_only_matching_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("app");
    for d in ["conf/sub", "data/db", "logs"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    for f in ["conf/app.yaml", "conf/app.ini", "conf/sub/deep.yaml", "data/db/rows", "data/db/rows.tmp", "logs/a.log"] {
        std::fs::write(src.join(f), f).unwrap();
    }
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let args = [src.to_str().unwrap(), "--include", "conf/*.yaml", "-i", "/data/db", "--exclude", "*.tmp"];
    h.backup_json(&args, 0);
    let ls = stdout(&h.ok(&["ls", "latest"]));
    let listed: Vec<&str> = ls.lines().filter(|l| l.starts_with('/')).collect();
    assert_eq!(listed, ["/app/conf", "/app/conf/app.yaml", "/app/data", "/app/data/db", "/app/data/db/rows"], "{ls}");
    let out = h.expect(&["backup", src.to_str().unwrap(), "--include", "a/[b"], 1);
    assert!(stderr(&out).contains("include pattern"), "{}", stderr(&out));
}

/// `restore --exclude`: name patterns at any depth and path patterns (with the component) skip
/// what they match; everything else is restored.
#[test]
fn restore_exclude_skips_matching_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("app");
    std::fs::create_dir_all(src.join("logs")).unwrap();
    std::fs::create_dir_all(src.join("conf/sub")).unwrap();
    std::fs::write(src.join("logs/a.log"), "log").unwrap();
    std::fs::write(src.join("conf/app.yaml"), "x: 1").unwrap();
    std::fs::write(src.join("conf/sub/more.yaml"), "y: 2").unwrap();
    std::fs::write(src.join("conf/app.ini"), "z=3").unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap()], 0);
    let t = tmp.path().join("t");
    h.ok(&["restore", "latest", "--target", t.to_str().unwrap(), "--exclude", "*.yaml", "--exclude", "app/logs"]);
    assert_eq!(std::fs::read_to_string(t.join("app/conf/app.ini")).unwrap(), "z=3");
    assert!(t.join("app/conf/sub").is_dir());
    assert!(!t.join("app/conf/app.yaml").exists() && !t.join("app/conf/sub/more.yaml").exists());
    assert!(!t.join("app/logs").exists());
}

/// `--label KEY=VALUE` ends up in the snapshot; a label without `=` is refused before anything
/// is written.
#[test]
fn labels_given_on_the_command_line_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    let repo = tmp.path().join("repo");
    let h = Hoard::new(repo.to_str().unwrap());
    h.init();
    h.backup_json(
        &[src.to_str().unwrap(), "--label", "namespace=shop", "--label", "pvc=data=1", "--label", "empty="],
        0,
    );
    let snaps: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    let labels = &snaps[0]["labels"];
    assert_eq!(labels, &serde_json::json!({"namespace": "shop", "pvc": "data=1", "empty": ""}), "{snaps}");
    let before = list_files(&repo);
    let out = h.expect(&["backup", src.to_str().unwrap(), "--label", "no-equals-sign"], 1);
    assert!(stderr(&out).contains("not KEY=VALUE"), "{}", stderr(&out));
    let after: Vec<_> = list_files(&repo).into_iter().filter(|(p, _)| !p.starts_with(repo.join("locks"))).collect();
    let before: Vec<_> = before.into_iter().filter(|(p, _)| !p.starts_with(repo.join("locks"))).collect();
    assert_eq!(before, after, "a refused backup wrote to the repository");
}

/// A tmpfs mounted inside the source tree, unmounted (lazily) on drop.
struct TmpfsMount(std::path::PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &std::path::Path) -> Option<TmpfsMount> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "hoard-test"])
        .arg(at)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| TmpfsMount(at.to_path_buf()))
}

/// `--one-file-system`: a directory on another filesystem is recorded, empty, and nothing below
/// it is read; without the flag its content is backed up.
#[test]
fn one_file_system_does_not_cross_mount_points() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(src.join("mnt")).unwrap();
    std::fs::write(src.join("local.txt"), "here").unwrap();
    let Some(_mount) = mount_tmpfs(&src.join("mnt")) else {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("--one-file-system test needs a second filesystem: run as root with permission to mount tmpfs");
        }
        eprintln!("SKIP: cannot mount a tmpfs (needs root); --one-file-system not tested");
        return;
    };
    std::fs::write(src.join("mnt/other-fs.txt"), "elsewhere").unwrap();
    assert_ne!(std::fs::metadata(&src).unwrap().dev(), std::fs::metadata(src.join("mnt")).unwrap().dev());
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let s = h.backup_json(&[src.to_str().unwrap(), "--one-file-system", "--tag", "x"], 0);
    assert_eq!(s["summary"]["files_new"], 1, "{s}");
    let ls = stdout(&h.ok(&["ls", "latest", "--tag", "x"]));
    assert!(ls.lines().any(|l| l == "/data/mnt"), "the mount point itself is recorded:\n{ls}");
    assert!(ls.contains("/data/local.txt") && !ls.contains("other-fs.txt"), "{ls}");
    h.backup_json(&[src.to_str().unwrap(), "--tag", "all"], 0);
    let ls = stdout(&h.ok(&["ls", "latest", "--tag", "all"]));
    assert!(ls.contains("/data/mnt/other-fs.txt"), "{ls}");
}

/// An explicit `--password-file` wins over `HOARD_PASSWORD`, as in restic.
#[test]
fn password_file_wins_over_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\nsecond line ignored\n")).unwrap();
    let mut env_wrong = Hoard::new(h.repo.clone());
    env_wrong.password = "not the password".into();
    env_wrong.ok(&["--password-file", pw.to_str().unwrap(), "snapshots"]);
    env_wrong.expect(&["snapshots"], 12);
    // And a wrong file is not rescued by a right variable.
    let bad = tmp.path().join("bad");
    std::fs::write(&bad, "wrong\n").unwrap();
    h.expect(&["--password-file", bad.to_str().unwrap(), "snapshots"], 12);
}

/// The S3 region reaches the request: a stub S3 endpoint on loopback records the credential
/// scope of each signed request (`Credential=KEY/DATE/REGION/s3/aws4_request`) and answers 404.
#[test]
fn s3_region_flag_and_variables_reach_the_signed_request() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    /// Answers every request with 404 until `stop` (at most 30 s); returns the request heads.
    fn serve_404(listener: std::net::TcpListener, stop: &AtomicBool) -> Vec<String> {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut heads = Vec::new();
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && heads.len() < 50 {
            let mut conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            // Bounded: a request head of at most 64 KiB.
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = "<Error><Code>NoSuchKey</Code><Message>none</Message></Error>";
            let _ = write!(
                conn,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            heads.push(String::from_utf8_lossy(&head).into_owned());
        }
        heads
    }

    fn region_seen(extra_args: &[&str], envs: &[(&str, &str)]) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let server = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || serve_404(listener, &stop))
        };
        let mut h = Hoard::new("s3://bucket/prefix");
        h.envs = vec![
            ("HOARD_S3_ENDPOINT".into(), format!("http://127.0.0.1:{port}")),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ];
        let mut args = extra_args.to_vec();
        args.push("snapshots");
        let mut c = h.cmd(&args);
        c.env_remove("AWS_REGION").env_remove("AWS_DEFAULT_REGION").env_remove("HOARD_S3_REGION");
        c.env_remove("AWS_ENDPOINT_URL").env_remove("AWS_ENDPOINT").env_remove("AWS_SESSION_TOKEN");
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        stop.store(true, Ordering::Relaxed);
        let heads = server.join().unwrap();
        assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
        let auth = heads
            .iter()
            .flat_map(|h| h.lines())
            .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .unwrap_or_else(|| panic!("no signed request among {heads:?}"))
            .to_string();
        let scope = auth.split("Credential=").nth(1).unwrap_or_default();
        scope.split('/').nth(2).unwrap_or_default().to_string()
    }
    assert_eq!(region_seen(&["--s3-region", "eu-west-3"], &[("AWS_REGION", "ap-south-1")]), "eu-west-3");
    assert_eq!(region_seen(&[], &[("HOARD_S3_REGION", "eu-north-1"), ("AWS_REGION", "ap-south-1")]), "eu-north-1");
    assert_eq!(region_seen(&[], &[("AWS_REGION", "ap-south-1")]), "ap-south-1");
    assert_eq!(region_seen(&[], &[]), "us-east-1");
}

/// A re-backup whose walking threads cannot start (an address-space limit of 2 GiB refuses
/// sixteen 256 MiB stacks) says so, walks depth-first on one thread, and stores the same tree.
#[test]
fn a_rebackup_whose_walking_threads_cannot_start_walks_on_one() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    for d in ["a/b", "a/c", "d"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
        for i in 0..3 {
            std::fs::write(src.join(d).join(format!("f{i}")), random_bytes(3000, i)).unwrap();
        }
    }
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap()], 0);
    std::fs::write(src.join("a/c/f1"), b"changed").unwrap();

    let mut limited = std::process::Command::new("sh");
    limited
        .arg("-c")
        .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_hoard"))
        .args(["--repo", &h.repo, "--json", "backup", src.to_str().unwrap()])
        .env("HOARD_PASSWORD", &h.password)
        .env("HOARD_LOG", "warn")
        .stdin(std::process::Stdio::null());
    let out = limited.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("walking threads"), "{}", stderr(&out));
    let limited = last_json(&out, "summary");
    assert_eq!(
        (limited["summary"]["files_changed"].as_u64(), limited["summary"]["files_unmodified"].as_u64()),
        (Some(1), Some(8))
    );

    // Unlimited, with nothing changed since: the same root tree, so the same snapshot content.
    h.backup_json(&[src.to_str().unwrap()], 0);
    let snaps: serde_json::Value = serde_json::from_str(&stdout(&h.ok(&["snapshots", "--json"]))).unwrap();
    let roots: Vec<&serde_json::Value> =
        snaps.as_array().unwrap().iter().map(|s| &s["components"][0]["root"]).collect();
    assert_eq!(roots.len(), 3);
    assert_eq!(roots[1], roots[2], "{snaps}");
    assert_ne!(roots[0], roots[1]);
}

/// Each `--overwrite` policy against an existing target: `never` (the default) keeps what is
/// there, `if-newer` replaces only older entries, `if-changed` only entries whose kind, size or
/// time differ (so it finishes an interrupted restore without rewriting what is complete), and
/// `always` replaces everything.
#[test]
fn restore_overwrite_policies_decide_per_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    for name in ["old", "new", "same"] {
        std::fs::write(src.join(name), format!("snapshot {name}")).unwrap();
    }
    let touch = |p: &std::path::Path, when: &str| {
        assert!(std::process::Command::new("touch").args(["-m", "-d", when]).arg(p).status().unwrap().success());
    };
    for name in ["old", "new", "same"] {
        touch(&src.join(name), "2020-06-01 12:00:00");
    }
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap()], 0);
    let target = tmp.path().join("target");
    let restore = |policy: Option<&str>| {
        let t = target.join("data");
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(&t).unwrap();
        // Older and newer than the snapshot's entries, and one that is the same.
        std::fs::write(t.join("old"), "existing, older").unwrap();
        touch(&t.join("old"), "2019-01-01 00:00:00");
        std::fs::write(t.join("new"), "existing, newer").unwrap();
        touch(&t.join("new"), "2021-01-01 00:00:00");
        std::fs::write(t.join("same"), "snapshot same").unwrap();
        touch(&t.join("same"), "2020-06-01 12:00:00");
        let mut args = vec!["restore", "latest", "--target", target.to_str().unwrap()];
        if let Some(p) = policy {
            args.extend(["--overwrite", p]);
        }
        let out = h.ok(&args);
        let read = |n: &str| std::fs::read_to_string(t.join(n)).unwrap();
        (read("old"), read("new"), stdout(&out))
    };
    let (old, new, out) = restore(None);
    assert_eq!((old.as_str(), new.as_str()), ("existing, older", "existing, newer"));
    assert!(out.contains("kept existing /data/old") && out.contains("3 existing entries were left"), "{out}");
    assert_eq!(restore(Some("never")).0, "existing, older");
    let (old, new, out) = restore(Some("if-newer"));
    assert_eq!((old.as_str(), new.as_str()), ("snapshot old", "existing, newer"));
    assert!(out.contains("2 existing entries were left"), "{out}");
    let (old, new, out) = restore(Some("if-changed"));
    assert_eq!((old.as_str(), new.as_str()), ("snapshot old", "snapshot new"));
    assert!(out.contains("kept existing /data/same") && out.contains("1 existing entry was left"), "{out}");
    let (old, new, out) = restore(Some("always"));
    assert_eq!((old.as_str(), new.as_str()), ("snapshot old", "snapshot new"));
    assert!(!out.contains("left as"), "{out}");
    let out = h.run(&["restore", "latest", "--target", target.to_str().unwrap(), "--overwrite", "sometimes"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// `--dry-run` lists what a restore would create, replace, keep and delete and writes nothing;
/// `--delete` then removes what the snapshot lacks, except excluded paths, and is refused with
/// include patterns.
#[test]
fn restore_dry_run_and_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    std::fs::write(src.join("kept"), "snapshot kept").unwrap();
    std::fs::write(src.join("dir/new"), "snapshot new").unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap()], 0);
    let target = tmp.path().join("target");
    let t = target.join("data");
    std::fs::create_dir_all(t.join("extra-dir/deep")).unwrap();
    std::fs::write(t.join("kept"), "existing").unwrap();
    std::fs::write(t.join("extra"), "not in the snapshot").unwrap();
    std::fs::write(t.join("extra-dir/deep/file"), "nor this").unwrap();
    std::fs::write(t.join("notes.log"), "excluded").unwrap();
    let before = list_files(&target);
    let tgt = target.to_str().unwrap();

    let out = h.ok(&["restore", "latest", "--target", tgt, "--dry-run", "--delete", "--exclude", "*.log"]);
    let text = stdout(&out);
    for line in [
        "would keep existing /data/kept",
        "would create /data/dir",
        "would create /data/dir/new",
        "would delete /data/extra",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing in:\n{text}");
    }
    assert!(text.contains("would delete /data/extra-dir") && !text.contains("notes.log"), "{text}");
    assert!(text.contains("would create 2, replace 0, keep 1 existing and delete 2"), "{text}");
    let out = h.ok(&["restore", "latest", "--target", tgt, "-n", "--overwrite", "always"]);
    assert!(stdout(&out).contains("would replace /data/kept"), "{}", stdout(&out));
    // Nothing was written by either dry run, not even into a target that does not exist.
    assert_eq!(list_files(&target), before);
    let absent = tmp.path().join("absent");
    let out = h.ok(&["restore", "latest", "--target", absent.to_str().unwrap(), "--dry-run"]);
    assert!(stdout(&out).contains("would create /data/kept"), "{}", stdout(&out));
    assert!(!absent.exists());

    let out = h.ok(&["restore", "latest", "--target", tgt, "--delete", "--exclude", "*.log"]);
    assert!(stdout(&out).contains("deleted 2 entries the snapshot does not have"), "{}", stdout(&out));
    assert!(!t.join("extra").exists() && !t.join("extra-dir").exists());
    assert_eq!(std::fs::read_to_string(t.join("notes.log")).unwrap(), "excluded");
    assert_eq!(std::fs::read_to_string(t.join("kept")).unwrap(), "existing");
    assert_eq!(std::fs::read_to_string(t.join("dir/new")).unwrap(), "snapshot new");
    let out = h.run(&["restore", "latest", "--target", tgt, "--delete", "--include", "kept"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("refused with include patterns"), "{}", stderr(&out));
}

/// The directory a component was read from gets its mode and times back on the directory it is
/// restored into (the snapshot records it beside the component).
#[test]
fn a_components_root_directory_gets_its_metadata_back() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
    assert!(
        std::process::Command::new("touch")
            .args(["-m", "-d", "2020-01-01 00:00:00"])
            .arg(&src)
            .status()
            .unwrap()
            .success()
    );
    let want = std::fs::metadata(&src).unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap()], 0);
    let target = tmp.path().join("target");
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let got = std::fs::metadata(target.join("data")).unwrap();
    assert_eq!(got.permissions().mode() & 0o7777, 0o750);
    assert_eq!((got.mtime(), got.mtime_nsec()), (want.mtime(), want.mtime_nsec()));
    // The same for a restore of the component by path.
    let by_path = tmp.path().join("by-path");
    h.ok(&["restore", "latest:/data", "--target", by_path.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&by_path).unwrap().mtime(), want.mtime());
}
