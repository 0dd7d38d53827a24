//! `kubectl hoard`: the kubectl plugin. It reads and writes the hoard.dev/v1alpha1 objects
//! (BackupConfiguration, BackupSession, Snapshot, RestoreSession, Repository, BackupStorage) the
//! controller acts on, and opens a cluster's repositories locally for `repo` verbs.
//!
//! It follows kubectl's conventions: `--kubeconfig`, `--context`, `-n/--namespace` (default: the
//! context's namespace), `-A/--all-namespaces` for lists, `-o wide|json|yaml|name`, errors that
//! name the object and the next command, and distinct exit codes ([`error::code`]).

pub mod cmds;
pub mod error;
pub mod print;
pub mod repo;
pub mod watch;

use crate::errln;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub use error::PluginError;
use print::Output;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl hoard",
    bin_name = "kubectl hoard",
    version,
    about = "Operate hoard backups from kubectl: trigger, pause, list, describe, restore, watch, check repositories"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// List objects in every namespace.
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
    /// Output format: wide, json, yaml or name (default: a table).
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Output>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a backup now: create a BackupSession for a BackupConfiguration.
    Trigger {
        /// BackupConfiguration name.
        config: String,
        /// Which of its sessions (needed when it has more than one).
        #[arg(long)]
        session: Option<String>,
    },
    /// Stop scheduling a BackupConfiguration (spec.paused = true).
    Pause {
        /// BackupConfiguration name.
        config: String,
    },
    /// Resume a paused BackupConfiguration.
    Resume {
        /// BackupConfiguration name.
        config: String,
    },
    /// List BackupSessions.
    Sessions {
        /// Only sessions of this BackupConfiguration.
        #[arg(long)]
        config: Option<String>,
    },
    /// List Snapshots.
    Snapshots {
        /// Only snapshots in the repositories of this BackupConfiguration.
        #[arg(long, conflicts_with = "repository")]
        config: Option<String>,
        /// Only snapshots of this Repository.
        #[arg(long)]
        repository: Option<String>,
    },
    /// Show one object in detail.
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// Restore a snapshot into a PVC or a workload's volumes: create a RestoreSession.
    Restore(RestoreArgs),
    /// Follow a BackupSession or RestoreSession until it ends; exit 0 when it Succeeded.
    Watch(WatchArgs),
    /// Repository maintenance, run here with the repository's own credentials from the cluster.
    Repo {
        #[command(subcommand)]
        action: RepoAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum DescribeWhat {
    /// A Snapshot: its components, phases, sizes, repository snapshot ids and errors.
    #[command(alias = "snap")]
    Snapshot {
        /// Snapshot object name.
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot object name, or `latest` (the newest Succeeded snapshot of --repository).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Repository object name (needed with `latest`; derived from --snapshot otherwise).
    #[arg(long)]
    pub repository: Option<String>,
    /// Instead of a repository snapshot: a CSI VolumeSnapshot, restored by its driver into a new
    /// claim (`--to pvc/NEW`), or into an existing claim through a clone that the node's agent
    /// copies (with `--overwrite` when the claim holds data).
    #[arg(long, conflicts_with_all = ["snapshot", "repository", "components", "include", "exclude"])]
    pub from_volume_snapshot: Option<String>,
    /// With --from-volume-snapshot: the VolumeSnapshot's namespace, when it is another one (its
    /// owner must have annotated it `hoard.dev/restore-into-namespaces` with this namespace).
    #[arg(long, requires = "from_volume_snapshot")]
    pub from_namespace: Option<String>,
    /// With --from-volume-snapshot: the new claim's size (e.g. 20Gi; default: as the
    /// snapshot's source claim, at least the snapshot's restore size).
    #[arg(long, requires = "from_volume_snapshot")]
    pub size: Option<String>,
    /// With --from-volume-snapshot: the new claim's storage class (default: the source claim's).
    #[arg(long, requires = "from_volume_snapshot")]
    pub storage_class: Option<String>,
    /// With --from-volume-snapshot: the new claim's access modes (repeatable; default: the
    /// source claim's).
    #[arg(long = "access-mode", requires = "from_volume_snapshot", value_parser = ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"])]
    pub access_modes: Vec<String>,
    /// What to restore into: `pvc/NAME`, `deployment/NAME` or `statefulset/NAME`.
    #[arg(long)]
    pub to: String,
    /// Only these components (volumes) of the snapshot (repeatable; default: all).
    #[arg(long = "component")]
    pub components: Vec<String>,
    /// Restore only paths matching (repeatable).
    #[arg(long)]
    pub include: Vec<String>,
    /// Leave out paths matching (repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Files already in the volumes: `never` (the default) refuses a volume that holds any;
    /// `if-changed`, `if-newer` and `always` decide per entry as `hoard restore --overwrite`
    /// does. `--overwrite` alone means `always`.
    #[arg(long, value_enum, num_args = 0..=1, default_value_t = crate::ops::OverwriteArg::Never, default_missing_value = "always")]
    pub overwrite: crate::ops::OverwriteArg,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Session name; `backupsession/NAME` or `restoresession/NAME` when both kinds use it.
    pub session: String,
    /// Give up after this long, e.g. `30s`, `10m`, `2h` (exit code 32).
    #[arg(long, default_value = "24h")]
    pub timeout: String,
    /// How often to read the status.
    #[arg(long, default_value = "1s", hide = true)]
    pub interval: String,
}

#[derive(Subcommand, Debug)]
pub enum RepoAction {
    /// Verify a Repository's structure (and with --read-data, its data), like `hoard check`.
    Check {
        /// Repository object name.
        repository: String,
        /// Download and verify every pack.
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        /// Download and verify this share of the packs, e.g. `10%`.
        #[arg(long)]
        read_data_subset: Option<String>,
    },
    /// Remove stale locks left by processes that died, like `hoard unlock`.
    Unlock {
        /// Repository object name.
        repository: String,
        /// Remove every lock, stale or not.
        #[arg(long)]
        remove_all: bool,
    },
    /// The repository's key slots.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysAction {
    /// List key slots, like `hoard key list`.
    List {
        /// Repository object name.
        repository: String,
    },
}

/// A connected client and the resolved flags.
#[derive(Clone)]
pub struct Ctx {
    pub client: Client,
    /// `-n`, else the context's namespace, else `default`.
    pub namespace: String,
    pub all_namespaces: bool,
    pub output: Output,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("namespace", &self.namespace)
            .field("all_namespaces", &self.all_namespaces)
            .field("output", &self.output)
            .finish()
    }
}

impl Ctx {
    pub async fn connect(g: &Global) -> Result<Ctx, PluginError> {
        let opts = KubeConfigOptions { context: g.context.clone(), cluster: None, user: None };
        let context_hint = "list the contexts with: kubectl config get-contexts";
        let config = match &g.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path).map_err(|e| {
                    PluginError::Cluster(format!("cannot read the kubeconfig {}: {e}", path.display()))
                })?;
                Config::from_custom_kubeconfig(kc, &opts).await.map_err(|e| {
                    PluginError::Cluster(format!("kubeconfig {} is not usable: {e}; {context_hint}", path.display()))
                })?
            }
            None => match Config::from_kubeconfig(&opts).await {
                Ok(c) => c,
                Err(e) if g.context.is_some() => {
                    return Err(PluginError::Cluster(format!("kubeconfig is not usable: {e}; {context_hint}")));
                }
                Err(e) => Config::incluster().map_err(|_| {
                    PluginError::Cluster(format!(
                        "no usable kubeconfig ({e}) and not running in a cluster; pass --kubeconfig FILE or set KUBECONFIG"
                    ))
                })?,
            },
        };
        let namespace = g.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)
            .map_err(|e| PluginError::Cluster(format!("cannot build a Kubernetes client: {e}")))?;
        Ok(Ctx { client, namespace, all_namespaces: g.all_namespaces, output: g.output.unwrap_or_default() })
    }

    /// The namespace a list looks in: `None` with `-A`.
    pub fn list_namespace(&self) -> Option<&str> {
        (!self.all_namespaces).then_some(self.namespace.as_str())
    }
}

/// Parses `30s`, `10m`, `1h30m`, `250ms`.
pub fn parse_duration_flag(flag: &str, v: &str) -> Result<Duration, PluginError> {
    hoard_api::crd::parse_duration(v)
        .ok_or_else(|| PluginError::Usage(format!("{flag} {v:?} is not a duration such as 30s, 10m or 1h30m")))
}

pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let ctx = Ctx::connect(&cli.global).await?;
    match cli.command {
        Command::Trigger { config, session } => cmds::trigger(&ctx, &config, session.as_deref()).await,
        Command::Pause { config } => cmds::set_paused(&ctx, &config, true).await,
        Command::Resume { config } => cmds::set_paused(&ctx, &config, false).await,
        Command::Sessions { config } => cmds::sessions(&ctx, config.as_deref()).await,
        Command::Snapshots { config, repository } => {
            cmds::snapshots(&ctx, config.as_deref(), repository.as_deref()).await
        }
        Command::Describe { what: DescribeWhat::Snapshot { name } } => cmds::describe_snapshot(&ctx, &name).await,
        Command::Restore(a) => cmds::restore(&ctx, a).await,
        Command::Watch(a) => watch::watch(&ctx, a).await,
        Command::Repo { action } => repo::run(&ctx, action).await,
    }
}

/// The exit code for an error: the plugin's own, a repository error's (as `hoard` uses), else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(p) = e.downcast_ref::<PluginError>() {
        return p.exit_code();
    }
    if let Some(h) = e.downcast_ref::<hoard_core::Error>() {
        return h.exit_code().clamp(0, 255) as u8;
    }
    1
}

/// `kubectl-hoard`'s `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_ansi(crate::output::stderr_colour())
        // A log line that cannot be written (standard error closed) is dropped: reporting
        // that on standard error would panic.
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            errln!("error: {e:#}");
            exit_code(&e)
        }
    };
    match crate::output::stdout_failure() {
        Some(e) if code == 0 => {
            errln!("error: cannot write to standard output: {e}");
            ExitCode::from(1)
        }
        _ => ExitCode::from(code),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_and_argument_has_help() {
        let missing = crate::output::without_help(super::Cli::command());
        assert!(missing.is_empty(), "no help text for: {}", missing.join(", "));
    }
}
