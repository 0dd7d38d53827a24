//! The order book: idempotency by order id, the node budget (at most N orders run at once,
//! the rest wait), cancellation, and progress fan-out.
//!
//! * An order id seen before with the same content attaches to the running order, or gets the
//!   recorded terminal event of the finished one; with other content it is refused. Finished
//!   results are kept for the last `finished_capacity` orders; completed ones are also recorded
//!   in the state directory ([`crate::state`]) before their terminal event is published, so a
//!   restarted agent answers a re-sent completed order with its first result (backups also
//!   recognise their snapshot by the order-id label).
//! * Progress is a `watch` channel: subscribers see the latest event and every terminal event.
//!   A sampler publishes an event about twice a second (counters, rate, ETA, the last few
//!   warnings) and feeds the per-stage byte counters of the metrics.
//! * Cancellation is a token the job's store checks on every request, so a cancelled order stops
//!   at its next storage operation; a queued order is dropped from the queue at once.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoard_api::agent::v1::{Phase, Progress, Result as OrderResult};
use tokio::sync::{Notify, Semaphore, watch};

use crate::metrics::{Metrics, StageBytes};
use crate::state::{Record, StateDir};

/// What an order does, for labels and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderKind {
    Backup,
    Restore,
    Verify,
    Copy,
}

impl OrderKind {
    pub fn label(self) -> &'static str {
        match self {
            OrderKind::Backup => "backup",
            OrderKind::Restore => "restore",
            OrderKind::Verify => "verify",
            OrderKind::Copy => "copy",
        }
    }
}

/// A cancellation flag that can be awaited.
#[derive(Debug, Default)]
pub struct CancelToken {
    flag: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    pub async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// Why a job failed; `class` is one of "invalid", "refused", "permanent", "retryable",
/// "cancelled".
#[derive(Debug, Clone)]
pub struct JobError {
    pub class: &'static str,
    pub message: String,
    /// Partial result (e.g. restore with failed files).
    pub result: Option<Box<OrderResult>>,
}

impl JobError {
    pub fn new(class: &'static str, message: impl Into<String>) -> Self {
        JobError { class, message: message.into(), result: None }
    }
}

impl From<hoard_core::Error> for JobError {
    fn from(e: hoard_core::Error) -> Self {
        use hoard_core::Error as E;
        let class = match &e {
            E::Cancelled => "cancelled",
            E::InvalidArgument(_) | E::SnapshotNotFound(_) | E::AmbiguousSnapshot(_) | E::PathNotFound(_) => "invalid",
            E::WrongPassword | E::RepositoryNotFound(_) => "permanent",
            _ if e.is_retryable() => "retryable",
            E::Locked(_) => "retryable",
            _ => "permanent",
        };
        JobError::new(class, e.to_string())
    }
}

/// What a running job can use.
#[derive(Debug, Clone)]
pub struct OrderCtx {
    pub order_id: String,
    pub cancel: Arc<CancelToken>,
    /// Counters the core pipelines update; sampled into [`Progress`] events.
    pub progress: Arc<hoard_core::progress::Progress>,
    phase: Arc<AtomicU8>,
}

impl OrderCtx {
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as i32 as u8, Ordering::Relaxed);
    }
}

struct Live {
    kind: OrderKind,
    fingerprint: [u8; 32],
    events: watch::Sender<Progress>,
    cancel: Arc<CancelToken>,
}

struct Done {
    fingerprint: [u8; 32],
    last: Progress,
}

#[derive(Default)]
struct Book {
    live: HashMap<String, Arc<Live>>,
    done: HashMap<String, Done>,
    done_order: VecDeque<String>,
    queued: usize,
    running: usize,
}

/// Result of looking an order id up.
#[derive(Debug)]
pub enum Lookup {
    /// Not seen: the caller validates and [`Orders::start`]s it.
    New,
    /// Seen with the same content: follow this channel.
    Attach(watch::Receiver<Progress>),
}

/// Refusals of the order book itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error("order id {0:?} was already used for a different order")]
    Conflict(String),
    #[error("the agent is shutting down and takes no new orders")]
    Draining,
}

#[derive(Debug)]
pub struct Orders {
    book: Mutex<Book>,
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    finished_capacity: usize,
    draining: AtomicBool,
    changed: Notify,
    metrics: Arc<Metrics>,
    /// Durable records of completed orders, when the agent has a state directory.
    state: Option<Arc<StateDir>>,
}

impl std::fmt::Debug for Book {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Book(live {}, done {})", self.live.len(), self.done.len())
    }
}

fn event(order_id: &str, phase: Phase) -> Progress {
    Progress { order_id: order_id.to_string(), phase: phase as i32, eta_seconds: -1.0, ..Default::default() }
}

impl Orders {
    pub fn new(
        max_concurrent: usize,
        finished_capacity: usize,
        metrics: Arc<Metrics>,
        state: Option<StateDir>,
    ) -> Arc<Orders> {
        let max_concurrent = max_concurrent.max(1);
        Arc::new(Orders {
            book: Mutex::new(Book::default()),
            slots: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            finished_capacity: finished_capacity.max(1),
            draining: AtomicBool::new(false),
            changed: Notify::new(),
            metrics,
            state: state.map(Arc::new),
        })
    }

    /// Remembers a finished order in memory, forgetting the oldest beyond the capacity.
    fn remember(&self, b: &mut Book, order_id: String, done: Done) {
        b.done.insert(order_id.clone(), done);
        b.done_order.push_back(order_id);
        while b.done_order.len() > self.finished_capacity {
            if let Some(old) = b.done_order.pop_front() {
                b.done.remove(&old);
            }
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// (running, queued).
    pub fn load(&self) -> (usize, usize) {
        let b = self.book();
        (b.running, b.queued)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops taking new orders (ids already known still attach).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Looks an order id up; see [`Lookup`].
    pub fn lookup(&self, order_id: &str, fingerprint: &[u8; 32]) -> Result<Lookup, BookError> {
        let mut b = self.book();
        if let Some(live) = b.live.get(order_id) {
            if &live.fingerprint != fingerprint {
                return Err(BookError::Conflict(order_id.to_string()));
            }
            return Ok(Lookup::Attach(live.events.subscribe()));
        }
        if let Some(done) = b.done.get(order_id) {
            if &done.fingerprint != fingerprint {
                return Err(BookError::Conflict(order_id.to_string()));
            }
            return Ok(Lookup::Attach(watch::channel(done.last.clone()).1));
        }
        // Completed before the agent restarted.
        if let Some(r) = self.state.as_ref().and_then(|s| s.load(order_id)) {
            if &r.fingerprint != fingerprint {
                return Err(BookError::Conflict(order_id.to_string()));
            }
            tracing::info!(order_id, "order completed before the agent restarted; replying with its result");
            let rx = watch::channel(r.last.clone()).1;
            self.remember(&mut b, r.order_id, Done { fingerprint: r.fingerprint, last: r.last });
            return Ok(Lookup::Attach(rx));
        }
        if self.is_draining() {
            return Err(BookError::Draining);
        }
        Ok(Lookup::New)
    }

    /// Queues a new order; `run` starts when a slot is free. If the same id arrived meanwhile,
    /// attaches to it instead (and `run` is dropped).
    pub fn start<F, Fut>(
        self: &Arc<Self>,
        kind: OrderKind,
        order_id: &str,
        fingerprint: [u8; 32],
        run: F,
    ) -> Result<watch::Receiver<Progress>, BookError>
    where
        F: FnOnce(OrderCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<OrderResult, JobError>> + Send + 'static,
    {
        let (live, rx) = {
            let mut b = self.book();
            if b.live.contains_key(order_id) || b.done.contains_key(order_id) {
                drop(b);
                return match self.lookup(order_id, &fingerprint)? {
                    Lookup::Attach(rx) => Ok(rx),
                    Lookup::New => Err(BookError::Conflict(order_id.to_string())),
                };
            }
            if self.is_draining() {
                return Err(BookError::Draining);
            }
            let (tx, rx) = watch::channel(event(order_id, Phase::Queued));
            let live = Arc::new(Live { kind, fingerprint, events: tx, cancel: Arc::new(CancelToken::default()) });
            b.live.insert(order_id.to_string(), Arc::clone(&live));
            b.queued += 1;
            self.metrics.set_load(b.running, b.queued);
            (live, rx)
        };
        tracing::info!(order_id, kind = kind.label(), "order queued");
        let me = Arc::clone(self);
        let order_id = order_id.to_string();
        tokio::spawn(async move { me.execute(live, order_id, run).await });
        Ok(rx)
    }

    async fn execute<F, Fut>(self: Arc<Self>, live: Arc<Live>, order_id: String, run: F)
    where
        F: FnOnce(OrderCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<OrderResult, JobError>> + Send + 'static,
    {
        let permit = tokio::select! {
            p = Arc::clone(&self.slots).acquire_owned() => p.ok(),
            _ = live.cancel.cancelled() => None,
        };
        {
            let mut b = self.book();
            b.queued -= 1;
            if permit.is_some() {
                b.running += 1;
            }
            self.metrics.set_load(b.running, b.queued);
        }
        let started = Instant::now();
        let ran = permit.is_some();
        let terminal = match permit {
            None => {
                let mut e = event(&order_id, Phase::Cancelled);
                e.error = "cancelled while queued".into();
                e.error_class = "cancelled".into();
                e
            }
            Some(_permit) => {
                let ctx = OrderCtx {
                    order_id: order_id.clone(),
                    cancel: Arc::clone(&live.cancel),
                    progress: Arc::new(hoard_core::progress::Progress::default()),
                    phase: Arc::new(AtomicU8::new(Phase::Preparing as i32 as u8)),
                };
                tracing::info!(order_id, kind = live.kind.label(), "order running");
                let stages = Arc::new(Mutex::new(StageReporter::default()));
                let sampler = tokio::spawn(sample(
                    ctx.clone(),
                    live.events.clone(),
                    started,
                    (live.kind, Arc::clone(&stages), Arc::clone(&self.metrics)),
                ));
                // The job runs in its own task so a panic inside it is an order failure.
                let job = tokio::spawn(run(ctx.clone()));
                let outcome = match job.await {
                    Ok(r) => r,
                    Err(e) => Err(JobError::new("permanent", format!("order task failed: {e}"))),
                };
                sampler.abort();
                stages.lock().unwrap_or_else(|p| p.into_inner()).report(live.kind, &ctx.progress, &self.metrics);
                let mut e = snapshot_event(&ctx, started);
                match outcome {
                    Ok(result) => {
                        e.phase = Phase::Done as i32;
                        e.result = Some(result);
                    }
                    Err(err) => {
                        let cancelled = ctx.cancel.is_cancelled();
                        e.phase = if cancelled { Phase::Cancelled } else { Phase::Failed } as i32;
                        e.error_class = if cancelled { "cancelled" } else { err.class }.to_string();
                        e.error = if cancelled { format!("cancelled: {}", err.message) } else { err.message };
                        e.result = err.result.map(|r| *r);
                    }
                }
                e.eta_seconds = 0.0;
                e
            }
        };
        let result = match Phase::try_from(terminal.phase).unwrap_or(Phase::Failed) {
            Phase::Done => "done",
            Phase::Cancelled => "cancelled",
            _ => "failed",
        };
        tracing::info!(
            order_id,
            kind = live.kind.label(),
            result,
            error = terminal.error.as_str(),
            seconds = started.elapsed().as_secs_f64(),
            "order finished"
        );
        if result == "done"
            && let Some(state) = &self.state
        {
            let (state, record) = (
                Arc::clone(state),
                Record { order_id: order_id.clone(), fingerprint: live.fingerprint, last: terminal.clone() },
            );
            match tokio::task::spawn_blocking(move || state.store(&record)).await {
                Ok(Ok(())) => {}
                // The result still holds in memory; only a restart would run the order again.
                Ok(Err(e)) => tracing::warn!(order_id, "cannot record the completed order: {e}"),
                Err(e) => tracing::warn!(order_id, "cannot record the completed order: {e}"),
            }
        }
        self.metrics.order_finished(live.kind.label(), result);
        {
            let mut b = self.book();
            b.live.remove(&order_id);
            if ran {
                b.running -= 1;
            }
            self.remember(&mut b, order_id, Done { fingerprint: live.fingerprint, last: terminal.clone() });
            self.metrics.set_load(b.running, b.queued);
        }
        live.events.send_replace(terminal);
        self.changed.notify_waiters();
    }

    /// Asks a queued or running order to stop. Returns whether one was found.
    pub fn cancel(&self, order_id: &str) -> bool {
        let live = self.book().live.get(order_id).cloned();
        match live {
            Some(l) => {
                tracing::info!(order_id, "order cancel requested");
                l.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels everything queued or running.
    pub fn cancel_all(&self) {
        let all: Vec<Arc<Live>> = self.book().live.values().cloned().collect();
        for l in all {
            l.cancel.cancel();
        }
    }

    /// Waits until no order is queued or running, or `timeout` passes; returns whether idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.book().live.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.book().live.is_empty();
            }
        }
    }
}

fn snapshot_event(ctx: &OrderCtx, started: Instant) -> Progress {
    let s = ctx.progress.snapshot();
    let phase = Phase::try_from(i32::from(ctx.phase.load(Ordering::Relaxed))).unwrap_or(Phase::Running);
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let rate = s.bytes_done as f64 / secs;
    let eta = match s.bytes_total {
        Some(t) if rate > 0.0 && t >= s.bytes_done => (t - s.bytes_done) as f64 / rate,
        _ => -1.0,
    };
    Progress {
        order_id: ctx.order_id.clone(),
        phase: phase as i32,
        files_done: s.files_done,
        bytes_done: s.bytes_done,
        files_total: s.files_total.unwrap_or(0),
        bytes_total: s.bytes_total.unwrap_or(0),
        bytes_uploaded: s.bytes_stored,
        rate_bytes_per_second: rate,
        eta_seconds: eta,
        warnings: s.warnings,
        recent_warnings: s.recent_warnings,
        ..Default::default()
    }
}

/// Turns one order's progress counters into increments of the node's stage counters.
#[derive(Debug, Default)]
struct StageReporter {
    last: StageBytes,
}

impl StageReporter {
    fn report(&mut self, kind: OrderKind, p: &hoard_core::progress::Progress, m: &Metrics) {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let now = StageBytes {
            read: get(&p.bytes_read),
            read_io_uring: get(&p.bytes_read_io_uring),
            chunked: get(&p.bytes_chunked),
            uploaded: get(&p.bytes_stored),
            // For restores and verifies, the bytes done are bytes written.
            restored: if kind == OrderKind::Backup { 0 } else { get(&p.bytes_done) },
        };
        let last = self.last;
        m.add_stage_bytes(&StageBytes {
            read: now.read.saturating_sub(last.read),
            read_io_uring: now.read_io_uring.saturating_sub(last.read_io_uring),
            chunked: now.chunked.saturating_sub(last.chunked),
            uploaded: now.uploaded.saturating_sub(last.uploaded),
            restored: now.restored.saturating_sub(last.restored),
        });
        self.last = now;
    }
}

/// Publishes a progress event twice a second, and feeds the stage counters, until aborted.
async fn sample(
    ctx: OrderCtx,
    events: watch::Sender<Progress>,
    started: Instant,
    (kind, stages, metrics): (OrderKind, Arc<Mutex<StageReporter>>, Arc<Metrics>),
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        stages.lock().unwrap_or_else(|p| p.into_inner()).report(kind, &ctx.progress, &metrics);
        events.send_replace(snapshot_event(&ctx, started));
    }
}
