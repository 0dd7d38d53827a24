//! Small helpers shared by the library.

pub fn hostname() -> String {
    let uts = rustix::system::uname();
    uts.nodename().to_string_lossy().into_owned()
}

pub fn username() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid-{}", rustix::process::getuid().as_raw()))
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Caps glibc's malloc arenas at the number of cores (glibc's default is 8 per core); call
/// once, early in `main`. The data path allocates buffers on one thread and frees them on
/// another (readers, sealing threads, the runtime's blocking pool); each extra arena keeps
/// freed memory of its own, so peak RSS grew with the number of threads and the length of the
/// run (~20 MiB on the 1 GiB bench dataset). No effect with other C libraries, or when
/// `MALLOC_ARENA_MAX` is set (the environment wins).
#[allow(unsafe_code)]
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX is valid on glibc.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Moves the calling thread to the idle scheduling class (`SCHED_IDLE`): it then runs only on
/// a core that nothing else wants. For work that merely helps others along (the backup's
/// warm-up walk). Best effort: returns whether the class changed (never on other systems).
#[allow(unsafe_code)]
pub fn run_thread_when_idle() -> bool {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: changes only the calling thread's (pid 0) policy; `param` is valid for
        // SCHED_IDLE, which takes priority 0.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`], for a process that runs backups only
/// (the `hoard backup` command). No effect with other C libraries, or when
/// `MALLOC_MMAP_THRESHOLD_` is set.
///
/// By default glibc raises the threshold to the size of every large block freed (up to
/// 32 MiB), so after the first multi-megabyte segment or sealed blob is freed, all of them come
/// from the arenas, whose free space fragments and is rarely returned. With the threshold
/// fixed, large blocks are mapped and unmapped one by one, and the backup recycles its large
/// buffers ([`crate::bufpool`]) so they are not refaulted. Measured on the 2 GiB bench dataset,
/// peak RSS of an initial backup: 160-190 MiB before, 112-120 MiB with the buffers recycled
/// and the threshold fixed (170 MiB recycled alone). Not for restores: they allocate each
/// blob's buffers afresh, and mapping and unmapping each one (page faults, TLB shootdowns
/// across threads) took a 2 GiB restore from 4 s of system time to 6-11 s.
#[allow(unsafe_code)]
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; setting M_MMAP_THRESHOLD (valid on
        // glibc) also turns off its dynamic adjustment.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Keeps freed heap memory for reuse, for a process that runs restores only (the `hoard
/// restore` command): large blocks up to 32 MiB (glibc's ceiling) come from the arenas, and
/// the arenas give memory back only above [`RESTORE_TRIM_THRESHOLD`] free at their top. No
/// effect with other C libraries, or when `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_`
/// is set.
///
/// A restore allocates each blob's read, decrypt and decompress buffers afresh, and the
/// object store's reads zero-fill theirs. With glibc's defaults the arenas shrink after each
/// burst and the next one faults its pages in again: on the 1 GiB bench dataset 100-125k
/// page faults per restore, 29-39k with memory held, and 4-7 % less wall time in alternating
/// runs. The price is peak RSS, which then depends on how the arenas fragment: on the 2 GiB
/// bench data 80-91 MiB with memory held, 73.5 MiB (the key derivation's peak) with glibc's
/// trimming, which took 620-690k page faults instead of 18-20k and 3.5-3.9 s instead of
/// 3.0-3.45 s (3 alternating pairs). Recycling each worker's blob and read buffers instead
/// (per-worker scratch, a spare list of read buffers) held more: 96-113 MiB, no faster.
#[allow(unsafe_code)]
pub fn hold_heap_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() && std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets allocator parameters, both valid on glibc; a value it
        // rejects leaves the default in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, RESTORE_MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, RESTORE_TRIM_THRESHOLD);
        }
    }
}

/// The C heap's bytes in use and bytes free but held by the process (glibc's `mallinfo2`:
/// all arenas, blocks mapped on their own counted as in use); `None` with other C libraries.
#[allow(unsafe_code)]
pub fn heap_usage() -> Option<HeapUsage> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        Some(HeapUsage { in_use: m.uordblks + m.hblkhd, held_free: m.fordblks })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// See [`heap_usage`].
#[derive(Debug, Clone, Copy)]
pub struct HeapUsage {
    pub in_use: usize,
    pub held_free: usize,
}

/// [`hold_heap_memory`]'s mmap threshold: glibc's largest.
pub const RESTORE_MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;
/// [`hold_heap_memory`]'s trim threshold: free memory at an arena's top kept for reuse.
pub const RESTORE_TRIM_THRESHOLD: libc::c_int = 256 * 1024 * 1024;

/// Blocks this large and larger are mapped on their own and unmapped when freed
/// ([`fix_mmap_threshold`]); glibc's initial default.
pub const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Human-readable byte counts (binary units), e.g. `1.50 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

/// Whether a buffer is entirely zero bytes (a hole candidate). Vectorises: OR-folds 64-byte blocks.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Soft and hard limits on open file descriptors.
pub fn nofile_limit() -> (u64, u64) {
    let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    (l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX))
}

/// Raises the soft limit on open descriptors (deep trees hold one per level).
pub fn set_nofile_limit(n: u64) {
    let (_, hard) = nofile_limit();
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit { current: Some(n.min(hard)), maximum: Some(hard) },
    );
}

/// A private anonymous mapping asked to be backed by 2 MiB pages (`MADV_HUGEPAGE`, best effort),
/// unmapped on drop. Its bytes start zero: the kernel clears anonymous pages on first touch.
#[derive(Debug)]
pub struct HugeMapping {
    addr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by one `HugeMapping` and reached only through it, like a `Vec`'s
// allocation.
#[allow(unsafe_code)]
unsafe impl Send for HugeMapping {}
#[allow(unsafe_code)]
unsafe impl Sync for HugeMapping {}

impl HugeMapping {
    const HUGE_PAGE: usize = 2 * 1024 * 1024;

    /// `len` bytes (non-zero), starting on a 2 MiB boundary with `aligned` (so that every whole
    /// 2 MiB of it can be a huge page); `None` when the kernel refuses the mapping.
    #[allow(unsafe_code)]
    pub fn new(len: usize, aligned: bool) -> Option<HugeMapping> {
        let reserve = if aligned { len.checked_add(Self::HUGE_PAGE)? } else { len };
        if len == 0 {
            return None;
        }
        // SAFETY: a private anonymous mapping at an address the kernel picks touches no
        // existing memory; the result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base as usize;
        let start = if aligned { base.next_multiple_of(Self::HUGE_PAGE) } else { base };
        let end = (start + len).next_multiple_of(page_size());
        // SAFETY: both trimmed ranges lie inside the mapping just made and outside the part
        // kept (page-aligned: `base` and `start` are, `end` is rounded up); madvise only changes
        // how the kept part is backed.
        unsafe {
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            if base + reserve > end {
                libc::munmap(end as *mut libc::c_void, base + reserve - end);
            }
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        std::ptr::NonNull::new(start as *mut u8).map(|addr| HugeMapping { addr, len })
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.addr.as_ptr()
    }

    #[allow(unsafe_code)]
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` mapped bytes, readable and writable, live as long as `self`; anonymous
        // pages start zero, so every byte is initialised.
        unsafe { std::slice::from_raw_parts(self.addr.as_ptr(), self.len) }
    }

    #[allow(unsafe_code)]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.addr.as_ptr(), self.len) }
    }
}

impl Drop for HugeMapping {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range kept in `new` (the kernel rounds `len` up to whole
        // pages, as it did when mapping); no reference into it outlives `self`.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}

#[allow(unsafe_code)]
fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_sent_to_idle_runs_in_the_idle_class() {
        const SCHED_IDLE: u32 = 5;
        // Scheduling policy of the calling thread: field 41 of its stat (fields after the
        // parenthesised name start at field 3).
        fn own_policy() -> u32 {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            after.split(' ').nth(41 - 3).unwrap().parse().unwrap()
        }
        let (before, changed, after) = std::thread::spawn(|| {
            let before = own_policy();
            let changed = super::run_thread_when_idle();
            (before, changed, own_policy())
        })
        .join()
        .unwrap();
        assert_ne!(before, SCHED_IDLE);
        assert!(changed);
        assert_eq!(after, SCHED_IDLE);
    }
}
