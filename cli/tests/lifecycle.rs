//! Repository lifecycle under stress: keys, check, prune, copy, crashes, concurrency, corruption.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use hoard_testkit::{compare, manifest, random_bytes, text_bytes};

fn small_repo(dir: &Path) -> Hoard {
    let h = Hoard::new(dir.join("repo").to_str().unwrap());
    h.ok(&[
        "init",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
        "--insecure-kdf",
        "--pack-size-mib",
        "1",
        "--chunk-min-kib",
        "16",
        "--chunk-avg-kib",
        "64",
        "--chunk-max-kib",
        "256",
    ]);
    h
}

fn make_tree(root: &Path, files: usize, size: usize, seed: u64) {
    std::fs::create_dir_all(root).unwrap();
    for i in 0..files {
        let data = if i % 2 == 0 {
            random_bytes(size, seed * 1000 + i as u64)
        } else {
            text_bytes(size, seed * 1000 + i as u64)
        };
        std::fs::write(root.join(format!("f{i:03}")), data).unwrap();
    }
}

fn check_ok(h: &Hoard) {
    let out = h.run(&["check", "--read-data"]);
    assert_eq!(out.status.code(), Some(0), "check failed:\n{}\n{}", stdout(&out), stderr(&out));
}

fn restore_matches(h: &Hoard, snap: &str, src: &Path, scratch: &Path) {
    let _ = std::fs::remove_dir_all(scratch);
    h.ok(&["restore", snap, "--target", scratch.to_str().unwrap()]);
    let name = src.file_name().unwrap();
    let d = compare(&manifest(src), &manifest(&scratch.join(name)));
    assert!(d.is_empty(), "snapshot {snap} does not restore identically:\n{}", d.join("\n"));
}

fn snapshot_ids(h: &Hoard) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    v.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

/// Bytes of the objects below `dir` (not temporary files of interrupted writes).
fn repo_bytes(dir: &Path) -> u64 {
    list_files(dir).iter().filter(|(p, _)| !p.to_string_lossy().contains('#')).map(|(_, n)| n).sum()
}

#[test]
fn keys_add_passwd_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let mut h2 = Hoard::new(h.repo.clone());
    h2.envs.push(("HOARD_NEW_PASSWORD".into(), "second password".into()));
    // Below the floor (19 MiB × 2) only on request; the default strength always passes.
    let weak = h2.expect(&["key", "add", "--kdf-memory-mib", "8", "--kdf-iterations", "1"], 1);
    assert!(stderr(&weak).contains("too weak"), "{}", stderr(&weak));
    let fresh = Hoard::new(tmp.path().join("weak").to_str().unwrap());
    let weak = fresh.expect(&["init", "--kdf-memory-mib", "16", "--kdf-iterations", "2"], 1);
    assert!(stderr(&weak).contains("too weak"), "{}", stderr(&weak));
    assert!(!tmp.path().join("weak/config").exists());
    h2.ok(&["key", "add", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf"]);
    let keys: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "key", "list"]).stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let current =
        keys.as_array().unwrap().iter().find(|k| k["current"] == true).unwrap()["id"].as_str().unwrap().to_string();
    let out = h.expect(&["key", "remove", &current[..8]], 1);
    assert!(stderr(&out).contains("refusing"), "{}", stderr(&out));
    // Change the first password: the old one fails, the new one opens.
    let mut p = Hoard::new(h.repo.clone());
    p.envs.push(("HOARD_NEW_PASSWORD".into(), "third password".into()));
    p.ok(&["key", "passwd", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf"]);
    h.expect(&["snapshots"], 12);
    let mut third = Hoard::new(h.repo.clone());
    third.password = "third password".into();
    third.ok(&["snapshots"]);
    let mut second = Hoard::new(h.repo.clone());
    second.password = "second password".into();
    second.ok(&["snapshots"]);
    // The second key can remove the third (not in use by it).
    let keys: serde_json::Value = serde_json::from_slice(&second.ok(&["--json", "key", "list"]).stdout).unwrap();
    let other =
        keys.as_array().unwrap().iter().find(|k| k["current"] == false).unwrap()["id"].as_str().unwrap().to_string();
    second.ok(&["key", "remove", &other[..8]]);
    third.expect(&["snapshots"], 12);
    second.ok(&["snapshots"]);
}

/// `check` decodes every key slot, not only the one that opened the repository: a damaged
/// second slot is named, while the repository still opens with the first.
#[test]
fn check_names_a_damaged_second_key_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    check_ok(&h);
    let before: Vec<PathBuf> = files_under(&tmp.path().join("repo"), "keys");
    let mut h2 = Hoard::new(h.repo.clone());
    h2.envs.push(("HOARD_NEW_PASSWORD".into(), "second password".into()));
    h2.ok(&["key", "add", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf"]);
    let second = files_under(&tmp.path().join("repo"), "keys").into_iter().find(|k| !before.contains(k)).unwrap();
    let name = second.file_name().unwrap().to_string_lossy().into_owned();
    check_ok(&h);
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage); 3] = [
        ("flipped", |b| {
            let i = b.len() / 2;
            b[i] ^= 1;
        }),
        ("truncated", |b| b.truncate(b.len() / 2)),
        // Valid JSON under a matching name, but no usable slot: an empty salt.
        ("re-hashed with an empty salt", |b| {
            let mut v: serde_json::Value = serde_json::from_slice(b).unwrap();
            v["salt"] = "".into();
            *b = serde_json::to_vec_pretty(&v).unwrap();
        }),
    ];
    let pristine = std::fs::read(&second).unwrap();
    for (what, damage) in cases {
        let mut b = pristine.clone();
        damage(&mut b);
        let _ = std::fs::remove_file(&second);
        let path = if what.starts_with("re-hashed") {
            second.with_file_name(blake3::hash(&b).to_hex().to_string())
        } else {
            second.clone()
        };
        std::fs::write(&path, &b).unwrap();
        let out = h.run(&["check"]);
        assert_ne!(out.status.code(), Some(0), "{what} second slot not reported:\n{}", stderr(&out));
        let slot = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(stderr(&out).contains(&format!("keys/{slot}")), "{what}: slot not named:\n{}", stderr(&out));
        // The first key still opens the repository.
        h.ok(&["snapshots"]);
        std::fs::remove_file(&path).unwrap();
    }
    std::fs::write(&second, &pristine).unwrap();
    assert_eq!(second.file_name().unwrap().to_string_lossy(), name);
    check_ok(&h);
}

#[test]
fn prune_removes_only_unreferenced_data() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    make_tree(&a, 10, 400_000, 1);
    make_tree(&b, 10, 400_000, 2);
    let sa = h.backup_json(&[a.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    let sb = h.backup_json(&[b.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    let before = repo_bytes(&tmp.path().join("repo/packs"));
    // Dry run changes nothing.
    h.ok(&["prune", "--dry-run"]);
    assert_eq!(before, repo_bytes(&tmp.path().join("repo/packs")));
    // Forget snapshot a by removing its file, then prune.
    std::fs::remove_file(tmp.path().join("repo/snapshots").join(&sa)).unwrap();
    // Staging files of killed writers: a spooled pack, an object_store staging file beside a
    // pack, one in index/. Prune, under its exclusive lock, removes them.
    let a_pack = list_files(&tmp.path().join("repo/packs")).into_iter().map(|(p, _)| p).next().unwrap();
    let staging = [
        tmp.path().join("repo/packs/spool#12345"),
        a_pack.with_file_name(format!("{}#1", a_pack.file_name().unwrap().to_string_lossy())),
        tmp.path().join("repo/index").join(format!("{}#2", "ab".repeat(32))),
    ];
    for f in &staging {
        std::fs::write(f, b"partial").unwrap();
    }
    let out: serde_json::Value =
        serde_json::from_slice(&h.ok(&["--json", "prune", "--max-unused", "0%"]).stdout).unwrap();
    assert!(out["packs_removed"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(out["staging_files_removed"], 3, "{out}");
    for f in &staging {
        assert!(!f.exists(), "{} is left", f.display());
    }
    let after = repo_bytes(&tmp.path().join("repo/packs"));
    assert!(after < before * 2 / 3, "prune left {after} of {before} bytes");
    check_ok(&h);
    restore_matches(&h, &sb[..8], &b, &tmp.path().join("r"));
    // A backup after prune still deduplicates against what is left.
    let again = h.backup_json(&[b.to_str().unwrap(), "--force"], 0);
    assert!(again["summary"]["bytes_stored"].as_u64().unwrap() < 100_000, "{again}");
}

#[test]
fn copy_reencrypts_into_a_second_repository_and_dedups() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let a = tmp.path().join("data");
    make_tree(&a, 6, 300_000, 3);
    h.backup_json(&[a.to_str().unwrap(), "--tag", "x"], 0);
    std::fs::write(a.join("extra"), random_bytes(100_000, 77)).unwrap();
    h.backup_json(&[a.to_str().unwrap()], 0);
    let dst_dir = tmp.path().join("second");
    std::fs::create_dir_all(&dst_dir).unwrap();
    let mut d = Hoard::new(dst_dir.join("repo").to_str().unwrap());
    d.password = "other password".into();
    d.init();
    d.envs.push(("HOARD_FROM_PASSWORD".into(), PASSWORD.into()));
    d.ok(&["copy", "--from-repo", &h.repo]);
    assert_eq!(snapshot_ids(&d).len(), 2);
    let size = repo_bytes(&dst_dir.join("repo/packs"));
    // Copying again copies nothing.
    let out = stdout(&d.ok(&["copy", "--from-repo", &h.repo]));
    assert!(out.contains("0 snapshots copied"), "{out}");
    assert_eq!(size, repo_bytes(&dst_dir.join("repo/packs")));
    check_ok(&d);
    restore_matches(&d, "latest", &a, &tmp.path().join("r"));
    // Ids differ between repositories (keyed), so the source's packs are not byte-copied.
    let src_packs: Vec<String> = list_files(&tmp.path().join("repo/packs"))
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let dst_packs: Vec<String> = list_files(&dst_dir.join("repo/packs"))
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(src_packs.iter().all(|p| !dst_packs.contains(p)));
}

fn base_name(p: &str) -> String {
    p.trim_end_matches(" (directory listing)").rsplit('/').next().unwrap_or(p).to_string()
}

/// Restores `snap` into a fresh `scratch` with `--json`; returns the exit code and the names of
/// the files it reports as failed.
fn restore_failures(h: &Hoard, snap: &str, scratch: &Path) -> (Option<i32>, std::collections::BTreeSet<String>) {
    let _ = std::fs::remove_dir_all(scratch);
    let out = h.run(&["--json", "restore", snap, "--target", scratch.to_str().unwrap()]);
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    let failed = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message_type"] == "summary")
        .map(|v| v["outcome"]["failed"].as_array().unwrap().iter().map(|f| base_name(f[0].as_str().unwrap())).collect())
        .unwrap_or_default();
    (out.status.code(), failed)
}

/// Corruption matrix: damage one object of each kind three ways. `check --read-data` detects
/// every case (a deleted snapshot only as the trees it leaves unreferenced); repository-wide
/// objects (config, key) make opening fail with a clear code. After each damage, restore is run:
/// the undamaged second snapshot always restores byte-identical; a damaged pack fails exactly the
/// files check names (a subset of them when truncated: check cannot tell which blobs survived),
/// and every other file restores identically; a damaged index or snapshot object is skipped with
/// a warning, and a new backup still succeeds.
#[test]
fn corruption_matrix_is_always_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let src = tmp.path().join("data");
    make_tree(&src, 8, 300_000, 4);
    let sd = h.backup_json(&[src.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    let other = tmp.path().join("other");
    make_tree(&other, 3, 100_000, 44);
    let so = h.backup_json(&[other.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    let repo = tmp.path().join("repo");
    let pristine = tmp.path().join("pristine");
    std::process::Command::new("cp").arg("-a").arg(&repo).arg(&pristine).status().unwrap();
    let reset = || {
        std::fs::remove_dir_all(&repo).unwrap();
        std::process::Command::new("cp").arg("-a").arg(&pristine).arg(&repo).status().unwrap();
    };
    let pick = |sub: &str| -> PathBuf {
        match sub {
            "config" => return repo.join("config"),
            "snapshots" => return repo.join("snapshots").join(&sd),
            _ => {}
        }
        let mut f = list_files(&repo.join(sub));
        f.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        f[0].0.clone()
    };
    let scratch = tmp.path().join("r");
    let mut cases = 0;
    for kind in ["packs", "index", "snapshots", "keys", "config"] {
        for damage in ["flip", "truncate", "delete"] {
            reset();
            let victim = pick(kind);
            let bytes = std::fs::read(&victim).unwrap();
            match damage {
                "flip" => {
                    let mut b = bytes.clone();
                    let i = b.len() / 2;
                    b[i] ^= 0x20;
                    std::fs::write(&victim, b).unwrap();
                }
                "truncate" => std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap(),
                _ => std::fs::remove_file(&victim).unwrap(),
            }
            let case = format!("{kind}/{damage}");
            let out = h.run(&["--json", "check", "--read-data"]);
            let code = out.status.code();
            assert!(!stderr(&out).contains("panicked"), "{case}: {}", stderr(&out));
            let report: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
            if case == "snapshots/delete" {
                // Indistinguishable from `forget`; check reports the trees it left behind.
                let r = report.as_ref().unwrap();
                assert!(r["unreferenced_trees"].as_u64().unwrap() > 0, "{case}: {r}");
            } else {
                assert_ne!(code, Some(0), "{case} not detected:\n{}\n{}", stdout(&out), stderr(&out));
            }
            match kind {
                "config" | "keys" => {
                    // Opening fails: restore fails the same way, with a clear code.
                    let (rc, _) = restore_failures(&h, &so[..8], &scratch);
                    assert_eq!(rc, code, "{case}: restore and check disagree");
                    assert!(matches!(rc, Some(10..=14)), "{case}: exit {rc:?}");
                }
                "packs" => {
                    let r = report.unwrap();
                    let named: std::collections::BTreeSet<String> = r["affected"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|a| a[0] == sd.as_str())
                        .flat_map(|a| a[1].as_array().unwrap().iter().map(|p| base_name(p.as_str().unwrap())))
                        .collect();
                    assert!(!named.is_empty(), "{case}: check names no affected file: {r}");
                    let (rc, failed) = restore_failures(&h, &sd[..8], &scratch);
                    assert_eq!(rc, Some(1), "{case}: restore must report failed files");
                    if damage == "truncate" {
                        assert!(
                            !failed.is_empty() && failed.is_subset(&named),
                            "{case}: restore failed {failed:?}, check named {named:?}"
                        );
                    } else {
                        assert_eq!(failed, named, "{case}: restore and check name different files");
                    }
                    for i in 0..8 {
                        let name = format!("f{i:03}");
                        if !failed.contains(&name) {
                            assert_eq!(
                                std::fs::read(scratch.join("data").join(&name)).unwrap(),
                                std::fs::read(src.join(&name)).unwrap(),
                                "{case}: {name} not restored identically"
                            );
                        }
                    }
                    restore_matches(&h, &so[..8], &other, &scratch);
                }
                "index" => {
                    // The damaged index is skipped: the other snapshot restores, the one whose
                    // blobs it listed cannot, and a new backup stores them again.
                    restore_matches(&h, &so[..8], &other, &scratch);
                    let (rc, _) = restore_failures(&h, &sd[..8], &scratch);
                    assert_ne!(rc, Some(0), "{case}: restore of the unindexed snapshot succeeded");
                    let out = h.run(&["--json", "backup", src.to_str().unwrap()]);
                    assert_eq!(out.status.code(), Some(0), "{case}: backup blocked: {}", stderr(&out));
                    if damage != "delete" {
                        assert!(
                            stderr(&out).contains("skipping damaged index/"),
                            "{case}: no warning: {}",
                            stderr(&out)
                        );
                    }
                    let again = last_json(&out, "summary")["snapshot_id"].as_str().unwrap().to_string();
                    restore_matches(&h, &again[..8], &src, &scratch);
                }
                _ => {
                    // snapshots: the other snapshot is still listed and restores.
                    let out = h.ok(&["--json", "snapshots"]);
                    let ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                        .unwrap()
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s["id"].as_str().unwrap().to_string())
                        .collect();
                    assert_eq!(ids, vec![so.clone()], "{case}");
                    restore_matches(&h, &so[..8], &other, &scratch);
                    if damage != "delete" {
                        assert!(
                            stderr(&out).contains("skipping damaged snapshots/"),
                            "{case}: no warning: {}",
                            stderr(&out)
                        );
                        let (rc, _) = restore_failures(&h, &sd[..8], &scratch);
                        assert_eq!(rc, Some(14), "{case}: restoring the damaged snapshot");
                    }
                }
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 15);
    reset();
    check_ok(&h);
}

fn spawn_backup(h: &Hoard, src: &Path, extra: &[&str]) -> std::process::Child {
    let mut args = vec!["--json", "backup", src.to_str().unwrap(), "--upload-concurrency", "2"];
    args.extend_from_slice(extra);
    h.cmd(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// SIGKILL `hoard backup` at seeded random points, 30 times, each run with fresh data to store.
/// The kills are aimed inside a measured incremental run, and at least 20 of the 30 must land
/// before the process exits. After each kill: the repository checks clean with --read-data and
/// lists no partial snapshot. Every snapshot a run completed inside the loop restores
/// byte-identical to the tree as it was at that run, and so does the base. In total, the
/// interrupted runs plus a final complete one upload no more than one uninterrupted backup of
/// the final tree plus a few packs: what an interrupted run stored is reused, not uploaded again.
#[test]
fn crash_during_backup_leaves_a_consistent_resumable_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let base = tmp.path().join("base");
    make_tree(&base, 4, 200_000, 5);
    let base_snap = h.backup_json(&[base.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    let src = tmp.path().join("big");
    make_tree(&src, 8, 1_000_000, 6);
    h.backup_json(&[src.to_str().unwrap()], 0);
    // How long one incremental run (one new 1.5 MB file) takes here, to aim the kills: the
    // fastest of three, since a slow outlier would aim kills after most runs have exited.
    let mut run_ms = u64::MAX;
    for c in 0..3u64 {
        std::fs::write(src.join(format!("calibration{c}")), random_bytes(1_500_000, 990 + c)).unwrap();
        let t = Instant::now();
        h.backup_json(&[src.to_str().unwrap()], 0);
        run_ms = run_ms.min((t.elapsed().as_millis() as u64).max(40));
    }
    let packs_dir = tmp.path().join("repo/packs");
    let before = repo_bytes(&packs_dir);
    let mut seed = 0x5eed_u64;
    let mut killed = 0;
    let mut snapshots = snapshot_ids(&h);
    // Snapshots completed inside the loop, with the tree they must restore to.
    let mut completed = Vec::new();
    for i in 0..30u64 {
        std::fs::write(src.join(format!("new{i:02}")), random_bytes(1_500_000, 1000 + i)).unwrap();
        // Within the first three quarters of a run, so most kills land before it exits.
        let delay = xorshift(&mut seed) % (run_ms * 3 / 4);
        let started = Instant::now();
        let mut child = spawn_backup(&h, &src, &[]);
        // Poll rather than sleep, so a run that exits before its kill shows how long it took.
        while started.elapsed() < Duration::from_millis(delay) && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let ran_ms = started.elapsed().as_millis() as u64;
        // Killed by the signal, or it had already exited on its own.
        let finished = std::os::unix::process::ExitStatusExt::signal(&child.wait().unwrap()).is_none();
        if finished {
            // Faster than aimed for (the machine is shared): aim the next kills earlier.
            run_ms = ran_ms.clamp(20, run_ms);
        } else {
            killed += 1;
        }
        // At most the one snapshot this run wrote (a kill can land after its snapshot is saved);
        // `check --read-data` below proves every listed snapshot is complete.
        let now = snapshot_ids(&h);
        let new: Vec<String> = now.iter().filter(|s| !snapshots.contains(s)).cloned().collect();
        assert!(new.len() <= 1 && now.len() == snapshots.len() + new.len(), "run {i}: {snapshots:?} -> {now:?}");
        if let Some(id) = new.first() {
            completed.push((id.clone(), i, manifest(&src)));
        }
        snapshots = now;
        check_ok(&h);
        if i % 10 == 0 {
            restore_matches(&h, &base_snap[..8], &base, &tmp.path().join("r"));
        }
    }
    eprintln!("{killed} of 30 runs killed mid-run (runs take ~{run_ms} ms); {} completed", completed.len());
    assert!(killed >= 20, "only {killed} of 30 runs were interrupted (a run takes ~{run_ms} ms)");
    for (id, i, expected) in &completed {
        let scratch = tmp.path().join("r");
        let _ = std::fs::remove_dir_all(&scratch);
        h.ok(&["restore", &id[..8], "--target", scratch.to_str().unwrap()]);
        let d = compare(expected, &manifest(&scratch.join("big")));
        assert!(d.is_empty(), "snapshot {id} of run {i} does not restore identically:\n{}", d.join("\n"));
    }
    h.backup_json(&[src.to_str().unwrap()], 0);
    restore_matches(&h, "latest", &src, &tmp.path().join("r2"));
    restore_matches(&h, &base_snap[..8], &base, &tmp.path().join("r"));
    let uploaded = repo_bytes(&packs_dir) - before;
    // Killed runs leave the staging files of their open packs; a prune removes them all.
    let staged = |dir: &Path| list_files(dir).into_iter().filter(|(p, _)| p.to_string_lossy().contains('#')).count();
    let left_by_kills = staged(&tmp.path().join("repo"));
    let pruned: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "prune"]).stdout).unwrap();
    assert_eq!(pruned["staging_files_removed"], left_by_kills as u64, "{pruned}");
    assert_eq!(staged(&tmp.path().join("repo")), 0);
    eprintln!("{left_by_kills} staging files left by killed runs, removed by prune");
    let ref_dir = tmp.path().join("ref");
    std::fs::create_dir_all(&ref_dir).unwrap();
    let full = {
        // One clean backup of exactly the data the loop added.
        let added = tmp.path().join("added");
        std::fs::create_dir_all(&added).unwrap();
        for i in 0..30u64 {
            std::fs::copy(src.join(format!("new{i:02}")), added.join(format!("new{i:02}"))).unwrap();
        }
        small_repo(&ref_dir).backup_json(&[added.to_str().unwrap()], 0)["summary"]["bytes_stored"].as_u64().unwrap()
    };
    // Slack: packs in flight at each kill (2 upload workers, 1 MiB packs: at most one partly
    // filled pack per worker is lost per kill, and it is never an object) and the directory
    // trees each run rewrites.
    let bound = full + 3 * (1 << 20) + 30 * 64 * 1024;
    eprintln!("uploaded {uploaded} bytes in total; one clean backup of the added data stores {full}");
    assert!(uploaded <= bound, "uploaded {uploaded} across interrupted runs; one backup stores {full} (bound {bound})");
}

/// SIGKILL `hoard prune` at seeded points aimed inside a measured prune run; every retained
/// snapshot keeps its data. At least 20 of the 30 kills must land before the prune exits, and
/// after each round an uninterrupted prune completes and removes the round's garbage.
#[test]
fn crash_during_prune_loses_no_retained_data() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let keep = tmp.path().join("keep");
    make_tree(&keep, 10, 300_000, 7);
    let keep_snap = h.backup_json(&[keep.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    let packs_dir = tmp.path().join("repo/packs");
    let baseline = repo_bytes(&packs_dir);
    let junk_round = |round: u64| {
        let junk = tmp.path().join(format!("junk{round}"));
        make_tree(&junk, 8, 300_000, 100 + round);
        // Share some files with `keep` so repacking is needed.
        std::fs::copy(keep.join("f000"), junk.join("shared")).unwrap();
        let js = h.backup_json(&[junk.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
        std::fs::remove_file(tmp.path().join("repo/snapshots").join(&js)).unwrap();
    };
    // How long one prune of a round's garbage takes here, to aim the kills.
    junk_round(99);
    let t = Instant::now();
    h.ok(&["prune", "--max-unused", "0%"]);
    let mut prune_ms = (t.elapsed().as_millis() as u64).max(40);
    let mut seed = 0xfeed_u64;
    let mut killed = 0;
    let mut attempts_done = 0;
    for round in 0..10u64 {
        junk_round(round);
        // Three kills a round, in at most six attempts (the machine is shared: a prune may
        // finish before its kill).
        let mut killed_this_round = 0;
        for _ in 0..6 {
            if killed_this_round == 3 {
                break;
            }
            // Within the first half of a run: a prune killed later may finish the round's work,
            // leaving the next attempts nothing to do.
            let delay = xorshift(&mut seed) % (prune_ms / 2);
            let mut child = h
                .cmd(&["prune", "--max-unused", "0%"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(delay));
            let _ = child.kill();
            let status = child.wait().unwrap();
            if std::os::unix::process::ExitStatusExt::signal(&status).is_some() {
                killed += 1;
                killed_this_round += 1;
            } else {
                assert!(status.success(), "round {round}: an uninterrupted prune failed: {status:?}");
                attempts_done += 1;
                // It was faster than aimed for: aim earlier.
                prune_ms = (prune_ms * 2 / 3).max(20);
            }
            // A killed prune leaves its exclusive lock; it is stale at once on this host.
            check_ok(&h);
        }
        restore_matches(&h, &keep_snap[..8], &keep, &tmp.path().join("r"));
        // Progress: after the kills, one prune completes and the round's garbage is gone.
        let t = Instant::now();
        let out: serde_json::Value =
            serde_json::from_slice(&h.ok(&["--json", "prune", "--max-unused", "0%"]).stdout).unwrap();
        // Re-aim at the current load: the machine is shared.
        prune_ms = (prune_ms + (t.elapsed().as_millis() as u64).max(40)) / 2;
        let left = repo_bytes(&packs_dir);
        assert!(left <= baseline + 300_000, "round {round}: {left} bytes left, {baseline} retained: {out}");
    }
    eprintln!("{killed} prunes killed mid-run, {attempts_done} finished (a prune takes ~{prune_ms} ms)");
    assert!(
        killed >= 20,
        "only {killed} of {} prunes were interrupted (a prune takes ~{prune_ms} ms)",
        killed + attempts_done
    );
    check_ok(&h);
    restore_matches(&h, &keep_snap[..8], &keep, &tmp.path().join("r"));
}

/// Several writers at once on overlapping data: all snapshots are valid and later runs dedup.
#[test]
fn concurrent_writers_produce_valid_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let shared = random_bytes(2_000_000, 9);
    let mut srcs = Vec::new();
    for w in 0..8u64 {
        let d = tmp.path().join(format!("node{w}"));
        make_tree(&d, 4, 300_000, 20 + w);
        std::fs::write(d.join("common.bin"), &shared).unwrap();
        srcs.push(d);
    }
    let children: Vec<_> = srcs.iter().map(|s| spawn_backup(&h, s, &["--host", "node"])).collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(snapshot_ids(&h).len(), 8);
    check_ok(&h);
    // Shared data is now indexed: another node backing up the same content stores ~nothing new.
    let d = tmp.path().join("node9");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("common.bin"), &shared).unwrap();
    let s = h.backup_json(&[d.to_str().unwrap()], 0);
    assert!(s["summary"]["bytes_new"].as_u64().unwrap() < 100_000, "{s}");
    // Each node's snapshot restores its own tree.
    let v: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    for (i, src) in srcs.iter().enumerate() {
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        let snap = v.as_array().unwrap().iter().find(|s| s["components"][0]["name"] == name.as_str()).unwrap();
        let id = snap["id"].as_str().unwrap();
        restore_matches(&h, &id[..8], src, &tmp.path().join(format!("r{i}")));
    }
}

/// Polls `done` every 20 ms for at most `limit`; panics naming `what` when it never holds.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pack_names(repo: &Path) -> std::collections::BTreeSet<String> {
    if !repo.join("packs").exists() {
        return Default::default();
    }
    list_files(&repo.join("packs"))
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| !n.contains('#'))
        .collect()
}

/// Prune racing a backup frozen between its dedup lookups and its snapshot write, made
/// deterministic by the backup's test pause points (`HOARD_TEST_PAUSE_BEFORE_SNAPSHOT` before
/// the lease check, `HOARD_TEST_PAUSE_AFTER_LEASE_CHECK` between the check and the write): the
/// backup announces the point, is frozen there with SIGSTOP past the lock's stale age, and prune
/// deletes forgotten data that the backup deduplicated against. On resume the backup must fail
/// with the lock error (11) or leave a snapshot that restores and checks clean; never a snapshot
/// referencing deleted data. Every round must actually hit the race: prune succeeded while the
/// backup held its (stale) lock at the pause point, and deleted the shared packs.
#[test]
fn prune_racing_a_paused_backup_never_breaks_a_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let repo = tmp.path().join("repo");
    // Short lock times only for the racing processes: stale after 4 s, lease 2.7 s.
    let mut racer = Hoard::new(h.repo.clone());
    racer.envs.push(("HOARD_LOCK_STALE_SECONDS".into(), "4".into()));
    let mut hits = 0;
    for (round, stage) in ["HOARD_TEST_PAUSE_BEFORE_SNAPSHOT", "HOARD_TEST_PAUSE_AFTER_LEASE_CHECK"].iter().enumerate()
    {
        let round = round as u64;
        // Garbage: a forgotten snapshot whose files the next backup contains verbatim.
        let old = tmp.path().join(format!("old{round}"));
        make_tree(&old, 4, 400_000, 300 + round);
        let before_old = pack_names(&repo);
        let gs = h.backup_json(&[old.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
        let garbage_packs: Vec<String> = pack_names(&repo).difference(&before_old).cloned().collect();
        assert!(!garbage_packs.is_empty());
        std::fs::remove_file(repo.join("snapshots").join(&gs)).unwrap();
        let src = tmp.path().join(format!("data{round}"));
        make_tree(&src, 3, 300_000, 400 + round);
        for i in 0..4 {
            std::fs::copy(old.join(format!("f{i:03}")), src.join(format!("shared{i}"))).unwrap();
        }
        let pause = tmp.path().join(format!("pause{round}"));
        let mut b = Hoard::new(h.repo.clone());
        b.envs = racer.envs.clone();
        b.envs.push((stage.to_string(), pause.to_str().unwrap().into()));
        let mut child = spawn_backup(&b, &src, &["--force"]);
        wait_until(Duration::from_secs(60), "the backup to reach its pause point", || {
            pause.exists() || child.try_wait().unwrap().is_some()
        });
        assert!(child.try_wait().unwrap().is_none(), "{stage}: backup exited before its pause point");
        let pid = child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
        // Resumed, it goes on at once; frozen, it refreshes nothing until past the stale age.
        std::fs::remove_file(&pause).unwrap();
        std::thread::sleep(Duration::from_millis(4500));
        let pr = racer.run(&["--json", "prune", "--max-unused", "0%"]);
        let gone = garbage_packs.iter().filter(|p| !pack_names(&repo).contains(*p)).count();
        assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
        let started = Instant::now();
        wait_until(Duration::from_secs(60), "the resumed backup to exit", || child.try_wait().unwrap().is_some());
        let out = child.wait_with_output().unwrap();
        assert!(started.elapsed() < Duration::from_secs(60));
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        // The race happened: prune ran to completion while the backup was frozen at the point,
        // and deleted data the backup had deduplicated against.
        if pr.status.code() == Some(0) && gone == garbage_packs.len() {
            hits += 1;
        }
        eprintln!(
            "{stage}: prune exit {:?}, {gone}/{} shared packs deleted; backup exit {:?}",
            pr.status.code(),
            garbage_packs.len(),
            out.status.code()
        );
        if out.status.success() {
            let id = last_json(&out, "summary")["snapshot_id"].as_str().unwrap().to_string();
            check_ok(&h);
            restore_matches(&h, &id[..8], &src, &tmp.path().join("r"));
        } else {
            assert_eq!(out.status.code(), Some(11), "{stage}: a paused backup must fail with the lock error: {e}");
            assert!(e.contains("lock lost"), "{stage}: unexpected failure: {e}");
        }
        // Never a snapshot that references missing data.
        check_ok(&h);
        for id in snapshot_ids(&h) {
            let snap = tmp.path().join("r");
            let _ = std::fs::remove_dir_all(&snap);
            h.ok(&["restore", &id[..8], "--target", snap.to_str().unwrap()]);
        }
        // The repository stays usable: the next backup stores the deleted data again.
        let again = h.backup_json(&[src.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
        check_ok(&h);
        restore_matches(&h, &again[..8], &src, &tmp.path().join("r"));
    }
    assert_eq!(hits, 2, "a round did not hit the race (prune blocked or nothing shared deleted)");
}

#[test]
fn forget_applies_a_retention_policy_then_prunes() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let src = tmp.path().join("data");
    make_tree(&src, 2, 50_000, 40);
    // Ten daily snapshots, 2026-03-01 .. 2026-03-10, each with its own file.
    for day in 1..=10u64 {
        std::fs::write(src.join("day"), random_bytes(200_000, day)).unwrap();
        let time = format!("2026-03-{day:02}T12:00:00Z");
        h.backup_json(&[src.to_str().unwrap(), "--time", &time, "--host", "h"], 0);
    }
    let plan: serde_json::Value = serde_json::from_slice(
        &h.ok(&["--json", "forget", "--keep-daily", "3", "--keep-weekly", "2", "--dry-run"]).stdout,
    )
    .unwrap();
    assert_eq!(plan["removed"].as_array().unwrap().len(), 7, "{plan}");
    assert_eq!(snapshot_ids(&h).len(), 10, "dry run removed something");
    let before = repo_bytes(&tmp.path().join("repo/packs"));
    h.ok(&["forget", "--keep-daily", "3", "--keep-weekly", "2", "--prune", "--max-unused", "0%"]);
    let v: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    let days: Vec<String> =
        v.as_array().unwrap().iter().map(|s| s["time"].as_str().unwrap()[..10].to_string()).collect();
    // Daily keeps 03-10, 03-09, 03-08; weekly's two picks are 03-10 (ISO week 11) and 03-08
    // (week 10), so its budget is spent before week 9 (03-01), as in restic.
    assert_eq!(days, vec!["2026-03-08", "2026-03-09", "2026-03-10"], "{v}");
    assert!(repo_bytes(&tmp.path().join("repo/packs")) < before);
    check_ok(&h);
    // Explicit ids and an empty policy.
    let out = h.expect(&["forget"], 1);
    assert!(stderr(&out).contains("no policy"), "{}", stderr(&out));
}

fn lock_files(repo: &Path) -> std::collections::BTreeSet<PathBuf> {
    if !repo.join("locks").exists() {
        return Default::default();
    }
    list_files(&repo.join("locks")).into_iter().map(|(p, _)| p).filter(|p| !p.to_string_lossy().contains('#')).collect()
}

/// Starts a backup that stops at its pause point and waits there; returns it once its lock exists.
fn paused_backup(b: &Hoard, src: &Path, pause: &Path) -> std::process::Child {
    let mut b = Hoard::new(b.repo.clone()).with_envs(&b.envs);
    b.envs.push(("HOARD_TEST_PAUSE_BEFORE_SNAPSHOT".into(), pause.to_str().unwrap().into()));
    let mut child = spawn_backup(&b, src, &["--force"]);
    wait_until(Duration::from_secs(60), "a backup to reach its pause point", || {
        pause.exists() || child.try_wait().unwrap().is_some()
    });
    assert!(child.try_wait().unwrap().is_none(), "backup exited before its pause point");
    child
}

trait WithEnvs {
    fn with_envs(self, envs: &[(String, String)]) -> Self;
}

impl WithEnvs for Hoard {
    fn with_envs(mut self, envs: &[(String, String)]) -> Self {
        self.envs.extend_from_slice(envs);
        self
    }
}

/// `unlock` removes only provably stale locks: a killed local process's lock and a frozen
/// process's lock past the stale age go; a live holder's lock stays, and that holder finishes.
#[test]
fn unlock_removes_stale_locks_and_keeps_fresh_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let repo = tmp.path().join("repo");
    let src = tmp.path().join("data");
    make_tree(&src, 2, 100_000, 50);
    // A live holder (default lock times: it does not refresh during this test).
    let live_pause = tmp.path().join("live");
    let live = paused_backup(&h, &src, &live_pause);
    let live_locks = lock_files(&repo);
    assert_eq!(live_locks.len(), 1, "{live_locks:?}");
    // A holder killed at the same point: same host, boot and PID namespace, process gone.
    let dead_pause = tmp.path().join("dead");
    let mut dead = paused_backup(&h, &src, &dead_pause);
    dead.kill().unwrap();
    dead.wait().unwrap();
    let before = lock_files(&repo);
    assert!(before.len() >= 2, "{before:?}");
    let out: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "unlock"]).stdout).unwrap();
    assert_eq!(out["removed_locks"].as_u64(), Some(before.len() as u64 - 1), "{out}");
    assert_eq!(lock_files(&repo), live_locks, "unlock touched the live holder's lock");
    // A frozen holder past the stale age (4 s here): stale although its process exists.
    let short = vec![("HOARD_LOCK_STALE_SECONDS".to_string(), "4".to_string())];
    let frozen_pause = tmp.path().join("frozen");
    let frozen_h = Hoard::new(h.repo.clone()).with_envs(&short);
    let frozen = paused_backup(&frozen_h, &src, &frozen_pause);
    let pid = frozen.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    std::fs::remove_file(&frozen_pause).unwrap();
    let frozen_locks: Vec<PathBuf> = lock_files(&repo).difference(&live_locks).cloned().collect();
    assert!(!frozen_locks.is_empty());
    std::thread::sleep(Duration::from_millis(4500));
    // By the default rule (30 min) neither remaining holder is stale: both processes exist.
    let out: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "unlock"]).stdout).unwrap();
    assert_eq!(out["removed_locks"].as_u64(), Some(0), "{out}");
    std::fs::remove_file(&live_pause).unwrap();
    let out = live.wait_with_output().unwrap();
    assert!(out.status.success(), "the live holder failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(lock_files(&repo).iter().all(|l| frozen_locks.contains(l)), "{:?}", lock_files(&repo));
    // By the 4 s rule the frozen holder's lock is stale although its process exists (the live
    // holder, whose default-timed lock would be aged too by this rule, has finished).
    let out: serde_json::Value = serde_json::from_slice(&frozen_h.ok(&["--json", "unlock"]).stdout).unwrap();
    assert_eq!(out["removed_locks"].as_u64(), Some(frozen_locks.len() as u64), "{out}");
    assert!(lock_files(&repo).is_empty());
    // The frozen holder, resumed, knows its lease is gone.
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let out = frozen.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(11), "{}", String::from_utf8_lossy(&out.stderr));
    check_ok(&h);
}

/// `repair index` after a deleted or a damaged index file: check and restore pass again.
#[test]
fn repair_index_restores_a_deleted_or_damaged_index() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let src = tmp.path().join("data");
    make_tree(&src, 6, 300_000, 51);
    h.backup_json(&[src.to_str().unwrap()], 0);
    let repo = tmp.path().join("repo");
    for damage in ["delete", "flip"] {
        for idx in files_under(&repo, "index") {
            if damage == "delete" {
                std::fs::remove_file(&idx).unwrap();
            } else {
                let mut b = std::fs::read(&idx).unwrap();
                let i = b.len() / 2;
                b[i] ^= 4;
                std::fs::write(&idx, b).unwrap();
            }
        }
        let out = h.run(&["check", "--read-data"]);
        assert_ne!(out.status.code(), Some(0), "{damage}: damage not detected");
        let _ = std::fs::remove_dir_all(tmp.path().join("r"));
        let out = h.run(&["restore", "latest", "--target", tmp.path().join("r").to_str().unwrap()]);
        assert_ne!(out.status.code(), Some(0), "{damage}: restore without an index succeeded");
        let out = h.ok(&["repair", "index"]);
        assert!(stdout(&out).contains("index rebuilt from"), "{}", stdout(&out));
        check_ok(&h);
        restore_matches(&h, "latest", &src, &tmp.path().join("r"));
    }
}

/// `check --read-data-subset 50%` reads about half the packs (each pack with probability ½):
/// over three runs of ~20 packs the count stays far from none and from all.
#[test]
fn check_read_data_subset_reads_about_half_the_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let src = tmp.path().join("data");
    // Incompressible, so ~1 MiB packs hold ~1 MB each.
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..20u64 {
        std::fs::write(src.join(format!("f{i:02}")), random_bytes(1_000_000, 520 + i)).unwrap();
    }
    h.backup_json(&[src.to_str().unwrap()], 0);
    let report = |args: &[&str]| -> serde_json::Value {
        let mut a = vec!["--json", "check"];
        a.extend_from_slice(args);
        serde_json::from_slice(&h.ok(&a).stdout).unwrap()
    };
    let full = report(&["--read-data"]);
    let packs = full["packs"].as_u64().unwrap();
    assert!(packs >= 15, "only {packs} packs");
    assert_eq!(full["packs_read"].as_u64(), Some(packs));
    assert_eq!(report(&[])["packs_read"].as_u64(), Some(0));
    let mut read = 0;
    for _ in 0..3 {
        let r = report(&["--read-data-subset", "50%"]);
        read += r["packs_read"].as_u64().unwrap();
    }
    let total = 3 * packs;
    // Binomial(total, ½): outside [¼, ¾] of total has probability below 1e-4 for total ≥ 45.
    assert!(read * 4 >= total && read * 4 <= 3 * total, "read {read} of {total} packs at 50%");
    let out = h.run(&["check", "--read-data-subset", "150%"]);
    assert_ne!(out.status.code(), Some(0), "an out-of-range subset was accepted");
}

/// `forget` with --keep-within, --keep-tag and --group-by given on the command line.
#[test]
fn forget_keep_within_keep_tag_and_group_by_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let src = tmp.path().join("data");
    make_tree(&src, 1, 20_000, 53);
    // Host a: days 1, 2, 3, 5, 6 (day 1 tagged release); host b: days 1, 2.
    let mut ids: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (host, day, tag) in [
        ("a", 1, true),
        ("a", 2, false),
        ("a", 3, false),
        ("a", 5, false),
        ("a", 6, false),
        ("b", 1, false),
        ("b", 2, false),
    ] {
        let time = format!("2026-03-{day:02}T12:00:00Z");
        let mut args = vec![src.to_str().unwrap(), "--time", &time, "--host", host];
        if tag {
            args.extend(["--tag", "release"]);
        }
        let id = h.backup_json(&args, 0)["snapshot_id"].as_str().unwrap().to_string();
        ids.insert(id, format!("{host}{day}"));
    }
    let removed = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["--json", "forget", "--dry-run"];
        a.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_slice(&h.ok(&a).stdout).unwrap();
        let mut r: Vec<String> =
            v["removed"].as_array().unwrap().iter().map(|i| ids[i.as_str().unwrap()].clone()).collect();
        r.sort();
        r
    };
    // Per host: a's window is 2 days before a6, b's before b2; the release tag keeps a1.
    assert_eq!(removed(&["--keep-within", "2d", "--keep-tag", "release", "--group-by", "host"]), ["a2", "a3"]);
    // No grouping: one window before a6 for all.
    assert_eq!(removed(&["--keep-within", "2d", "--keep-tag", "release", "--group-by", ""]), ["a2", "a3", "b1", "b2"]);
    // Without the tag rule a1 goes too.
    assert_eq!(removed(&["--keep-within", "2d", "--group-by", "host"]), ["a1", "a2", "a3"]);
    // The issue's spelling: host,tags,labels; a1's tag puts it in a group of its own.
    let v: serde_json::Value = serde_json::from_slice(
        &h.ok(&["--json", "forget", "--dry-run", "--keep-within", "2d", "--group-by", "host,tags,labels"]).stdout,
    )
    .unwrap();
    assert_eq!(v["groups"].as_array().unwrap().len(), 3, "{v}");
    let out = h.expect(&["forget", "--keep-within", "2d", "--group-by", "paths"], 1);
    assert!(stderr(&out).contains("cannot group by"), "{}", stderr(&out));
    // For real: the two snapshots go, the rest stay.
    h.ok(&["forget", "--keep-within", "2d", "--keep-tag", "release", "--group-by", "host"]);
    let mut left: Vec<String> = snapshot_ids(&h).iter().map(|i| ids[i].clone()).collect();
    left.sort();
    assert_eq!(left, ["a1", "a5", "a6", "b1", "b2"]);
}

/// `copy SNAPSHOT` copies only the named snapshot.
#[test]
fn copy_of_a_named_snapshot_copies_only_that_one() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let a = tmp.path().join("data");
    make_tree(&a, 3, 200_000, 54);
    let first = h.backup_json(&[a.to_str().unwrap()], 0)["snapshot_id"].as_str().unwrap().to_string();
    let b = tmp.path().join("more");
    make_tree(&b, 3, 200_000, 55);
    h.backup_json(&[b.to_str().unwrap()], 0);
    let dst_dir = tmp.path().join("second");
    std::fs::create_dir_all(&dst_dir).unwrap();
    let mut d = Hoard::new(dst_dir.join("repo").to_str().unwrap());
    d.password = "other password".into();
    d.init();
    d.envs.push(("HOARD_FROM_PASSWORD".into(), PASSWORD.into()));
    let out: serde_json::Value =
        serde_json::from_slice(&d.ok(&["--json", "copy", "--from-repo", &h.repo, &first[..8]]).stdout).unwrap();
    let copied = out.as_array().unwrap();
    assert_eq!(copied.len(), 1, "{out}");
    assert_eq!(copied[0]["source"].as_str(), Some(first.as_str()));
    let v: serde_json::Value = serde_json::from_slice(&d.ok(&["--json", "snapshots"]).stdout).unwrap();
    let snaps = v.as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{v}");
    assert_eq!(snaps[0]["components"][0]["name"], "data");
    check_ok(&d);
    restore_matches(&d, "latest", &a, &tmp.path().join("r"));
    // Only the first snapshot's data was stored: the second's files are absent from the target.
    let src_bytes = repo_bytes(&tmp.path().join("repo/packs"));
    assert!(repo_bytes(&dst_dir.join("repo/packs")) < src_bytes * 2 / 3);
    let out = d.expect(&["copy", "--from-repo", &h.repo, "ffffffff"], 1);
    assert!(!stderr(&out).contains("panicked"));
}

/// A backup waiting on its input holds a shared lock; SIGINT and SIGTERM end it with 130 / 143,
/// a message saying what happened and what the next backup does, and its lock deleted. A
/// backup killed outright (SIGKILL) leaves its lock, and `check` says so.
#[test]
fn an_interrupted_backup_says_so_and_releases_its_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_repo(tmp.path());
    let repo = tmp.path().join("repo");
    let started = |h: &Hoard| {
        let mut child = h
            .cmd(&["backup", "--stdin", "--stdin-name", "dump.sql"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            // Some data, and the pipe stays open: the backup waits for more.
            child.stdin.as_mut().unwrap().write_all(&random_bytes(1 << 20, 5)).unwrap();
        }
        wait_until(Duration::from_secs(20), "the backup's lock", || !lock_files(&repo).is_empty());
        child
    };
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let child = started(&h);
        let kill = std::process::Command::new("kill").arg(signal).arg(child.id().to_string()).status().unwrap();
        assert!(kill.success());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{signal}: {err}");
        assert!(err.contains("interrupted by SIG") && err.contains("its lock is released"), "{signal}: {err}");
        assert!(err.contains("No snapshot was written") && err.contains("the next backup"), "{signal}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(lock_files(&repo).is_empty(), "{signal}: {:?}", lock_files(&repo));
    }
    let out = h.ok(&["check"]);
    assert!(!stdout(&out).contains("stale"), "{}", stdout(&out));
    // SIGKILL cannot be caught: the lock stays, and check reports it as stale (its process is
    // gone), which `unlock` removes.
    let mut child = started(&h);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(lock_files(&repo).len(), 1);
    let out = h.ok(&["check"]);
    assert!(stdout(&out).contains("1 of 1 locks are stale"), "{}", stdout(&out));
    h.ok(&["unlock"]);
    assert!(lock_files(&repo).is_empty());
}
