//! Durable records of completed orders (`--state-dir`), so that an order re-sent after the
//! agent restarted gets the result of its first run instead of running again (a restore would
//! otherwise find its own data in the volume and refuse it as not empty).
//!
//! Guarantees:
//! * Only orders that completed (DONE) are recorded: failed or cancelled ones run again when
//!   re-sent, as they do before a restart.
//! * A record is written atomically (temporary file, fsync, rename, fsync of the directory)
//!   before the terminal event is published: a client that saw DONE gets the same result from
//!   a restarted agent.
//! * A record holds the order id, the order's fingerprint (of its content without credentials)
//!   and the terminal event; never a secret. An unreadable or damaged record counts as absent.
//! * At most `keep` records are kept; the oldest go first.
//!
//! [`encode`] and [`decode`] are the pure record format; [`StateDir`] does the I/O.

use std::io::Write;
use std::path::{Path, PathBuf};

use hoard_api::agent::v1::Progress;
use prost::Message;

const MAGIC: &[u8] = b"hoard-agent order done v1\n";
const SUFFIX: &str = ".done";
/// Largest record read back (a terminal event with its failed-file list is far smaller).
const MAX_RECORD: u64 = 4 << 20;

/// A completed order.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub order_id: String,
    pub fingerprint: [u8; 32],
    /// The terminal event the order's first run published.
    pub last: Progress,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("damaged order record: {0}")]
    Damaged(&'static str),
}

/// The bytes of a record: magic, order id length (u16 BE) and id, fingerprint, event.
pub fn encode(r: &Record) -> Vec<u8> {
    let id = r.order_id.as_bytes();
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + id.len() + 32 + r.last.encoded_len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(id.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(&id[..id.len().min(u16::MAX as usize)]);
    out.extend_from_slice(&r.fingerprint);
    r.last.encode(&mut out).unwrap_or_default();
    out
}

/// Parses [`encode`]'s output.
pub fn decode(b: &[u8]) -> Result<Record, StateError> {
    let b = b.strip_prefix(MAGIC).ok_or(StateError::Damaged("not an order record"))?;
    let (len, b) = b.split_first_chunk::<2>().ok_or(StateError::Damaged("truncated"))?;
    let len = u16::from_be_bytes(*len) as usize;
    if b.len() < len + 32 {
        return Err(StateError::Damaged("truncated"));
    }
    let order_id = std::str::from_utf8(&b[..len]).map_err(|_| StateError::Damaged("order id"))?.to_string();
    let fingerprint: [u8; 32] = b[len..len + 32].try_into().map_err(|_| StateError::Damaged("truncated"))?;
    let last = Progress::decode(&b[len + 32..]).map_err(|_| StateError::Damaged("event"))?;
    Ok(Record { order_id, fingerprint, last })
}

/// File name of an order's record: a hash, since order ids may hold `/` and `:`.
pub fn file_name(order_id: &str) -> String {
    format!("{}{SUFFIX}", blake3::hash(order_id.as_bytes()).to_hex())
}

/// The directory holding the records.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    keep: usize,
}

impl StateDir {
    /// Opens (creating it, mode 0700) the state directory.
    pub fn open(dir: &Path, keep: usize) -> Result<StateDir, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        let io = |source| StateError::Io { path: dir.to_path_buf(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        // Fails early (at startup, not after an order ran) when the directory is not writable.
        let probe = dir.join(".probe");
        std::fs::write(&probe, b"").and_then(|_| std::fs::remove_file(&probe)).map_err(io)?;
        Ok(StateDir { dir: dir.to_path_buf(), keep: keep.max(1) })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The record of `order_id`, if one was written and is intact.
    pub fn load(&self, order_id: &str) -> Option<Record> {
        use std::io::Read;
        let path = self.dir.join(file_name(order_id));
        let f = std::fs::File::open(&path).ok()?;
        let mut buf = Vec::new();
        if let Err(e) = f.take(MAX_RECORD).read_to_end(&mut buf) {
            tracing::warn!(path = %path.display(), "cannot read order record: {e}");
            return None;
        }
        match decode(&buf) {
            Ok(r) if r.order_id == order_id => Some(r),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring order record: {e}");
                None
            }
        }
    }

    /// Writes `r` durably, then removes the oldest records beyond the limit.
    pub fn store(&self, r: &Record) -> Result<(), StateError> {
        let name = file_name(&r.order_id);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let io = |source| StateError::Io { path: path.clone(), source };
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&encode(r)).and_then(|_| f.sync_all()).map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        self.prune();
        Ok(())
    }

    /// Removes the oldest records beyond `keep` (by modification time).
    fn prune(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        let mut records: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(SUFFIX))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if records.len() <= self.keep {
            return;
        }
        records.sort();
        for (_, p) in &records[..records.len() - self.keep] {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_api::agent::v1::{Phase, Result as OrderResult};

    fn record(id: &str) -> Record {
        Record {
            order_id: id.into(),
            fingerprint: [7; 32],
            last: Progress {
                order_id: id.into(),
                phase: Phase::Done as i32,
                files_done: 12,
                result: Some(OrderResult { snapshot_id: "ab".repeat(32), ..Default::default() }),
                ..Default::default()
            },
        }
    }

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let r = record("ns/restore:1");
        let b = encode(&r);
        assert_eq!(decode(&b).unwrap(), r);
        for cut in [0, 5, MAGIC.len() + 1, MAGIC.len() + 2 + 4, MAGIC.len() + 2 + 12 + 31] {
            assert!(decode(&b[..cut]).is_err(), "truncated at {cut} accepted");
        }
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(decode(&bad).is_err());
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 1] = 0xff;
        assert!(decode(&bad).is_err() || decode(&bad).unwrap() != r);
        assert_ne!(file_name("a/b"), file_name("a:b"));
        assert!(!file_name("../x").contains('/'));
    }

    #[test]
    fn stores_loads_and_keeps_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let s = StateDir::open(&tmp.path().join("state"), 3).unwrap();
        assert!(s.load("o-1").is_none());
        for i in 0..5 {
            s.store(&record(&format!("o-{i}"))).unwrap();
            // Distinct modification times for the pruning order.
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
        assert_eq!(s.load("o-4").unwrap(), record("o-4"));
        assert!(s.load("o-0").is_none() && s.load("o-1").is_none(), "oldest not pruned");
        assert!(s.load("o-2").is_some());
        // A damaged record is ignored, not trusted.
        std::fs::write(tmp.path().join("state").join(file_name("o-3")), b"garbage").unwrap();
        assert!(s.load("o-3").is_none());
        // Reopened (a restarted agent): the same records.
        let again = StateDir::open(&tmp.path().join("state"), 3).unwrap();
        assert_eq!(again.load("o-4").unwrap(), record("o-4"));
    }
}
