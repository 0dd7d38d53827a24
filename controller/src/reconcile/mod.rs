//! The async shells: kube-rs `Controller`s that read the API, call the pure decision modules
//! and write status. [`run`] starts them all and returns when they stop (shutdown signal).

pub mod backup;
pub mod config;
pub mod repo;
pub mod restore;
pub mod restore_copy;
pub mod restore_import;
pub mod snapshots;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hoard_api::crd::{
    BackupConfiguration, BackupSession, BackupStorage, Repository, RestoreSession, Snapshot, TargetKind, TargetRef,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};

use crate::error::{Error, Result, is_not_found};
use crate::target::{TargetVolume, resolve, selector_string};
use crate::{Context, REPOSITORY_LABEL};

async fn get_named<K>(api: Api<K>, what: &str, name: &str) -> Result<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(o) => Ok(o),
        Err(e) if is_not_found(&e) => Err(Error::NotFound(format!("{what} {name}"))),
        Err(e) => Err(e.into()),
    }
}

fn workload_selector(sel: Option<LabelSelector>, what: &str) -> Result<String> {
    selector_string(&sel.ok_or_else(|| Error::invalid(what, "has no selector"))?)
}

/// The target's pods (all of them; [`resolve`] keeps the usable ones) and, for a claim target,
/// the claim name.
pub(crate) async fn target_pods(ctx: &Context, ns: &str, target: &TargetRef) -> Result<(Vec<Pod>, Option<String>)> {
    let c = ctx.client.clone();
    let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
    let what = format!("{} {}", target.kind.as_str(), target.name);
    let selector = match target.kind {
        TargetKind::Pod => return Ok((vec![get_named(pods, "Pod", &target.name).await?], None)),
        TargetKind::PersistentVolumeClaim => {
            // Any pod of the namespace that mounts the claim.
            let all = pods.list(&ListParams::default()).await?.items;
            let mounting =
                all.into_iter()
                    .filter(|p| {
                        p.spec.as_ref().is_some_and(|s| {
                            s.volumes.iter().flatten().any(|v| {
                                v.persistent_volume_claim.as_ref().is_some_and(|c| c.claim_name == target.name)
                            })
                        })
                    })
                    .collect();
            return Ok((mounting, Some(target.name.clone())));
        }
        TargetKind::Deployment => workload_selector(
            get_named(Api::<Deployment>::namespaced(c, ns), "Deployment", &target.name).await?.spec.map(|s| s.selector),
            &what,
        )?,
        TargetKind::StatefulSet => workload_selector(
            get_named(Api::<StatefulSet>::namespaced(c, ns), "StatefulSet", &target.name)
                .await?
                .spec
                .map(|s| s.selector),
            &what,
        )?,
        TargetKind::DaemonSet => workload_selector(
            get_named(Api::<DaemonSet>::namespaced(c, ns), "DaemonSet", &target.name).await?.spec.map(|s| s.selector),
            &what,
        )?,
        TargetKind::ReplicaSet => workload_selector(
            get_named(Api::<ReplicaSet>::namespaced(c, ns), "ReplicaSet", &target.name).await?.spec.map(|s| s.selector),
            &what,
        )?,
    };
    Ok((pods.list(&ListParams::default().labels(&selector)).await?.items, None))
}

/// Resolves a target to its volumes (see [`crate::target`]).
pub async fn resolve_target(
    ctx: &Context,
    ns: &str,
    target: &TargetRef,
    wanted: &[String],
) -> Result<Vec<TargetVolume>> {
    let (pods, only_claim) = target_pods(ctx, ns, target).await?;
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pvs_api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut claims = BTreeMap::new();
    let mut pvs = BTreeMap::new();
    for p in pods.iter().filter(|p| crate::target::pod_is_usable(p)) {
        for v in p.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let Some(c) = &v.persistent_volume_claim else { continue };
            if claims.contains_key(&c.claim_name) || (!wanted.is_empty() && !wanted.contains(&v.name)) {
                continue;
            }
            let claim = get_named(claims_api.clone(), "PersistentVolumeClaim", &c.claim_name).await?;
            if let Some(pv) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|n| !n.is_empty()) {
                pvs.insert(pv.clone(), get_named(pvs_api.clone(), "PersistentVolume", &pv).await?);
            }
            claims.insert(c.claim_name.clone(), claim);
        }
    }
    let volumes = resolve(&pods, &claims, &pvs, wanted, only_claim.as_deref())?;
    Ok(volumes)
}

/// Node name → agent address, from the agent pods in the controller's namespace.
pub async fn agent_endpoints(ctx: &Context) -> Result<BTreeMap<String, String>> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let pods = api.list(&ListParams::default().labels(&ctx.config.agent_selector)).await?.items;
    Ok(crate::agents::endpoints(&pods))
}

/// `<controller>/<namespace>/<name>`: the key of an object's failure count.
fn object_key<K: Resource>(controller: &str, obj: &K) -> String {
    format!(
        "{controller}/{}/{}",
        obj.meta().namespace.as_deref().unwrap_or(""),
        obj.meta().name.as_deref().unwrap_or("")
    )
}

fn error_policy<K: Resource>(name: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj, e, ctx| {
        let failures = ctx.failures.bump(&object_key(name, &*obj));
        let delay = e.backoff(failures);
        ctx.metrics.reconcile_error(name, e);
        tracing::warn!(controller = name, object = object_key(name, &*obj), failures, ?delay, "reconcile failed: {e}");
        Action::requeue(delay)
    }
}

/// Wraps a reconciler: counts passes (metric `reconciles_total`) and clears the object's
/// failure count after a pass that succeeded.
fn counted<K, F, Fut>(
    name: &'static str,
    f: F,
) -> impl Fn(Arc<K>, Arc<Context>) -> futures::future::BoxFuture<'static, Result<Action>>
where
    K: Resource + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Action>> + Send + 'static,
{
    let f = Arc::new(f);
    move |obj, ctx| {
        let f = Arc::clone(&f);
        Box::pin(async move {
            ctx.metrics.reconciled(name);
            let key = object_key(name, &*obj);
            let r = f(obj, Arc::clone(&ctx)).await;
            if r.is_ok() {
                ctx.failures.reset(&key);
            }
            r
        })
    }
}

/// What retriggers a spec-driven reconciler: the generation (spec changes), the deletion mark
/// and the finalizers. Status writes — including the controller's own — change none of them,
/// so they never retrigger (that was the hot loop: a status patch woke its own reconciler).
pub fn spec_fingerprint<K: Resource>(obj: &K) -> Option<u64> {
    let m = obj.meta();
    Some(hash_of(&(
        m.uid.as_deref(),
        m.generation,
        m.deletion_timestamp.as_ref().map(|t| t.0.as_second()),
        m.finalizers.as_ref(),
    )))
}

/// Spec fingerprint plus the phase: related objects (a configuration's sessions, a
/// repository's snapshots) retrigger their owner only when they change phase, not on every
/// progress write.
pub fn phase_fingerprint<K: Resource>(obj: &K, phase: Option<String>) -> Option<u64> {
    Some(hash_of(&(spec_fingerprint(obj), phase)))
}

fn hash_of<T: std::hash::Hash>(t: &T) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// A watch of `K` whose events trigger only when [`spec_fingerprint`] changes; the store sees
/// every event (reconcilers read current objects from it).
fn spec_stream<K>(api: Api<K>) -> (Store<K>, impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_fingerprint, PredicateConfig::default());
    (reader, stream)
}

/// Runs every reconciler until the process is told to stop.
pub async fn run(ctx: Arc<Context>) {
    let c = ctx.client.clone();
    let wc = watcher::Config::default();
    let cfg = ControllerConfig::default().concurrency(4);
    let session_phase =
        |s: &BackupSession| phase_fingerprint(s, s.status.as_ref().and_then(|st| st.phase).map(|p| format!("{p:?}")));
    let owned_sessions = watcher::watcher(Api::<BackupSession>::all(c.clone()), wc.clone())
        .default_backoff()
        .touched_objects()
        .predicate_filter(session_phase, PredicateConfig::default());
    let (store, stream) = spec_stream(Api::<BackupConfiguration>::all(c.clone()));
    let configs = Controller::for_stream(stream, store)
        .owns_stream(owned_sessions)
        .with_config(cfg.clone())
        .shutdown_on_signal()
        .run(counted("backupconfiguration", config::reconcile), error_policy("backupconfiguration"), Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = "backupconfiguration", "{e}");
            }
        });
    let (store, stream) = spec_stream(Api::<BackupSession>::all(c.clone()));
    let sessions = Controller::for_stream(stream, store)
        .with_config(cfg.clone())
        .shutdown_on_signal()
        .run(counted("backupsession", backup::reconcile), error_policy("backupsession"), Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = "backupsession", "{e}");
            }
        });
    let (store, stream) = spec_stream(Api::<RestoreSession>::all(c.clone()));
    let restores = Controller::for_stream(stream, store)
        .with_config(cfg.clone())
        .shutdown_on_signal()
        .run(counted("restoresession", restore::reconcile), error_policy("restoresession"), Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = "restoresession", "{e}");
            }
        });
    let snapshot_phase =
        |s: &Snapshot| phase_fingerprint(s, s.status.as_ref().and_then(|st| st.phase).map(|p| format!("{p:?}")));
    let snapshots = watcher::watcher(Api::<Snapshot>::all(c.clone()), wc.clone())
        .default_backoff()
        .touched_objects()
        .predicate_filter(snapshot_phase, PredicateConfig::default());
    let (store, stream) = spec_stream(Api::<Repository>::all(c.clone()));
    let repositories = Controller::for_stream(stream, store)
        .watches_stream(snapshots, |s: Snapshot| {
            let ns = s.namespace()?;
            let repo = s.labels().get(REPOSITORY_LABEL)?.clone();
            Some(ObjectRef::<Repository>::new(&repo).within(&ns))
        })
        .with_config(cfg.clone().debounce(Duration::from_secs(2)))
        .shutdown_on_signal()
        .run(counted("repository", repo::reconcile_repository), error_policy("repository"), Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = "repository", "{e}");
            }
        });
    let (store, stream) = spec_stream(Api::<BackupStorage>::all(c.clone()));
    let storages = Controller::for_stream(stream, store)
        .with_config(cfg)
        .shutdown_on_signal()
        .run(counted("backupstorage", repo::reconcile_storage), error_policy("backupstorage"), Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = "backupstorage", "{e}");
            }
        });
    let (store, stream) = spec_stream(Api::<Snapshot>::all(c.clone()));
    let snapshot_objects = Controller::for_stream(stream, store)
        .with_config(ControllerConfig::default().concurrency(2))
        .shutdown_on_signal()
        .run(counted("snapshot", repo::reconcile_snapshot), error_policy("snapshot"), Arc::clone(&ctx))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = "snapshot", "{e}");
            }
        });
    tokio::join!(configs, sessions, restores, repositories, storages, snapshot_objects);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hoard_api::crd::{BackupStorageStatus, StoragePhase};

    fn storage() -> BackupStorage {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "BackupStorage",
            "metadata": {"name": "s", "namespace": "n", "uid": "u1", "generation": 1},
            "spec": {"storage": {"provider": "s3", "s3": {"bucket": "b"}}}
        }))
        .unwrap()
    }

    #[test]
    fn status_writes_do_not_change_the_spec_fingerprint() {
        let a = storage();
        let mut b = a.clone();
        b.status = Some(BackupStorageStatus { phase: Some(StoragePhase::NotReady), ..Default::default() });
        b.metadata.resource_version = Some("42".into());
        assert_eq!(spec_fingerprint(&a), spec_fingerprint(&b), "status and resourceVersion are ignored");
        let mut c = a.clone();
        c.metadata.generation = Some(2);
        assert_ne!(spec_fingerprint(&a), spec_fingerprint(&c), "a spec change retriggers");
        let mut d = a.clone();
        d.metadata.finalizers = Some(vec!["hoard.dev/wipe-out".into()]);
        assert_ne!(spec_fingerprint(&a), spec_fingerprint(&d), "finalizers retrigger (the finalizer helper needs it)");
        let mut e = a.clone();
        e.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
        ));
        assert_ne!(spec_fingerprint(&a), spec_fingerprint(&e), "deletion retriggers");
        assert_ne!(phase_fingerprint(&a, None), phase_fingerprint(&a, Some("Running".into())));
    }
}
