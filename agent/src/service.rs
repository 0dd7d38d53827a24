//! The gRPC service: validates an order, opens its volume, and hands it to the order book.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use hoard_api::agent::v1::agent_server::Agent;
use hoard_api::agent::v1::{
    BackupOrder, CancelReply, CancelRequest, CopyOrder, Progress, RestoreOrder, StatusReply, StatusRequest,
    VerifyOrder, VolumeIdentity,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::jobs::{self, JobEnv, Wiped};
use crate::orders::{BookError, Lookup, OrderKind, Orders};
use crate::volume::{KubeletRoot, OpenVolume, VolumeError, plan};

pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<Progress, Status>> + Send>>;

/// Most bytes in an order id.
const MAX_ORDER_ID: usize = 253;

#[derive(Debug, Clone)]
pub struct AgentService {
    pub env: JobEnv,
    pub orders: Arc<Orders>,
    pub kubelet: Arc<KubeletRoot>,
    pub io_uring: bool,
}

fn valid_order_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ORDER_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':'))
}

fn fingerprint(kind: OrderKind, bytes: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(kind.label().as_bytes());
    h.update(bytes);
    *h.finalize().as_bytes()
}

fn book_status(e: BookError) -> Status {
    match e {
        BookError::Conflict(_) => Status::already_exists(e.to_string()),
        BookError::Draining => Status::unavailable(e.to_string()),
    }
}

fn volume_status(e: &VolumeError) -> Status {
    match e {
        VolumeError::Invalid(_) => Status::invalid_argument(e.to_string()),
        VolumeError::WrongNode { .. } => Status::failed_precondition(e.to_string()),
        VolumeError::NotFound(_) => Status::not_found(e.to_string()),
        VolumeError::Refused(_) => Status::permission_denied(e.to_string()),
        VolumeError::Io { .. } => Status::internal(e.to_string()),
    }
}

/// Streams events from the order's channel until (and including) the terminal one.
fn follow(rx: watch::Receiver<Progress>) -> ProgressStream {
    Box::pin(futures::stream::unfold((rx, true, false), |(mut rx, first, done)| async move {
        if done {
            return None;
        }
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let ev = rx.borrow_and_update().clone();
        let terminal = hoard_api::agent::v1::Phase::try_from(ev.phase).is_ok_and(|p| p.is_terminal());
        Some((Ok(ev), (rx, false, terminal)))
    }))
}

impl AgentService {
    /// A backup-only agent's answer to orders that write (restore, verify, copy).
    fn refuse_writes(&self, order_id: &str, kind: OrderKind) -> Result<(), Status> {
        if !self.env.backup_only {
            return Ok(());
        }
        self.env.metrics.refused("backup-only");
        tracing::warn!(order_id, kind = kind.label(), "order refused: this agent is backup-only");
        Err(Status::failed_precondition(format!(
            "this agent is backup-only (--backup-only; chart value agent.restore.enabled=false): it takes no {} \
             orders. Enable restores with `helm upgrade ... --set agent.restore.enabled=true` (see docs/install.md)",
            kind.label()
        )))
    }

    /// Plans and opens the volume of an order (refusals are counted and logged, never the order).
    async fn open_volume(&self, order_id: &str, id: Option<VolumeIdentity>) -> Result<OpenVolume, Status> {
        let id = id.ok_or_else(|| Status::invalid_argument("the order names no volume"))?;
        let node = self.env.node_name.clone();
        let kubelet = Arc::clone(&self.kubelet);
        let r = tokio::task::spawn_blocking(move || plan(&id, &node).and_then(|p| kubelet.open_volume(&p)))
            .await
            .map_err(|e| Status::internal(format!("volume task: {e}")))?;
        r.map_err(|e| {
            self.env.metrics.refused(e.label());
            tracing::warn!(order_id, reason = e.label(), "order refused: {e}");
            volume_status(&e)
        })
    }

    /// Common path of every order: validate the id, dedupe, then start `job` with the volume.
    async fn submit<F, Fut>(
        &self,
        kind: OrderKind,
        order_id: &str,
        encoded: &[u8],
        volume: Option<Option<VolumeIdentity>>,
        job: F,
    ) -> Result<Response<ProgressStream>, Status>
    where
        F: FnOnce(JobEnv, crate::orders::OrderCtx, Option<OpenVolume>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<hoard_api::agent::v1::Result, crate::orders::JobError>>
            + Send
            + 'static,
    {
        if !valid_order_id(order_id) {
            self.env.metrics.refused("invalid");
            return Err(Status::invalid_argument("order_id must be 1-253 characters of [A-Za-z0-9-_./:]"));
        }
        let fp = fingerprint(kind, encoded);
        match self.orders.lookup(order_id, &fp).map_err(|e| {
            self.env.metrics.refused(if matches!(e, BookError::Draining) { "draining" } else { "conflict" });
            book_status(e)
        })? {
            Lookup::Attach(rx) => {
                tracing::info!(order_id, kind = kind.label(), "repeated order attached to its first run");
                return Ok(Response::new(follow(rx)));
            }
            Lookup::New => {}
        }
        let vol = match volume {
            Some(id) => Some(self.open_volume(order_id, id).await?),
            None => None,
        };
        let env = self.env.clone();
        let rx = self.orders.start(kind, order_id, fp, move |ctx| job(env, ctx, vol)).map_err(book_status)?;
        Ok(Response::new(follow(rx)))
    }
}

fn take_volume(v: Option<OpenVolume>) -> Result<OpenVolume, crate::orders::JobError> {
    v.ok_or_else(|| crate::orders::JobError::new("invalid", "no volume"))
}

#[tonic::async_trait]
impl Agent for AgentService {
    type BackupStream = ProgressStream;
    type RestoreStream = ProgressStream;
    type VerifyStream = ProgressStream;
    type CopyStream = ProgressStream;

    async fn backup(&self, req: Request<BackupOrder>) -> Result<Response<ProgressStream>, Status> {
        // From here on the credentials are wiped when the order is dropped, whatever happens.
        let order = Wiped::new(req.into_inner(), Some(self.env.metrics.secrets_wiped()));
        let encoded = jobs::public_encoding(&*order);
        let id = order.order_id.clone();
        let volume = order.volume.clone();
        self.submit(OrderKind::Backup, &id, &encoded, Some(volume), move |env, ctx, vol| async move {
            jobs::backup(env, ctx, order, take_volume(vol)?).await
        })
        .await
    }

    async fn restore(&self, req: Request<RestoreOrder>) -> Result<Response<ProgressStream>, Status> {
        // From here on the credentials are wiped when the order is dropped, whatever happens.
        let order = Wiped::new(req.into_inner(), Some(self.env.metrics.secrets_wiped()));
        let encoded = jobs::public_encoding(&*order);
        let id = order.order_id.clone();
        self.refuse_writes(&id, OrderKind::Restore)?;
        let volume = order.volume.clone();
        self.submit(OrderKind::Restore, &id, &encoded, Some(volume), move |env, ctx, vol| async move {
            jobs::restore(env, ctx, order, take_volume(vol)?).await
        })
        .await
    }

    async fn verify(&self, req: Request<VerifyOrder>) -> Result<Response<ProgressStream>, Status> {
        // From here on the credentials are wiped when the order is dropped, whatever happens.
        let order = Wiped::new(req.into_inner(), Some(self.env.metrics.secrets_wiped()));
        let encoded = jobs::public_encoding(&*order);
        let id = order.order_id.clone();
        self.refuse_writes(&id, OrderKind::Verify)?;
        self.submit(OrderKind::Verify, &id, &encoded, None, move |env, ctx, _| async move {
            jobs::verify(env, ctx, order).await
        })
        .await
    }

    async fn copy(&self, req: Request<CopyOrder>) -> Result<Response<ProgressStream>, Status> {
        let order = req.into_inner();
        let encoded = prost::Message::encode_to_vec(&order);
        let id = order.order_id.clone();
        self.refuse_writes(&id, OrderKind::Copy)?;
        // Both volumes are opened before the order is accepted: a refusal is the call's error.
        let source = self.open_volume(&id, order.source.clone()).await?;
        self.submit(OrderKind::Copy, &id, &encoded, Some(order.volume.clone()), move |env, ctx, vol| async move {
            jobs::copy(env, ctx, order, source, take_volume(vol)?).await
        })
        .await
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<CancelReply>, Status> {
        let id = req.into_inner().order_id;
        Ok(Response::new(CancelReply { cancelled: self.orders.cancel(&id) }))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let (running, queued) = self.orders.load();
        Ok(Response::new(StatusReply {
            node_name: self.env.node_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            running: running as u32,
            queued: queued as u32,
            max_concurrent_orders: self.orders.max_concurrent() as u32,
            io_uring_available: self.io_uring,
            draining: self.orders.is_draining(),
        }))
    }
}
