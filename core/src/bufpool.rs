//! Recycled large buffers for the data path (read segments, sealed blobs).
//!
//! Allocating a fresh multi-megabyte buffer for every segment and blob costs a page fault per
//! 4 KiB when it is first written, and once freed, glibc either unmaps it (faults again next
//! time) or keeps it in an arena where it fragments (resident memory grows with the length of
//! the run). The pool hands the same buffers round instead.
//!
//! * Size classes: capacities are rounded up to a quarter-octave step (…, 1, 1.25, 1.5, 1.75,
//!   2, 2.5, … MiB), so a buffer is at most a quarter larger than what was asked for. Requests
//!   below the pool's minimum are plain allocations, never pooled.
//! * Reuse: a request takes the smallest free buffer that holds it and is at most half as large
//!   again; otherwise a new buffer of its class is allocated.
//! * Bounded: the pool counts every buffer it handed out and has not seen freed, in use or free.
//!   While that count is above its `limit`, returned buffers are freed instead of kept, and a
//!   new allocation first frees free buffers until the count fits (free buffers of sizes no
//!   longer asked for do not linger). Buffers in use are bounded by their callers (the
//!   backup's segment room, the writer's packs in flight); a pooled buffer dropped without
//!   coming back (an error path) only makes the pool keep less.
//! * [`BufPool::freeze`] turns a buffer into [`Bytes`] that go back to the pool when the last
//!   clone or slice of them is dropped; [`BufPool::freeze_holding`] also keeps a value (e.g. a
//!   budget guard) alive until then.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// The default minimum pooled size: smaller requests the allocator serves well.
pub const MIN_POOLED: usize = 1024 * 1024;

/// The minimum for pools of the data path's variable-sized buffers (carried tails, sealed
/// blobs): smaller blocks come from malloc's arenas, which serve them well, while blocks this
/// large are mapped and unmapped one by one where [`crate::util::fix_mmap_threshold`] applies
/// (a page fault per 4 KiB each time).
pub const MAPPED_MIN: usize = crate::util::MMAP_THRESHOLD as usize;

#[derive(Debug)]
pub struct BufPool {
    limit: usize,
    min: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Free buffers, each of a class capacity.
    free: Vec<Vec<u8>>,
    free_bytes: usize,
    /// Bytes of all buffers handed out and not freed: in use and free.
    total: usize,
}

impl BufPool {
    /// A pool of buffers of [`MIN_POOLED`] bytes and more, keeping at most `limit` bytes of them.
    pub fn new(limit: usize) -> Arc<BufPool> {
        Self::with_min(limit, MIN_POOLED)
    }

    /// A pool of buffers of `min` bytes and more (a power of two), keeping at most `limit` bytes.
    pub fn with_min(limit: usize, min: usize) -> Arc<BufPool> {
        Arc::new(BufPool { limit, min: min.next_power_of_two(), state: Mutex::new(State::default()) })
    }

    /// `min_capacity` rounded up to its quarter-octave step.
    fn class(&self, min_capacity: usize) -> usize {
        let n = min_capacity.max(self.min);
        let step = ((1usize << n.ilog2()) / 4).max(1);
        n.div_ceil(step) * step
    }

    fn is_class(&self, capacity: usize) -> bool {
        capacity >= self.min && self.class(capacity) == capacity
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty buffer with room for at least `min_capacity` bytes.
    pub fn take(&self, min_capacity: usize) -> Vec<u8> {
        if min_capacity < self.min {
            return Vec::with_capacity(min_capacity);
        }
        let class = self.class(min_capacity);
        let mut st = self.state();
        let fits = |b: &Vec<u8>| b.capacity() >= min_capacity && b.capacity() <= min_capacity + min_capacity / 2;
        let best =
            st.free.iter().enumerate().filter(|(_, b)| fits(b)).min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i);
        if let Some(i) = best {
            let buf = st.free.swap_remove(i);
            st.free_bytes -= buf.capacity();
            return buf;
        }
        // Make room for the new buffer among the free ones (freed outside the lock).
        let mut evicted = Vec::new();
        while st.total + class > self.limit {
            let Some(b) = st.free.pop() else { break };
            st.free_bytes -= b.capacity();
            st.total = st.total.saturating_sub(b.capacity());
            evicted.push(b);
        }
        st.total += class;
        drop(st);
        drop(evicted);
        Vec::with_capacity(class)
    }

    /// Gives a buffer back for reuse (or frees it when the pool is over its limit or the buffer
    /// is not one of its classes).
    pub fn give(&self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if !self.is_class(cap) {
            return;
        }
        buf.clear();
        let mut st = self.state();
        if st.total > self.limit {
            st.total = st.total.saturating_sub(cap);
            drop(st);
            drop(buf);
            return;
        }
        st.free_bytes += cap;
        st.free.push(buf);
    }

    /// The buffer as shared bytes; it returns to the pool when the last reference is dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        self.freeze_holding(buf, ())
    }

    /// Like [`BufPool::freeze`]; `hold` is dropped when the buffer is.
    pub fn freeze_holding<H: Send + 'static>(self: &Arc<Self>, buf: Vec<u8>, hold: H) -> Bytes {
        if !self.is_class(buf.capacity()) {
            return Bytes::from_owner(Held { buf, _hold: hold });
        }
        Bytes::from_owner(Pooled { buf, pool: Arc::clone(self), _hold: hold })
    }

    /// Bytes of free buffers held.
    pub fn free_bytes(&self) -> usize {
        self.state().free_bytes
    }

    /// Bytes of the buffers handed out and not freed, in use or free.
    pub fn total_bytes(&self) -> usize {
        self.state().total
    }
}

struct Pooled<H> {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
    _hold: H,
}

impl<H> AsRef<[u8]> for Pooled<H> {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// An unpooled buffer and what it holds.
struct Held<H> {
    buf: Vec<u8>,
    _hold: H,
}

impl<H> AsRef<[u8]> for Held<H> {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl<H> Drop for Pooled<H> {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: usize = MIN_POOLED;

    #[test]
    fn buffers_come_back_and_are_reused() {
        let pool = BufPool::new(8 * M);
        let mut a = pool.take(3 * M / 2 + 1);
        assert_eq!(a.capacity(), 7 * M / 4);
        a.extend_from_slice(&[7u8; 1000]);
        let ptr = a.as_ptr();
        let bytes = pool.freeze(a);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.free_bytes(), 0, "a slice still holds the buffer");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.free_bytes(), 7 * M / 4);
        let b = pool.take(7 * M / 4);
        assert_eq!(b.as_ptr(), ptr, "the same buffer is handed out again");
        assert!(b.is_empty());
        assert_eq!(pool.free_bytes(), 0);
        // Too small for it: a new allocation.
        assert_eq!(pool.take(M).capacity(), M);
        assert_eq!(pool.total_bytes(), 7 * M / 4 + M);
    }

    #[test]
    fn classes_are_quarter_octaves_from_the_minimum() {
        let pool = BufPool::new(0);
        for (asked, class) in [
            (1, M),
            (M, M),
            (M + 1, 5 * M / 4),
            (2 * M, 2 * M),
            (2 * M + 1, 5 * M / 2),
            (9 * M, 10 * M),
            (16 * M, 16 * M),
        ] {
            assert_eq!(pool.class(asked), class, "{asked}");
            assert!(pool.is_class(class));
        }
        assert!(!pool.is_class(9 * M));
        for n in (M..64 * M).step_by(M / 3) {
            let c = pool.class(n);
            assert!(c >= n && c <= n + n / 4, "{n} -> {c}");
        }
        let small = BufPool::with_min(0, 100_000);
        assert_eq!(small.class(1), 128 * 1024);
        assert_eq!(small.class(128 * 1024 + 1), 160 * 1024);
        assert_eq!(small.take(100).capacity(), 100, "below the minimum: not pooled");
    }

    #[test]
    fn reuse_takes_the_smallest_buffer_that_fits_and_not_a_much_larger_one() {
        let pool = BufPool::new(64 * M);
        let bufs = [pool.take(4 * M), pool.take(2 * M), pool.take(5 * M / 2)];
        for b in bufs {
            pool.give(b);
        }
        assert_eq!(pool.take(2 * M - 1).capacity(), 2 * M);
        assert_eq!(pool.take(2 * M).capacity(), 5 * M / 2, "the next smallest that fits");
        // 4 MiB is more than half again as large as 2 MiB: a new 2 MiB buffer instead.
        assert_eq!(pool.take(2 * M).capacity(), 2 * M);
        assert_eq!(pool.free_bytes(), 4 * M);
    }

    #[test]
    fn all_buffers_stay_within_the_limit_when_sizes_change() {
        let pool = BufPool::new(4 * M);
        let small: Vec<_> = (0..4).map(|_| pool.take(M)).collect();
        for b in small {
            pool.give(b);
        }
        assert_eq!((pool.free_bytes(), pool.total_bytes()), (4 * M, 4 * M));
        let big = pool.take(2 * M);
        assert_eq!((pool.free_bytes(), pool.total_bytes()), (2 * M, 4 * M), "free buffers made room");
        pool.give(big);
        assert_eq!(pool.free_bytes(), 4 * M);
        // Over the limit (all in use): buffers returned now are freed, not kept.
        let in_use: Vec<_> = (0..6).map(|_| pool.take(M)).collect();
        assert_eq!(pool.total_bytes(), 6 * M);
        for b in in_use {
            pool.give(b);
        }
        assert_eq!((pool.free_bytes(), pool.total_bytes()), (4 * M, 4 * M));
    }

    #[test]
    fn small_buffers_are_not_pooled() {
        let pool = BufPool::new(3 * M);
        pool.give(Vec::with_capacity(4096));
        assert_eq!(pool.free_bytes(), 0);
        assert_eq!(pool.take(100).capacity(), 100);
        let small = pool.freeze(vec![1, 2, 3]);
        assert_eq!(&small[..], &[1, 2, 3]);
        assert_eq!(pool.total_bytes(), 0);
    }

    #[test]
    fn held_values_live_as_long_as_the_bytes() {
        let pool = BufPool::new(4 * M);
        for cap in [10, M] {
            let held = Arc::new(());
            let mut buf = pool.take(cap);
            buf.push(1);
            let bytes = pool.freeze_holding(buf, Arc::clone(&held));
            let slice = bytes.slice(0..1);
            drop(bytes);
            assert_eq!(Arc::strong_count(&held), 2);
            drop(slice);
            assert_eq!(Arc::strong_count(&held), 1);
        }
    }
}
