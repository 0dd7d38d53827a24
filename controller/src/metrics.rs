//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz`, `/readyz`.
//!
//! `/readyz` is 200 once the controller is running its reconcilers (as leader) or waiting as a
//! healthy follower; `/healthz` is 200 while the process serves. Labels carry object names,
//! never secret values.

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
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub namespace: String,
    pub configuration: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub error: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sessions: Family<PhaseLabels, Counter>,
    pub restores: Family<PhaseLabels, Counter>,
    pub session_duration: Histogram,
    pub bytes: Counter,
    pub last_success: Family<ConfigLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub orders_in_flight: Gauge,
    pub leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hoard_controller");
        let sessions = Family::<PhaseLabels, Counter>::default();
        registry.register("backup_sessions", "BackupSessions that reached a phase", sessions.clone());
        let restores = Family::<PhaseLabels, Counter>::default();
        registry.register("restore_sessions", "RestoreSessions that reached a phase", restores.clone());
        let session_duration = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register(
            "backup_session_duration_seconds",
            "Duration of finished BackupSessions",
            session_duration.clone(),
        );
        let bytes = Counter::default();
        registry.register("backup_bytes", "Bytes read from volumes by successful backups", bytes.clone());
        let last_success = Family::<ConfigLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "Completion time of the last successful BackupSession per configuration",
            last_success.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register("reconcile_errors", "Reconcile failures by controller and class", reconcile_errors.clone());
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register("reconciles", "Reconcile passes by controller", reconciles.clone());
        let orders_in_flight = Gauge::default();
        registry.register("orders_in_flight", "Work orders this controller is following", orders_in_flight.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        Metrics {
            registry,
            sessions,
            restores,
            session_duration,
            bytes,
            last_success,
            reconcile_errors,
            reconciles,
            orders_in_flight,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn session_phase(&self, phase: &str) {
        self.sessions.get_or_create(&PhaseLabels { phase: phase.into() }).inc();
    }

    pub fn restore_phase(&self, phase: &str) {
        self.restores.get_or_create(&PhaseLabels { phase: phase.into() }).inc();
    }

    pub fn reconciled(&self, controller: &str) {
        self.reconciles.get_or_create(&ControllerLabels { controller: controller.into() }).inc();
    }

    /// Reconcile passes so far of one controller (tests read it).
    pub fn reconcile_count(&self, controller: &str) -> u64 {
        self.reconciles.get_or_create(&ControllerLabels { controller: controller.into() }).get()
    }

    pub fn reconcile_error(&self, controller: &str, e: &crate::Error) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { controller: controller.into(), error: e.metric_label().into() })
            .inc();
    }

    pub fn encode(&self) -> String {
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

/// Serves the endpoints on `listener` until the task is dropped (at most 64 connections).
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
