//! Retention: which repository snapshots a RetentionPolicy removes, and which Snapshot objects
//! go with them. Pure; the shell forgets the returned ids and then prunes as its own bounded
//! step (so a slow prune never holds a session in Running).
//!
//! Mapping to the core planner (restic's `forget` rules): `successfulSnapshots.{last, hourly,
//! daily, weekly, monthly, yearly}` → `keep_*`; `failedSnapshots.last` → `keep_last_failed`.
//! Snapshots are grouped by host (namespace/target) and the `hoard.dev/component` label, so
//! every volume keeps its own history. `maxRetentionPeriod` is a hard limit applied first:
//! older snapshots go whatever the other rules say. A policy with no rule for successful
//! snapshots keeps all of them (the core planner would refuse it).

use chrono::{DateTime, Duration, Offset, Utc};
use hoard_api::crd::{RetentionPolicySpec, parse_period};
use hoard_core::Id;
use hoard_core::retention::{GroupBy, KeepCount, RetentionPolicy, plan};
use hoard_core::snapshot::Snapshot;

use crate::error::{Error, Result};

/// Snapshot label naming the component (one volume) inside a repository snapshot.
pub const COMPONENT_LABEL: &str = "hoard.dev/component";

pub fn core_policy(spec: &RetentionPolicySpec) -> RetentionPolicy {
    let c = |n: Option<u32>| n.filter(|n| *n > 0).map(KeepCount::Count);
    let s = &spec.successful_snapshots;
    let mut p = RetentionPolicy {
        keep_last: c(s.last),
        keep_hourly: c(s.hourly),
        keep_daily: c(s.daily),
        keep_weekly: c(s.weekly),
        keep_monthly: c(s.monthly),
        keep_yearly: c(s.yearly),
        keep_last_failed: Some(spec.failed_snapshots.last),
        ..Default::default()
    };
    if [p.keep_last, p.keep_hourly, p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly]
        .iter()
        .all(Option::is_none)
    {
        p.keep_last = Some(KeepCount::Unlimited);
    }
    p
}

pub fn group_by() -> GroupBy {
    GroupBy { host: true, tags: false, labels: vec![COMPONENT_LABEL.to_string()], all_labels: false }
}

/// The repository snapshot ids `spec` removes from `snapshots` at `now`, oldest first.
pub fn plan_forget(snapshots: &[(Id, Snapshot)], spec: &RetentionPolicySpec, now: DateTime<Utc>) -> Result<Vec<Id>> {
    let cutoff = match spec.max_retention_period.as_deref() {
        None => None,
        // A zero period is no rule, as in hoard-core (not a cutoff of now, removing everything).
        Some(p) if parse_period(p).is_ok_and(|d| d.is_zero()) => None,
        Some(p) => {
            Some(parse_period(p).map_err(|e| Error::invalid("maxRetentionPeriod", e.to_string())).and_then(|d| {
                Duration::from_std(d)
                    .ok()
                    .and_then(|d| now.checked_sub_signed(d))
                    .ok_or_else(|| Error::invalid("maxRetentionPeriod", format!("{p:?} is too long")))
            })?)
        }
    };
    let (expired, rest): (Vec<_>, Vec<_>) =
        snapshots.iter().cloned().partition(|(_, s)| cutoff.is_some_and(|c| s.time < c));
    let mut remove: Vec<(DateTime<Utc>, Id)> = expired.iter().map(|(id, s)| (s.time, *id)).collect();
    if !rest.is_empty() {
        let groups = plan(&rest, &core_policy(spec), &group_by(), Utc.fix())
            .map_err(|e| Error::invalid("retention policy", e.to_string()))?;
        remove.extend(groups.iter().flat_map(|g| g.remove.iter().map(|d| (d.time, d.id))));
    }
    remove.sort();
    Ok(remove.into_iter().map(|(_, id)| id).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::utc;
    use hoard_api::crd::{FailedSnapshots, SuccessfulSnapshots};
    use std::collections::BTreeMap;

    fn snap(comp: &str, t: DateTime<Utc>) -> (Id, Snapshot) {
        let s = Snapshot {
            time: t,
            host: "demo/app".into(),
            username: String::new(),
            tags: vec![],
            labels: BTreeMap::from([(COMPONENT_LABEL.to_string(), comp.to_string())]),
            parent: None,
            components: vec![],
            summary: Default::default(),
            warnings: vec![],
            program_version: String::new(),
        };
        (Id::random(), s)
    }

    fn spec(last: Option<u32>, max: Option<&str>) -> RetentionPolicySpec {
        RetentionPolicySpec {
            max_retention_period: max.map(Into::into),
            successful_snapshots: SuccessfulSnapshots { last, ..Default::default() },
            failed_snapshots: FailedSnapshots::default(),
            ..Default::default()
        }
    }

    #[test]
    fn a_zero_max_retention_period_removes_nothing() {
        let snaps: Vec<_> = (0..3).map(|h| snap("a", utc(2026, 1, 1, h, 0, 0))).collect();
        for zero in ["0d", "0m", "0y0mo"] {
            let removed = plan_forget(&snaps, &spec(None, Some(zero)), utc(2026, 1, 2, 0, 0, 0)).expect("plan");
            assert!(removed.is_empty(), "{zero}: {removed:?}");
        }
        let removed = plan_forget(&snaps, &spec(None, Some("1h")), utc(2026, 1, 1, 2, 30, 0)).expect("plan");
        assert_eq!(removed.len(), 2);
    }

    #[test]
    fn keep_last_applies_per_component() {
        let snaps: Vec<_> =
            (0..4).flat_map(|h| [snap("a", utc(2026, 1, 1, h, 0, 0)), snap("b", utc(2026, 1, 1, h, 30, 0))]).collect();
        let removed = plan_forget(&snaps, &spec(Some(2), None), utc(2026, 1, 2, 0, 0, 0)).expect("plan");
        assert_eq!(removed.len(), 4, "two per component");
        let oldest_a = snaps[0].0;
        assert_eq!(removed[0], oldest_a, "oldest first");
        assert!(!removed.contains(&snaps[6].0) && !removed.contains(&snaps[7].0), "newest kept");
    }

    #[test]
    fn max_period_is_a_hard_limit_and_no_rule_keeps_all() {
        let snaps = vec![snap("a", utc(2026, 1, 1, 0, 0, 0)), snap("a", utc(2026, 3, 1, 0, 0, 0))];
        let removed = plan_forget(&snaps, &spec(None, Some("30d")), utc(2026, 3, 2, 0, 0, 0)).expect("plan");
        assert_eq!(removed, vec![snaps[0].0]);
        assert!(plan_forget(&snaps, &spec(None, None), utc(2026, 3, 2, 0, 0, 0)).expect("plan").is_empty());
        assert!(plan_forget(&snaps, &spec(None, Some("30x")), utc(2026, 3, 2, 0, 0, 0)).is_err());
    }
}
