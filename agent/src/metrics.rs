//! Prometheus metrics and the plain-HTTP health endpoints (`/metrics`, `/healthz`, `/readyz`),
//! served on their own port, separate from the mutual-TLS gRPC port.
//!
//! Byte counters per pipeline stage (read, chunk+hash, upload, restore) grow while orders run:
//! the order book feeds them from each order's progress counters about twice a second, so
//! `rate()` over them is the live throughput of each stage.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrderLabels {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReaderLabels {
    reader: String,
}

/// Bytes that went through each stage since the last report of one order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageBytes {
    pub read: u64,
    /// The part of `read` read through io_uring (the rest used plain reads).
    pub read_io_uring: u64,
    pub chunked: u64,
    pub uploaded: u64,
    pub restored: u64,
}

/// The `reason` label values of `hoard_agent_refused_orders_total`.
pub const REFUSAL_REASONS: &[&str] =
    &["invalid", "wrong_node", "not_found", "refused", "io", "conflict", "draining", "backup-only"];

/// The agent's metrics, registered under the `hoard_agent` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    orders: Family<OrderLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    bytes_read: Counter,
    bytes_by_reader: Family<ReaderLabels, Counter>,
    bytes_chunked: Counter,
    bytes_uploaded: Counter,
    bytes_restored: Counter,
    memory_budget: Gauge,
    memory_in_use: Gauge,
    budget: std::sync::OnceLock<Arc<hoard_core::budget::Budget>>,
    running: Gauge,
    queued: Gauge,
    io_uring: Gauge,
    tls_failures: Counter,
    secrets_wiped: Counter,
    ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("hoard_agent");
        let orders = Family::<OrderLabels, Counter>::default();
        registry.register("orders", "Finished orders by kind and result (done, failed, cancelled)", orders.clone());
        let refused = Family::<ReasonLabels, Counter>::default();
        // Every reason from the start, at zero: a family with no series is not exposed at all,
        // and `rate()` needs the zero before the first refusal.
        for reason in REFUSAL_REASONS {
            let _ = refused.get_or_create(&ReasonLabels { reason: (*reason).into() });
        }
        registry.register("refused_orders", "Orders refused before running, by reason", refused.clone());
        let bytes_read = Counter::default();
        registry.register("read_bytes", "Bytes read from volumes by backups", bytes_read.clone());
        let bytes_by_reader = Family::<ReaderLabels, Counter>::default();
        registry.register(
            "reader_bytes",
            "Bytes read from volumes, by reader (io_uring, or plain reads as fallback)",
            bytes_by_reader.clone(),
        );
        let bytes_chunked = Counter::default();
        registry.register("chunked_bytes", "Bytes cut into chunks and hashed by backups", bytes_chunked.clone());
        let bytes_uploaded = Counter::default();
        registry.register("uploaded_bytes", "Bytes uploaded to repositories in packs", bytes_uploaded.clone());
        let bytes_restored = Counter::default();
        registry.register("restored_bytes", "Bytes written to volumes by restores", bytes_restored.clone());
        let memory_budget = Gauge::default();
        registry.register(
            "memory_budget_bytes",
            "File data all running orders together may hold in memory",
            memory_budget.clone(),
        );
        let memory_in_use = Gauge::default();
        registry.register("memory_in_use_bytes", "File data held in memory now", memory_in_use.clone());
        let running = Gauge::default();
        registry.register("orders_running", "Orders running now", running.clone());
        let queued = Gauge::default();
        registry.register("orders_queued", "Orders waiting for a slot in the node budget", queued.clone());
        let io_uring = Gauge::default();
        registry.register("io_uring_available", "1 if io_uring can be used on this node", io_uring.clone());
        let tls_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "Connections refused during the TLS handshake",
            tls_failures.clone(),
        );
        let secrets_wiped = Counter::default();
        registry.register(
            "order_secrets_wiped",
            "Orders received whose credentials were overwritten in memory (one per order, on every path)",
            secrets_wiped.clone(),
        );
        Arc::new(Metrics {
            registry,
            orders,
            refused,
            bytes_read,
            bytes_by_reader,
            bytes_chunked,
            bytes_uploaded,
            bytes_restored,
            memory_budget,
            memory_in_use,
            budget: std::sync::OnceLock::new(),
            running,
            queued,
            io_uring,
            tls_failures,
            secrets_wiped,
            ready: AtomicBool::new(false),
        })
    }

    pub fn order_finished(&self, kind: &str, result: &str) {
        self.orders.get_or_create(&OrderLabels { kind: kind.into(), result: result.into() }).inc();
    }
    /// The counter an order's [`crate::jobs::Wiped`] guard increments when it wipes.
    pub fn secrets_wiped(&self) -> Counter {
        self.secrets_wiped.clone()
    }
    pub fn refused(&self, reason: &str) {
        debug_assert!(REFUSAL_REASONS.contains(&reason), "undocumented refusal reason {reason}");
        self.refused.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
    }
    pub fn add_stage_bytes(&self, b: &StageBytes) {
        self.bytes_read.inc_by(b.read);
        let uring = b.read_io_uring.min(b.read);
        self.bytes_by_reader.get_or_create(&ReaderLabels { reader: "io_uring".into() }).inc_by(uring);
        self.bytes_by_reader.get_or_create(&ReaderLabels { reader: "plain".into() }).inc_by(b.read - uring);
        self.bytes_chunked.inc_by(b.chunked);
        self.bytes_uploaded.inc_by(b.uploaded);
        self.bytes_restored.inc_by(b.restored);
    }
    /// The node budget, reported as `memory_budget_bytes` and `memory_in_use_bytes`.
    pub fn set_budget(&self, b: Arc<hoard_core::budget::Budget>) {
        self.memory_budget.set(i64::try_from(b.total()).unwrap_or(i64::MAX));
        let _ = self.budget.set(b);
    }
    pub fn set_load(&self, running: usize, queued: usize) {
        self.running.set(running as i64);
        self.queued.set(queued as i64);
    }
    pub fn set_io_uring(&self, available: bool) {
        self.io_uring.set(i64::from(available));
    }
    pub fn tls_failure(&self) {
        self.tls_failures.inc();
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        if let Some(b) = self.budget.get() {
            self.memory_in_use.set(i64::try_from(b.in_use()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(req: Request<hyper::body::Incoming>, m: Arc<Metrics>) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = "text/plain; charset=utf-8";
    Ok(match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", m.encode()),
        "/healthz" => reply(StatusCode::OK, text, "ok\n".into()),
        "/readyz" if m.is_ready() => reply(StatusCode::OK, text, "ready\n".into()),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, text, "not ready\n".into()),
        _ => reply(StatusCode::NOT_FOUND, text, "not found\n".into()),
    })
}

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, m: Arc<Metrics>) {
    let conns = Arc::new(tokio::sync::Semaphore::new(64));
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let Ok(permit) = Arc::clone(&conns).try_acquire_owned() else { continue };
        let m = Arc::clone(&m);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, Arc::clone(&m)));
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
            drop(permit);
        });
    }
}
