//! hoard-csi: reading a volume through a CSI VolumeSnapshot, and mounting claims no pod
//! mounts. Pure planning, no I/O — the controller fetches the objects, calls these functions
//! and writes what they return:
//!
//! * [`types`]: the `snapshot.storage.k8s.io/v1` objects (VolumeSnapshot, VolumeSnapshotClass);
//! * [`class`]: which VolumeSnapshotClass a volume uses (explicit → the driver's one default →
//!   a clear error, never a silent live read);
//! * [`objects`]: names, labels and bodies of the VolumeSnapshot and its clone claim;
//! * [`exposer`]: the unprivileged pod that mounts a claim on a node with an agent;
//! * [`plan`]: the next step of one volume (snapshot → clone → exposer → ready), bounded in time;
//! * [`keep`]: VolumeSnapshots kept after their session, and which of them retention deletes;
//! * [`share`]: a VolumeSnapshot of one namespace imported into another for a restore (consent,
//!   a pre-provisioned content that retains the data).
//!
//! The agent never talks to the Kubernetes API: it gets an ordinary work order that names the
//! exposer pod's volume by identity.

pub mod class;
pub mod exposer;
pub mod keep;
pub mod objects;
pub mod plan;
pub mod share;
pub mod types;

/// `app.kubernetes.io/managed-by` on everything this path creates.
pub const MANAGED_BY: &str = "hoard-controller";
