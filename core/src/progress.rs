//! Live progress counters, updated by pipelines and read by whoever renders them.
//!
//! All counters are relaxed atomics: readers see a recent, not necessarily consistent, picture.
//! Recent warnings are kept in a small ring (the last [`RECENT_WARNINGS`], each cut to
//! [`MAX_WARNING_LEN`] bytes); they are the pipelines' own messages (paths and I/O errors), which
//! never contain repository credentials.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Progress {
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    /// What the whole job will count, meaningful once `totals_known` is set: found by a
    /// backup's metadata scan, taken from the parent snapshot (then `totals_estimated` is set
    /// too), or, for a restore, from the snapshot.
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub totals_known: AtomicBool,
    /// The totals are the parent snapshot's: the data may have grown or shrunk since.
    pub totals_estimated: AtomicBool,
    /// Bytes stored in packs so far (live during a backup).
    pub bytes_stored: AtomicU64,
    pub warnings: AtomicU64,
    /// Reader stage: file bytes read (files whose metadata matched the parent are not read).
    pub bytes_read: AtomicU64,
    /// The part of `bytes_read` read through io_uring.
    pub bytes_read_io_uring: AtomicU64,
    /// Small files brought into the page cache in batches through io_uring before they were
    /// read ([`crate::uring::SmallFilePrefetch`]); their bytes count in `bytes_read` once.
    pub files_prefetched: AtomicU64,
    /// The part of `bytes_read` read ahead of the chunker (large files read directly through
    /// io_uring, while the segment before was cut).
    pub bytes_read_ahead: AtomicU64,
    /// Chunk-and-hash stage: bytes cut into chunks and hashed.
    pub bytes_chunked: AtomicU64,
    /// The part of `bytes_chunked` in chunks a changed file's previous version had at the same
    /// offset with the same bytes, taken on their hash without a boundary search.
    pub bytes_cut_as_before: AtomicU64,
    current: Mutex<String>,
    recent: Mutex<VecDeque<String>>,
}

/// Warnings kept for live display.
pub const RECENT_WARNINGS: usize = 5;
/// Longest warning kept for live display, in bytes.
pub const MAX_WARNING_LEN: usize = 300;

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProgressSnapshot {
    pub files_done: u64,
    pub bytes_done: u64,
    pub files_total: Option<u64>,
    pub bytes_total: Option<u64>,
    /// The totals are the parent snapshot's, not counted for this job.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub totals_estimated: bool,
    pub bytes_stored: u64,
    pub warnings: u64,
    pub current: String,
    /// The last few warnings, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recent_warnings: Vec<String>,
}

impl Progress {
    pub fn add_files(&self, n: u64) {
        self.files_done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_current(&self, s: &str) {
        if let Ok(mut c) = self.current.try_lock() {
            c.clear();
            c.push_str(s);
        }
    }

    /// Counts a warning and keeps its message among the recent ones.
    pub fn add_warning(&self, msg: &str) {
        self.warnings.fetch_add(1, Ordering::Relaxed);
        let mut cut = msg.len().min(MAX_WARNING_LEN);
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() == RECENT_WARNINGS {
            r.pop_front();
        }
        r.push_back(msg[..cut].to_string());
    }

    pub fn recent_warnings(&self) -> Vec<String> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let known = self.totals_known.load(Ordering::Relaxed);
        ProgressSnapshot {
            files_done: self.files_done.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            files_total: known.then(|| self.files_total.load(Ordering::Relaxed)),
            bytes_total: known.then(|| self.bytes_total.load(Ordering::Relaxed)),
            totals_estimated: known && self.totals_estimated.load(Ordering::Relaxed),
            bytes_stored: self.bytes_stored.load(Ordering::Relaxed),
            warnings: self.warnings.load(Ordering::Relaxed),
            current: self.current.lock().map(|c| c.clone()).unwrap_or_default(),
            recent_warnings: self.recent_warnings(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_warnings_keep_the_last_few_cut_short() {
        let p = Progress::default();
        for i in 0..8 {
            p.add_warning(&format!("w{i}"));
        }
        p.add_warning(&"é".repeat(400));
        let r = p.snapshot().recent_warnings;
        assert_eq!(r.len(), RECENT_WARNINGS);
        assert_eq!(r[0], "w4");
        assert!(r[4].len() <= MAX_WARNING_LEN && r[4].starts_with('é'));
        assert_eq!(p.warnings.load(Ordering::Relaxed), 9);
    }
}
