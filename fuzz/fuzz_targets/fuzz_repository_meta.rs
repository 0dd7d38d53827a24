//! The controller's repository metadata object (`hoard-meta/repositories.json`,
//! `hoard_controller::storage::Meta::decode`): unauthenticated bytes in the bucket that
//! repository sync acts on, and the tenancy rules sync applies to each entry
//! (`confine_path`, `paths_overlap`, `Meta::overlapping`).
//!
//! Invariants: no panic; an accepted object re-encodes to JSON that decodes to the same value;
//! a path `confine_path` accepts has no empty, `.` or `..` segment, does not start in
//! `hoard-meta/`, and lies under the entry's namespace when that is not the storage's;
//! `paths_overlap` is symmetric and true for equal paths.
#![no_main]

use hoard_controller::storage::{Meta, RESERVED_DIR, confine_path, paths_overlap};
use libfuzzer_sys::fuzz_target;

const STORAGE_NS: &str = "owner";

fuzz_target!(|data: &[u8]| {
    let Ok(meta) = Meta::decode(data) else { return };
    let json = serde_json::to_vec(&meta).expect("encode");
    assert_eq!(Meta::decode(&json).expect("re-encoded metadata decodes"), meta);
    for entry in meta.repositories.iter().take(64) {
        if let Ok(path) = confine_path(&entry.path, &entry.namespace, STORAGE_NS) {
            let segments: Vec<&str> = path.split('/').collect();
            assert!(segments.iter().all(|s| !s.is_empty() && *s != "." && *s != ".."), "{path:?}");
            assert_ne!(segments[0], RESERVED_DIR, "{path:?}");
            if entry.namespace != STORAGE_NS {
                assert!(segments.len() >= 2 && segments[0] == entry.namespace, "{path:?} for {:?}", entry.namespace);
            }
        }
        assert!(paths_overlap(&entry.path, &entry.path), "{:?} does not overlap itself", entry.path);
        for other in meta.repositories.iter().take(64) {
            assert_eq!(paths_overlap(&entry.path, &other.path), paths_overlap(&other.path, &entry.path));
        }
        let _ = meta.overlapping(&entry.namespace, &entry.name, &entry.path);
    }
});
