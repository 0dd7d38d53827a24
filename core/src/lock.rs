//! Repository locks: shared for writers (backup, copy into), exclusive for prune and repair.
//!
//! A lock is a sealed JSON object `locks/<id>` with its holder and the time of its last refresh.
//! The holder rewrites it every `refresh` interval (new object first, then the old one deleted).
//!
//! Acquisition writes the lock first and then lists: an exclusive lock backs off when any other
//! fresh lock exists, a shared lock when a fresh exclusive lock exists. Two racing acquirers may
//! both back off, never both proceed.
//!
//! Staleness ([`LockInfo::is_stale_for`], pure): another process treats a lock as stale when its
//! time is older than `stale_after` by the observer's wall clock, or at once when it names the
//! observer's own host, boot and PID namespace and a process that no longer exists. Wall clocks
//! of holder and observer may disagree by up to `max_clock_skew`: the holder's lease (below)
//! lasts only `stale_after − max_clock_skew` after each refresh, so an observer whose clock runs
//! ahead by at most that much never judges a lock stale while its holder still trusts it.
//!
//! Lease rule (restic's lesson, PR #4374): a lock whose refresh came later than the lease after
//! the previous one may already have been judged stale by a pruner, so the lease is lost for
//! good. [`LockGuard::check`] fails once that happened (measured on the holder's monotonic
//! clock), and writers call it before and after they write a snapshot; a backup frozen past the
//! lease therefore fails cleanly instead of leaving a snapshot whose data a concurrent prune may
//! have deleted.
//!
//! Interruption: every lock this process wrote and has not deleted is recorded in a process-wide
//! list, so a binary that catches SIGINT or SIGTERM can delete them on its way out
//! ([`release_held_locks`]) instead of leaving them to go stale.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::crypto::SealType;
use crate::error::{Error, ObjectKind, Result};
use crate::id::Id;
use crate::repo::Repository;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    pub time: DateTime<Utc>,
    pub exclusive: bool,
    pub host: String,
    pub username: String,
    pub pid: u32,
    /// `/proc/sys/kernel/random/boot_id` of the holder: a PID names a process only within one boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Inode of the holder's PID namespace: the same PID in another container is another process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<u64>,
    /// The holder's stale age in seconds (its `HOARD_LOCK_STALE_SECONDS`): an observer waits for
    /// the larger of this and its own, so a holder that refreshes less often than the observer
    /// would expect is not judged stale between refreshes. Capped at [`MAX_RECORDED_STALE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after_secs: Option<u64>,
}

/// Most bytes a lock object may hold (hoard's are a few hundred); larger ones are reported
/// damaged from their listed size, never downloaded.
pub const MAX_LOCK_LEN: usize = 64 * 1024;

/// The most a lock's recorded stale age counts for: a planted lock cannot block prune for
/// longer than a day.
pub const MAX_RECORDED_STALE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy)]
pub struct LockTimes {
    pub refresh: Duration,
    pub stale_after: Duration,
    /// How far the wall clocks of a holder and an observer may disagree without harm.
    pub max_clock_skew: Duration,
}

impl Default for LockTimes {
    /// Refresh every 5 minutes, stale after 30 (restic's values), 10 minutes of tolerated clock
    /// skew, unless `HOARD_LOCK_STALE_SECONDS` sets the stale age (refresh is then a sixth of it
    /// and the tolerated skew a third).
    fn default() -> Self {
        match std::env::var("HOARD_LOCK_STALE_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(secs) => LockTimes::for_stale_age(Duration::from_secs(secs.max(1))),
            None => LockTimes::for_stale_age(Duration::from_secs(1800)),
        }
    }
}

impl LockTimes {
    /// Refresh a sixth, tolerated skew a third of the stale age.
    pub fn for_stale_age(stale_after: Duration) -> Self {
        LockTimes { refresh: stale_after / 6, stale_after, max_clock_skew: stale_after / 3 }
    }

    /// How long after its last refresh a holder may still rely on its lock.
    pub fn lease(&self) -> Duration {
        self.stale_after.saturating_sub(self.max_clock_skew)
    }
}

/// Who is looking at a lock: the facts the same-process shortcut of [`LockInfo::is_stale`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observer {
    pub host: String,
    pub boot_id: Option<String>,
    pub pid_ns: Option<u64>,
}

impl Observer {
    /// This process.
    pub fn local() -> Self {
        Observer { host: crate::util::hostname(), boot_id: boot_id(), pid_ns: pid_ns() }
    }
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

fn pid_ns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

impl LockInfo {
    /// Opens and parses the lock object `locks/<id>`.
    pub fn decode(keys: &crate::crypto::Keys, id: &Id, sealed: &[u8]) -> Result<LockInfo> {
        let plain = keys.open_meta(SealType::Lock, ObjectKind::Lock, &format!("locks/{}", id.to_hex()), sealed)?;
        serde_json::from_slice::<LockInfo>(&plain)
            .map_err(|e| Error::corrupt(ObjectKind::Lock, id.to_hex(), e.to_string()))
    }

    /// Stale by this process's view (see the module docs for the rule).
    pub fn is_stale(&self, now: DateTime<Utc>, times: &LockTimes) -> bool {
        self.is_stale_for(now, times, &Observer::local(), process_alive)
    }

    /// Pure: stale when older than `stale_after` by the observer's clock `now`, or when the holder
    /// provably is a process of the observer's own host, boot and PID namespace that is gone. A
    /// lock lacking boot id or namespace (or an observer lacking them) only ages out.
    pub fn is_stale_for(
        &self,
        now: DateTime<Utc>,
        times: &LockTimes,
        observer: &Observer,
        alive: impl Fn(u32) -> bool,
    ) -> bool {
        // A lock time in the future (holder's clock ahead) gives age 0: fresh.
        let age = now.signed_duration_since(self.time).to_std().unwrap_or_default();
        let recorded = self.stale_after_secs.map_or(Duration::ZERO, Duration::from_secs).min(MAX_RECORDED_STALE);
        if age > times.stale_after.max(recorded) {
            return true;
        }
        let same_pid_space = self.host == observer.host
            && self.boot_id.is_some()
            && self.boot_id == observer.boot_id
            && self.pid_ns.is_some()
            && self.pid_ns == observer.pid_ns;
        same_pid_space && !alive(self.pid)
    }
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

async fn write_lock(repo: &Repository, exclusive: bool) -> Result<Id> {
    let info = LockInfo {
        time: Utc::now(),
        exclusive,
        host: crate::util::hostname(),
        username: crate::util::username(),
        pid: std::process::id(),
        boot_id: boot_id(),
        pid_ns: pid_ns(),
        stale_after_secs: Some(LockTimes::default().stale_after.as_secs()),
    };
    let json = serde_json::to_vec(&info).map_err(|e| Error::Internal(e.to_string()))?;
    repo.save_file("locks", repo.keys().seal_meta(SealType::Lock, &json)?).await
}

/// All locks with their state; damaged lock files are reported as `Err`.
pub async fn list_locks(repo: &Repository) -> Result<Vec<(Id, Result<LockInfo>)>> {
    let mut out = Vec::new();
    for (id, size) in repo.list_sized("locks").await? {
        let info = match repo.load_listed(ObjectKind::Lock, "locks", &id, size, MAX_LOCK_LEN).await {
            Ok(raw) => LockInfo::decode(repo.keys(), &id, &raw),
            // Deleted between list and read: its holder finished.
            Err(Error::Missing { .. }) => continue,
            Err(e) => Err(e),
        };
        out.push((id, info));
    }
    Ok(out)
}

/// Removes stale locks (all locks with `all`); returns how many.
pub async fn unlock(repo: &Repository, all: bool) -> Result<usize> {
    let times = LockTimes::default();
    let now = Utc::now();
    let mut n = 0;
    for (id, info) in list_locks(repo).await? {
        let stale = match &info {
            Ok(i) => i.is_stale(now, &times),
            Err(_) => true,
        };
        if all || stale {
            repo.store().delete(&format!("locks/{}", id.to_hex())).await?;
            n += 1;
        }
    }
    Ok(n)
}

type Store = Arc<dyn crate::store::Store>;
/// A live guard's entry: its serial, store and lease state (which holds the current lock id).
type HeldLock = (u64, Store, Arc<Mutex<LeaseState>>);

/// Locks of live guards in this process: store and current lock id (a refresh replaces the id
/// in place). Added on acquisition; removed by release, or on drop, which moves the lock to
/// [`ABANDONED`].
static HELD: Mutex<Vec<HeldLock>> = Mutex::new(Vec::new());
/// Locks of guards dropped without release (an error path, a cancelled task): the most recent
/// [`MAX_ABANDONED`], so a long-running process does not grow this list.
static ABANDONED: Mutex<Vec<(Store, Id)>> = Mutex::new(Vec::new());
const MAX_ABANDONED: usize = 64;
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn lock_list<T>(m: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Deletes every lock this process still holds or abandoned, for a process on its way out
/// (interrupted, or failed): its work has stopped, so nothing relies on them any more. Returns
/// how many were deleted.
pub async fn release_held_locks() -> usize {
    let mut locks: Vec<(Store, Id)> = std::mem::take(&mut *lock_list(&ABANDONED));
    locks.extend(
        std::mem::take(&mut *lock_list(&HELD))
            .into_iter()
            .map(|(_, store, state)| (store, state.lock().unwrap_or_else(|p| p.into_inner()).current)),
    );
    let mut n = 0;
    for (store, id) in locks {
        if store.delete(&format!("locks/{}", id.to_hex())).await.is_ok() {
            n += 1;
        }
    }
    n
}

struct LeaseState {
    current: Id,
    last_refresh: Instant,
    lost: Option<String>,
}

/// A held lock, refreshed in the background until dropped or released.
pub struct LockGuard {
    repo: Arc<Repository>,
    state: Arc<Mutex<LeaseState>>,
    times: LockTimes,
    refresher: tokio::task::JoinHandle<()>,
    /// Its entry in [`HELD`].
    serial: u64,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockGuard")
    }
}

impl LockGuard {
    /// Takes a shared or exclusive lock, or fails with [`Error::Locked`] naming the holder.
    pub async fn acquire(repo: Arc<Repository>, exclusive: bool) -> Result<LockGuard> {
        Self::acquire_with(repo, exclusive, LockTimes::default()).await
    }

    pub async fn acquire_with(repo: Arc<Repository>, exclusive: bool, times: LockTimes) -> Result<LockGuard> {
        // The lease runs from before the write: the lock's time is no earlier than this instant.
        let stamp = Instant::now();
        let mine = write_lock(&repo, exclusive).await?;
        let now = Utc::now();
        let others = match list_locks(&repo).await {
            Ok(l) => l,
            Err(e) => {
                let _ = repo.store().delete(&format!("locks/{}", mine.to_hex())).await;
                return Err(e);
            }
        };
        for (id, info) in others {
            if id == mine {
                continue;
            }
            let Ok(info) = info else { continue };
            if info.is_stale(now, &times) {
                continue;
            }
            if exclusive || info.exclusive {
                let _ = repo.store().delete(&format!("locks/{}", mine.to_hex())).await;
                return Err(Error::Locked(format!(
                    "{} lock held by {}@{} (pid {}) since {}; if that process is gone, wait {}s or run `hoard unlock`",
                    if info.exclusive { "an exclusive" } else { "a" },
                    info.username,
                    info.host,
                    info.pid,
                    info.time,
                    times.stale_after.as_secs()
                )));
            }
        }
        let state = Arc::new(Mutex::new(LeaseState { current: mine, last_refresh: stamp, lost: None }));
        let refresher = tokio::spawn(refresh_loop(Arc::clone(&repo), Arc::clone(&state), exclusive, times));
        let serial = NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock_list(&HELD).push((serial, Arc::clone(repo.store()), Arc::clone(&state)));
        Ok(LockGuard { repo, state, times, refresher, serial })
    }

    /// Fails if the lease may have lapsed: a refresh failed or came too late.
    pub fn check(&self) -> Result<()> {
        self.lease().check()
    }

    /// A cheap handle for checking the lease from other tasks and threads.
    pub fn lease(&self) -> Lease {
        Lease { state: Arc::clone(&self.state), times: self.times }
    }

    /// Stops refreshing and deletes the lock.
    pub async fn release(self) -> Result<()> {
        self.refresher.abort();
        let id = self.state.lock().unwrap_or_else(|p| p.into_inner()).current;
        lock_list(&HELD).retain(|(serial, _, _)| *serial != self.serial);
        self.repo.store().delete(&format!("locks/{}", id.to_hex())).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Without an explicit release (an error path) the lock becomes stale by itself; the
        // same-host check lets local processes ignore it at once. A process on its way out
        // deletes it ([`release_held_locks`]).
        self.refresher.abort();
        let mut held = lock_list(&HELD);
        if let Some(i) = held.iter().position(|(serial, _, _)| *serial == self.serial) {
            let (_, store, state) = held.swap_remove(i);
            drop(held);
            let id = state.lock().unwrap_or_else(|p| p.into_inner()).current;
            let mut abandoned = lock_list(&ABANDONED);
            if abandoned.len() >= MAX_ABANDONED {
                abandoned.remove(0);
            }
            abandoned.push((store, id));
        }
    }
}

/// Checks whether a [`LockGuard`]'s lease still holds.
#[derive(Clone)]
pub struct Lease {
    state: Arc<Mutex<LeaseState>>,
    times: LockTimes,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

impl Lease {
    pub fn check(&self) -> Result<()> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &s.lost {
            return Err(Error::Locked(format!("lock lost: {why}")));
        }
        if s.last_refresh.elapsed() >= self.times.lease() {
            return Err(Error::Locked("lock lost: not refreshed within the lease (process paused?)".into()));
        }
        Ok(())
    }
}

async fn refresh_loop(repo: Arc<Repository>, state: Arc<Mutex<LeaseState>>, exclusive: bool, times: LockTimes) {
    loop {
        tokio::time::sleep(times.refresh).await;
        let (old, last) = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            (s.current, s.last_refresh)
        };
        let stamp = Instant::now();
        match write_lock(&repo, exclusive).await {
            Ok(new) => {
                {
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    if last.elapsed() >= times.lease() && s.lost.is_none() {
                        s.lost = Some("a refresh came after the lock had become stale".into());
                    }
                    s.current = new;
                    s.last_refresh = stamp;
                }
                let _ = repo.store().delete(&format!("locks/{}", old.to_hex())).await;
            }
            Err(e) => tracing::warn!("lock refresh failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn times() -> LockTimes {
        LockTimes::for_stale_age(Duration::from_secs(1800))
    }

    fn observer() -> Observer {
        Observer { host: "node-a".into(), boot_id: Some("boot-1".into()), pid_ns: Some(4026531836) }
    }

    fn lock_at(time: DateTime<Utc>) -> LockInfo {
        LockInfo {
            time,
            exclusive: false,
            host: "node-a".into(),
            username: "root".into(),
            pid: 42,
            boot_id: Some("boot-1".into()),
            pid_ns: Some(4026531836),
            stale_after_secs: None,
        }
    }

    #[test]
    fn the_holders_longer_stale_age_is_honoured_up_to_a_day() {
        let alive = |_| true;
        let patient = LockInfo { stale_after_secs: Some(7200), ..lock_at(t(0)) };
        assert!(!patient.is_stale_for(t(1801), &times(), &observer(), alive), "the holder refreshes every 20 min");
        assert!(patient.is_stale_for(t(7201), &times(), &observer(), alive));
        let shorter = LockInfo { stale_after_secs: Some(60), ..lock_at(t(0)) };
        assert!(!shorter.is_stale_for(t(61), &times(), &observer(), alive), "the observer's own age still counts");
        let planted = LockInfo { stale_after_secs: Some(u64::MAX), ..lock_at(t(0)) };
        assert!(planted.is_stale_for(t(24 * 3600 + 1), &times(), &observer(), alive), "capped at a day");
    }

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_lock_ages_out_only_after_the_stale_age() {
        let l = lock_at(t(0));
        let alive = |_| true;
        assert!(!l.is_stale_for(t(1800), &times(), &observer(), alive));
        assert!(l.is_stale_for(t(1801), &times(), &observer(), alive));
        // The holder's clock ahead of the observer's: a lock from the future is fresh.
        assert!(!l.is_stale_for(t(-3600), &times(), &observer(), alive));
    }

    #[test]
    fn the_holders_lease_ends_before_a_skewed_observer_judges_it_stale() {
        let times = times();
        assert!(times.refresh < times.lease(), "a holder must refresh well within its lease");
        // The holder trusts its lock for `lease` after the refresh stamp; an observer whose
        // clock runs up to `max_clock_skew` ahead sees an age of at most `lease + skew` then.
        let l = lock_at(t(0));
        let skew = times.max_clock_skew.as_secs() as i64;
        let lease_end = times.lease().as_secs() as i64;
        assert!(!l.is_stale_for(t(lease_end + skew), &times, &observer(), |_| true));
        // More skew than tolerated is the documented limit of the rule.
        assert!(l.is_stale_for(t(lease_end + skew + 1), &times, &observer(), |_| true));
        let test = LockTimes::for_stale_age(Duration::from_secs(3));
        assert_eq!(test.lease(), Duration::from_secs(2));
        assert_eq!(test.refresh, Duration::from_millis(500));
    }

    #[test]
    fn a_dead_holder_is_stale_at_once_only_in_the_same_boot_and_pid_namespace() {
        let l = lock_at(t(0));
        let dead = |_| false;
        assert!(l.is_stale_for(t(1), &times(), &observer(), dead));
        assert!(!l.is_stale_for(t(1), &times(), &observer(), |_| true));
        // Same host name, other container (PID namespace): its PID means nothing here.
        let other_ns = Observer { pid_ns: Some(4026532000), ..observer() };
        assert!(!l.is_stale_for(t(1), &times(), &other_ns, dead));
        // Same host name after a reboot: PIDs were reused.
        let rebooted = Observer { boot_id: Some("boot-2".into()), ..observer() };
        assert!(!l.is_stale_for(t(1), &times(), &rebooted, dead));
        let other_host = Observer { host: "node-b".into(), ..observer() };
        assert!(!l.is_stale_for(t(1), &times(), &other_host, dead));
        // A lock written before boot id and namespace were recorded only ages out.
        let old = LockInfo { boot_id: None, pid_ns: None, ..lock_at(t(0)) };
        assert!(!old.is_stale_for(t(1), &times(), &observer(), dead));
        let unknown = Observer { boot_id: None, pid_ns: None, ..observer() };
        let mut l2 = lock_at(t(0));
        l2.boot_id = None;
        assert!(!l2.is_stale_for(t(1), &times(), &unknown, dead));
    }

    #[test]
    fn old_lock_objects_without_the_new_fields_still_decode() {
        let json = r#"{"time":"2026-01-01T00:00:00Z","exclusive":true,"host":"h","username":"u","pid":7}"#;
        let l: LockInfo = serde_json::from_str(json).unwrap();
        assert_eq!((l.boot_id, l.pid_ns), (None, None));
    }

    #[test]
    fn the_lease_is_lost_once_the_last_refresh_is_older_than_the_lease() {
        let times = LockTimes::for_stale_age(Duration::from_secs(60));
        let lease = |ago: Duration| Lease {
            state: Arc::new(Mutex::new(LeaseState {
                current: Id([0; 32]),
                last_refresh: Instant::now().checked_sub(ago).unwrap(),
                lost: None,
            })),
            times,
        };
        assert!(lease(Duration::from_secs(1)).check().is_ok());
        let e = lease(times.lease()).check().unwrap_err();
        assert!(matches!(e, Error::Locked(_)) && e.to_string().contains("lock lost"), "{e}");
        // Once lost, lost for good.
        let l = lease(Duration::from_secs(1));
        l.state.lock().unwrap().lost = Some("late refresh".into());
        assert!(l.check().is_err());
    }
}
