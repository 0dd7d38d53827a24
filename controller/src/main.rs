//! `hoard-controller`: the controller binary. See docs/controller.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use hoard_controller::{Clock, Config, Context, leader, metrics::Metrics, orders::Credentials, reconcile};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// hoard controller: schedules backups and sends work orders to the node agents.
#[derive(Debug, Parser)]
#[command(name = "hoard-controller", version)]
struct Args {
    /// The controller's own namespace: the leader Lease and the agent pods live there.
    #[arg(long, env = "HOARD_CONTROLLER_NAMESPACE")]
    namespace: Option<String>,
    /// Label selector of the agent pods (in --namespace).
    #[arg(long, env = "HOARD_CONTROLLER_AGENT_SELECTOR", default_value = "app.kubernetes.io/name=hoard-agent")]
    agent_selector: String,
    /// CA bundle (PEM) the agents' certificates chain to.
    #[arg(long, env = "HOARD_CONTROLLER_TLS_CA", default_value = "/etc/hoard/tls/ca.crt")]
    tls_ca: PathBuf,
    /// The controller's client certificate (identity hoard-controller).
    #[arg(long, env = "HOARD_CONTROLLER_TLS_CERT", default_value = "/etc/hoard/tls/tls.crt")]
    tls_cert: PathBuf,
    #[arg(long, env = "HOARD_CONTROLLER_TLS_KEY", default_value = "/etc/hoard/tls/tls.key")]
    tls_key: PathBuf,
    /// Plain-HTTP address for /metrics, /healthz and /readyz.
    #[arg(long, env = "HOARD_CONTROLLER_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Take the Lease `hoard-controller` in --namespace before reconciling.
    #[arg(long, env = "HOARD_CONTROLLER_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Work orders in flight per node, across all sessions.
    #[arg(long, env = "HOARD_CONTROLLER_MAX_ORDERS_PER_NODE", default_value_t = 2)]
    max_orders_per_node: usize,
    /// A kubeconfig file; without it the in-cluster configuration (or the usual inference).
    #[arg(long, env = "HOARD_CONTROLLER_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, env = "HOARD_CONTROLLER_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    /// Let `local` BackupStorages map to a filesystem path (development and tests only).
    #[arg(long, env = "HOARD_CONTROLLER_ALLOW_FILE_REPOSITORIES")]
    allow_file_repositories: bool,
    /// Image of the helper pod that mounts a claim no pod mounts, for a restore into it
    /// (usually this controller's own image; empty: such restores are refused).
    #[arg(long, env = "HOARD_CONTROLLER_HELPER_IMAGE", default_value = "")]
    helper_image: String,
    /// Arguments of the helper container (space-separated).
    #[arg(long, env = "HOARD_CONTROLLER_HELPER_ARGS", default_value = "--pause")]
    helper_args: String,
    /// How often each repository's structure is checked (keys, index against packs,
    /// snapshots, trees; no data is read), e.g. `24h`; `0s` turns the check off.
    #[arg(long, env = "HOARD_CONTROLLER_CHECK_INTERVAL", default_value = "24h", value_parser = parse_interval)]
    check_interval: std::time::Duration,
    /// Namespaces (besides the controller's own) whose BackupStorages may use ambient cloud
    /// credentials or `local` paths; repeat or comma-separate.
    #[arg(long, env = "HOARD_CONTROLLER_ADMIN_NAMESPACES", value_delimiter = ',')]
    admin_namespace: Vec<String>,
    /// Sleep until SIGTERM/SIGINT, then exit 0 (what the helper pod runs).
    #[arg(long)]
    pause: bool,
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    hoard_api::crd::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 30m or 24h"))
}

fn main() -> std::process::ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    if args.pause {
        return pause();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOARD_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hoard-controller: cannot start the runtime: {e}");
            return std::process::ExitCode::from(70);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hoard-controller: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The helper pod's process: nothing to do but hold the volume mount until deleted.
fn pause() -> std::process::ExitCode {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return std::process::ExitCode::from(70);
    };
    rt.block_on(async {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return std::process::ExitCode::from(70);
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        std::process::ExitCode::SUCCESS
    })
}

async fn client(args: &Args) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("read {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn run(args: Args) -> anyhow::Result<()> {
    // One rustls provider for the process (aws-lc-rs), installed before any TLS is built.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|n| !n.is_empty())
        .context("--namespace (or POD_NAMESPACE) is required")?;
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    let creds = Credentials { ca: read(&args.tls_ca)?, cert: read(&args.tls_cert)?, key: read(&args.tls_key)? };
    hoard_api::tls::TlsMaterial::from_pem(&creds.ca, &creds.cert, &creds.key).context("TLS material")?;
    let client = client(&args).await?;
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("hoard-controller-{}", std::process::id()));
    let config = Config {
        namespace: namespace.clone(),
        agent_selector: args.agent_selector.clone(),
        max_orders_per_node: args.max_orders_per_node.max(1),
        check_interval: args.check_interval,
        admin_namespaces: args.admin_namespace,
        allow_file_repositories: args.allow_file_repositories,
        identity: identity.clone(),
        helper_image: args.helper_image.clone(),
        helper_args: args.helper_args.split_whitespace().map(str::to_string).collect(),
    };
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("bind {}", args.metrics_listen))?;
    let http_addr = listener.local_addr()?;
    tokio::spawn(hoard_controller::metrics::serve(listener, Arc::clone(&metrics)));
    // Tests and scripts read this line to find the port.
    println!("listening metrics={http_addr}");
    // Refuse to start without the CRDs: a clear message beats a watch error loop.
    Api::<hoard_api::crd::BackupConfiguration>::all(client.clone())
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .context("the hoard CRDs are not queryable (are they installed?)")?;
    metrics.set_ready(true);
    if args.leader_elect {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
        loop {
            match leader::try_acquire(&leases, &identity, chrono::Utc::now()).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!("leader election: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(leader::RENEW_EVERY) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
        tracing::info!(identity, "leading");
        metrics.leader.set(1);
        let m = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                tokio::time::sleep(leader::RENEW_EVERY).await;
                match leader::try_acquire(&leases, &identity, chrono::Utc::now()).await {
                    Ok(true) => failures = 0,
                    Ok(false) => {
                        tracing::error!("lost the leader Lease; exiting");
                        m.leader.set(0);
                        std::process::exit(1);
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!("renewing the leader Lease: {e}");
                        // Stop before the Lease can expire under us and another replica takes it.
                        if u64::from(failures) * leader::RENEW_EVERY.as_secs() >= leader::LEASE_DURATION.as_secs() - 5 {
                            tracing::error!("could not renew the leader Lease; exiting");
                            std::process::exit(1);
                        }
                    }
                }
            }
        });
    }
    let ctx = Context::new(client, config, creds, metrics, Arc::new(Clock::default()));
    reconcile::run(ctx).await;
    Ok(())
}
