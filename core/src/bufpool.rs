//! Recycled large buffers for the data path (read segments, pack buffers).
//!
//! Allocating a fresh multi-megabyte buffer for every segment and pack costs a page fault per
//! 4 KiB when it is first written, and once freed, glibc either unmaps it (faults again next
//! time) or keeps it in a per-thread arena where another thread cannot reuse it (resident memory
//! grows with the number of threads). The pool hands the same buffers round instead.
//!
//! * Size classes: capacities are rounded up to a power of two (at least [`MIN_POOLED`]), so a
//!   buffer is never more than twice what was asked for; smaller requests are plain allocations.
//! * Bounded: at most `retain` bytes of free buffers are kept; a buffer given back beyond that
//!   is freed. Buffers in use are bounded by their callers (the backup's byte budget).
//! * [`BufPool::freeze`] turns a buffer into [`Bytes`] that go back to the pool when the last
//!   clone or slice of them is dropped; [`BufPool::freeze_holding`] also keeps a value (e.g. a
//!   budget guard) alive until then.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Requests below this are not pooled: the allocator serves them well.
pub const MIN_POOLED: usize = 1024 * 1024;

#[derive(Debug)]
pub struct BufPool {
    retain: usize,
    state: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    /// Free buffers, each of a power-of-two capacity.
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufPool {
    /// A pool keeping at most `retain` bytes of free buffers.
    pub fn new(retain: usize) -> Arc<BufPool> {
        Arc::new(BufPool { retain, state: Mutex::new(Free::default()) })
    }

    fn class(min_capacity: usize) -> usize {
        min_capacity.max(MIN_POOLED).next_power_of_two()
    }

    /// An empty buffer with room for at least `min_capacity` bytes.
    pub fn take(&self, min_capacity: usize) -> Vec<u8> {
        if min_capacity < MIN_POOLED {
            return Vec::with_capacity(min_capacity);
        }
        let class = Self::class(min_capacity);
        let mut free = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = free.buffers.iter().position(|b| b.capacity() == class) {
            let buf = free.buffers.swap_remove(i);
            free.bytes -= buf.capacity();
            return buf;
        }
        drop(free);
        Vec::with_capacity(class)
    }

    /// Gives a buffer back for reuse (or frees it when the pool is full or it is not pooled).
    pub fn give(&self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < MIN_POOLED || !cap.is_power_of_two() {
            return;
        }
        buf.clear();
        let mut free = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if free.bytes + cap <= self.retain {
            free.bytes += cap;
            free.buffers.push(buf);
        }
    }

    /// The buffer as shared bytes; it returns to the pool when the last reference is dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        self.freeze_holding(buf, ())
    }

    /// Like [`BufPool::freeze`]; `hold` is dropped when the buffer is.
    pub fn freeze_holding<H: Send + 'static>(self: &Arc<Self>, buf: Vec<u8>, hold: H) -> Bytes {
        if buf.capacity() < MIN_POOLED {
            return Bytes::from_owner(Held { buf, _hold: hold });
        }
        Bytes::from_owner(Pooled { buf, pool: Arc::clone(self), _hold: hold })
    }

    /// Bytes of free buffers held.
    pub fn free_bytes(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).bytes
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

    #[test]
    fn buffers_come_back_and_are_reused() {
        let pool = BufPool::new(8 * MIN_POOLED);
        let mut a = pool.take(3 * MIN_POOLED / 2);
        assert_eq!(a.capacity(), 2 * MIN_POOLED);
        a.extend_from_slice(&[7u8; 1000]);
        let ptr = a.as_ptr();
        let bytes = pool.freeze(a);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.free_bytes(), 0, "a slice still holds the buffer");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.free_bytes(), 2 * MIN_POOLED);
        let b = pool.take(2 * MIN_POOLED);
        assert_eq!(b.as_ptr(), ptr, "the same buffer is handed out again");
        assert!(b.is_empty());
        assert_eq!(pool.free_bytes(), 0);
        // Another class is a new allocation.
        assert_eq!(pool.take(MIN_POOLED).capacity(), MIN_POOLED);
    }

    #[test]
    fn retention_is_bounded_and_small_buffers_are_not_pooled() {
        let pool = BufPool::new(3 * MIN_POOLED);
        let bufs: Vec<_> = (0..4).map(|_| pool.take(MIN_POOLED)).collect();
        for b in bufs {
            pool.give(b);
        }
        assert_eq!(pool.free_bytes(), 3 * MIN_POOLED);
        pool.give(Vec::with_capacity(4096));
        assert_eq!(pool.free_bytes(), 3 * MIN_POOLED);
        assert_eq!(pool.take(100).capacity(), 100);
        let small = pool.freeze(vec![1, 2, 3]);
        assert_eq!(&small[..], &[1, 2, 3]);
    }

    #[test]
    fn held_values_live_as_long_as_the_bytes() {
        let pool = BufPool::new(4 * MIN_POOLED);
        for cap in [10, MIN_POOLED] {
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
