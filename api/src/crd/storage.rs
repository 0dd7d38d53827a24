//! Where backups live and how long they are kept: BackupStorage, RetentionPolicy, and the
//! objects the controller writes to describe what a bucket holds (Repository, Snapshot).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, DeletionPolicy, ObjectRef, SecretRef, TargetRef, UsagePolicy};

/// A reusable object-store location. Several configurations and namespaces share one storage;
/// each gets its own repository under it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hoard.dev",
    version = "v1alpha1",
    kind = "BackupStorage",
    namespaced,
    status = "BackupStorageStatus",
    shortname = "bst",
    category = "hoard",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".spec.storage.provider"}"#,
    printcolumn = r#"{"name":"Default","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupStorageSpec {
    pub storage: StorageBackend,
    #[serde(default)]
    pub usage_policy: UsagePolicy,
    /// The storage configurations in admitted namespaces use when they name none.
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    S3,
    Gcs,
    Azure,
    Local,
}

/// Exactly one provider block, matching `provider`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.provider == 's3' ? has(self.s3) : !has(self.s3)").message("spec.storage.s3 must be set exactly when provider is s3"))]
#[x_kube(validation = Rule::new("self.provider == 'gcs' ? has(self.gcs) : !has(self.gcs)").message("spec.storage.gcs must be set exactly when provider is gcs"))]
#[x_kube(validation = Rule::new("self.provider == 'azure' ? has(self.azure) : !has(self.azure)").message("spec.storage.azure must be set exactly when provider is azure"))]
#[x_kube(validation = Rule::new("self.provider == 'local' ? has(self.local) : !has(self.local)").message("spec.storage.local must be set exactly when provider is local"))]
pub struct StorageBackend {
    pub provider: Provider,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcs: Option<GcsStorage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureStorage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalStorage>,
}

/// An S3 or S3-compatible bucket. The Secret holds `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY` and optionally `AWS_SESSION_TOKEN`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    /// e.g. `https://s3.eu-west-1.amazonaws.com` or `http://minio.minio:9000`; empty = AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/.*)?$"))]
    pub endpoint: Option<String>,
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$"))]
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^/].*[^/]$|^[^/]$"))]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// A Google Cloud Storage bucket. The Secret holds `GOOGLE_SERVICE_ACCOUNT_JSON`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcsStorage {
    #[schemars(length(min = 3, max = 222))]
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// An Azure Blob container. The Secret holds `AZURE_ACCOUNT_KEY`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureStorage {
    #[schemars(regex(pattern = r"^[a-z0-9]{3,24}$"))]
    pub storage_account: String,
    #[schemars(regex(pattern = r"^[a-z0-9](-?[a-z0-9])+$"))]
    pub container: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// For Azure Stack or an emulator, e.g. `http://127.0.0.1:10000/devstoreaccount1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// A filesystem the agents have mounted (NFS, a shared PVC) at `mountPath` in every agent pod
/// (chart value `agent.extraVolumes`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalStorage {
    #[schemars(regex(pattern = r"^/([^/\x00]+/?)*$"))]
    pub mount_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStorageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<StoragePhase>,
    /// Sum of the repositories' sizes, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<StoredRepository>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StoragePhase {
    Ready,
    NotReady,
}

/// One repository found in (or written to) the storage's metadata object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredRepository {
    pub name: String,
    pub namespace: String,
    pub path: String,
    /// Whether a Repository object exists for it in this cluster.
    #[serde(default)]
    pub synced: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How long snapshots are kept. Rules are those of `hoard forget` (and restic's): a snapshot
/// survives if any rule keeps it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "hoard.dev",
    version = "v1alpha1",
    kind = "RetentionPolicy",
    namespaced,
    shortname = "rp",
    category = "hoard",
    printcolumn = r#"{"name":"Max-Period","type":"string","jsonPath":".spec.maxRetentionPeriod"}"#,
    printcolumn = r#"{"name":"Default","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicySpec {
    /// Snapshots older than this are removed whatever the other rules say, e.g. `30d`, `1y6mo`
    /// (units largest first, each once: y, mo months, w, d, h, m minutes); a zero period is no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = super::common::PERIOD_PATTERN), length(min = 2))]
    pub max_retention_period: Option<String>,
    #[serde(default)]
    pub successful_snapshots: SuccessfulSnapshots,
    #[serde(default)]
    pub failed_snapshots: FailedSnapshots,
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub usage_policy: UsagePolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SuccessfulSnapshots {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub yearly: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedSnapshots {
    /// Failed Snapshot objects kept for inspection (default 1).
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub last: u32,
}

impl Default for FailedSnapshots {
    fn default() -> Self {
        Self { last: 1 }
    }
}

fn one() -> u32 {
    1
}

/// One repository: a prefix in a BackupStorage holding the snapshots of one target. Created by
/// the controller from a BackupConfiguration, or from the storage's metadata object when a
/// cluster is pointed at an existing bucket.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hoard.dev",
    version = "v1alpha1",
    kind = "Repository",
    namespaced,
    status = "RepositoryStatus",
    shortname = "repo",
    category = "hoard",
    printcolumn = r#"{"name":"Storage","type":"string","jsonPath":".spec.storageRef.name"}"#,
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.path"}"#,
    printcolumn = r#"{"name":"Snapshots","type":"integer","jsonPath":".status.snapshotCount"}"#,
    printcolumn = r#"{"name":"Stored","type":"integer","jsonPath":".status.totalSize"}"#,
    printcolumn = r#"{"name":"Integrity","type":"boolean","jsonPath":".status.integrity"}"#,
    printcolumn = r#"{"name":"Last-Backup","type":"date","jsonPath":".status.lastBackupTime"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.path != 'hoard-meta' && !self.path.startsWith('hoard-meta/')").message("path: hoard-meta/ is reserved for hoard's own objects"))]
pub struct RepositorySpec {
    /// The workload or claim whose data this repository holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_ref: Option<AppRef>,
    pub storage_ref: ObjectRef,
    /// Directory under the storage's prefix, e.g. `demo/app`.
    /// No segment may start with a dot, so `.` and `..` cannot appear.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9_\-][A-Za-z0-9._\-]*(/[A-Za-z0-9_\-][A-Za-z0-9._\-]*)*$"),
        length(max = 512)
    )]
    pub path: String,
    /// Secret with key `RESTIC_PASSWORD` (or `HOARD_PASSWORD`) that opens the repository.
    pub encryption_secret: SecretRef,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    #[serde(default)]
    pub paused: bool,
    /// Which other namespaces may restore from this repository (default: none). A restore
    /// from another namespace needs this and the storage's usage policy to admit it. Left to
    /// the user: the controller never writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_policy: Option<UsagePolicy>,
}

/// The application a repository or snapshot belongs to (namespace included, unlike TargetRef).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppRef {
    #[serde(flatten)]
    pub target: TargetRef,
    pub namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RepositoryPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_count: Option<u64>,
    /// Bytes of data the Succeeded snapshots hold (what restoring each of them would write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Bytes the repository occupies in its storage (every object under its path, after
    /// deduplication and compression), as of the last pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_time: Option<String>,
    /// Result of the last structural check (keys, index against packs, snapshots, trees): true
    /// when nothing was damaged. Run by the controller every `--check-interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<String>,
    /// The damaged objects the last check found (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub integrity_problems: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_snapshots: Vec<SnapshotInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RepositoryPhase {
    Pending,
    Ready,
    NotReady,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SnapshotPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<String>,
}

/// One backup of one target into one repository (one per repository per BackupSession). Each
/// volume is a component with its own repository snapshot.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hoard.dev",
    version = "v1alpha1",
    kind = "Snapshot",
    namespaced,
    status = "SnapshotStatus",
    shortname = "snap",
    category = "hoard",
    printcolumn = r#"{"name":"Repository","type":"string","jsonPath":".spec.repository"}"#,
    printcolumn = r#"{"name":"Session","type":"string","jsonPath":".spec.session"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".status.size"}"#,
    printcolumn = r#"{"name":"Snapshot-Time","type":"date","jsonPath":".status.snapshotTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// Repository object (same namespace).
    pub repository: String,
    /// Session name inside the BackupConfiguration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The BackupSession that made it (empty for snapshots re-created by repository sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_ref: Option<AppRef>,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SnapshotPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SnapshotPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<String>,
    /// Total bytes of the components' data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_components: Option<u32>,
    /// Keyed by component name (one per volume, e.g. `data` or `data-web-0`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, ComponentStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ComponentPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// One volume's backup (or restore) as the agent reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ComponentPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The source claim, for PVC-backed volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// How the data is read (absent: `Live`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_from: Option<ReadFrom>,
    /// Where the data was read from when not from the live mount: the CSI VolumeSnapshot,
    /// its class and when it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot: Option<VolumeSnapshotSource>,
    /// The repository snapshot id (`hoard snapshots` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// e.g. `12.5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ComponentProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub attempts: u32,
    /// Set on a failed component that will be tried again at this time (RFC 3339); absent on
    /// a failure that is final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<String>,
    /// Before its work order is sent: the step of the snapshot path it waits for (a
    /// VolumeSnapshot to be ready to use, a clone to be bound, the exposer pod to run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
}

/// Where a component's data is read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ReadFrom {
    /// The mount of the workload's pod, as it changes.
    Live,
    /// A clone of a CSI VolumeSnapshot (one point in time), mounted by a short-lived pod.
    VolumeSnapshot,
    /// A claim no pod mounts, mounted by a short-lived pod.
    Claim,
}

/// The CSI VolumeSnapshot a component's data came from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    /// The VolumeSnapshot's name (same namespace); it is deleted after the upload unless the
    /// session's policy keeps it.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// When the storage system cut the snapshot (RFC 3339): the point in time of the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    /// The VolumeSnapshot was kept after the session (`volumeSnapshot.keepLast`) and can be
    /// restored into a new claim until retention deletes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentProgress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_uploaded: u64,
    pub bytes_per_second: u64,
    /// Seconds left; absent while unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
}
