//! Terminal and JSON progress output.
//!
//! On a terminal: a progress bar on stderr, redrawn a few times a second. With `--json`: one
//! `{"message_type":"status",…}` line per second on stdout. Otherwise nothing.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hoard_core::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::oneshot;

pub fn print_json(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
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
