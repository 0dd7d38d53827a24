//! The object verbs: trigger, pause/resume, sessions, snapshots, describe snapshot, restore.

use crate::{errln, outln};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use hoard_api::crd::{
    BackupConfiguration, BackupSession, BackupSessionSpec, DataSource, Invoker, Repository, RestoreSession,
    RestoreSessionSpec, Snapshot, SnapshotPhase, TargetKind, TargetRef, Trigger,
};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde::de::DeserializeOwned;

use super::error::{
    BACKUP_CONFIGURATION, BACKUP_SESSION, DEPLOYMENT, PVC, PluginError, REPOSITORY, RESTORE_SESSION, Res, SNAPSHOT,
    STATEFUL_SET, Verb, api_error,
};
use super::print::{self, Output, Table, bytes, creation_age, dash, phase_str};
use super::{Ctx, RestoreArgs};

/// Gets one namespaced object; a missing one is an error naming the list command.
pub async fn get<K>(ctx: &Ctx, ns: &str, name: &str, res: &Res) -> Result<K, PluginError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    api.get(name).await.map_err(|e| api_error(e, Verb::Get, res, Some(name), Some(ns)))
}

/// Lists objects in `ns`, or in every namespace with `None`.
pub async fn list<K>(ctx: &Ctx, ns: Option<&str>, res: &Res) -> Result<Vec<K>, PluginError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let api: Api<K> = match ns {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    api.list(&ListParams::default()).await.map(|l| l.items).map_err(|e| api_error(e, Verb::List, res, None, ns))
}

fn ns_of<K: Resource>(o: &K) -> String {
    o.meta().namespace.clone().unwrap_or_default()
}

fn name_of<K: Resource>(o: &K) -> String {
    o.meta().name.clone().unwrap_or_default()
}

/// Oldest first, like a log; ties by name.
fn sort_by_creation<K: Resource>(items: &mut [K]) {
    items.sort_by_key(|o| {
        (ns_of(o), o.meta().creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0), name_of(o))
    });
}

/// A `generateName` prefix: at most 58 characters so the generated name fits a label value.
fn generate_prefix(parts: &[&str]) -> String {
    let mut p: String = parts.join("-").chars().take(57).collect();
    while p.ends_with(['-', '.']) {
        p.pop();
    }
    p.push('-');
    p
}

pub async fn trigger(ctx: &Ctx, config: &str, session: Option<&str>) -> anyhow::Result<u8> {
    let ns = ctx.namespace.as_str();
    let bc: BackupConfiguration = get(ctx, ns, config, &BACKUP_CONFIGURATION).await?;
    let names: Vec<&str> = bc.spec.sessions.iter().map(|s| s.name.as_str()).collect();
    let first = names.first().copied().unwrap_or("NAME");
    let session = match (session, names.as_slice()) {
        (Some(s), _) if names.contains(&s) => s.to_string(),
        (Some(s), _) => {
            return Err(PluginError::Usage(format!(
                "backupconfiguration \"{config}\" has no session \"{s}\" (it has: {}); pick one with: kubectl hoard trigger {config} --session {first} -n {ns}",
                names.join(", ")
            ))
            .into());
        }
        (None, [one]) => one.to_string(),
        (None, _) => {
            return Err(PluginError::Usage(format!(
                "backupconfiguration \"{config}\" has {} sessions ({}); pick one with: kubectl hoard trigger {config} --session {first} -n {ns}",
                names.len(),
                names.join(", ")
            ))
            .into());
        }
    };
    if bc.spec.paused {
        errln!(
            "warning: backupconfiguration \"{config}\" is paused, so this session will be Skipped; resume it with: kubectl hoard resume {config} -n {ns}"
        );
    }
    let mut bs = BackupSession::new(
        "",
        BackupSessionSpec {
            invoker: Invoker::configuration(config),
            session: session.clone(),
            trigger: Trigger::Manual,
            scheduled_time: None,
        },
    );
    let labels: BTreeMap<String, String> = [
        ("hoard.dev/configuration".to_string(), config.to_string()),
        ("hoard.dev/session".to_string(), session.clone()),
    ]
    .into();
    bs.metadata = ObjectMeta {
        generate_name: Some(generate_prefix(&[config, &session])),
        namespace: Some(ns.to_string()),
        labels: Some(labels),
        ..Default::default()
    };
    let api: Api<BackupSession> = Api::namespaced(ctx.client.clone(), ns);
    let created = api
        .create(&PostParams::default(), &bs)
        .await
        .map_err(|e| api_error(e, Verb::Create, &BACKUP_SESSION, None, Some(ns)))?;
    let name = name_of(&created);
    match ctx.output {
        Output::Table | Output::Wide => {
            outln!("backupsession.hoard.dev/{name} created");
            outln!("watch it with: kubectl hoard watch {name} -n {ns}");
        }
        o => print::print_object(&created, o)?,
    }
    Ok(0)
}

pub async fn set_paused(ctx: &Ctx, config: &str, paused: bool) -> anyhow::Result<u8> {
    let ns = ctx.namespace.as_str();
    let bc: BackupConfiguration = get(ctx, ns, config, &BACKUP_CONFIGURATION).await?;
    let word = if paused { "paused" } else { "resumed" };
    let obj = if bc.spec.paused == paused {
        if !ctx.output.is_document() && ctx.output != Output::Name {
            outln!("backupconfiguration.hoard.dev/{config} already {}", if paused { "paused" } else { "running" });
        }
        bc
    } else {
        let api: Api<BackupConfiguration> = Api::namespaced(ctx.client.clone(), ns);
        let patch = serde_json::json!({"spec": {"paused": paused}});
        let out = api
            .patch(config, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| api_error(e, Verb::Patch, &BACKUP_CONFIGURATION, Some(config), Some(ns)))?;
        if !ctx.output.is_document() && ctx.output != Output::Name {
            outln!("backupconfiguration.hoard.dev/{config} {word}");
        }
        out
    };
    match ctx.output {
        Output::Table | Output::Wide => {
            if paused {
                outln!("resume it with: kubectl hoard resume {config} -n {ns}");
            }
        }
        o => print::print_object(&obj, o)?,
    }
    Ok(0)
}

/// A session's DURATION: the recorded one, or the time since it started while it runs.
fn session_duration(bs: &BackupSession) -> String {
    let st = bs.status.as_ref();
    if let Some(d) = st.and_then(|s| s.duration.clone()) {
        return d;
    }
    match st.and_then(|s| s.start_time.as_deref()).and_then(print::parse_rfc3339) {
        Some(t) => print::age(Some(t)),
        None => "-".into(),
    }
}

pub async fn sessions(ctx: &Ctx, config: Option<&str>) -> anyhow::Result<u8> {
    let ns = ctx.list_namespace();
    let mut items: Vec<BackupSession> = list(ctx, ns, &BACKUP_SESSION).await?;
    if let Some(c) = config {
        items.retain(|s| s.spec.invoker.name == c);
        if items.is_empty()
            && let Some(ns) = ns
        {
            // Say so when the configuration itself is missing, not just its sessions.
            get::<BackupConfiguration>(ctx, ns, c, &BACKUP_CONFIGURATION).await?;
        }
    }
    sort_by_creation(&mut items);
    if ctx.output.is_document() || ctx.output == Output::Name {
        print::print_list(&items, ctx.output)?;
        return Ok(0);
    }
    if items.is_empty() {
        print::no_resources(ns);
        return Ok(0);
    }
    let wide = ctx.output == Output::Wide;
    let mut headers = vec!["NAME", "CONFIG", "SESSION", "TRIGGER", "PHASE", "DURATION", "AGE"];
    if wide {
        headers.extend(["SNAPSHOTS", "MESSAGE"]);
    }
    if ns.is_none() {
        headers.insert(0, "NAMESPACE");
    }
    let mut t = Table::new(&headers);
    for s in &items {
        let st = s.status.as_ref();
        let mut row = vec![
            name_of(s),
            s.spec.invoker.name.clone(),
            s.spec.session.clone(),
            format!("{:?}", s.spec.trigger),
            phase_str(st.and_then(|s| s.phase)),
            session_duration(s),
            creation_age(s),
        ];
        if wide {
            let snaps: Vec<String> =
                st.map(|s| s.snapshots.iter().map(|x| x.name.clone()).collect()).unwrap_or_default();
            row.push(if snaps.is_empty() { "-".into() } else { snaps.join(",") });
            row.push(dash(st.and_then(|s| s.message.clone())));
        }
        if ns.is_none() {
            row.insert(0, ns_of(s));
        }
        t.row(row);
    }
    t.print();
    Ok(0)
}

pub async fn snapshots(ctx: &Ctx, config: Option<&str>, repository: Option<&str>) -> anyhow::Result<u8> {
    // A configuration's repositories live in its namespace.
    let ns = if config.is_some() { Some(ctx.namespace.as_str()) } else { ctx.list_namespace() };
    let repos: Option<Vec<String>> = match (config, repository) {
        (Some(c), _) => {
            let bc: BackupConfiguration = get(ctx, &ctx.namespace, c, &BACKUP_CONFIGURATION).await?;
            Some(bc.spec.sessions.iter().flat_map(|s| s.repositories.iter().map(|r| r.name.clone())).collect())
        }
        (None, Some(r)) => Some(vec![r.to_string()]),
        (None, None) => None,
    };
    let mut items: Vec<Snapshot> = list(ctx, ns, &SNAPSHOT).await?;
    if let Some(repos) = &repos {
        items.retain(|s| repos.contains(&s.spec.repository));
    }
    if items.is_empty()
        && let (Some(r), Some(ns)) = (repository, ns)
    {
        get::<Repository>(ctx, ns, r, &REPOSITORY).await?;
    }
    sort_by_creation(&mut items);
    if ctx.output.is_document() || ctx.output == Output::Name {
        print::print_list(&items, ctx.output)?;
        return Ok(0);
    }
    if items.is_empty() {
        print::no_resources(ns);
        return Ok(0);
    }
    let wide = ctx.output == Output::Wide;
    let mut headers = vec!["NAME", "REPOSITORY", "SESSION", "PHASE", "SIZE", "COMPONENTS", "AGE"];
    if wide {
        headers.extend(["BACKUPSESSION", "SNAPSHOT-TIME"]);
    }
    if ns.is_none() {
        headers.insert(0, "NAMESPACE");
    }
    let mut t = Table::new(&headers);
    for s in &items {
        let st = s.status.as_ref();
        let components = st.map(|s| s.components.len()).unwrap_or(0);
        let total = st.and_then(|s| s.total_components).map(|n| n as usize).unwrap_or(components);
        let done = st
            .map(|s| {
                s.components.values().filter(|c| c.phase == Some(hoard_api::crd::ComponentPhase::Succeeded)).count()
            })
            .unwrap_or(0);
        let mut row = vec![
            name_of(s),
            s.spec.repository.clone(),
            dash(s.spec.session.clone()),
            phase_str(st.and_then(|s| s.phase)),
            bytes(st.and_then(|s| s.size)),
            format!("{done}/{total}"),
            creation_age(s),
        ];
        if wide {
            row.push(dash(s.spec.backup_session.clone()));
            row.push(dash(st.and_then(|s| s.snapshot_time.clone())));
        }
        if ns.is_none() {
            row.insert(0, ns_of(s));
        }
        t.row(row);
    }
    t.print();
    Ok(0)
}

/// `kubectl describe`-style text for a Snapshot.
pub fn describe_snapshot_text(s: &Snapshot) -> String {
    let mut o = String::new();
    let st = s.status.clone().unwrap_or_default();
    let field = |o: &mut String, k: &str, v: String| {
        let _ = writeln!(o, "{:<16}{v}", format!("{k}:"));
    };
    field(&mut o, "Name", name_of(s));
    field(&mut o, "Namespace", ns_of(s));
    field(&mut o, "Repository", s.spec.repository.clone());
    field(&mut o, "Session", dash(s.spec.session.clone()));
    field(&mut o, "BackupSession", dash(s.spec.backup_session.clone()));
    if let Some(app) = &s.spec.app_ref {
        field(&mut o, "App", format!("{} {}/{}", app.target.kind.as_str(), app.namespace, app.target.name));
    }
    field(&mut o, "Phase", phase_str(st.phase));
    field(&mut o, "Snapshot Time", dash(st.snapshot_time.clone()));
    field(&mut o, "Size", bytes(st.size));
    let total = st.total_components.map(|n| n as usize).unwrap_or(st.components.len());
    field(&mut o, "Components", format!("{} of {total} reported", st.components.len()));
    for (name, c) in &st.components {
        let _ = writeln!(o, "  {name}:");
        let sub = |o: &mut String, k: &str, v: String| {
            let _ = writeln!(o, "    {:<15}{v}", format!("{k}:"));
        };
        sub(&mut o, "Phase", phase_str(c.phase));
        sub(&mut o, "Snapshot ID", dash(c.snapshot_id.clone()));
        sub(&mut o, "Size", bytes(c.size));
        sub(&mut o, "Duration", dash(c.duration.clone()));
        if c.node.is_some() || c.pod.is_some() || c.volume.is_some() {
            sub(
                &mut o,
                "Source",
                format!(
                    "node {}, pod {}, volume {}",
                    dash(c.node.clone()),
                    dash(c.pod.clone()),
                    dash(c.volume.clone())
                ),
            );
        }
        if let Some(from) = c.read_from {
            let claim = c.claim.as_deref().map(|c| format!(" (claim {c})")).unwrap_or_default();
            sub(&mut o, "Read From", format!("{from:?}{claim}"));
        }
        if let Some(vs) = &c.volume_snapshot {
            let class = vs.class_name.as_deref().map(|c| format!(", class {c}")).unwrap_or_default();
            let kept = if vs.kept { ", kept" } else { "" };
            sub(&mut o, "CSI Snapshot", format!("{} cut at {}{class}{kept}", vs.name, dash(vs.creation_time.clone())));
        }
        if let Some(w) = &c.waiting_for {
            sub(&mut o, "Waiting For", w.clone());
        }
        if let Some(p) = &c.progress {
            sub(
                &mut o,
                "Progress",
                format!(
                    "{}/{} files, {}/{}, {} uploaded",
                    p.files_done,
                    p.files_total,
                    hoard_core::util::human_bytes(p.bytes_done),
                    hoard_core::util::human_bytes(p.bytes_total),
                    hoard_core::util::human_bytes(p.bytes_uploaded)
                ),
            );
        }
        if c.attempts > 1 {
            sub(&mut o, "Attempts", c.attempts.to_string());
        }
        if let Some(e) = &c.error {
            sub(&mut o, "Error", e.clone());
        }
        for w in &c.warnings {
            sub(&mut o, "Warning", w.clone());
        }
    }
    if st.conditions.is_empty() {
        field(&mut o, "Conditions", "<none>".into());
    } else {
        let _ = writeln!(o, "Conditions:");
        let mut t = Table::new(&["  TYPE", "STATUS", "REASON", "MESSAGE"]);
        for c in &st.conditions {
            t.row(vec![format!("  {}", c.type_), c.status.clone(), c.reason.clone(), c.message.clone()]);
        }
        o.push_str(&t.render());
    }
    o
}

pub async fn describe_snapshot(ctx: &Ctx, name: &str) -> anyhow::Result<u8> {
    let s: Snapshot = get(ctx, &ctx.namespace, name, &SNAPSHOT).await?;
    match ctx.output {
        Output::Table | Output::Wide => crate::output::write_out(describe_snapshot_text(&s).as_bytes()),
        o => print::print_object(&s, o)?,
    }
    Ok(0)
}

/// `pvc/NAME`, `deployment/NAME`, `statefulset/NAME` (and kubectl's short names).
pub fn parse_target(to: &str) -> Result<(TargetKind, String), PluginError> {
    let bad = || {
        PluginError::Usage(format!("--to {to:?} is not KIND/NAME; use pvc/NAME, deployment/NAME or statefulset/NAME"))
    };
    let (kind, name) = to.split_once('/').ok_or_else(bad)?;
    if name.is_empty() || name.contains('/') {
        return Err(bad());
    }
    let kind = match kind.to_ascii_lowercase().as_str() {
        "pvc" | "persistentvolumeclaim" | "persistentvolumeclaims" => TargetKind::PersistentVolumeClaim,
        "deployment" | "deploy" | "deployments" => TargetKind::Deployment,
        "statefulset" | "sts" | "statefulsets" => TargetKind::StatefulSet,
        _ => return Err(bad()),
    };
    Ok((kind, name.to_string()))
}

pub async fn restore(ctx: &Ctx, a: RestoreArgs) -> anyhow::Result<u8> {
    let ns = ctx.namespace.as_str();
    let (kind, target) = parse_target(&a.to)?;
    if let Some(vs) = &a.from_volume_snapshot {
        let claim = hoard_api::crd::ClaimOverrides {
            size: a.size.clone(),
            storage_class_name: a.storage_class.clone(),
            access_modes: a
                .access_modes
                .iter()
                .filter_map(|m| serde_json::from_value(serde_json::Value::String(m.clone())).ok())
                .collect(),
        };
        let claim = (claim != hoard_api::crd::ClaimOverrides::default()).then_some(claim);
        let from = VolumeSnapshotRef { namespace: a.from_namespace.clone(), name: vs.clone() };
        return restore_volume_snapshot(ctx, from, kind, &target, claim, a.overwrite.into()).await;
    }
    let snapshot = a.snapshot.clone().unwrap_or_else(|| "latest".into());
    let repository = if snapshot == "latest" {
        let Some(r) = a.repository.clone() else {
            return Err(PluginError::Usage(format!(
                "restoring the latest snapshot needs its repository; list them with: kubectl get repositories.hoard.dev -n {ns}, then: kubectl hoard restore --repository NAME --to {}",
                a.to
            ))
            .into());
        };
        get::<Repository>(ctx, ns, &r, &REPOSITORY).await?;
        r
    } else {
        let s: Snapshot = get(ctx, ns, &snapshot, &SNAPSHOT).await?;
        if let Some(r) = &a.repository
            && *r != s.spec.repository
        {
            return Err(PluginError::Usage(format!(
                "snapshot \"{snapshot}\" belongs to repository \"{}\", not \"{r}\"; list a repository's snapshots with: kubectl hoard snapshots --repository {r} -n {ns}",
                s.spec.repository
            ))
            .into());
        }
        let phase = s.status.as_ref().and_then(|s| s.phase);
        if phase != Some(SnapshotPhase::Succeeded) {
            return Err(PluginError::Usage(format!(
                "snapshot \"{snapshot}\" is {} and cannot be restored; see why with: kubectl hoard describe snapshot {snapshot} -n {ns}",
                phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "not finished".into())
            ))
            .into());
        }
        s.spec.repository
    };
    match kind {
        TargetKind::PersistentVolumeClaim => {
            get::<PersistentVolumeClaim>(ctx, ns, &target, &PVC).await?;
        }
        TargetKind::Deployment => {
            get::<Deployment>(ctx, ns, &target, &DEPLOYMENT).await?;
        }
        TargetKind::StatefulSet => {
            get::<StatefulSet>(ctx, ns, &target, &STATEFUL_SET).await?;
        }
        _ => {}
    }
    let mut rs = RestoreSession::new(
        "",
        RestoreSessionSpec {
            target: TargetRef { api_group: Some(kind.api_group().to_string()), kind, name: target.clone() },
            data_source: DataSource {
                namespace: None,
                repository: repository.clone(),
                volume_snapshot: None,
                snapshot: snapshot.clone(),
                components: a.components.clone(),
                volume_map: BTreeMap::new(),
                include: a.include.clone(),
                exclude: a.exclude.clone(),
                encryption_secret: None,
            },
            restore_timeout: None,
            overwrite: a.overwrite.into(),
            claim: None,
        },
    );
    rs.metadata = ObjectMeta {
        generate_name: Some(generate_prefix(&["restore", &target])),
        namespace: Some(ns.to_string()),
        labels: Some([("hoard.dev/repository".to_string(), repository.clone())].into()),
        ..Default::default()
    };
    create_restore(ctx, &rs).await
}

/// A VolumeSnapshot to restore, in the current namespace unless `namespace` names another.
struct VolumeSnapshotRef {
    namespace: Option<String>,
    name: String,
}

/// `restore --from-volume-snapshot NAME --to pvc/CLAIM`: the CSI driver fills a new claim; an
/// existing one gets a copy of the snapshot's clone from the node's agent.
async fn restore_volume_snapshot(
    ctx: &Ctx,
    vs: VolumeSnapshotRef,
    kind: TargetKind,
    target: &str,
    claim: Option<hoard_api::crd::ClaimOverrides>,
    overwrite: hoard_api::crd::OverwritePolicy,
) -> anyhow::Result<u8> {
    let ns = ctx.namespace.as_str();
    if kind != TargetKind::PersistentVolumeClaim {
        return Err(PluginError::Usage("a VolumeSnapshot restores into a claim: use --to pvc/NAME".into()).into());
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let exists =
        claims.get_opt(target).await.map_err(|e| api_error(e, Verb::Get, &PVC, Some(target), Some(ns)))?.is_some();
    if exists && claim.is_some() {
        return Err(PluginError::Usage(format!(
            "claim \"{target}\" exists: --size, --storage-class and --access-mode are for a new claim"
        ))
        .into());
    }
    let mut rs = RestoreSession::new(
        "",
        RestoreSessionSpec {
            target: TargetRef { api_group: Some(kind.api_group().to_string()), kind, name: target.to_string() },
            data_source: DataSource {
                namespace: vs.namespace,
                repository: String::new(),
                volume_snapshot: Some(vs.name),
                snapshot: "latest".into(),
                components: Vec::new(),
                volume_map: BTreeMap::new(),
                include: Vec::new(),
                exclude: Vec::new(),
                encryption_secret: None,
            },
            restore_timeout: None,
            overwrite,
            claim,
        },
    );
    rs.metadata = ObjectMeta {
        generate_name: Some(generate_prefix(&["restore", target])),
        namespace: Some(ns.to_string()),
        ..Default::default()
    };
    create_restore(ctx, &rs).await
}

async fn create_restore(ctx: &Ctx, rs: &RestoreSession) -> anyhow::Result<u8> {
    let ns = ctx.namespace.as_str();
    let api: Api<RestoreSession> = Api::namespaced(ctx.client.clone(), ns);
    let created = api
        .create(&PostParams::default(), rs)
        .await
        .map_err(|e| api_error(e, Verb::Create, &RESTORE_SESSION, None, Some(ns)))?;
    let name = name_of(&created);
    match ctx.output {
        Output::Table | Output::Wide => {
            outln!("restoresession.hoard.dev/{name} created");
            outln!("watch it with: kubectl hoard watch {name} -n {ns}");
        }
        o => print::print_object(&created, o)?,
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_the_volume_snapshot_behind_a_component() {
        let s: Snapshot = serde_json::from_value(serde_json::json!({
            "apiVersion": "hoard.dev/v1alpha1", "kind": "Snapshot",
            "metadata": {"name": "repo-s-1", "namespace": "ns"},
            "spec": {"repository": "repo"},
            "status": {"phase": "Succeeded", "components": {"data": {
                "phase": "Succeeded", "claim": "data", "readFrom": "VolumeSnapshot",
                "volumeSnapshot": {"name": "hoard-s-1-data", "className": "csi-snap",
                                   "creationTime": "2026-12-07T09:00:00Z", "kept": true}}}}
        }))
        .expect("snapshot");
        let text = describe_snapshot_text(&s);
        assert!(text.contains("Read From:     VolumeSnapshot (claim data)"), "{text}");
        assert!(
            text.contains("CSI Snapshot:  hoard-s-1-data cut at 2026-12-07T09:00:00Z, class csi-snap, kept"),
            "{text}"
        );
    }
}
