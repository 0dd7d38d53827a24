//! Bad input: wrong passwords, missing repositories, unknown versions and damaged objects give
//! clear errors and distinct exit codes, never panics, and never lose intact data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use hoard_testkit::random_bytes;

fn setup(tmp: &Path) -> (Hoard, std::path::PathBuf) {
    let src = tmp.join("data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("file{i}")), random_bytes(3 << 20, i)).unwrap();
    }
    let h = Hoard::new(tmp.join("repo").to_str().unwrap());
    h.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf", "--pack-size-mib", "4"]);
    h.backup_json(&[src.to_str().unwrap()], 0);
    (h, src)
}

fn no_panic(out: &std::process::Output) {
    let e = stderr(out);
    assert!(!e.contains("panicked"), "panic: {e}");
}

#[test]
fn wrong_password_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (h, src) = setup(tmp.path());
    let before = list_files(&tmp.path().join("repo"));
    let mut bad = Hoard::new(h.repo.clone());
    bad.password = "not the password".into();
    let out = bad.expect(&["backup", src.to_str().unwrap()], 12);
    assert!(stderr(&out).contains("wrong password"), "{}", stderr(&out));
    bad.expect(&["snapshots"], 12);
    assert_eq!(before, list_files(&tmp.path().join("repo")));
}

#[test]
fn missing_repository_and_unknown_version() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("nothing-here").to_str().unwrap());
    let out = h.expect(&["snapshots"], 10);
    assert!(stderr(&out).contains("no repository"), "{}", stderr(&out));
    let (h, _) = setup(tmp.path());
    let cfg = tmp.path().join("repo/config");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"version\": 1", "\"version\": 7");
    std::fs::write(&cfg, text).unwrap();
    let out = h.expect(&["snapshots"], 13);
    assert!(stderr(&out).contains("version 7"), "{}", stderr(&out));
}

#[test]
fn damaged_pack_fails_only_the_affected_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (h, src) = setup(tmp.path());
    // Find the pack that holds the most data and flip a byte in its middle.
    let mut packs: Vec<_> = list_files(&tmp.path().join("repo/packs"));
    packs.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let (victim, len) = packs[0].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[(len / 3) as usize] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();
    let target = tmp.path().join("restore");
    let out = h.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let failed: Vec<String> = err.lines().filter(|l| l.starts_with("error: ")).map(str::to_string).collect();
    assert!(!failed.is_empty() && failed.len() < 6, "{err}");
    // Every file not reported restored byte-identical.
    let mut intact = 0;
    for i in 0..6 {
        let name = format!("file{i}");
        if failed.iter().any(|l| l.contains(&name)) {
            continue;
        }
        assert_eq!(
            std::fs::read(target.join("data").join(&name)).unwrap(),
            std::fs::read(src.join(&name)).unwrap(),
            "{name}"
        );
        intact += 1;
    }
    assert!(intact >= 1);
}

#[test]
fn truncated_and_wrong_type_objects_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let (h, _) = setup(tmp.path());
    let repo = tmp.path().join("repo");
    // A snapshot file planted under index/ with a name matching its bytes: wrong type.
    let snap = files_under(&repo, "snapshots")[0].clone();
    let bytes = std::fs::read(&snap).unwrap();
    let name = blake3::hash(&bytes).to_hex().to_string();
    std::fs::write(repo.join("index").join(&name), &bytes).unwrap();
    // Skipped with a warning naming it: it blocks nothing else.
    let out = h.run(&["ls", "latest"]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("skipping damaged index/{name}")), "{}", stderr(&out));
    std::fs::remove_file(repo.join("index").join(&name)).unwrap();
    // Truncate the real index.
    let idx = files_under(&repo, "index")[0].clone();
    let bytes = std::fs::read(&idx).unwrap();
    std::fs::write(&idx, &bytes[..bytes.len() / 2]).unwrap();
    let out = h.run(&["ls", "latest"]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(14), "{}", stderr(&out));
    std::fs::write(&idx, &bytes).unwrap();
    // A snapshot with a flipped byte.
    let mut b = std::fs::read(&snap).unwrap();
    b[40] ^= 1;
    std::fs::write(&snap, &b).unwrap();
    // Listing skips it with a warning; naming it is the damage error.
    let out = h.run(&["snapshots"]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("skipping damaged snapshots/"), "{}", stderr(&out));
    let snap_id = snap.file_name().unwrap().to_string_lossy().into_owned();
    let out = h.run(&["ls", &snap_id[..8]]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(14), "{}", stderr(&out));
    // A key slot with garbage: the remaining key... there is only one, so the password fails.
    let key = files_under(&repo, "keys")[0].clone();
    std::fs::write(&key, b"{not json").unwrap();
    let out = h.run(&["snapshots"]);
    no_panic(&out);
    assert_ne!(out.status.code(), Some(0));
}

/// Seals `snap` as a snapshot of `repo` without the encoder's checks (as anyone holding the key
/// could) and stores it; returns its id in hex.
fn plant_snapshot(repo: &str, snap: &hoard_core::snapshot::Snapshot) -> String {
    use hoard_core::crypto::SealType;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = hoard_core::store::open_store(repo, &hoard_core::store::StoreOptions::default()).unwrap();
        let r = hoard_core::Repository::open(store, &hoard_core::Password::new(PASSWORD)).await.unwrap();
        let sealed = r.keys().seal_meta(SealType::Snapshot, &serde_json::to_vec(snap).unwrap()).unwrap();
        r.save_file("snapshots", sealed).await.unwrap().to_hex()
    })
}

fn load_only_snapshot(repo: &str) -> hoard_core::snapshot::Snapshot {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = hoard_core::store::open_store(repo, &hoard_core::store::StoreOptions::default()).unwrap();
        let r = hoard_core::Repository::open(store, &hoard_core::Password::new(PASSWORD)).await.unwrap();
        let mut all = r.list_snapshots().await.unwrap();
        assert_eq!(all.len(), 1);
        all.pop().unwrap().1
    })
}

/// A snapshot whose component names would escape the restore target (`..`, `../x`, an absolute
/// path, `a/b`, a duplicate) is refused as damaged (exit 14) and nothing is written outside the
/// target; a symlink planted where a component's directory goes is replaced, not followed.
#[test]
fn hostile_component_names_never_escape_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("payload"), "owned").unwrap();
    let repo = tmp.path().join("repo");
    let h = Hoard::new(repo.to_str().unwrap());
    h.init();
    h.backup_json(&[src.to_str().unwrap()], 0);
    let good = load_only_snapshot(&h.repo);
    let good_file = files_under(&repo, "snapshots");
    // Everything lives below `outer`; only `outer/target` may ever be written.
    let outer = tmp.path().join("outer");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let abs = format!("{}/escaped", outside.display());
    let cases: Vec<Vec<String>> = vec![
        vec!["..".into()],
        vec!["../escaped".into()],
        vec![abs.clone()],
        vec!["a/b".into()],
        vec![".".into()],
        vec!["data".into(), "data".into()],
    ];
    for names in cases {
        let mut s = good.clone();
        s.components = names
            .iter()
            .map(|n| hoard_core::snapshot::Component { name: n.clone(), ..good.components[0].clone() })
            .collect();
        let id = plant_snapshot(&h.repo, &s);
        let target = outer.join("target");
        let out = h.run(&["restore", &id, "--target", target.to_str().unwrap()]);
        no_panic(&out);
        assert_eq!(out.status.code(), Some(14), "{names:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("component name"), "{names:?}: {}", stderr(&out));
        let written: Vec<_> = list_files(tmp.path()).into_iter().filter(|(p, _)| !p.starts_with(&repo)).collect();
        assert!(
            written.iter().all(|(p, _)| p.starts_with(&src)),
            "{names:?}: files written outside the source and repository: {written:?}"
        );
        std::fs::remove_file(repo.join("snapshots").join(&id)).unwrap();
    }
    assert_eq!(files_under(&repo, "snapshots"), good_file);
    // A planted symlink at the component's own directory is replaced by a directory.
    let target = outer.join("target");
    std::fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&outside, target.join("data")).unwrap();
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "restore followed the planted symlink");
    assert!(std::fs::symlink_metadata(target.join("data")).unwrap().is_dir());
    assert_eq!(std::fs::read_to_string(target.join("data/payload")).unwrap(), "owned");
}

/// A repository on a full disk (a 12 MiB tmpfs): the backup that does not fit stops with exit
/// code 15 and says so, without retrying and without a panic; it leaves no staging file, and
/// the snapshot already there stays intact. Once there is room again (the tmpfs grown, files
/// untouched), `check --read-data` is clean and the same backup completes.
#[test]
fn full_repository_disk_is_a_distinct_error_and_loses_nothing() {
    use hoard_testkit::kubelet::{mount_or_skip, mount_tmpfs_sized, resize_tmpfs};
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let Some(_mount) = mount_or_skip(mount_tmpfs_sized(&repo, 12 << 20)) else { return };
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    for i in 0..2u64 {
        std::fs::write(small.join(format!("s{i}")), random_bytes(1 << 20, 100 + i)).unwrap();
    }
    let big = tmp.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..6u64 {
        std::fs::write(big.join(format!("b{i}")), random_bytes(4 << 20, 200 + i)).unwrap();
    }
    let h = Hoard::new(repo.to_str().unwrap());
    h.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf", "--pack-size-mib", "4"]);
    h.backup_json(&[small.to_str().unwrap()], 0);

    let started = std::time::Instant::now();
    let out = h.run(&["backup", big.to_str().unwrap()]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(15), "{}", stderr(&out));
    // Said once: the cause is not repeated by the error chain.
    assert_eq!(stderr(&out).matches("No space left on device").count(), 1, "{}", stderr(&out));
    // Permanent: no retry back-off (the retry policy would wait seconds).
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
    let staging: Vec<_> = list_files(&repo).into_iter().filter(|(p, _)| p.to_string_lossy().contains('#')).collect();
    assert!(staging.is_empty(), "staging files left on the full disk: {staging:?}");

    resize_tmpfs(&repo, 64 << 20).unwrap();
    let snaps = stdout(&h.ok(&["--json", "snapshots"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&snaps).unwrap().as_array().map(Vec::len), Some(1), "{snaps}");
    h.ok(&["check", "--read-data"]);
    let target = tmp.path().join("restore");
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    for i in 0..2 {
        let name = format!("s{i}");
        assert_eq!(std::fs::read(target.join("small").join(&name)).unwrap(), std::fs::read(small.join(&name)).unwrap());
    }
    h.backup_json(&[big.to_str().unwrap()], 0);
    h.ok(&["check", "--read-data"]);
}

/// A restore target on a full disk (a 6 MiB tmpfs for 24 MiB of files): exit code 15, the
/// message names the full target instead of suggesting repository damage, and the repository
/// is untouched and still checks clean.
#[test]
fn full_restore_target_is_a_distinct_error() {
    use hoard_testkit::kubelet::{mount_or_skip, mount_tmpfs_sized};
    let tmp = tempfile::tempdir().unwrap();
    let (h, _src) = setup(tmp.path());
    let target = tmp.path().join("target");
    let Some(_mount) = mount_or_skip(mount_tmpfs_sized(&target, 6 << 20)) else { return };
    let before = list_files(&tmp.path().join("repo"));
    let out = h.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(15), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("no space left in"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("hoard check"), "{}", stdout(&out));
    // Only the files restored count: at most the 6 MiB that fit.
    let summary = last_json(&h.run(&["--json", "restore", "latest", "--target", target.to_str().unwrap()]), "summary");
    let restored = summary["outcome"]["bytes"].as_u64().unwrap();
    assert!(restored <= 6 << 20, "{restored} bytes reported restored into a 6 MiB target");
    let json = h.run(&["--json", "restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(json.status.code(), Some(15));
    assert_eq!(last_json(&json, "summary")["outcome"]["target_full"], serde_json::json!(true));
    let after: Vec<_> = list_files(&tmp.path().join("repo"))
        .into_iter()
        .filter(|(p, _)| !p.starts_with(tmp.path().join("repo/locks")))
        .collect();
    let before: Vec<_> = before.into_iter().filter(|(p, _)| !p.starts_with(tmp.path().join("repo/locks"))).collect();
    assert_eq!(before, after, "a failed restore changed the repository");
    h.ok(&["check", "--read-data"]);
}
