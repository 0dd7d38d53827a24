//! hoard-controller: schedules backups, turns BackupSessions and RestoreSessions into node-local
//! work orders for the hoard agents, and records results in CRD status. See docs/controller.md.
//!
//! Layout: the decisions are pure modules with plain unit tests — [`schedule`] (cron, missed
//! runs), [`session`] (a BackupSession's next step), [`target`] (workload → volumes),
//! [`agents`] (which agent serves a node), [`retention`] (what a policy removes), [`storage`]
//! (locations, credentials, the bucket's metadata object), [`leader`] (Lease decisions).
//! [`reconcile`] holds the thin async shells that read the API, call those functions and write
//! status (server-side apply, field manager [`FIELD_MANAGER`]).

pub mod agents;
pub mod error;
pub mod helper;
pub mod leader;
pub mod metrics;
pub mod orders;
pub mod rbac;
pub mod reconcile;
pub mod retention;
pub mod schedule;
pub mod session;
pub mod storage;
pub mod target;

pub use error::{Error, Result};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

/// The one field manager for everything the controller writes.
pub const FIELD_MANAGER: &str = "hoard-controller";

/// Label on objects the controller creates for a configuration.
pub const CONFIG_LABEL: &str = "hoard.dev/configuration";
pub const SESSION_LABEL: &str = "hoard.dev/session";
pub const REPOSITORY_LABEL: &str = "hoard.dev/repository";
/// Namespace label (value `full`) with which an administrator lets restores into that
/// namespace recreate everything a snapshot records (set-id bits, device nodes, file
/// capabilities, root ownership). Namespaces are cluster-scoped: tenants cannot set it.
pub const RESTORE_METADATA_LABEL: &str = "hoard.dev/restore-metadata";
pub const BACKUP_SESSION_LABEL: &str = "hoard.dev/backup-session";
/// Label on repository snapshots: the Snapshot object they belong to.
pub const SNAPSHOT_LABEL: &str = "hoard.dev/snapshot";

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// The controller's own namespace (Lease, agent pods).
    pub namespace: String,
    pub agent_selector: String,
    pub max_orders_per_node: usize,
    pub allow_file_repositories: bool,
    /// Identity in Events and the Lease.
    pub identity: String,
    /// Image of the short-lived pod that mounts an unmounted claim for a restore
    /// (`--helper-image`; empty: such restores are refused).
    pub helper_image: String,
    /// The helper container's args (`--helper-args`; default `--pause`, which makes the
    /// controller image sleep until the pod is deleted).
    pub helper_args: Vec<String>,
    /// How often each repository's structure is checked (`--check-interval`; zero: never).
    pub check_interval: std::time::Duration,
    /// Namespaces besides [`Config::namespace`] whose BackupStorages may use what only an
    /// administrator may choose: ambient credentials and `local` paths (`--admin-namespace`).
    pub admin_namespaces: Vec<String>,
}

impl Config {
    /// Whether objects of `ns` are the administrator's: the controller's own namespace and
    /// the `--admin-namespace` ones.
    pub fn is_admin_namespace(&self, ns: &str) -> bool {
        ns == self.namespace || self.admin_namespaces.iter().any(|n| n == ns)
    }
}

/// The controller's clock. Tests move it forward to exercise the scheduler without waiting.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::SeqCst))
    }

    pub fn advance(&self, by: chrono::Duration) {
        self.offset_ms.fetch_add(by.num_milliseconds(), Ordering::SeqCst);
    }
}

/// What every reconciler gets.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub orders: Arc<orders::Orders>,
    pub metrics: Arc<metrics::Metrics>,
    pub clock: Arc<Clock>,
    /// Consecutive failures per object, for exponential back-off.
    pub failures: error::Failures,
    /// Serialises read-modify-write of the storages' metadata objects: two repositories of one
    /// storage reconciled at once must not each write back a list missing the other.
    pub meta_lock: tokio::sync::Mutex<()>,
    recorder: Recorder,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        config: Config,
        creds: orders::Credentials,
        metrics: Arc<metrics::Metrics>,
        clock: Arc<Clock>,
    ) -> Arc<Context> {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(config.identity.clone()) };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            orders: Arc::new(orders::Orders::new(creds)),
            metrics,
            clock,
            failures: error::Failures::default(),
            meta_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Publishes an Event about `obj`; failures are logged, never fatal (events are advisory).
    pub async fn event<K>(&self, obj: &K, warning: bool, reason: &str, note: impl Into<String>)
    where
        K: Resource<DynamicType = ()>,
    {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note.into()),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::debug!("event {reason} not recorded: {e}");
        }
    }

    /// A Secret's data as strings. The values are secrets: callers must not log them.
    pub async fn secret_data(&self, namespace: &str, name: &str) -> Result<BTreeMap<String, String>> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = match api.get(name).await {
            Ok(s) => s,
            Err(e) if error::is_not_found(&e) => return Err(Error::NotFound(format!("Secret {namespace}/{name}"))),
            Err(e) => return Err(e.into()),
        };
        let mut out = BTreeMap::new();
        for (k, v) in secret.data.unwrap_or_default() {
            out.insert(k, String::from_utf8_lossy(&v.0).trim_end_matches(['\n', '\r']).to_string());
        }
        for (k, v) in secret.string_data.unwrap_or_default() {
            out.insert(k, v);
        }
        Ok(out)
    }
}

/// Keeps each condition's `lastTransitionTime` from `old` when the condition of that type has
/// the same `status` there: a condition's time records a transition, not the latest look.
pub fn keep_transition_times(old: &serde_json::Value, new: &mut serde_json::Value) {
    let Some(old_conds) = old.get("conditions").and_then(|c| c.as_array()) else { return };
    let Some(new_conds) = new.get_mut("conditions").and_then(|c| c.as_array_mut()) else { return };
    for c in new_conds {
        let prev = old_conds.iter().find(|o| o.get("type") == c.get("type") && o.get("status") == c.get("status"));
        if let (Some(prev), Some(obj)) = (prev.and_then(|p| p.get("lastTransitionTime")), c.as_object_mut()) {
            obj.insert("lastTransitionTime".into(), prev.clone());
        }
    }
}

/// Writes `status` of `obj` with server-side apply (whole status, one field manager) — only
/// when it differs from what `obj` holds (compared after a round trip through the typed
/// status, with unchanged conditions keeping their transition time), so a reconcile that
/// finds nothing new writes nothing and does not retrigger itself. Returns whether it wrote.
pub async fn apply_status<K>(api: &Api<K>, obj: &K, status: serde_json::Value) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut status = status;
    let mut whole = serde_json::to_value(obj)?;
    let old = whole.get("status").cloned().unwrap_or(serde_json::Value::Null);
    keep_transition_times(&old, &mut status);
    whole["status"] = status.clone();
    let typed: K = serde_json::from_value(whole)?;
    let normalised = serde_json::to_value(&typed)?.get("status").cloned().unwrap_or(serde_json::Value::Null);
    if normalised == old {
        return Ok(false);
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let old = json!({"conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Other", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let mut new = json!({"conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:05:00Z"},
            {"type": "Other", "status": "False", "lastTransitionTime": "2026-01-01T00:05:00Z"}]});
        keep_transition_times(&old, &mut new);
        assert_eq!(new["conditions"][0]["lastTransitionTime"], "2026-01-01T00:00:00Z", "same status: kept");
        assert_eq!(new["conditions"][1]["lastTransitionTime"], "2026-01-01T00:05:00Z", "a transition: new time");
        let mut none = json!({"phase": "Ready"});
        keep_transition_times(&old, &mut none);
        assert_eq!(none, json!({"phase": "Ready"}));
    }
}
