//! Snapshots: one logical state of an application, stored as sealed JSON in `snapshots/<id>`
//! (id = BLAKE3 of the stored bytes). A snapshot is written only after every blob it names is
//! indexed, so a listed snapshot is always complete.
//!
//! Decoding validates what restore relies on: every component name is one safe path component
//! ([`crate::tree::valid_name`]: not empty, `.`, `..`, no `/` or NUL) and names are unique, so a
//! component restored into `target/<name>` stays inside the target. Encoding refuses the same
//! snapshots, so a writer never stores what a reader would refuse.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::{Keys, SealType};
use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;

/// Largest snapshot file a reader accepts.
pub const MAX_SNAPSHOT_LEN: usize = 16 * 1024 * 1024;

/// Whether `name` can name a component: one safe path component (restore creates `target/<name>`).
pub fn valid_component_name(name: &str) -> bool {
    crate::tree::valid_name(name.as_bytes())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentKind {
    /// A directory tree read from a filesystem.
    Tree,
    /// A byte stream (e.g. a database dump); its root tree holds one file named like the component.
    Stream,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub kind: ComponentKind,
    pub root: Id,
    /// Where the data came from, for display (a path, `stdin`, a volume identity).
    #[serde(default)]
    pub source: String,
    /// What backing up this component did. Its `bytes_stored` is the sealed size of its new
    /// blobs; the summary's also counts pack headers, so it is a little more than the sum.
    #[serde(default)]
    pub stats: Summary,
    /// The directory the component was read from (mode, owner, times, extended attributes;
    /// its name is empty), which a restore applies to the directory it restores into. Absent
    /// for streams, single files, and snapshots written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_node: Option<crate::tree::Node>,
}

/// What a backup did; stored in the snapshot and printed at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub dirs: u64,
    pub other_entries: u64,
    /// Bytes of file content in the snapshot.
    pub total_bytes: u64,
    /// Bytes actually read from disk.
    pub bytes_read: u64,
    pub blobs_new: u64,
    /// Plaintext bytes of new blobs.
    pub bytes_new: u64,
    /// Bytes uploaded in packs.
    pub bytes_stored: u64,
    pub warnings: u64,
    pub duration_ms: u64,
}

impl Summary {
    pub fn add(&mut self, o: &Summary) {
        self.files_new += o.files_new;
        self.files_changed += o.files_changed;
        self.files_unmodified += o.files_unmodified;
        self.dirs += o.dirs;
        self.other_entries += o.other_entries;
        self.total_bytes += o.total_bytes;
        self.bytes_read += o.bytes_read;
        self.blobs_new += o.blobs_new;
        self.bytes_new += o.bytes_new;
        self.bytes_stored += o.bytes_stored;
        self.warnings += o.warnings;
        self.duration_ms = self.duration_ms.max(o.duration_ms);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub time: DateTime<Utc>,
    pub host: String,
    pub username: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Free-form provenance: the controller records namespace, workload, PVC and session here.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub parent: Option<Id>,
    pub components: Vec<Component>,
    #[serde(default)]
    pub summary: Summary,
    /// Warnings met while backing up (unreadable or changing files); capped in length.
    #[serde(default)]
    pub warnings: Vec<String>,
    pub program_version: String,
}

impl Snapshot {
    pub fn encode(&self, keys: &Keys) -> Result<Vec<u8>> {
        self.validate().map_err(|r| Error::InvalidArgument(format!("snapshot: {r}")))?;
        let plain = serde_json::to_vec(self).map_err(|e| Error::Internal(format!("encode snapshot: {e}")))?;
        keys.seal_meta(SealType::Snapshot, &plain)
    }

    pub fn decode(keys: &Keys, name: &str, sealed: &[u8]) -> Result<Snapshot> {
        if sealed.len() > MAX_SNAPSHOT_LEN {
            return Err(Error::corrupt(ObjectKind::Snapshot, name, "too large"));
        }
        let plain = keys.open_meta(SealType::Snapshot, ObjectKind::Snapshot, name, sealed)?;
        let snap: Snapshot = serde_json::from_slice(&plain)
            .map_err(|e| Error::corrupt(ObjectKind::Snapshot, name, format!("undecodable: {e}")))?;
        snap.validate().map_err(|r| Error::corrupt(ObjectKind::Snapshot, name, r))?;
        Ok(snap)
    }

    /// Checks that every component name is one safe path component and that names are unique.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for c in &self.components {
            if !valid_component_name(&c.name) {
                return Err(format!("unsafe component name {:?}", c.name));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(format!("component name {:?} is duplicated", c.name));
            }
        }
        Ok(())
    }

    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    fn snap(names: &[&str]) -> Snapshot {
        Snapshot {
            time: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            host: "h".into(),
            username: "u".into(),
            tags: Vec::new(),
            labels: BTreeMap::new(),
            parent: None,
            components: names
                .iter()
                .map(|n| Component {
                    name: n.to_string(),
                    kind: ComponentKind::Tree,
                    root: Id::default(),
                    source: String::new(),
                    stats: Summary::default(),
                    root_node: None,
                })
                .collect(),
            summary: Summary::default(),
            warnings: Vec::new(),
            program_version: "t".into(),
        }
    }

    /// Seals the JSON without the encoder's checks, as an attacker holding the key could.
    fn seal_raw(keys: &Keys, s: &Snapshot) -> Vec<u8> {
        keys.seal_meta(SealType::Snapshot, &serde_json::to_vec(s).unwrap_or_default()).unwrap_or_default()
    }

    #[test]
    fn hostile_component_names_are_refused_on_decode_and_encode() {
        let keys = Keys::from_master(SecretKey::random());
        for bad in [&["..", "ok"][..], &["/etc"], &["a/b"], &["."], &[""], &["nul\0"], &["dup", "dup"]] {
            let s = snap(bad);
            let e = Snapshot::decode(&keys, "snapshots/x", &seal_raw(&keys, &s)).expect_err("hostile accepted");
            assert!(matches!(e, Error::Corrupt { kind: ObjectKind::Snapshot, .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("component name"), "{e}");
            assert!(matches!(s.encode(&keys), Err(Error::InvalidArgument(_))), "{bad:?} encoded");
        }
        let good = snap(&["data", "db.sql", ".hidden", "..x"]);
        let enc = good.encode(&keys).unwrap_or_default();
        assert_eq!(Snapshot::decode(&keys, "snapshots/x", &enc).ok(), Some(good));
    }
}
