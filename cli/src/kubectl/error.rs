//! The plugin's errors: each names the object it is about and the command to run next, and maps
//! to a distinct exit code (see [`PluginError::exit_code`]).

use std::fmt;

/// Exit codes of `kubectl hoard` (besides 0, 1 and clap's 2 for usage, and the repository codes
/// 10–14 that `repo` verbs share with `hoard`).
pub mod code {
    /// A usage problem clap cannot see (e.g. which session to trigger).
    pub const USAGE: u8 = 2;
    /// No usable kubeconfig, or the API server cannot be reached or refuses the credentials.
    pub const CLUSTER: u8 = 20;
    /// The named object (or the hoard CRDs) does not exist.
    pub const NOT_FOUND: u8 = 21;
    /// RBAC forbids the request.
    pub const FORBIDDEN: u8 = 22;
    /// The API server rejected the request (invalid, conflict, already exists).
    pub const REJECTED: u8 = 23;
    /// `watch`: the session ended Failed (or, for a restore, Invalid).
    pub const SESSION_FAILED: u8 = 30;
    /// `watch`: the backup session was Skipped (e.g. its configuration is paused).
    pub const SESSION_SKIPPED: u8 = 31;
    /// `watch`: `--timeout` passed before the session finished.
    pub const TIMEOUT: u8 = 32;
}

/// A Kubernetes resource as the plugin names it in messages.
#[derive(Debug, Clone, Copy)]
pub struct Res {
    /// Lower-case kind, as kubectl prints it: `backupconfiguration`.
    pub kind: &'static str,
    /// The command that lists these objects; `{ns}` is replaced by the namespace.
    pub list: &'static str,
    /// `kubectl auth can-i` resource name.
    pub resource: &'static str,
}

pub const BACKUP_CONFIGURATION: Res = Res {
    kind: "backupconfiguration",
    list: "kubectl get backupconfigurations -n {ns}",
    resource: "backupconfigurations.hoard.dev",
};
pub const BACKUP_SESSION: Res =
    Res { kind: "backupsession", list: "kubectl hoard sessions -n {ns}", resource: "backupsessions.hoard.dev" };
pub const RESTORE_SESSION: Res = Res {
    kind: "restoresession",
    list: "kubectl get restoresessions.hoard.dev -n {ns}",
    resource: "restoresessions.hoard.dev",
};
pub const SNAPSHOT: Res =
    Res { kind: "snapshot", list: "kubectl hoard snapshots -n {ns}", resource: "snapshots.hoard.dev" };
pub const REPOSITORY: Res =
    Res { kind: "repository", list: "kubectl get repositories.hoard.dev -n {ns}", resource: "repositories.hoard.dev" };
pub const BACKUP_STORAGE: Res =
    Res { kind: "backupstorage", list: "kubectl get backupstorages -n {ns}", resource: "backupstorages.hoard.dev" };
pub const SECRET: Res = Res { kind: "secret", list: "kubectl get secrets -n {ns}", resource: "secrets" };
pub const PVC: Res =
    Res { kind: "persistentvolumeclaim", list: "kubectl get pvc -n {ns}", resource: "persistentvolumeclaims" };
pub const DEPLOYMENT: Res =
    Res { kind: "deployment", list: "kubectl get deployments -n {ns}", resource: "deployments.apps" };
pub const STATEFUL_SET: Res =
    Res { kind: "statefulset", list: "kubectl get statefulsets -n {ns}", resource: "statefulsets.apps" };

impl Res {
    pub fn list_command(&self, ns: &str) -> String {
        self.list.replace("{ns}", ns)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No kubeconfig, a bad context, or an API server that cannot be reached.
    #[error("{0}")]
    Cluster(String),
    #[error("{kind} \"{name}\" not found in namespace \"{namespace}\"; list them with: {list}")]
    NotFound { kind: &'static str, name: String, namespace: String, list: String },
    #[error(
        "the hoard CRDs are not installed in this cluster ({resource} is unknown); install them with: helm install hoard chart/hoard -n hoard --create-namespace"
    )]
    CrdsMissing { resource: &'static str },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Usage(String),
    /// Something the plugin cannot do from where it runs (e.g. open a repository on a volume that
    /// only the agents mount).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    SessionFailed(String),
    #[error("{0}")]
    SessionSkipped(String),
    #[error("{0}")]
    Timeout(String),
}

impl PluginError {
    pub fn exit_code(&self) -> u8 {
        match self {
            PluginError::Cluster(_) => code::CLUSTER,
            PluginError::NotFound { .. } | PluginError::CrdsMissing { .. } => code::NOT_FOUND,
            PluginError::Forbidden(_) => code::FORBIDDEN,
            PluginError::Rejected(_) => code::REJECTED,
            PluginError::Usage(_) => code::USAGE,
            PluginError::Unsupported(_) => 1,
            PluginError::SessionFailed(_) => code::SESSION_FAILED,
            PluginError::SessionSkipped(_) => code::SESSION_SKIPPED,
            PluginError::Timeout(_) => code::TIMEOUT,
        }
    }

    pub fn not_found(res: &Res, name: &str, ns: &str) -> PluginError {
        PluginError::NotFound {
            kind: res.kind,
            name: name.to_string(),
            namespace: ns.to_string(),
            list: res.list_command(ns),
        }
    }
}

/// What the plugin was doing when the API server answered with an error.
#[derive(Debug, Clone, Copy)]
pub enum Verb {
    Get,
    List,
    Create,
    Patch,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Create => "create",
            Verb::Patch => "patch",
        })
    }
}

/// Turns a kube client error into a [`PluginError`] that names the object and what to do next.
/// `name` is the object's name for single-object verbs.
pub fn api_error(e: kube::Error, verb: Verb, res: &Res, name: Option<&str>, ns: Option<&str>) -> PluginError {
    let where_ = match ns {
        Some(ns) => format!(" in namespace \"{ns}\""),
        None => " in any namespace".to_string(),
    };
    let ns_flag = ns.map(|n| format!(" -n {n}")).unwrap_or_else(|| " -A".to_string());
    match e {
        kube::Error::Api(status) => {
            let what = match name {
                Some(n) => format!("{} \"{n}\"", res.kind),
                None => res.resource.to_string(),
            };
            match status.code {
                404 => {
                    // A missing object comes back as a Status naming it; a missing resource type
                    // (CRDs not installed) as a bare 404.
                    let names_object = status.details.as_ref().is_some_and(|d| !d.name.is_empty());
                    match (name, names_object || !res.resource.ends_with(".hoard.dev")) {
                        (Some(n), true) => PluginError::not_found(res, n, ns.unwrap_or("")),
                        _ => PluginError::CrdsMissing { resource: res.resource },
                    }
                }
                401 => PluginError::Cluster(format!(
                    "the API server did not accept the credentials to {verb} {what}{where_}: {}; check them with: kubectl auth whoami",
                    status.message
                )),
                403 => PluginError::Forbidden(format!(
                    "you may not {verb} {what}{where_}: {}; check with: kubectl auth can-i {verb} {}{ns_flag}",
                    status.message, res.resource
                )),
                409 | 422 | 400 => PluginError::Rejected(format!(
                    "the API server rejected the {verb} of {what}{where_}: {}",
                    status.message
                )),
                _ => PluginError::Cluster(format!(
                    "cannot {verb} {what}{where_}: {} (HTTP {}); check the cluster with: kubectl cluster-info",
                    status.message, status.code
                )),
            }
        }
        other => PluginError::Cluster(format!(
            "cannot {verb} {}{where_}: the API server is unreachable ({other}); check the cluster with: kubectl cluster-info",
            res.resource
        )),
    }
}
