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
    flip_a_byte_in_the_largest_pack(&tmp.path().join("repo"));
    let target = tmp.path().join("restore");
    let out = h.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let failed: Vec<String> = err.lines().filter(|l| l.starts_with("error: ")).map(str::to_string).collect();
    assert!(!failed.is_empty() && failed.len() < 6, "{err}");
    // The advice fits the cause: the repository could not provide the data.
    let text = stdout(&out);
    assert!(text.contains("could not be read from the repository") && text.contains("check --read-data"), "{text}");
    assert!(!text.contains("could not be written"), "{text}");
    // Every file not reported restored byte-identical.
    let mut intact = 0;
    for i in 0..6 {
        let name = format!("file{i}");
        if failed.iter().any(|l| l.contains(&name)) {
            // Not left zero-filled under its real name, as if restored.
            assert!(!target.join("data").join(&name).exists(), "{name} failed but is there");
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

/// The repository's objects, reached the way hoard reaches them (a local directory or the moto
/// S3 server), so a test can damage them by hand.
struct Objects {
    store: std::sync::Arc<dyn hoard_core::store::Store>,
    rt: tokio::runtime::Runtime,
}

impl Objects {
    fn of(h: &Hoard) -> Objects {
        let env = |k: &str| h.envs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let credentials = env("HOARD_S3_ENDPOINT").map(|endpoint| hoard_core::store::Credentials::S3 {
            endpoint: Some(endpoint),
            region: Some("us-east-1".into()),
            access_key_id: env("AWS_ACCESS_KEY_ID"),
            secret_access_key: env("AWS_SECRET_ACCESS_KEY"),
            session_token: None,
        });
        let opts = hoard_core::store::StoreOptions { credentials, ..Default::default() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Objects { store: hoard_core::store::open_store(&h.repo, &opts).unwrap(), rt }
    }

    /// `(key, size)` under `prefix`, largest first.
    fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut all: Vec<_> =
            self.rt.block_on(self.store.list(prefix)).unwrap().into_iter().map(|o| (o.key, o.size)).collect();
        all.sort_by_key(|(k, n)| (std::cmp::Reverse(*n), k.clone()));
        all
    }

    fn get(&self, key: &str) -> Vec<u8> {
        self.rt.block_on(self.store.get(key)).unwrap().to_vec()
    }

    /// Replaces an object (a local store never overwrites one, so it is deleted first).
    fn put(&self, key: &str, bytes: Vec<u8>) {
        self.delete(key);
        self.rt.block_on(self.store.put(key, bytes.into())).unwrap();
    }

    fn delete(&self, key: &str) {
        self.rt.block_on(self.store.delete(key)).unwrap();
    }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    BitFlip,
    TruncatedPack,
    MissingPack,
    DamagedIndex,
}

impl Damage {
    /// Damages the repository; returns the command `check` must advise first.
    fn apply(self, o: &Objects) -> &'static str {
        let (pack, len) = o.list("packs/")[0].clone();
        match self {
            Damage::BitFlip => {
                let mut b = o.get(&pack);
                b[(len / 3) as usize] ^= 0x55;
                o.put(&pack, b);
                "hoard repair packs"
            }
            Damage::TruncatedPack => {
                let b = o.get(&pack);
                o.put(&pack, b[..b.len() / 2].to_vec());
                "hoard repair packs"
            }
            Damage::MissingPack => {
                o.delete(&pack);
                "hoard repair packs"
            }
            Damage::DamagedIndex => {
                let (index, len) = o.list("index/")[0].clone();
                let mut b = o.get(&index);
                b[(len / 2) as usize] ^= 0x01;
                o.put(&index, b);
                "hoard repair index"
            }
        }
    }
}

/// Restores `spec` and requires every file of `src` back, byte for byte.
fn restores_identical(h: &Hoard, spec: &str, src: &Path, target: &Path) {
    h.ok(&["restore", spec, "--target", target.to_str().unwrap()]);
    for i in 0..6 {
        let name = format!("file{i}");
        assert!(
            std::fs::read(target.join("data").join(&name)).unwrap() == std::fs::read(src.join(&name)).unwrap(),
            "{spec}: {name} differs"
        );
    }
}

/// Damage, check, heal as `check` advises, back up again, `check --read-data` clean, restore
/// identical — the newest snapshot and the one taken before the damage.
fn heal(damage: Damage, h: &Hoard, tmp: &Path) {
    let src = tmp.join("data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("file{i}")), random_bytes(3 << 20, i)).unwrap();
    }
    h.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf", "--pack-size-mib", "4"]);
    let first = h.backup_json(&[src.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    let objects = Objects::of(h);
    let advised = damage.apply(&objects);

    let out = h.expect(&["check", "--read-data"], 1);
    let err = stderr(&out);
    let suggestion = err.lines().find(|l| l.starts_with("suggestion: ")).unwrap_or_else(|| panic!("{damage:?}: {err}"));
    assert!(suggestion.starts_with(&format!("suggestion: 1. `{advised}`")), "{damage:?}: {suggestion}");
    let verb: Vec<&str> = advised.split(' ').skip(1).collect();
    let out = h.ok(&verb);
    no_panic(&out);
    h.backup_json(&[src.to_str().unwrap()], 0);
    let out = h.expect(&["check", "--read-data"], 0);
    assert!(stdout(&out).contains("no errors were found"), "{damage:?}: {}", stdout(&out));
    restores_identical(h, "latest", &src, &tmp.join("latest"));
    restores_identical(h, &first[..8], &src, &tmp.join("first"));
}

fn local_heal(damage: Damage) {
    let tmp = tempfile::tempdir().unwrap();
    heal(damage, &Hoard::new(tmp.path().join("repo").to_str().unwrap()), tmp.path());
}

/// A repository in the test bucket of the moto S3 server (`HOARD_TEST_S3_ENDPOINT`, bucket
/// `hoard-test`); a skip without it, a failure in CI.
fn s3_heal(damage: Damage) {
    let Some(endpoint) = hoard_testkit::require_service("HOARD_TEST_S3_ENDPOINT") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let name = tmp.path().file_name().unwrap().to_string_lossy().into_owned();
    let mut h = Hoard::new(format!("s3://hoard-test/heal-{name}"));
    h.envs = vec![
        ("HOARD_S3_ENDPOINT".into(), endpoint),
        ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("HOARD_CACHE_DIR".into(), tmp.path().join("cache").to_str().unwrap().into()),
    ];
    heal(damage, &h, tmp.path());
}

#[test]
fn a_flipped_bit_in_a_pack_is_healed_local() {
    local_heal(Damage::BitFlip);
}

#[test]
fn a_flipped_bit_in_a_pack_is_healed_s3() {
    s3_heal(Damage::BitFlip);
}

#[test]
fn a_truncated_pack_is_healed_local() {
    local_heal(Damage::TruncatedPack);
}

#[test]
fn a_truncated_pack_is_healed_s3() {
    s3_heal(Damage::TruncatedPack);
}

#[test]
fn a_missing_pack_is_healed_local() {
    local_heal(Damage::MissingPack);
}

#[test]
fn a_missing_pack_is_healed_s3() {
    s3_heal(Damage::MissingPack);
}

#[test]
fn a_damaged_index_is_healed_local() {
    local_heal(Damage::DamagedIndex);
}

#[test]
fn a_damaged_index_is_healed_s3() {
    s3_heal(Damage::DamagedIndex);
}

/// Before any repair, a backup does not deduplicate against a pack it can see is truncated: it
/// stores those blobs again, so once `repair packs` drops the truncated pack (losing its blobs
/// that did not survive the cut) the new snapshot is still whole, with no backup in between.
#[test]
fn a_backup_never_reuses_blobs_of_a_truncated_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let (h, src) = setup(tmp.path());
    Damage::TruncatedPack.apply(&Objects::of(&h));
    let out = h.run(&["--json", "backup", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("shorter than the index says"), "{}", stderr(&out));
    let summary = last_json(&out, "summary");
    assert!(summary["summary"]["bytes_new"].as_u64().unwrap() > 1 << 20, "{summary}");
    let out = h.ok(&["repair", "packs"]);
    assert!(stdout(&out).contains("1 not intact"), "{}", stdout(&out));
    h.expect(&["check", "--read-data"], 0);
    restores_identical(&h, "latest", &src, &tmp.path().join("latest"));
}

/// When the source is gone, `repair snapshots` leaves the lost files out — marked, never
/// silently — and everything else stays restorable.
#[test]
fn repair_snapshots_leaves_out_what_is_lost_and_marks_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (h, src) = setup(tmp.path());
    Damage::BitFlip.apply(&Objects::of(&h));
    // One blob of the pack is hit; the pack's other blobs are salvaged into a new pack.
    let out = h.ok(&["repair", "packs"]);
    let text = stdout(&out);
    assert!(text.contains("1 not intact") && text.contains("1 lost"), "{text}");
    assert!(!text.contains("salvage 0 blobs") && !text.contains("wrote 0 packs"), "{text}");
    // The lost blob is no longer indexed: check names the files that reference it.
    let out = h.expect(&["check"], 1);
    let err = stderr(&out);
    assert!(err.contains("missing from the index") && err.contains("repair snapshots"), "{err}");
    let lost: Vec<String> =
        (0..6).map(|i| format!("file{i}")).filter(|f| err.lines().any(|l| l.trim() == format!("/data/{f}"))).collect();
    assert!(!lost.is_empty() && lost.len() < 6, "{err}");

    let dry = h.ok(&["repair", "snapshots", "--dry-run"]);
    assert!(stdout(&dry).contains("would be repaired"), "{}", stdout(&dry));
    let out = h.ok(&["repair", "snapshots", "--forget"]);
    for f in &lost {
        assert!(stdout(&out).contains(&format!("  /data/{f}")), "{f}: {}", stdout(&out));
    }
    h.expect(&["check", "--read-data"], 0);
    let snaps: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(snaps[0]["tags"].as_array().unwrap().iter().any(|t| t == "repaired"), "{:?}", snaps[0]);
    let target = tmp.path().join("restore");
    h.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    for i in 0..6 {
        let name = format!("file{i}");
        let restored = target.join("data").join(&name);
        if lost.contains(&name) {
            assert!(!restored.exists(), "{name} was lost and must not be restored");
        } else {
            assert_eq!(std::fs::read(&restored).unwrap(), std::fs::read(src.join(&name)).unwrap(), "{name}");
        }
    }
    // With nothing referencing lost data any more, prune works again.
    h.ok(&["prune"]);
    h.expect(&["check", "--read-data"], 0);
}

/// A file the target refuses (a directory is in its way) is not the repository's fault: the
/// advice names the target, not `check`.
#[test]
fn a_target_that_refuses_a_file_is_not_called_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let (h, _) = setup(tmp.path());
    let target = tmp.path().join("restore");
    std::fs::create_dir_all(target.join("data/file0/in-the-way")).unwrap();
    let out = h.expect(&["restore", "latest", "--target", target.to_str().unwrap(), "--overwrite", "always"], 1);
    let text = stdout(&out);
    assert!(text.contains("1 file could not be written into"), "{text}");
    assert!(!text.contains("check --read-data"), "{text}");
    assert!(stderr(&out).lines().any(|l| l.starts_with("error: ") && l.contains("file0")), "{}", stderr(&out));
}
