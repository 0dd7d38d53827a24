//! What the command-line tools print: results on standard output, messages on standard error,
//! progress.
//!
//! Results go through [`write_out`] (and [`outln!`](crate::outln), [`print_json`]), which never
//! panics: when the reader of standard output goes away (`hoard ls latest | head`, EPIPE) the
//! rest of the output is dropped and the verb carries on to its normal end, so a verb that
//! changes the repository (`forget`, `prune`, `copy`) still finishes its work, and a clean run
//! exits 0 without a message, like a reader that read everything. Any other write error (a full
//! disk under `> file`) is kept and reported once at exit by [`stdout_failure`], with exit
//! code 1. Messages go through [`errln!`](crate::errln), which ignores a closed standard error;
//! log lines are coloured only where [`stderr_colour`] allows.
//!
//! Progress: on a terminal, a progress bar on stderr, redrawn a few times a second. With
//! `--json`: one `{"message_type":"status",…}` line per second on stdout. Otherwise nothing.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hoard_core::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::oneshot;

/// Set once standard output's reader has gone; output is dropped from then on.
static READER_GONE: AtomicBool = AtomicBool::new(false);
/// The first error writing standard output other than a gone reader.
static WRITE_FAILURE: Mutex<Option<std::io::Error>> = Mutex::new(None);

/// Writes `bytes` to standard output (see the module docs for what happens on errors).
pub fn write_out(bytes: &[u8]) {
    if READER_GONE.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = std::io::stdout().lock().write_all(bytes) {
        note_write_error(e);
    }
}

fn note_write_error(e: std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        READER_GONE.store(true, Ordering::Relaxed);
        return;
    }
    let mut first = WRITE_FAILURE.lock().unwrap_or_else(|p| p.into_inner());
    if first.is_none() {
        *first = Some(e);
    }
}

/// Whether standard output's reader has gone: a verb may stop producing output early.
pub fn reader_gone() -> bool {
    READER_GONE.load(Ordering::Relaxed)
}

/// Flushes standard output and returns the first write error that was not a gone reader, for
/// the binary to report once and exit 1.
pub fn stdout_failure() -> Option<std::io::Error> {
    if !reader_gone()
        && let Err(e) = std::io::stdout().lock().flush()
    {
        note_write_error(e);
    }
    WRITE_FAILURE.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// `println!` through [`write_out`]: never panics.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_out(b"\n")
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}

/// `eprintln!` that ignores a closed or failing standard error instead of panicking: there is
/// nowhere left to report that.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Whether log lines on standard error may be coloured: only on a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (no-color.org).
pub fn stderr_colour() -> bool {
    colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"))
}

fn colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The subcommands and arguments of `cmd` (all levels, hidden ones aside) that have no help
/// text, as `name subcommand… argument`: the binaries' tests require none.
pub fn without_help(mut cmd: clap::Command) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let has = |s: Option<&clap::builder::StyledStr>| s.is_some_and(|s| !s.to_string().trim().is_empty());
        for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
            if !has(a.get_help()) && !has(a.get_long_help()) {
                missing.push(format!("{path} {}", a.get_id()));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let sub_path = format!("{path} {}", sub.get_name());
            if !has(sub.get_about()) && !has(sub.get_long_about()) {
                missing.push(sub_path.clone());
            }
            walk(sub, &sub_path, missing);
        }
    }
    // Building adds clap's own `--help`, `--version` and `help`, which have help texts.
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, cmd.get_name(), &mut missing);
    missing
}

/// `1 snapshot`, `0 snapshots`, `2 snapshots`: `n` and `noun`, with an `s` unless `n` is 1
/// (every noun the tools count takes one).
pub fn count<N: TryInto<u64> + Copy + std::fmt::Display>(n: N, noun: &str) -> String {
    let one = n.try_into().is_ok_and(|n| n == 1);
    format!("{n} {noun}{}", if one { "" } else { "s" })
}

/// `is` for one, else `are`.
pub fn is_are<N: TryInto<u64> + Copy>(n: N) -> &'static str {
    if n.try_into().is_ok_and(|n| n == 1) { "is" } else { "are" }
}

/// One JSON document and a newline on standard output, through [`write_out`].
pub fn print_json(v: &serde_json::Value) {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    write_out(&line);
}

#[derive(Debug)]
pub struct ProgressReporter {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProgressReporter {
    pub fn start(progress: Arc<Progress>, json: bool, quiet: bool, what: &'static str) -> ProgressReporter {
        let (tx, mut rx) = oneshot::channel::<()>();
        let tty = std::io::stderr().is_terminal();
        if quiet || (!json && !tty) {
            return ProgressReporter { stop: None, task: None };
        }
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let bar = (!json).then(|| {
                let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
                b.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b
            });
            let mut tick =
                tokio::time::interval(if json { Duration::from_secs(1) } else { Duration::from_millis(250) });
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    _ = tick.tick() => {}
                }
                let s = progress.snapshot();
                let secs = started.elapsed().as_secs_f64();
                if let Some(b) = &bar {
                    if let Some(t) = s.bytes_total {
                        b.set_length(t);
                    }
                    b.set_position(s.bytes_done);
                    b.set_message(format!("{} files {}", s.files_done, s.current));
                } else {
                    let rate = if secs > 0.0 { s.bytes_done as f64 / secs } else { 0.0 };
                    let eta =
                        s.bytes_total.filter(|_| rate > 0.0).map(|t| (t.saturating_sub(s.bytes_done)) as f64 / rate);
                    print_json(&serde_json::json!({
                        "message_type": "status", "action": what, "seconds_elapsed": secs as u64,
                        "files_done": s.files_done, "bytes_done": s.bytes_done,
                        "total_files": s.files_total, "total_bytes": s.bytes_total,
                        "totals_estimated": s.totals_estimated,
                        "bytes_per_second": rate as u64, "seconds_remaining": eta.map(|e| e as u64),
                        "warnings": s.warnings, "current_file": s.current,
                    }));
                }
            }
            if let Some(b) = bar {
                b.finish_and_clear();
            }
        });
        ProgressReporter { stop: Some(tx), task: Some(task) }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_singular_only_for_one() {
        assert_eq!(count(0usize, "snapshot"), "0 snapshots");
        assert_eq!(count(1usize, "snapshot"), "1 snapshot");
        assert_eq!(count(2u64, "index file"), "2 index files");
        assert_eq!(count(1u64, "index file"), "1 index file");
        assert_eq!(is_are(1usize), "is");
        assert_eq!(is_are(3u64), "are");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
        assert!(!colour(false, Some("1".into())));
    }
}
