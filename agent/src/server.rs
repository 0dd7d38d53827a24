//! Wiring: configuration, the mutual-TLS listener, the metrics port, and graceful shutdown.
//!
//! Shutdown (SIGTERM or SIGINT): readiness turns false and new orders are refused at once;
//! running and queued orders get `grace` to finish; whatever is left is cancelled (its packs
//! stay in the repository and are adopted by the next backup); then the process exits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hoard_api::agent::v1::agent_server::AgentServer;
use hoard_api::tls::{TlsMaterial, server_config};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::jobs::JobEnv;
use crate::metrics::Metrics;
use crate::orders::Orders;
use crate::service::AgentService;
use crate::volume::KubeletRoot;

/// Everything the agent needs, validated before anything binds.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub kubelet_root: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub controller_identity: String,
    pub max_concurrent_orders: usize,
    pub memory_budget: usize,
    pub grace: Duration,
    pub finished_orders: usize,
    pub allow_file_repositories: bool,
    /// Refuse restore and verify orders.
    pub backup_only: bool,
    pub scratch_dir: PathBuf,
    /// Where index files and snapshots of remote repositories are kept between orders
    /// ([`hoard_core::cache`]); none: read from the repository every time.
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the cache holds; none: no bound.
    pub cache_max_bytes: Option<u64>,
    /// Where completed orders are recorded ([`crate::state`]); none: in memory only.
    pub state_dir: Option<PathBuf>,
    pub io_uring: bool,
    /// Upload bandwidth of the whole node in bytes per second; 0 means unlimited.
    pub upload_bytes_per_second: u64,
}

/// Whether backups read through io_uring: enabled by flag and usable here (hoard-core's probe,
/// which logs once why not).
pub fn probe_io_uring(enabled: bool) -> bool {
    enabled && hoard_core::uring::available().is_ok()
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HANDSHAKES: usize = 128;

/// Runs the agent until a termination signal and the drain that follows it.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    if !crate::volume::valid_subdomain(&cfg.node_name) {
        anyhow::bail!("--node-name {:?} is not a valid node name", cfg.node_name);
    }
    let metrics = Metrics::new();
    let io_uring = probe_io_uring(cfg.io_uring);
    metrics.set_io_uring(io_uring);
    tracing::info!(
        io_uring,
        disabled_by_flag = !cfg.io_uring,
        "{}",
        if io_uring { "volumes are read through io_uring" } else { "volumes are read with plain reads" }
    );
    let budget = hoard_core::budget::Budget::new(cfg.memory_budget);
    metrics.set_budget(Arc::clone(&budget));
    tracing::info!(
        memory_budget = cfg.memory_budget,
        max_concurrent_orders = cfg.max_concurrent_orders,
        "node budget (file data in flight, shared by all running orders)"
    );
    let kubelet = Arc::new(
        KubeletRoot::open(&cfg.kubelet_root)
            .with_context(|| format!("open kubelet pod directory {}", cfg.kubelet_root.display()))?,
    );
    let material = TlsMaterial::from_pem_files(&cfg.tls_ca, &cfg.tls_cert, &cfg.tls_key)?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config(material, &cfg.controller_identity)?));

    let grpc = TcpListener::bind(cfg.listen).await.with_context(|| format!("bind {}", cfg.listen))?;
    let http = TcpListener::bind(cfg.metrics_listen).await.with_context(|| format!("bind {}", cfg.metrics_listen))?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);

    let state = match &cfg.state_dir {
        Some(d) => Some(crate::state::StateDir::open(d, cfg.finished_orders)?),
        None => {
            tracing::warn!("no --state-dir: completed orders are remembered in memory only (not across restarts)");
            None
        }
    };
    let orders = Orders::new(cfg.max_concurrent_orders, cfg.finished_orders, Arc::clone(&metrics), state);
    let env = JobEnv {
        node_name: cfg.node_name.clone(),
        budget,
        io_uring,
        allow_file_repositories: cfg.allow_file_repositories,
        backup_only: cfg.backup_only,
        scratch_dir: cfg.scratch_dir.clone(),
        cache: cfg.cache_dir.clone().map(|root| hoard_core::cache::CacheDir::new(root, cfg.cache_max_bytes)),
        metrics: Arc::clone(&metrics),
        upload_limit: crate::jobs::RateLimit::new(cfg.upload_bytes_per_second),
    };
    let service = AgentService { env, orders: Arc::clone(&orders), kubelet, io_uring };

    let metrics_task = tokio::spawn(crate::metrics::serve(http, Arc::clone(&metrics)));
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(16);
    let accept_task = tokio::spawn(accept_loop(grpc, acceptor, conn_tx, Arc::clone(&metrics)));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(AgentServer::new(service))
            .serve_with_incoming_shutdown(futures::StreamExt::map(incoming, Ok::<_, std::io::Error>), async {
                let _ = stop_rx.await;
            }),
    );
    metrics.set_ready(true);
    tracing::info!(node = cfg.node_name, grpc = %grpc_addr, metrics = %http_addr, "agent ready");
    // Tests and wrappers read the bound addresses from this one line on stdout.
    println!("listening grpc={grpc_addr} metrics={http_addr}");

    wait_for_signal().await;
    tracing::info!(grace_seconds = cfg.grace.as_secs(), "termination requested: draining");
    // Drain before readiness drops, so a 503 on /readyz always means new orders are refused.
    orders.drain();
    metrics.set_ready(false);
    if !orders.wait_idle(cfg.grace).await {
        tracing::warn!("grace period over: cancelling the remaining orders");
        orders.cancel_all();
        orders.wait_idle(Duration::from_secs(10)).await;
    }
    accept_task.abort();
    let _ = stop_tx.send(());
    // Streams end with their orders; give clients a moment to read the terminal events.
    if tokio::time::timeout(Duration::from_secs(5), server).await.is_err() {
        tracing::warn!("gRPC connections did not close in time");
    }
    metrics_task.abort();
    tracing::info!("agent stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes (bounded in number and time); only
/// authenticated connections reach the gRPC server.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    conns: tokio::sync::mpsc::Sender<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        let (acceptor, conns, metrics) = (acceptor.clone(), conns.clone(), Arc::clone(&metrics));
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    drop(permit);
                    let _ = conns.send(stream).await;
                }
                Ok(Err(e)) => {
                    metrics.tls_failure();
                    tracing::warn!(%peer, "TLS handshake refused: {e}");
                }
                Err(_) => {
                    metrics.tls_failure();
                    tracing::warn!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}
