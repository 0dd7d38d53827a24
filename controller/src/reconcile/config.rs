//! BackupConfiguration: validate, create the Repository objects its sessions name, run the
//! scheduler (one BackupSession per fired time, named after the time so it is created once),
//! trim session history, and report `status.sessions[].nextSchedule`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hoard_api::crd::{
    AppRef, Backend, BackupConfiguration, BackupSession, BackupSessionSpec, ConfigurationPhase, Invoker, Repository,
    RepositoryConfig, RepositorySpec, RetentionPolicy, SessionPhase, SessionScheduleStatus, Trigger,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::error::{Error, Result, is_conflict, is_not_found};
use crate::reconcile::repo::{admits, same_namespace_secret, storage_access};
use crate::schedule::{Schedule, fmt_time, parse_time, session_name};
use crate::{CONFIG_LABEL, Context, FIELD_MANAGER, SESSION_LABEL, apply_status};

/// Default finished sessions kept per outcome.
pub const DEFAULT_HISTORY: u32 = 3;

pub async fn reconcile(bc: Arc<BackupConfiguration>, ctx: Arc<Context>) -> Result<Action> {
    let ns = bc.namespace().unwrap_or_default();
    let name = bc.name_any();
    let api: Api<BackupConfiguration> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.now();
    let old = bc.status.clone().unwrap_or_default();

    let validation = validate(&bc, &ctx).await;
    let mut requeue = Duration::from_secs(60);
    let mut sessions_status = Vec::new();
    let (phase, message) = match &validation {
        Ok(()) => (ConfigurationPhase::Ready, "configuration is valid".to_string()),
        Err(e) if e.is_retryable() => (ConfigurationPhase::NotReady, e.to_string()),
        Err(e) => (ConfigurationPhase::Invalid, e.to_string()),
    };
    if validation.is_ok() {
        ensure_repositories(&bc, &ctx).await?;
    }
    let created = bc.metadata.creation_timestamp.as_ref().and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0));
    for s in &bc.spec.sessions {
        let prev = old.sessions.iter().find(|p| p.name == s.name).cloned().unwrap_or_default();
        let mut st = SessionScheduleStatus { name: s.name.clone(), ..prev.clone() };
        let Ok(schedule) = Schedule::parse(&s.scheduler) else {
            st.next_schedule = None;
            sessions_status.push(st);
            continue;
        };
        let last = prev.last_schedule.as_deref().and_then(parse_time).or(created).unwrap_or(now);
        let active = validation.is_ok() && !bc.spec.paused && !s.scheduler.suspend;
        let d = schedule.decide(last, now, active);
        st.missed_runs = prev.missed_runs.saturating_add(d.missed);
        if let Some(at) = d.run {
            let session = create_session(&bc, &s.name, at, &ctx).await?;
            st.last_session = Some(session);
            st.last_schedule = Some(fmt_time(at));
        } else if let Some(handled) = d.handled {
            // Missed times are consumed: they will not fire later.
            st.last_schedule = Some(fmt_time(handled));
        }
        if d.missed > 0 {
            ctx.event(
                &*bc,
                true,
                "MissedRun",
                format!("session {}: {} scheduled run(s) not started", s.name, d.missed),
            )
            .await;
        }
        st.next_schedule = d.next.map(fmt_time);
        if let Some(n) = d.next {
            let wait = (n - now).to_std().unwrap_or_default() + Duration::from_millis(200);
            requeue = requeue.min(wait);
        }
        sessions_status.push(st);
    }
    let last_success = trim_history(&bc, &ctx).await?;
    if let Some(t) = last_success.as_deref().and_then(parse_time) {
        ctx.metrics
            .last_success
            .get_or_create(&crate::metrics::ConfigLabels { namespace: ns.clone(), configuration: name.clone() })
            .set(t.timestamp() as f64);
    }
    let was_phase = old.phase;
    let status = json!({
        "phase": phase,
        "targetFound": validation.is_ok(),
        "sessions": sessions_status,
        "lastSuccessfulBackup": last_success.or(old.last_successful_backup),
        "observedGeneration": bc.metadata.generation,
        "conditions": [{
            "type": "Ready",
            "status": if phase == ConfigurationPhase::Ready {"True"} else {"False"},
            "reason": format!("{phase:?}"),
            "message": message,
            "lastTransitionTime": fmt_time(now),
        }],
    });
    apply_status(&api, &*bc, status).await?;
    if was_phase != Some(phase) {
        ctx.event(&*bc, phase != ConfigurationPhase::Ready, &format!("{phase:?}"), message).await;
    }
    // Recorded in status; the error policy backs off (exponentially, bounded). A spec change
    // retriggers at once.
    validation?;
    Ok(Action::requeue(requeue.max(Duration::from_secs(1))))
}

/// Every backend's storage and retention policy must exist and admit this namespace; every
/// schedule must parse.
async fn validate(bc: &BackupConfiguration, ctx: &Context) -> Result<()> {
    let ns = bc.namespace().unwrap_or_default();
    for s in &bc.spec.sessions {
        Schedule::parse(&s.scheduler).map_err(|e| Error::invalid(format!("session {}", s.name), e.to_string()))?;
        for r in &s.repositories {
            let backend = backend_of(bc, r)?;
            let storage_ns = backend.storage_ref.namespace_or(&ns);
            crate::storage::confine_path(&repository_path(&ns, r), &ns, storage_ns)?;
            same_namespace_secret(&r.encryption_secret, &ns, &format!("repository {} encryptionSecret", r.name))?;
        }
    }
    for b in &bc.spec.backends {
        let sns = b.storage_ref.namespace_or(&ns).to_string();
        storage_access(ctx, &sns, &b.storage_ref.name, &ns, "").await?;
        if let Some(rp) = &b.retention_policy {
            let rns = rp.namespace_or(&ns).to_string();
            let api: Api<RetentionPolicy> = Api::namespaced(ctx.client.clone(), &rns);
            let p = match api.get(&rp.name).await {
                Ok(p) => p,
                Err(e) if is_not_found(&e) => {
                    return Err(Error::NotFound(format!("RetentionPolicy {rns}/{}", rp.name)));
                }
                Err(e) => return Err(e.into()),
            };
            admits(ctx, &p.spec.usage_policy, &rns, &ns, &format!("RetentionPolicy {rns}/{}", rp.name)).await?;
        }
    }
    Ok(())
}

fn backend_of<'a>(bc: &'a BackupConfiguration, r: &RepositoryConfig) -> Result<&'a Backend> {
    bc.spec
        .backends
        .iter()
        .find(|b| b.name == r.backend)
        .ok_or_else(|| Error::invalid("repository", format!("{} names unknown backend {}", r.name, r.backend)))
}

/// The repository's directory in its storage: `directory`, else `<namespace>/<name>`.
fn repository_path(ns: &str, r: &RepositoryConfig) -> String {
    r.directory.clone().unwrap_or_else(|| format!("{ns}/{}", r.name))
}

/// Creates (or updates) the Repository objects of every session.
async fn ensure_repositories(bc: &BackupConfiguration, ctx: &Context) -> Result<()> {
    let ns = bc.namespace().unwrap_or_default();
    let api: Api<Repository> = Api::namespaced(ctx.client.clone(), &ns);
    for s in &bc.spec.sessions {
        for r in &s.repositories {
            let backend = backend_of(bc, r)?;
            let spec = RepositorySpec {
                app_ref: Some(AppRef { target: bc.spec.target.clone(), namespace: ns.clone() }),
                storage_ref: hoard_api::crd::ObjectRef {
                    name: backend.storage_ref.name.clone(),
                    namespace: Some(backend.storage_ref.namespace_or(&ns).to_string()),
                },
                path: repository_path(&ns, r),
                encryption_secret: r.encryption_secret.clone(),
                deletion_policy: r.deletion_policy,
                paused: false,
                usage_policy: None,
            };
            let mut obj = Repository::new(&r.name, spec);
            obj.metadata.labels = Some([(CONFIG_LABEL.to_string(), bc.name_any())].into());
            api.patch(&r.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj)).await?;
        }
    }
    Ok(())
}

/// The BackupSession for `session` at `at`; creating it twice is harmless (same name).
async fn create_session(bc: &BackupConfiguration, session: &str, at: DateTime<Utc>, ctx: &Context) -> Result<String> {
    let ns = bc.namespace().unwrap_or_default();
    let api: Api<BackupSession> = Api::namespaced(ctx.client.clone(), &ns);
    let name = session_name(&bc.name_any(), session, at);
    let mut obj = BackupSession::new(
        &name,
        BackupSessionSpec {
            invoker: Invoker::configuration(bc.name_any()),
            session: session.into(),
            trigger: Trigger::Scheduled,
            scheduled_time: Some(fmt_time(at)),
        },
    );
    obj.metadata.labels =
        Some([(CONFIG_LABEL.to_string(), bc.name_any()), (SESSION_LABEL.to_string(), session.to_string())].into());
    obj.metadata.owner_references = bc.controller_owner_ref(&()).map(|o| vec![o]);
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {
            ctx.event(bc, false, "Scheduled", format!("created BackupSession {name} for {}", fmt_time(at))).await;
        }
        Err(e) if is_conflict(&e) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(name)
}

/// Deletes finished sessions beyond each session's history limit (per outcome); returns the
/// completion time of the newest Succeeded one.
async fn trim_history(bc: &BackupConfiguration, ctx: &Context) -> Result<Option<String>> {
    let ns = bc.namespace().unwrap_or_default();
    let api: Api<BackupSession> = Api::namespaced(ctx.client.clone(), &ns);
    let lp = ListParams::default().labels(&format!("{CONFIG_LABEL}={}", bc.name_any()));
    let mut list = api.list(&lp).await?.items;
    list.sort_by_key(|s| std::cmp::Reverse(s.metadata.creation_timestamp.as_ref().map(|t| t.0)));
    let mut kept: BTreeMap<(String, String), u32> = BTreeMap::new();
    let mut last_success = None;
    for s in &list {
        let Some(phase) = s.status.as_ref().and_then(|st| st.phase).filter(|p| p.is_finished()) else { continue };
        if phase == SessionPhase::Succeeded && last_success.is_none() {
            last_success = s.status.as_ref().and_then(|st| st.completion_time.clone());
        }
        let limit = bc
            .spec
            .sessions
            .iter()
            .find(|c| c.name == s.spec.session)
            .and_then(|c| c.session_history_limit)
            .unwrap_or(DEFAULT_HISTORY);
        let n = kept.entry((s.spec.session.clone(), format!("{phase:?}"))).or_default();
        *n += 1;
        if *n > limit {
            match api.delete(&s.name_any(), &DeleteParams::background()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(last_success)
}
