//! Cron evaluation for `spec.sessions[].scheduler`: pure functions of the schedule, the time
//! the session last fired and the current time. No clock is read here; the scheduler passes
//! `now`, so tests drive time directly.
//!
//! Guarantees:
//! * A schedule fires at most once per scheduled time: the caller records the fired time
//!   (`status.sessions[].lastSchedule`, and the BackupSession's `scheduledTime` and name derive
//!   from it), and [`decide`] never returns a time at or before `last`.
//! * Missed runs (controller down, configuration paused, session suspended) are handled as the
//!   spec says: `RunLatest` runs once for the most recent missed time if it is still within
//!   the starting deadline (default 1 h); `Skip` never catches up. Either way at most one run
//!   starts per call, and the others are counted as missed.
//! * Times are evaluated in the schedule's IANA time zone (default UTC); the result is UTC.

use std::str::FromStr;

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use hoard_api::crd::{MissedRuns, Scheduler, parse_duration};

use crate::error::{Error, Result};

/// Default `startingDeadline`.
pub const DEFAULT_STARTING_DEADLINE: Duration = Duration::hours(1);

/// Bound on how many missed times are counted in one evaluation (a schedule that fires every
/// minute and was down for a year would otherwise walk half a million times).
const MAX_MISSED_COUNTED: u32 = 10_000;

/// A parsed schedule with its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
    missed: MissedRuns,
    deadline: Duration,
}

/// What the scheduler should do for one session now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Start a run for this scheduled time.
    pub run: Option<DateTime<Utc>>,
    /// Scheduled times in `(last, now]` that will not run.
    pub missed: u32,
    /// The next time strictly after `now` (what `status.sessions[].nextSchedule` shows).
    pub next: Option<DateTime<Utc>>,
    /// The newest due time handled by this decision (run or missed): the caller records it as
    /// `lastSchedule` so no time is handled twice. `None` while inactive: paused time is not
    /// consumed, so `RunLatest` can catch up on unpause.
    pub handled: Option<DateTime<Utc>>,
}

impl Schedule {
    /// Parses the spec's scheduler block. Refuses unknown time zones, bad cron expressions
    /// and cron expressions with a seconds field.
    pub fn parse(s: &Scheduler) -> Result<Schedule> {
        let expr = s.schedule.trim();
        if !expr.starts_with('@') && expr.split_whitespace().count() != 5 {
            return Err(Error::invalid("schedule", format!("{expr:?} must have five fields (m h dom mon dow)")));
        }
        let cron = Cron::from_str(expr).map_err(|e| Error::invalid("schedule", format!("{expr:?}: {e}")))?;
        let tz = match s.time_zone.as_deref().filter(|z| !z.is_empty()) {
            None => Tz::UTC,
            Some(z) => z.parse::<Tz>().map_err(|_| Error::invalid("timeZone", format!("unknown time zone {z:?}")))?,
        };
        let deadline = match s.starting_deadline.as_deref() {
            None => DEFAULT_STARTING_DEADLINE,
            Some(d) => parse_duration(d)
                .and_then(|d| Duration::from_std(d).ok())
                .ok_or_else(|| Error::invalid("startingDeadline", format!("{d:?}")))?,
        };
        Ok(Schedule { cron, tz, missed: s.missed_runs, deadline })
    }

    /// The first scheduled time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron.find_next_occurrence(&local, false).ok().map(|n| n.with_timezone(&Utc))
    }

    /// Decides for one session. `last` is the last scheduled time that was run (or, for a
    /// session never run, the configuration's creation time: nothing before it is "missed").
    /// `active` is false while the configuration is paused or the session suspended: nothing
    /// runs, due times count as missed and `next` is `None`.
    pub fn decide(&self, last: DateTime<Utc>, now: DateTime<Utc>, active: bool) -> Decision {
        let mut latest: Option<DateTime<Utc>> = None;
        let mut missed = 0u32;
        let mut t = last;
        // Walk the scheduled times in (last, now]; keep only the newest.
        while let Some(n) = self.next_after(t) {
            if n > now {
                break;
            }
            if latest.replace(n).is_some() {
                missed += 1;
            }
            t = n;
            if missed >= MAX_MISSED_COUNTED {
                // Jump: the exact count no longer matters, the newest time does.
                if let Ok(p) = self.cron.find_previous_occurrence(&now.with_timezone(&self.tz), true) {
                    latest = Some(p.with_timezone(&Utc));
                }
                break;
            }
        }
        if !active {
            return Decision { run: None, missed: 0, next: None, handled: None };
        }
        let next = self.next_after(now);
        let Some(latest) = latest else {
            return Decision { run: None, missed, next, handled: None };
        };
        // The newest due time is "on time" if it is within the deadline; otherwise it was
        // missed too (e.g. the controller was down for longer than the deadline).
        let on_time = now - latest <= self.deadline;
        let is_catch_up = missed > 0 || now - latest > Duration::seconds(60);
        let run = match (on_time, self.missed, is_catch_up) {
            (false, _, _) => None,
            (true, MissedRuns::Skip, true) => None,
            (true, _, _) => Some(latest),
        };
        Decision { missed: missed + u32::from(run.is_none()), run, next, handled: Some(latest) }
    }
}

/// Name of the BackupSession the scheduler creates for `config`/`session` at `time`: stable, so
/// a second scheduler (or a retry after a crash) cannot create the same run twice.
pub fn session_name(config: &str, session: &str, time: DateTime<Utc>) -> String {
    let stamp = time.format("%Y%m%d%H%M").to_string();
    let base = format!("{config}-{session}");
    // Object names are at most 253 characters; keep room for the stamp.
    let base: String = base.chars().take(253 - stamp.len() - 1).collect();
    format!("{base}-{stamp}")
}

/// Parses an RFC 3339 time from status.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// Formats a time for status (RFC 3339, seconds, `Z`).
pub fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Convenience for tests and callers holding a naive UTC time.
pub fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(expr: &str, tz: Option<&str>, missed: MissedRuns, deadline: Option<&str>) -> Schedule {
        Schedule::parse(&Scheduler {
            schedule: expr.into(),
            time_zone: tz.map(Into::into),
            suspend: false,
            missed_runs: missed,
            starting_deadline: deadline.map(Into::into),
        })
        .expect("valid schedule")
    }

    #[test]
    fn fires_once_at_the_scheduled_minute() {
        let s = sched("*/5 * * * *", None, MissedRuns::RunLatest, None);
        let last = utc(2026, 1, 1, 10, 0, 0);
        let d = s.decide(last, utc(2026, 1, 1, 10, 4, 59), true);
        assert_eq!(d, Decision { run: None, missed: 0, next: Some(utc(2026, 1, 1, 10, 5, 0)), handled: None });
        let d = s.decide(last, utc(2026, 1, 1, 10, 5, 2), true);
        assert_eq!(d.run, Some(utc(2026, 1, 1, 10, 5, 0)));
        assert_eq!(d.missed, 0);
        assert_eq!(d.next, Some(utc(2026, 1, 1, 10, 10, 0)));
        // After recording it as last, the same time never fires again.
        let d = s.decide(utc(2026, 1, 1, 10, 5, 0), utc(2026, 1, 1, 10, 5, 30), true);
        assert_eq!(d.run, None);
    }

    #[test]
    fn run_latest_catches_up_once_within_the_deadline() {
        let s = sched("0 * * * *", None, MissedRuns::RunLatest, Some("2h"));
        // Down from 10:00 to 13:30: 11:00, 12:00, 13:00 were due; 13:00 runs, two are missed.
        let d = s.decide(utc(2026, 1, 1, 10, 0, 0), utc(2026, 1, 1, 13, 30, 0), true);
        assert_eq!(d.run, Some(utc(2026, 1, 1, 13, 0, 0)));
        assert_eq!(d.missed, 2);
        assert_eq!(d.handled, Some(utc(2026, 1, 1, 13, 0, 0)));
    }

    #[test]
    fn past_the_starting_deadline_nothing_runs() {
        let s = sched("0 0 * * *", None, MissedRuns::RunLatest, Some("30m"));
        let d = s.decide(utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 2, 1, 0, 0), true);
        assert_eq!(d.run, None);
        assert_eq!(d.missed, 1);
        assert_eq!(d.next, Some(utc(2026, 1, 3, 0, 0, 0)));
    }

    #[test]
    fn skip_never_catches_up() {
        let s = sched("0 * * * *", None, MissedRuns::Skip, None);
        let d = s.decide(utc(2026, 1, 1, 10, 0, 0), utc(2026, 1, 1, 12, 20, 0), true);
        assert_eq!(d.run, None);
        assert_eq!(d.missed, 2);
        // On time (within a minute of the scheduled time) it runs.
        let d = s.decide(utc(2026, 1, 1, 12, 0, 0), utc(2026, 1, 1, 13, 0, 10), true);
        assert_eq!(d.run, Some(utc(2026, 1, 1, 13, 0, 0)));
    }

    #[test]
    fn paused_or_suspended_runs_nothing_and_shows_no_next() {
        let s = sched("*/5 * * * *", None, MissedRuns::RunLatest, None);
        let d = s.decide(utc(2026, 1, 1, 10, 0, 0), utc(2026, 1, 1, 10, 6, 0), false);
        assert_eq!(d, Decision { run: None, missed: 0, next: None, handled: None });
        // Unpaused within the deadline, RunLatest catches up.
        let d = s.decide(utc(2026, 1, 1, 10, 0, 0), utc(2026, 1, 1, 10, 6, 0), true);
        assert_eq!(d.run, Some(utc(2026, 1, 1, 10, 5, 0)));
    }

    #[test]
    fn time_zone_shifts_the_schedule() {
        // 02:00 in Berlin is 01:00 UTC in winter.
        let s = sched("0 2 * * *", Some("Europe/Berlin"), MissedRuns::RunLatest, None);
        assert_eq!(s.next_after(utc(2026, 1, 10, 0, 0, 0)), Some(utc(2026, 1, 10, 1, 0, 0)));
        // ... and 00:00 UTC in summer.
        assert_eq!(
            s.next_after(utc(2026, 7, 10, 0, 0, 0)).map(|t| t.to_rfc3339()),
            Some(utc(2026, 7, 11, 0, 0, 0).to_rfc3339())
        );
    }

    #[test]
    fn macros_and_bad_input() {
        let s = sched("@hourly", None, MissedRuns::RunLatest, None);
        assert_eq!(s.next_after(utc(2026, 1, 1, 10, 30, 0)), Some(utc(2026, 1, 1, 11, 0, 0)));
        for (expr, tz) in
            [("* * * *", None), ("0 0 * * * *", None), ("61 * * * *", None), ("* * * * *", Some("Mars/Base"))]
        {
            let r = Schedule::parse(&Scheduler {
                schedule: expr.into(),
                time_zone: tz.map(Into::into),
                suspend: false,
                missed_runs: MissedRuns::RunLatest,
                starting_deadline: None,
            });
            assert!(r.is_err(), "{expr} {tz:?}");
        }
    }

    #[test]
    fn long_outages_are_bounded() {
        let s = sched("* * * * *", None, MissedRuns::RunLatest, Some("5m"));
        let d = s.decide(utc(2020, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 30), true);
        assert_eq!(d.run, Some(utc(2026, 1, 1, 0, 0, 0)));
        assert!(d.missed >= MAX_MISSED_COUNTED);
    }

    #[test]
    fn session_names_are_stable_and_bounded() {
        let t = utc(2026, 3, 4, 5, 6, 0);
        assert_eq!(session_name("app", "daily", t), "app-daily-202603040506");
        assert!(session_name(&"x".repeat(300), "s", t).len() <= 253);
    }
}
