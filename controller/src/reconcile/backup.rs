//! BackupSession: the shell around [`crate::session::next_step`]. Each pass first folds what
//! the in-flight orders reported into the Snapshot objects (one per repository, named
//! `<repository>-<session>`), then asks the state machine what to do, does it, and requeues
//! every few seconds while running — that is how progress reaches status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hoard_api::agent::v1::persistent_volume_source::Plugin;
use hoard_api::agent::v1::volume_identity::Source;
use hoard_api::agent::v1::{BackupOrder, PersistentVolumeSource, Phase, Progress};
use hoard_api::crd::{
    BackupConfiguration, BackupSession, ComponentPhase, ComponentProgress, ComponentStatus, Condition, ReadFrom,
    Repository, RetentionApplied, RetentionPhase, RetentionPolicy, SessionConfig, SessionPhase, SessionSnapshot,
    Snapshot, SnapshotPhase, SnapshotSpec, SnapshotStatus, TargetKind, parse_duration, set_condition,
};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use crate::error::{Error, Result, is_not_found};
use crate::orders::Order;
use crate::reconcile::snapshots::{self, Prepared, Wanted};
use crate::reconcile::{agent_endpoints, repo, resolve_target};
use crate::schedule::{fmt_time, parse_time};
use crate::session::{SessionView, Step, WorkKey, WorkView, next_step, order_id, retry_at};
use crate::target::TargetVolume;
use crate::{
    BACKUP_SESSION_LABEL, CONFIG_LABEL, Context, FIELD_MANAGER, REPOSITORY_LABEL, SESSION_LABEL, SNAPSHOT_LABEL,
    apply_status,
};

/// On a repository snapshot read from a CSI VolumeSnapshot: its name, and when it was cut.
pub const VOLUME_SNAPSHOT_LABEL: &str = "hoard.dev/volume-snapshot";
pub const VOLUME_SNAPSHOT_TIME_LABEL: &str = "hoard.dev/volume-snapshot-time";

pub fn snapshot_name(repository: &str, session: &str) -> String {
    format!("{repository}-{session}")
}

fn duration_str(d: chrono::Duration) -> String {
    format!("{:.1}s", d.num_milliseconds() as f64 / 1000.0)
}

struct Loaded {
    config: Option<BackupConfiguration>,
    session_cfg: Option<SessionConfig>,
    snapshots: BTreeMap<String, Snapshot>, // by repository
}

async fn load(ctx: &Context, bs: &BackupSession) -> Result<Loaded> {
    let ns = bs.namespace().unwrap_or_default();
    let configs: Api<BackupConfiguration> = Api::namespaced(ctx.client.clone(), &ns);
    let config = configs.get_opt(&bs.spec.invoker.name).await?;
    let session_cfg = config.as_ref().and_then(|c| c.spec.sessions.iter().find(|s| s.name == bs.spec.session).cloned());
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut snapshots = BTreeMap::new();
    for r in session_cfg.iter().flat_map(|s| s.repositories.iter()) {
        if let Some(s) = snaps.get_opt(&snapshot_name(&r.name, &bs.name_any())).await? {
            snapshots.insert(r.name.clone(), s);
        }
    }
    Ok(Loaded { config, session_cfg, snapshots })
}

/// Shortest requeue of a session that is moving on (never sub-second).
pub const STEP: Duration = Duration::from_secs(1);

pub async fn reconcile(bs: Arc<BackupSession>, ctx: Arc<Context>) -> Result<Action> {
    let ns = bs.namespace().unwrap_or_default();
    let api: Api<BackupSession> = Api::namespaced(ctx.client.clone(), &ns);
    // The current object, not the watch cache's: the previous pass may have just written status.
    let Some(mut bs) = api.get_opt(&bs.name_any()).await?.map(Arc::new) else { return Ok(Action::await_change()) };
    let uid = bs.uid().unwrap_or_default();
    let now = ctx.now();
    let mut status = bs.status.clone().unwrap_or_default();
    if status.phase.is_some_and(SessionPhase::is_finished) {
        return Ok(Action::await_change());
    }
    let mut l = load(&ctx, &bs).await?;
    let retry = l.session_cfg.as_ref().map(|s| s.retry_config.clone()).unwrap_or_default();
    let delay = parse_duration(&retry.delay).and_then(|d| chrono::Duration::from_std(d).ok()).unwrap_or_default();

    // 1. Fold order results into the Snapshot objects.
    let snaps_api: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut transitions = Vec::new();
    for (repo_name, snap) in l.snapshots.iter_mut() {
        let mut st = snap.status.clone().unwrap_or_default();
        let before = serde_json::to_value(&st)?;
        for (comp, c) in st.components.iter_mut() {
            if c.phase != Some(ComponentPhase::Running) {
                continue;
            }
            let key = WorkKey { repository: repo_name.clone(), component: comp.clone() };
            let oid = order_id(&uid, &key, c.attempts);
            let Some(state) = ctx.orders.state(&oid) else { continue };
            if let Some(p) = state.terminal() {
                fold_terminal(c, p, retry.max_retry, delay, now, &ctx);
                transitions.push(component_event(repo_name, comp, c));
                ctx.orders.forget(&oid);
            } else if let Some(p) = &state.last {
                c.progress = Some(progress_of(p));
            }
        }
        let was = st.phase;
        summarise(&mut st);
        // Written only when something changed (then with the time of the change).
        if serde_json::to_value(&st)? != before {
            st.last_update_time = Some(fmt_time(now));
            apply_status(&snaps_api, snap, serde_json::to_value(&st)?).await?;
            if was != st.phase && st.phase == Some(SnapshotPhase::Succeeded) {
                let note = format!("{} of {} component(s) backed up", succeeded_count(&st), st.components.len());
                ctx.event(&*snap, false, "Succeeded", note).await;
            }
            snap.status = Some(st);
        }
    }
    for (warning, reason, note) in transitions {
        ctx.event(&*bs, warning, reason, note).await;
    }
    ctx.metrics.orders_in_flight.set(ctx.orders.count() as i64);

    // 1b. Volumes read through an exposer pod (snapshot path): one step each.
    let (prepared, condition) = if status.phase == Some(SessionPhase::Running) {
        prepare_exposed(&ctx, &bs, &mut l, now).await?
    } else {
        (BTreeMap::new(), None)
    };
    // Which step those volumes are in, on the session itself (written only when it changes;
    // later writes of this pass start from the updated status).
    if let Some(condition) = condition {
        let mut s = status.clone();
        set_condition(&mut s.conditions, condition);
        if s.conditions != status.conditions {
            apply_status(&api, &*bs, serde_json::to_value(&s)?).await?;
            let mut updated = (*bs).clone();
            updated.status = Some(s.clone());
            bs = Arc::new(updated);
            status = s;
        }
    }

    // 2. Decide.
    let work: Vec<WorkView> = l
        .snapshots
        .iter()
        .flat_map(|(repo_name, snap)| {
            let uid = uid.clone();
            let ctx = Arc::clone(&ctx);
            let prepared = &prepared;
            snap.status.iter().flat_map(|s| s.components.iter()).map(move |(comp, c)| {
                let key = WorkKey { repository: repo_name.clone(), component: comp.clone() };
                let in_flight = ctx.orders.in_flight(&order_id(&uid, &key, c.attempts));
                let (waiting, node) = match prepared.get(comp) {
                    Some(Prepared::Ready { identity, .. }) => (false, identity.node_name.clone()),
                    Some(_) => (true, String::new()),
                    None => (false, c.node.clone().unwrap_or_default()),
                };
                WorkView { key, node, status: c.clone(), in_flight, waiting }
            })
        })
        .collect();
    let repos_count = l.session_cfg.as_ref().map_or(0, |s| s.repositories.len());
    let view = SessionView {
        phase: status.phase,
        config_found: l.session_cfg.is_some(),
        paused: l.config.as_ref().is_some_and(|c| c.spec.paused),
        deadline: status.backup_deadline.as_deref().and_then(parse_time),
        work,
        retention_done: status.retention_policy.len() >= repos_count && repos_count > 0,
    };
    let step = next_step(&view, &ctx.orders.load(), ctx.config.max_orders_per_node, now);
    tracing::debug!(session = bs.name_any(), namespace = ns, ?step, "backup session step");

    // 3. Act.
    match step {
        Step::Idle => Ok(Action::await_change()),
        Step::Skip(msg) => {
            let mut s = status.clone();
            s.phase = Some(SessionPhase::Skipped);
            s.message = Some(msg.clone());
            s.completion_time = Some(fmt_time(now));
            apply_status(&api, &*bs, serde_json::to_value(&s)?).await?;
            ctx.metrics.session_phase("Skipped");
            ctx.event(&*bs, false, "Skipped", msg).await;
            Ok(Action::await_change())
        }
        Step::Start => match start(&ctx, &bs, &l, now).await {
            Ok(()) => Ok(Action::requeue(STEP)),
            Err(e) if e.is_retryable() => {
                let mut s = status.clone();
                s.phase = Some(SessionPhase::Pending);
                s.message = Some(e.to_string());
                apply_status(&api, &*bs, serde_json::to_value(&s)?).await?;
                // The error policy backs off (exponentially, bounded); the timeout still applies
                // once running.
                Err(e)
            }
            Err(e) => finish(&ctx, &bs, &l, false, &e.to_string(), now).await,
        },
        Step::Work { dispatch, wake } => {
            if !dispatch.is_empty() {
                send(&ctx, &bs, &mut l, &prepared, &dispatch, delay, retry.max_retry, now).await?;
            }
            Ok(Action::requeue(wake))
        }
        Step::Retention => {
            let applied = retention(&ctx, &bs, &l, now).await;
            let mut s = status.clone();
            s.retention_policy = applied;
            apply_status(&api, &*bs, serde_json::to_value(&s)?).await?;
            Ok(Action::requeue(STEP))
        }
        Step::Succeed => finish(&ctx, &bs, &l, true, "every component backed up", now).await,
        Step::Fail(msg) => finish(&ctx, &bs, &l, false, &msg, now).await,
    }
}

/// The session condition for volumes read through an exposer pod.
pub const VOLUMES_READY: &str = "VolumesReady";

/// [`VOLUMES_READY`] from one pass's exposer steps: False with reason `Waiting` naming each
/// component that waits and for what; else False with `NotReadable` when one cannot be read
/// that way; else True. `None` when no component took such a step in this pass. The message
/// is bounded (1024 bytes).
pub fn volumes_condition(prepared: &BTreeMap<String, Prepared>, now: DateTime<Utc>) -> Option<Condition> {
    if prepared.is_empty() {
        return None;
    }
    let list = |pick: &dyn Fn(&Prepared) -> Option<String>| -> Vec<String> {
        prepared.iter().filter_map(|(comp, p)| pick(p).map(|m| format!("{comp}: {m}"))).collect()
    };
    let waiting = list(&|p| match p {
        Prepared::Waiting(m) => Some(m.clone()),
        _ => None,
    });
    let failed = list(&|p| match p {
        Prepared::Failed(m) => Some(m.clone()),
        _ => None,
    });
    let (status, reason, message) = if !waiting.is_empty() {
        ("False", "Waiting", waiting.join("; "))
    } else if !failed.is_empty() {
        ("False", "NotReadable", failed.join("; "))
    } else {
        ("True", "Ready", format!("{} volume(s) ready to read", prepared.len()))
    };
    Some(Condition {
        type_: VOLUMES_READY.into(),
        status: status.into(),
        reason: reason.into(),
        message: bounded_message(message),
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_millisecond(now.timestamp_millis()).unwrap_or_default(),
        ),
        observed_generation: None,
    })
}

/// A condition message cut to at most 1024 bytes (on a character boundary, marked with `…`).
fn bounded_message(mut message: String) -> String {
    if message.len() > 1024 {
        let cut = (0..=1021).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
        message.truncate(cut);
        message.push('…');
    }
    message
}

fn progress_of(p: &Progress) -> ComponentProgress {
    ComponentProgress {
        files_done: p.files_done,
        files_total: p.files_total,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        bytes_uploaded: p.bytes_uploaded,
        bytes_per_second: p.rate_bytes_per_second.max(0.0) as u64,
        eta_seconds: (p.eta_seconds >= 0.0).then_some(p.eta_seconds as u64),
    }
}

fn fold_terminal(
    c: &mut ComponentStatus,
    p: &Progress,
    max_retry: u32,
    delay: chrono::Duration,
    now: DateTime<Utc>,
    ctx: &Context,
) {
    c.progress = None;
    if p.phase == Phase::Done as i32 {
        let stats = p.result.as_ref().and_then(|r| r.stats).unwrap_or_default();
        c.phase = Some(ComponentPhase::Succeeded);
        c.snapshot_id = p.result.as_ref().map(|r| r.snapshot_id.clone());
        c.size = Some(stats.total_bytes);
        c.duration = Some(format!("{:.1}s", stats.duration_ms as f64 / 1000.0));
        c.error = None;
        c.retry_after = None;
        c.warnings = p.recent_warnings.iter().take(10).cloned().collect();
        ctx.metrics.bytes.inc_by(stats.bytes_read);
    } else {
        c.phase = Some(ComponentPhase::Failed);
        c.error = Some(if p.error.is_empty() { "the order failed".into() } else { p.error.clone() });
        c.retry_after = retry_at(c.attempts, max_retry, &p.error_class, delay, now).map(fmt_time);
    }
}

fn succeeded_count(st: &SnapshotStatus) -> usize {
    st.components.values().filter(|c| c.phase == Some(ComponentPhase::Succeeded)).count()
}

/// The Event for a component that just finished one attempt: (warning, reason, note).
fn component_event(repository: &str, component: &str, c: &ComponentStatus) -> (bool, &'static str, String) {
    match c.phase {
        Some(ComponentPhase::Succeeded) => (
            false,
            "ComponentSucceeded",
            format!(
                "{repository}/{component}: snapshot {} ({} bytes)",
                c.snapshot_id.as_deref().map(|id| id.get(..8).unwrap_or(id)).unwrap_or("?"),
                c.size.unwrap_or(0)
            ),
        ),
        _ => {
            let error = c.error.as_deref().unwrap_or("failed");
            let next = match &c.retry_after {
                Some(at) => format!("retrying after {at}"),
                None => "no retry left".to_string(),
            };
            (true, "ComponentFailed", format!("{repository}/{component} attempt {}: {error}; {next}", c.attempts))
        }
    }
}

fn summarise(st: &mut SnapshotStatus) {
    st.total_components = Some(st.components.len() as u32);
    st.size = Some(st.components.values().filter_map(|c| c.size).sum());
    if !st.components.is_empty() && st.components.values().all(|c| c.phase == Some(ComponentPhase::Succeeded)) {
        st.phase = Some(SnapshotPhase::Succeeded);
    }
}

/// Resolve the target, make sure the repositories exist, create the Snapshot objects.
async fn start(ctx: &Context, bs: &BackupSession, l: &Loaded, now: DateTime<Utc>) -> Result<()> {
    let ns = bs.namespace().unwrap_or_default();
    let (Some(config), Some(scfg)) = (&l.config, &l.session_cfg) else {
        return Err(Error::NotFound("BackupConfiguration session".into()));
    };
    if scfg.volume_snapshot.as_ref().is_some_and(|p| !p.upload && p.keep_last == 0) {
        return Err(Error::invalid(
            "volumeSnapshot",
            "upload: false (snapshot-only) needs keepLast of 1 or more, or nothing would be kept",
        ));
    }
    let volumes = resolve_target(ctx, &ns, &config.spec.target, &scfg.volumes).await?;
    let via_snapshot = scfg.volume_snapshot.is_some();
    let mut planned: Vec<(String, ComponentStatus)> = volumes
        .iter()
        .map(|v| {
            let csi_claim = matches!(
                &v.identity.source,
                Some(Source::Pvc(PersistentVolumeSource { plugin: Some(Plugin::CsiDriver(_)), .. }))
            );
            let snapshot = via_snapshot && csi_claim;
            let status = ComponentStatus {
                phase: Some(ComponentPhase::Pending),
                node: (!snapshot).then(|| v.identity.node_name.clone()),
                pod: (!snapshot).then(|| v.identity.pod_name.clone()),
                volume: Some(v.identity.volume_name.clone()),
                claim: v.claim.clone(),
                read_from: Some(if snapshot { ReadFrom::VolumeSnapshot } else { ReadFrom::Live }),
                ..Default::default()
            };
            (v.component.clone(), status)
        })
        .collect();
    if planned.is_empty() && config.spec.target.kind == TargetKind::PersistentVolumeClaim {
        // A claim no running pod mounts: an exposer pod mounts it (or its snapshot's clone).
        let claim = &config.spec.target.name;
        Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
            .get_opt(claim)
            .await?
            .ok_or_else(|| Error::NotFound(format!("PersistentVolumeClaim {ns}/{claim}")))?;
        let status = ComponentStatus {
            phase: Some(ComponentPhase::Pending),
            claim: Some(claim.clone()),
            read_from: Some(if via_snapshot { ReadFrom::VolumeSnapshot } else { ReadFrom::Claim }),
            ..Default::default()
        };
        planned.push((claim.clone(), status));
    }
    if planned.is_empty() {
        return Err(Error::invalid("target", "the target has no volumes to back up (is it running?)"));
    }
    let repos: Api<Repository> = Api::namespaced(ctx.client.clone(), &ns);
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut listed = Vec::new();
    for r in &scfg.repositories {
        let repo = repos
            .get_opt(&r.name)
            .await?
            .ok_or_else(|| Error::Transient(format!("Repository {} is not created yet", r.name)))?;
        repo::ensure_initialised(ctx, &repo).await?;
        let name = snapshot_name(&r.name, &bs.name_any());
        let mut obj = Snapshot::new(
            &name,
            SnapshotSpec {
                repository: r.name.clone(),
                session: Some(bs.spec.session.clone()),
                backup_session: Some(bs.name_any()),
                app_ref: repo.spec.app_ref.clone(),
                deletion_policy: repo.spec.deletion_policy,
            },
        );
        obj.metadata.labels = Some(
            [
                (REPOSITORY_LABEL.to_string(), r.name.clone()),
                (CONFIG_LABEL.to_string(), config.name_any()),
                (SESSION_LABEL.to_string(), bs.spec.session.clone()),
                (BACKUP_SESSION_LABEL.to_string(), bs.name_any()),
            ]
            .into(),
        );
        // Owned by the Repository: snapshots outlive the session (history limit) but not the
        // repository they describe.
        obj.metadata.owner_references = repo.controller_owner_ref(&()).map(|o| vec![o]);
        if repo.spec.deletion_policy == hoard_api::crd::DeletionPolicy::WipeOut {
            // Present from the start, so no deletion can slip past it.
            obj.metadata.finalizers = Some(vec![repo::SNAPSHOT_FINALIZER.to_string()]);
        }
        let created = snaps.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
        let components: BTreeMap<String, ComponentStatus> = planned.iter().cloned().collect();
        let st = SnapshotStatus {
            phase: Some(SnapshotPhase::Running),
            snapshot_time: Some(fmt_time(now)),
            last_update_time: Some(fmt_time(now)),
            total_components: Some(components.len() as u32),
            components,
            ..Default::default()
        };
        apply_status(&snaps, &created, serde_json::to_value(&st)?).await?;
        listed.push(SessionSnapshot { name, repository: r.name.clone(), phase: Some(SnapshotPhase::Running) });
    }
    let deadline = scfg
        .backup_timeout
        .as_deref()
        .and_then(parse_duration)
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .map(|d| fmt_time(now + d));
    let mut s = bs.status.clone().unwrap_or_default();
    s.phase = Some(SessionPhase::Running);
    s.start_time = Some(fmt_time(now));
    s.backup_deadline = deadline;
    s.total_snapshots = Some(listed.len() as u32);
    s.snapshots = listed;
    s.message = None;
    let api: Api<BackupSession> = Api::namespaced(ctx.client.clone(), &ns);
    apply_status(&api, bs, serde_json::to_value(&s)?).await?;
    ctx.metrics.session_phase("Running");
    ctx.event(
        bs,
        false,
        "Running",
        format!("backing up {} volume(s) into {} repository(ies)", planned.len(), s.total_snapshots.unwrap_or(0)),
    )
    .await;
    Ok(())
}

/// Sends the orders for `keys` and marks their components Running.
#[allow(clippy::too_many_arguments)]
async fn send(
    ctx: &Context,
    bs: &BackupSession,
    l: &mut Loaded,
    prepared: &BTreeMap<String, Prepared>,
    keys: &[WorkKey],
    delay: chrono::Duration,
    max_retry: u32,
    now: DateTime<Utc>,
) -> Result<()> {
    let ns = bs.namespace().unwrap_or_default();
    let uid = bs.uid().unwrap_or_default();
    let (Some(config), Some(scfg)) = (&l.config, &l.session_cfg) else { return Ok(()) };
    // Live volumes come from the target's pods; the others from their exposer pods.
    let live_needed = keys.iter().any(|k| !matches!(prepared.get(&k.component), Some(Prepared::Ready { .. })));
    let mut volumes: Vec<TargetVolume> =
        if live_needed { resolve_target(ctx, &ns, &config.spec.target, &scfg.volumes).await? } else { Vec::new() };
    let mut provenance = BTreeMap::new();
    for (component, p) in prepared {
        if let Prepared::Ready { identity, provenance: from } = p {
            volumes.retain(|v| &v.component != component);
            volumes.push(TargetVolume { component: component.clone(), identity: identity.clone(), claim: None });
            provenance.insert(component.clone(), from.clone());
        }
    }
    let agents = agent_endpoints(ctx).await?;
    let repos: Api<Repository> = Api::namespaced(ctx.client.clone(), &ns);
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let by_repo: BTreeSet<&str> = keys.iter().map(|k| k.repository.as_str()).collect();
    for repo_name in by_repo {
        let Some(snap) = l.snapshots.get_mut(repo_name) else { continue };
        let repo = repos.get(repo_name).await?;
        let access = repo::access(ctx, &repo).await?;
        let mut st = snap.status.clone().unwrap_or_default();
        for key in keys.iter().filter(|k| k.repository == repo_name) {
            let Some(c) = st.components.get_mut(&key.component) else { continue };
            let reattach = c.phase == Some(ComponentPhase::Running);
            if !reattach {
                c.attempts += 1;
            }
            let oid = order_id(&uid, key, c.attempts);
            let vol = volumes.iter().find(|v| v.component == key.component);
            let (vol, addr) = match vol.map(|v| (v, agents.get(v.node()))) {
                Some((v, Some(addr))) => (v, addr.clone()),
                Some((v, None)) => {
                    c.phase = Some(ComponentPhase::Failed);
                    c.error = Some(format!("no Ready hoard agent on node {}", v.node()));
                    c.retry_after = retry_at(c.attempts, max_retry, "", delay, now).map(fmt_time);
                    continue;
                }
                None => {
                    c.phase = Some(ComponentPhase::Failed);
                    c.error =
                        Some(format!("volume for component {} is no longer mounted by a running pod", key.component));
                    c.retry_after = retry_at(c.attempts, max_retry, "", delay, now).map(fmt_time);
                    continue;
                }
            };
            let mut labels: BTreeMap<String, String> = [
                (crate::retention::COMPONENT_LABEL.to_string(), key.component.clone()),
                (SNAPSHOT_LABEL.to_string(), snap.name_any()),
                (SESSION_LABEL.to_string(), bs.spec.session.clone()),
                (BACKUP_SESSION_LABEL.to_string(), bs.name_any()),
                (CONFIG_LABEL.to_string(), config.name_any()),
                ("hoard.dev/namespace".to_string(), ns.clone()),
            ]
            .into();
            let from = provenance.get(&key.component).cloned().flatten();
            if let Some(vs) = &from {
                // The repository snapshot says which point in time it holds.
                labels.insert(VOLUME_SNAPSHOT_LABEL.into(), vs.name.clone());
                if let Some(t) = &vs.creation_time {
                    labels.insert(VOLUME_SNAPSHOT_TIME_LABEL.into(), t.clone());
                }
            }
            let order = BackupOrder {
                order_id: oid,
                volume: Some(vol.identity.clone()),
                repository: Some(access.message()),
                component: key.component.clone(),
                host: format!("{ns}/{}", config.spec.target.name),
                tags: vec![],
                labels: labels.into_iter().collect(),
                excludes: scfg.exclude.clone(),
                includes: scfg.include.clone(),
            };
            ctx.orders.start(vol.node(), &addr, Order::Backup(order));
            c.phase = Some(ComponentPhase::Running);
            c.node = Some(vol.node().to_string());
            c.pod = Some(vol.identity.pod_name.clone());
            if from.is_some() {
                c.volume_snapshot = from;
            }
            c.error = None;
            c.retry_after = None;
            c.waiting_for = None;
        }
        summarise(&mut st);
        st.last_update_time = Some(fmt_time(now));
        apply_status(&snaps, snap, serde_json::to_value(&st)?).await?;
        snap.status = Some(st);
    }
    ctx.metrics.orders_in_flight.set(ctx.orders.count() as i64);
    Ok(())
}

/// Whether any component is read through an exposer pod (so the session may own objects to
/// clean up).
fn uses_exposer(l: &Loaded) -> bool {
    l.snapshots
        .values()
        .flat_map(|s| s.status.iter().flat_map(|st| st.components.values()))
        .any(|c| matches!(c.read_from, Some(ReadFrom::VolumeSnapshot | ReadFrom::Claim)))
}

/// One step of the snapshot path for every component read through an exposer that still has
/// work to do. Components that cannot be read that way fail for good (or, with
/// `fallback: Live`, switch to the live mount); both are written to the Snapshot objects.
/// Returns the components still waiting or ready, and the session's [`VOLUMES_READY`]
/// condition from every outcome of this step.
async fn prepare_exposed(
    ctx: &Context,
    bs: &BackupSession,
    l: &mut Loaded,
    now: DateTime<Utc>,
) -> Result<(BTreeMap<String, Prepared>, Option<Condition>)> {
    let uid = bs.uid().unwrap_or_default();
    let mut wanted: BTreeMap<String, Wanted> = BTreeMap::new();
    for (repo_name, snap) in &l.snapshots {
        for (comp, c) in snap.status.iter().flat_map(|s| s.components.iter()) {
            let (Some(read_from @ (ReadFrom::VolumeSnapshot | ReadFrom::Claim)), Some(claim)) = (c.read_from, &c.claim)
            else {
                continue;
            };
            let key = WorkKey { repository: repo_name.clone(), component: comp.clone() };
            let needs_volume = match c.phase {
                Some(ComponentPhase::Pending) | None => true,
                Some(ComponentPhase::Failed) => c.retry_after.is_some(),
                Some(ComponentPhase::Running) => !ctx.orders.in_flight(&order_id(&uid, &key, c.attempts)),
                _ => false,
            };
            if needs_volume {
                wanted.insert(comp.clone(), Wanted { component: comp.clone(), claim: claim.clone(), read_from });
            }
        }
    }
    if wanted.is_empty() {
        return Ok((BTreeMap::new(), None));
    }
    let policy = l.session_cfg.as_ref().and_then(|s| s.volume_snapshot.clone());
    let timeout = policy
        .as_ref()
        .and_then(|p| p.ready_timeout.as_deref())
        .and_then(parse_duration)
        .unwrap_or(snapshots::DEFAULT_READY_TIMEOUT);
    let started = bs.status.as_ref().and_then(|s| s.start_time.as_deref()).and_then(parse_time).unwrap_or(now);
    let deadline = started + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    let wanted: Vec<Wanted> = wanted.into_values().collect();
    let prepared = snapshots::prepare(ctx, bs, policy.as_ref(), &wanted, deadline, now).await?;

    let ns = bs.namespace().unwrap_or_default();
    let snaps_api: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    for snap in l.snapshots.values_mut() {
        let mut st = snap.status.clone().unwrap_or_default();
        let mut changed = false;
        for (comp, c) in st.components.iter_mut() {
            match prepared.get(comp) {
                Some(Prepared::Failed(m)) if c.phase != Some(ComponentPhase::Succeeded) => {
                    c.phase = Some(ComponentPhase::Failed);
                    c.error = Some(m.clone());
                    c.retry_after = None;
                    c.waiting_for = None;
                    changed = true;
                }
                // Written only when it changes: polls that see the same wait write nothing.
                Some(Prepared::Waiting(m)) if c.waiting_for.as_ref() != Some(m) => {
                    c.waiting_for = Some(m.clone());
                    changed = true;
                }
                Some(Prepared::Live(m)) => {
                    c.read_from = Some(ReadFrom::Live);
                    c.warnings.push(m.clone());
                    changed = true;
                }
                Some(Prepared::SnapshotReady(from)) if c.phase != Some(ComponentPhase::Succeeded) => {
                    c.phase = Some(ComponentPhase::Succeeded);
                    c.volume_snapshot = Some(from.clone());
                    c.waiting_for = None;
                    c.error = None;
                    c.retry_after = None;
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            st.last_update_time = Some(fmt_time(now));
            apply_status(&snaps_api, &*snap, serde_json::to_value(&st)?).await?;
            snap.status = Some(st);
        }
    }
    for (comp, p) in &prepared {
        match p {
            Prepared::Failed(m) => ctx.event(bs, true, "VolumeNotReadable", format!("{comp}: {m}")).await,
            Prepared::Live(m) => ctx.event(bs, true, "LiveRead", format!("{comp}: {m}")).await,
            Prepared::SnapshotReady(from) => {
                ctx.event(bs, false, "VolumeSnapshotReady", format!("{comp}: {} is the backup", from.name)).await
            }
            _ => {}
        }
    }
    let condition = volumes_condition(&prepared, now);
    let pending = prepared.into_iter().filter(|(_, p)| matches!(p, Prepared::Waiting(_) | Prepared::Ready { .. }));
    Ok((pending.collect(), condition))
}

/// Applies each repository's retention policy; failures are recorded, never fatal to the
/// session (the backup itself succeeded).
async fn retention(ctx: &Context, bs: &BackupSession, l: &Loaded, now: DateTime<Utc>) -> Vec<RetentionApplied> {
    let mut out = Vec::new();
    let (Some(config), Some(scfg)) = (&l.config, &l.session_cfg) else { return out };
    let ns = bs.namespace().unwrap_or_default();
    for r in &scfg.repositories {
        let policy_ref =
            config.spec.backends.iter().find(|b| b.name == r.backend).and_then(|b| b.retention_policy.clone());
        let mut applied = RetentionApplied {
            repository: r.name.clone(),
            policy: policy_ref.as_ref().map(|p| p.name.clone()),
            phase: Some(RetentionPhase::Applied),
            removed: 0,
            error: None,
        };
        if let Some(pref) = policy_ref {
            match apply_retention(ctx, &ns, &r.name, &pref, now).await {
                Ok(n) => applied.removed = n,
                Err(e) => {
                    applied.phase = Some(RetentionPhase::FailedToApply);
                    applied.error = Some(e.to_string());
                    ctx.event(bs, true, "RetentionFailed", format!("repository {}: {e}", r.name)).await;
                }
            }
        }
        out.push(applied);
    }
    out
}

async fn apply_retention(
    ctx: &Context,
    ns: &str,
    repo_name: &str,
    pref: &hoard_api::crd::ObjectRef,
    now: DateTime<Utc>,
) -> Result<u32> {
    let pns = pref.namespace_or(ns).to_string();
    let policy = Api::<RetentionPolicy>::namespaced(ctx.client.clone(), &pns)
        .get_opt(&pref.name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("RetentionPolicy {pns}/{}", pref.name)))?;
    let repo = Api::<Repository>::namespaced(ctx.client.clone(), ns).get(repo_name).await?;
    let access = repo::access(ctx, &repo).await?;
    let (core, _) = repo::open_or_init(&access).await?;
    let snapshots = core.list_snapshots().await?;
    let remove = crate::retention::plan_forget(&snapshots, &policy.spec, now)?;
    for id in &remove {
        core.delete_snapshot(id).await?;
    }
    let removed: BTreeSet<String> = remove.iter().map(|id| id.to_hex()).collect();
    // Snapshot objects whose every component was forgotten go too; failed ones beyond the
    // policy's failedSnapshots.last as well.
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), ns);
    let mut list = snaps.list(&ListParams::default().labels(&format!("{REPOSITORY_LABEL}={repo_name}"))).await?.items;
    list.sort_by_key(|s| std::cmp::Reverse(s.status.as_ref().and_then(|s| s.snapshot_time.clone())));
    let mut failed_kept = 0;
    for s in &list {
        let st = s.status.clone().unwrap_or_default();
        let gone = match st.phase {
            Some(SnapshotPhase::Succeeded) => {
                !st.components.is_empty()
                    && st.components.values().all(|c| c.snapshot_id.as_ref().is_some_and(|id| removed.contains(id)))
            }
            Some(SnapshotPhase::Failed) => {
                failed_kept += 1;
                failed_kept > policy.spec.failed_snapshots.last
            }
            _ => false,
        };
        if gone {
            match snaps.delete(&s.name_any(), &DeleteParams::background()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if !remove.is_empty() {
        // Prune is its own bounded operation: the session does not wait for it.
        repo::spawn_prune(Arc::new(core), repo_name.to_string());
    }
    Ok(remove.len() as u32)
}

/// With `volumeSnapshot.keepLast`, keeps the VolumeSnapshot of every component that succeeded
/// in all of the session's repositories, then deletes the session's kept ones beyond the newest
/// `keepLast` per volume. Returns the names of this session's kept VolumeSnapshots.
async fn keep_snapshots(ctx: &Context, bs: &BackupSession, l: &Loaded) -> Result<BTreeSet<String>> {
    let (Some(config), Some(scfg)) = (&l.config, &l.session_cfg) else { return Ok(BTreeSet::new()) };
    let Some(policy) = scfg.volume_snapshot.as_ref().filter(|p| p.keep_last > 0) else { return Ok(BTreeSet::new()) };
    let mut succeeded: BTreeMap<&str, bool> = BTreeMap::new();
    for st in l.snapshots.values().filter_map(|s| s.status.as_ref()) {
        for (comp, c) in &st.components {
            if c.read_from == Some(ReadFrom::VolumeSnapshot) {
                let ok = c.phase == Some(ComponentPhase::Succeeded);
                *succeeded.entry(comp.as_str()).or_insert(true) &= ok;
            }
        }
    }
    let components: Vec<String> = succeeded.into_iter().filter(|(_, ok)| *ok).map(|(c, _)| c.to_string()).collect();
    if components.is_empty() {
        return Ok(BTreeSet::new());
    }
    let group = hoard_csi::keep::keep_group(&config.name_any(), &bs.spec.session);
    // Owned by the Snapshot objects that describe them (not as their controller): deleting the
    // last of those lets the garbage collector delete the VolumeSnapshot too.
    let owners: Vec<OwnerReference> = l
        .snapshots
        .values()
        .filter(|s| {
            s.status.as_ref().is_some_and(|st| {
                st.components
                    .iter()
                    .any(|(c, cs)| components.contains(c) && cs.read_from == Some(ReadFrom::VolumeSnapshot))
            })
        })
        .filter_map(|s| {
            let mut o = s.controller_owner_ref(&())?;
            o.controller = Some(false);
            o.block_owner_deletion = Some(false);
            Some(o)
        })
        .collect();
    let kept = snapshots::keep(ctx, bs, &group, &components, &owners).await?;
    let ns = bs.namespace().unwrap_or_default();
    let deleted = snapshots::retain_kept(ctx, &ns, &group, policy.keep_last).await?;
    if !kept.is_empty() {
        let note = format!("kept {} (keepLast {})", kept.join(", "), policy.keep_last);
        ctx.event(bs, false, "VolumeSnapshotsKept", note).await;
    }
    if !deleted.is_empty() {
        ctx.event(bs, false, "VolumeSnapshotsDeleted", format!("retention deleted {}", deleted.join(", "))).await;
        if !policy.upload {
            forget_snapshot_only(ctx, &ns, &deleted).await?;
        }
    }
    Ok(kept.into_iter().collect())
}

/// Snapshot-only: a Snapshot object whose every component's VolumeSnapshot retention deleted
/// describes nothing any more, and goes too.
async fn forget_snapshot_only(ctx: &Context, ns: &str, deleted: &[String]) -> Result<()> {
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), ns);
    for s in snaps.list(&ListParams::default()).await?.items {
        let Some(st) = &s.status else { continue };
        let gone = !st.components.is_empty()
            && st.components.values().all(|c| {
                c.snapshot_id.is_none() && c.volume_snapshot.as_ref().is_some_and(|v| deleted.contains(&v.name))
            });
        if gone {
            match snaps.delete(&s.name_any(), &DeleteParams::background()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

async fn finish(
    ctx: &Context,
    bs: &BackupSession,
    l: &Loaded,
    ok: bool,
    msg: &str,
    now: DateTime<Utc>,
) -> Result<Action> {
    let ns = bs.namespace().unwrap_or_default();
    let uid = bs.uid().unwrap_or_default();
    // Before the cleanup (which would delete them) and the status: a pass that fails here runs
    // finish again, and keeping is idempotent.
    let kept = keep_snapshots(ctx, bs, l).await?;
    if uses_exposer(l) {
        // Before the status: a pass that fails here runs finish again.
        let n = snapshots::cleanup(ctx, bs).await?;
        if n > 0 {
            ctx.event(
                bs,
                false,
                "CleanedUp",
                format!("deleted {n} exposer pod(s), clone claim(s) and VolumeSnapshot(s)"),
            )
            .await;
        }
    }
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut listed = Vec::new();
    for (repo_name, snap) in &l.snapshots {
        let mut st = snap.status.clone().unwrap_or_default();
        for (comp, c) in st.components.iter_mut() {
            let key = WorkKey { repository: repo_name.clone(), component: comp.clone() };
            let oid = order_id(&uid, &key, c.attempts);
            if ctx.orders.in_flight(&oid) {
                ctx.orders.cancel(&oid).await;
            }
            if c.phase != Some(ComponentPhase::Succeeded) {
                c.phase = Some(ComponentPhase::Failed);
                c.retry_after = None;
                c.progress = None;
                if c.error.is_none() {
                    c.error = Some(msg.to_string());
                }
            }
            if let Some(from) = c.volume_snapshot.as_mut() {
                from.kept = kept.contains(&from.name);
            }
        }
        let was = snap.status.as_ref().and_then(|s| s.phase);
        st.phase = Some(if ok { SnapshotPhase::Succeeded } else { SnapshotPhase::Failed });
        st.last_update_time = Some(fmt_time(now));
        apply_status(&snaps, snap, serde_json::to_value(&st)?).await?;
        if was != st.phase {
            let note = format!("{} of {} component(s) backed up", succeeded_count(&st), st.components.len());
            ctx.event(snap, !ok, if ok { "Succeeded" } else { "Failed" }, note).await;
        }
        listed.push(SessionSnapshot { name: snap.name_any(), repository: repo_name.clone(), phase: st.phase });
    }
    let mut s = bs.status.clone().unwrap_or_default();
    // A session that ends while volumes still wait: they will not be read.
    if !ok && let Some(c) = s.conditions.iter_mut().find(|c| c.type_ == VOLUMES_READY && c.reason == "Waiting") {
        c.reason = "NotReadable".into();
        c.message = bounded_message(msg.to_string());
    }
    let phase = if ok { SessionPhase::Succeeded } else { SessionPhase::Failed };
    s.phase = Some(phase);
    s.completion_time = Some(fmt_time(now));
    let started = s.start_time.as_deref().and_then(parse_time).unwrap_or(now);
    s.duration = Some(duration_str(now - started));
    if !listed.is_empty() {
        s.snapshots = listed;
    }
    s.message = Some(msg.to_string());
    let api: Api<BackupSession> = Api::namespaced(ctx.client.clone(), &ns);
    apply_status(&api, bs, serde_json::to_value(&s)?).await?;
    ctx.metrics.session_phase(if ok { "Succeeded" } else { "Failed" });
    ctx.metrics.session_duration.observe((now - started).num_milliseconds().max(0) as f64 / 1000.0);
    ctx.event(bs, !ok, if ok { "Succeeded" } else { "Failed" }, msg.to_string()).await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 7, 12, 0, 0).single().expect("time")
    }

    fn ready() -> Prepared {
        Prepared::Ready { identity: Default::default(), provenance: None }
    }

    #[test]
    fn the_volumes_condition_names_what_waits_first_then_what_failed() {
        assert!(volumes_condition(&BTreeMap::new(), at()).is_none(), "no exposer step: no condition");
        let mut p: BTreeMap<String, Prepared> = [
            ("data".to_string(), Prepared::Waiting("VolumeSnapshot data-x is not ready to use yet".into())),
            ("logs".to_string(), Prepared::Failed("no VolumeSnapshotClass for driver d".into())),
            ("web".to_string(), ready()),
        ]
        .into();
        let c = volumes_condition(&p, at()).expect("condition");
        assert_eq!((c.type_.as_str(), c.status.as_str(), c.reason.as_str()), (VOLUMES_READY, "False", "Waiting"));
        assert_eq!(c.message, "data: VolumeSnapshot data-x is not ready to use yet");
        p.remove("data");
        let c = volumes_condition(&p, at()).expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "NotReadable"));
        assert!(c.message.starts_with("logs: no VolumeSnapshotClass"), "{}", c.message);
        p.remove("logs");
        let c = volumes_condition(&p, at()).expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Ready"));
    }

    #[test]
    fn the_volumes_condition_message_is_bounded() {
        let p: BTreeMap<String, Prepared> =
            (0..100).map(|i| (format!("volume-{i}"), Prepared::Waiting("é".repeat(40)))).collect();
        let c = volumes_condition(&p, at()).expect("condition");
        assert!(c.message.len() <= 1024 + '…'.len_utf8(), "{}", c.message.len());
        assert!(c.message.ends_with('…'));
    }

    #[test]
    fn setting_the_same_condition_again_changes_nothing() {
        let mut conditions = Vec::new();
        let waiting: BTreeMap<String, Prepared> = [("data".to_string(), Prepared::Waiting("x".into()))].into();
        set_condition(&mut conditions, volumes_condition(&waiting, at()).expect("c"));
        let before = conditions.clone();
        set_condition(&mut conditions, volumes_condition(&waiting, at() + chrono::Duration::minutes(1)).expect("c"));
        assert_eq!(conditions, before, "a repeated wait is not a new write");
    }
}
