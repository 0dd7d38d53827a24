//! Work orders in flight: one task per order drives the agent's progress stream and leaves the
//! latest event where the reconcilers read it. Reconcilers never wait on a stream; they look at
//! [`Orders::state`] every few seconds and write what they see into status.
//!
//! Guarantees:
//! * One task per order id at a time ([`Orders::start`] is a no-op for an id in flight).
//! * A broken stream is re-attached with the same order id (the agent's idempotency key) a
//!   bounded number of times before the order counts as failed with an empty error class
//!   (retryable), so a network blip never starts a second backup of the same attempt.
//! * A refusal is not a broken stream: a gRPC status the agent answers with when the order
//!   itself is wrong (PermissionDenied, InvalidArgument, FailedPrecondition, AlreadyExists,
//!   Unimplemented — see [`classify`]) ends the order at once as Failed with the error class
//!   `refused` or `invalid`, which the session does not retry.
//! * Every task ends: the stream is bounded by the session's deadline through cancellation
//!   ([`Orders::cancel`]), and the event channel is the stream itself (no unbounded queue).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hoard_api::agent::v1::{BackupOrder, CancelRequest, CopyOrder, Phase, Progress, RestoreOrder};
use hoard_api::tls::TlsMaterial;

/// What is sent.
#[derive(Debug, Clone)]
pub enum Order {
    Backup(BackupOrder),
    Restore(RestoreOrder),
    Copy(CopyOrder),
}

impl Order {
    pub fn id(&self) -> &str {
        match self {
            Order::Backup(o) => &o.order_id,
            Order::Restore(o) => &o.order_id,
            Order::Copy(o) => &o.order_id,
        }
    }
}

/// The PEM material the controller dials agents with (read once at start).
#[derive(Clone)]
pub struct Credentials {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

#[derive(Debug, Default, Clone)]
pub struct OrderState {
    pub node: String,
    /// The latest event (terminal once the order ended).
    pub last: Option<Progress>,
}

impl OrderState {
    pub fn terminal(&self) -> Option<&Progress> {
        self.last.as_ref().filter(|p| Phase::try_from(p.phase).is_ok_and(Phase::is_terminal))
    }
}

#[derive(Debug)]
struct Slot {
    state: Mutex<OrderState>,
    addr: String,
}

/// The orders this process follows.
#[derive(Debug)]
pub struct Orders {
    creds: Credentials,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    connect_timeout: Duration,
}

const REATTACH: u32 = 3;

/// Why one connection to an agent ended without a terminal event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    /// The gRPC status code, when the agent (not the network) answered.
    pub code: Option<tonic::Code>,
    pub message: String,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(c) => write!(f, "{c:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl From<tonic::Status> for StreamError {
    fn from(s: tonic::Status) -> Self {
        StreamError { code: Some(s.code()), message: s.message().to_string() }
    }
}

/// The error class (as in `Progress.error_class`) of a gRPC status: `Some` for answers that
/// will not change by asking again with the same order — the order fails for good at once;
/// `None` for what may pass (unavailable, deadline, a reset stream, resource exhaustion, ...):
/// re-attach, then a retryable failure.
pub fn classify(code: tonic::Code) -> Option<&'static str> {
    use tonic::Code;
    match code {
        Code::PermissionDenied | Code::FailedPrecondition | Code::AlreadyExists | Code::Unauthenticated => {
            Some("refused")
        }
        Code::InvalidArgument | Code::Unimplemented | Code::OutOfRange => Some("invalid"),
        _ => None,
    }
}

/// The terminal event recorded when following an order ends without one from the agent:
/// classed by [`classify`] (empty class: retryable).
pub fn failure_event(order_id: &str, node: &str, err: &StreamError) -> Progress {
    let class = err.code.and_then(classify);
    Progress {
        order_id: order_id.to_string(),
        phase: Phase::Failed as i32,
        error: match class {
            Some(_) => format!("agent on node {node} refused the order: {err}"),
            None => format!("agent on node {node} unreachable: {err}"),
        },
        error_class: class.unwrap_or_default().to_string(),
        ..Default::default()
    }
}

impl Orders {
    pub fn new(creds: Credentials) -> Orders {
        Orders { creds, slots: Mutex::default(), connect_timeout: Duration::from_secs(10) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn in_flight(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|s| s.state.lock().map(|st| st.terminal().is_none()).unwrap_or(false))
    }

    /// Copy of the order's state, if this process follows it.
    pub fn state(&self, id: &str) -> Option<OrderState> {
        self.lock().get(id).and_then(|s| s.state.lock().ok().map(|st| st.clone()))
    }

    /// Forgets an ended order once its result is recorded in status.
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// In-flight orders per node (for the per-node cap).
    pub fn load(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for slot in self.lock().values() {
            if let Ok(st) = slot.state.lock()
                && st.terminal().is_none()
            {
                *out.entry(st.node.clone()).or_default() += 1;
            }
        }
        out
    }

    pub fn count(&self) -> usize {
        self.load().values().sum()
    }

    /// Sends `order` to the agent of `node` at `addr` unless it is already followed.
    pub fn start(self: &Arc<Self>, node: &str, addr: &str, order: Order) {
        let id = order.id().to_string();
        let slot = {
            let mut slots = self.lock();
            if slots.contains_key(&id) {
                return;
            }
            let slot = Arc::new(Slot {
                state: Mutex::new(OrderState { node: node.to_string(), last: None }),
                addr: addr.to_string(),
            });
            slots.insert(id.clone(), Arc::clone(&slot));
            slot
        };
        let this = Arc::clone(self);
        let node = node.to_string();
        tokio::spawn(async move {
            let mut last_err = StreamError { code: None, message: "not sent".into() };
            for attempt in 0..REATTACH {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                match this.drive(&node, &slot, &order).await {
                    Ok(()) => return,
                    Err(e) if e.code.and_then(classify).is_some() => {
                        tracing::warn!(order = id, node, "agent refused the order: {e}");
                        last_err = e;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(order = id, node, "order stream: {e}; re-attaching");
                        last_err = e;
                    }
                }
            }
            if let Ok(mut st) = slot.state.lock() {
                st.last = Some(failure_event(&id, &node, &last_err));
            }
        });
    }

    async fn dial(
        &self,
        node: &str,
        addr: &str,
    ) -> Result<hoard_api::agent::v1::agent_client::AgentClient<tonic::transport::Channel>, String> {
        let material =
            TlsMaterial::from_pem(&self.creds.ca, &self.creds.cert, &self.creds.key).map_err(|e| e.to_string())?;
        let cfg = hoard_api::tls::client_config(material, node).map_err(|e| e.to_string())?;
        hoard_api::client::connect(addr, Arc::new(cfg), self.connect_timeout).await.map_err(|e| e.to_string())
    }

    /// One connection: send the order and follow its stream to the terminal event.
    async fn drive(&self, node: &str, slot: &Slot, order: &Order) -> Result<(), StreamError> {
        let mut client = self.dial(node, &slot.addr).await.map_err(|message| StreamError { code: None, message })?;
        let mut stream = match order {
            Order::Backup(o) => client.backup(o.clone()).await,
            Order::Restore(o) => client.restore(o.clone()).await,
            Order::Copy(o) => client.copy(o.clone()).await,
        }?
        .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(p)) => {
                    let terminal = Phase::try_from(p.phase).is_ok_and(Phase::is_terminal);
                    if let Ok(mut st) = slot.state.lock() {
                        st.last = Some(p);
                    }
                    if terminal {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    return Err(StreamError { code: None, message: "stream ended without a terminal event".into() });
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    /// Asks the agent to cancel `id` (best effort) and stops following it.
    pub async fn cancel(&self, id: &str) {
        let slot = self.lock().get(id).cloned();
        let Some(slot) = slot else { return };
        let node = slot.state.lock().map(|s| s.node.clone()).unwrap_or_default();
        if let Ok(mut c) = self.dial(&node, &slot.addr).await {
            let _ = c.cancel(CancelRequest { order_id: id.to_string() }).await;
        }
        self.forget(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::utc;
    use crate::session::retry_at;

    #[test]
    fn refusals_are_permanent_and_outages_retryable() {
        use tonic::Code;
        for (code, class) in [
            (Code::PermissionDenied, Some("refused")),
            (Code::FailedPrecondition, Some("refused")),
            (Code::AlreadyExists, Some("refused")),
            (Code::InvalidArgument, Some("invalid")),
            (Code::Unavailable, None),
            (Code::DeadlineExceeded, None),
            (Code::Unknown, None),
            (Code::ResourceExhausted, None),
            (Code::NotFound, None),
        ] {
            assert_eq!(classify(code), class, "{code:?}");
        }
    }

    #[test]
    fn a_refused_order_fails_the_component_without_retries() {
        let now = utc(2026, 1, 1, 0, 0, 0);
        let delay = chrono::Duration::seconds(30);
        let refused = StreamError {
            code: Some(tonic::Code::PermissionDenied),
            message: "volume refused: no vol_data.json".into(),
        };
        let p = failure_event("o/1", "node-a", &refused);
        assert_eq!(p.phase, Phase::Failed as i32);
        assert_eq!(p.error_class, "refused");
        assert!(p.error.contains("refused the order") && p.error.contains("no vol_data.json"), "{}", p.error);
        assert_eq!(retry_at(1, 5, &p.error_class, delay, now), None, "no retry for a refusal");

        let invalid = StreamError { code: Some(tonic::Code::InvalidArgument), message: "bad order id".into() };
        assert_eq!(retry_at(1, 5, &failure_event("o/1", "n", &invalid).error_class, delay, now), None);

        let outage = StreamError { code: None, message: "connection refused".into() };
        let p = failure_event("o/1", "node-a", &outage);
        assert_eq!(p.error_class, "");
        assert!(p.error.contains("unreachable"), "{}", p.error);
        assert_eq!(retry_at(1, 5, &p.error_class, delay, now), Some(now + delay), "retried per retryConfig");
        assert_eq!(retry_at(6, 5, &p.error_class, delay, now), None, "until maxRetry");
        let unavailable = StreamError { code: Some(tonic::Code::Unavailable), message: "draining".into() };
        assert_eq!(failure_event("o/1", "n", &unavailable).error_class, "");
    }
}
