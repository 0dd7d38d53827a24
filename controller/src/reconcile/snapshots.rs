//! The snapshot path's shell. For each component of a BackupSession that is read through an
//! exposer pod — a clone of a CSI VolumeSnapshot, or a claim no pod mounts — it fetches what
//! exists, asks [`hoard_csi::plan::next`] for the next step and takes it; at the session's end
//! [`cleanup`] deletes every object the path created. All objects have fixed names and the
//! session's label, so a restarted controller continues where it was.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hoard_api::agent::v1::{PersistentVolumeSource, VolumeIdentity, volume_identity::Source};
use hoard_api::crd::{BackupSession, ReadFrom, SnapshotFallback, VolumeSnapshotPolicy, VolumeSnapshotSource};
use hoard_csi::class::select_class;
use hoard_csi::exposer::{self, ExposerSpec};
use hoard_csi::keep;
use hoard_csi::objects::{self, EXPOSED_VOLUME};
use hoard_csi::plan::{self, Observed, Step};
use hoard_csi::types::{VolumeSnapshot, VolumeSnapshotClass};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};

use crate::Context;
use crate::error::{Error, Result, is_conflict, is_not_found};
use crate::reconcile::agent_endpoints;
use crate::target::pv_plugin;

/// Default bound on snapshot + clone + exposer (`volumeSnapshot.readyTimeout`).
pub const DEFAULT_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// One component read through an exposer.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub component: String,
    /// The source claim.
    pub claim: String,
    pub read_from: ReadFrom,
}

/// Where a component's volume stands this pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    Waiting(String),
    Ready {
        identity: VolumeIdentity,
        provenance: Option<VolumeSnapshotSource>,
    },
    /// Snapshot-only: the VolumeSnapshot is ready, and it is the backup.
    SnapshotReady(VolumeSnapshotSource),
    /// Cannot be read this way; the component fails for good.
    Failed(String),
    /// No class could be chosen and the policy falls back to the live mount (the message says why).
    Live(String),
}

/// Takes one step for each of `wanted` and says where each stands.
pub async fn prepare(
    ctx: &Context,
    bs: &BackupSession,
    policy: Option<&VolumeSnapshotPolicy>,
    wanted: &[Wanted],
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<BTreeMap<String, Prepared>> {
    let mut out = BTreeMap::new();
    let mut classes: Option<Vec<VolumeSnapshotClass>> = None;
    for w in wanted {
        let p = match prepare_one(ctx, bs, policy, w, &mut classes, deadline, now).await {
            Ok(p) => p,
            Err(e) if e.is_retryable() => Prepared::Waiting(e.to_string()),
            Err(e) => Prepared::Failed(e.to_string()),
        };
        out.insert(w.component.clone(), p);
    }
    Ok(out)
}

async fn prepare_one(
    ctx: &Context,
    bs: &BackupSession,
    policy: Option<&VolumeSnapshotPolicy>,
    w: &Wanted,
    classes: &mut Option<Vec<VolumeSnapshotClass>>,
    deadline: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Prepared> {
    let ns = bs.namespace().unwrap_or_default();
    let name = objects::object_name(&bs.name_any(), &w.component);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let snapshots: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);

    let source_claim = claims
        .get_opt(&w.claim)
        .await?
        .ok_or_else(|| Error::invalid("target", format!("PersistentVolumeClaim {} does not exist", w.claim)))?;
    let source_pv = bound_pv(&pvs, &source_claim).await?;
    let source = match w.read_from {
        ReadFrom::VolumeSnapshot if policy.is_some_and(|p| !p.upload) => plan::Source::SnapshotOnly,
        ReadFrom::VolumeSnapshot => plan::Source::Snapshot,
        _ => plan::Source::Claim,
    };
    let (snapshot, clone) = match source {
        plan::Source::Snapshot => (snapshots.get_opt(&name).await?, claims.get_opt(&name).await?),
        plan::Source::SnapshotOnly => (snapshots.get_opt(&name).await?, None),
        plan::Source::Claim => (None, None),
    };
    let pod = pods.get_opt(&name).await?;
    let seen = Observed { snapshot: snapshot.as_ref(), clone: clone.as_ref(), exposer: pod.as_ref() };
    let owned = |m: &kube::api::ObjectMeta| owned_by(m, bs);
    if [snapshot.as_ref().map(|s| &s.metadata), clone.as_ref().map(|c| &c.metadata), pod.as_ref().map(|p| &p.metadata)]
        .into_iter()
        .flatten()
        .any(|m| !owned(m))
    {
        return Err(Error::invalid(
            "volumeSnapshot",
            format!("an object named {name} exists and is not this session's"),
        ));
    }
    match plan::next(&source, seen, deadline, now) {
        Step::CreateSnapshot => {
            let driver = match source_pv.spec.as_ref().and_then(|s| s.csi.as_ref()) {
                Some(csi) => csi.driver.clone(),
                None => {
                    return Ok(Prepared::Failed(format!("claim {} is not a CSI volume: no VolumeSnapshot", w.claim)));
                }
            };
            let listed = match classes {
                Some(c) => c,
                None => classes.insert(
                    Api::<VolumeSnapshotClass>::all(ctx.client.clone()).list(&ListParams::default()).await?.items,
                ),
            };
            let explicit = policy.and_then(|p| {
                let volume = w.component.as_str();
                p.volume_classes.get(volume).or(p.class_name.as_ref()).map(String::as_str)
            });
            let class = match select_class(explicit, &driver, listed) {
                Ok(c) => c,
                Err(e) if e.is_retryable() && now <= deadline => return Ok(Prepared::Waiting(e.to_string())),
                Err(e) if policy.is_some_and(|p| p.fallback == SnapshotFallback::Live) => {
                    return Ok(Prepared::Live(format!("read live: {e}")));
                }
                Err(e) => return Ok(Prepared::Failed(e.to_string())),
            };
            let vs = objects::volume_snapshot(bs, &w.component, &w.claim, &class);
            create(&snapshots, &vs).await?;
            ctx.event(bs, false, "VolumeSnapshotCreated", format!("{name} of claim {} (class {class})", w.claim)).await;
            Ok(Prepared::Waiting(format!("VolumeSnapshot {name} created")))
        }
        Step::CreateClone => {
            let Some(vs) = &snapshot else { return Ok(Prepared::Waiting("snapshot gone".into())) };
            let storage_class = policy.and_then(|p| p.storage_class_name.as_deref());
            let pvc = objects::clone_claim(bs, &w.component, &source_claim, vs, storage_class)?;
            create(&claims, &pvc).await?;
            Ok(Prepared::Waiting(format!("clone claim {name} created")))
        }
        Step::CreateExposer => {
            if ctx.config.helper_image.is_empty() {
                return Ok(Prepared::Failed("the controller has no --helper-image for the exposer pod".into()));
            }
            let (claim_name, claim_obj, pv) = match &clone {
                Some(c) => (name.clone(), c, bound_pv(&pvs, c).await.ok()),
                None => (w.claim.clone(), &source_claim, Some(source_pv.clone())),
            };
            let agents: Vec<String> = agent_endpoints(ctx).await?.into_keys().collect();
            let node = exposer::node_for(claim_obj, pv.as_ref(), &agents).map_err(Error::Transient)?;
            let spec = ExposerSpec {
                name: &name,
                claim: &claim_name,
                volume: EXPOSED_VOLUME,
                node: &node,
                image: &ctx.config.helper_image,
                args: &ctx.config.helper_args,
                read_only: true,
                labels: objects::labels(&bs.name_any(), &w.component),
                target: None,
            };
            create(&pods, &exposer::pod(bs, &spec)?).await?;
            Ok(Prepared::Waiting(format!("exposer pod {name} created on node {node}")))
        }
        Step::SnapshotReady => {
            let Some(vs) = &snapshot else { return Ok(Prepared::Waiting("snapshot gone".into())) };
            Ok(Prepared::SnapshotReady(provenance_of(vs)))
        }
        Step::Wait(m) => Ok(Prepared::Waiting(m)),
        Step::Fail(m) => Ok(Prepared::Failed(m)),
        Step::Ready(e) => {
            let exposed_claim = clone.as_ref().unwrap_or(&source_claim);
            let identity = exposed_identity(&pvs, &ns, exposed_claim, e, EXPOSED_VOLUME).await?;
            let provenance = snapshot.as_ref().map(provenance_of);
            Ok(Prepared::Ready { identity, provenance })
        }
    }
}

/// The work-order identity of volume `volume` of an exposer pod that mounts `claim`.
pub async fn exposed_identity(
    pvs: &Api<PersistentVolume>,
    ns: &str,
    claim: &PersistentVolumeClaim,
    e: plan::Exposed,
    volume: &str,
) -> Result<VolumeIdentity> {
    let pv = bound_pv(pvs, claim).await?;
    let plugin = pv_plugin(&pv)
        .ok_or_else(|| Error::invalid("volume", format!("claim {} has a type hoard cannot read", e.claim)))?;
    Ok(VolumeIdentity {
        node_name: e.node,
        pod_uid: e.pod_uid,
        volume_name: volume.into(),
        namespace: ns.to_string(),
        pod_name: e.pod_name,
        source: Some(Source::Pvc(PersistentVolumeSource {
            claim_name: e.claim,
            pv_name: pv.name_any(),
            plugin: Some(plugin),
        })),
    })
}

/// What a component (or a restore) records of the VolumeSnapshot it came from.
pub fn provenance_of(vs: &VolumeSnapshot) -> VolumeSnapshotSource {
    VolumeSnapshotSource {
        name: vs.name_any(),
        class_name: vs.spec.volume_snapshot_class_name.clone(),
        creation_time: vs.status.as_ref().and_then(|s| s.creation_time.clone()),
        kept: false,
    }
}

/// The PersistentVolume `claim` is bound to (retryable while unbound).
pub async fn bound_pv(pvs: &Api<PersistentVolume>, claim: &PersistentVolumeClaim) -> Result<PersistentVolume> {
    let pv_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::Transient(format!("claim {} is not bound yet", claim.name_any())))?;
    pvs.get_opt(&pv_name).await?.ok_or_else(|| Error::Transient(format!("PersistentVolume {pv_name} not found")))
}

/// Whether `owner` is the controller owner of the object with `meta`.
pub fn owned_by<O: Resource>(meta: &kube::api::ObjectMeta, owner: &O) -> bool {
    let uid = owner.meta().uid.as_deref().unwrap_or_default();
    meta.owner_references.iter().flatten().any(|o| o.uid == uid && o.controller == Some(true))
}

/// Creates `obj`; one that exists already (an earlier pass, before a restart) is fine.
pub async fn create<K>(api: &Api<K>, obj: &K) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(e) if is_conflict(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes every exposer pod, clone claim and VolumeSnapshot this session created (found by its
/// label, deleted only when it is owned by this session). Idempotent.
pub async fn cleanup(ctx: &Context, bs: &BackupSession) -> Result<usize> {
    let ns = bs.namespace().unwrap_or_default();
    let lp = ListParams::default().labels(&objects::session_selector(&bs.name_any()));
    let mut deleted = 0;
    deleted += delete_owned(&Api::<Pod>::namespaced(ctx.client.clone(), &ns), &lp, bs).await?;
    deleted += delete_owned(&Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns), &lp, bs).await?;
    deleted += delete_owned(&Api::<VolumeSnapshot>::namespaced(ctx.client.clone(), &ns), &lp, bs).await?;
    Ok(deleted)
}

/// Deletes the objects `lp` selects that `owner` controls; returns how many.
pub async fn delete_owned<K, O>(api: &Api<K>, lp: &ListParams, owner: &O) -> Result<usize>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    O: Resource,
{
    let items = match api.list(lp).await {
        Ok(l) => l.items,
        // No such resource (the snapshot CRDs are not installed): nothing of it to delete.
        Err(e) if is_not_found(&e) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut n = 0;
    for obj in items {
        if !owned_by(obj.meta(), owner) || obj.meta().deletion_timestamp.is_some() {
            continue;
        }
        match api.delete(obj.meta().name.as_deref().unwrap_or_default(), &DeleteParams::background()).await {
            Ok(_) => n += 1,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// Keeps the VolumeSnapshots of `components` (this session's, by fixed name) in `group`: the
/// session's owner reference is replaced by `owners` (the Snapshot objects that describe them),
/// so neither [`cleanup`] nor the garbage collector deletes them with the session, while the
/// garbage collector deletes one once every Snapshot object describing it is gone. Labels them
/// kept. Idempotent; returns the names kept.
pub async fn keep(
    ctx: &Context,
    bs: &BackupSession,
    group: &str,
    components: &[String],
    owners: &[OwnerReference],
) -> Result<Vec<String>> {
    let ns = bs.namespace().unwrap_or_default();
    let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut kept = Vec::new();
    for component in components {
        let name = objects::object_name(&bs.name_any(), component);
        let Some(vs) = api.get_opt(&name).await? else { continue };
        let already = vs.labels().get(keep::KEPT_LABEL).is_some_and(|g| g == group);
        if !already && !owned_by(&vs.metadata, bs) {
            continue;
        }
        if !already || vs.metadata.owner_references.as_deref().unwrap_or_default() != owners {
            // A merge patch replaces ownerReferences as a whole: the session's goes.
            let patch = serde_json::json!({
                "metadata": {"ownerReferences": owners, "labels": keep::kept_labels(group)}
            });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        }
        kept.push(name);
    }
    Ok(kept)
}

/// Deletes the kept VolumeSnapshots of `group` beyond the newest `keep_last` per volume, and
/// returns their names.
pub async fn retain_kept(ctx: &Context, ns: &str, group: &str, keep_last: u32) -> Result<Vec<String>> {
    let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), ns);
    let listed = api.list(&ListParams::default().labels(&format!("{}={group}", keep::KEPT_LABEL))).await?.items;
    let doomed = keep::to_delete(&listed, group, keep_last);
    for name in &doomed {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(doomed)
}
