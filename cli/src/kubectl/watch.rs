//! `kubectl hoard watch SESSION`: reads a BackupSession (and its Snapshots) or a RestoreSession
//! until it ends, drawing one progress bar per component from `status.components[].progress`.
//!
//! On a terminal the bars redraw in place; otherwise a line is printed when a phase changes or a
//! component's progress moves by a tenth; with `-o json` one JSON document per change. Exits 0
//! when the session Succeeded, 30 when it Failed (or a restore is Invalid), 31 when Skipped, 32
//! when `--timeout` passes first.

use crate::{errln, outln};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use hoard_api::crd::{
    BackupSession, ComponentPhase, ComponentStatus, RestorePhase, RestoreSession, SessionPhase, Snapshot,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::cmds::{get, list};
use super::error::{BACKUP_SESSION, PluginError, RESTORE_SESSION, SNAPSHOT};
use super::print::Output;
use super::{Ctx, WatchArgs, parse_duration_flag};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Backup,
    Restore,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Backup => "backupsession",
            Kind::Restore => "restoresession",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Outcome {
    Running,
    Succeeded,
    Failed,
    Skipped,
}

/// What one read of the status shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct State {
    kind: &'static str,
    name: String,
    namespace: String,
    phase: String,
    #[serde(skip)]
    outcome: Outcome,
    /// The BackupConfiguration of a backup session.
    #[serde(skip)]
    config: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// `snapshot/component` for backups, `component` for restores.
    components: BTreeMap<String, ComponentStatus>,
}

/// Finds which kind of session `spec` names.
async fn resolve(ctx: &Ctx, spec: &str) -> Result<(Kind, String), PluginError> {
    let ns = ctx.namespace.as_str();
    if let Some((kind, name)) = spec.split_once('/') {
        let kind = match kind.to_ascii_lowercase().as_str() {
            "backupsession" | "backupsessions" | "bs" | "backupsession.hoard.dev" => Kind::Backup,
            "restoresession" | "restoresessions" | "rs" | "restoresession.hoard.dev" => Kind::Restore,
            _ => {
                return Err(PluginError::Usage(format!(
                    "{spec:?}: watch follows backupsession/NAME or restoresession/NAME; list them with: kubectl hoard sessions -n {ns}"
                )));
            }
        };
        return Ok((kind, name.to_string()));
    }
    let (b, r) = tokio::join!(
        get::<BackupSession>(ctx, ns, spec, &BACKUP_SESSION),
        get::<RestoreSession>(ctx, ns, spec, &RESTORE_SESSION)
    );
    match (b, r) {
        (Ok(_), Ok(_)) => Err(PluginError::Usage(format!(
            "both a backupsession and a restoresession are named \"{spec}\"; say which: kubectl hoard watch backupsession/{spec} -n {ns}"
        ))),
        (Ok(_), Err(PluginError::NotFound { .. })) => Ok((Kind::Backup, spec.to_string())),
        (Err(PluginError::NotFound { .. }), Ok(_)) => Ok((Kind::Restore, spec.to_string())),
        (Err(PluginError::NotFound { .. }), Err(PluginError::NotFound { .. })) => Err(PluginError::NotFound {
            kind: "backupsession or restoresession",
            name: spec.to_string(),
            namespace: ns.to_string(),
            list: format!("kubectl hoard sessions -n {ns} (restores: kubectl get restoresessions.hoard.dev -n {ns})"),
        }),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

async fn read_backup(ctx: &Ctx, name: &str) -> Result<State, PluginError> {
    let ns = ctx.namespace.as_str();
    let bs: BackupSession = get(ctx, ns, name, &BACKUP_SESSION).await?;
    let st = bs.status.clone().unwrap_or_default();
    let listed: Vec<String> = st.snapshots.iter().map(|s| s.name.clone()).collect();
    let snaps: Vec<Snapshot> = list(ctx, Some(ns), &SNAPSHOT).await?;
    let mut components = BTreeMap::new();
    for s in snaps {
        let sname = s.metadata.name.clone().unwrap_or_default();
        if !listed.contains(&sname) && s.spec.backup_session.as_deref() != Some(name) {
            continue;
        }
        for (c, cs) in s.status.map(|s| s.components).unwrap_or_default() {
            components.insert(format!("{sname}/{c}"), cs);
        }
    }
    let outcome = match st.phase {
        Some(SessionPhase::Succeeded) => Outcome::Succeeded,
        Some(SessionPhase::Failed) => Outcome::Failed,
        Some(SessionPhase::Skipped) => Outcome::Skipped,
        _ => Outcome::Running,
    };
    Ok(State {
        kind: Kind::Backup.word(),
        name: name.to_string(),
        namespace: ns.to_string(),
        phase: st.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into()),
        outcome,
        config: Some(bs.spec.invoker.name.clone()),
        duration: st.duration,
        message: st.message,
        components,
    })
}

async fn read_restore(ctx: &Ctx, name: &str) -> Result<State, PluginError> {
    let ns = ctx.namespace.as_str();
    let rs: RestoreSession = get(ctx, ns, name, &RESTORE_SESSION).await?;
    let st = rs.status.unwrap_or_default();
    let outcome = match st.phase {
        Some(RestorePhase::Succeeded) => Outcome::Succeeded,
        Some(RestorePhase::Failed | RestorePhase::Invalid) => Outcome::Failed,
        _ => Outcome::Running,
    };
    Ok(State {
        kind: Kind::Restore.word(),
        name: name.to_string(),
        namespace: ns.to_string(),
        phase: st.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into()),
        outcome,
        config: None,
        duration: st.duration,
        message: st.message,
        components: st.components,
    })
}

fn percent(c: &ComponentStatus) -> Option<u64> {
    let p = c.progress.as_ref()?;
    if p.bytes_total == 0 {
        return None;
    }
    Some((p.bytes_done.min(p.bytes_total) * 100) / p.bytes_total)
}

fn running(c: &ComponentStatus) -> bool {
    matches!(c.phase, None | Some(ComponentPhase::Pending | ComponentPhase::Running))
}

fn phase_of(c: &ComponentStatus) -> String {
    c.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into())
}

/// One line for a component: phase, percentage, bytes, rate, ETA.
fn component_line(name: &str, c: &ComponentStatus) -> String {
    let hb = hoard_core::util::human_bytes;
    let mut s = format!("  {name}  {}", phase_of(c));
    if let Some(p) = &c.progress {
        if let Some(pc) = percent(c) {
            s.push_str(&format!("  {pc:>3}%"));
        }
        s.push_str(&format!(
            "  {}/{}  {} files of {}",
            hb(p.bytes_done),
            hb(p.bytes_total),
            p.files_done,
            p.files_total
        ));
        if p.bytes_per_second > 0 && running(c) {
            s.push_str(&format!("  {}/s", hb(p.bytes_per_second)));
        }
        if let Some(eta) = p.eta_seconds.filter(|_| running(c)) {
            s.push_str(&format!("  ETA {}", super::print::human_duration(chrono::Duration::seconds(eta as i64))));
        }
    } else if let Some(size) = c.size {
        s.push_str(&format!("  {}", hb(size)));
    }
    if let Some(e) = &c.error {
        s.push_str(&format!("  error: {e}"));
    }
    s
}

enum Renderer {
    /// Bars redrawn in place on a terminal.
    Bars { multi: MultiProgress, header: ProgressBar, bars: BTreeMap<String, ProgressBar> },
    /// A line per change (pipes, logs, CI).
    Lines { phase: Option<String>, last: BTreeMap<String, (String, Option<u64>)> },
    /// A JSON or YAML document per change.
    Documents { output: Output, last: Option<State> },
}

impl Renderer {
    fn new(output: Output) -> Renderer {
        if output.is_document() {
            return Renderer::Documents { output, last: None };
        }
        if std::io::stderr().is_terminal() {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            let header = multi.add(ProgressBar::new_spinner());
            header.set_style(
                ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            header.enable_steady_tick(Duration::from_millis(200));
            return Renderer::Bars { multi, header, bars: BTreeMap::new() };
        }
        Renderer::Lines { phase: None, last: BTreeMap::new() }
    }

    fn update(&mut self, s: &State) {
        match self {
            Renderer::Documents { output, last } => {
                if last.as_ref() == Some(s) {
                    return;
                }
                let v = serde_json::to_value(s).unwrap_or_default();
                if *output == Output::Yaml {
                    outln!("---\n{}", serde_yaml::to_string(&v).unwrap_or_default().trim_end());
                } else {
                    outln!("{}", serde_json::to_string(&v).unwrap_or_default());
                }
                *last = Some(s.clone());
            }
            Renderer::Lines { phase, last } => {
                if phase.as_deref() != Some(s.phase.as_str()) {
                    outln!("{}/{} {}", s.kind, s.name, s.phase);
                    *phase = Some(s.phase.clone());
                }
                for (name, c) in &s.components {
                    let key = (phase_of(c), percent(c).map(|p| p / 10));
                    if last.get(name) != Some(&key) {
                        outln!("{}", component_line(name, c));
                        last.insert(name.clone(), key);
                    }
                }
            }
            Renderer::Bars { multi, header, bars } => {
                header.set_message(format!("{}/{} {}", s.kind, s.name, s.phase));
                for (name, c) in &s.components {
                    let bar = bars.entry(name.clone()).or_insert_with(|| {
                        let b = multi.add(ProgressBar::new(0));
                        b.set_style(
                            ProgressStyle::with_template("  {prefix:20} {bar:30} {bytes}/{total_bytes} {msg}")
                                .unwrap_or_else(|_| ProgressStyle::default_bar()),
                        );
                        b.set_prefix(name.clone());
                        b
                    });
                    let hb = hoard_core::util::human_bytes;
                    let mut msg = phase_of(c);
                    if let Some(p) = &c.progress {
                        bar.set_length(p.bytes_total);
                        bar.set_position(p.bytes_done.min(p.bytes_total));
                        if p.bytes_per_second > 0 && running(c) {
                            msg.push_str(&format!(" {}/s", hb(p.bytes_per_second)));
                        }
                        if let Some(eta) = p.eta_seconds.filter(|_| running(c)) {
                            msg.push_str(&format!(
                                " ETA {}",
                                super::print::human_duration(chrono::Duration::seconds(eta as i64))
                            ));
                        }
                    } else if let Some(size) = c.size {
                        bar.set_length(size);
                        bar.set_position(if c.phase == Some(ComponentPhase::Succeeded) { size } else { 0 });
                    }
                    if let Some(e) = &c.error {
                        msg.push_str(&format!(" error: {e}"));
                    }
                    bar.set_message(msg);
                }
            }
        }
    }

    fn finish(self) {
        if let Renderer::Bars { header, bars, .. } = self {
            for b in bars.values() {
                b.abandon();
            }
            header.finish_and_clear();
        }
    }
}

pub async fn watch(ctx: &Ctx, a: WatchArgs) -> anyhow::Result<u8> {
    let timeout = parse_duration_flag("--timeout", &a.timeout)?;
    let interval = parse_duration_flag("--interval", &a.interval)?.max(Duration::from_millis(50));
    let ns = ctx.namespace.clone();
    let (kind, name) = resolve(ctx, &a.session).await?;
    let deadline = Instant::now() + timeout;
    let mut render = Renderer::new(ctx.output);
    let state = loop {
        let s = match kind {
            Kind::Backup => read_backup(ctx, &name).await,
            Kind::Restore => read_restore(ctx, &name).await,
        };
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                render.finish();
                return Err(e.into());
            }
        };
        render.update(&s);
        if s.outcome != Outcome::Running {
            break s;
        }
        let now = Instant::now();
        if now >= deadline {
            render.finish();
            return Err(PluginError::Timeout(format!(
                "{} \"{name}\" is still {} after {}; keep watching with: kubectl hoard watch {}/{name} -n {ns}",
                kind.word(),
                s.phase,
                a.timeout,
                kind.word()
            ))
            .into());
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
    };
    render.finish();
    let human = !ctx.output.is_document();
    let took = state.duration.as_deref().map(|d| format!(" in {d}")).unwrap_or_default();
    let msg = state.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    let inspect = match kind {
        Kind::Backup => {
            let failed: Vec<&str> = state
                .components
                .iter()
                .filter(|(_, c)| c.phase == Some(ComponentPhase::Failed))
                .filter_map(|(k, _)| k.split('/').next())
                .collect();
            match failed.first() {
                Some(snap) => format!("kubectl hoard describe snapshot {snap} -n {ns}"),
                None => format!("kubectl get backupsessions.hoard.dev {name} -n {ns} -o yaml"),
            }
        }
        Kind::Restore => format!("kubectl get restoresessions.hoard.dev {name} -n {ns} -o yaml"),
    };
    match state.outcome {
        Outcome::Succeeded => {
            if human {
                outln!("{} \"{name}\" Succeeded{took}", kind.word());
            }
            Ok(0)
        }
        Outcome::Failed => {
            if human {
                for (c, cs) in &state.components {
                    if let Some(e) = &cs.error {
                        errln!("  {c}: {e}");
                    }
                }
            }
            Err(PluginError::SessionFailed(format!(
                "{} \"{name}\" {}{msg}; see the details with: {inspect}",
                kind.word(),
                state.phase
            ))
            .into())
        }
        Outcome::Skipped => Err(PluginError::SessionSkipped(format!(
            "{} \"{name}\" was Skipped{msg}; if its configuration is paused, resume it with: kubectl hoard resume {} -n {ns}",
            kind.word(),
            state.config.as_deref().unwrap_or("CONFIG")
        ))
        .into()),
        Outcome::Running => Ok(0),
    }
}
