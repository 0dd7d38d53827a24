//! Repository verbs shared by `hoard` and `kubectl hoard repo`: both open a [`Repository`] their
//! own way (flags and environment, or the cluster's Repository, BackupStorage and Secrets) and
//! then run exactly these functions, which print the result and return the exit code.

use crate::{errln, outln};
use std::sync::Arc;

use anyhow::{anyhow, bail};
use hoard_core::Repository;

use crate::output::{count, is_are, print_json};

/// `--overwrite` of `hoard restore` and `kubectl hoard restore`: one policy for both (see
/// hoard-core's `restore::Overwrite`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverwriteArg {
    Never,
    IfChanged,
    IfNewer,
    Always,
}

impl From<OverwriteArg> for hoard_core::restore::Overwrite {
    fn from(p: OverwriteArg) -> Self {
        match p {
            OverwriteArg::Never => Self::Never,
            OverwriteArg::IfChanged => Self::IfChanged,
            OverwriteArg::IfNewer => Self::IfNewer,
            OverwriteArg::Always => Self::Always,
        }
    }
}

impl From<OverwriteArg> for hoard_api::crd::OverwritePolicy {
    fn from(p: OverwriteArg) -> Self {
        match p {
            OverwriteArg::Never => Self::Never,
            OverwriteArg::IfChanged => Self::IfChanged,
            OverwriteArg::IfNewer => Self::IfNewer,
            OverwriteArg::Always => Self::Always,
        }
    }
}

/// `10%` → 0.1.
pub fn parse_percent(s: &str) -> anyhow::Result<f64> {
    let v: f64 = s.trim().trim_end_matches('%').parse().map_err(|_| anyhow!("{s:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&v) {
        bail!("{s:?} must be between 0% and 100%");
    }
    Ok(v / 100.0)
}

/// Verifies the repository's structure and, per `read_data` / `subset`, its data. Prints the
/// report (JSON with `json`); returns 0 when no errors were found and 1 otherwise.
pub async fn check(repo: Arc<Repository>, read_data: bool, subset: Option<&str>, json: bool) -> anyhow::Result<u8> {
    let fraction = match (read_data, subset) {
        (true, _) => 1.0,
        (false, Some(s)) => parse_percent(s)?,
        _ => 0.0,
    };
    let opts = hoard_core::check::CheckOptions { read_data_fraction: fraction, concurrency: 4 };
    let report = hoard_core::check::check(repo, opts).await?;
    if json {
        print_json(&serde_json::to_value(&report)?);
    } else {
        outln!(
            "checked {}, {}, {} ({} read, {} verified)",
            count(report.snapshots, "snapshot"),
            count(report.trees, "tree"),
            count(report.packs, "pack"),
            report.packs_read,
            count(report.blobs_read, "blob")
        );
        if !report.unreferenced_packs.is_empty() {
            outln!(
                "{} {} not referenced by any index (left by interrupted runs; `hoard prune` removes them)",
                count(report.unreferenced_packs.len(), "pack"),
                is_are(report.unreferenced_packs.len())
            );
        }
        if report.stale_locks > 0 {
            outln!(
                "{} of {} locks are stale: left by a process that died or was killed (`hoard unlock` removes them)",
                report.stale_locks,
                report.locks
            );
        }
        // Trees in packs that hold referenced data are what prune leaves by design; only the
        // rest point at a forget without prune, or a deleted snapshot.
        let alone = report.unreferenced_trees.saturating_sub(report.unreferenced_trees_in_used_packs);
        if alone > 0 {
            outln!(
                "{} {} not referenced by any snapshot (a snapshot was forgotten without prune, or deleted)",
                count(alone, "directory tree"),
                is_are(alone)
            );
        }
        if report.unreferenced_trees_in_used_packs > 0 {
            outln!(
                "{} not referenced by any snapshot {} kept in packs that hold referenced data (expected: \
                 prune repacks such packs only when unused space exceeds --max-unused)",
                count(report.unreferenced_trees_in_used_packs, "directory tree"),
                is_are(report.unreferenced_trees_in_used_packs)
            );
        }
        for e in &report.errors {
            errln!("error: {}: {}", e.object, e.message);
        }
        for (snap, paths) in &report.affected {
            errln!("snapshot {} is affected:", snap.get(..8).unwrap_or(snap));
            for p in paths {
                errln!("  {p}");
            }
        }
        if let Some(s) = &report.suggestion {
            errln!("suggestion: {s}");
        }
        if report.is_ok() {
            outln!("no errors were found");
        }
    }
    Ok(if report.is_ok() { 0 } else { 1 })
}

/// Removes stale locks (every lock with `remove_all`).
pub async fn unlock(repo: &Repository, remove_all: bool, json: bool) -> anyhow::Result<u8> {
    let n = hoard_core::lock::unlock(repo, remove_all).await?;
    if json {
        print_json(&serde_json::json!({"removed_locks": n}));
    } else {
        outln!("removed {}", count(n, "lock"));
    }
    Ok(0)
}

/// Lists the key slots under a header; `*` marks the one that opened the repository. Never
/// prints key material.
pub async fn key_list(repo: &Repository, json: bool) -> anyhow::Result<u8> {
    let keys = repo.list_keys().await?;
    let rows: Vec<serde_json::Value> = keys
        .iter()
        .map(|(id, slot)| match slot {
            Ok(s) => serde_json::json!({"id": id.to_hex(), "current": *id == repo.key_id(), "created": s.created, "host": s.hostname, "user": s.username}),
            Err(e) => serde_json::json!({"id": id.to_hex(), "current": false, "error": e.to_string()}),
        })
        .collect();
    if json {
        print_json(&serde_json::Value::Array(rows));
    } else {
        outln!("  {:<8}  {:<20}  USER@HOST", "ID", "CREATED");
        for (r, (_, slot)) in rows.iter().zip(&keys) {
            let id = r["id"].as_str().unwrap_or_default();
            let line = match slot {
                Ok(s) => format!(
                    "{:<20}  {}@{}",
                    s.created.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S"),
                    s.username,
                    s.hostname
                ),
                // An unreadable slot is listed with why, so it can be removed by its id.
                Err(e) => format!("{:<20}  {e}", "-"),
            };
            outln!(
                "{} {:<8}  {}",
                if r["current"] == true { "*" } else { " " },
                id.get(..8).unwrap_or(id),
                line.trim_end()
            );
        }
    }
    Ok(0)
}
