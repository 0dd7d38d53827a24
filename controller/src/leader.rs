//! Leader election with a coordination.k8s.io Lease (`hoard-controller` in the controller's
//! namespace). Only the leader reconciles; a replica that loses the Lease exits so its restart
//! starts clean (no reconciler keeps running without the Lease).
//!
//! [`decide`] is pure. Writes use the Lease's resourceVersion (optimistic concurrency), so two
//! replicas can never both think they took the same Lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

use crate::error::{Result, is_conflict, is_not_found};

pub const LEASE_NAME: &str = "hoard-controller";
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it.
    Take,
    /// Someone else holds a live lease.
    Wait,
}

/// Decides from the Lease's holder and renew time.
pub fn decide(
    holder: Option<&str>,
    renewed: Option<DateTime<Utc>>,
    duration: Duration,
    me: &str,
    now: DateTime<Utc>,
) -> Decision {
    match holder {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::Take,
        Some(_) => {
            let expired = renewed.is_none_or(|r| now - r > chrono::Duration::from_std(duration).unwrap_or_default());
            if expired { Decision::Take } else { Decision::Wait }
        }
    }
}

fn to_chrono(t: &MicroTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(t.0.as_microsecond())
}

fn micro(now: DateTime<Utc>) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::from_microsecond(now.timestamp_micros()).ok().map(MicroTime)
}

/// One round: returns whether we hold the Lease afterwards.
pub async fn try_acquire(api: &Api<Lease>, me: &str, now: DateTime<Utc>) -> Result<bool> {
    let secs = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15);
    let lease = match api.get(LEASE_NAME).await {
        Ok(l) => l,
        Err(e) if is_not_found(&e) => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(LEASE_NAME.into()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.into()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: micro(now),
                    renew_time: micro(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let duration = spec.lease_duration_seconds.map_or(LEASE_DURATION, |s| Duration::from_secs(s.max(1) as u64));
    let decision =
        decide(spec.holder_identity.as_deref(), spec.renew_time.as_ref().and_then(to_chrono), duration, me, now);
    if decision == Decision::Wait {
        return Ok(false);
    }
    let mut next = lease.clone();
    let s = next.spec.get_or_insert_with(Default::default);
    if decision == Decision::Take {
        s.holder_identity = Some(me.into());
        s.acquire_time = micro(now);
        s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
    }
    s.renew_time = micro(now);
    s.lease_duration_seconds = Some(secs);
    match api.replace(LEASE_NAME, &PostParams::default(), &next).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::utc;

    #[test]
    fn lease_decisions() {
        let now = utc(2026, 1, 1, 0, 0, 30);
        let d = Duration::from_secs(15);
        assert_eq!(decide(Some("me"), Some(now), d, "me", now), Decision::Renew);
        assert_eq!(decide(None, None, d, "me", now), Decision::Take);
        assert_eq!(decide(Some("other"), Some(utc(2026, 1, 1, 0, 0, 20)), d, "me", now), Decision::Wait);
        assert_eq!(decide(Some("other"), Some(utc(2026, 1, 1, 0, 0, 10)), d, "me", now), Decision::Take);
    }
}
