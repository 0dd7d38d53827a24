//! Fault injection: a seeded [`Store`] decorator that makes storage misbehave the way real
//! object stores do, for tests and failure drills.
//!
//! ```text
//! RetryStore::new(FaultyStore::new(backend, cfg), policy)
//! ```
//! Each call draws from a small seeded xorshift generator whether it fails and how:
//!
//! | [`Fault`]          | what the caller sees                       | effect on the inner store     |
//! |--------------------|--------------------------------------------|-------------------------------|
//! | `ServerError`      | retryable `injected 503 SlowDown`          | none                          |
//! | `Throttle`         | retryable `injected 429 Too Many Requests` | none                          |
//! | `Timeout`          | hangs for [`FaultConfig::timeout`], then a retryable error | the request may or may not have been applied (a coin from the same generator) |
//! | `LostResponse`     | retryable "connection reset" error         | the call was fully applied    |
//! | `DroppedRequest`   | retryable "connection reset" error         | none                          |
//!
//! [`FaultConfig`] can restrict faults to some operations ([`Op`]), to keys under a prefix, and
//! to a total number, and adds latency to every call. [`FaultHandle`] changes the rate at run
//! time (an outage that starts or ends) and exposes the [`FaultCounters`].
//!
//! `LostResponse` and `DroppedRequest` are the two halves of a torn write. On a `put`, the first
//! leaves the complete object stored although the caller saw an error: the retry then meets
//! [`Error::AlreadyExists`], which [`crate::store::RetryStore`] treats as success on a retry
//! because object names are content hashes (the object there is the one being written).
//!
//! # Why a truncated object is never injected
//!
//! A torn write in the sense of "a prefix of the bytes is visible under the object's name" is not
//! something the supported backends can produce, so injecting it would test a failure that
//! cannot happen (and, because `put` is create-only, it would wedge the key forever):
//! * S3 and the other object stores commit a PUT atomically. The object becomes visible only
//!   once the whole body has arrived and matched its declared length (and checksum, when sent);
//!   a connection that dies mid-body leaves nothing. Multipart objects appear only at
//!   `CompleteMultipartUpload`. The possible outcomes of a failed PUT are therefore "nothing
//!   stored" or "everything stored but the answer was lost" — exactly `DroppedRequest` and
//!   `LostResponse`.
//! * The filesystem backend writes `<name>#<n>` first and publishes it with a hard link (for
//!   create-only puts) or a rename, both atomic. A crash leaves at most the temporary file, which
//!   listings skip (keys containing `#` are not objects), never a short file under the real name.
//!
//! Damage at rest (bit rot, a file truncated by hand) is a different failure: every object name is
//! the hash of its bytes, so readers detect it; the damage tests exercise that path.
//!
//! # Determinism
//!
//! The generator's sequence depends only on the seed, so a single-threaded caller sees the same
//! faults on every run. Concurrent callers draw in scheduling order, so which call gets which
//! fault may vary between runs, while the rate and mix stay the same.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Class, Error, Result};
use crate::store::{ObjectInfo, Store};

/// One kind of injected failure. All of them are retryable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// A 5xx answer; nothing was done.
    ServerError,
    /// A throttling answer; nothing was done.
    Throttle,
    /// No answer within the timeout; the request may or may not have been applied.
    Timeout,
    /// The request was applied but its answer was lost (for `put`: the object is stored).
    LostResponse,
    /// The connection died before the request reached the store; nothing was done.
    DroppedRequest,
}

impl Fault {
    pub const ALL: [Fault; 5] =
        [Fault::ServerError, Fault::Throttle, Fault::Timeout, Fault::LostResponse, Fault::DroppedRequest];
}

/// A kind of store call, for limiting faults to some of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    /// `get` and `get_range`.
    Get,
    List,
    Delete,
}

impl Op {
    pub const ALL: [Op; 4] = [Op::Put, Op::Get, Op::List, Op::Delete];
}

/// What to inject and how often.
#[derive(Debug, Clone)]
pub struct FaultConfig {
    pub seed: u64,
    /// Probability that a call fails, in `0..=1` (clamped; NaN means 0).
    pub rate: f64,
    /// The faults to choose from, uniformly. Empty injects nothing.
    pub kinds: Vec<Fault>,
    /// Added delay for every call, drawn uniformly from `min..=max`.
    pub latency: Option<(Duration, Duration)>,
    /// How long an injected [`Fault::Timeout`] hangs before failing.
    pub timeout: Duration,
    /// Only these kinds of calls are eligible for faults.
    pub ops: Vec<Op>,
    /// Only calls whose key (or listing prefix) starts with this are eligible for faults.
    pub key_prefix: Option<String>,
    /// Stop injecting after this many faults.
    pub max_faults: Option<u64>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 0,
            rate: 0.0,
            kinds: Fault::ALL.to_vec(),
            latency: None,
            timeout: Duration::from_millis(20),
            ops: Op::ALL.to_vec(),
            key_prefix: None,
            max_faults: None,
        }
    }
}

impl FaultConfig {
    /// All kinds of faults at `rate`, no latency.
    pub fn new(seed: u64, rate: f64) -> Self {
        FaultConfig { seed, rate, ..Default::default() }
    }
}

/// Counts of calls and injected faults.
#[derive(Debug, Default)]
pub struct FaultCounters {
    pub calls: AtomicU64,
    pub server_errors: AtomicU64,
    pub throttles: AtomicU64,
    pub timeouts: AtomicU64,
    pub lost_responses: AtomicU64,
    pub dropped_requests: AtomicU64,
}

impl FaultCounters {
    fn counter(&self, f: Fault) -> &AtomicU64 {
        match f {
            Fault::ServerError => &self.server_errors,
            Fault::Throttle => &self.throttles,
            Fault::Timeout => &self.timeouts,
            Fault::LostResponse => &self.lost_responses,
            Fault::DroppedRequest => &self.dropped_requests,
        }
    }

    /// How many faults of this kind were injected.
    pub fn of(&self, f: Fault) -> u64 {
        self.counter(f).load(Ordering::Relaxed)
    }

    /// All injected faults.
    pub fn injected(&self) -> u64 {
        Fault::ALL.iter().map(|f| self.of(*f)).sum()
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl fmt::Display for FaultCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls, {} faults ({} server errors, {} throttles, {} timeouts, {} lost responses, {} dropped requests)",
            self.calls(),
            self.injected(),
            self.of(Fault::ServerError),
            self.of(Fault::Throttle),
            self.of(Fault::Timeout),
            self.of(Fault::LostResponse),
            self.of(Fault::DroppedRequest),
        )
    }
}

/// Controls a [`FaultyStore`] after it has been wrapped: change the rate, read the counters.
#[derive(Debug)]
pub struct FaultHandle {
    rate_bits: AtomicU64,
    counters: FaultCounters,
}

impl FaultHandle {
    pub fn set_rate(&self, rate: f64) {
        self.rate_bits.store(clamp_rate(rate).to_bits(), Ordering::SeqCst);
    }

    pub fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::SeqCst))
    }

    pub fn counters(&self) -> &FaultCounters {
        &self.counters
    }
}

fn clamp_rate(rate: f64) -> f64 {
    if rate.is_nan() { 0.0 } else { rate.clamp(0.0, 1.0) }
}

/// xorshift64*: tiny, fast, and good enough to pick faults.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so seeds 0, 1, 2 … start far apart and the state is never 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 1 } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

/// What one call will suffer, drawn up front so one lock covers all draws.
struct Plan {
    delay: Option<Duration>,
    fault: Option<Fault>,
    /// For a timeout: whether the request reached the store before the client gave up.
    applied: bool,
}

/// A [`Store`] that injects retryable faults into calls to `inner`; see the module docs.
pub struct FaultyStore<S: Store> {
    inner: S,
    cfg: FaultConfig,
    rng: Mutex<Rng>,
    remaining: Option<AtomicU64>,
    handle: Arc<FaultHandle>,
}

impl<S: Store> fmt::Debug for FaultyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({:?}, rate {}, seed {})", self.inner, self.handle.rate(), self.cfg.seed)
    }
}

impl<S: Store> FaultyStore<S> {
    pub fn new(inner: S, cfg: FaultConfig) -> Self {
        let handle = Arc::new(FaultHandle {
            rate_bits: AtomicU64::new(clamp_rate(cfg.rate).to_bits()),
            counters: FaultCounters::default(),
        });
        FaultyStore {
            inner,
            rng: Mutex::new(Rng::new(cfg.seed)),
            remaining: cfg.max_faults.map(AtomicU64::new),
            cfg,
            handle,
        }
    }

    /// A handle that stays usable after the store is wrapped or shared.
    pub fn handle(&self) -> Arc<FaultHandle> {
        Arc::clone(&self.handle)
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn plan(&self, op: Op, key: &str) -> Plan {
        self.handle.counters.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let delay = self.cfg.latency.map(|(min, max)| {
            let (lo, hi) = if min <= max { (min, max) } else { (max, min) };
            lo + (hi - lo).mul_f64(rng.unit())
        });
        let roll = rng.unit();
        let pick = rng.below(self.cfg.kinds.len());
        let applied = rng.unit() < 0.5;
        drop(rng);
        let eligible = !self.cfg.kinds.is_empty()
            && roll < self.handle.rate()
            && self.cfg.ops.contains(&op)
            && self.cfg.key_prefix.as_deref().is_none_or(|p| key.starts_with(p))
            && self
                .remaining
                .as_ref()
                .is_none_or(|r| r.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok());
        let fault = eligible.then(|| self.cfg.kinds[pick]);
        if let Some(f) = fault {
            self.handle.counters.counter(f).fetch_add(1, Ordering::Relaxed);
        }
        Plan { delay, fault, applied }
    }

    /// Runs `call` against the inner store under whatever fault the generator picks.
    async fn call<T, Fut>(&self, op: Op, key: &str, call: impl FnOnce() -> Fut) -> Result<T>
    where
        Fut: std::future::Future<Output = Result<T>>,
    {
        let plan = self.plan(op, key);
        if let Some(d) = plan.delay {
            tokio::time::sleep(d).await;
        }
        let Some(fault) = plan.fault else {
            return call().await;
        };
        let message = match fault {
            Fault::ServerError => "injected 503 SlowDown".to_string(),
            Fault::Throttle => "injected 429 Too Many Requests".to_string(),
            Fault::Timeout => {
                if plan.applied {
                    let _ = call().await;
                }
                tokio::time::sleep(self.cfg.timeout).await;
                format!("injected timeout after {:?}", self.cfg.timeout)
            }
            Fault::LostResponse => {
                let _ = call().await;
                "injected connection reset: request completed, response lost".to_string()
            }
            Fault::DroppedRequest => "injected connection reset: request not sent".to_string(),
        };
        let op = match op {
            Op::Put => "put",
            Op::Get => "get",
            Op::List => "list",
            Op::Delete => "delete",
        };
        tracing::debug!(op, key, %message, "fault injected");
        Err(Error::Storage { op, key: key.to_string(), message, class: Class::Retryable })
    }
}

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.call(Op::Put, key, || self.inner.put(key, data)).await
    }

    async fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        self.call(Op::Put, key, || self.inner.put_parts(key, parts)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.call(Op::Get, key, || self.inner.get(key)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.call(Op::Get, key, || self.inner.get_range(key, range)).await
    }

    async fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.call(Op::Get, key, || self.inner.get_ranges(key, ranges)).await
    }

    async fn get_ranges_once(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.call(Op::Get, key, || self.inner.get_ranges_once(key, ranges)).await
    }

    async fn get_metadata_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.call(Op::Get, key, || self.inner.get_metadata_ranges(key, ranges)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.call(Op::List, prefix, || self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.call(Op::Delete, key, || self.inner.delete(key)).await
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ObjectStoreBackend, RetryPolicy, RetryStore};

    fn memory() -> ObjectStoreBackend {
        ObjectStoreBackend::new(Arc::new(object_store::memory::InMemory::new()), "", "memory:".into())
    }

    fn only(kind: Fault, rate: f64) -> FaultConfig {
        FaultConfig { seed: 7, rate, kinds: vec![kind], timeout: Duration::from_millis(1), ..Default::default() }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            deadline: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn same_seed_same_faults_and_rate_is_respected() {
        async fn pattern(seed: u64) -> Vec<bool> {
            let s = FaultyStore::new(memory(), FaultConfig::new(seed, 0.3));
            let mut out = Vec::new();
            for i in 0..400 {
                out.push(s.get(&format!("k{i}")).await.is_err_and(|e| e.is_retryable()));
            }
            out
        }
        let a = pattern(1).await;
        assert_eq!(a, pattern(1).await);
        assert_ne!(a, pattern(2).await);
        let n = a.iter().filter(|x| **x).count();
        assert!((80..=160).contains(&n), "{n} faults in 400 calls at 30 %");
    }

    #[tokio::test]
    async fn rate_zero_injects_nothing_and_rate_one_everything() {
        let s = FaultyStore::new(memory(), FaultConfig::new(3, 0.0));
        let h = s.handle();
        s.put("a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(s.get("a").await.unwrap(), Bytes::from_static(b"1"));
        assert_eq!(h.counters().injected(), 0);
        h.set_rate(1.0);
        for _ in 0..20 {
            let e = s.get("a").await.unwrap_err();
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().contains("injected"), "{e}");
        }
        assert_eq!(h.counters().injected(), 20);
        assert_eq!(h.counters().calls(), 22);
    }

    #[tokio::test]
    async fn lost_response_stores_and_dropped_request_does_not() {
        let s = FaultyStore::new(memory(), only(Fault::LostResponse, 1.0));
        assert!(s.put("x", Bytes::from_static(b"data")).await.is_err());
        assert_eq!(s.inner().get("x").await.unwrap(), Bytes::from_static(b"data"));

        let s = FaultyStore::new(memory(), only(Fault::DroppedRequest, 1.0));
        assert!(s.put("x", Bytes::from_static(b"data")).await.is_err());
        assert!(matches!(s.inner().get("x").await, Err(Error::ObjectNotFound(_))));
        assert_eq!(s.handle().counters().of(Fault::DroppedRequest), 1);
    }

    #[tokio::test]
    async fn retry_over_a_lost_response_is_success_without_a_duplicate() {
        let cfg = FaultConfig { max_faults: Some(1), ..only(Fault::LostResponse, 1.0) };
        let faulty = FaultyStore::new(memory(), cfg);
        let h = faulty.handle();
        let s = RetryStore::new(faulty, fast());
        s.put("packs/ab/abcd", Bytes::from_static(b"pack")).await.unwrap();
        assert_eq!(h.counters().of(Fault::LostResponse), 1);
        assert_eq!(h.counters().calls(), 2, "one lost response, one retry");
        let l = s.list("packs/").await.unwrap();
        assert_eq!(l, vec![ObjectInfo { key: "packs/ab/abcd".into(), size: 4 }]);
        // A fresh put (not a retry) still sees the object and is refused.
        assert!(matches!(s.put("packs/ab/abcd", Bytes::from_static(b"other")).await, Err(Error::AlreadyExists(_))));
    }

    #[tokio::test]
    async fn ops_key_prefix_and_max_faults_limit_injection() {
        let cfg = FaultConfig {
            ops: vec![Op::Put, Op::Get],
            key_prefix: Some("index/".into()),
            max_faults: Some(2),
            ..FaultConfig::new(5, 1.0)
        };
        let s = FaultyStore::new(memory(), cfg);
        s.put("packs/a", Bytes::from_static(b"1")).await.unwrap();
        s.list("index/").await.unwrap();
        assert!(s.put("index/a", Bytes::from_static(b"1")).await.is_err());
        assert!(s.get("index/a").await.is_err());
        // Budget spent: an eligible call goes through now.
        s.put("index/b", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(s.handle().counters().injected(), 2);
    }

    #[tokio::test]
    async fn latency_and_timeouts_delay_calls() {
        let cfg = FaultConfig {
            latency: Some((Duration::from_millis(5), Duration::from_millis(10))),
            ..FaultConfig::new(9, 0.0)
        };
        let s = FaultyStore::new(memory(), cfg);
        let t = std::time::Instant::now();
        for _ in 0..4 {
            let _ = s.get("nothing").await;
        }
        assert!(t.elapsed() >= Duration::from_millis(20));

        let cfg = FaultConfig { timeout: Duration::from_millis(30), ..only(Fault::Timeout, 1.0) };
        let s = FaultyStore::new(memory(), cfg);
        let t = std::time::Instant::now();
        let e = s.get("nothing").await.unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(30) && e.is_retryable(), "{e}");
    }
}
