//! Content-defined chunking (FastCDC 2020) with a secret, per-repository gear seed.
//!
//! Sans-IO: the chunker is fed byte slices and answers where the next chunk ends. The same input
//! and parameters always produce the same boundaries; a boundary depends only on the chunk's
//! bytes from `min` on and the one byte after it, so an insertion shifts only nearby boundaries.

use std::borrow::Cow;
use std::ops::Range;

use fastcdc::v2020;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::tree::Extent;

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

/// Where a file's previous version was cut, so that a re-read of a changed file recognises its
/// unchanged chunks by their hash instead of searching for their boundaries again.
///
/// Why this gives the same boundaries as the search: FastCDC scans forward and stops at the
/// first position whose rolling hash matches, or at `max`, and the hash at a position covers the
/// bytes up to it and the one byte after it. A chunk of the previous version that starts where
/// the new chunk starts and has the same bytes (same keyed hash) therefore has no earlier cut
/// in the new version either, and [`Chunker::next_cut`] repeats only the test at its end, with
/// the new byte that follows. Chunks that something other than their content may have ended
/// are left out: the last one (the end of the file) and those a hole follows (the end of a data
/// region of a sparse file). A hole of a file that was not sparse is a run of all-zero chunks,
/// merged: their boundaries are lost, but the chunks around them keep theirs. Both versions must
/// use the same chunker (the caller checks the size class) and the new one must not be read by
/// regions.
#[derive(Debug, Clone, Default)]
pub struct PreviousCuts {
    /// (offset, length, id) of each reusable chunk, by offset.
    cuts: Vec<(u64, u32, Id)>,
    next: usize,
}

impl PreviousCuts {
    /// From a node's content; `None` when no chunk qualifies.
    pub fn from_content(content: &[Extent]) -> Option<PreviousCuts> {
        let mut cuts = Vec::with_capacity(content.len());
        let mut offset = 0u64;
        for (i, e) in content.iter().enumerate() {
            if let Extent::Data { id, len } = *e
                && matches!(content.get(i + 1), Some(Extent::Data { .. }))
            {
                cuts.push((offset, len, id));
            }
            offset += e.len();
        }
        (!cuts.is_empty()).then_some(PreviousCuts { cuts, next: 0 })
    }

    /// The previous chunk starting at `offset`: its length and id. Offsets must be asked in
    /// increasing order (the cursor only moves forward).
    pub fn at(&mut self, offset: u64) -> Option<(usize, Id)> {
        while self.cuts.get(self.next).is_some_and(|c| c.0 < offset) {
            self.next += 1;
        }
        self.cuts.get(self.next).filter(|c| c.0 == offset).map(|&(_, len, id)| (len as usize, id))
    }
}

/// One cut decided by [`Chunker::next_cut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The previous version's chunk, unchanged: its length and (already computed) id.
    Reused { len: usize, id: Id },
    /// A boundary found by the search; `id` when the bytes were hashed on the way (a previous
    /// chunk of the same length whose content changed).
    Searched { len: usize, id: Option<Id> },
}

impl Cut {
    /// The chunk's length in bytes (never 0).
    pub fn chunk_len(&self) -> usize {
        match *self {
            Cut::Reused { len, .. } | Cut::Searched { len, .. } => len,
        }
    }
}

impl Chunker {
    /// The chunk that starts at `data[0]`, given the previous version's chunk starting at the
    /// same offset, if any (`previous`: its length and id). When that chunk's bytes are in
    /// `data` unchanged (`hash` of them gives its id) and the search would also end the chunk
    /// there, it is the answer without a search (see [`PreviousCuts`]); otherwise as
    /// [`Chunker::next_chunk_len`].
    pub fn next_cut(
        &self,
        data: &[u8],
        eof: bool,
        previous: Option<(usize, Id)>,
        hash: impl FnOnce(&[u8]) -> Id,
    ) -> Option<Cut> {
        let mut hashed = None;
        if let Some((len, _)) = previous
            && !eof
            && data.len() < len.saturating_add(2).min(self.max_size())
        {
            // Neither the reuse test nor the search can answer before more bytes arrive.
            return None;
        }
        if let Some((len, old)) = previous
            && len > 0
            && len <= data.len()
            && len <= self.max_size()
        {
            let id = hash(&data[..len]);
            if id == old && self.search_ends_unchanged_chunk_at(data, eof, len) {
                return Some(Cut::Reused { len, id });
            }
            hashed = Some((len, id));
        }
        let len = self.next_chunk_len(data, eof)?;
        Some(Cut::Searched { len, id: hashed.filter(|h| h.0 == len).map(|h| h.1) })
    }

    /// Whether a search over `data` (with `eof`) ends the first chunk at `len`, given that
    /// `data[..len]` is a previous version's chunk that a search ended at `len` while more
    /// bytes followed it. `false` when that is unknown until more bytes are read.
    ///
    /// Why the previous bytes are not enough: FastCDC 2020 decides a cut at `len` from a hash
    /// that includes `data[len]`, the first byte after the chunk. No position before `len`
    /// cuts (same bytes, and the mask at each of them is the same whatever follows), so only
    /// the test at `len` itself is repeated here, over the last 64 bytes the rolling hash
    /// still holds, in the same byte pairs as `v2020::cut_gear`.
    fn search_ends_unchanged_chunk_at(&self, data: &[u8], eof: bool, len: usize) -> bool {
        let (min, avg, max) = (self.params.min as usize, self.params.avg as usize, self.max_size());
        if len < min {
            // Only the end of the data cuts a chunk this short.
            return eof && data.len() == len;
        }
        if len == max {
            return true;
        }
        match data.len().min(max) - len {
            // The window ends with the chunk: the search returns the whole window.
            0 => eof,
            // One byte follows. `cut_gear` tests positions in pairs, so an even `len` is tested
            // only if the window goes on past that byte: at the end the search takes the whole
            // window, and before it the answer waits for more bytes.
            1 if len.is_multiple_of(2) => false,
            _ => {
                let (mask, mask_ls) =
                    if len < avg { (self.mask_s, self.mask_s << 1) } else { (self.mask_l, self.mask_l << 1) };
                let last_pair = len / 2;
                let mut hash: u64 = 0;
                for pair in (min / 2).max(last_pair.saturating_sub(33))..=last_pair {
                    let a = pair * 2;
                    hash = (hash << 2).wrapping_add(self.gear_ls[data[a] as usize]);
                    if a == len {
                        return hash & mask_ls == 0;
                    }
                    hash = hash.wrapping_add(self.gear[data[a + 1] as usize]);
                }
                hash & mask == 0
            }
        }
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

    fn id_of(bytes: &[u8]) -> Id {
        Id(*blake3::hash(bytes).as_bytes())
    }

    /// As a backup records it: all-zero chunks become holes, merged with a hole before them.
    fn content_of(c: &Chunker, data: &[u8]) -> Vec<Extent> {
        let mut content = Vec::new();
        for r in c.chunks(data) {
            let len = r.len() as u64;
            match content.last_mut() {
                _ if data[r.clone()].iter().any(|&b| b != 0) => {
                    content.push(Extent::Data { id: id_of(&data[r]), len: len as u32 });
                }
                Some(Extent::Hole { len: run }) => *run += len,
                _ => content.push(Extent::Hole { len }),
            }
        }
        content
    }

    /// Cuts `data` fed in pieces of `split` bytes, with the previous version's cuts.
    fn cut_with_previous(
        c: &Chunker,
        data: &[u8],
        split: usize,
        mut prev: Option<PreviousCuts>,
    ) -> (Vec<usize>, usize) {
        let (mut buf, mut fed, mut base) = (Vec::new(), 0usize, 0u64);
        let (mut lens, mut reused) = (Vec::new(), 0);
        loop {
            let eof = fed == data.len();
            let known = prev.as_mut().and_then(|p| p.at(base));
            match c.next_cut(&buf, eof, known, id_of) {
                Some(cut) => {
                    if matches!(cut, Cut::Reused { .. }) {
                        reused += 1;
                    }
                    if let Cut::Searched { len, id: Some(id) } = cut {
                        assert_eq!(id, id_of(&buf[..len]));
                    }
                    lens.push(cut.chunk_len());
                    buf.drain(..cut.chunk_len());
                    base += cut.chunk_len() as u64;
                }
                None if eof => break,
                None => {
                    let end = (fed + split).min(data.len());
                    buf.extend_from_slice(&data[fed..end]);
                    fed = end;
                }
            }
        }
        (lens, reused)
    }

    #[test]
    fn previous_cuts_leave_out_chunks_ended_by_a_hole_or_the_end() {
        let id = Id([1; 32]);
        let data = |len| Extent::Data { id, len };
        assert!(PreviousCuts::from_content(&[data(10)]).is_none());
        assert!(PreviousCuts::from_content(&[data(10), Extent::Hole { len: 5 }, data(10)]).is_none());
        let mut p =
            PreviousCuts::from_content(&[data(10), data(20), Extent::Hole { len: 5 }, data(7), data(30)]).unwrap();
        assert_eq!(p.at(0), Some((10, id)));
        assert_eq!(p.at(5), None);
        assert_eq!(p.at(10), None, "a chunk a hole follows may have been cut by a region's end");
        assert_eq!(p.at(35), Some((7, id)), "the chunk after a hole keeps its boundary");
        assert_eq!(p.at(42), None, "the last chunk (cut by the end of the file) is not reused");
    }

    #[test]
    fn unchanged_chunks_of_an_edited_file_are_reused_with_the_same_boundaries() {
        let c = Chunker::new(small(), 9).unwrap();
        let old = pseudo_random(400_000, 11);
        let mut new = old.clone();
        new[100_000..100_010].copy_from_slice(b"0123456789");
        new[300_000..304_096].fill(7);
        let prev = PreviousCuts::from_content(&content_of(&c, &old));
        let (lens, reused) = cut_with_previous(&c, &new, 50_000, prev);
        let searched: Vec<usize> = c.chunks(&new).map(|r| r.len()).collect();
        assert_eq!(lens, searched);
        assert!(reused * 10 >= searched.len() * 8, "{reused} of {} chunks reused", searched.len());
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
        fn previous_cuts_give_the_searched_boundaries(
            len in 0usize..150_000,
            edits in proptest::collection::vec((0usize..150_000, 0usize..3000, any::<u8>()), 0..4),
            insert in proptest::option::of((0usize..150_000, 1usize..500)),
            append in 0usize..20_000,
            zero_runs in proptest::collection::vec((0usize..150_000, 0usize..40_000), 0..3),
            split in 1usize..40_000,
            dseed in any::<u64>(),
        ) {
            // Whatever changed (overwrites, an insertion, an append), reusing the previous
            // version's cuts gives exactly the boundaries of a search over the new bytes, also
            // where the previous version had runs of zeros (recorded as holes).
            let c = Chunker::new(small(), 5).unwrap();
            let mut old = pseudo_random(len, dseed);
            for (at, n) in zero_runs {
                let at = at.min(old.len());
                let end = (at + n).min(old.len());
                old[at..end].fill(0);
            }
            let mut new = old.clone();
            for (at, n, b) in edits {
                let at = at.min(new.len());
                let end = (at + n).min(new.len());
                new[at..end].fill(b);
            }
            if let Some((at, n)) = insert {
                let at = at.min(new.len());
                new.splice(at..at, pseudo_random(n, dseed ^ 1));
            }
            new.extend(pseudo_random(append, dseed ^ 2));
            let searched: Vec<usize> = c.chunks(&new).map(|r| r.len()).collect();
            let (lens, _) = cut_with_previous(&c, &new, split, PreviousCuts::from_content(&content_of(&c, &old)));
            prop_assert_eq!(lens, searched);
        }

        #[test]
        fn the_test_at_an_unchanged_chunks_end_is_the_searchs(
            len in 0usize..60_000,
            dseed in any::<u64>(),
            follow in any::<u8>(),
        ) {
            // Positions before a searched cut never cut, the cut itself does; and with the
            // window ending right after it, or its next byte changed, the answer is the new
            // search's, or "unknown" (false) while the search still needs bytes.
            let c = Chunker::new(small(), 3).unwrap();
            let data = pseudo_random(len, dseed);
            for chunk in c.chunks(&data) {
                let window = &data[chunk.start..];
                let cut = chunk.len();
                for at in 1..=cut {
                    prop_assert_eq!(c.search_ends_unchanged_chunk_at(window, true, at), at == cut, "at {}", at);
                }
                for extra in 0..3 {
                    let mut short = window[..(cut + extra).min(window.len())].to_vec();
                    if extra > 0 && short.len() > cut {
                        short[cut] = follow;
                    }
                    let searched = c.next_chunk_len(&short, true);
                    prop_assert_eq!(c.search_ends_unchanged_chunk_at(&short, true, cut), searched == Some(cut));
                    if c.search_ends_unchanged_chunk_at(&short, false, cut) {
                        let mut longer = window.to_vec();
                        longer[..short.len()].copy_from_slice(&short);
                        prop_assert_eq!(c.next_chunk_len(&longer, true), Some(cut));
                    }
                }
            }
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
