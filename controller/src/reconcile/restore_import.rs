//! A RestoreSession from a VolumeSnapshot of another namespace (`dataSource.namespace`): the
//! shell of [`hoard_csi::share`]. With the source's consent it imports the snapshot — a
//! pre-provisioned VolumeSnapshotContent (`Retain`) with the source's handle and a
//! VolumeSnapshot in the restore's namespace bound to it — and the restore goes on from that
//! local VolumeSnapshot as from any other. [`cleanup`] deletes both when the restore ends: the
//! storage system's snapshot stays, and the source is never touched.

use hoard_api::crd::RestoreSession;
use hoard_csi::objects::label_value;
use hoard_csi::share::{self, Handle};
use hoard_csi::types::{VolumeSnapshot, VolumeSnapshotContent};
use kube::api::{Api, DeleteParams};
use kube::{Resource, ResourceExt};

use crate::Context;
use crate::error::{Error, Result, is_not_found};
use crate::helper::HELPER_LABEL;
use crate::reconcile::restore_copy::get_owned;
use crate::reconcile::snapshots::{create, owned_by};

/// Where the import stands.
#[derive(Debug)]
pub enum Import {
    /// The local VolumeSnapshot is ready: restore from it. The source is what it came from.
    Ready {
        local: String,
        source: Box<VolumeSnapshot>,
    },
    Waiting(String),
}

fn labels(rs: &RestoreSession) -> std::collections::BTreeMap<String, String> {
    [(HELPER_LABEL.to_string(), label_value(&rs.name_any()))].into()
}

/// Takes the next step of importing VolumeSnapshot `src_ns/name` into the restore's namespace.
pub async fn step(ctx: &Context, rs: &RestoreSession, src_ns: &str, name: &str) -> Result<Import> {
    let ns = rs.namespace().unwrap_or_default();
    let source = Api::<VolumeSnapshot>::namespaced(ctx.client.clone(), src_ns)
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::invalid("dataSource", format!("VolumeSnapshot {src_ns}/{name} does not exist")))?;
    if !share::consents(&source, &ns) {
        return Err(Error::invalid(
            "dataSource",
            format!(
                "VolumeSnapshot {src_ns}/{name} does not let namespace {ns} restore it: its owner annotates it \
                 {}={ns}",
                share::SHARE_ANNOTATION
            ),
        ));
    }
    let (content_name, local_name) = share::import_names(&ns, &rs.name_any());
    let locals: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(local) = get_owned(&locals, &local_name, rs, "VolumeSnapshot").await? {
        if local.ready() {
            return Ok(Import::Ready { local: local_name, source: Box::new(source) });
        }
        let why = local.error_message().map(|e| format!(": {e}")).unwrap_or_default();
        return Ok(Import::Waiting(format!("waiting for imported VolumeSnapshot {local_name}{why}")));
    }
    let contents: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    match contents.get_opt(&content_name).await? {
        Some(c) if !share::is_import_into(&c, &ns) => {
            return Err(Error::invalid("dataSource", format!("VolumeSnapshotContent {content_name} is not ours")));
        }
        Some(_) => {}
        None => {
            let bound = source.status.as_ref().and_then(|s| s.bound_volume_snapshot_content_name.clone());
            let source_content = match bound {
                Some(b) => contents.get_opt(&b).await?,
                None => None,
            };
            let handle: Handle = match share::source_handle(&source, source_content.as_ref()) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    return Ok(Import::Waiting(format!("waiting for VolumeSnapshot {src_ns}/{name} to be ready")));
                }
                Err(why) => return Err(Error::invalid("dataSource", why)),
            };
            let content = share::imported_content(&content_name, &handle, &ns, &local_name, labels(rs));
            create(&contents, &content).await?;
        }
    }
    let mut local = share::imported_snapshot(&local_name, &ns, &content_name, labels(rs));
    local.metadata.owner_references = rs.controller_owner_ref(&()).map(|o| vec![o]);
    create(&locals, &local).await?;
    ctx.event(rs, false, "VolumeSnapshotImported", format!("{src_ns}/{name} as {local_name}")).await;
    Ok(Import::Waiting(format!("VolumeSnapshot {src_ns}/{name} imported as {local_name}")))
}

/// Deletes the import of `rs` (its local VolumeSnapshot, then the content, which retains the
/// data). Idempotent; nothing when the restore imported nothing.
pub async fn cleanup(ctx: &Context, rs: &RestoreSession) -> Result<()> {
    let ns = rs.namespace().unwrap_or_default();
    if rs.spec.data_source.namespace.as_deref().is_none_or(|n| n.is_empty() || n == ns) {
        return Ok(());
    }
    let (content_name, local_name) = share::import_names(&ns, &rs.name_any());
    let gone = |r: kube::Result<()>| match r {
        Err(e) if !is_not_found(&e) => Err(Error::from(e)),
        _ => Ok(()),
    };
    let locals: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(local) = locals.get_opt(&local_name).await?
        && owned_by(&local.metadata, rs)
    {
        gone(locals.delete(&local_name, &DeleteParams::background()).await.map(|_| ()))?;
    }
    let contents: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    if let Some(c) = contents.get_opt(&content_name).await?
        && share::is_import_into(&c, &ns)
    {
        gone(contents.delete(&content_name, &DeleteParams::background()).await.map(|_| ()))?;
    }
    Ok(())
}
