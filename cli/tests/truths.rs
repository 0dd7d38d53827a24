//! What `hoard` says and accepts is true on the worst day: it ends quietly when the reader of
//! its output goes away and loudly (once) when a disk under `> file` is full, and a retention
//! period means the same in `forget` as in a RetentionPolicy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Output, Stdio};

use common::*;

/// A repository holding two snapshots of `files` small files with long names (so a listing
/// is far larger than a pipe's buffer) and one 1 MiB file.
fn repo_with_files(tmp: &Path, files: usize) -> Hoard {
    let h = Hoard::new(tmp.join("repo").to_str().unwrap());
    h.init();
    let src = tmp.join("data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..files {
        std::fs::write(src.join(format!("a-file-with-a-rather-long-name-{i:05}")), i.to_string()).unwrap();
    }
    std::fs::write(src.join("big"), hoard_testkit::random_bytes(1 << 20, 7)).unwrap();
    h.backup_json(&[src.to_str().unwrap()], 0);
    std::fs::write(src.join("later"), "later").unwrap();
    h.backup_json(&[src.to_str().unwrap()], 0);
    h
}

/// Runs `hoard args` with standard output a pipe whose reader reads `keep` bytes and then goes
/// away (`keep` 0: before hoard has written anything). Standard error is captured.
fn reader_goes_away(h: &Hoard, args: &[&str], keep: usize) -> Output {
    let mut cmd = h.cmd(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    if keep > 0 {
        let mut buf = vec![0u8; keep];
        out.read_exact(&mut buf).unwrap();
    }
    drop(out);
    child.wait_with_output().unwrap()
}

fn assert_quiet_success(args: &[&str], out: &Output) {
    assert_eq!(out.status.code(), Some(0), "hoard {args:?} exited {:?}: {}", out.status, stderr(out));
    assert_eq!(stderr(out), "", "hoard {args:?} printed a message");
}

#[test]
fn every_printing_verb_ends_quietly_when_its_reader_goes_away() {
    let tmp = tempfile::tempdir().unwrap();
    let h = repo_with_files(tmp.path(), 3000);
    let ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&h.ok(&["--json", "snapshots"]).stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["short_id"].as_str().unwrap().to_string())
        .collect();
    let verbs: Vec<Vec<&str>> = vec![
        vec!["snapshots"],
        vec!["--json", "snapshots"],
        vec!["ls", "latest"],
        vec!["ls", "-l", "latest"],
        vec!["--json", "ls", "latest"],
        vec!["diff", ids[0].as_str(), ids[1].as_str()],
        vec!["stats", "latest"],
        vec!["check"],
        vec!["key", "list"],
        vec!["dump", "latest", "/data/big"],
        vec!["forget", "--keep-last", "1", "--dry-run"],
    ];
    for args in &verbs {
        assert_quiet_success(args, &reader_goes_away(&h, args, 0));
    }
    // Gone after reading part of the output: the rest no longer fits in the pipe's buffer.
    for args in
        [&["ls", "latest"][..], &["ls", "-l", "latest"], &["--json", "ls", "latest"], &["dump", "latest", "/data/big"]]
    {
        assert_quiet_success(args, &reader_goes_away(&h, args, 100));
    }
    // A verb that changes the repository still does all of its work.
    assert_quiet_success(&["forget", "--keep-last", "1"], &reader_goes_away(&h, &["forget", "--keep-last", "1"], 0));
    let left: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
}

#[test]
fn a_full_disk_under_standard_output_is_an_error_reported_once() {
    if !Path::new("/dev/full").exists() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let h = repo_with_files(tmp.path(), 10);
    for args in [&["snapshots"][..], &["ls", "latest"], &["dump", "latest", "/data/big"]] {
        let out = h.cmd(args).stdout(std::fs::File::create("/dev/full").unwrap()).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "hoard {args:?}: {err}");
        assert!(!err.contains("panicked"), "hoard {args:?}: {err}");
        assert_eq!(err.matches("standard output").count(), 1, "hoard {args:?}: {err}");
        assert!(err.contains("No space left on device"), "hoard {args:?}: {err}");
    }
}

/// `--keep-within` reads periods with the one grammar RetentionPolicies use: `m` is minutes,
/// `mo` months, and anything ambiguous is refused before the repository is touched.
#[test]
fn forget_keep_within_reads_minutes_and_months_and_refuses_ambiguous_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.envs.push(("TZ".into(), "UTC".into()));
    h.init();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    let mut names = std::collections::HashMap::new();
    for time in [
        "2025-12-01T12:00:00Z",
        "2026-01-20T12:00:00Z",
        "2026-02-15T12:00:00Z",
        "2026-03-09T12:00:00Z",
        "2026-03-10T11:00:00Z",
        "2026-03-10T11:30:00Z",
        "2026-03-10T12:00:00Z",
    ] {
        let id =
            h.backup_json(&[src.to_str().unwrap(), "--time", time], 0)["snapshot_id"].as_str().unwrap().to_string();
        names.insert(id, time[..16].to_string());
    }
    let removed = |period: &str| -> Vec<String> {
        let out = h.ok(&["--json", "forget", "--dry-run", "--keep-within", period]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut r: Vec<String> =
            v["removed"].as_array().unwrap().iter().map(|i| names[i.as_str().unwrap()].clone()).collect();
        r.sort();
        r
    };
    // 90 minutes before the newest (12:00) is 10:30: the two snapshots after it stay.
    assert_eq!(removed("90m"), ["2025-12-01T12:00", "2026-01-20T12:00", "2026-02-15T12:00", "2026-03-09T12:00"]);
    // Two calendar months before 10 March is 10 January.
    assert_eq!(removed("2mo"), ["2025-12-01T12:00"]);
    assert_eq!(removed("1w1d"), ["2025-12-01T12:00", "2026-01-20T12:00", "2026-02-15T12:00"]);
    for (bad, why) in [
        ("1M", "unknown unit \"M\""),
        ("5x", "unknown unit \"x\""),
        ("10", "has no unit"),
        ("", "empty"),
        ("3h1d", "out of order"),
    ] {
        let out = h.expect(&["forget", "--dry-run", "--keep-within", bad], 2);
        let err = stderr(&out);
        assert!(err.contains(why), "{bad:?}: {err}");
        assert!(err.contains("mo (months)") && err.contains("m (minutes)"), "{bad:?}: {err}");
    }
    // Nothing was removed by any of this.
    assert_eq!(removed("10y").len(), 0);
    let left: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 7);
}

/// A restore that cannot restore some files names each of them once, in plain text: no log
/// line repeating it, no colour codes when standard error is not a terminal.
#[test]
fn restore_errors_are_printed_once_without_colour_when_stderr_is_not_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf", "--pack-size-mib", "4"]);
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("file{i}")), hoard_testkit::random_bytes(3 << 20, i)).unwrap();
    }
    h.backup_json(&[src.to_str().unwrap()], 0);
    flip_a_byte_in_the_largest_pack(&tmp.path().join("repo"));

    let target = tmp.path().join("restore");
    // Standard error is a pipe here, and NO_COLOR is not set.
    let out =
        h.cmd(&["restore", "latest", "--target", target.to_str().unwrap()]).env_remove("NO_COLOR").output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains('\x1b'), "colour codes on a pipe: {err:?}");
    let failed: Vec<&str> = err.lines().filter_map(|l| l.strip_prefix("error: ")).collect();
    assert!(!failed.is_empty(), "{err}");
    for f in &failed {
        assert_eq!(err.matches(f).count(), 1, "printed more than once: {f}\n{err}");
    }
    // Nothing but the failed files (and no log lines) on standard error.
    assert_eq!(err.lines().count(), failed.len(), "{err}");

    // An error that ends a command is printed once too.
    let mut bad = Hoard::new(h.repo.clone());
    bad.password = "not the password".into();
    let out = bad.expect(&["snapshots"], 12);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("hoard: wrong password"), "{err}");
}

/// Counts read right: `1 snapshot`, `removed 1 snapshot`, `checked 1 snapshot`.
#[test]
fn counts_of_one_are_singular() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    h.backup_json(&[src.to_str().unwrap()], 0);
    assert!(stdout(&h.ok(&["snapshots"])).ends_with("\n1 snapshot\n"), "{}", stdout(&h.ok(&["snapshots"])));
    std::fs::write(src.join("g"), "y").unwrap();
    h.backup_json(&[src.to_str().unwrap()], 0);
    assert!(stdout(&h.ok(&["snapshots"])).ends_with("\n2 snapshots\n"));
    assert!(stdout(&h.ok(&["forget", "--keep-last", "1", "--dry-run"])).ends_with("\nwould remove 1 snapshot\n"));
    assert!(stdout(&h.ok(&["forget", "--keep-last", "1"])).ends_with("\nremoved 1 snapshot\n"));
    let check = stdout(&h.ok(&["check"]));
    assert!(check.starts_with("checked 1 snapshot, "), "{check}");
    assert!(check.contains("1 directory tree is not referenced"), "{check}");
    assert_eq!(stdout(&h.ok(&["unlock"])), "removed 0 locks\n");
}

#[test]
fn key_list_has_a_header() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let out = stdout(&h.ok(&["key", "list"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["ID", "CREATED", "USER@HOST"], "{out}");
    assert!(lines[1].starts_with("* "), "{out}");
    // The columns line up under the header: the creation date under CREATED, user@host under
    // USER@HOST.
    let created = lines[0].find("CREATED").unwrap();
    assert!(lines[1][created..].starts_with("20"), "{out}");
    let user = lines[0].find("USER@HOST").unwrap();
    assert!(lines[1][user..].contains('@') && !lines[1][user..].starts_with(' '), "{out}");
}

/// `ls -l` shows what `ls -l` would: set-id and sticky bits, devices by major and minor, and
/// names with newlines or bytes that are not UTF-8 escaped as `ls -b` does, one entry a line.
#[test]
fn ls_long_shows_special_bits_devices_and_escaped_names() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(src.join("shared")).unwrap();
    let set_mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    for (name, mode) in [("suid", 0o4755), ("sgid-no-x", 0o2644)] {
        std::fs::write(src.join(name), "x").unwrap();
        set_mode(&src.join(name), mode);
    }
    set_mode(&src.join("shared"), 0o1777);
    std::fs::write(src.join(std::ffi::OsStr::from_bytes(b"caf\xe9")), "x").unwrap();
    std::fs::write(src.join("two\nlines"), "x").unwrap();
    let device = std::process::Command::new("mknod")
        .arg(src.join("null"))
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    h.backup_json(&[src.to_str().unwrap()], 0);
    let out = stdout(&h.ok(&["ls", "-l", "latest"]));
    let line = |suffix: &str| -> &str {
        out.lines().find(|l| l.ends_with(suffix)).unwrap_or_else(|| panic!("no line ending {suffix:?} in:\n{out}"))
    };
    assert!(line(" /data/suid").starts_with("-rwsr-xr-x "), "{out}");
    assert!(line(" /data/sgid-no-x").starts_with("-rw-r-Sr-- "), "{out}");
    assert!(line(" /data/shared").starts_with("drwxrwxrwt "), "{out}");
    assert!(line(" /data/caf\\351").starts_with("-rw"), "{out}");
    assert!(line(" /data/two\\nlines").starts_with("-rw"), "{out}");
    assert!(!out.contains('\u{fffd}'), "{out}");
    if device {
        let l = line(" /data/null");
        assert!(l.starts_with("crw"), "{out}");
        assert!(l.contains(" 1, 3 "), "{out}");
    }
    // One line per entry: the newline in a name does not split it.
    let entries = 5 + usize::from(device);
    assert_eq!(out.lines().count(), entries, "{out}");
    let short = stdout(&h.ok(&["ls", "latest"]));
    assert_eq!(short.lines().count(), entries, "{short}");
    assert!(short.lines().any(|l| l == "/data/two\\nlines"), "{short}");
}

/// Each component of `snapshots --json` reports its own new blobs, new bytes, warnings and
/// duration; together they are the snapshot's.
#[test]
fn snapshots_json_reports_each_components_own_new_data() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(a.join("one"), hoard_testkit::random_bytes(300_000, 1)).unwrap();
    std::fs::write(b.join("two"), hoard_testkit::random_bytes(700_000, 2)).unwrap();
    std::fs::write(b.join("three"), hoard_testkit::random_bytes(50_000, 3)).unwrap();
    h.backup_json(&[a.to_str().unwrap(), b.to_str().unwrap()], 0);
    let v: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    let snap = &v[0];
    let comps = snap["components"].as_array().unwrap();
    assert_eq!(comps.len(), 2, "{snap}");
    let stat = |c: &serde_json::Value, k: &str| c["stats"][k].as_u64().unwrap();
    let (ca, cb) = (&comps[0], &comps[1]);
    assert_eq!(ca["name"], "a");
    // Every byte was new: each component's new bytes are its file data plus its trees.
    assert!((300_000..310_000).contains(&stat(ca, "bytes_new")), "{ca}");
    assert!((750_000..760_000).contains(&stat(cb, "bytes_new")), "{cb}");
    assert!(stat(ca, "blobs_new") >= 2 && stat(cb, "blobs_new") >= 3, "{comps:?}");
    for k in ["blobs_new", "bytes_new", "warnings"] {
        assert_eq!(stat(ca, k) + stat(cb, k), snap["summary"][k].as_u64().unwrap(), "{k}: {snap}");
    }
    // Random data does not compress: each component stores its new bytes and a seal per blob.
    for c in [ca, cb] {
        let (new, stored) = (stat(c, "bytes_new"), stat(c, "bytes_stored"));
        assert!(stored > new * 99 / 100 && stored < new + 100 * stat(c, "blobs_new"), "{c}");
    }
    // The summary's stored bytes are whole packs: the components' blobs and pack headers.
    let parts = stat(ca, "bytes_stored") + stat(cb, "bytes_stored");
    let whole = snap["summary"]["bytes_stored"].as_u64().unwrap();
    assert!(parts < whole && whole - parts < 4096, "{snap}");
    for c in comps {
        assert!(stat(c, "duration_ms") <= snap["summary"]["duration_ms"].as_u64().unwrap(), "{snap}");
    }
    // The same data again is not new in either component.
    h.backup_json(&[a.to_str().unwrap(), b.to_str().unwrap(), "--force"], 0);
    let v: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "snapshots"]).stdout).unwrap();
    for c in v[1]["components"].as_array().unwrap() {
        assert_eq!(stat(c, "blobs_new"), 0, "{c}");
        assert_eq!(stat(c, "bytes_stored"), 0, "{c}");
    }
}

/// With standard error closed too, a command that logs a warning (a damaged index file it
/// skips) still ends normally instead of panicking over the message it cannot write.
#[test]
fn a_closed_standard_error_is_no_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let h = repo_with_files(tmp.path(), 10);
    let index = files_under(&tmp.path().join("repo"), "index");
    let victim = index.iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(victim, bytes).unwrap();
    let warned = h.run(&["--no-cache", "stats"]);
    assert!(stderr(&warned).contains("skipping damaged index/"), "{}", stderr(&warned));
    let mut child = h.cmd(&["--no-cache", "stats"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// `forget --prune` leaves the trees of a forgotten snapshot that share a pack with trees still
/// referenced (an unchanged subdirectory's): prune keeps such a pack while unused space stays
/// within `--max-unused`. `check` says so instead of blaming a forget without prune.
#[test]
fn check_after_forget_prune_explains_trees_kept_in_used_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hoard::new(tmp.path().join("repo").to_str().unwrap());
    h.init();
    let src = tmp.path().join("data");
    std::fs::create_dir_all(src.join("same")).unwrap();
    std::fs::create_dir_all(src.join("changes")).unwrap();
    std::fs::write(src.join("same/big"), hoard_testkit::random_bytes(300_000, 4)).unwrap();
    std::fs::write(src.join("changes/x"), "a").unwrap();
    h.backup_json(&[src.to_str().unwrap()], 0);
    std::fs::write(src.join("changes/x"), "b").unwrap();
    h.backup_json(&[src.to_str().unwrap()], 0);
    h.ok(&["forget", "--keep-last", "1", "--prune"]);

    // The first snapshot's root and `changes` trees, in the pack that also holds `same`'s.
    let report: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "check"]).stdout).unwrap();
    assert_eq!(report["unreferenced_trees"], 2, "{report}");
    assert_eq!(report["unreferenced_trees_in_used_packs"], 2, "{report}");
    let text = stdout(&h.ok(&["check"]));
    assert!(
        text.contains("2 directory trees not referenced by any snapshot are kept in packs that hold referenced data"),
        "{text}"
    );
    assert!(!text.contains("forgotten without prune"), "{text}");

    // A prune that tolerates no unused space repacks that pack; nothing is left to report.
    h.ok(&["prune", "--max-unused", "0%"]);
    let report: serde_json::Value = serde_json::from_slice(&h.ok(&["--json", "check"]).stdout).unwrap();
    assert_eq!(report["unreferenced_trees"], 0, "{report}");
    let text = stdout(&h.ok(&["check"]));
    assert!(!text.contains("not referenced"), "{text}");
}
