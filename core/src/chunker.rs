//! Content-defined chunking (FastCDC 2020) with a secret, per-repository gear seed.
//!
//! Sans-IO: the chunker is fed byte slices and answers where the next chunk ends. The same input
//! and parameters always produce the same boundaries; a boundary depends only on bytes inside
//! the window `[min, max]` of the chunk, so an insertion shifts only nearby boundaries.

use std::borrow::Cow;
use std::ops::Range;

use fastcdc::v2020;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Minimum, average and maximum chunk size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams { min: 512 * 1024, avg: 1024 * 1024, max: 8 * 1024 * 1024 }
    }
}

impl ChunkerParams {
    pub fn validate(&self) -> Result<()> {
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        let ok = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min)
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg)
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max)
            && min < avg
            && avg < max
            && min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "chunker sizes {min}/{avg}/{max} must be even, min < avg < max, within FastCDC's limits"
            )))
        }
    }
}

/// Chunk parameters for large files, chosen per file from its size alone.
///
/// A file whose size (as `fstat` reports it when the backup opens the file) is at least
/// `min_file_size` bytes is chunked with `chunker`; every other file, and every stream, with the
/// repository's default parameters. The choice depends only on the size, so a re-backup of an
/// unchanged-size file cuts the same boundaries; a file that crosses the threshold is re-chunked
/// once with the other parameters. Restore never needs the parameters: trees list every chunk.
///
/// Why: large files are mostly databases and images written in place; with 1 MiB chunks each
/// scattered page write re-stores a whole ~1 MiB chunk, with 128 KiB chunks about a tenth of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LargeFileChunking {
    pub min_file_size: u64,
    pub chunker: ChunkerParams,
}

impl LargeFileChunking {
    /// Files of 32 MiB and more: FastCDC 32 KiB / 128 KiB / 512 KiB.
    pub const DEFAULT: LargeFileChunking = LargeFileChunking {
        min_file_size: 32 * 1024 * 1024,
        chunker: ChunkerParams { min: 32 * 1024, avg: 128 * 1024, max: 512 * 1024 },
    };

    /// The default policy for a repository whose default chunker is `base`, if it chunks finer.
    pub fn default_for(base: &ChunkerParams) -> Option<LargeFileChunking> {
        (Self::DEFAULT.chunker.avg < base.avg).then_some(Self::DEFAULT)
    }

    pub fn validate(&self) -> Result<()> {
        self.chunker.validate()?;
        if self.min_file_size < 1024 * 1024 {
            return Err(Error::InvalidArgument("large-file chunking must start at 1 MiB or more".into()));
        }
        Ok(())
    }
}

/// A FastCDC chunker with precomputed masks and seeded gear tables.
#[derive(Debug, Clone)]
pub struct Chunker {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    gear: Cow<'static, [u64]>,
    gear_ls: Cow<'static, [u64]>,
}

impl Chunker {
    pub fn new(params: ChunkerParams, seed: u64) -> Result<Chunker> {
        params.validate()?;
        let (mask_s, mask_l) = v2020::select_masks(params.avg as usize, v2020::Normalization::Level1);
        let (gear, gear_ls) = v2020::get_gear_with_seed(seed);
        Ok(Chunker { params, mask_s, mask_l, gear, gear_ls })
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    pub fn max_size(&self) -> usize {
        self.params.max as usize
    }

    /// Length of the chunk that starts at `data[0]`.
    ///
    /// `eof` says no bytes follow `data`. Returns `None` when the answer depends on bytes not yet
    /// seen (fewer than `max` bytes buffered and not at the end); the caller reads more and asks
    /// again. Never returns `Some(0)` for non-empty data.
    pub fn next_chunk_len(&self, data: &[u8], eof: bool) -> Option<usize> {
        if data.is_empty() {
            return None;
        }
        if !eof && data.len() < self.max_size() {
            return None;
        }
        let window = &data[..data.len().min(self.max_size())];
        let (_, len) = v2020::cut_gear(
            window,
            self.params.min as usize,
            self.params.avg as usize,
            self.params.max as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        Some(len.max(1).min(window.len()))
    }

    /// All chunk ranges of a complete buffer.
    pub fn chunks<'a>(&'a self, data: &'a [u8]) -> impl Iterator<Item = Range<usize>> + 'a {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let len = self.next_chunk_len(&data[pos..], true)?;
            let r = pos..pos + len;
            pos += len;
            Some(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> ChunkerParams {
        ChunkerParams { min: 1024, avg: 4096, max: 16384 }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn insertion_only_shifts_nearby_boundaries() {
        let c = Chunker::new(small(), 42).unwrap();
        let data = pseudo_random(1 << 20, 1);
        let mut changed = data.clone();
        changed.splice(500_000..500_000, b"inserted bytes".iter().copied());
        let a: std::collections::HashSet<Vec<u8>> = c.chunks(&data).map(|r| data[r].to_vec()).collect();
        let b: Vec<Vec<u8>> = c.chunks(&changed).map(|r| changed[r].to_vec()).collect();
        let new = b.iter().filter(|chunk| !a.contains(*chunk)).count();
        assert!(new <= 3, "{new} chunks changed after one insertion");
    }

    #[test]
    fn seed_changes_boundaries() {
        let data = pseudo_random(1 << 20, 3);
        let a: Vec<_> = Chunker::new(small(), 1).unwrap().chunks(&data).collect();
        let b: Vec<_> = Chunker::new(small(), 2).unwrap().chunks(&data).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_bad_params() {
        assert!(ChunkerParams { min: 4096, avg: 1024, max: 16384 }.validate().is_err());
        assert!(ChunkerParams { min: 1, avg: 1024, max: 16384 }.validate().is_err());
    }

    proptest! {
        #[test]
        fn chunks_cover_input_within_bounds(len in 0usize..200_000, seed in any::<u64>(), dseed in any::<u64>()) {
            let c = Chunker::new(small(), seed).unwrap();
            let data = pseudo_random(len, dseed);
            let ranges: Vec<_> = c.chunks(&data).collect();
            let mut pos = 0;
            for (i, r) in ranges.iter().enumerate() {
                prop_assert_eq!(r.start, pos);
                prop_assert!(r.len() <= 16384);
                if i + 1 < ranges.len() { prop_assert!(r.len() >= 1024); }
                pos = r.end;
            }
            prop_assert_eq!(pos, len);
        }

        #[test]
        fn streaming_matches_whole_buffer(len in 0usize..120_000, split in 1usize..40_000, dseed in any::<u64>()) {
            // Feeding data in pieces gives the same boundaries as one buffer.
            let c = Chunker::new(small(), 7).unwrap();
            let data = pseudo_random(len, dseed);
            let whole: Vec<_> = c.chunks(&data).map(|r| r.len()).collect();
            let mut buf = Vec::new();
            let mut fed = 0;
            let mut lens = Vec::new();
            loop {
                let eof = fed == data.len();
                match c.next_chunk_len(&buf, eof) {
                    Some(n) => { lens.push(n); buf.drain(..n); }
                    None if eof => break,
                    None => { let end = (fed + split).min(data.len()); buf.extend_from_slice(&data[fed..end]); fed = end; }
                }
            }
            prop_assert_eq!(whole, lens);
        }
    }
}
