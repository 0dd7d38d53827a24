//! A RestoreSession from a CSI VolumeSnapshot into a claim that exists already. The CSI driver
//! can fill only new claims, so the snapshot is cloned into a temporary claim, an exposer pod
//! mounts the clone read-only — and the target claim too when no running pod mounts it — on one
//! node, and that node's agent copies the clone into the target (a copy order: no repository,
//! the agent's overwrite and confinement rules).
//!
//! Guarantees: the clone and the exposer have fixed names, the `hoard.dev/restore-session`
//! label and the RestoreSession as controller owner, so a restarted controller continues (the
//! copy order's id is the agent's idempotency key) and [`cleanup`] finds them; the session
//! deletes them when it ends, the garbage collector when the session is deleted. Every wait
//! before the copy is bounded by the caller's deadline ([`hoard_csi::plan::next`]).

use hoard_api::agent::v1::{CopyOrder, Phase};
use hoard_api::crd::{ComponentPhase, ComponentStatus, ReadFrom, RestoreSession};
use hoard_csi::exposer::{self, ExposerSpec};
use hoard_csi::objects;
use hoard_csi::plan::{self, Observed, Step};
use hoard_csi::types::VolumeSnapshot;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};

use crate::Context;
use crate::error::{Error, Result};
use crate::helper::{self, HELPER_LABEL};
use crate::orders::Order;
use crate::reconcile::snapshots::{bound_pv, create, delete_owned, exposed_identity, owned_by, provenance_of};
use crate::reconcile::{agent_endpoints, resolve_target, target_pods};

/// The exposer's pod volume of the clone (read).
pub const SOURCE_VOLUME: &str = "source";
/// The exposer's pod volume of the target claim (written), when it mounts it.
pub const TARGET_VOLUME: &str = "target";

/// Where the copy stands.
#[derive(Debug, Clone, PartialEq)]
pub enum CopyStep {
    /// Before the copy (clone, exposer, agent slot): bounded by the caller's deadline.
    Waiting(String),
    /// The agent copies; the component says where.
    Copying(ComponentStatus),
    Done(ComponentStatus),
    Failed(String),
}

/// The clone claim's name for RestoreSession `rs`: `hoard-restore-<rs>-source`, at most 63
/// characters.
pub fn clone_name(rs: &str) -> String {
    objects::object_name(&format!("restore-{rs}"), SOURCE_VOLUME)
}

fn order_id(rs: &RestoreSession, claim: &str) -> String {
    format!("{}/copy/{claim}", rs.uid().unwrap_or_default())
}

/// Gets `name`; an object of that name the session does not own is refused, never used.
pub(crate) async fn get_owned<K>(api: &Api<K>, name: &str, rs: &RestoreSession, what: &str) -> Result<Option<K>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await? {
        Some(o) if !owned_by(o.meta(), rs) => {
            Err(Error::invalid("target", format!("{what} {name} exists and is not this restore's")))
        }
        o => Ok(o),
    }
}

/// Takes the next step of copying VolumeSnapshot `vs` (cut from claim `source`, if that still
/// exists) into the existing claim `target`. `copying` says the status already shows the copy
/// running (it holds its agent slot).
pub async fn step(
    ctx: &Context,
    rs: &RestoreSession,
    vs: &VolumeSnapshot,
    source: Option<&PersistentVolumeClaim>,
    target: &PersistentVolumeClaim,
    deadline: chrono::DateTime<chrono::Utc>,
    copying: bool,
) -> Result<CopyStep> {
    let ns = rs.namespace().unwrap_or_default();
    let rs_name = rs.name_any();
    let target_name = target.name_any();
    if rs.spec.claim.is_some() {
        return Err(Error::invalid(
            "claim",
            format!("size, storage class and access modes are for a new claim; claim {target_name} exists"),
        ));
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let clone_name = clone_name(&rs_name);
    let pod_name = helper::pod_name(&rs_name);
    let clone = get_owned(&claims, &clone_name, rs, "claim").await?;
    let pod = get_owned(&pods, &pod_name, rs, "pod").await?;
    let seen = Observed { snapshot: Some(vs), clone: clone.as_ref(), exposer: pod.as_ref() };
    let labels = [(HELPER_LABEL.to_string(), objects::label_value(&rs_name))];
    match plan::next(&plan::Source::Snapshot, seen, deadline, ctx.now()) {
        Step::CreateSnapshot | Step::SnapshotReady => Ok(CopyStep::Failed("VolumeSnapshot not seen".into())),
        Step::Wait(m) => Ok(CopyStep::Waiting(m)),
        Step::Fail(m) => Ok(CopyStep::Failed(m)),
        Step::CreateClone => {
            let mut pvc = objects::claim_from_snapshot(&clone_name, vs, source, None, None)?;
            pvc.metadata.labels = Some(labels.into());
            pvc.metadata.owner_references = rs.controller_owner_ref(&()).map(|o| vec![o]);
            create(&claims, &pvc).await?;
            Ok(CopyStep::Waiting(format!("clone claim {clone_name} created from VolumeSnapshot {}", vs.name_any())))
        }
        Step::CreateExposer => {
            if ctx.config.helper_image.is_empty() {
                return Ok(CopyStep::Failed("the controller has no --helper-image for the exposer pod".into()));
            }
            let (mounting, _) = target_pods(ctx, &ns, &rs.spec.target).await?;
            let workload_node = mounting
                .iter()
                .filter(|p| crate::target::pod_is_usable(p) && p.name_any() != pod_name)
                .find_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()));
            let agents: Vec<String> = agent_endpoints(ctx).await?.into_keys().collect();
            let node = match &workload_node {
                Some(n) => n.clone(),
                None => {
                    let pv = match target.spec.as_ref().and_then(|s| s.volume_name.as_deref()) {
                        Some(n) if !n.is_empty() => pvs.get_opt(n).await?,
                        _ => None,
                    };
                    exposer::node_for(target, pv.as_ref(), &agents).map_err(Error::Transient)?
                }
            };
            // The clone must be mountable where the target is.
            let clone = clone.as_ref().ok_or_else(|| Error::Transient("clone claim not seen".into()))?;
            let clone_pv = bound_pv(&pvs, clone).await?;
            if exposer::node_for(clone, Some(&clone_pv), std::slice::from_ref(&node)).is_err() {
                return Ok(CopyStep::Failed(format!(
                    "the clone of VolumeSnapshot {} cannot be mounted on node {node}, where claim {target_name} \
                     is: a copy needs both on one node",
                    vs.name_any()
                )));
            }
            let spec = ExposerSpec {
                name: &pod_name,
                claim: &clone_name,
                volume: SOURCE_VOLUME,
                node: &node,
                image: &ctx.config.helper_image,
                args: &ctx.config.helper_args,
                read_only: true,
                labels: labels.into(),
                target: workload_node.is_none().then_some((target_name.as_str(), TARGET_VOLUME)),
            };
            create(&pods, &exposer::pod(rs, &spec)?).await?;
            Ok(CopyStep::Waiting(format!("exposer pod {pod_name} created on node {node}")))
        }
        Step::Ready(e) => {
            let clone = clone.as_ref().ok_or_else(|| Error::Transient("clone claim not seen".into()))?;
            let node = e.node.clone();
            let mut component = ComponentStatus {
                phase: Some(ComponentPhase::Running),
                node: Some(node.clone()),
                pod: Some(e.pod_name.clone()),
                claim: Some(target_name.clone()),
                read_from: Some(ReadFrom::VolumeSnapshot),
                volume_snapshot: Some(provenance_of(vs)),
                attempts: 1,
                ..Default::default()
            };
            let oid = order_id(rs, &target_name);
            if let Some(state) = ctx.orders.state(&oid) {
                let Some(p) = state.terminal().cloned() else {
                    component.progress = state.last.as_ref().map(crate::reconcile::restore::progress_of);
                    return Ok(CopyStep::Copying(component));
                };
                ctx.orders.forget(&oid);
                if p.phase != Phase::Done as i32 {
                    let why = if p.error.is_empty() { "the copy order failed".to_string() } else { p.error };
                    return Ok(CopyStep::Failed(why));
                }
                let stats = p.result.as_ref().and_then(|r| r.stats).unwrap_or_default();
                component.phase = Some(ComponentPhase::Succeeded);
                component.size = Some(stats.bytes_restored);
                component.duration = Some(format!("{:.1}s", stats.duration_ms as f64 / 1000.0));
                return Ok(CopyStep::Done(component));
            }
            let source = exposed_identity(&pvs, &ns, clone, e, SOURCE_VOLUME).await?;
            let volumes = resolve_target(ctx, &ns, &rs.spec.target, &[]).await?;
            let Some(into) = volumes.iter().find(|v| v.node() == node) else {
                let elsewhere: Vec<&str> = volumes.iter().map(|v| v.node()).collect();
                return Ok(CopyStep::Failed(format!(
                    "claim {target_name} is mounted on node(s) {elsewhere:?}, the clone on node {node}: a copy \
                     needs both on one node"
                )));
            };
            let agents = agent_endpoints(ctx).await?;
            let Some(addr) = agents.get(&node) else {
                return Ok(CopyStep::Waiting(format!("no Ready hoard agent on node {node}")));
            };
            let mut load = ctx.orders.load();
            if !crate::session::take_slot(&mut load, &node, ctx.config.max_orders_per_node, copying) {
                let cap = ctx.config.max_orders_per_node;
                return Ok(CopyStep::Waiting(format!(
                    "waiting: node {node} has {cap} order(s) in flight (--max-orders-per-node)"
                )));
            }
            let order = CopyOrder {
                order_id: oid,
                source: Some(source),
                volume: Some(into.identity.clone()),
                overwrite: hoard_api::agent::v1::Overwrite::from(rs.spec.overwrite) as i32,
                full_metadata: crate::reconcile::restore::full_metadata_allowed(ctx, &ns).await?,
            };
            ctx.orders.start(&node, addr, Order::Copy(order));
            Ok(CopyStep::Copying(component))
        }
    }
}

/// Cancels the copy order (if one runs) and deletes the clone and exposer of `rs`. Idempotent.
pub async fn cleanup(ctx: &Context, rs: &RestoreSession) -> Result<usize> {
    ctx.orders.cancel(&order_id(rs, &rs.spec.target.name)).await;
    let ns = rs.namespace().unwrap_or_default();
    let lp = ListParams::default().labels(&format!("{HELPER_LABEL}={}", objects::label_value(&rs.name_any())));
    let mut deleted = delete_owned(&Api::<Pod>::namespaced(ctx.client.clone(), &ns), &lp, rs).await?;
    deleted += delete_owned(&Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns), &lp, rs).await?;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_names_are_fixed_and_short() {
        assert_eq!(clone_name("back"), "hoard-restore-back-source");
        let long = clone_name(&"r".repeat(200));
        assert!(long.len() <= 63, "{long}");
        assert_eq!(long, clone_name(&"r".repeat(200)));
    }
}
