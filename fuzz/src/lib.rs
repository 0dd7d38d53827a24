//! Helpers shared by the fuzz targets and `gen_corpus`: fixed keys, the plaintext pack-header
//! encoder (hoard-core only has the sealing one, `PackBuilder::finish`), the input layouts of the
//! targets that take more than one argument, and the seed objects.
//!
//! Nothing here is used by hoard itself.

use std::collections::BTreeMap;

use hoard_core::crypto::{KdfParams, KeySlot, Keys, SEAL_OVERHEAD, SealType, SecretKey};
use hoard_core::id::Id;
use hoard_core::index::{IndexBlob, IndexFile, IndexPack};
use hoard_core::pack::{BlobType, Compression, PackEntry};
use hoard_core::snapshot::{Component, ComponentKind, Snapshot, Summary};
use hoard_core::tree::{Extent, Node, NodeKind, Timestamp, Tree};

/// The targets over hoard-core alone.
pub const CORE_TARGETS: [&str; 9] = [
    "fuzz_pack_header",
    "fuzz_index",
    "fuzz_tree",
    "fuzz_snapshot",
    "fuzz_key_slot",
    "fuzz_open_sealed",
    "fuzz_config",
    "fuzz_unseal_blob",
    "fuzz_lock",
];
/// The targets of the `k8s` feature (the agent's and the controller's decoders).
pub const K8S_TARGETS: [&str; 3] = ["fuzz_agent_state", "fuzz_vol_data", "fuzz_repository_meta"];

/// Every target this build has.
pub fn targets() -> Vec<&'static str> {
    let mut all = CORE_TARGETS.to_vec();
    if cfg!(feature = "k8s") {
        all.extend(K8S_TARGETS);
    }
    all
}

/// The master key every target opens with.
pub const MASTER: [u8; 32] = [7u8; 32];
/// A different key; seeds for `fuzz_open_sealed` are sealed under it so they are well-formed
/// objects that must still never open under [`MASTER`].
pub const OTHER_MASTER: [u8; 32] = [8u8; 32];

pub fn keys() -> Keys {
    Keys::from_master(SecretKey(MASTER))
}

/// `fuzz_pack_header` input: `data_len (u64 LE) ‖ trailer (4) ‖ plaintext header`.
pub const PACK_PREFIX: usize = 12;

/// `fuzz_open_sealed` input: `selector (1) ‖ blob id (32) ‖ sealed bytes`.
pub const OPEN_PREFIX: usize = 33;

/// Every seal type, for selectors taken from fuzz input.
pub const SEAL_TYPES: [SealType; 8] = [
    SealType::DataBlob,
    SealType::TreeBlob,
    SealType::PackHeader,
    SealType::Index,
    SealType::Snapshot,
    SealType::Config,
    SealType::Lock,
    SealType::KeySlot,
];

/// The plaintext pack header for `entries`, byte for byte as `PackBuilder::finish` writes it
/// (docs/ and `core/src/pack.rs`: `"HPK1" ‖ count ‖ count × (type, compression, id, stored, raw)`).
pub fn encode_pack_header(entries: &[PackEntry]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + entries.len() * 42);
    h.extend_from_slice(b"HPK1");
    h.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        h.push(e.ty as u8);
        h.push(e.compression as u8);
        h.extend_from_slice(&e.id.0);
        h.extend_from_slice(&e.stored_len.to_le_bytes());
        h.extend_from_slice(&e.raw_len.to_le_bytes());
    }
    h
}

fn entry(i: u8, stored_len: u32, raw_len: u32, offset: u32) -> PackEntry {
    PackEntry {
        ty: if i % 2 == 0 { BlobType::Data } else { BlobType::Tree },
        compression: if i % 3 == 0 { Compression::Zstd } else { Compression::None },
        id: Id([i; 32]),
        offset,
        stored_len,
        raw_len,
    }
}

/// Seeds for each target, as `(file name, bytes)`. Small (a few KiB in all) and deterministic
/// except for the random nonces in sealed seeds.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    match target {
        "fuzz_pack_header" => {
            let lens = [(100u32, 72u32), (SEAL_OVERHEAD as u32, 0), (4096, 8000)];
            let mut entries = Vec::new();
            let mut off = 0u32;
            for (i, (s, r)) in lens.iter().enumerate() {
                entries.push(entry(i as u8, *s, *r, off));
                off += s;
            }
            for n in 0..=entries.len() {
                let plain = encode_pack_header(&entries[..n]);
                let data_len: u64 = entries[..n].iter().map(|e| e.stored_len as u64).sum();
                let sealed_len = (plain.len() + SEAL_OVERHEAD) as u32;
                let pack_len = data_len + sealed_len as u64 + 4;
                let mut input = pack_len.to_le_bytes().to_vec();
                input.extend_from_slice(&sealed_len.to_le_bytes());
                input.extend_from_slice(&plain);
                out.push((format!("pack-{n}"), input));
            }
        }
        "fuzz_index" => {
            for f in index_seeds() {
                out.push((format!("index-{}", out.len()), postcard::to_stdvec(&f).unwrap_or_default()));
            }
        }
        "fuzz_tree" => {
            for t in tree_seeds() {
                out.push((format!("tree-{}", out.len()), t.encode().unwrap_or_default()));
            }
        }
        "fuzz_snapshot" => {
            for s in snapshot_seeds() {
                out.push((format!("snapshot-{}", out.len()), serde_json::to_vec(&s).unwrap_or_default()));
            }
        }
        "fuzz_key_slot" => {
            for s in key_slot_seeds() {
                out.push((format!("keyslot-{}", out.len()), s.into_bytes()));
            }
        }
        "fuzz_config" => {
            let params = hoard_core::repo::RepoParams::default();
            let json = serde_json::to_vec(&params).unwrap_or_default();
            let config = hoard_core::repo::ConfigFile {
                version: hoard_core::repo::FORMAT_VERSION,
                id: Id([3; 32]),
                sealed: keys().seal_meta(SealType::Config, &json).unwrap_or_default(),
            };
            out.push(("config".into(), [&[0u8][..], &config.encode().unwrap_or_default()].concat()));
            out.push(("params".into(), [&[1u8][..], &json].concat()));
        }
        "fuzz_unseal_blob" => {
            let content = b"hello hoard, hello hoard, hello hoard".to_vec();
            let frame = zstd::bulk::compress(&content, 1).unwrap_or_default();
            for selector in 0u8..8 {
                let body = if selector & 5 == 1 { frame.clone() } else { content.clone() };
                let raw_len = content.len() as u32;
                out.push((format!("blob-{selector}"), [&[selector][..], &raw_len.to_le_bytes(), &body].concat()));
            }
        }
        "fuzz_lock" => {
            let lock = br#"{"time":"2026-12-07T12:00:00Z","exclusive":true,"host":"node-a","username":"root","pid":42,"boot_id":"b","pid_ns":4026531836,"stale_after_secs":1800}"#;
            let now = 1_796_644_800i64; // 2026-12-07T12:00:00Z + a day
            out.push(("lock".into(), [&now.to_le_bytes()[..], &1800u32.to_le_bytes(), lock].concat()));
        }
        #[cfg(feature = "k8s")]
        "fuzz_agent_state" => {
            use hoard_agent::state::{Record, encode};
            let last = hoard_api::agent::v1::Progress {
                order_id: "backup-1".into(),
                phase: hoard_api::agent::v1::Phase::Done as i32,
                ..Default::default()
            };
            let record = Record { order_id: "backup-1".into(), fingerprint: [9; 32], last };
            out.push(("record".into(), encode(&record)));
        }
        #[cfg(feature = "k8s")]
        "fuzz_vol_data" => {
            let v = br#"{"attachmentID":"csi-1","driverName":"hostpath.csi.k8s.io","nodeName":"node-a","specVolID":"pvc-1","volumeHandle":"h-1","volumeLifecycleMode":"Persistent"}"#;
            out.push(("vol_data".into(), v.to_vec()));
        }
        #[cfg(feature = "k8s")]
        "fuzz_repository_meta" => {
            let m = br#"{"version":1,"repositories":[{"name":"app","namespace":"demo","path":"demo/app","encryptionSecret":{"name":"pw"},"deletionPolicy":"WipeOut"},{"name":"own","namespace":"owner","path":"shared/x","encryptionSecret":{"name":"pw","namespace":"owner"},"appRef":{"kind":"Pod","name":"p","namespace":"owner"}}]}"#;
            out.push(("meta".into(), m.to_vec()));
        }
        "fuzz_open_sealed" => {
            let other = Keys::from_master(SecretKey(OTHER_MASTER));
            let id = other.blob_id(b"hello hoard");
            for (sel, ty) in SEAL_TYPES.iter().enumerate() {
                let mut input = vec![sel as u8];
                input.extend_from_slice(&id.0);
                match ty {
                    SealType::DataBlob | SealType::TreeBlob => other.seal_blob(*ty, &id, b"hello hoard", &mut input),
                    _ => input.extend_from_slice(&other.seal_meta(*ty, b"{\"hello\":\"hoard\"}").unwrap_or_default()),
                }
                out.push((format!("sealed-{sel}"), input));
            }
        }
        _ => {}
    }
    out
}

pub fn index_seeds() -> Vec<IndexFile> {
    let blob = |i: u8, offset: u32| IndexBlob {
        id: Id([i; 32]),
        ty: if i % 2 == 0 { BlobType::Data } else { BlobType::Tree },
        compression: if i % 3 == 0 { Compression::Zstd } else { Compression::None },
        offset,
        stored_len: 100 + i as u32,
        raw_len: 300,
    };
    vec![
        IndexFile::default(),
        IndexFile { supersedes: vec![], packs: vec![IndexPack { id: Id([1; 32]), blobs: vec![blob(2, 0)] }] },
        IndexFile {
            supersedes: vec![Id([9; 32]), Id([10; 32])],
            packs: vec![
                IndexPack { id: Id([1; 32]), blobs: vec![blob(2, 0), blob(3, 102)] },
                IndexPack { id: Id([4; 32]), blobs: vec![] },
            ],
        },
    ]
}

pub fn tree_seeds() -> Vec<Tree> {
    let mut file = Node::new(b"file.txt".to_vec(), NodeKind::File);
    file.mode = 0o644;
    file.uid = 1000;
    file.gid = 1000;
    file.size = 4096 + 10;
    file.mtime = Timestamp { sec: 1_700_000_000, nsec: 5 };
    file.content = vec![Extent::Data { id: Id([3; 32]), len: 10 }, Extent::Hole { len: 4096 }];
    file.xattrs = vec![hoard_core::tree::Xattr { name: b"user.x".to_vec(), value: b"y".to_vec() }];
    let mut dir = Node::new(b"dir".to_vec(), NodeKind::Dir);
    dir.subtree = Some(Id([4; 32]));
    let mut link = Node::new(b"link".to_vec(), NodeKind::Symlink);
    link.link_target = Some(serde_bytes::ByteBuf::from(b"../target".to_vec()));
    let mut dev = Node::new(b"null".to_vec(), NodeKind::CharDevice);
    dev.rdev = 0x0103;
    let raw = Node::new(vec![0xff, 0xfe], NodeKind::Fifo);
    let mut t = Tree { nodes: vec![file, dir, link, dev, raw, Node::new(b"sock".to_vec(), NodeKind::Socket)] };
    t.sort();
    vec![Tree::default(), t]
}

pub fn snapshot_seeds() -> Vec<Snapshot> {
    let time = "2026-05-20T16:48:58.123456789Z".parse().unwrap_or_default();
    let mut labels = BTreeMap::new();
    labels.insert("namespace".to_string(), "prod".to_string());
    let summary = Summary { files_new: 3, dirs: 1, total_bytes: 12345, duration_ms: 17, ..Summary::default() };
    vec![Snapshot {
        time,
        host: "h".into(),
        username: "u".into(),
        tags: vec!["daily".into()],
        labels,
        parent: Some(Id([5; 32])),
        components: vec![
            Component {
                name: "data".into(),
                kind: ComponentKind::Tree,
                root: Id([6; 32]),
                source: "/data".into(),
                stats: summary.clone(),
                root_node: None,
            },
            Component {
                name: "db.sql".into(),
                kind: ComponentKind::Stream,
                root: Id([7; 32]),
                source: "stdin".into(),
                stats: Summary::default(),
                root_node: None,
            },
        ],
        summary,
        warnings: vec!["x: changed while read".into()],
        program_version: "0.1.0".into(),
    }]
}

/// Key slots as JSON text (written by hand: `KeySlot::wrap` runs Argon2 and a random salt).
pub fn key_slot_seeds() -> Vec<String> {
    let slot = |version: u32, kdf: KdfParams, salt: &str, wrapped: &str| {
        format!(
            "{{\"version\":{version},\"created\":\"2026-05-20T16:48:58Z\",\"hostname\":\"h\",\"username\":\"u\",\
             \"kdf\":{{\"memory_kib\":{},\"iterations\":{},\"parallelism\":{}}},\"salt\":\"{salt}\",\
             \"wrapped\":\"{wrapped}\"}}",
            kdf.memory_kib, kdf.iterations, kdf.parallelism
        )
    };
    let salt = "00".repeat(32);
    let wrapped = "ab".repeat(12 + 32 + 16);
    vec![
        slot(1, KdfParams::default(), &salt, &wrapped),
        slot(1, KdfParams { memory_kib: 1, iterations: 0, parallelism: 0 }, &salt, &wrapped),
        slot(2, KdfParams::default(), "00", ""),
    ]
}

/// Re-encodes a key slot's JSON; used to compare decoded slots (KeySlot has no `PartialEq`).
pub fn key_slot_json(s: &KeySlot) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_default()
}

/// Checks that a seed is what its target expects: a valid object (so fuzzing starts from inputs
/// that reach past the first parse error), or for `fuzz_open_sealed` a sealed object that must
/// not open under [`MASTER`].
pub fn check_seed(target: &str, input: &[u8]) -> Result<(), String> {
    use hoard_core::error::ObjectKind;
    let e = |r: hoard_core::Result<()>| r.map_err(|e| e.to_string());
    match target {
        "fuzz_pack_header" => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&input[..8]);
            let pack_len = u64::from_le_bytes(n);
            let r = hoard_core::pack::header_range(pack_len, &input[8..12]).map_err(|e| e.to_string())?;
            e(hoard_core::pack::decode_header_plain("seed", &input[PACK_PREFIX..], r.start).map(drop))
        }
        "fuzz_index" => e(IndexFile::decode_plain("seed", input).map(drop)),
        "fuzz_tree" => e(Tree::decode(&Id::default(), input).map(drop)),
        "fuzz_snapshot" => serde_json::from_slice::<Snapshot>(input).map(drop).map_err(|e| e.to_string()),
        "fuzz_key_slot" => serde_json::from_slice::<KeySlot>(input).map(drop).map_err(|e| e.to_string()),
        "fuzz_open_sealed" => {
            let ty = SEAL_TYPES[input[0] as usize % SEAL_TYPES.len()];
            let id = Id::from_slice(&input[1..OPEN_PREFIX]).ok_or("short id")?;
            let sealed = &input[OPEN_PREFIX..];
            let other = Keys::from_master(SecretKey(OTHER_MASTER));
            let opened = match ty {
                SealType::DataBlob | SealType::TreeBlob => other.open_blob(ty, &id, sealed).is_ok(),
                _ => other.open_meta(ty, ObjectKind::Index, "seed", sealed).is_ok(),
            };
            if !opened {
                return Err("does not open under its own key".into());
            }
            if keys().open_blob(ty, &id, sealed).is_ok() || keys().open_meta(ty, ObjectKind::Index, "s", sealed).is_ok()
            {
                return Err("opens under the fuzzing key".into());
            }
            Ok(())
        }
        "fuzz_config" => match input.split_first() {
            Some((0, body)) => e(hoard_core::repo::ConfigFile::decode(body).map(drop)),
            Some((_, body)) => e(hoard_core::repo::RepoParams::decode(body).map(drop)),
            None => Err("empty".into()),
        },
        "fuzz_unseal_blob" => (input.len() >= 5).then_some(()).ok_or_else(|| "short".into()),
        "fuzz_lock" => serde_json::from_slice::<hoard_core::lock::LockInfo>(input.get(12..).unwrap_or_default())
            .map(drop)
            .map_err(|e| e.to_string()),
        #[cfg(feature = "k8s")]
        "fuzz_agent_state" => hoard_agent::state::decode(input).map(drop).map_err(|e| e.to_string()),
        #[cfg(feature = "k8s")]
        "fuzz_vol_data" => hoard_agent::volume::parse_vol_data(input).map(drop),
        #[cfg(feature = "k8s")]
        "fuzz_repository_meta" => hoard_controller::storage::Meta::decode(input).map(drop).map_err(|e| e.to_string()),
        _ => Err(format!("unknown target {target}")),
    }
}
