//! The next step of one volume on the snapshot path, from what exists in the API: a pure
//! function of the observed VolumeSnapshot, clone claim and exposer pod and the time, so a
//! controller restarted at any point picks up where it was (every object has a fixed name,
//! see [`crate::objects::object_name`]).
//!
//! ```text
//! Snapshot source:  VolumeSnapshot ─ready─▶ clone claim ─Bound─▶ exposer pod ─Running─▶ Ready
//! Snapshot-only:    VolumeSnapshot ─ready─▶ SnapshotReady
//! Claim source:                                  (the claim) ──▶ exposer pod ─Running─▶ Ready
//! ```
//!
//! Every wait is bounded by a deadline. A snapshot being deleted, a clone that lost its volume,
//! or an exposer that ended fails the volume; the caller then deletes what exists (see
//! [`crate::objects::session_selector`]).

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};

use crate::exposer::{self, ExposerState};
use crate::types::VolumeSnapshot;

/// Where the exposer's volume comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A VolumeSnapshot of the claim (point in time), read through a clone.
    Snapshot,
    /// The claim itself (a claim no pod mounts, read or written live).
    Claim,
    /// A VolumeSnapshot that is the backup itself (snapshot-only): nothing is cloned or read.
    SnapshotOnly,
}

/// What exists now for the volume.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed<'a> {
    pub snapshot: Option<&'a VolumeSnapshot>,
    pub clone: Option<&'a PersistentVolumeClaim>,
    pub exposer: Option<&'a Pod>,
}

/// The exposer's volume, ready for a work order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposed {
    pub node: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// The claim the exposer mounts (the clone, or the claim itself).
    pub claim: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    CreateSnapshot,
    CreateClone,
    CreateExposer,
    /// Nothing to do but wait; the message says for what (for status).
    Wait(String),
    Ready(Exposed),
    /// Snapshot-only: the VolumeSnapshot is ready to use, and that is the backup.
    SnapshotReady,
    /// The volume cannot be read this way; clean up and fail it with this message.
    Fail(String),
}

/// The next step for a volume read from `source`, given what exists and the time; waiting
/// past `deadline` (the session's start plus its `readyTimeout`) fails the volume.
pub fn next(source: &Source, seen: Observed<'_>, deadline: DateTime<Utc>, now: DateTime<Utc>) -> Step {
    let wait = |what: String| {
        if now > deadline { Step::Fail(format!("{what}: not done within the readyTimeout")) } else { Step::Wait(what) }
    };

    let claim = match source {
        Source::Claim => None,
        Source::Snapshot | Source::SnapshotOnly => {
            let Some(vs) = seen.snapshot else { return Step::CreateSnapshot };
            let name = vs.metadata.name.clone().unwrap_or_default();
            if vs.metadata.deletion_timestamp.is_some() {
                return Step::Fail(format!("VolumeSnapshot {name} is being deleted"));
            }
            if !vs.ready() {
                return match vs.error_message() {
                    Some(e) => wait(format!("VolumeSnapshot {name} is not ready to use: {e}")),
                    None => wait(format!("waiting for VolumeSnapshot {name} to be ready to use")),
                };
            }
            if *source == Source::SnapshotOnly {
                return Step::SnapshotReady;
            }
            let Some(clone) = seen.clone else { return Step::CreateClone };
            let clone_name = clone.metadata.name.clone().unwrap_or_default();
            if clone.metadata.deletion_timestamp.is_some() {
                return Step::Fail(format!("clone claim {clone_name} is being deleted"));
            }
            match clone.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Bound") => {}
                Some("Lost") => return Step::Fail(format!("clone claim {clone_name} lost its volume")),
                _ => return wait(format!("waiting for clone claim {clone_name} to be bound")),
            }
            Some(clone_name)
        }
    };
    let Some(pod) = seen.exposer else { return Step::CreateExposer };
    match exposer::state(pod) {
        ExposerState::Running => {
            let spec = pod.spec.as_ref();
            let mounted = spec
                .and_then(|s| s.volumes.as_ref())
                .and_then(|v| v.iter().find_map(|v| v.persistent_volume_claim.as_ref()))
                .map(|c| c.claim_name.clone())
                .unwrap_or_default();
            if claim.as_ref().is_some_and(|c| *c != mounted) {
                return Step::Fail(format!("exposer pod mounts {mounted}, not the clone"));
            }
            Step::Ready(Exposed {
                node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
                pod_name: pod.metadata.name.clone().unwrap_or_default(),
                pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
                claim: mounted,
            })
        }
        ExposerState::Waiting(msg) => wait(msg),
        ExposerState::Gone(msg) => Step::Fail(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("time")
    }

    fn created(s: i64) -> String {
        t(s).to_rfc3339()
    }

    fn snapshot(ready: bool, error: Option<&str>) -> VolumeSnapshot {
        let mut status = json!({"readyToUse": ready});
        if let Some(e) = error {
            status["error"] = json!({"message": e});
        }
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "hoard-s-data", "namespace": "ns", "creationTimestamp": created(0)},
            "spec": {"source": {"persistentVolumeClaimName": "data"}},
            "status": status}))
        .expect("vs")
    }

    fn clone(phase: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "hoard-s-data", "namespace": "ns", "creationTimestamp": created(5)},
            "status": {"phase": phase}}))
        .expect("pvc")
    }

    fn pod(phase: &str, claim: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "hoard-s-data", "namespace": "ns", "uid": "pod-uid", "creationTimestamp": created(9)},
            "spec": {"nodeName": "n1", "containers": [{"name": "hold"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]},
            "status": {"phase": phase}}))
        .expect("pod")
    }

    const TIMEOUT: i64 = 600;

    fn step(source: &Source, seen: Observed<'_>, at: i64) -> Step {
        next(source, seen, t(TIMEOUT), t(at))
    }

    #[test]
    fn snapshot_path_walks_its_steps_in_order() {
        let s = Source::Snapshot;
        assert_eq!(step(&s, Observed::default(), 0), Step::CreateSnapshot);
        let (pending, ready) = (snapshot(false, None), snapshot(true, None));
        assert!(matches!(step(&s, Observed { snapshot: Some(&pending), ..Default::default() }, 1), Step::Wait(_)));
        assert_eq!(step(&s, Observed { snapshot: Some(&ready), ..Default::default() }, 2), Step::CreateClone);
        let (unbound, bound) = (clone("Pending"), clone("Bound"));
        let seen = Observed { snapshot: Some(&ready), clone: Some(&unbound), exposer: None };
        assert!(matches!(step(&s, seen, 6), Step::Wait(m) if m.contains("to be bound")));
        let seen = Observed { snapshot: Some(&ready), clone: Some(&bound), exposer: None };
        assert_eq!(step(&s, seen, 7), Step::CreateExposer);
        let (starting, running) = (pod("Pending", "hoard-s-data"), pod("Running", "hoard-s-data"));
        let seen = Observed { snapshot: Some(&ready), clone: Some(&bound), exposer: Some(&starting) };
        assert!(matches!(step(&s, seen, 10), Step::Wait(_)));
        let seen = Observed { snapshot: Some(&ready), clone: Some(&bound), exposer: Some(&running) };
        assert_eq!(
            step(&s, seen, 11),
            Step::Ready(Exposed {
                node: "n1".into(),
                pod_name: "hoard-s-data".into(),
                pod_uid: "pod-uid".into(),
                claim: "hoard-s-data".into()
            })
        );
    }

    #[test]
    fn every_wait_is_bounded_by_the_deadline() {
        let s = Source::Snapshot;
        let pending = snapshot(false, Some("driver says no"));
        let seen = Observed { snapshot: Some(&pending), ..Default::default() };
        assert!(matches!(step(&s, seen, TIMEOUT), Step::Wait(m) if m.contains("driver says no")));
        match step(&s, seen, TIMEOUT + 1) {
            Step::Fail(m) => assert!(m.contains("driver says no") && m.contains("readyTimeout"), "{m}"),
            other => panic!("{other:?}"),
        }
        let (ready, unbound) = (snapshot(true, None), clone("Pending"));
        let seen = Observed { snapshot: Some(&ready), clone: Some(&unbound), exposer: None };
        assert!(matches!(step(&s, seen, TIMEOUT + 1), Step::Fail(m) if m.contains("to be bound")));
        let starting = pod("Pending", "data");
        let seen = Observed { exposer: Some(&starting), ..Default::default() };
        assert!(matches!(step(&Source::Claim, seen, TIMEOUT + 1), Step::Fail(_)));
        assert_eq!(step(&s, Observed::default(), TIMEOUT + 1), Step::CreateSnapshot, "creating is not waiting");
    }

    #[test]
    fn lost_or_ended_objects_fail_the_volume() {
        let s = Source::Snapshot;
        let ready = snapshot(true, None);
        let lost = clone("Lost");
        assert!(matches!(
            step(&s, Observed { snapshot: Some(&ready), clone: Some(&lost), exposer: None }, 8),
            Step::Fail(_)
        ));
        let bound = clone("Bound");
        let ended = pod("Failed", "hoard-s-data");
        let seen = Observed { snapshot: Some(&ready), clone: Some(&bound), exposer: Some(&ended) };
        assert!(matches!(step(&s, seen, 12), Step::Fail(m) if m.contains("ended")));
        let wrong = pod("Running", "the-live-claim");
        let seen = Observed { snapshot: Some(&ready), clone: Some(&bound), exposer: Some(&wrong) };
        assert!(matches!(step(&s, seen, 12), Step::Fail(m) if m.contains("not the clone")));
        let mut deleting = snapshot(true, None);
        deleting.metadata.deletion_timestamp = serde_json::from_value(json!(created(3))).expect("time");
        assert!(matches!(step(&s, Observed { snapshot: Some(&deleting), ..Default::default() }, 4), Step::Fail(_)));
    }

    #[test]
    fn snapshot_only_ends_at_a_ready_snapshot() {
        let s = Source::SnapshotOnly;
        assert_eq!(step(&s, Observed::default(), 0), Step::CreateSnapshot);
        let (pending, ready) = (snapshot(false, None), snapshot(true, None));
        assert!(matches!(step(&s, Observed { snapshot: Some(&pending), ..Default::default() }, 1), Step::Wait(_)));
        let seen = Observed { snapshot: Some(&pending), ..Default::default() };
        assert!(matches!(step(&s, seen, TIMEOUT + 1), Step::Fail(m) if m.contains("readyTimeout")));
        assert_eq!(step(&s, Observed { snapshot: Some(&ready), ..Default::default() }, 2), Step::SnapshotReady);
    }

    #[test]
    fn a_claim_source_needs_only_the_exposer() {
        let s = Source::Claim;
        assert_eq!(step(&s, Observed::default(), 0), Step::CreateExposer);
        let running = pod("Running", "data");
        match step(&s, Observed { exposer: Some(&running), ..Default::default() }, 10) {
            Step::Ready(e) => assert_eq!((e.claim.as_str(), e.node.as_str()), ("data", "n1")),
            other => panic!("{other:?}"),
        }
    }
}
