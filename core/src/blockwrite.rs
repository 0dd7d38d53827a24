//! Writing restored files in whole aligned blocks, so that they can bypass the page cache.
//!
//! Written through the page cache, every restored byte is copied by the kernel into a freshly
//! allocated page: on the bench machine that cost 1.4-1.8 s of system time per GiB, more than
//! decryption, decompression and verification together. A descriptor with `O_DIRECT` lets the
//! disk take the data from the restore's own buffers instead, but only in writes aligned to
//! [`ALIGN`] in file offset, length and memory address, while blobs begin and end anywhere.
//!
//! * Whole blocks: [`split`] cuts a blob's range into an unaligned head, whole blocks and an
//!   unaligned tail. The caller writes the whole blocks from an [`AlignedBuf`]; heads and tails
//!   go to the file's [`BlockFile`], which assembles each split block in memory and writes it
//!   once its last byte has arrived, or zero-filled by [`BlockFile::finish`] (the bytes that never
//!   arrived are holes). The file's last block is written whole and the file cut back to its
//!   size afterwards.
//! * Each block is written once, and every write is whole aligned blocks, so the result is the
//!   same whether or not the descriptor bypasses the cache: a filesystem that takes the flag but
//!   refuses a direct write (`EINVAL`) gets the descriptor switched back to cached writes and the
//!   write repeated ([`write_blocks`]).
//! * Sparse: all-zero pages are never written, so holes stay holes.
//! * Bounded: a file holds at most the split blocks of the blobs being written into it (two per
//!   blob at most) until their neighbours arrive.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::fsmeta;

/// Alignment of direct writes: the largest logical block size in common use.
pub const ALIGN: usize = crate::backup::DIRECT_ALIGN;
const PAGE: usize = 4096;
/// Shortest run of zero pages a direct write leaves as a hole: shorter ones are written, since
/// splitting a direct write costs more than the pages (the original file had them allocated).
pub const MIN_DIRECT_HOLE: usize = 64 * 1024;

/// A buffer, zeroed when made, whose usable part starts at an [`ALIGN`]-aligned address.
///
/// [`AlignedBuf::new_huge`] makes a buffer of [`HUGE_MIN`] bytes or more its own anonymous
/// mapping, asked to be backed by 2 MiB pages: a direct write from it pins a few huge pages
/// instead of hundreds of small ones, and it faults in a few pages instead of hundreds. For
/// long-lived buffers: a fresh mapping costs a syscall and the kernel's clearing of its pages.
/// Measured on the restore's stage buffers, 10 alternating cold restores of the 2 GiB bench
/// repository: CPU 3.28 -> 3.10 s, wall 2.25 -> 2.15 s (medians). Mapping the short-lived
/// pack-read buffers as well cut the wall further (2.07 s) and peak RSS (93 -> 77 MiB) but
/// raised CPU (3.41 s): every read then cleared fresh huge pages.
pub struct AlignedBuf {
    memory: Memory,
    len: usize,
}

enum Memory {
    Heap { vec: Vec<u8>, pad: usize },
    Mapped(crate::util::HugeMapping),
}

/// [`AlignedBuf::new_huge`] buffers at least this large are mapped rather than allocated.
pub const HUGE_MIN: usize = 1024 * 1024;

impl AlignedBuf {
    /// From the heap.
    pub fn new(len: usize) -> AlignedBuf {
        Self::with_huge(len, false)
    }

    /// Mapped in huge pages from [`HUGE_MIN`] bytes on (from the heap when that fails).
    pub fn new_huge(len: usize) -> AlignedBuf {
        Self::with_huge(len, true)
    }

    fn with_huge(len: usize, huge: bool) -> AlignedBuf {
        if huge
            && len >= HUGE_MIN
            && let Some(map) = crate::util::HugeMapping::new(len.next_multiple_of(PAGE), true)
        {
            return AlignedBuf { memory: Memory::Mapped(map), len };
        }
        let vec = vec![0u8; len + ALIGN];
        let pad = (ALIGN - vec.as_ptr() as usize % ALIGN) % ALIGN;
        AlignedBuf { memory: Memory::Heap { vec, pad }, len }
    }

    /// Whether it is its own mapping (see [`AlignedBuf::new_huge`]).
    pub fn is_mapped(&self) -> bool {
        matches!(self.memory, Memory::Mapped(_))
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.memory {
            Memory::Heap { vec, pad } => &vec[*pad..*pad + self.len],
            Memory::Mapped(map) => &map.bytes()[..self.len],
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.memory {
            Memory::Heap { vec, pad } => &mut vec[*pad..*pad + self.len],
            Memory::Mapped(map) => &mut map.bytes_mut()[..self.len],
        }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

/// `x` rounded down to a multiple of [`ALIGN`].
pub fn align_down(x: u64) -> u64 {
    x / ALIGN as u64 * ALIGN as u64
}

/// `x` rounded up to a multiple of [`ALIGN`].
pub fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// Cuts `offset..offset + len` into an unaligned head, whole aligned blocks, and an unaligned
/// tail (each possibly empty; together exactly the range, in order).
pub fn split(offset: u64, len: u64) -> [Range<u64>; 3] {
    let end = offset + len;
    let head_end = align_up(offset).min(end);
    let body_end = align_down(end).max(head_end);
    [offset..head_end, head_end..body_end, body_end..end]
}

/// Writes `data` at `offset`, skipping runs of at least [`MIN_DIRECT_HOLE`] zero bytes (whole
/// pages) so that they stay holes; shorter runs are written, which keeps direct writes large.
/// On a descriptor with `O_DIRECT`, `offset`, the length and the address of `data` must be
/// [`ALIGN`]ed; a direct write the filesystem refuses turns the flag off and is repeated through
/// the cache.
pub fn write_blocks(fd: &OwnedFd, data: &[u8], offset: u64) -> rustix::io::Result<()> {
    match write_runs(fd, data, offset, MIN_DIRECT_HOLE) {
        Err(rustix::io::Errno::INVAL) if fsmeta::set_direct(fd, false).is_ok() => {
            write_runs(fd, data, offset, MIN_DIRECT_HOLE)
        }
        other => other,
    }
}

/// Writes `data` at `offset`, skipping whole zero pages so they stay holes.
pub fn write_sparse(fd: &OwnedFd, data: &[u8], offset: u64) -> rustix::io::Result<()> {
    write_runs(fd, data, offset, PAGE)
}

/// Writes `data` at `offset` except runs of whole zero pages of at least `min_hole` bytes.
fn write_runs(fd: &OwnedFd, data: &[u8], offset: u64, min_hole: usize) -> rustix::io::Result<()> {
    let mut start = 0;
    let mut pos = 0;
    while pos < data.len() {
        let mut zero_end = pos;
        while zero_end + PAGE <= data.len() && crate::util::is_zero(&data[zero_end..zero_end + PAGE]) {
            zero_end += PAGE;
        }
        if zero_end > pos && zero_end - pos >= min_hole {
            write_all_at(fd, &data[start..pos], offset + start as u64)?;
            start = zero_end;
            pos = zero_end;
        } else {
            pos = zero_end.max(pos + PAGE).min(data.len());
        }
    }
    write_all_at(fd, &data[start..], offset + start as u64)
}

fn write_all_at(fd: &OwnedFd, data: &[u8], offset: u64) -> rustix::io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        match rustix::io::pwrite(fd, &data[done..], offset + done as u64) {
            Ok(0) => return Err(rustix::io::Errno::NOSPC),
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reserves the blocks of `ranges` (in file order; adjacent ones are merged), holes left out.
/// Direct writes into reserved blocks overwrite them, which the filesystem lets run side by
/// side; a write that must allocate (ext4) holds the file's lock until it completes, so
/// workers writing the same file would take turns. Best effort: errors are left for the
/// writes to report.
pub fn preallocate(fd: &OwnedFd, ranges: impl Iterator<Item = Range<u64>>) {
    let reserve = |r: &Range<u64>| {
        let _ = rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::empty(), r.start, r.end - r.start);
    };
    let mut merged: Option<Range<u64>> = None;
    for r in ranges.filter(|r| !r.is_empty()) {
        match &mut merged {
            Some(m) if m.end == r.start => m.end = r.end,
            _ => {
                if let Some(m) = merged.replace(r) {
                    reserve(&m);
                }
            }
        }
    }
    if let Some(m) = merged {
        reserve(&m);
    }
}

struct SplitBlock {
    buf: AlignedBuf,
    /// Bytes that have arrived (pieces never overlap).
    filled: usize,
}

/// A split block whose last byte has arrived, to be written.
#[derive(Debug)]
pub struct CompleteBlock {
    index: u64,
    buf: AlignedBuf,
}

/// The split blocks of one file being restored in whole blocks.
#[derive(Debug)]
pub struct BlockFile {
    size: u64,
    split: Mutex<HashMap<u64, SplitBlock>>,
    /// A whole last block was written past the end of the file.
    past_end: AtomicBool,
}

impl std::fmt::Debug for SplitBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitBlock").field("filled", &self.filled).finish()
    }
}

impl BlockFile {
    pub fn new(size: u64) -> BlockFile {
        BlockFile { size, split: Mutex::new(HashMap::new()), past_end: AtomicBool::new(false) }
    }

    /// Bytes of the file that block `index` holds (the last block may be short).
    fn block_bytes(&self, index: u64) -> usize {
        (self.size.saturating_sub(index * ALIGN as u64)).min(ALIGN as u64) as usize
    }

    /// Takes `bytes` for `offset..` (within one block: a head or tail from [`split`]). When this
    /// completes the block, it is handed back to be written with [`BlockFile::write_block`]
    /// (by whichever thread can wait for the disk), before [`BlockFile::finish`].
    pub fn put_piece(&self, offset: u64, bytes: &[u8]) -> Option<CompleteBlock> {
        if bytes.is_empty() {
            return None;
        }
        let index = offset / ALIGN as u64;
        let at = (offset % ALIGN as u64) as usize;
        debug_assert!(at + bytes.len() <= ALIGN, "a piece crosses a block boundary");
        let mut split = self.split.lock().unwrap_or_else(|p| p.into_inner());
        let block = split.entry(index).or_insert_with(|| SplitBlock { buf: AlignedBuf::new(ALIGN), filled: 0 });
        block.buf.as_mut_slice()[at..at + bytes.len()].copy_from_slice(bytes);
        block.filled += bytes.len();
        if block.filled < self.block_bytes(index) {
            return None;
        }
        split.remove(&index).map(|b| CompleteBlock { index, buf: b.buf })
    }

    /// Writes a block [`BlockFile::put_piece`] completed (all-zero blocks stay holes).
    pub fn write_block(&self, fd: &OwnedFd, block: &CompleteBlock) -> rustix::io::Result<()> {
        self.write_block_at(fd, block.index, &block.buf)
    }

    fn write_block_at(&self, fd: &OwnedFd, index: u64, buf: &AlignedBuf) -> rustix::io::Result<()> {
        if crate::util::is_zero(buf.as_slice()) {
            return Ok(());
        }
        if (index + 1) * ALIGN as u64 > self.size {
            self.past_end.store(true, Ordering::Release);
        }
        write_blocks(fd, buf.as_slice(), index * ALIGN as u64)
    }

    /// Writes the split blocks still waiting (their missing bytes are holes: zeros) and cuts the
    /// file back to its size if its last block was written whole. Call once every piece and
    /// block of the file has been written.
    pub fn finish(&self, fd: &OwnedFd) -> rustix::io::Result<()> {
        let waiting: Vec<(u64, SplitBlock)> = self.split.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
        for (index, block) in waiting {
            self.write_block_at(fd, index, &block.buf)?;
        }
        if self.past_end.load(Ordering::Acquire) {
            rustix::fs::ftruncate(fd, self.size)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = ALIGN as u64;

    #[test]
    fn buffers_start_aligned_and_zeroed_mapped_or_not() {
        let lens = [1, ALIGN, HUGE_MIN - 1, HUGE_MIN, 2 * 1024 * 1024, 3 * 1024 * 1024 + 5];
        for (len, huge) in lens.into_iter().flat_map(|len| [(len, false), (len, true)]) {
            let mut buf = if huge { AlignedBuf::new_huge(len) } else { AlignedBuf::new(len) };
            assert_eq!(buf.as_slice().len(), len);
            assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN, 0, "{len}");
            assert!(crate::util::is_zero(buf.as_slice()), "{len}");
            assert_eq!(buf.is_mapped(), huge && len >= HUGE_MIN, "{len}");
            buf.as_mut_slice().fill(7);
            assert!(buf.as_slice().iter().all(|&b| b == 7));
        }
    }

    #[test]
    fn split_covers_the_range_in_order() {
        assert_eq!(split(0, 3 * A), [0..0, 0..3 * A, 3 * A..3 * A]);
        assert_eq!(split(100, 10), [100..110, 110..110, 110..110]);
        assert_eq!(split(100, A), [100..A, A..A, A..A + 100]);
        assert_eq!(split(A - 1, 2 * A + 2), [A - 1..A, A..3 * A, 3 * A..3 * A + 1]);
        assert_eq!(split(2 * A, 17), [2 * A..2 * A, 2 * A..2 * A, 2 * A..2 * A + 17]);
        for offset in [0, 1, 4095, 4096, 4097, 12345] {
            for len in [0, 1, 4095, 4096, 4097, 70000] {
                let [h, b, t] = split(offset, len);
                assert_eq!((h.start, h.end, b.end), (offset, b.start, t.start));
                assert_eq!(t.end, offset + len);
                assert!(h.end - h.start < A && t.end - t.start < A);
                assert!(b.is_empty() || (b.start % A == 0 && b.end % A == 0));
            }
        }
    }

    /// A file written as a restore would: blobs of arbitrary lengths in a shuffled order, each
    /// split into pieces and whole blocks, a hole never written, a zero run inside the data,
    /// and a last block that is short.
    #[test]
    fn blobs_in_any_order_make_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let size = 700_001u64;
        let hole = 100_000..300_000u64;
        let mut expected = hoard_testkit::random_bytes(size as usize, 7);
        expected[hole.start as usize..hole.end as usize].fill(0);
        // Zeros inside the data: written or left as a hole, they read back as zeros.
        expected[400_000..480_000].fill(0);
        let mut blobs = Vec::new();
        let mut offset = 0u64;
        let mut len = 1u64;
        while offset < size {
            let end = (offset + len).min(size);
            if end <= hole.start || offset >= hole.end {
                blobs.push(offset..end);
            } else {
                // Cut at the hole.
                if offset < hole.start {
                    blobs.push(offset..hole.start);
                }
                if end > hole.end {
                    blobs.push(hole.end..end);
                }
            }
            offset = end;
            len = len * 7 % 65_521 + 1;
        }
        let mut order: Vec<usize> = (0..blobs.len()).collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        for direct in [true, false] {
            let path = dir.path().join(format!("f-{direct}"));
            let fd: OwnedFd = std::fs::File::create(&path).unwrap().into();
            rustix::fs::ftruncate(&fd, size).unwrap();
            if direct {
                // Where the filesystem refuses O_DIRECT, the same writes go through the cache.
                let _ = fsmeta::set_direct(&fd, true);
            }
            preallocate(&fd, blobs.iter().cloned());
            let file = BlockFile::new(size);
            // Completed blocks are written by other threads, some long after: every other one
            // waits here until just before `finish`.
            let mut deferred = Vec::new();
            let mut completed = 0;
            for &i in &order {
                let r = &blobs[i];
                let [head, body, tail] = split(r.start, r.end - r.start);
                let bytes = |r: &Range<u64>| &expected[r.start as usize..r.end as usize];
                for piece in [head, tail] {
                    if let Some(block) = file.put_piece(piece.start, bytes(&piece)) {
                        completed += 1;
                        if completed % 2 == 0 {
                            deferred.push(block);
                        } else {
                            file.write_block(&fd, &block).unwrap();
                        }
                    }
                }
                if !body.is_empty() {
                    let mut buf = AlignedBuf::new((body.end - body.start) as usize);
                    buf.as_mut_slice().copy_from_slice(bytes(&body));
                    write_blocks(&fd, buf.as_slice(), body.start).unwrap();
                }
            }
            assert!(deferred.len() >= 2, "the blobs complete split blocks ({completed})");
            for block in deferred.iter().rev() {
                file.write_block(&fd, block).unwrap();
            }
            file.finish(&fd).unwrap();
            drop(fd);
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), expected.len(), "direct {direct}");
            assert!(got == expected, "direct {direct}: content differs");
        }
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        for len in [1, ALIGN, 3 * ALIGN + 5] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.as_mut_slice().len(), len);
        }
    }
}
