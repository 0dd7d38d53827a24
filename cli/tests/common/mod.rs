//! Helpers for running the real `hoard` binary against real repositories.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const PASSWORD: &str = "correct horse battery staple";

#[derive(Debug)]
pub struct Hoard {
    pub repo: String,
    pub password: String,
    pub envs: Vec<(String, String)>,
}

impl Hoard {
    pub fn new(repo: impl Into<String>) -> Self {
        Hoard { repo: repo.into(), password: PASSWORD.into(), envs: Vec::new() }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hoard"));
        c.arg("--repo").arg(&self.repo).args(args);
        c.env("HOARD_PASSWORD", &self.password).env_remove("HOARD_PASSWORD_FILE").env_remove("HOARD_REPOSITORY");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        if std::env::var("HOARD_TEST_VERBOSE").is_ok() {
            eprintln!(
                "$ hoard {args:?}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// Runs and requires the given exit code.
    pub fn expect(&self, args: &[&str], code: i32) -> Output {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "hoard {args:?} exited {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn ok(&self, args: &[&str]) -> Output {
        self.expect(args, 0)
    }

    /// `init` with cheap key derivation so tests stay fast.
    pub fn init(&self) {
        self.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1", "--insecure-kdf"]);
    }

    /// Runs `backup --json` and returns the summary document.
    pub fn backup_json(&self, args: &[&str], code: i32) -> serde_json::Value {
        let mut a = vec!["--json", "backup"];
        a.extend_from_slice(args);
        let out = self.expect(&a, code);
        last_json(&out, "summary")
    }
}

pub fn last_json(out: &Output, message_type: &str) -> serde_json::Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message_type"] == message_type)
        .unwrap_or_else(|| panic!("no {message_type} line in {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// All files below a directory with their sizes (a repository's objects).
pub fn list_files(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.len()));
            }
        }
    }
    out.sort();
    out
}

/// Flips a byte a third into the largest pack of the local repository at `repo`: one blob of
/// it is damaged, the pack's other blobs stay intact.
pub fn flip_a_byte_in_the_largest_pack(repo: &Path) {
    let mut packs = list_files(&repo.join("packs"));
    packs.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let (victim, len) = packs[0].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[(len / 3) as usize] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();
}

pub fn files_under(root: &Path, sub: &str) -> Vec<PathBuf> {
    list_files(&root.join(sub)).into_iter().map(|(p, _)| p).collect()
}
