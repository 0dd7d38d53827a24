//! `hoard-agent`: the node agent binary. See docs/agent.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hoard_agent::server::{Config, run};

/// hoard node agent: executes backup, restore and verify work orders for volumes on this node.
#[derive(Debug, Parser)]
#[command(name = "hoard-agent", version)]
struct Args {
    /// This node's name (spec.nodeName); orders for other nodes are refused.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The kubelet pod directory, mounted read-only for backups (read-write for restores).
    #[arg(long, default_value = "/var/lib/kubelet/pods")]
    kubelet_root: PathBuf,
    /// gRPC (mutual TLS) listen address.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Plain-HTTP address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    /// CA bundle (PEM) that client certificates must chain to.
    #[arg(long)]
    tls_ca: PathBuf,
    /// This agent's certificate chain (PEM); should carry the URI SAN node:<node-name>.
    #[arg(long)]
    tls_cert: PathBuf,
    /// This agent's private key (PEM).
    #[arg(long)]
    tls_key: PathBuf,
    /// Identity (DNS or URI SAN) a client certificate must carry.
    #[arg(long, default_value = hoard_api::tls::CONTROLLER_IDENTITY)]
    controller_identity: String,
    /// Orders running at once; the rest wait in a queue.
    #[arg(long, env = "HOARD_AGENT_MAX_CONCURRENT_ORDERS", default_value_t = 2)]
    max_concurrent_orders: usize,
    /// File data all running orders together may hold in memory (one shared budget), in bytes
    /// or with a unit (512Mi, 2Gi). Default: from the pod's cgroup memory limit (see
    /// docs/agent.md), 1Gi without one.
    #[arg(long, env = "HOARD_AGENT_MEMORY_BUDGET", value_parser = hoard_agent::limits::parse_size)]
    memory_budget: Option<usize>,
    /// The cgroup v2 file holding the pod's memory limit (for the default budget).
    #[arg(long, env = "HOARD_AGENT_CGROUP_MEMORY_MAX", default_value = hoard_agent::limits::CGROUP_MEMORY_MAX)]
    cgroup_memory_max: PathBuf,
    /// Seconds running orders get to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 60)]
    grace_period: u64,
    /// Finished orders remembered for idempotent replies.
    #[arg(long, default_value_t = 1024)]
    finished_orders: usize,
    /// Accept filesystem repository locations (development and tests only).
    #[arg(long)]
    allow_file_repositories: bool,
    /// Refuse restore and verify orders: for a container that may read volumes but not write
    /// them (the chart's default, `agent.restore.enabled=false`).
    #[arg(long, env = "HOARD_AGENT_BACKUP_ONLY")]
    backup_only: bool,
    /// Where verify orders restore to (removed afterwards).
    #[arg(long, default_value = "/var/lib/hoard-agent/scratch")]
    scratch_dir: PathBuf,
    /// Where index files and snapshots of remote repositories are kept between orders, so that
    /// an order lists them instead of downloading them all again. Unset: no cache.
    #[arg(long, env = "HOARD_AGENT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Most bytes the cache may hold (e.g. 768Mi): copies past it are not kept. Keep it below
    /// the cache volume's size limit. Unset: no bound.
    #[arg(long, env = "HOARD_AGENT_CACHE_MAX_BYTES", value_parser = hoard_agent::limits::parse_size)]
    cache_max_bytes: Option<usize>,
    /// Where completed orders are recorded, so that one re-sent after a restart gets its first
    /// result (survives at least container restarts; see docs/agent.md). Unset: memory only.
    #[arg(long, env = "HOARD_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Upload bandwidth for the whole node, in bytes per second (0 = unlimited).
    #[arg(long, env = "HOARD_AGENT_UPLOAD_BYTES_PER_SECOND", default_value_t = 0)]
    upload_bytes_per_second: u64,
    /// Do not use io_uring even where available (volumes are then read with plain reads).
    #[arg(long, env = "HOARD_AGENT_NO_IO_URING")]
    no_io_uring: bool,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    hoard_core::util::tune_malloc();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // EX_USAGE for bad flags; help and version exit 0.
            return std::process::ExitCode::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOARD_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let slots = args.max_concurrent_orders.max(1);
    let memory_budget = match args.memory_budget {
        Some(b) => {
            tracing::info!(memory_budget = b, "memory budget from --memory-budget");
            b
        }
        None => {
            let (b, from) = hoard_agent::limits::default_memory_budget(&args.cgroup_memory_max, slots);
            tracing::info!(memory_budget = b, "memory budget sized from {from}");
            b
        }
    };
    let cfg = Config {
        node_name: args.node_name,
        kubelet_root: args.kubelet_root,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        tls_ca: args.tls_ca,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        controller_identity: args.controller_identity,
        max_concurrent_orders: slots,
        memory_budget,
        grace: Duration::from_secs(args.grace_period),
        finished_orders: args.finished_orders,
        allow_file_repositories: args.allow_file_repositories,
        backup_only: args.backup_only,
        scratch_dir: args.scratch_dir,
        cache_dir: args.cache_dir,
        cache_max_bytes: args.cache_max_bytes.map(|b| b as u64),
        state_dir: args.state_dir,
        io_uring: !args.no_io_uring,
        upload_bytes_per_second: args.upload_bytes_per_second,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hoard-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::from(70);
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hoard-agent: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
