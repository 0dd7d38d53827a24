//! What a BackupSession does next: a pure state machine over what its status and its Snapshot
//! objects record, the orders this controller has in flight, and the time.
//!
//! ```text
//! Pending ──(configuration paused)──────────────────────────────▶ Skipped
//!    │ resolve target, ensure repositories, create Snapshot objects
//!    ▼
//! Running ── dispatch orders (≤ --max-orders-per-node per node) ── collect results
//!    │          failed component: retried after retryConfig.delay, at most maxRetry times,
//!    │          unless the agent classed the failure invalid/refused/permanent;
//!    │          a volume still being prepared (snapshot path) waits, keeping the session busy
//!    │  all components Succeeded → retention per repository → Succeeded
//!    │  a component failed for good and nothing else is running → Failed
//!    └─ backupTimeout passed → Failed (in-flight orders are cancelled)
//! ```
//!
//! Guarantees: the step depends only on its inputs (no clock, no I/O); a component is never
//! dispatched twice at once (an order already in flight is not in [`Step::Work::dispatch`]);
//! a component recorded as Running but not in flight here (the controller restarted) is
//! dispatched again with the same order id, which the agent treats as "attach", never as a
//! second run; the per-node cap counts every in-flight order of this controller.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use hoard_api::crd::{ComponentPhase, ComponentStatus, SessionPhase};

use crate::schedule::parse_time;

/// One unit of work: one component (volume) into one repository.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WorkKey {
    pub repository: String,
    pub component: String,
}

/// What the state machine knows about one unit of work.
#[derive(Debug, Clone)]
pub struct WorkView {
    pub key: WorkKey,
    pub node: String,
    pub status: ComponentStatus,
    /// An order for it is in flight in this controller process.
    pub in_flight: bool,
    /// Its volume is not readable yet (a VolumeSnapshot, clone or exposer pod on the way):
    /// not dispatched, but the session is busy with it.
    pub waiting: bool,
}

#[derive(Debug, Clone)]
pub struct SessionView {
    pub phase: Option<SessionPhase>,
    /// The configuration exists (and names this session).
    pub config_found: bool,
    pub paused: bool,
    pub deadline: Option<DateTime<Utc>>,
    /// Empty until the session has started.
    pub work: Vec<WorkView>,
    pub retention_done: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Finished; nothing to do.
    Idle,
    Skip(String),
    /// Resolve the target, create the Snapshot objects, set Running and the deadline.
    Start,
    /// Send these orders now; look again after `wake` at the latest.
    Work {
        dispatch: Vec<WorkKey>,
        wake: std::time::Duration,
    },
    /// Every component succeeded: apply retention.
    Retention,
    Succeed,
    Fail(String),
}

/// How often a running session is looked at (progress lands in status at this pace).
pub const POLL: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes one of `node`'s order slots if it has one free (fewer than `cap` in flight); a
/// re-attached order already holds its slot on the agent, so it always gets one.
pub fn take_slot(load: &mut BTreeMap<String, usize>, node: &str, cap: usize, reattach: bool) -> bool {
    let used = load.entry(node.to_string()).or_default();
    if !reattach && *used >= cap {
        return false;
    }
    *used += 1;
    true
}

/// The next step. `load` is this controller's in-flight orders per node; `cap` the per-node
/// limit.
pub fn next_step(v: &SessionView, load: &BTreeMap<String, usize>, cap: usize, now: DateTime<Utc>) -> Step {
    if v.phase.is_some_and(SessionPhase::is_finished) {
        return Step::Idle;
    }
    if !v.config_found {
        return Step::Fail("the BackupConfiguration or its session no longer exists".into());
    }
    let started = v.phase == Some(SessionPhase::Running);
    if !started {
        if v.paused {
            return Step::Skip("the BackupConfiguration is paused".into());
        }
        return Step::Start;
    }
    if let Some(d) = v.deadline
        && now > d
    {
        return Step::Fail("backupTimeout exceeded".into());
    }
    let phase = |w: &WorkView| w.status.phase.unwrap_or(ComponentPhase::Pending);
    if !v.work.is_empty() && v.work.iter().all(|w| phase(w) == ComponentPhase::Succeeded) {
        return if v.retention_done { Step::Succeed } else { Step::Retention };
    }
    if v.work.is_empty() {
        return Step::Fail("the target has no volumes to back up".into());
    }
    let mut load = load.clone();
    let mut dispatch = Vec::new();
    let mut wake = POLL;
    let mut busy = false;
    let mut final_failures = Vec::new();
    // Re-attach first: these already hold a slot on the agent.
    for w in &v.work {
        if phase(w) == ComponentPhase::Running && !w.in_flight {
            dispatch.push(w.key.clone());
            *load.entry(w.node.clone()).or_default() += 1;
            busy = true;
        } else if phase(w) == ComponentPhase::Running {
            busy = true;
        }
    }
    for w in &v.work {
        let eligible = match phase(w) {
            ComponentPhase::Pending => !w.in_flight,
            ComponentPhase::Failed => match w.status.retry_after.as_deref().map(parse_time) {
                None => {
                    final_failures.push(format!(
                        "{}/{}: {}",
                        w.key.repository,
                        w.key.component,
                        w.status.error.as_deref().unwrap_or("failed")
                    ));
                    false
                }
                Some(None) => true,
                Some(Some(at)) if at <= now => !w.in_flight,
                Some(Some(at)) => {
                    busy = true;
                    wake = wake.min((at - now).to_std().unwrap_or(POLL).max(std::time::Duration::from_secs(1)));
                    false
                }
            },
            _ => false,
        };
        if !eligible {
            continue;
        }
        busy = true;
        if w.waiting {
            continue;
        }
        let used = load.entry(w.node.clone()).or_default();
        if *used < cap {
            *used += 1;
            dispatch.push(w.key.clone());
        }
    }
    if !busy && !final_failures.is_empty() {
        final_failures.sort();
        return Step::Fail(final_failures.join("; "));
    }
    Step::Work { dispatch, wake }
}

/// After a failed attempt: when to retry, or `None` for a final failure. `attempts` counts the
/// attempt that just failed; `class` is the agent's error class.
pub fn retry_at(
    attempts: u32,
    max_retry: u32,
    class: &str,
    delay: Duration,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let retryable = !matches!(class, "invalid" | "refused" | "permanent" | "cancelled");
    (retryable && attempts <= max_retry).then(|| now + delay)
}

/// The order id for an attempt: stable across controller restarts, new for each retry.
pub fn order_id(session_uid: &str, key: &WorkKey, attempt: u32) -> String {
    format!("{session_uid}/{}/{}/{attempt}", key.repository, key.component)
}

#[cfg(test)]
mod tests {

    #[test]
    fn slots_are_capped_per_node_but_reattaching_always_fits() {
        let mut load = BTreeMap::from([("a".to_string(), 1)]);
        assert!(take_slot(&mut load, "a", 2, false));
        assert!(!take_slot(&mut load, "a", 2, false), "a is full");
        assert!(take_slot(&mut load, "b", 2, false), "b is another node");
        assert!(take_slot(&mut load, "a", 2, true), "a re-attached order holds its slot already");
        assert_eq!(load["a"], 3);
        assert_eq!(load["b"], 1);
    }

    use super::*;
    use crate::schedule::{fmt_time, utc};

    fn work(repo: &str, comp: &str, node: &str, phase: ComponentPhase) -> WorkView {
        WorkView {
            key: WorkKey { repository: repo.into(), component: comp.into() },
            node: node.into(),
            status: ComponentStatus { phase: Some(phase), ..Default::default() },
            in_flight: false,
            waiting: false,
        }
    }

    fn running(work: Vec<WorkView>) -> SessionView {
        SessionView {
            phase: Some(SessionPhase::Running),
            config_found: true,
            paused: false,
            deadline: Some(utc(2026, 1, 1, 12, 0, 0)),
            work,
            retention_done: false,
        }
    }

    fn now() -> DateTime<Utc> {
        utc(2026, 1, 1, 11, 0, 0)
    }

    #[test]
    fn pending_starts_or_skips_when_paused() {
        let mut v = running(vec![]);
        v.phase = None;
        assert_eq!(next_step(&v, &BTreeMap::new(), 2, now()), Step::Start);
        v.paused = true;
        assert!(matches!(next_step(&v, &BTreeMap::new(), 2, now()), Step::Skip(_)));
        v.config_found = false;
        assert!(matches!(next_step(&v, &BTreeMap::new(), 2, now()), Step::Fail(_)));
        v.phase = Some(SessionPhase::Succeeded);
        assert_eq!(next_step(&v, &BTreeMap::new(), 2, now()), Step::Idle);
    }

    #[test]
    fn dispatch_respects_the_node_cap() {
        let v = running(vec![
            work("r", "a", "n1", ComponentPhase::Pending),
            work("r", "b", "n1", ComponentPhase::Pending),
            work("r", "c", "n1", ComponentPhase::Pending),
            work("r", "d", "n2", ComponentPhase::Pending),
        ]);
        let load: BTreeMap<_, _> = [("n1".to_string(), 1)].into();
        match next_step(&v, &load, 2, now()) {
            Step::Work { dispatch, .. } => {
                let names: Vec<_> = dispatch.iter().map(|k| k.component.as_str()).collect();
                assert_eq!(names, ["a", "d"], "n1 has one slot left, n2 two");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn running_in_flight_is_not_sent_again_but_orphans_are_reattached() {
        let mut a = work("r", "a", "n1", ComponentPhase::Running);
        a.in_flight = true;
        let b = work("r", "b", "n1", ComponentPhase::Running);
        let v = running(vec![a, b]);
        match next_step(&v, &BTreeMap::new(), 1, now()) {
            Step::Work { dispatch, .. } => assert_eq!(dispatch.len(), 1, "only the orphan"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retries_wait_for_their_time_then_fail_for_good() {
        let mut f = work("r", "a", "n1", ComponentPhase::Failed);
        f.status.retry_after = Some(fmt_time(now() + Duration::seconds(30)));
        let v = running(vec![f.clone(), work("r", "b", "n1", ComponentPhase::Succeeded)]);
        match next_step(&v, &BTreeMap::new(), 2, now()) {
            Step::Work { dispatch, wake } => {
                assert!(dispatch.is_empty());
                assert!(wake <= POLL);
            }
            other => panic!("{other:?}"),
        }
        match next_step(&v, &BTreeMap::new(), 2, now() + Duration::seconds(31)) {
            Step::Work { dispatch, .. } => assert_eq!(dispatch.len(), 1),
            other => panic!("{other:?}"),
        }
        f.status.retry_after = None;
        f.status.error = Some("disk on fire".into());
        let v = running(vec![f, work("r", "b", "n1", ComponentPhase::Succeeded)]);
        match next_step(&v, &BTreeMap::new(), 2, now()) {
            Step::Fail(m) => assert!(m.contains("r/a: disk on fire"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_volume_being_prepared_keeps_the_session_busy_without_dispatch() {
        let mut a = work("r", "a", "", ComponentPhase::Pending);
        a.waiting = true;
        match next_step(
            &running(vec![a.clone(), work("r", "b", "n1", ComponentPhase::Pending)]),
            &BTreeMap::new(),
            2,
            now(),
        ) {
            Step::Work { dispatch, .. } => {
                assert_eq!(dispatch.iter().map(|k| k.component.as_str()).collect::<Vec<_>>(), ["b"]);
            }
            other => panic!("{other:?}"),
        }
        let f = work("r", "c", "n1", ComponentPhase::Failed);
        assert!(
            matches!(next_step(&running(vec![a, f]), &BTreeMap::new(), 2, now()), Step::Work { .. }),
            "a final failure waits for the volume being prepared"
        );
    }

    #[test]
    fn a_final_failure_waits_for_the_others() {
        let f = work("r", "a", "n1", ComponentPhase::Failed);
        let mut b = work("r", "b", "n1", ComponentPhase::Running);
        b.in_flight = true;
        assert!(matches!(next_step(&running(vec![f, b]), &BTreeMap::new(), 2, now()), Step::Work { .. }));
    }

    #[test]
    fn success_goes_through_retention() {
        let mut v = running(vec![work("r", "a", "n1", ComponentPhase::Succeeded)]);
        assert_eq!(next_step(&v, &BTreeMap::new(), 2, now()), Step::Retention);
        v.retention_done = true;
        assert_eq!(next_step(&v, &BTreeMap::new(), 2, now()), Step::Succeed);
    }

    #[test]
    fn timeout_and_empty_targets_fail() {
        let v = running(vec![work("r", "a", "n1", ComponentPhase::Running)]);
        assert!(matches!(next_step(&v, &BTreeMap::new(), 2, utc(2026, 1, 1, 12, 0, 1)), Step::Fail(_)));
        assert!(matches!(next_step(&running(vec![]), &BTreeMap::new(), 2, now()), Step::Fail(_)));
    }

    #[test]
    fn retry_policy() {
        let d = Duration::seconds(30);
        assert_eq!(retry_at(1, 2, "retryable", d, now()), Some(now() + d));
        assert_eq!(retry_at(3, 2, "retryable", d, now()), None);
        assert_eq!(retry_at(1, 2, "refused", d, now()), None);
        assert_eq!(retry_at(1, 2, "", d, now()), Some(now() + d), "unclassified (e.g. agent unreachable)");
    }
}
