//! Keys, key derivation and authenticated encryption.
//!
//! * A repository has one random 256-bit master key. It never leaves the process unwrapped; key
//!   slots (`keys/<id>`) wrap it under a key derived from a password with Argon2id.
//! * Purpose keys are derived from the master key with HKDF-SHA256 (`info = "hoard v1 <purpose>"`).
//! * Every object is sealed with AES-256-GCM as `nonce(12) ‖ ciphertext ‖ tag(16)`, with a fresh
//!   random nonce from the OS generator and associated data that binds what the object is.
//! * Blobs use a per-blob key, `BLAKE3-keyed(data key, blob id)`, so no key ever seals more than a
//!   handful of messages and the random-nonce limit of 2^32 messages per key (NIST SP 800-38D) is
//!   out of reach. Metadata objects (pack headers, index files, snapshots, locks) share one key;
//!   a repository would need 2^32 of them before the limit matters, which [`MetaSealCounter`]
//!   guards against by refusing to go past 2^30 in one process.

use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;

pub const TAG_LEN: usize = 16;
/// Bytes an encrypted object is longer than its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const META_SEAL_LIMIT: u64 = 1 << 30;

pub fn fill_random(buf: &mut [u8]) {
    // The OS generator failing is not a recoverable condition for a backup tool.
    #[allow(clippy::expect_used)]
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

/// A 256-bit secret that is wiped when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey(pub [u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        fill_random(&mut k);
        SecretKey(k)
    }
}

/// What an encrypted object is; part of the associated data, so an object of one type can never
/// be passed off as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SealType {
    DataBlob = 1,
    TreeBlob = 2,
    PackHeader = 3,
    Index = 4,
    Snapshot = 5,
    Config = 6,
    Lock = 7,
    KeySlot = 8,
}

/// The purpose keys derived from a master key.
pub struct Keys {
    master: SecretKey,
    id_key: SecretKey,
    data_key: SecretKey,
    meta: LessSafeKey,
    chunker_seed: u64,
    meta_seals: AtomicU64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn hkdf(master: &SecretKey, purpose: &str) -> SecretKey {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, &master.0);
    let mut out = [0u8; 32];
    #[allow(clippy::expect_used)]
    hk.expand(format!("hoard v1 {purpose}").as_bytes(), &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SecretKey(out)
}

fn aead_key(key: &SecretKey) -> LessSafeKey {
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key.0).expect("32-byte AES-256 key"))
}

/// Guards the message budget of the shared metadata key.
pub type MetaSealCounter = AtomicU64;

impl Keys {
    pub fn from_master(master: SecretKey) -> Keys {
        let id_key = hkdf(&master, "blob-id");
        let data_key = hkdf(&master, "data");
        let meta = aead_key(&hkdf(&master, "meta"));
        let seed = hkdf(&master, "chunker");
        let mut seed_bytes = [0u8; 8];
        seed_bytes.copy_from_slice(&seed.0[..8]);
        Keys {
            master,
            id_key,
            data_key,
            meta,
            chunker_seed: u64::from_le_bytes(seed_bytes),
            meta_seals: AtomicU64::new(0),
        }
    }

    pub fn master(&self) -> &SecretKey {
        &self.master
    }

    /// The secret per-repository seed of the chunker's gear table.
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    /// The id of a blob: keyed BLAKE3 of its plaintext, so ids reveal nothing about content.
    pub fn blob_id(&self, plaintext: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.id_key.0, plaintext).as_bytes())
    }

    fn blob_key(&self, id: &Id) -> LessSafeKey {
        let k = SecretKey(*blake3::keyed_hash(&self.data_key.0, &id.0).as_bytes());
        aead_key(&k)
    }

    /// Seals a blob's (possibly compressed) payload; appends `nonce ‖ ct ‖ tag` to `out`.
    pub fn seal_blob(&self, ty: SealType, id: &Id, payload: &[u8], out: &mut Vec<u8>) {
        seal_with(&self.blob_key(id), &blob_aad(ty, id), payload, out)
    }

    pub fn open_blob(&self, ty: SealType, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
        open_with(&self.blob_key(id), &blob_aad(ty, id), sealed)
            .ok_or_else(|| Error::corrupt(ObjectKind::Blob, id.to_hex(), "authentication failed (damaged or tampered)"))
    }

    /// [`Keys::open_blob`] into `out`, which must be exactly as long as the payload
    /// (`sealed.len() - SEAL_OVERHEAD`): no copy of the sealed bytes is made. On an error `out`
    /// holds garbage.
    pub fn open_blob_into(&self, ty: SealType, id: &Id, sealed: &[u8], out: &mut [u8]) -> Result<()> {
        open_into(&self.blob_key(id), &blob_aad(ty, id), sealed, out)
            .ok_or_else(|| Error::corrupt(ObjectKind::Blob, id.to_hex(), "authentication failed (damaged or tampered)"))
    }

    /// Seals a metadata object of the given type.
    pub fn seal_meta(&self, ty: SealType, plaintext: &[u8]) -> Result<Vec<u8>> {
        let n = self.meta_seals.fetch_add(1, Ordering::Relaxed);
        if n >= META_SEAL_LIMIT {
            return Err(Error::Internal(
                "metadata key message budget exhausted for this process; restart to continue".into(),
            ));
        }
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        seal_with(&self.meta, &meta_aad(ty), plaintext, &mut out);
        Ok(out)
    }

    pub fn open_meta(&self, ty: SealType, kind: ObjectKind, name: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        open_with(&self.meta, &meta_aad(ty), sealed)
            .ok_or_else(|| Error::corrupt(kind, name, "authentication failed (damaged, tampered or wrong type)"))
    }
}

fn blob_aad(ty: SealType, id: &Id) -> [u8; 40] {
    let mut aad = [0u8; 40];
    aad[..6].copy_from_slice(b"hoard\x01");
    aad[6] = ty as u8;
    aad[8..].copy_from_slice(&id.0);
    aad
}

fn meta_aad(ty: SealType) -> [u8; 7] {
    let mut aad = *b"hoard\x01\x00";
    aad[6] = ty as u8;
    aad
}

pub(crate) fn seal_with(key: &LessSafeKey, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    let start = out.len();
    out.reserve(plaintext.len() + SEAL_OVERHEAD);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    #[allow(clippy::expect_used)]
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start + NONCE_LEN..])
        .expect("AES-GCM sealing cannot fail for in-range lengths");
    out.extend_from_slice(tag.as_ref());
}

pub(crate) fn open_with(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; sealed.len().checked_sub(SEAL_OVERHEAD)?];
    open_into(key, aad, sealed, &mut out)?;
    Some(out)
}

/// Decrypts `nonce ‖ ct ‖ tag` into `out` (`ct`'s length); `None` if it does not authenticate.
fn open_into(key: &LessSafeKey, aad: &[u8], sealed: &[u8], out: &mut [u8]) -> Option<()> {
    let ct_end = sealed.len().checked_sub(TAG_LEN)?;
    if ct_end < NONCE_LEN || out.len() != ct_end - NONCE_LEN {
        return None;
    }
    let nonce = <[u8; NONCE_LEN]>::try_from(&sealed[..NONCE_LEN]).ok()?;
    let (ct, tag) = (&sealed[NONCE_LEN..ct_end], &sealed[ct_end..]);
    key.open_separate_gather(Nonce::assume_unique_for_key(nonce), Aad::from(aad), ct, tag, out).ok()
}

/// Argon2id parameters, stored in each key slot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// RFC 9106's second recommended option, scaled: 64 MiB, 3 passes, 4 lanes.
    fn default() -> Self {
        KdfParams { memory_kib: 64 * 1024, iterations: 3, parallelism: 4 }
    }
}

impl KdfParams {
    /// Default ceilings on what a key slot may ask for before it is tried at all. Key slots
    /// live in the bucket, which is hostile ground: a planted slot asking for 4 GiB × 64 passes
    /// would make every open exhaust an agent's memory (its default limit is 1 GiB) or stall it
    /// for minutes. hoard's own default is 64 MiB × 3 passes. `HOARD_KDF_MAX_MEMORY_MIB` and
    /// `HOARD_KDF_MAX_ITERATIONS` raise the ceilings for repositories made with bigger slots.
    pub const MAX_MEMORY_KIB: u32 = 512 * 1024;
    pub const MAX_ITERATIONS: u32 = 16;
    pub const MAX_PARALLELISM: u32 = 16;
    /// Below this nothing is accepted (Argon2id's own minimum is far lower).
    pub const MIN_MEMORY_KIB: u32 = 8 * 1024;

    /// The ceilings in force: the defaults, or the environment's larger or smaller values.
    pub fn ceilings() -> (u32, u32) {
        static CEILINGS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
        *CEILINGS.get_or_init(|| {
            let env = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u32>().ok());
            let memory = env("HOARD_KDF_MAX_MEMORY_MIB")
                .map_or(Self::MAX_MEMORY_KIB, |mib| mib.saturating_mul(1024).max(Self::MIN_MEMORY_KIB));
            let iterations = env("HOARD_KDF_MAX_ITERATIONS").map_or(Self::MAX_ITERATIONS, |i| i.max(1));
            (memory, iterations)
        })
    }

    pub fn validate(&self) -> Result<()> {
        let (max_memory, max_iterations) = Self::ceilings();
        if self.memory_kib < Self::MIN_MEMORY_KIB
            || self.memory_kib > max_memory
            || self.iterations == 0
            || self.iterations > max_iterations
            || self.parallelism == 0
            || self.parallelism > Self::MAX_PARALLELISM
        {
            return Err(Error::InvalidArgument(format!(
                "key derivation parameters {self:?} are outside the accepted range (memory {} MiB..{} MiB, \
                 1..{max_iterations} passes, 1..{} lanes; HOARD_KDF_MAX_MEMORY_MIB / HOARD_KDF_MAX_ITERATIONS raise the ceilings)",
                Self::MIN_MEMORY_KIB / 1024,
                max_memory / 1024,
                Self::MAX_PARALLELISM
            )));
        }
        Ok(())
    }

    /// The least a new key slot may cost (memory KiB × passes): OWASP's Argon2id floor,
    /// 19 MiB × 2 passes (46 MiB × 1 pass, 12 MiB × 3 passes and so on cost as much). Weaker
    /// slots are still opened within [`Self::validate`]'s range, but only made on request.
    pub const MIN_NEW_COST: u64 = 19 * 1024 * 2;

    /// [`Self::validate`], and for a slot about to be written the [`Self::MIN_NEW_COST`] floor
    /// unless `allow_weak` (tests and throwaway repositories ask for cheap slots explicitly).
    pub fn validate_new(&self, allow_weak: bool) -> Result<()> {
        self.validate()?;
        if !allow_weak && self.cost() < Self::MIN_NEW_COST {
            return Err(Error::InvalidArgument(format!(
                "key derivation parameters {} MiB × {} pass(es) are too weak for a new key: memory × passes must be \
                 at least 38 MiB (e.g. 19 MiB × 2; the default is 64 MiB × 3)",
                self.memory_kib / 1024,
                self.iterations
            )));
        }
        Ok(())
    }

    /// What deriving costs, for ordering: memory × passes.
    pub fn cost(&self) -> u64 {
        u64::from(self.memory_kib) * u64::from(self.iterations)
    }

    pub fn derive(&self, password: &[u8], salt: &[u8]) -> Result<SecretKey> {
        self.validate()?;
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| Error::InvalidArgument(format!("argon2 parameters: {e}")))?;
        let a2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        let hashed = match KdfMemory::map(a2.params().block_count()) {
            Some(mut memory) => a2.hash_password_into_with_memory(password, salt, &mut out, memory.blocks()),
            None => {
                let mut memory = vec![argon2::Block::new(); a2.params().block_count()];
                let hashed = a2.hash_password_into_with_memory(password, salt, &mut out, &mut memory);
                memory.iter_mut().for_each(Zeroize::zeroize);
                hashed
            }
        };
        hashed.map_err(|e| Error::InvalidArgument(format!("argon2: {e}")))?;
        Ok(SecretKey(out))
    }
}

/// The key derivation's working memory: fresh anonymous pages, asked to be huge pages before
/// anything touches them, and wiped and unmapped when dropped.
///
/// The kernel hands out anonymous pages zeroed, and an all-zero [`argon2::Block`] is
/// `Block::new()`, so nothing is written before argon2 fills the blocks; their first-touch page
/// faults are then taken by argon2's lanes, in parallel, instead of by one thread clearing all
/// of it first. Faulting in 64 MiB in 4 KiB pages cost more than the hashing on the virtual
/// machines measured (31-173 ms; 7 ms in 2 MiB pages), and the one-thread clear was still
/// 6-140 ms. Measured, 8 alternating warm `hoard snapshots` each (64 MiB, 3 passes, 4 lanes):
/// median 62 ms with a cleared `Vec`, 57 ms mapped.
struct KdfMemory {
    map: crate::util::HugeMapping,
    count: usize,
}

impl KdfMemory {
    /// `None` when the pages cannot be mapped (the caller allocates instead).
    fn map(count: usize) -> Option<KdfMemory> {
        let len = count.checked_mul(std::mem::size_of::<argon2::Block>())?;
        crate::util::HugeMapping::new(len, false).map(|map| KdfMemory { map, count })
    }

    #[allow(unsafe_code)]
    fn blocks(&mut self) -> &mut [argon2::Block] {
        // SAFETY: `count` blocks fill the mapping, which is page-aligned (hence aligned for
        // `Block`, 64 bytes), lives as long as `self` and is reachable only through it; its
        // bytes start zero, a valid `Block`, and only `Block`s are written to it.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().cast::<argon2::Block>(), self.count) }
    }
}

impl Drop for KdfMemory {
    fn drop(&mut self) {
        // Wiped before the mapping goes: the kernel clears freed pages only when it reuses them.
        self.blocks().iter_mut().for_each(Zeroize::zeroize);
    }
}

/// A key slot: the master key wrapped under a password-derived key. Stored as JSON in `keys/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeySlot {
    pub version: u32,
    pub created: chrono::DateTime<chrono::Utc>,
    pub hostname: String,
    pub username: String,
    pub kdf: KdfParams,
    #[serde(with = "hex_bytes")]
    pub salt: Vec<u8>,
    /// `nonce ‖ AES-256-GCM(KEK, master key) ‖ tag`, associated data `"hoard-key\x01" ‖ repo id`.
    #[serde(with = "hex_bytes")]
    pub wrapped: Vec<u8>,
}

fn slot_aad(repo_id: &Id) -> Vec<u8> {
    let mut aad = b"hoard-key\x01".to_vec();
    aad.extend_from_slice(&repo_id.0);
    aad
}

impl KeySlot {
    pub fn wrap(master: &SecretKey, password: &[u8], repo_id: &Id, kdf: KdfParams) -> Result<KeySlot> {
        let mut salt = vec![0u8; 32];
        fill_random(&mut salt);
        let kek = kdf.derive(password, &salt)?;
        let mut wrapped = Vec::new();
        seal_with(&aead_key(&kek), &slot_aad(repo_id), &master.0, &mut wrapped);
        Ok(KeySlot {
            version: 1,
            created: chrono::Utc::now(),
            hostname: crate::util::hostname(),
            username: crate::util::username(),
            kdf,
            salt,
            wrapped,
        })
    }

    /// Unwraps the master key; `None` when the password does not fit this slot.
    pub fn unwrap_key(&self, password: &[u8], repo_id: &Id) -> Result<Option<SecretKey>> {
        if self.version != 1 || self.salt.len() < 16 || self.salt.len() > 64 {
            return Ok(None);
        }
        let kek = self.kdf.derive(password, &self.salt)?;
        let Some(mut plain) = open_with(&aead_key(&kek), &slot_aad(repo_id), &self.wrapped) else {
            return Ok(None);
        };
        let key = <[u8; 32]>::try_from(plain.as_slice()).ok().map(SecretKey);
        plain.zeroize();
        Ok(key)
    }
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::from_master(SecretKey([7u8; 32]))
    }

    /// Key slots written by earlier builds must keep opening: the derivation is pinned to
    /// Argon2id v1.3's output (computed with the argon2 crate 0.5, serial lanes).
    #[test]
    fn kdf_output_is_pinned() {
        let kdf = KdfParams { memory_kib: 8 * 1024, iterations: 2, parallelism: 4 };
        let key = kdf.derive(b"correct horse battery staple", b"hoard-kdf-salt-16").unwrap();
        assert_eq!(hex::encode(key.0), "bc457160fa57b0f79d0e10ad442142ddbfebf71b04ec089199c3ed9f835f2af9");
    }

    /// The mapped working memory starts zero (what argon2 expects of fresh blocks) and gives
    /// the same key as memory cleared by hand.
    #[test]
    fn mapped_kdf_memory_starts_zero_and_derives_like_cleared_memory() {
        let params = argon2::Params::new(8 * 1024, 1, 2, Some(32)).unwrap();
        let a2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let count = a2.params().block_count();
        let mut mapped = KdfMemory::map(count).unwrap();
        assert_eq!(mapped.blocks().len(), count);
        assert!(mapped.blocks().iter().all(|b| b.as_ref().iter().all(|&w| w == 0)));
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        a2.hash_password_into_with_memory(b"pw", b"salt-salt-salt-1", &mut a, mapped.blocks()).unwrap();
        let mut cleared = vec![argon2::Block::new(); count];
        a2.hash_password_into_with_memory(b"pw", b"salt-salt-salt-1", &mut b, &mut cleared).unwrap();
        assert_eq!(a, b);
        assert!(KdfMemory::map(0).is_none());
    }

    #[test]
    fn blob_round_trip_and_binding() {
        let k = keys();
        let id = k.blob_id(b"hello");
        let mut sealed = Vec::new();
        k.seal_blob(SealType::DataBlob, &id, b"hello", &mut sealed);
        assert_eq!(k.open_blob(SealType::DataBlob, &id, &sealed).unwrap(), b"hello");
        // Another type or another id must not open.
        assert!(k.open_blob(SealType::TreeBlob, &id, &sealed).is_err());
        assert!(k.open_blob(SealType::DataBlob, &k.blob_id(b"x"), &sealed).is_err());
        // Every flipped byte is detected.
        for i in 0..sealed.len() {
            let mut s = sealed.clone();
            s[i] ^= 0x40;
            assert!(k.open_blob(SealType::DataBlob, &id, &s).is_err(), "flip at {i}");
        }
    }

    /// Opening into a caller's buffer gives what `open_blob` gives and refuses what it refuses,
    /// and a buffer of the wrong length.
    #[test]
    fn blob_opens_into_a_buffer_like_into_a_vec() {
        let k = keys();
        let plain = hoard_testkit::random_bytes(10_000, 3);
        let id = k.blob_id(&plain);
        let mut sealed = Vec::new();
        k.seal_blob(SealType::DataBlob, &id, &plain, &mut sealed);
        let mut out = vec![0u8; plain.len()];
        k.open_blob_into(SealType::DataBlob, &id, &sealed, &mut out).unwrap();
        assert_eq!(out, plain);
        assert!(k.open_blob_into(SealType::TreeBlob, &id, &sealed, &mut out).is_err());
        for len in [0, plain.len() - 1, plain.len() + 1] {
            assert!(k.open_blob_into(SealType::DataBlob, &id, &sealed, &mut vec![0u8; len]).is_err(), "len {len}");
        }
        assert!(k.open_blob_into(SealType::DataBlob, &id, &sealed[..SEAL_OVERHEAD - 1], &mut []).is_err());
        for i in (0..sealed.len()).step_by(97).chain([sealed.len() - 1]) {
            let mut s = sealed.clone();
            s[i] ^= 0x40;
            assert!(k.open_blob_into(SealType::DataBlob, &id, &s, &mut out).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let k = keys();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = k.seal_meta(SealType::Index, b"same").unwrap();
            assert!(seen.insert(s[..NONCE_LEN].to_vec()));
        }
    }

    #[test]
    fn meta_type_is_bound() {
        let k = keys();
        let s = k.seal_meta(SealType::Snapshot, b"{}").unwrap();
        assert!(k.open_meta(SealType::Index, ObjectKind::Index, "x", &s).is_err());
        assert_eq!(k.open_meta(SealType::Snapshot, ObjectKind::Snapshot, "x", &s).unwrap(), b"{}");
    }

    #[test]
    fn ids_are_keyed() {
        let a = Keys::from_master(SecretKey([1u8; 32]));
        let b = Keys::from_master(SecretKey([2u8; 32]));
        assert_ne!(a.blob_id(b"same"), b.blob_id(b"same"));
        assert_ne!(a.chunker_seed(), b.chunker_seed());
    }

    #[test]
    fn key_slot_wraps_and_rejects_wrong_password() {
        let repo = Id([9u8; 32]);
        let kdf = KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 };
        let slot = KeySlot::wrap(&SecretKey([5u8; 32]), b"pw", &repo, kdf).unwrap();
        assert_eq!(slot.unwrap_key(b"pw", &repo).unwrap().unwrap().0, [5u8; 32]);
        assert!(slot.unwrap_key(b"nope", &repo).unwrap().is_none());
        assert!(slot.unwrap_key(b"pw", &Id([8u8; 32])).unwrap().is_none());
    }
}
