//! RestoreSession: resolve the data source (`latest` → the newest Succeeded Snapshot object of
//! the repository), map each component to a volume of the target, and send one restore order
//! to the agent of the node where that volume is mounted. Per-component status; no retries (a
//! restore that failed halfway is for a human to look at); `overwrite` passes through to the
//! agent, which refuses a non-empty volume without it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hoard_api::agent::v1::{Phase, RestoreOrder};
use hoard_api::crd::{
    ComponentPhase, ComponentStatus, Repository, RestorePhase, RestoreSession, RestoreSessionStatus, Snapshot,
    SnapshotPhase, TargetKind, parse_duration,
};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;

use crate::error::{Error, Result, is_conflict, is_not_found};
use crate::helper::{self, HelperState};
use crate::orders::Order;
use crate::reconcile::restore_copy::{self, CopyStep};
use crate::reconcile::restore_import;
use crate::reconcile::{agent_endpoints, repo, resolve_target, target_pods};
use crate::schedule::{fmt_time, parse_time};
use crate::{Context, REPOSITORY_LABEL, RESTORE_METADATA_LABEL, apply_status};

fn order_id(uid: &str, component: &str) -> String {
    format!("{uid}/restore/{component}")
}

pub async fn reconcile(rs: Arc<RestoreSession>, ctx: Arc<Context>) -> Result<Action> {
    let ns = rs.namespace().unwrap_or_default();
    let api: Api<RestoreSession> = Api::namespaced(ctx.client.clone(), &ns);
    // The current object, not the watch cache's: the previous pass may have just written status.
    let Some(rs) = api.get_opt(&rs.name_any()).await?.map(Arc::new) else { return Ok(Action::await_change()) };
    let mut st = rs.status.clone().unwrap_or_default();
    if st.phase.is_some_and(RestorePhase::is_finished) {
        return Ok(Action::await_change());
    }
    let now = ctx.now();
    if let Some(vs) = rs.spec.data_source.volume_snapshot.clone() {
        return from_volume_snapshot(&ctx, &rs, &api, st, &vs, now).await;
    }
    if st.phase != Some(RestorePhase::Running) {
        return match start(&ctx, &rs, &mut st, now).await {
            Ok(Some(waiting)) => {
                st.phase = Some(RestorePhase::Pending);
                st.message = Some(waiting);
                apply_status(&api, &*rs, serde_json::to_value(&st)?).await?;
                Ok(Action::requeue(HELPER_POLL))
            }
            Ok(None) => {
                apply_status(&api, &*rs, serde_json::to_value(&st)?).await?;
                ctx.metrics.restore_phase("Running");
                ctx.event(&*rs, false, "Running", format!("restoring {} component(s)", st.components.len())).await;
                Ok(Action::requeue(Duration::from_secs(1)))
            }
            Err(e) if e.is_retryable() => {
                st.phase = Some(RestorePhase::Pending);
                st.message = Some(e.to_string());
                apply_status(&api, &*rs, serde_json::to_value(&st)?).await?;
                // The error policy backs off (exponentially, bounded).
                Err(e)
            }
            Err(e) => {
                delete_helper(&ctx, &rs).await?;
                st.phase = Some(RestorePhase::Invalid);
                st.message = Some(e.to_string());
                apply_status(&api, &*rs, serde_json::to_value(&st)?).await?;
                ctx.metrics.restore_phase("Invalid");
                ctx.event(&*rs, true, "Invalid", e.to_string()).await;
                Ok(Action::await_change())
            }
        };
    }
    let uid = rs.uid().unwrap_or_default();
    // Fold results.
    let mut transitions = Vec::new();
    for (comp, c) in st.components.iter_mut() {
        let oid = order_id(&uid, comp);
        let Some(state) = ctx.orders.state(&oid) else { continue };
        if let Some(p) = state.terminal() {
            if p.phase == Phase::Done as i32 {
                let stats = p.result.as_ref().and_then(|r| r.stats).unwrap_or_default();
                c.phase = Some(ComponentPhase::Succeeded);
                c.size = Some(stats.bytes_restored);
                c.duration = Some(format!("{:.1}s", stats.duration_ms as f64 / 1000.0));
                c.warnings = p.result.iter().flat_map(|r| r.failed_files.iter().take(10).cloned()).collect();
            } else {
                c.phase = Some(ComponentPhase::Failed);
                c.error = Some(if p.error.is_empty() { "the order failed".into() } else { p.error.clone() });
            }
            c.progress = None;
            transitions.push(match c.phase {
                Some(ComponentPhase::Succeeded) => {
                    (false, "ComponentRestored", format!("{comp}: {} bytes", c.size.unwrap_or(0)))
                }
                _ => (true, "ComponentFailed", format!("{comp}: {}", c.error.as_deref().unwrap_or("failed"))),
            });
            ctx.orders.forget(&oid);
        } else if let Some(p) = &state.last {
            c.progress = Some(progress_of(p));
        }
    }
    for (warning, reason, note) in transitions {
        ctx.event(&*rs, warning, reason, note).await;
    }
    let timed_out = st.restore_deadline.as_deref().and_then(parse_time).is_some_and(|d| now > d);
    // Dispatch pending components (and re-attach orphans after a restart).
    let pending: Vec<String> = st
        .components
        .iter()
        .filter(|(comp, c)| {
            matches!(c.phase, Some(ComponentPhase::Pending) | Some(ComponentPhase::Running))
                && !ctx.orders.in_flight(&order_id(&uid, comp))
                && ctx.orders.state(&order_id(&uid, comp)).is_none()
        })
        .map(|(k, _)| k.clone())
        .collect();
    if !pending.is_empty() && !timed_out {
        dispatch(&ctx, &rs, &mut st, &pending).await?;
    }
    let phases: Vec<ComponentPhase> = st.components.values().filter_map(|c| c.phase).collect();
    let running = phases.iter().any(|p| matches!(p, ComponentPhase::Pending | ComponentPhase::Running));
    let finished = if timed_out {
        for comp in st.components.keys() {
            ctx.orders.cancel(&order_id(&uid, comp)).await;
        }
        Some((RestorePhase::Failed, "restoreTimeout exceeded".to_string()))
    } else if running {
        None
    } else if phases.iter().all(|p| *p == ComponentPhase::Succeeded) {
        Some((RestorePhase::Succeeded, "every component restored".to_string()))
    } else {
        Some((RestorePhase::Failed, "one or more components failed".to_string()))
    };
    if let Some((phase, msg)) = &finished {
        st.phase = Some(*phase);
        st.message = Some(msg.clone());
        let started = st.start_time.as_deref().and_then(parse_time).unwrap_or(now);
        st.duration = Some(format!("{:.1}s", (now - started).num_milliseconds() as f64 / 1000.0));
    }
    if finished.is_some() {
        delete_helper(&ctx, &rs).await?;
    }
    apply_status(&api, &*rs, serde_json::to_value(&st)?).await?;
    match finished {
        Some((phase, msg)) => {
            ctx.metrics.restore_phase(&format!("{phase:?}"));
            ctx.event(&*rs, phase != RestorePhase::Succeeded, &format!("{phase:?}"), msg).await;
            Ok(Action::await_change())
        }
        None => Ok(Action::requeue(crate::session::POLL)),
    }
}

/// A restore's live progress as status shows it.
pub(crate) fn progress_of(p: &hoard_api::agent::v1::Progress) -> hoard_api::crd::ComponentProgress {
    hoard_api::crd::ComponentProgress {
        files_done: p.files_done,
        files_total: p.files_total,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        bytes_uploaded: 0,
        bytes_per_second: p.rate_bytes_per_second.max(0.0) as u64,
        eta_seconds: (p.eta_seconds >= 0.0).then_some(p.eta_seconds as u64),
    }
}

/// The repository (checking multi-tenancy) and the Snapshot object the source names.
async fn source(ctx: &Context, rs: &RestoreSession) -> Result<(Repository, Snapshot)> {
    let ns = rs.namespace().unwrap_or_default();
    let ds = &rs.spec.data_source;
    if ds.repository.is_empty() {
        return Err(Error::invalid("dataSource", "name a repository (or a volumeSnapshot)"));
    }
    let src_ns = ds.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| ns.clone());
    let repo = Api::<Repository>::namespaced(ctx.client.clone(), &src_ns)
        .get_opt(&ds.repository)
        .await?
        .ok_or_else(|| Error::NotFound(format!("Repository {src_ns}/{}", ds.repository)))?;
    if src_ns != ns {
        // Reading another namespace's repository needs the repository's own consent (its
        // usage policy; none by default) and its storage's.
        let policy = repo.spec.usage_policy.clone().unwrap_or_default();
        repo::admits(ctx, &policy, &src_ns, &ns, &format!("Repository {src_ns}/{}", ds.repository)).await?;
        let sns = repo.spec.storage_ref.namespace_or(&src_ns).to_string();
        repo::storage_access(ctx, &sns, &repo.spec.storage_ref.name, &ns, "").await?;
    }
    let snaps: Api<Snapshot> = Api::namespaced(ctx.client.clone(), &src_ns);
    let snap = if ds.snapshot == "latest" {
        let lp = ListParams::default().labels(&format!("{REPOSITORY_LABEL}={}", ds.repository));
        let mut list: Vec<Snapshot> = snaps
            .list(&lp)
            .await?
            .items
            .into_iter()
            .filter(|s| s.status.as_ref().and_then(|s| s.phase) == Some(SnapshotPhase::Succeeded))
            .collect();
        list.sort_by_key(|s| s.status.as_ref().and_then(|s| s.snapshot_time.clone()));
        list.pop().ok_or_else(|| Error::NotFound(format!("a Succeeded snapshot of repository {}", ds.repository)))?
    } else {
        snaps
            .get_opt(&ds.snapshot)
            .await?
            .ok_or_else(|| Error::NotFound(format!("Snapshot {src_ns}/{}", ds.snapshot)))?
    };
    if snap.spec.repository != ds.repository {
        return Err(Error::invalid(
            "dataSource",
            format!("Snapshot {} is not of repository {}", snap.name_any(), ds.repository),
        ));
    }
    Ok((repo, snap))
}

/// How often a restore waiting for its helper pod looks again.
pub const HELPER_POLL: Duration = Duration::from_secs(2);

/// For a claim target that no running pod mounts: the helper pod that mounts it (created on the
/// first call). `None` when the claim is mounted (by a workload or the running helper), else
/// what the restore waits for.
async fn ensure_helper(ctx: &Context, rs: &RestoreSession, volume: &str) -> Result<Option<String>> {
    if rs.spec.target.kind != TargetKind::PersistentVolumeClaim {
        return Ok(None);
    }
    let ns = rs.namespace().unwrap_or_default();
    let (pods, _) = target_pods(ctx, &ns, &rs.spec.target).await?;
    if pods.iter().any(crate::target::pod_is_usable) {
        return Ok(None);
    }
    let name = helper::pod_name(&rs.name_any());
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(p) = api.get_opt(&name).await? {
        return match helper::state(&p) {
            HelperState::Running => Ok(None),
            HelperState::Waiting(m) => Ok(Some(m)),
            HelperState::Gone(m) => Err(Error::Transient(m)),
        };
    }
    if ctx.config.helper_image.is_empty() {
        return Err(Error::invalid(
            "target",
            format!("no running pod mounts claim {} and the controller has no --helper-image", rs.spec.target.name),
        ));
    }
    let claim = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&rs.spec.target.name)
        .await?
        .ok_or_else(|| Error::NotFound(format!("PersistentVolumeClaim {ns}/{}", rs.spec.target.name)))?;
    let pv = match claim.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|n| !n.is_empty()) {
        Some(n) => Api::<PersistentVolume>::all(ctx.client.clone()).get_opt(&n).await?,
        None => None,
    };
    let agents: Vec<String> = agent_endpoints(ctx).await?.into_keys().collect();
    let node = helper::node_for(&claim, pv.as_ref(), &agents).map_err(Error::Transient)?;
    let pod =
        helper::pod(rs, &name, &rs.spec.target.name, volume, &node, &ctx.config.helper_image, &ctx.config.helper_args)?;
    match api.create(&PostParams::default(), &pod).await {
        Ok(_) => {}
        Err(e) if is_conflict(&e) => {}
        Err(e) => return Err(e.into()),
    }
    ctx.event(rs, false, "HelperCreated", format!("pod {name} mounts claim {} on node {node}", rs.spec.target.name))
        .await;
    Ok(Some(format!("waiting for helper pod {name} on node {node}")))
}

/// Deletes the helper pod of a claim restore (if any).
async fn delete_helper(ctx: &Context, rs: &RestoreSession) -> Result<()> {
    if rs.spec.target.kind != TargetKind::PersistentVolumeClaim {
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &rs.namespace().unwrap_or_default());
    match api.delete(&helper::pod_name(&rs.name_any()), &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Resolves the source and the target; `Some(message)` while a helper pod is not running yet.
async fn start(
    ctx: &Context,
    rs: &RestoreSession,
    st: &mut RestoreSessionStatus,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<String>> {
    let (_, snap) = source(ctx, rs).await?;
    let ds = &rs.spec.data_source;
    let available = snap.status.clone().unwrap_or_default().components;
    let wanted: Vec<String> =
        if ds.components.is_empty() { available.keys().cloned().collect() } else { ds.components.clone() };
    let mut components = BTreeMap::new();
    for comp in &wanted {
        let c = available.get(comp).ok_or_else(|| {
            Error::invalid("components", format!("snapshot {} has no component {comp}", snap.name_any()))
        })?;
        if c.snapshot_id.is_none() {
            return Err(Error::invalid("components", format!("component {comp} has no repository snapshot")));
        }
        let volume = ds.volume_map.get(comp).cloned().or_else(|| c.volume.clone()).unwrap_or_else(|| comp.clone());
        components.insert(
            comp.clone(),
            ComponentStatus {
                phase: Some(ComponentPhase::Pending),
                volume: Some(volume),
                snapshot_id: c.snapshot_id.clone(),
                ..Default::default()
            },
        );
    }
    // A claim nobody mounts gets a helper pod first.
    let first = components.values().find_map(|c| c.volume.clone()).unwrap_or_else(|| "data".into());
    if let Some(waiting) = ensure_helper(ctx, rs, &first).await? {
        return Ok(Some(waiting));
    }
    // The target must have those volumes now (resolution errors surface before Running).
    let volumes: Vec<String> = components.values().filter_map(|c| c.volume.clone()).collect();
    resolve_target(ctx, &rs.namespace().unwrap_or_default(), &rs.spec.target, &volumes).await?;
    st.phase = Some(RestorePhase::Running);
    st.target_found = Some(true);
    st.snapshot = Some(snap.name_any());
    st.start_time = Some(fmt_time(now));
    st.restore_deadline = rs
        .spec
        .restore_timeout
        .as_deref()
        .and_then(parse_duration)
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .map(|d| fmt_time(now + d));
    st.total_components = Some(components.len() as u32);
    st.components = components;
    st.message = None;
    Ok(None)
}

async fn dispatch(ctx: &Context, rs: &RestoreSession, st: &mut RestoreSessionStatus, pending: &[String]) -> Result<()> {
    let ns = rs.namespace().unwrap_or_default();
    let uid = rs.uid().unwrap_or_default();
    let (repo, _) = source(ctx, rs).await?;
    let access = repo::access(ctx, &repo).await?;
    let wanted: Vec<String> = st.components.values().filter_map(|c| c.volume.clone()).collect();
    let volumes = resolve_target(ctx, &ns, &rs.spec.target, &wanted).await?;
    let agents = agent_endpoints(ctx).await?;
    let ds = &rs.spec.data_source;
    // Restores share the per-node cap with backups: a node's agent is never sent more than
    // `--max-orders-per-node` orders by this controller, whatever their kind.
    let full_metadata = full_metadata_allowed(ctx, &ns).await?;
    let mut load = ctx.orders.load();
    for comp in pending {
        let Some(c) = st.components.get_mut(comp) else { continue };
        // Running here means re-attaching after a controller restart: the agent already holds
        // that order's slot, so it takes none.
        let reattach = c.phase == Some(ComponentPhase::Running);
        let want = c.volume.clone().unwrap_or_default();
        let Some(vol) = volumes.iter().find(|v| v.identity.volume_name == want) else {
            c.phase = Some(ComponentPhase::Failed);
            c.error = Some(format!("the target has no running pod with volume {want}"));
            continue;
        };
        let Some(addr) = agents.get(vol.node()) else {
            // Not fatal yet: the agent may be starting.
            c.error = Some(format!("no Ready hoard agent on node {}", vol.node()));
            continue;
        };
        if !crate::session::take_slot(&mut load, vol.node(), ctx.config.max_orders_per_node, reattach) {
            let cap = ctx.config.max_orders_per_node;
            c.error =
                Some(format!("waiting: node {} has {cap} order(s) in flight (--max-orders-per-node)", vol.node()));
            continue;
        }
        let order = RestoreOrder {
            order_id: order_id(&uid, comp),
            volume: Some(vol.identity.clone()),
            repository: Some(access.message()),
            snapshot: c.snapshot_id.clone().unwrap_or_default(),
            component: comp.clone(),
            includes: ds.include.clone(),
            excludes: ds.exclude.clone(),
            overwrite: hoard_api::agent::v1::Overwrite::from(rs.spec.overwrite) as i32,
            full_metadata,
        };
        ctx.orders.start(vol.node(), addr, Order::Restore(order));
        c.phase = Some(ComponentPhase::Running);
        c.node = Some(vol.node().to_string());
        c.pod = Some(vol.identity.pod_name.clone());
        c.attempts = 1;
        c.error = None;
    }
    Ok(())
}

/// Whether an administrator labelled namespace `ns` with `hoard.dev/restore-metadata=full`.
pub(crate) async fn full_metadata_allowed(ctx: &Context, ns: &str) -> Result<bool> {
    let namespace = Api::<Namespace>::all(ctx.client.clone()).get_opt(ns).await?;
    Ok(namespace
        .and_then(|n| n.metadata.labels)
        .is_some_and(|l| l.get(RESTORE_METADATA_LABEL).is_some_and(|v| v == "full")))
}

/// Bound on a restore from a VolumeSnapshot without `restoreTimeout`.
const SNAPSHOT_RESTORE_TIMEOUT: Duration = Duration::from_secs(600);

/// Restore from a VolumeSnapshot. Into a new claim, the target: the CSI driver fills it from
/// the snapshot; hoard creates the claim (size, storage class and access modes of the
/// snapshot's source claim unless `spec.claim` says otherwise) and waits until it is bound. No
/// agent takes part. The claim outlives the RestoreSession (no owner reference); a restarted
/// controller recognises it by its `dataSource` and label. Into a claim that exists: a clone
/// and an agent's copy ([`restore_copy`]). Waiting is bounded by `restoreTimeout` (default
/// [`SNAPSHOT_RESTORE_TIMEOUT`]); the copy itself only by an explicit `restoreTimeout`.
async fn from_volume_snapshot(
    ctx: &Context,
    rs: &RestoreSession,
    api: &Api<RestoreSession>,
    mut st: RestoreSessionStatus,
    vs_name: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Action> {
    let started = st.start_time.as_deref().and_then(parse_time).unwrap_or(now);
    let explicit = rs.spec.restore_timeout.as_deref().and_then(parse_duration);
    let timeout = explicit.unwrap_or(SNAPSHOT_RESTORE_TIMEOUT);
    let deadline = started + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    st.start_time = Some(fmt_time(started));
    st.restore_deadline = Some(fmt_time(deadline));
    let claim = rs.spec.target.name.clone();
    let copying = st.components.get(&claim).is_some_and(|c| c.phase == Some(ComponentPhase::Running));
    let step = snapshot_restore_step(ctx, rs, vs_name, deadline, copying).await;
    let mut finish_with = |c: ComponentStatus| {
        st.components = [(claim.clone(), c)].into();
        st.total_components = Some(1);
    };
    let (phase, msg) = match step {
        Ok(SnapshotRestore::Bound(from)) => {
            finish_with(ComponentStatus {
                phase: Some(ComponentPhase::Succeeded),
                claim: Some(claim.clone()),
                read_from: Some(hoard_api::crd::ReadFrom::VolumeSnapshot),
                volume_snapshot: Some(from),
                ..Default::default()
            });
            (RestorePhase::Succeeded, format!("claim {claim} restored from VolumeSnapshot {vs_name}"))
        }
        Ok(SnapshotRestore::Copy(CopyStep::Done(c))) => {
            let size = c.size.unwrap_or(0);
            finish_with(c);
            (RestorePhase::Succeeded, format!("VolumeSnapshot {vs_name} copied into claim {claim} ({size} bytes)"))
        }
        Ok(SnapshotRestore::Copy(CopyStep::Copying(_))) if explicit.is_some() && now > deadline => (
            RestorePhase::Failed,
            format!("copying VolumeSnapshot {vs_name} into claim {claim}: restoreTimeout exceeded"),
        ),
        Ok(SnapshotRestore::Copy(CopyStep::Copying(c))) => {
            let node = c.node.clone().unwrap_or_default();
            finish_with(c);
            (RestorePhase::Running, format!("copying VolumeSnapshot {vs_name} into claim {claim} on node {node}"))
        }
        Ok(SnapshotRestore::Copy(CopyStep::Failed(m))) => (RestorePhase::Failed, m),
        Ok(SnapshotRestore::Waiting(m) | SnapshotRestore::Copy(CopyStep::Waiting(m))) if now > deadline => {
            (RestorePhase::Failed, format!("{m}: not done within the restoreTimeout"))
        }
        Ok(SnapshotRestore::Waiting(m) | SnapshotRestore::Copy(CopyStep::Waiting(m))) => (RestorePhase::Running, m),
        Err(e) if e.is_retryable() && now <= deadline => (RestorePhase::Running, e.to_string()),
        Err(e) if e.is_retryable() => (RestorePhase::Failed, format!("{e}: not done within the restoreTimeout")),
        Err(e) => (RestorePhase::Invalid, e.to_string()),
    };
    let first = st.phase.is_none();
    st.phase = Some(phase);
    st.target_found = Some(true);
    st.message = Some(msg.clone());
    if phase.is_finished() {
        st.duration = Some(format!("{:.1}s", (now - started).num_milliseconds() as f64 / 1000.0));
        if let Some(c) = st.components.get_mut(&claim).filter(|c| c.phase == Some(ComponentPhase::Running)) {
            c.phase = Some(ComponentPhase::Failed);
            c.error = Some(msg.clone());
            c.progress = None;
        }
        // The clone and exposer of a copy (none for a new claim), and an import.
        restore_copy::cleanup(ctx, rs).await?;
        restore_import::cleanup(ctx, rs).await?;
    }
    apply_status(api, rs, serde_json::to_value(&st)?).await?;
    if first {
        ctx.metrics.restore_phase("Running");
        ctx.event(rs, false, "Running", format!("restoring claim {claim} from VolumeSnapshot {vs_name}")).await;
    }
    if phase.is_finished() {
        ctx.metrics.restore_phase(&format!("{phase:?}"));
        ctx.event(rs, phase != RestorePhase::Succeeded, &format!("{phase:?}"), msg).await;
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs(2)))
}

enum SnapshotRestore {
    Waiting(String),
    Bound(hoard_api::crd::VolumeSnapshotSource),
    Copy(CopyStep),
}

async fn snapshot_restore_step(
    ctx: &Context,
    rs: &RestoreSession,
    vs_name: &str,
    deadline: chrono::DateTime<chrono::Utc>,
    copying: bool,
) -> Result<SnapshotRestore> {
    use hoard_csi::objects::{claim_from_snapshot_sized, label_value, restored_from, too_small_for};
    use hoard_csi::types::VolumeSnapshot;

    let ns = rs.namespace().unwrap_or_default();
    let ds = &rs.spec.data_source;
    if rs.spec.target.kind != TargetKind::PersistentVolumeClaim {
        return Err(Error::invalid(
            "target",
            "a VolumeSnapshot restores into a claim: target.kind must be PersistentVolumeClaim",
        ));
    }
    if !ds.repository.is_empty() {
        return Err(Error::invalid("dataSource", "name either a repository or a volumeSnapshot, not both"));
    }
    // From another namespace: through a local import of it (with the source's consent).
    let src_ns = ds.namespace.as_deref().filter(|n| !n.is_empty() && *n != ns);
    let (vs_name, imported_from) = match src_ns {
        Some(src_ns) => match restore_import::step(ctx, rs, src_ns, vs_name).await? {
            restore_import::Import::Waiting(m) => return Ok(SnapshotRestore::Waiting(m)),
            restore_import::Import::Ready { local, source } => (local, Some(source)),
        },
        None => (vs_name.to_string(), None),
    };
    let vs_name = vs_name.as_str();
    let snapshots: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let target = &rs.spec.target.name;
    let vs = snapshots
        .get_opt(vs_name)
        .await?
        .ok_or_else(|| Error::invalid("dataSource", format!("VolumeSnapshot {ns}/{vs_name} does not exist")))?;
    // What the restore came from: the source, not its import; and the claim it was cut from
    // (size, storage class and access modes of a new claim or clone), if it still exists.
    let original = imported_from.as_deref().unwrap_or(&vs);
    let from = crate::reconcile::snapshots::provenance_of(original);
    let source = match original.spec.source.persistent_volume_claim_name.as_deref() {
        Some(c) => {
            let src_ns = original.metadata.namespace.as_deref().unwrap_or(&ns);
            Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), src_ns).get_opt(c).await?
        }
        None => None,
    };
    if let Some(existing) = claims.get_opt(target).await? {
        let ours = existing.labels().get(helper::HELPER_LABEL).is_some_and(|l| *l == label_value(&rs.name_any()));
        if !(ours && restored_from(&existing, vs_name)) {
            let copy = restore_copy::step(ctx, rs, &vs, source.as_ref(), &existing, deadline, copying).await?;
            return Ok(SnapshotRestore::Copy(copy));
        }
        return Ok(match existing.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Bound") => SnapshotRestore::Bound(from),
            Some("Lost") => return Err(Error::invalid("target", format!("claim {target} lost its volume"))),
            _ => SnapshotRestore::Waiting(format!("waiting for claim {target} to be bound")),
        });
    }
    if vs.metadata.deletion_timestamp.is_some() {
        return Err(Error::invalid("dataSource", format!("VolumeSnapshot {vs_name} is being deleted")));
    }
    if !vs.ready() {
        let why = vs.error_message().map(|e| format!(": {e}")).unwrap_or_default();
        return Ok(SnapshotRestore::Waiting(format!("VolumeSnapshot {vs_name} is not ready to use{why}")));
    }
    let overrides = rs.spec.claim.clone().unwrap_or_default();
    if let Some(needs) = overrides.size.as_deref().and_then(|s| too_small_for(s, &vs)) {
        return Err(Error::invalid(
            "claim.size",
            format!(
                "{} is smaller than VolumeSnapshot {vs_name}'s restore size {needs}",
                overrides.size.unwrap_or_default()
            ),
        ));
    }
    let modes = if overrides.access_modes.is_empty() {
        source.as_ref().and_then(|c| c.spec.as_ref()).and_then(|s| s.access_modes.clone())
    } else {
        Some(overrides.access_modes.iter().map(|m| m.as_str().to_string()).collect())
    };
    let mut pvc = claim_from_snapshot_sized(
        target,
        &vs,
        source.as_ref(),
        overrides.size.as_deref(),
        overrides.storage_class_name.as_deref(),
        modes.as_deref(),
    )?;
    pvc.metadata.labels = Some([(helper::HELPER_LABEL.to_string(), label_value(&rs.name_any()))].into());
    crate::reconcile::snapshots::create(&claims, &pvc).await?;
    ctx.event(rs, false, "ClaimCreated", format!("claim {target} from VolumeSnapshot {vs_name}")).await;
    Ok(SnapshotRestore::Waiting(format!("claim {target} created from VolumeSnapshot {vs_name}")))
}
