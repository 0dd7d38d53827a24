//! `hoard`: back up, restore, list and check hoard repositories — no cluster needed.
//!
//! Exit codes: 0 success, 1 failure, 3 finished with warnings (some files skipped or failed, or
//! a missing backup source skipped), 10 no repository, 11 repository locked, 12 wrong password,
//! 13 unsupported format version, 14 repository damaged, 15 no space left (repository or
//! restore target), 130 interrupted.
//! A reader of standard output that goes away is no failure (see [`hoard::output`]).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use hoard_core::backup::{BackupOptions, ParentSelection, Source};
use hoard_core::browse::{self, Located};
use hoard_core::crypto::KdfParams;
use hoard_core::progress::Progress;
use hoard_core::repo::{InitOptions, RepoParams, SnapshotFilter};
use hoard_core::restore::{RestoreOptions, RestoreSource};
use hoard_core::retention::{KeepCount, WithinDuration};
use hoard_core::store::{StoreOptions, open_store};
use hoard_core::tree::NodeKind;
use hoard_core::util::human_bytes;
use hoard_core::{Error, Id, Password, Repository};

use hoard::listing;
use hoard::ops::{OverwriteArg, parse_percent};
use hoard::output::{ProgressReporter, count, print_json};
use hoard::{errln, outln};

const EXIT_WARNINGS: u8 = 3;

#[derive(Parser, Debug)]
#[command(name = "hoard", version, about = "Encrypted, deduplicated backups of files and streams")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// Repository location: a directory, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix.
    #[arg(short = 'r', long = "repo", env = "HOARD_REPOSITORY", global = true)]
    repo: Option<String>,
    /// Read the password from this file (first line); wins over HOARD_PASSWORD, as in restic.
    #[arg(long, env = "HOARD_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
    /// S3 endpoint URL (for S3-compatible servers).
    #[arg(long, env = "HOARD_S3_ENDPOINT", global = true)]
    s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, AWS_DEFAULT_REGION, then us-east-1).
    #[arg(long, env = "HOARD_S3_REGION", global = true)]
    s3_region: Option<String>,
    /// Machine-readable output: JSON documents and JSON progress lines.
    #[arg(long, global = true)]
    json: bool,
    /// No progress output.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Where index files and snapshots of remote repositories are kept between commands
    /// (default: $XDG_CACHE_HOME/hoard/repositories, else ~/.cache/hoard/repositories).
    #[arg(long, env = "HOARD_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// Read every index file and snapshot from the repository itself (`check` always does).
    #[arg(long, global = true)]
    no_cache: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Back up directories, files or standard input into a new snapshot.
    Backup(BackupArgs),
    /// List snapshots.
    Snapshots(FilterArgs),
    /// List the entries of a snapshot.
    Ls {
        /// Snapshot id prefix or `latest`.
        snapshot: String,
        /// Path inside the snapshot, `/component/path`.
        path: Option<String>,
        /// Long listing: mode, owner, size, time.
        #[arg(short, long)]
        long: bool,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Show what changed between two snapshots.
    Diff {
        /// The older snapshot: id prefix or `latest`.
        a: String,
        /// The newer snapshot: id prefix or `latest`.
        b: String,
    },
    /// Restore a snapshot, a component or a path into a directory.
    Restore(RestoreArgs),
    /// Write one file of a snapshot to standard output.
    Dump {
        /// Snapshot id prefix or `latest`.
        snapshot: String,
        /// A stream component's name, or `/component/path` of a file.
        path: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Repository or snapshot statistics.
    Stats {
        /// Also count what this snapshot (id prefix or `latest`) holds and restores.
        snapshot: Option<String>,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Verify the repository's structure and, with --read-data, all of its data.
    Check {
        /// Download and verify every pack.
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        /// Download and verify this share of the packs, e.g. `10%`.
        #[arg(long)]
        read_data_subset: Option<String>,
    },
    /// Remove snapshots according to a retention policy (restic's `forget` rules).
    Forget(ForgetArgs),
    /// Remove unreferenced data; repack packs that are mostly unused.
    Prune(PruneArgs),
    /// Manage the passwords (key slots) that open the repository.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Copy snapshots into another repository (re-encrypted under its keys).
    Copy {
        /// The source repository; --repo names the target.
        #[arg(long)]
        from_repo: String,
        /// Password file of the source repository (else HOARD_FROM_PASSWORD).
        #[arg(long)]
        from_password_file: Option<PathBuf>,
        /// Snapshots to copy (default: all not yet in the target).
        snapshots: Vec<String>,
    },
    /// Remove stale locks left by processes that died.
    Unlock {
        /// Remove every lock, stale or not.
        #[arg(long)]
        remove_all: bool,
    },
    /// Repair repository metadata.
    Repair {
        #[command(subcommand)]
        what: RepairWhat,
    },
}

#[derive(Subcommand, Debug)]
enum KeyAction {
    /// List key slots.
    List,
    /// Add a password (read from --new-password-file, else HOARD_NEW_PASSWORD, else a prompt).
    Add(NewPassword),
    /// Remove a key slot by id prefix (not the one in use).
    Remove {
        /// Id prefix of the key slot, as `key list` shows it.
        id: String,
    },
    /// Change the password in use.
    Passwd(NewPassword),
}

#[derive(Args, Debug)]
struct NewPassword {
    /// Read the new password from this file (first line); else HOARD_NEW_PASSWORD, else a prompt.
    #[arg(long)]
    new_password_file: Option<PathBuf>,
    /// Argon2id memory in MiB for the new key slot.
    #[arg(long, default_value_t = 64)]
    kdf_memory_mib: u32,
    /// Argon2id passes for the new key slot.
    #[arg(long, default_value_t = 3)]
    kdf_iterations: u32,
    /// Accept key derivation cheaper than 19 MiB × 2 passes (tests, throwaway repositories).
    #[arg(long)]
    insecure_kdf: bool,
}

#[derive(Subcommand, Debug)]
enum RepairWhat {
    /// Rebuild the index from the pack headers.
    Index,
    /// Salvage what damaged, truncated or missing packs still hold and drop the rest from the
    /// index, so the next backup stores lost data anew from its source.
    Packs {
        /// Only these packs (ids or `packs/ab/<id>` as `check` names them); default: every pack.
        packs: Vec<String>,
        /// Report what would be done; change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
    /// Rewrite snapshots that still reference lost data without the files and directories
    /// that cannot be restored; the new snapshots are tagged `repaired`.
    Snapshots {
        /// Only these snapshots (id prefixes or `latest`); default: every snapshot.
        snapshots: Vec<String>,
        /// Delete each original once its repaired snapshot is written.
        #[arg(long)]
        forget: bool,
        /// Report what would be done; change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
    },
}

#[derive(Args, Debug)]
struct ForgetArgs {
    /// Snapshots to remove explicitly (id prefixes); no policy needed then.
    snapshots: Vec<String>,
    /// Keep the last N snapshots (-1 or `unlimited`: all).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = keep_count)]
    keep_last: Option<KeepCount>,
    /// Keep the newest snapshot of each of the last N hours that have one (-1: every hour).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = keep_count)]
    keep_hourly: Option<KeepCount>,
    /// Keep the newest snapshot of each of the last N days that have one (-1: every day).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = keep_count)]
    keep_daily: Option<KeepCount>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one (-1: every week).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = keep_count)]
    keep_weekly: Option<KeepCount>,
    /// Keep the newest snapshot of each of the last N months that have one (-1: every month).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = keep_count)]
    keep_monthly: Option<KeepCount>,
    /// Keep the newest snapshot of each of the last N years that have one (-1: every year).
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = keep_count)]
    keep_yearly: Option<KeepCount>,
    /// Keep snapshots newer than this before the newest, e.g. `2d`, `1y6mo`, `90m` (units
    /// largest first: y, mo months, w, d, h, m minutes).
    #[arg(long, value_name = "PERIOD", value_parser = period)]
    keep_within: Option<WithinDuration>,
    /// Keep the newest snapshot of each hour within this period before the newest snapshot.
    #[arg(long, value_name = "PERIOD", value_parser = period)]
    keep_within_hourly: Option<WithinDuration>,
    /// Keep the newest snapshot of each day within this period before the newest snapshot.
    #[arg(long, value_name = "PERIOD", value_parser = period)]
    keep_within_daily: Option<WithinDuration>,
    /// Keep the newest snapshot of each week within this period before the newest snapshot.
    #[arg(long, value_name = "PERIOD", value_parser = period)]
    keep_within_weekly: Option<WithinDuration>,
    /// Keep the newest snapshot of each month within this period before the newest snapshot.
    #[arg(long, value_name = "PERIOD", value_parser = period)]
    keep_within_monthly: Option<WithinDuration>,
    /// Keep the newest snapshot of each year within this period before the newest snapshot.
    #[arg(long, value_name = "PERIOD", value_parser = period)]
    keep_within_yearly: Option<WithinDuration>,
    /// Keep snapshots with these tags (comma-separated: all must be present; repeatable).
    #[arg(long = "keep-tag")]
    keep_tags: Vec<String>,
    /// Group snapshots by `host`, `tags`, `labels` (all labels), `label:KEY` (comma-separated;
    /// empty: no grouping).
    #[arg(long, default_value = "host,tags")]
    group_by: String,
    #[command(flatten)]
    filter: FilterArgs,
    /// Show what would be removed; remove nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Run prune afterwards.
    #[arg(long)]
    prune: bool,
    /// With --prune: unused space tolerated after pruning, as a share of used space.
    #[arg(long, default_value = "5%")]
    max_unused: String,
}

/// The message of a core argument error, without its `invalid argument:` prefix (clap adds
/// its own).
fn argument_message(e: Error) -> String {
    match e {
        Error::InvalidArgument(m) => m,
        e => e.to_string(),
    }
}

fn keep_count(s: &str) -> Result<KeepCount, String> {
    s.parse().map_err(argument_message)
}

fn period(s: &str) -> Result<WithinDuration, String> {
    s.parse().map_err(argument_message)
}

#[derive(Args, Debug)]
struct PruneArgs {
    /// Unused space tolerated after pruning, as a share of used space, e.g. `5%`.
    #[arg(long, default_value = "5%")]
    max_unused: String,
    /// Show what would be deleted and repacked; change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
}

#[derive(Args, Debug, Clone, Default)]
struct FilterArgs {
    /// Only snapshots from this host.
    #[arg(long)]
    host: Option<String>,
    /// Only snapshots with this tag (repeatable: all must match).
    #[arg(long = "tag")]
    tags: Vec<String>,
}

impl FilterArgs {
    fn filter(&self) -> SnapshotFilter {
        SnapshotFilter { host: self.host.clone(), tags: self.tags.clone() }
    }
}

#[derive(Args, Debug)]
struct InitArgs {
    /// Minimum chunk size in KiB.
    #[arg(long, default_value_t = 512)]
    chunk_min_kib: u32,
    /// Average chunk size in KiB.
    #[arg(long, default_value_t = 1024)]
    chunk_avg_kib: u32,
    /// Maximum chunk size in KiB.
    #[arg(long, default_value_t = 8192)]
    chunk_max_kib: u32,
    /// Target pack size in MiB.
    #[arg(long, default_value_t = 16)]
    pack_size_mib: u32,
    /// zstd level (0 = no compression).
    #[arg(long, default_value_t = 1)]
    compression: i32,
    /// Argon2id memory in MiB for the key slot (memory × passes at least 38 MiB, e.g. 19 × 2).
    #[arg(long, default_value_t = 64)]
    kdf_memory_mib: u32,
    /// Argon2id passes.
    #[arg(long, default_value_t = 3)]
    kdf_iterations: u32,
    /// Accept key derivation cheaper than 19 MiB × 2 passes, down to 8 MiB × 1 (tests and
    /// throwaway repositories only: it makes guessing the password cheap).
    #[arg(long)]
    insecure_kdf: bool,
}

#[derive(Args, Debug)]
struct BackupArgs {
    /// Directories or files; each becomes one component of the snapshot.
    paths: Vec<PathBuf>,
    /// Component name (only with a single path or --stdin); default: the path's last element.
    #[arg(long)]
    name: Option<String>,
    /// Read the data from standard input into a stream component.
    #[arg(long)]
    stdin: bool,
    /// Name of the stream component read from standard input.
    #[arg(long, default_value = "stdin")]
    stdin_name: String,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Free-form label KEY=VALUE (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Host name recorded in the snapshot.
    #[arg(long)]
    host: Option<String>,
    /// Compare against this snapshot instead of the newest one of this host.
    #[arg(long)]
    parent: Option<String>,
    /// Read every file, ignoring the parent snapshot.
    #[arg(long)]
    force: bool,
    /// Time recorded in the snapshot (RFC 3339), instead of now.
    #[arg(long)]
    time: Option<chrono::DateTime<chrono::Utc>>,
    /// Exclude a glob pattern (repeatable); a pattern without `/` matches names at any depth.
    #[arg(short = 'e', long = "exclude")]
    excludes: Vec<String>,
    /// Read exclude patterns from a file, one per line.
    #[arg(long)]
    exclude_file: Vec<PathBuf>,
    /// Back up only what matches a glob pattern (repeatable), plus the directories leading to
    /// it; a matching directory is backed up whole. A pattern without `/` matches names at any
    /// depth, one with `/` the path below each backed-up directory. Excludes still win.
    #[arg(short = 'i', long = "include")]
    includes: Vec<String>,
    /// Do not cross filesystem boundaries.
    #[arg(short = 'x', long)]
    one_file_system: bool,
    /// Memory budget for data in flight, in MiB.
    #[arg(long, default_value_t = 512)]
    memory_budget_mib: usize,
    /// Files read at the same time (default: the number of cores, at least 4).
    #[arg(long, default_value_t = hoard_core::backup::default_read_concurrency())]
    read_concurrency: usize,
    /// Packs uploaded at the same time (default: 2 for a repository on a filesystem, else the
    /// number of cores, at least 4).
    #[arg(long)]
    upload_concurrency: Option<usize>,
    /// Read files with plain reads, never io_uring (io_uring is used where the kernel allows).
    #[arg(long)]
    no_io_uring: bool,
    /// Read every file through the page cache (by default files of 1 MiB and more are read with
    /// O_DIRECT where the filesystem allows it).
    #[arg(long)]
    no_direct_io: bool,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// `SNAPSHOT` or `SNAPSHOT:/component/path`.
    snapshot: String,
    /// Directory to restore into (created if missing).
    #[arg(short, long)]
    target: PathBuf,
    /// Restore only what matches a glob pattern (repeatable), plus the directories leading to
    /// it; a pattern without `/` matches names at any depth.
    #[arg(short, long = "include")]
    includes: Vec<String>,
    /// Leave out what matches a glob pattern (repeatable); excludes win over includes.
    #[arg(short, long = "exclude")]
    excludes: Vec<String>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Write every file through the page cache (by default files of 1 MiB and more are written
    /// with O_DIRECT where the filesystem allows it, sparing the page cache).
    #[arg(long)]
    no_direct_io: bool,
    /// Restore as into someone else's volume (what hoard's agent does): no set-user-id or
    /// set-group-id bits, no device nodes, no `security.*` / `trusted.*` extended attributes,
    /// and entries owned by root get the target directory's owner. Default: everything the
    /// snapshot records.
    #[arg(long)]
    confined: bool,
    /// What happens to an existing entry with the name of one being restored: `never` leaves
    /// it as it is (the default, as in the cluster), `if-changed` replaces it unless kind, size
    /// and modification time match (finishes an interrupted restore), `if-newer` when the
    /// snapshot's entry is newer, `always` replaces it. Directories are merged into.
    #[arg(long, value_enum, default_value_t = OverwriteArg::Never)]
    overwrite: OverwriteArg,
    /// Remove entries of the restored directories that the snapshot does not have (excluded
    /// paths are left alone; refused with --include).
    #[arg(long)]
    delete: bool,
    /// List what the restore would create, replace, keep and delete; write nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
}

fn main() -> ExitCode {
    hoard_core::util::tune_malloc();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // Damaged objects that loading skipped are warnings users must see. A restore's
            // warnings and failed files are in its outcome, which `restore` prints: logging
            // them too printed each one twice.
            tracing_subscriber::EnvFilter::try_from_env("HOARD_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "error,hoard_core::repo=warn,hoard_core::prune=warn,hoard_core::restore=off",
                )
            }),
        )
        .with_ansi(hoard::output::stderr_colour())
        // A log line that cannot be written (standard error closed) is dropped: reporting
        // that on standard error would panic.
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .init();
    raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            errln!("hoard: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = cli.global.json;
    let note = interruption_note(&cli.command);
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(cli) => Ok(r),
            s = interrupted() => Err(s),
        }
    });
    let outcome = match outcome {
        Ok(r) => r,
        Err((signal, code)) => {
            // The command's future is dropped: nothing more is written. Its locks go now rather
            // than blocking others until they turn stale.
            let released = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(10), hoard_core::lock::release_held_locks()).await
            });
            let locks = match released {
                Ok(0) => String::new(),
                Ok(_) => "; its lock is released".to_string(),
                Err(_) => "; its lock could not be released in time (`hoard unlock` removes it)".to_string(),
            };
            if json {
                print_json(
                    &serde_json::json!({"message_type": "error", "error": format!("interrupted by {signal}"), "exit_code": code}),
                );
            }
            errln!("hoard: interrupted by {signal}{locks}. {note}");
            // Threads still reading files are not waited for.
            std::process::exit(code);
        }
    };
    let code = match outcome {
        Ok(code) => code,
        Err(e) => {
            // A failed command's abandoned locks are of no use to anyone.
            let _ = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(10), hoard_core::lock::release_held_locks()).await
            });
            let code = e.downcast_ref::<Error>().map(|e| e.exit_code()).unwrap_or(1);
            let message = error_chain(&e);
            if json {
                print_json(&serde_json::json!({"message_type": "error", "error": message, "exit_code": code}));
            }
            errln!("hoard: {message}");
            code.clamp(0, 255) as u8
        }
    };
    // A reader that went away is not a failure (see hoard::output); a full disk is.
    match hoard::output::stdout_failure() {
        Some(e) if code == 0 || code == EXIT_WARNINGS => {
            errln!("hoard: cannot write to standard output: {e}");
            ExitCode::from(1)
        }
        _ => ExitCode::from(code),
    }
}

/// Waits for SIGINT or SIGTERM; returns its name and the conventional exit code (128 + n).
async fn interrupted() -> (&'static str, i32) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        // Without handlers the default actions stay in place.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => ("SIGINT", 130),
        _ = term.recv() => ("SIGTERM", 143),
    }
}

/// What an interrupted command leaves behind, and what running it again does.
fn interruption_note(command: &Command) -> &'static str {
    match command {
        Command::Backup(_) | Command::Copy { .. } => {
            "No snapshot was written. The data already uploaded stays in the repository: the next backup indexes \
             and reuses it instead of uploading it again, and `hoard prune` removes it otherwise."
        }
        Command::Restore(_) => "The target holds a partial restore; restoring again replaces what is there.",
        Command::Prune(_) | Command::Forget(_) | Command::Repair { .. } => {
            "It stopped where running it again finishes the job; nothing a snapshot references was removed."
        }
        _ => "Nothing was changed.",
    }
}

/// The error and its causes, `: `-joined, each cause once: hoard-core's I/O errors already
/// end with their cause's text, which the chain would otherwise repeat.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Deep trees keep one descriptor per level open; use the hard limit.
fn raise_fd_limit() {
    let lim = rustix_limit();
    if let Some((soft, hard)) = lim
        && soft < hard
    {
        set_limit(hard);
    }
}

fn rustix_limit() -> Option<(u64, u64)> {
    let l = hoard_core::util::nofile_limit();
    Some((l.0, l.1))
}

fn set_limit(n: u64) {
    hoard_core::util::set_nofile_limit(n);
}

fn repo_location(g: &Global) -> anyhow::Result<String> {
    g.repo.clone().ok_or_else(|| anyhow!("no repository given: use --repo or set HOARD_REPOSITORY"))
}

/// The first line of a password file.
fn password_from_file(f: &std::path::Path) -> anyhow::Result<Password> {
    let s = std::fs::read_to_string(f).with_context(|| format!("read password file {}", f.display()))?;
    Ok(Password::new(s.lines().next().unwrap_or("")))
}

/// A password from, in restic's order: a password file (flag or its variable), the password
/// variable, a prompt on a terminal.
fn password_from(file: Option<&std::path::Path>, var: &str) -> anyhow::Result<Option<Password>> {
    if let Some(f) = file {
        return password_from_file(f).map(Some);
    }
    Ok(std::env::var(var).ok().filter(|p| !p.is_empty()).map(Password::new))
}

fn read_password(g: &Global, confirm: bool) -> anyhow::Result<Password> {
    if let Some(p) = password_from(g.password_file.as_deref(), "HOARD_PASSWORD")? {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password("enter repository password: ")?;
        if confirm {
            let q = rpassword::prompt_password("enter the password again: ")?;
            if p != q {
                bail!("the passwords do not match");
            }
        }
        return Ok(Password::new(p));
    }
    bail!("no password: set HOARD_PASSWORD, use --password-file, or run on a terminal")
}

fn store_options(g: &Global, create: bool) -> StoreOptions {
    StoreOptions {
        s3_endpoint: g.s3_endpoint.clone(),
        s3_region: g.s3_region.clone(),
        create_dir: create,
        ..Default::default()
    }
}

async fn open_repo(g: &Global) -> anyhow::Result<Arc<Repository>> {
    open_repo_cached(g, !g.no_cache).await
}

/// Opens the repository; with `cache`, a remote one keeps its index files and snapshots in the
/// local cache directory ([`hoard_core::cache`]).
async fn open_repo_cached(g: &Global, cache: bool) -> anyhow::Result<Arc<Repository>> {
    let loc = repo_location(g)?;
    let mut store = open_store(&loc, &store_options(g, false))?;
    if cache
        && hoard_core::store::is_remote(&loc)
        && let Some(root) = cache_root(g)
    {
        let cache = hoard_core::cache::CacheDir::new(root, None);
        store = Arc::new(hoard_core::cache::CacheStore::new(store, cache));
    }
    let password = read_password(g, false)?;
    Ok(Arc::new(Repository::open(store, &password).await?))
}

fn cache_root(g: &Global) -> Option<PathBuf> {
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    g.cache_dir.clone().or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .and_then(non_empty)
            .or_else(|| std::env::var_os("HOME").and_then(non_empty).map(|h| h.join(".cache")))
            .map(|c| c.join("hoard").join("repositories"))
    })
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let g = &cli.global;
    match cli.command {
        Command::Init(a) => cmd_init(g, a).await,
        Command::Backup(a) => cmd_backup(g, a).await,
        Command::Snapshots(f) => cmd_snapshots(g, &f).await,
        Command::Ls { snapshot, path, long, filter } => cmd_ls(g, &snapshot, path.as_deref(), long, &filter).await,
        Command::Diff { a, b } => cmd_diff(g, &a, &b).await,
        Command::Restore(a) => cmd_restore(g, a).await,
        Command::Dump { snapshot, path, filter } => cmd_dump(g, &snapshot, &path, &filter).await,
        Command::Stats { snapshot, filter } => cmd_stats(g, snapshot.as_deref(), &filter).await,
        Command::Check { read_data, read_data_subset } => cmd_check(g, read_data, read_data_subset.as_deref()).await,
        Command::Forget(a) => cmd_forget(g, a).await,
        Command::Prune(a) => cmd_prune(g, a).await,
        Command::Key { action } => cmd_key(g, action).await,
        Command::Copy { from_repo, from_password_file, snapshots } => {
            cmd_copy(g, &from_repo, from_password_file, &snapshots).await
        }
        Command::Unlock { remove_all } => hoard::ops::unlock(&*open_repo(g).await?, remove_all, g.json).await,
        Command::Repair { what: RepairWhat::Index } => {
            let repo = open_repo_cached(g, false).await?;
            let (n, problems) = hoard_core::prune::repair_index(repo).await?;
            for p in &problems {
                errln!("warning: {p}");
            }
            outln!("index rebuilt from {n} packs");
            Ok(if problems.is_empty() { 0 } else { EXIT_WARNINGS })
        }
        Command::Repair { what: RepairWhat::Packs { packs, dry_run } } => cmd_repair_packs(g, &packs, dry_run).await,
        Command::Repair { what: RepairWhat::Snapshots { snapshots, forget, dry_run } } => {
            cmd_repair_snapshots(g, &snapshots, forget, dry_run).await
        }
    }
}

async fn cmd_init(g: &Global, a: InitArgs) -> anyhow::Result<u8> {
    let loc = repo_location(g)?;
    let store = open_store(&loc, &store_options(g, true))?;
    let password = read_password(g, true)?;
    let chunker = hoard_core::chunker::ChunkerParams {
        min: a.chunk_min_kib * 1024,
        avg: a.chunk_avg_kib * 1024,
        max: a.chunk_max_kib * 1024,
    };
    let params = RepoParams {
        chunker,
        pack_size: a.pack_size_mib * 1024 * 1024,
        compression_level: a.compression,
        large_files: hoard_core::chunker::LargeFileChunking::default_for(&chunker),
    };
    let kdf = KdfParams { memory_kib: a.kdf_memory_mib * 1024, iterations: a.kdf_iterations, ..KdfParams::default() };
    let repo = Repository::init(store, &password, InitOptions { params, kdf, allow_weak_kdf: a.insecure_kdf }).await?;
    if g.json {
        print_json(
            &serde_json::json!({"message_type": "initialized", "id": repo.id().to_hex(), "repository": repo.store().location()}),
        );
    } else {
        outln!("created hoard repository {} at {}", repo.id().short(), repo.store().location());
        outln!("Keep the password safe: without it the data cannot be restored.");
    }
    Ok(0)
}

fn component_name(path: &std::path::Path) -> String {
    std::path::absolute(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| hoard_core::tree::valid_name(n.as_bytes()))
        .unwrap_or_else(|| "root".to_string())
}

async fn cmd_backup(g: &Global, a: BackupArgs) -> anyhow::Result<u8> {
    hoard_core::util::fix_mmap_threshold();
    let mut sources = Vec::new();
    if a.stdin {
        if !a.paths.is_empty() {
            bail!("--stdin takes no paths");
        }
        let name = a.name.clone().unwrap_or(a.stdin_name.clone());
        sources.push(Source::Stream { name, reader: Box::new(std::io::stdin()) });
    } else {
        if a.paths.is_empty() {
            bail!("nothing to back up: give paths or --stdin");
        }
        if a.name.is_some() && a.paths.len() > 1 {
            bail!("--name needs exactly one path");
        }
        for p in &a.paths {
            let name = a.name.clone().unwrap_or_else(|| component_name(p));
            sources.push(Source::Path { name, path: p.clone() });
        }
    }
    let mut excludes = a.excludes.clone();
    for f in &a.exclude_file {
        let s = std::fs::read_to_string(f).with_context(|| format!("read exclude file {}", f.display()))?;
        excludes.extend(s.lines().map(str::to_string));
    }
    let mut labels = BTreeMap::new();
    for l in &a.labels {
        let (k, v) = l.split_once('=').ok_or_else(|| anyhow!("label {l:?} is not KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let progress = Arc::new(Progress::default());
    let mut opts = BackupOptions {
        sources,
        tags: a.tags.clone(),
        labels,
        excludes,
        includes: a.includes.clone(),
        one_file_system: a.one_file_system,
        memory_budget: a.memory_budget_mib * 1024 * 1024,
        read_concurrency: a.read_concurrency,
        io_uring: !a.no_io_uring,
        direct_io: !a.no_direct_io,
        progress: Arc::clone(&progress),
        ..BackupOptions::default()
    };
    // Warms the sources' metadata while the key is derived and the repository opened.
    opts.warmup = Some(hoard_core::backup::start_warmup(&opts)?);
    let repo = open_repo(g).await?;
    opts.parent = if a.force {
        ParentSelection::None
    } else if let Some(p) = &a.parent {
        repo.load_index().await?;
        let (id, _) = repo.find_snapshot(p, &SnapshotFilter::default()).await?;
        ParentSelection::Explicit(id)
    } else {
        ParentSelection::Auto
    };
    opts.writer.upload_concurrency = a.upload_concurrency;
    opts.time = a.time;
    if let Some(h) = &a.host {
        opts.host = h.clone();
    }
    let reporter = ProgressReporter::start(progress, g.json, g.quiet, "backup");
    let result = hoard_core::backup::backup(Arc::clone(&repo), opts).await;
    reporter.stop().await;
    let out = result?;
    let s = &out.snapshot.summary;
    if g.json {
        print_json(&serde_json::json!({
            "message_type": "summary",
            "snapshot_id": out.snapshot_id.to_hex(),
            "summary": s,
            "warnings": out.snapshot.warnings,
        }));
    } else if !g.quiet {
        for w in &out.snapshot.warnings {
            errln!("warning: {w}");
        }
        outln!(
            "Files: {} new, {} changed, {} unmodified; {} dirs, {} other",
            s.files_new,
            s.files_changed,
            s.files_unmodified,
            s.dirs,
            s.other_entries
        );
        outln!(
            "Data: {} in snapshot, {} read, {} new, {} stored",
            human_bytes(s.total_bytes),
            human_bytes(s.bytes_read),
            human_bytes(s.bytes_new),
            human_bytes(s.bytes_stored)
        );
        outln!("snapshot {} saved in {:.2}s", out.snapshot_id.short(), s.duration_ms as f64 / 1000.0);
    }
    Ok(if s.warnings > 0 { EXIT_WARNINGS } else { 0 })
}

async fn cmd_snapshots(g: &Global, f: &FilterArgs) -> anyhow::Result<u8> {
    let repo = open_repo(g).await?;
    let filter = f.filter();
    let snaps: Vec<_> = repo.list_snapshots().await?.into_iter().filter(|(_, s)| filter.matches(s)).collect();
    if g.json {
        let v: Vec<_> = snaps
            .iter()
            .map(|(id, s)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["id"] = serde_json::Value::String(id.to_hex());
                v["short_id"] = serde_json::Value::String(id.short());
                v
            })
            .collect();
        print_json(&serde_json::Value::Array(v));
        return Ok(0);
    }
    outln!("{:<10} {:<20} {:<16} {:<20} {:<24} {:>12}", "ID", "Time", "Host", "Tags", "Components", "Size");
    for (id, s) in &snaps {
        let comps: Vec<&str> = s.components.iter().map(|c| c.name.as_str()).collect();
        outln!(
            "{:<10} {:<20} {:<16} {:<20} {:<24} {:>12}",
            id.short(),
            s.time.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S"),
            s.host,
            s.tags.join(","),
            comps.join(","),
            human_bytes(s.summary.total_bytes)
        );
    }
    outln!("{}", count(snaps.len(), "snapshot"));
    Ok(0)
}

async fn cmd_ls(g: &Global, spec: &str, path: Option<&str>, long: bool, f: &FilterArgs) -> anyhow::Result<u8> {
    let repo = open_repo(g).await?;
    repo.load_index().await?;
    let (id, snap) = repo.find_snapshot(spec, &f.filter()).await?;
    // Paths as the snapshot records them: names need not be UTF-8.
    let mut rows: Vec<(Vec<u8>, hoard_core::tree::Node)> = Vec::new();
    let mut visit = |p: &[u8], n: &hoard_core::tree::Node| rows.push((p.to_vec(), n.clone()));
    match path {
        None | Some("/") | Some("") => {
            for c in &snap.components {
                listing::walk(&repo, c.root, format!("/{}", c.name).into_bytes(), &mut visit).await?;
            }
        }
        Some(p) => match browse::locate(&repo, &snap, p).await? {
            Located::Root { component, tree } => {
                listing::walk(&repo, tree, format!("/{component}").into_bytes(), &mut visit).await?
            }
            Located::Node { path, node } => {
                let sub = node.subtree;
                let is_dir = node.kind == NodeKind::Dir;
                visit(path.as_bytes(), &node);
                if let (true, Some(sub)) = (is_dir, sub) {
                    listing::walk(&repo, sub, path.into_bytes(), &mut visit).await?;
                }
            }
        },
    }
    if g.json {
        print_json(&serde_json::json!({"message_type": "snapshot", "id": id.to_hex(), "time": snap.time}));
        for (p, n) in &rows {
            print_json(&serde_json::json!({
                "message_type": "node", "path": String::from_utf8_lossy(p), "type": format!("{:?}", n.kind).to_lowercase(),
                "size": n.size, "mode": n.mode, "uid": n.uid, "gid": n.gid,
                "mtime": chrono::DateTime::from_timestamp(n.mtime.sec, n.mtime.nsec),
            }));
        }
        return Ok(0);
    }
    for (p, n) in &rows {
        let p = listing::escape_name(p);
        if long {
            let t = chrono::DateTime::from_timestamp(n.mtime.sec, n.mtime.nsec)
                .map(|t| t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            let link = n.link_target.as_ref().map(|t| format!(" -> {}", listing::escape_name(t))).unwrap_or_default();
            outln!(
                "{} {:>5} {:>5} {:>12} {} {p}{link}",
                listing::mode_string(n.kind, n.mode),
                n.uid,
                n.gid,
                listing::size_column(n),
                t
            );
        } else {
            outln!("{p}");
        }
    }
    Ok(0)
}

async fn cmd_diff(g: &Global, a: &str, b: &str) -> anyhow::Result<u8> {
    let repo = open_repo(g).await?;
    repo.load_index().await?;
    let (ia, sa) = repo.find_snapshot(a, &SnapshotFilter::default()).await?;
    let (ib, sb) = repo.find_snapshot(b, &SnapshotFilter::default()).await?;
    let mut names: Vec<&str> = sa.components.iter().chain(&sb.components).map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for n in names {
        let ra = sa.component(n).map(|c| c.root);
        let rb = sb.component(n).map(|c| c.root);
        browse::diff(&repo, ra, rb, format!("/{n}"), &mut out).await?;
    }
    if g.json {
        print_json(&serde_json::json!({"from": ia.to_hex(), "to": ib.to_hex(), "changes": out}));
    } else {
        outln!("comparing snapshot {} to {}:", ia.short(), ib.short());
        for d in &out {
            let c = match d.change {
                browse::Change::Added => '+',
                browse::Change::Removed => '-',
                browse::Change::Modified => 'M',
                browse::Change::Metadata => 'U',
            };
            outln!("{c}    {}", d.path);
        }
        let count = |c| out.iter().filter(|d| d.change == c).count();
        outln!(
            "{} added, {} removed, {} modified, {} metadata only",
            count(browse::Change::Added),
            count(browse::Change::Removed),
            count(browse::Change::Modified),
            count(browse::Change::Metadata)
        );
    }
    Ok(0)
}

async fn cmd_restore(g: &Global, a: RestoreArgs) -> anyhow::Result<u8> {
    hoard_core::util::hold_heap_memory();
    let repo = open_repo(g).await?;
    repo.load_index().await?;
    let (spec, path) = match a.snapshot.split_once(':') {
        Some((s, p)) => (s.to_string(), Some(p.to_string())),
        None => (a.snapshot.clone(), None),
    };
    let (id, snap) = repo.find_snapshot(&spec, &a.filter.filter()).await?;
    let progress = Arc::new(Progress::default());
    let mut targets: Vec<RestoreTarget> = Vec::new();
    let mut total = 0u64;
    match path.as_deref() {
        None | Some("") | Some("/") => {
            for c in &snap.components {
                total += c.stats.total_bytes;
                // A dry run creates nothing, not even the component's directory.
                let dir = if a.dry_run { None } else { Some(open_component_dir(&a.target, &c.name, &id)?) };
                targets.push(RestoreTarget {
                    source: RestoreSource::Tree(c.root),
                    path: a.target.join(&c.name),
                    dir,
                    prefix: c.name.clone(),
                    root_node: c.root_node.clone(),
                });
            }
        }
        Some(p) => match browse::locate(&repo, &snap, p).await? {
            Located::Root { tree, component } => {
                total += snap.component(&component).map(|c| c.stats.total_bytes).unwrap_or(0);
                let root_node = snap.component(&component).and_then(|c| c.root_node.clone());
                targets.push(RestoreTarget {
                    source: RestoreSource::Tree(tree),
                    path: a.target.clone(),
                    dir: None,
                    prefix: component,
                    root_node,
                })
            }
            Located::Node { node, path } if node.kind == NodeKind::Dir => {
                let sub = node.subtree.ok_or_else(|| anyhow!("directory without listing"))?;
                targets.push(RestoreTarget {
                    source: RestoreSource::Tree(sub),
                    path: a.target.clone(),
                    dir: None,
                    prefix: path,
                    root_node: None,
                })
            }
            Located::Node { node, path } => {
                total += node.size;
                let parent = path.rsplit_once('/').map(|(p, _)| p.to_string()).unwrap_or_default();
                targets.push(RestoreTarget {
                    source: RestoreSource::Node(node),
                    path: a.target.clone(),
                    dir: None,
                    prefix: parent,
                    root_node: None,
                })
            }
        },
    }
    if a.dry_run {
        return print_restore_plan(g, &a, repo, targets).await;
    }
    progress.bytes_total.store(total, std::sync::atomic::Ordering::Relaxed);
    progress.totals_known.store(total > 0, std::sync::atomic::Ordering::Relaxed);
    let reporter = ProgressReporter::start(Arc::clone(&progress), g.json, g.quiet, "restore");
    let mut combined = hoard_core::restore::RestoreOutcome::default();
    let mut result = Ok(());
    for t in targets {
        let source = t.source.clone();
        let mut opts = restore_options(&a, t);
        opts.progress = Arc::clone(&progress);
        match hoard_core::restore::restore(Arc::clone(&repo), source, opts).await {
            Ok(o) => {
                combined.files += o.files;
                combined.dirs += o.dirs;
                combined.other += o.other;
                combined.bytes += o.bytes;
                combined.failed.extend(o.failed);
                combined.target_full |= o.target_full;
                combined.failed_from_repository += o.failed_from_repository;
                combined.direct_files += o.direct_files;
                combined.direct_refused += o.direct_refused;
                combined.warnings.extend(o.warnings);
                combined.skipped += o.skipped;
                combined.skipped_paths.extend(o.skipped_paths);
                combined.deleted += o.deleted;
                combined.deleted_paths.extend(o.deleted_paths);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    reporter.stop().await;
    if let Some(h) = hoard_core::util::heap_usage() {
        tracing::debug!(
            "heap after the restore: {} in use, {} free and held",
            human_bytes(h.in_use as u64),
            human_bytes(h.held_free as u64)
        );
    }
    result?;
    if g.json {
        print_json(&serde_json::json!({"message_type": "summary", "snapshot_id": id.to_hex(), "outcome": combined}));
    } else {
        for w in &combined.warnings {
            errln!("warning: {w}");
        }
        for (p, why) in &combined.failed {
            errln!("error: {p}: {why}");
        }
        outln!(
            "restored snapshot {} into {}: {}, {}, {} other, {}",
            id.short(),
            a.target.display(),
            count(combined.files, "file"),
            count(combined.dirs, "dir"),
            combined.other,
            human_bytes(combined.bytes)
        );
        for p in &combined.deleted_paths {
            outln!("deleted {p}");
        }
        if combined.deleted > 0 {
            let n = combined.deleted;
            outln!("deleted {n} {} the snapshot does not have", if n == 1 { "entry" } else { "entries" });
        }
        if combined.skipped > 0 {
            let listed = combined.skipped_paths.len() as u64;
            for p in &combined.skipped_paths {
                outln!("kept existing {p}");
            }
            if combined.skipped > listed {
                outln!("and {} more existing entries kept", combined.skipped - listed);
            }
            outln!(
                "{} existing {} left as {} (`--overwrite if-changed`, `if-newer` or `always` replaces them)",
                combined.skipped,
                if combined.skipped == 1 { "entry was" } else { "entries were" },
                if combined.skipped == 1 { "it was" } else { "they were" },
            );
        }
        if combined.target_full {
            outln!(
                "{} could not be restored (listed above): no space left in {} (device or quota full)",
                count(combined.failed.len(), "file"),
                a.target.display()
            );
        } else if !combined.failed.is_empty() {
            let from_repo = combined.failed_from_repository as usize;
            let refused = combined.failed.len() - from_repo;
            if from_repo > 0 {
                outln!(
                    "{} could not be read from the repository (listed above); `hoard check --read-data` tells what is damaged",
                    count(from_repo, "file")
                );
            }
            if refused > 0 {
                outln!(
                    "{} could not be written into {} (listed above: permissions, a read-only filesystem, an entry in the way)",
                    count(refused, "file"),
                    a.target.display()
                );
            }
        }
    }
    Ok(if combined.target_full {
        hoard_core::error::NO_SPACE_EXIT_CODE as u8
    } else if !combined.failed.is_empty() {
        1
    } else if !combined.warnings.is_empty() {
        EXIT_WARNINGS
    } else {
        0
    })
}

/// One directory a restore writes, and what goes there.
struct RestoreTarget {
    source: RestoreSource,
    /// For messages (and to open, when `dir` is not given).
    path: PathBuf,
    /// The directory, already opened confined.
    dir: Option<std::os::fd::OwnedFd>,
    /// Where the source is in the snapshot (`data`, `data/etc`), for patterns and messages.
    prefix: String,
    /// Metadata of the directory itself (a whole component's root).
    root_node: Option<hoard_core::tree::Node>,
}

/// The options `restore` (and its dry run) gives one target.
fn restore_options(a: &RestoreArgs, t: RestoreTarget) -> RestoreOptions {
    let mut opts = RestoreOptions::new(t.path);
    opts.target_dir = t.dir;
    opts.match_prefix = t.prefix;
    opts.root_node = t.root_node;
    opts.includes = a.includes.clone();
    opts.excludes = a.excludes.clone();
    opts.direct_io = !a.no_direct_io;
    opts.overwrite = a.overwrite.into();
    opts.delete = a.delete;
    if a.confined {
        opts.fidelity = hoard_core::restore::Fidelity::Confined;
    }
    opts
}

/// `restore --dry-run`: what the restore would create, replace, keep and delete, per path.
async fn print_restore_plan(
    g: &Global,
    a: &RestoreArgs,
    repo: Arc<Repository>,
    targets: Vec<RestoreTarget>,
) -> anyhow::Result<u8> {
    let mut plan = hoard_core::restore::RestorePlan::default();
    for t in targets {
        let source = t.source.clone();
        let opts = restore_options(a, t);
        let p = hoard_core::restore::plan(Arc::clone(&repo), source, opts).await?;
        plan.create += p.create;
        plan.replace += p.replace;
        plan.keep += p.keep;
        plan.delete += p.delete;
        plan.changes.extend(p.changes);
    }
    if g.json {
        print_json(&serde_json::json!({"message_type": "plan", "plan": plan}));
        return Ok(0);
    }
    for (change, path) in &plan.changes {
        let verb = match change {
            hoard_core::restore::Change::Create => "create",
            hoard_core::restore::Change::Replace => "replace",
            hoard_core::restore::Change::Keep => "keep existing",
            hoard_core::restore::Change::Delete => "delete",
        };
        outln!("would {verb} {path}");
    }
    outln!(
        "would create {}, replace {}, keep {} existing and delete {} (nothing was written)",
        plan.create,
        plan.replace,
        plan.keep,
        plan.delete
    );
    Ok(0)
}

/// Opens `target/<name>` (created if missing) for restoring one component, confined to the
/// target: a name that is not one safe path component is refused (defence in depth: decoding
/// the snapshot already refuses it), and a symlink planted at `target/<name>` is not followed.
fn open_component_dir(target: &std::path::Path, name: &str, snap: &Id) -> anyhow::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    if !hoard_core::snapshot::valid_component_name(name) {
        return Err(Error::corrupt(
            hoard_core::error::ObjectKind::Snapshot,
            format!("snapshots/{}", snap.to_hex()),
            format!("unsafe component name {name:?}"),
        )
        .into());
    }
    std::fs::create_dir_all(target).with_context(|| format!("create {}", target.display()))?;
    let dir = rustix::fs::open(target, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .with_context(|| format!("open {}", target.display()))?;
    let path = target.join(name);
    let mkdir = || rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o777));
    match mkdir() {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => {
            // Like any entry restore meets in its way: a directory is reused, anything else
            // (a planted symlink, a file) is replaced, never followed.
            let st = rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                .with_context(|| format!("stat {}", path.display()))?;
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory {
                rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty())
                    .with_context(|| format!("remove {}", path.display()))?;
                mkdir().with_context(|| format!("create {}", path.display()))?;
            }
        }
        Err(e) => return Err(anyhow::Error::from(e).context(format!("create {}", path.display()))),
    }
    rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("open {}", path.display()))
}

async fn cmd_dump(g: &Global, spec: &str, path: &str, f: &FilterArgs) -> anyhow::Result<u8> {
    use std::io::Write;
    let repo = open_repo(g).await?;
    repo.load_index().await?;
    let (_, snap) = repo.find_snapshot(spec, &f.filter()).await?;
    let node = match browse::locate(&repo, &snap, path).await? {
        Located::Node { node, .. } => node,
        Located::Root { component, tree } => {
            // A stream component: its tree holds one file.
            let t = repo.load_tree(&tree).await?;
            match t.nodes.as_slice() {
                [n] if n.kind == NodeKind::File => n.clone(),
                _ => bail!("/{component} is a directory tree; name a file inside it"),
            }
        }
    };
    if node.kind != NodeKind::File {
        bail!("{path} is not a regular file");
    }
    let mut out = std::io::stdout().lock();
    // Ok(false): the reader has gone (`dump … | head -c 100`), which is no failure.
    let mut put = |bytes: &[u8]| match out.write_all(bytes) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::from(e).context("write to standard output")),
    };
    for e in &node.content {
        match e {
            hoard_core::tree::Extent::Data { id, .. } => {
                if !put(&repo.read_blob(id).await?)? {
                    return Ok(0);
                }
            }
            hoard_core::tree::Extent::Hole { len } => {
                let zeros = vec![0u8; (*len).min(1 << 20) as usize];
                let mut left = *len;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    if !put(&zeros[..n])? {
                        return Ok(0);
                    }
                    left -= n as u64;
                }
            }
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::from(e).context("write to standard output"))
        }
        _ => Ok(0),
    }
}

async fn cmd_stats(g: &Global, spec: Option<&str>, f: &FilterArgs) -> anyhow::Result<u8> {
    let repo = open_repo(g).await?;
    repo.load_index().await?;
    let snaps = repo.list_snapshots().await?;
    let (blob_count, stored, raw, packs) = {
        let idx = repo.index();
        let (mut stored, mut raw) = (0u64, 0u64);
        for (_, loc) in idx.iter() {
            stored += loc.stored_len as u64;
            raw += loc.raw_len as u64;
        }
        (idx.len(), stored, raw, idx.pack_count())
    };
    let mut v = serde_json::json!({
        "snapshots": snaps.len(),
        "packs": packs,
        "blobs": blob_count,
        "blob_bytes_stored": stored,
        "blob_bytes_uncompressed": raw,
    });
    if let Some(spec) = spec {
        let (id, snap) = hoard_core::repo::select_snapshot(snaps, spec, &f.filter())?;
        let mut files = 0u64;
        let mut bytes = 0u64;
        let mut unique = std::collections::HashSet::<Id>::new();
        let mut visit = |_: &str, n: &hoard_core::tree::Node| {
            if n.kind == NodeKind::File {
                files += 1;
                bytes += n.size;
                for e in &n.content {
                    if let hoard_core::tree::Extent::Data { id, .. } = e {
                        unique.insert(*id);
                    }
                }
            }
        };
        for c in &snap.components {
            browse::walk(&repo, c.root, format!("/{}", c.name), &mut visit).await?;
        }
        let unique_bytes: u64 = {
            let idx = repo.index();
            unique.iter().filter_map(|id| idx.get(id)).map(|l| l.raw_len as u64).sum()
        };
        v["snapshot"] = serde_json::json!({"id": id.to_hex(), "files": files, "restore_size": bytes, "unique_blobs": unique.len(), "unique_bytes": unique_bytes});
    }
    if g.json {
        print_json(&v);
    } else {
        outln!("repository {} at {}", repo.id().short(), repo.store().location());
        outln!("  snapshots: {}", snaps_len(&v));
        outln!("  packs: {packs}, blobs: {blob_count}");
        outln!("  stored: {} ({} before compression)", human_bytes(stored), human_bytes(raw));
        if let Some(s) = v.get("snapshot") {
            outln!(
                "snapshot {}: {}, {} to restore, {} in {}",
                s["id"].as_str().and_then(|id| id.get(..8)).unwrap_or_default(),
                count(s["files"].as_u64().unwrap_or(0), "file"),
                human_bytes(s["restore_size"].as_u64().unwrap_or(0)),
                human_bytes(s["unique_bytes"].as_u64().unwrap_or(0)),
                count(s["unique_blobs"].as_u64().unwrap_or(0), "unique blob")
            );
        }
    }
    Ok(0)
}

fn snaps_len(v: &serde_json::Value) -> u64 {
    v["snapshots"].as_u64().unwrap_or(0)
}

async fn cmd_check(g: &Global, read_data: bool, subset: Option<&str>) -> anyhow::Result<u8> {
    // The repository's own objects, not copies kept from earlier reads.
    hoard::ops::check(open_repo_cached(g, false).await?, read_data, subset, g.json).await
}

async fn cmd_repair_packs(g: &Global, packs: &[String], dry_run: bool) -> anyhow::Result<u8> {
    let ids = packs
        .iter()
        .map(|p| {
            let hex = p.rsplit('/').next().unwrap_or(p);
            Id::from_hex(hex).map_err(|_| anyhow!("{p:?} is not a pack id (64 hex digits, or packs/ab/<id>)"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The repository's own objects, not copies kept from earlier reads.
    let repo = open_repo_cached(g, false).await?;
    let opts = hoard_core::repair::PackRepairOptions { packs: ids, dry_run };
    let out = hoard_core::repair::repair_packs(repo, opts).await?;
    if g.json {
        print_json(&serde_json::to_value(&out)?);
        return Ok(0);
    }
    let would = if dry_run { "would " } else { "" };
    for d in &out.damaged {
        let state = match &d.state {
            hoard_core::repair::PackState::Missing => "missing".to_string(),
            hoard_core::repair::PackState::Damaged(r) => r.clone(),
            hoard_core::repair::PackState::Intact => "intact".to_string(),
        };
        outln!(
            "{}: {state}; {would}salvage {}, {} elsewhere, {} lost",
            d.pack,
            count(d.blobs_salvaged, "blob"),
            d.blobs_elsewhere,
            d.blobs_lost
        );
    }
    outln!("read {}, {} not intact", count(out.packs_read, "pack"), out.damaged.len());
    if !dry_run && !out.damaged.is_empty() {
        outln!(
            "wrote {}, removed {} and {}",
            count(out.packs_written as usize, "pack"),
            count(out.packs_removed, "damaged pack"),
            count(out.index_files_removed, "index file")
        );
    }
    if out.blobs_lost > 0 {
        outln!(
            "{} {}lost: back up the same sources again to store them anew; for a source that is gone, \
             `hoard repair snapshots` leaves the lost files out of its snapshots",
            count(out.blobs_lost, "blob"),
            if dry_run { "would be " } else { "are " }
        );
    }
    Ok(0)
}

async fn cmd_repair_snapshots(g: &Global, specs: &[String], forget: bool, dry_run: bool) -> anyhow::Result<u8> {
    let repo = open_repo_cached(g, false).await?;
    let mut ids = Vec::new();
    for spec in specs {
        ids.push(repo.find_snapshot(spec, &SnapshotFilter::default()).await?.0);
    }
    let opts = hoard_core::repair::SnapshotRepairOptions { snapshots: ids, forget, dry_run };
    let out = hoard_core::repair::repair_snapshots(repo, opts).await?;
    if g.json {
        print_json(&serde_json::to_value(&out)?);
        return Ok(0);
    }
    for r in &out.repaired {
        let short = |s: &str| s.get(..8).unwrap_or(s).to_string();
        match &r.repaired {
            Some(new) => outln!(
                "snapshot {} repaired as {} ({}), leaving out:",
                short(&r.original),
                short(new),
                if forget { "the original is removed" } else { "the original is kept" }
            ),
            None => outln!("snapshot {} would be repaired, leaving out:", short(&r.original)),
        }
        for p in &r.left_out {
            outln!("  {p}");
        }
    }
    outln!(
        "checked {}, {} {}",
        count(out.snapshots_checked, "snapshot"),
        out.repaired.len(),
        if dry_run { "would be repaired" } else { "repaired" }
    );
    Ok(0)
}

async fn cmd_prune(g: &Global, a: PruneArgs) -> anyhow::Result<u8> {
    let repo = open_repo(g).await?;
    let opts = hoard_core::prune::PruneOptions { max_unused: parse_percent(&a.max_unused)?, dry_run: a.dry_run };
    let out = hoard_core::prune::prune(repo, opts).await?;
    if g.json {
        print_json(&serde_json::to_value(&out)?);
    } else {
        let p = &out.plan;
        outln!(
            "{}used {}, unused {}; {} to delete, {} to repack ({}), {} kept; unused afterwards {}",
            if a.dry_run { "would prune: " } else { "" },
            human_bytes(p.used_bytes),
            human_bytes(p.unused_bytes),
            count(p.delete.len(), "pack"),
            p.repack.len(),
            human_bytes(p.repack_bytes),
            p.keep.len(),
            human_bytes(p.unused_after)
        );
        if !a.dry_run {
            outln!(
                "removed {} and {}, wrote {}",
                count(out.packs_removed, "pack"),
                count(out.index_files_removed, "index file"),
                count(out.packs_written, "pack")
            );
            if out.staging_files_removed > 0 {
                outln!("removed {} of interrupted writes", count(out.staging_files_removed, "staging file"));
            }
        }
    }
    Ok(0)
}

fn read_new_password(a: &NewPassword) -> anyhow::Result<Password> {
    if let Some(p) = password_from(a.new_password_file.as_deref(), "HOARD_NEW_PASSWORD")? {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password("enter the new password: ")?;
        let q = rpassword::prompt_password("enter it again: ")?;
        if p != q {
            bail!("the passwords do not match");
        }
        return Ok(Password::new(p));
    }
    bail!("no new password: set HOARD_NEW_PASSWORD or use --new-password-file")
}

async fn cmd_key(g: &Global, action: KeyAction) -> anyhow::Result<u8> {
    let loc = repo_location(g)?;
    let store = open_store(&loc, &store_options(g, false))?;
    let password = read_password(g, false)?;
    let mut repo = Repository::open(store, &password).await?;
    let kdf = |a: &NewPassword| KdfParams {
        memory_kib: a.kdf_memory_mib * 1024,
        iterations: a.kdf_iterations,
        ..KdfParams::default()
    };
    match action {
        KeyAction::List => {
            hoard::ops::key_list(&repo, g.json).await?;
        }
        KeyAction::Add(a) => {
            let id = repo.add_key(&read_new_password(&a)?, kdf(&a), a.insecure_kdf).await?;
            outln!("added key {}", id.short());
        }
        KeyAction::Remove { id } => {
            let keys = repo.list_keys().await?;
            let matching: Vec<Id> =
                keys.iter().map(|(k, _)| *k).filter(|k| k.to_hex().starts_with(&id.to_ascii_lowercase())).collect();
            let [one] = matching.as_slice() else { bail!("{id:?} matches {} keys", matching.len()) };
            repo.remove_key(one).await?;
            outln!("removed key {}", one.short());
        }
        KeyAction::Passwd(a) => {
            let id = repo.change_password(&read_new_password(&a)?, kdf(&a), a.insecure_kdf).await?;
            outln!("password changed (key {})", id.short());
        }
    }
    Ok(0)
}

async fn cmd_copy(g: &Global, from: &str, from_pw: Option<PathBuf>, only: &[String]) -> anyhow::Result<u8> {
    let dst = open_repo(g).await?;
    let Some(src_password) = password_from(from_pw.as_deref(), "HOARD_FROM_PASSWORD")? else {
        bail!("no password for the source repository: set HOARD_FROM_PASSWORD or use --from-password-file")
    };
    let src = Arc::new(Repository::open(open_store(from, &store_options(g, false))?, &src_password).await?);
    let mut ids = Vec::new();
    if !only.is_empty() {
        let snaps = src.list_snapshots().await?;
        for spec in only {
            ids.push(hoard_core::repo::select_snapshot(snaps.clone(), spec, &SnapshotFilter::default())?.0);
        }
    }
    let done = hoard_core::copy::copy(src, dst, &ids).await?;
    if g.json {
        print_json(&serde_json::json!(
            done.iter()
                .map(|(a, b)| serde_json::json!({"source": a.to_hex(), "target": b.to_hex()}))
                .collect::<Vec<_>>()
        ));
    } else {
        for (a, b) in &done {
            outln!("copied snapshot {} -> {}", a.short(), b.short());
        }
        outln!("{} copied", count(done.len(), "snapshot"));
    }
    Ok(0)
}

async fn cmd_forget(g: &Global, a: ForgetArgs) -> anyhow::Result<u8> {
    use hoard_core::retention::{GroupBy, RetentionPolicy};
    let repo = open_repo(g).await?;
    let snaps = repo.list_snapshots().await?;
    let mut remove: Vec<(Id, String)> = Vec::new();
    let mut report = serde_json::json!({});
    if !a.snapshots.is_empty() {
        for spec in &a.snapshots {
            let (id, _) = hoard_core::repo::select_snapshot(snaps.clone(), spec, &SnapshotFilter::default())?;
            remove.push((id, "named on the command line".into()));
        }
    } else {
        let policy = RetentionPolicy {
            keep_last: a.keep_last,
            keep_hourly: a.keep_hourly,
            keep_daily: a.keep_daily,
            keep_weekly: a.keep_weekly,
            keep_monthly: a.keep_monthly,
            keep_yearly: a.keep_yearly,
            keep_within: a.keep_within,
            keep_within_hourly: a.keep_within_hourly,
            keep_within_daily: a.keep_within_daily,
            keep_within_weekly: a.keep_within_weekly,
            keep_within_monthly: a.keep_within_monthly,
            keep_within_yearly: a.keep_within_yearly,
            keep_tags: a
                .keep_tags
                .iter()
                .map(|t| t.split(',').map(str::to_string).filter(|s| !s.is_empty()).collect())
                .collect(),
            keep_last_failed: None,
        };
        let group_by: GroupBy = a.group_by.parse()?;
        let filter = a.filter.filter();
        let selected: Vec<(Id, hoard_core::snapshot::Snapshot)> =
            snaps.into_iter().filter(|(_, s)| filter.matches(s)).collect();
        let tz = *chrono::Local::now().offset();
        let plans = hoard_core::retention::plan(&selected, &policy, &group_by, tz)?;
        report = serde_json::to_value(&plans)?;
        if !g.json {
            for p in &plans {
                outln!("snapshots for {}:", p.key);
                for d in &p.keep {
                    outln!(
                        "  keep   {} {}  {}",
                        d.id.short(),
                        d.time.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S"),
                        d.reasons.join(", ")
                    );
                }
                for d in &p.remove {
                    outln!(
                        "  remove {} {}",
                        d.id.short(),
                        d.time.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S")
                    );
                }
            }
        }
        for p in plans {
            remove.extend(p.remove.into_iter().map(|d| (d.id, "not kept by the policy".to_string())));
        }
    }
    if !a.dry_run {
        for (id, _) in &remove {
            repo.delete_snapshot(id).await?;
        }
    }
    if g.json {
        print_json(&serde_json::json!({
            "dry_run": a.dry_run,
            "groups": report,
            "removed": remove.iter().map(|(id, _)| id.to_hex()).collect::<Vec<_>>(),
        }));
    } else {
        outln!("{} {}", if a.dry_run { "would remove" } else { "removed" }, count(remove.len(), "snapshot"));
    }
    if a.prune && !a.dry_run {
        let opts = hoard_core::prune::PruneOptions { max_unused: parse_percent(&a.max_unused)?, dry_run: false };
        let out = hoard_core::prune::prune(repo, opts).await?;
        if !g.json {
            outln!(
                "prune removed {} and {}",
                count(out.packs_removed, "pack"),
                count(out.index_files_removed, "index file")
            );
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_and_argument_has_help() {
        let missing = hoard::output::without_help(Cli::command());
        assert!(missing.is_empty(), "no help text for: {}", missing.join(", "));
    }

    #[test]
    fn the_help_check_finds_a_missing_help_text() {
        #[derive(Parser, Debug)]
        struct Bare {
            #[command(subcommand)]
            command: BareCommand,
        }
        #[derive(Subcommand, Debug)]
        enum BareCommand {
            /// Documented.
            Go { undocumented: String },
        }
        assert_eq!(hoard::output::without_help(Bare::command().name("bare")), ["bare go undocumented"]);
    }
}
