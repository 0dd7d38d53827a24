//! Every Kubernetes API call the controller makes, as (apiGroup, resource, verbs). The chart's
//! RBAC is checked against `chart/hoard/rbac-allowlist.yaml`, and a test here keeps that file
//! equal to [`CALLS`] and [`NAMESPACE_CALLS`]. When code starts calling something new, add it
//! here first.
//!
//! File format (what the chart check and the end-to-end tests parse): `clusterRules` (a
//! ClusterRole) and `namespaceRules` (a Role in the controller's namespace), each a list of
//! `{apiGroups, resources, verbs}` with one resource per rule.

/// Calls in the controller's own namespace only (the leader Lease).
pub const NAMESPACE_CALLS: &[(&str, &str, &[&str])] =
    &[("coordination.k8s.io", "leases", &["get", "create", "update"])];

/// Cluster-wide calls: (API group, resource, verbs).
pub const CALLS: &[(&str, &str, &[&str])] = &[
    // Workload pods and agent pods (listed by selector), the target's volumes; a restore into
    // a claim no pod mounts, a backup of one, and a backup through a VolumeSnapshot create (and
    // afterwards list by label and delete) an exposer pod that mounts the claim or the clone.
    ("", "pods", &["get", "list", "create", "delete"]),
    // The snapshot path's clone claims are created, then listed by label and deleted.
    ("", "persistentvolumeclaims", &["get", "list", "create", "delete"]),
    ("", "persistentvolumes", &["get"]),
    // Repository passwords and object-store keys (read only, never logged).
    ("", "secrets", &["get"]),
    // Usage policies select namespaces by label; repository sync checks the namespace exists.
    ("", "namespaces", &["get"]),
    // Workload selectors.
    ("apps", "deployments", &["get"]),
    ("apps", "statefulsets", &["get"]),
    ("apps", "daemonsets", &["get"]),
    ("apps", "replicasets", &["get"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    // CSI snapshot path: a session's VolumeSnapshots (created, listed by label, kept by a patch
    // that drops the session's owner reference, deleted) and the classes to choose from.
    ("snapshot.storage.k8s.io", "volumesnapshots", &["get", "list", "create", "patch", "delete"]),
    ("snapshot.storage.k8s.io", "volumesnapshotclasses", &["list"]),
    // A restore from another namespace's VolumeSnapshot (with its consent): the source's content
    // is read for its handle, a pre-provisioned content (Retain) is created and later deleted.
    ("snapshot.storage.k8s.io", "volumesnapshotcontents", &["get", "create", "delete"]),
    ("hoard.dev", "backupstorages", &["get", "list", "watch"]),
    ("hoard.dev", "backupstorages/status", &["patch"]),
    ("hoard.dev", "retentionpolicies", &["get"]),
    ("hoard.dev", "repositories", &["get", "list", "watch", "create", "patch"]),
    ("hoard.dev", "repositories/status", &["patch"]),
    ("hoard.dev", "snapshots", &["get", "list", "watch", "create", "patch", "delete"]),
    ("hoard.dev", "snapshots/status", &["patch"]),
    ("hoard.dev", "backupconfigurations", &["get", "list", "watch"]),
    ("hoard.dev", "backupconfigurations/status", &["patch"]),
    ("hoard.dev", "backupsessions", &["get", "list", "watch", "create", "delete"]),
    ("hoard.dev", "backupsessions/status", &["patch"]),
    ("hoard.dev", "restoresessions", &["get", "list", "watch"]),
    ("hoard.dev", "restoresessions/status", &["patch"]),
];

/// The allow-list file's content for [`CALLS`].
pub fn render() -> String {
    let mut out = String::from(
        "# Every (apiGroup, resource, verbs) hoard-controller calls, and nothing else.\n\
         # Generated from controller/src/rbac.rs (a test fails when they differ); the chart's\n\
         # ClusterRole (clusterRules) and Role in the controller's namespace (namespaceRules)\n\
         # must grant exactly these.\n",
    );
    for (key, calls) in [("clusterRules", CALLS), ("namespaceRules", NAMESPACE_CALLS)] {
        out.push_str(&format!("{key}:\n"));
        for (group, resource, verbs) in calls {
            out.push_str(&format!(
                "  - apiGroups: [\"{group}\"]\n    resources: [{resource}]\n    verbs: [{}]\n",
                verbs.join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_file_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../chart/hoard/rbac-allowlist.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        if std::env::var_os("HOARD_UPDATE_RBAC").is_some() {
            std::fs::write(path, render()).expect("write allow-list");
            return;
        }
        assert_eq!(on_disk, render(), "run HOARD_UPDATE_RBAC=1 cargo test -p hoard-controller rbac");
        let parsed: serde_yaml::Value = serde_yaml::from_str(&on_disk).expect("valid YAML");
        assert_eq!(parsed["clusterRules"].as_sequence().map(Vec::len), Some(CALLS.len()));
        assert_eq!(parsed["namespaceRules"].as_sequence().map(Vec::len), Some(NAMESPACE_CALLS.len()));
    }
}
