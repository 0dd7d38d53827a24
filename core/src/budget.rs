//! A byte budget shared by pipeline stages: a counting semaphore over bytes.
//!
//! `acquire(n)` blocks the calling thread until `n` bytes are free; the returned guard gives them
//! back when dropped. A request larger than the whole budget is clamped to the budget, so it
//! proceeds once everything else has drained rather than deadlocking. The budget records how
//! many callers are waiting ([`Budget::has_waiters`]), so a stage that holds guards while it
//! batches (the packer) can release them early instead of waiting for more input that cannot
//! come, and its high-water mark ([`Budget::high_water`]).

use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    used: usize,
    waiting: usize,
    high_water: usize,
}

#[derive(Debug)]
pub struct Budget {
    total: usize,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug)]
pub struct BudgetGuard {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(total: usize) -> Arc<Budget> {
        Arc::new(Budget { total: total.max(1), state: Mutex::new(State::default()), freed: Condvar::new() })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn in_use(&self) -> usize {
        self.state().used
    }

    /// Most bytes ever held at once.
    pub fn high_water(&self) -> usize {
        self.state().high_water
    }

    /// Whether some caller is blocked in [`Budget::acquire`].
    pub fn has_waiters(&self) -> bool {
        self.state().waiting > 0
    }

    /// `bytes` (clamped like [`Budget::acquire`]) if they are free now and nobody is waiting for
    /// room; never blocks.
    pub fn try_acquire(self: &Arc<Self>, bytes: usize) -> Option<BudgetGuard> {
        let bytes = bytes.min(self.total);
        let mut st = self.state();
        if st.waiting > 0 || st.used + bytes > self.total {
            return None;
        }
        st.used += bytes;
        st.high_water = st.high_water.max(st.used);
        Some(BudgetGuard { budget: Arc::clone(self), bytes })
    }

    pub fn acquire(self: &Arc<Self>, bytes: usize) -> BudgetGuard {
        let bytes = bytes.min(self.total);
        let mut st = self.state();
        if st.used + bytes > self.total {
            st.waiting += 1;
            while st.used + bytes > self.total {
                st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.waiting -= 1;
        }
        st.used += bytes;
        st.high_water = st.high_water.max(st.used);
        BudgetGuard { budget: Arc::clone(self), bytes }
    }
}

impl BudgetGuard {
    /// The budget these bytes belong to.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let mut st = self.budget.state();
        st.used -= self.bytes;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_until_released() {
        let b = Budget::new(100);
        let g = b.acquire(80);
        let b2 = Arc::clone(&b);
        let t = std::thread::spawn(move || {
            let _g = b2.acquire(50);
            b2.in_use()
        });
        // The second caller is seen waiting (bounded: 5 s).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !b.has_waiters() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(b.has_waiters());
        assert_eq!(b.in_use(), 80);
        drop(g);
        assert_eq!(t.join().unwrap(), 50);
        assert_eq!(b.in_use(), 0);
        assert!(!b.has_waiters());
        assert_eq!(b.high_water(), 80);
        // Never blocks: refused while the room is taken, granted once it is free.
        let g = b.acquire(60);
        assert!(b.try_acquire(50).is_none());
        let t = b.try_acquire(40).unwrap();
        assert_eq!(b.in_use(), 100);
        drop((g, t));
        // Oversized requests are clamped, not deadlocked.
        let big = b.acquire(1000);
        assert_eq!(b.in_use(), 100);
        assert_eq!(big.bytes(), 100);
        assert_eq!(b.high_water(), 100);
    }
}
