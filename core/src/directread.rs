//! Ranged reads of a local file that bypass the page cache (`O_DIRECT`), for the filesystem
//! backend's `get_ranges`.
//!
//! A restore or `check --read-data` reads each pack once. Through the page cache every byte is
//! read into a freshly allocated cache page and copied out again; on the bench machine that was
//! the largest kernel cost of a restore after the writes. Read directly, the disk moves the bytes
//! into the reader's own aligned buffer, and a restore leaves the node's page cache alone.
//!
//! Guarantees:
//! * Results come in the order asked, each exactly the bytes of its range (an empty range gives
//!   empty bytes); a range past the end of the file is an `UnexpectedEof` error, never short data.
//! * Ranges are merged into spans where they are less than [`MAX_GAP`] apart; each span is read
//!   once, in whole [`ALIGN`]-aligned blocks, and the results are slices of it (no copies).
//! * Only requests with a span of at least [`MIN_DIRECT_SPAN`] bypass the cache: small reads
//!   (trees, indexes) are read again and again and are best served from memory.
//! * A filesystem that refuses `O_DIRECT`, at open or at a read (`EINVAL`), gets the same reads
//!   through the page cache.
//! * A span holds at most [`MAX_SPAN`] bytes of blocks, unless it is one range that long.
//!   Consecutive spans of one request share a buffer while they fit in [`MAX_SPAN`] bytes.
//! * Buffers of [`HUGE_MIN`] bytes and more are huge-page buffers of [`MAX_SPAN`] bytes (larger
//!   for a longer span), kept for the next reads once the last slice of them is dropped: at
//!   most [`KEPT_BYTES`] in all, held for the life of the process (a long-running agent keeps
//!   them between restores). A restore's read buffers are thus those of the requests in flight,
//!   about one per [`MAX_SPAN`] of blocks read, and the kept ones.

use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::path::Path;

use bytes::Bytes;
use rustix::fs::{Mode, OFlags};

use crate::blockwrite::{ALIGN, AlignedBuf, HUGE_MIN, align_down, align_up};
use crate::fsmeta;

/// Ranges closer than this are read as one span (the gap is read and dropped).
pub const MAX_GAP: u64 = 64 * 1024;

/// Smallest span that makes a request bypass the page cache.
pub const MIN_DIRECT_SPAN: u64 = 256 * 1024;

/// Bytes of read buffers kept for reuse. A fresh huge-page buffer for every read cost a mapping
/// and the kernel's clearing of its pages. Cold restores of the 2 GiB bench repository, 10
/// alternating each, medians against heap buffers: fresh huge buffers 2.20 against 2.27 s wall
/// but 3.59 against 3.38 CPU-s; kept ones 2.06 and 1.89 against 2.27 and 2.09 s wall, 3.29 and
/// 3.03 against 3.38 and 3.09 CPU-s, peak RSS 99-100 against 92-94 MiB.
pub const KEPT_BYTES: usize = 16 * 1024 * 1024;

static KEPT: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

/// Largest span of merged ranges, and the size of every kept read buffer: one size serves any
/// merged span, so a kept buffer always fits and buffers are mapped only while every kept one
/// is in use. A single range longer than this (a large blob) is a span of its own in a buffer
/// of its size rounded up to huge pages.
///
/// Before, spans of up to 4.1 MiB had buffers of their size rounded to 2 MiB (2, 4 or 6 MiB);
/// a span too long for every kept buffer had a new one mapped beside them, and the rarer such
/// coincidences, the longer the run: a restore's peak RSS grew with the dataset. Cold restores
/// of the bench repositories, medians of 8 alternating runs (2 GiB) and 6 (1 GiB): 92.0 MiB
/// before, 76.0 with spans capped, 75.6 with a request's spans sharing buffers (range 72.8-78.2
/// against 88.8-94.8); 1 GiB: 82.7 before, 72.8 after (the key derivation's peak); wall and
/// CPU time unchanged within the host's noise.
///
/// One huge page (2 MiB) rather than two: a restore holds a read buffer per worker, and each
/// worker's job is sized to this (`restore::MAX_JOB_BYTES`). Restoring the bench's mutated
/// 2 GiB snapshot from a repository made as the bench makes it, 12 alternating cold runs:
/// peak RSS 74.1 and 74.3 MiB against 79.4 and 81.0 with 4 MiB, wall 7.20 and 7.52 s against
/// 7.32 and 7.46 s, CPU 10.55 and 10.88 against 10.59 and 10.73 s (a slow spell of the host).
pub const MAX_SPAN: usize = 2 * 1024 * 1024;

/// The first `len` bytes of a read buffer, which goes back to [`KEPT`] when dropped (if it is
/// a mapped one and there is room). Bytes past what a read filled may be an earlier read's; they
/// are never handed out (only the ranges asked are sliced, and those were read).
struct ReadBuf {
    buf: Option<AlignedBuf>,
    len: usize,
}

impl ReadBuf {
    fn take(len: usize) -> ReadBuf {
        if len < HUGE_MIN {
            return ReadBuf { buf: Some(AlignedBuf::new(len)), len };
        }
        let reused = {
            let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
            // Best fit: a buffer kept from a blob longer than MAX_SPAN stays for the next one.
            let fit = kept
                .iter()
                .enumerate()
                .filter(|(_, b)| b.as_slice().len() >= len)
                .min_by_key(|(_, b)| b.as_slice().len());
            fit.map(|(i, _)| i).map(|i| kept.swap_remove(i))
        };
        let buf = reused.unwrap_or_else(|| AlignedBuf::new_huge(len.next_multiple_of(2 * 1024 * 1024).max(MAX_SPAN)));
        ReadBuf { buf: Some(buf), len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf.as_mut().map_or(&mut [][..], |b| &mut b.as_mut_slice()[..self.len])
    }
}

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[][..], |b| &b.as_slice()[..self.len])
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take().filter(AlignedBuf::is_mapped) else { return };
        let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = kept.iter().map(|b| b.as_slice().len()).sum();
        if held + buf.as_slice().len() <= KEPT_BYTES {
            kept.push(buf);
        }
    }
}

/// Reads `ranges` of the file at `path` (see the module guarantees).
pub fn read_ranges(path: &Path, ranges: &[Range<u64>]) -> io::Result<Vec<Bytes>> {
    read(path, ranges).map(|(bytes, _)| bytes)
}

/// [`read_ranges`], and whether the reads bypassed the page cache.
fn read(path: &Path, ranges: &[Range<u64>]) -> io::Result<(Vec<Bytes>, bool)> {
    let (spans, span_of) = merge(ranges);
    let direct = spans.iter().any(|s| s.end - s.start >= MIN_DIRECT_SPAN);
    let file = open(path, direct)?;
    let mut direct = direct;
    // Per span: the buffer holding it, where in the buffer it begins, and its first byte's
    // offset in the file (the span's start rounded down to a block).
    let mut read: Vec<(Bytes, usize, u64)> = Vec::with_capacity(spans.len());
    let span_bytes = |s: &Range<u64>| block_len(s) as usize;
    let mut next = 0;
    while next < spans.len() {
        // Consecutive spans share one buffer while they fit in MAX_SPAN (a longer span is alone).
        let mut total = span_bytes(&spans[next]);
        let mut end = next + 1;
        while end < spans.len() && total + span_bytes(&spans[end]) <= MAX_SPAN {
            total += span_bytes(&spans[end]);
            end += 1;
        }
        let mut buf = ReadBuf::take(total);
        let mut placed = Vec::with_capacity(end - next);
        let mut at = 0;
        for span in &spans[next..end] {
            let start = align_down(span.start);
            let len = span_bytes(span);
            let got = read_at(&file, &mut buf.as_mut_slice()[at..at + len], start, &mut direct)?;
            if (got as u64) < span.end - start {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "truncated: it ends at byte {}, but data was asked up to byte {}",
                        start + got as u64,
                        span.end
                    ),
                ));
            }
            placed.push((at, start));
            at += len;
        }
        let bytes = Bytes::from_owner(buf);
        read.extend(placed.into_iter().map(|(at, start)| (bytes.clone(), at, start)));
        next = end;
    }
    let sliced = ranges
        .iter()
        .zip(span_of)
        .map(|(r, i)| {
            if r.is_empty() {
                return Bytes::new();
            }
            let (bytes, at, start) = &read[i];
            bytes.slice(at + (r.start - start) as usize..at + (r.end - start) as usize)
        })
        .collect();
    Ok((sliced, direct))
}

/// Bytes of a span read in whole blocks.
fn block_len(span: &Range<u64>) -> u64 {
    align_up(span.end) - align_down(span.start)
}

/// Whether `range` (not starting before `span`) is near enough to be read along with it.
fn is_near(span: &Range<u64>, range: &Range<u64>) -> bool {
    range.start <= span.end.saturating_add(MAX_GAP)
}

/// The bytes of blocks a read of ranges takes, the ranges given in order of their start and
/// merged into spans as [`read_ranges`] merges them: what its buffers hold. Kept within
/// [`MAX_SPAN`], a request's spans are read into one buffer.
#[derive(Debug, Default, Clone)]
pub struct ReadFootprint {
    /// Blocks of the spans before the current one.
    closed: u64,
    current: Option<Range<u64>>,
}

impl ReadFootprint {
    /// The footprint's bytes once `range` is added.
    pub fn with(&self, range: &Range<u64>) -> u64 {
        let mut grown = self.clone();
        grown.add(range);
        grown.bytes()
    }

    pub fn add(&mut self, range: &Range<u64>) {
        if range.is_empty() {
            return;
        }
        match &mut self.current {
            Some(span) if is_near(span, range) => span.end = span.end.max(range.end),
            Some(span) => {
                self.closed += block_len(span);
                *span = range.clone();
            }
            None => self.current = Some(range.clone()),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.closed + self.current.as_ref().map_or(0, block_len)
    }
}

/// The non-empty ranges, sorted and merged into spans, and for each range the index of the span
/// holding it (0 for an empty range). A range joins the span before it when it begins less than
/// [`MAX_GAP`] after it and the span, read in whole blocks, stays within [`MAX_SPAN`] bytes (or
/// the range adds nothing to it); spans may then overlap, each range is read by its own span.
fn merge(ranges: &[Range<u64>]) -> (Vec<Range<u64>>, Vec<usize>) {
    let mut order: Vec<usize> = (0..ranges.len()).filter(|&i| !ranges[i].is_empty()).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut spans: Vec<Range<u64>> = Vec::with_capacity(order.len());
    let mut span_of = vec![0; ranges.len()];
    for i in order {
        let r = &ranges[i];
        match spans.last_mut() {
            Some(last)
                if is_near(last, r) && (r.end <= last.end || block_len(&(last.start..r.end)) <= MAX_SPAN as u64) =>
            {
                last.end = last.end.max(r.end)
            }
            _ => spans.push(r.clone()),
        }
        span_of[i] = spans.len() - 1;
    }
    (spans, span_of)
}

fn open(path: &Path, direct: bool) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC;
    if direct {
        match rustix::fs::open(path, flags | OFlags::DIRECT, Mode::empty()) {
            Err(rustix::io::Errno::INVAL) => {}
            other => return other.map_err(io::Error::from),
        }
    }
    Ok(rustix::fs::open(path, flags, Mode::empty())?)
}

/// Fills `buf` from `offset` until it is full or the file ends; returns the bytes read. A direct
/// read the filesystem refuses is repeated through the page cache, for this and later reads.
fn read_at(fd: &OwnedFd, buf: &mut [u8], offset: u64, direct: &mut bool) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::INVAL) if *direct => {
                fsmeta::set_direct(fd, false)?;
                *direct = false;
            }
            Err(e) => return Err(e.into()),
        }
        // A short direct read ends at the end of the file; what follows is not block-aligned.
        if *direct && done % ALIGN != 0 {
            break;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        (dir, path, data)
    }

    #[test]
    fn ranges_come_back_in_the_order_asked() {
        let (_d, path, data) = file_of(3 * 1024 * 1024 + 123);
        let len = data.len() as u64;
        let ranges = vec![
            2_000_000..2_500_000,
            5..4099,
            0..0,
            len - 10..len,
            4099..300_000,
            1_000_000..1_000_001,
            // A second span after a gap larger than MAX_GAP.
            1_200_000..1_200_017,
        ];
        let (got, direct) = read(&path, &ranges).unwrap();
        // Where the filesystem takes O_DIRECT (as CI's does), the direct path must be the one used.
        let takes_direct = rustix::fs::open(&path, OFlags::RDONLY | OFlags::DIRECT, Mode::empty()).is_ok_and(|fd| {
            let mut buf = AlignedBuf::new(ALIGN);
            rustix::io::pread(&fd, buf.as_mut_slice(), 0).is_ok()
        });
        assert_eq!(direct, takes_direct);
        if std::env::var_os("CI").is_some() {
            assert!(direct, "CI's filesystem refused O_DIRECT");
        }
        assert_eq!(got.len(), ranges.len());
        for (r, b) in ranges.iter().zip(&got) {
            assert_eq!(&b[..], &data[r.start as usize..r.end as usize], "range {r:?}");
        }
    }

    #[test]
    fn reused_buffers_never_show_an_earlier_reads_bytes() {
        let (_d, path, data) = file_of(6 * 1024 * 1024 + 11);
        let other = path.with_file_name("other");
        let zeros = vec![0u8; 5 * 1024 * 1024];
        std::fs::write(&other, &zeros).unwrap();
        let len = data.len() as u64;
        for round in 0..4u64 {
            let big = vec![round * 4096..len - round, len - 100..len];
            let (got, _) = read(&path, &big).unwrap();
            for (r, b) in big.iter().zip(&got) {
                assert_eq!(&b[..], &data[r.start as usize..r.end as usize], "round {round}, {r:?}");
            }
            drop(got);
            // Shorter spans, likely in the buffers just given back.
            let short = vec![7..2_500_000 + round, 3_000_000..3_000_001];
            let (got, _) = read(&other, &short).unwrap();
            for (r, b) in short.iter().zip(&got) {
                assert!(crate::util::is_zero(b) && b.len() as u64 == r.end - r.start, "round {round}, {r:?}");
            }
            let past_end = 0..zeros.len() as u64 + 1;
            assert_eq!(read(&other, std::slice::from_ref(&past_end)).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    #[test]
    fn spans_of_one_request_share_a_buffer() {
        let (_d, path, data) = file_of(9 * 1024 * 1024);
        // 12 blobs of 100 KB, 200 KB apart (more than MAX_GAP: 12 spans, 1.3 MB of blocks),
        // then a 5 MB one.
        let mut ranges: Vec<Range<u64>> = (0..12u64).map(|i| i * 300_000 + 7..i * 300_000 + 100_007).collect();
        ranges.push(3_700_000..8_700_000);
        let (spans, _) = merge(&ranges);
        assert_eq!(spans.len(), 13);
        let (got, _) = read(&path, &ranges).unwrap();
        for (r, b) in ranges.iter().zip(&got) {
            assert_eq!(&b[..], &data[r.start as usize..r.end as usize], "{r:?}");
        }
        // The small spans lie one after another in one buffer, each in whole blocks.
        for k in 0..11 {
            let in_block = |r: &Range<u64>| (r.start - align_down(r.start)) as usize;
            let blocks = (align_up(ranges[k].end) - align_down(ranges[k].start)) as usize;
            let apart = got[k + 1].as_ptr() as usize - got[k].as_ptr() as usize;
            assert_eq!(apart, blocks - in_block(&ranges[k]) + in_block(&ranges[k + 1]), "span {k}");
        }
    }

    #[test]
    fn footprint_is_the_blocks_of_the_merged_spans() {
        // Ranges in order of start: near ones (merged), far ones (new spans), overlapping,
        // contained and empty ones, at unaligned offsets.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let mut compared = 0;
        for _ in 0..200 {
            let mut ranges = Vec::new();
            let mut at = next(10_000);
            for _ in 0..next(40) + 1 {
                let len = [0, 1, 300, 5_000, 70_000, 400_000][next(6) as usize];
                let start = match next(4) {
                    0 => at.saturating_sub(next(6_000)),
                    1 => at + next(MAX_GAP),
                    2 => at + MAX_GAP + 1 + next(200_000),
                    _ => at,
                };
                ranges.push(start..start + len);
                at = at.max(start + len);
            }
            ranges.sort_by_key(|r| r.start);
            let mut footprint = ReadFootprint::default();
            for (k, r) in ranges.iter().enumerate() {
                let grown = footprint.with(r);
                footprint.add(r);
                assert_eq!(footprint.bytes(), grown);
                let (spans, _) = merge(&ranges[..=k]);
                let blocks: u64 = spans.iter().map(block_len).sum();
                // Beyond MAX_SPAN, spans are capped and may overlap; the footprint then counts
                // what one uncapped read would take, which a job never exceeds.
                if blocks <= MAX_SPAN as u64 {
                    assert_eq!(footprint.bytes(), blocks, "{:?}", &ranges[..=k]);
                    compared += 1;
                }
            }
        }
        assert!(compared > 1000, "{compared} requests compared");
    }

    #[test]
    fn a_request_within_the_largest_span_is_read_into_one_buffer() {
        let quarter = MAX_SPAN as u64 / 4;
        let apart = quarter + MAX_GAP + 4096;
        let (_d, path, data) = file_of((4 * apart) as usize);
        // Aligned spans far apart whose blocks add up to exactly MAX_SPAN.
        let ranges: Vec<Range<u64>> = (0..4u64).map(|i| i * apart + 4096..i * apart + 4096 + quarter).collect();
        let mut footprint = ReadFootprint::default();
        ranges.iter().for_each(|r| footprint.add(r));
        assert_eq!(footprint.bytes(), MAX_SPAN as u64);
        let (got, _) = read(&path, &ranges).unwrap();
        for (r, b) in ranges.iter().zip(&got) {
            assert_eq!(&b[..], &data[r.start as usize..r.end as usize], "{r:?}");
        }
        let first = got[0].as_ptr() as usize;
        let last = got[3].as_ptr() as usize + got[3].len();
        assert_eq!(last - first, MAX_SPAN, "the four spans lie in one buffer, back to back");
    }

    #[test]
    fn small_requests_and_overlaps_read_the_same_bytes() {
        let (_d, path, data) = file_of(10_000);
        let ranges = vec![100..200, 150..9_999, 0..10_000];
        let (got, direct) = read(&path, &ranges).unwrap();
        assert!(!direct, "small requests go through the page cache");
        for (r, b) in ranges.iter().zip(&got) {
            assert_eq!(&b[..], &data[r.start as usize..r.end as usize]);
        }
    }

    #[test]
    fn a_range_past_the_end_is_an_error() {
        let (_d, path, data) = file_of(MIN_DIRECT_SPAN as usize + 5000);
        let len = data.len() as u64;
        for past_end in [0..len + 1, len - 5..len + 4096 * 3, len + 1..len + 2] {
            let ranges = std::slice::from_ref(&past_end);
            let e = read_ranges(&path, ranges).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{past_end:?}");
        }
        let e = read_ranges(&path.with_file_name("missing"), std::slice::from_ref(&(0..1))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn nearby_ranges_share_a_span() {
        let (spans, span_of) =
            merge(&[10..20, 30..40, 40 + MAX_GAP..50 + MAX_GAP, 51 + 2 * MAX_GAP..60 + 2 * MAX_GAP, 5..6, 7..7]);
        assert_eq!(spans, vec![5..50 + MAX_GAP, 51 + 2 * MAX_GAP..60 + 2 * MAX_GAP]);
        assert_eq!(span_of, vec![0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn spans_stay_within_the_largest_buffer() {
        let max = MAX_SPAN as u64;
        let q = max / 4;
        // Adjacent blobs of a quarter span from an unaligned offset: the fifth would make the
        // aligned span larger than MAX_SPAN; a range inside the span still joins it; a large blob
        // is alone.
        let ranges = [
            100..q + 100,
            q + 100..2 * q + 100,
            2 * q + 100..3 * q + 100,
            3 * q + 100..4 * q - 10,
            4 * q - 10..5 * q,
            200..300,
            6 * q..12 * q,
        ];
        let (spans, span_of) = merge(&ranges);
        assert_eq!(spans, vec![100..4 * q - 10, 4 * q - 10..5 * q, 6 * q..12 * q]);
        assert_eq!(span_of, vec![0, 0, 0, 0, 1, 0, 2]);
        for s in &spans[..2] {
            assert!(align_up(s.end) - align_down(s.start) <= max, "{s:?}");
        }
        // Read back: overlapping aligned spans still give each range its own bytes.
        let (_d, path, data) = file_of(12 * q as usize);
        let (got, _) = read(&path, &ranges).unwrap();
        for (r, b) in ranges.iter().zip(&got) {
            assert_eq!(&b[..], &data[r.start as usize..r.end as usize], "{r:?}");
        }
    }
}
