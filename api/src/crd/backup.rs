//! What to back up and when (BackupConfiguration), one run of it (BackupSession), and bringing
//! data back (RestoreSession).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, DeletionPolicy, ObjectRef, SecretRef, TargetRef};
use super::storage::{ComponentStatus, SnapshotPhase};

/// Backs up the volumes of one workload or claim on one or more cron schedules, into one or
/// more repositories per schedule.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hoard.dev",
    version = "v1alpha1",
    kind = "BackupConfiguration",
    namespaced,
    status = "BackupConfigurationStatus",
    shortname = "bc",
    category = "hoard",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.target.name"}"#,
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.target.kind"}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.paused"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.sessions.all(s, s.repositories.all(r, self.backends.exists(b, b.name == r.backend)))").message("every session repository must name one of spec.backends"))]
pub struct BackupConfigurationSpec {
    pub target: TargetRef,
    /// Unique by name (the API server enforces it).
    #[schemars(length(min = 1, max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub backends: Vec<Backend>,
    /// Unique by name (the API server enforces it).
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub sessions: Vec<SessionConfig>,
    /// No scheduled session starts while paused; sessions created by hand are Skipped.
    #[serde(default)]
    pub paused: bool,
}

/// A named storage + retention pair that sessions' repositories refer to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    pub storage_ref: ObjectRef,
    /// Absent: keep every snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policy: Option<ObjectRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionConfig {
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    pub scheduler: Scheduler,
    /// Unique by name (the API server enforces it).
    #[schemars(length(min = 1, max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub repositories: Vec<RepositoryConfig>,
    /// Pod volume names to back up; empty = every PVC-backed volume of the target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Restic-style patterns, relative to the volume root, to back up; empty = everything. When
    /// set, only matching paths (a matching directory with everything below it) and the
    /// directories leading to them are backed up. A pattern with a `/` matches the path below
    /// the volume root, any other an entry's name at any depth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Restic-style patterns, relative to the volume root, to leave out. They win over `include`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub retry_config: RetryConfig,
    /// The whole session (all volumes, all repositories) must finish within this, e.g. `2h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub backup_timeout: Option<String>,
    /// Finished BackupSessions kept per outcome (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub session_history_limit: Option<u32>,
    /// Read each PVC-backed volume from a CSI VolumeSnapshot (a point-in-time copy) instead of
    /// the live mount: snapshot → clone claim → a short-lived pod mounts the clone on a node
    /// with an agent → the agent backs the clone up → all three are deleted when the session
    /// ends. Volumes that are not CSI claims are read live. Absent: live reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot: Option<VolumeSnapshotPolicy>,
}

/// How a session uses CSI VolumeSnapshots.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotPolicy {
    /// The VolumeSnapshotClass for every volume; absent: the class annotated
    /// `snapshot.storage.kubernetes.io/is-default-class: "true"` whose driver is the volume's
    /// CSI driver (none, or more than one, fails the volume with a message naming them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub class_name: Option<String>,
    /// Per pod volume name: a class that wins over `className` for that volume.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_classes: BTreeMap<String, String>,
    /// StorageClass of the clone claims; default: the source claim's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// How long a VolumeSnapshot may take to become ready to use, and then its clone to be
    /// bound and mounted, e.g. `10m` (default). Past it the volume fails and is cleaned up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub ready_timeout: Option<String>,
    /// What to do when no VolumeSnapshotClass can be chosen for a volume: `Fail` (default) or
    /// `Live` (read the live mount instead, and say so in the component's status).
    #[serde(default)]
    pub fallback: SnapshotFallback,
    /// Keep the newest this many VolumeSnapshots per volume of this session after it succeeds,
    /// as fast local restore points (restore: RestoreSession `dataSource.volumeSnapshot`);
    /// older kept ones are deleted. 0 (default): each is deleted when its session ends.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = 1000))]
    pub keep_last: u32,
    /// `false`: snapshot-only — the VolumeSnapshot is the backup; nothing is read or uploaded
    /// (needs `keepLast` ≥ 1). Default `true`: every VolumeSnapshot is also uploaded.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub upload: bool,
}

impl Default for VolumeSnapshotPolicy {
    fn default() -> Self {
        Self {
            class_name: None,
            volume_classes: BTreeMap::new(),
            storage_class_name: None,
            ready_timeout: None,
            fallback: SnapshotFallback::Fail,
            keep_last: 0,
            upload: true,
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A restore's choice for entries that already exist (see [`RestoreSessionSpec::overwrite`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OverwritePolicy {
    #[default]
    Never,
    IfChanged,
    IfNewer,
    Always,
}

impl From<OverwritePolicy> for crate::agent::v1::Overwrite {
    fn from(p: OverwritePolicy) -> Self {
        match p {
            OverwritePolicy::Never => Self::Never,
            OverwritePolicy::IfChanged => Self::IfChanged,
            OverwritePolicy::IfNewer => Self::IfNewer,
            OverwritePolicy::Always => Self::Always,
        }
    }
}

impl From<crate::agent::v1::Overwrite> for hoard_core::restore::Overwrite {
    fn from(p: crate::agent::v1::Overwrite) -> Self {
        use crate::agent::v1::Overwrite as Wire;
        match p {
            Wire::Never => Self::Never,
            Wire::IfChanged => Self::IfChanged,
            Wire::IfNewer => Self::IfNewer,
            Wire::Always => Self::Always,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SnapshotFallback {
    #[default]
    Fail,
    Live,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Scheduler {
    /// Five-field cron (`m h dom mon dow`) or a macro (`@hourly`, `@daily`, …). Evaluated by
    /// the controller; no CronJob is created.
    #[schemars(regex(pattern = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"))]
    pub schedule: String,
    /// IANA time zone for the schedule, e.g. `Europe/Berlin` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Stop scheduling this session only (`spec.paused` stops all of them).
    #[serde(default)]
    pub suspend: bool,
    /// What to do with runs missed while the controller was down or the config paused.
    #[serde(default)]
    pub missed_runs: MissedRuns,
    /// A run that cannot start within this long after its time counts as missed (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub starting_deadline: Option<String>,
}

/// KubeStash leaves missed runs to the CronJob controller's opaque rules; hoard makes the choice
/// explicit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MissedRuns {
    /// Run once now for the most recent missed time (if within the starting deadline).
    #[default]
    RunLatest,
    /// Do not catch up; wait for the next scheduled time.
    Skip,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.directory) || (self.directory != 'hoard-meta' && !self.directory.startsWith('hoard-meta/'))").message("directory: hoard-meta/ is reserved for hoard's own objects"))]
pub struct RepositoryConfig {
    /// Name of the Repository object the controller creates (same namespace).
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9\-.]{0,251}[a-z0-9])?$"), length(max = 253))]
    pub name: String,
    /// One of spec.backends[].name.
    #[schemars(length(min = 1, max = 63))]
    pub backend: String,
    /// Directory under the storage prefix; default `<namespace>/<repository name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9_\-][A-Za-z0-9._\-]*(/[A-Za-z0-9_\-][A-Za-z0-9._\-]*)*$"),
        length(max = 512)
    )]
    pub directory: Option<String>,
    /// Secret with `RESTIC_PASSWORD` (or `HOARD_PASSWORD`): the repository password.
    pub encryption_secret: SecretRef,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    /// Retries of a failed component (volume × repository) before the session fails.
    #[serde(default = "default_retries")]
    #[schemars(range(min = 0, max = 10))]
    pub max_retry: u32,
    /// Wait before a retry, e.g. `30s`.
    #[serde(default = "default_delay")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub delay: String,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_retry: default_retries(), delay: default_delay() }
    }
}

fn default_retries() -> u32 {
    2
}

fn default_delay() -> String {
    "30s".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupConfigurationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ConfigurationPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_found: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionScheduleStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConfigurationPhase {
    Ready,
    NotReady,
    Invalid,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionScheduleStatus {
    pub name: String,
    /// RFC 3339; absent while paused or suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule: Option<String>,
    /// The last scheduled time the scheduler handled, started or missed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_session: Option<String>,
    /// Runs not started, counted since the controller began.
    #[serde(default)]
    pub missed_runs: u32,
}

/// One run of one session of a BackupConfiguration. The scheduler creates them; so can a user
/// (instant backup) or `kubectl hoard trigger`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hoard.dev",
    version = "v1alpha1",
    kind = "BackupSession",
    namespaced,
    status = "BackupSessionStatus",
    shortname = "bs",
    category = "hoard",
    printcolumn = r#"{"name":"Config","type":"string","jsonPath":".spec.invoker.name"}"#,
    printcolumn = r#"{"name":"Session","type":"string","jsonPath":".spec.session"}"#,
    printcolumn = r#"{"name":"Trigger","type":"string","jsonPath":".spec.trigger"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Duration","type":"string","jsonPath":".status.duration"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a BackupSession's spec is immutable"))]
pub struct BackupSessionSpec {
    pub invoker: Invoker,
    /// Session name in the configuration.
    pub session: String,
    #[serde(default)]
    pub trigger: Trigger,
    /// For scheduled sessions: the time the schedule fired for (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Invoker {
    #[serde(default = "hoard_group")]
    pub api_group: String,
    #[serde(default = "bc_kind")]
    #[schemars(regex(pattern = r"^BackupConfiguration$"))]
    pub kind: String,
    pub name: String,
}

impl Invoker {
    pub fn configuration(name: impl Into<String>) -> Self {
        Self { api_group: hoard_group(), kind: bc_kind(), name: name.into() }
    }
}

fn hoard_group() -> String {
    super::GROUP.into()
}

fn bc_kind() -> String {
    "BackupConfiguration".into()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Trigger {
    Scheduled,
    #[default]
    Manual,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SessionPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

impl SessionPhase {
    pub fn is_finished(self) -> bool {
        matches!(self, SessionPhase::Succeeded | SessionPhase::Failed | SessionPhase::Skipped)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSessionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// The session fails if still running at this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_snapshots: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SessionSnapshot>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retention_policy: Vec<RetentionApplied>,
    /// Why the session was skipped or failed, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionSnapshot {
    pub name: String,
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SnapshotPhase>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionApplied {
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RetentionPhase>,
    /// Repository snapshots removed by this application.
    #[serde(default)]
    pub removed: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RetentionPhase {
    Pending,
    Applied,
    FailedToApply,
}

/// Restores volumes of a workload or a claim from a repository snapshot.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hoard.dev",
    version = "v1alpha1",
    kind = "RestoreSession",
    namespaced,
    status = "RestoreSessionStatus",
    shortname = "rs",
    category = "hoard",
    printcolumn = r#"{"name":"Repository","type":"string","jsonPath":".spec.dataSource.repository"}"#,
    printcolumn = r#"{"name":"Snapshot","type":"string","jsonPath":".spec.dataSource.snapshot"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Duration","type":"string","jsonPath":".status.duration"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a RestoreSession's spec is immutable; create a new one"))]
#[x_kube(validation = Rule::new("!has(self.claim) || has(self.dataSource.volumeSnapshot)").message("spec.claim shapes the claim a VolumeSnapshot is restored into: it needs dataSource.volumeSnapshot"))]
pub struct RestoreSessionSpec {
    pub target: TargetRef,
    pub data_source: DataSource,
    /// e.g. `1h`; the restore fails if not done by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub restore_timeout: Option<String>,
    /// What happens to files already in the target volumes, as `hoard restore --overwrite`:
    /// `Never` (the default) refuses a volume that holds anything before writing; `IfChanged`
    /// replaces an entry unless kind, size and modification time match, `IfNewer` when the
    /// snapshot's entry is newer, `Always` replaces it. Entries the snapshot lacks stay.
    #[serde(default)]
    pub overwrite: OverwritePolicy,
    /// With `dataSource.volumeSnapshot`: how the new claim is made. Each field left out comes
    /// from the snapshot's source claim (size: the larger of its request and the snapshot's
    /// restore size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimOverrides>,
}

/// Size, storage class and access modes of a claim restored from a VolumeSnapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimOverrides {
    /// e.g. `20Gi`; not smaller than the snapshot's restore size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"))]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<AccessMode>,
}

/// A PersistentVolumeClaim access mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadOnlyMany,
    ReadWriteMany,
    ReadWriteOncePod,
}

impl AccessMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadWriteOnce => "ReadWriteOnce",
            AccessMode::ReadOnlyMany => "ReadOnlyMany",
            AccessMode::ReadWriteMany => "ReadWriteMany",
            AccessMode::ReadWriteOncePod => "ReadWriteOncePod",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSource {
    /// Namespace of the Repository and Snapshot, or of the VolumeSnapshot (default: the
    /// RestoreSession's own). Another namespace's VolumeSnapshot must consent: annotated
    /// `hoard.dev/restore-into-namespaces` with this RestoreSession's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Repository object name (empty with `volumeSnapshot`).
    #[serde(default)]
    pub repository: String,
    /// Instead of a repository: a VolumeSnapshot (in `namespace`) restored into the target
    /// PersistentVolumeClaim — by the CSI driver when the claim does not exist yet, else by the
    /// node's agent copying a clone of it (then `overwrite` applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub volume_snapshot: Option<String>,
    /// Snapshot object name, or `latest` (the newest Succeeded snapshot of the repository).
    #[serde(default = "latest")]
    pub snapshot: String,
    /// Components to restore; empty = all. A component maps to the target volume of the same
    /// name unless `volumeMap` says otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    /// component name → target pod volume name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_map: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Defaults to the Repository's encryption secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_secret: Option<SecretRef>,
}

fn latest() -> String {
    "latest".into()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Invalid,
}

impl RestorePhase {
    pub fn is_finished(self) -> bool {
        matches!(self, RestorePhase::Succeeded | RestorePhase::Failed | RestorePhase::Invalid)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSessionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_found: Option<bool>,
    /// The Snapshot object `latest` resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_deadline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_components: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, ComponentStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
