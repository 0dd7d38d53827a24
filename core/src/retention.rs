//! Retention planning: which snapshots a policy keeps and which it removes.
//!
//! [`plan`] is a pure function over a list of snapshots: it reads no clock, touches no storage
//! and returns the same plan for the same input in any order. It follows restic's documented
//! `forget` rules so that a user migrating from restic keeps the same snapshots:
//!
//! * Snapshots are split into groups ([`GroupBy`], default host and tags); each group is
//!   planned on its own.
//! * Within a group snapshots are walked newest first (equal times are ordered by id). Every
//!   rule is checked for every snapshot and a snapshot is kept if any rule keeps it; all the
//!   rules that keep it are reported as its reasons.
//! * `keep_last` keeps the newest N. `keep_hourly`, `keep_daily`, `keep_weekly`, `keep_monthly`
//!   and `keep_yearly` keep the newest snapshot of each of the newest N calendar buckets that
//!   hold a snapshot (weeks are ISO weeks, Monday to Sunday, numbered `iso_year*100+week`).
//!   Buckets are computed in the time zone passed to [`plan`]. [`KeepCount::Unlimited`]
//!   (restic's `-1`/`unlimited`) keeps one snapshot per bucket for every bucket.
//! * If a counted rule still has budget when the walk reaches the oldest snapshot, the oldest
//!   snapshot is kept too (as current restic does); its reason is prefixed with `oldest` when its
//!   bucket was already represented (e.g. `oldest daily snapshot`).
//! * `keep_within` keeps every snapshot strictly newer than the newest snapshot of the group
//!   minus the duration (not relative to now). `keep_within_hourly` … `keep_within_yearly`
//!   keep the newest snapshot of each bucket inside that window. Durations are calendar
//!   periods in hoard's one grammar ([`WithinDuration`]: `2y5mo1w3d4h30m`, where `m` is
//!   minutes and `mo` months, unlike restic's `m`), subtracted like Go's `AddDate` (month
//!   overflow normalises: 31 March minus one month is 2 March), then the hours and minutes.
//! * `keep_tags` keeps every snapshot that has all tags of at least one set; an empty set
//!   matches untagged snapshots only.
//! * A policy with no rule is refused ("no policy was specified"), and so is a plan that would
//!   remove every snapshot of a group ("refusing to delete last snapshot of snapshot group").
//!
//! Failed snapshots: a snapshot whose label [`PHASE_LABEL`] (`hoard.dev/phase`) is
//! [`PHASE_FAILED`] (`Failed`) is a record of a failed run. The rules above consider only the
//! other snapshots (failed ones use no budget, are never the "newest" for `keep_within` and
//! are not kept by tags); failed snapshots are kept only by `keep_last_failed`, which keeps
//! the newest N of them. Without it every failed snapshot is removed.
//!
//! Deliberate differences from restic: restic ignores snapshots dated in the future when it
//! picks the newest snapshot for the `within` rules; this planner has no clock and uses the
//! newest snapshot of the group as is. Duplicate snapshot ids in the input are an error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeDelta, TimeZone, Timelike, Utc};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::snapshot::Snapshot;

/// The snapshot label that records how the backup run ended.
pub const PHASE_LABEL: &str = "hoard.dev/phase";
/// The value of [`PHASE_LABEL`] that marks a failed run; such snapshots are planned apart.
pub const PHASE_FAILED: &str = "Failed";

/// Whether the snapshot records a failed run (label `hoard.dev/phase` = `Failed`).
pub fn is_failed(snapshot: &Snapshot) -> bool {
    snapshot.labels.get(PHASE_LABEL).is_some_and(|v| v == PHASE_FAILED)
}

/// How many buckets a counted rule keeps.
///
/// Serialized as an integer where `-1` means unlimited (as restic stores it); deserialized from
/// an integer ≥ -1 or the string `"unlimited"`. A count of 0 is the same as leaving the rule out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeepCount {
    Count(u32),
    Unlimited,
}

impl KeepCount {
    pub fn from_i64(n: i64) -> Result<KeepCount> {
        match n {
            -1 => Ok(KeepCount::Unlimited),
            n => u32::try_from(n).map(KeepCount::Count).map_err(|_| {
                Error::InvalidArgument(format!(
                    "keep count {n} is out of range (use a count ≥ 0, or -1 / \"unlimited\" for all)"
                ))
            }),
        }
    }

    /// The restic encoding: -1 for unlimited.
    pub fn as_i64(self) -> i64 {
        match self {
            KeepCount::Count(n) => i64::from(n),
            KeepCount::Unlimited => -1,
        }
    }

    fn is_active(self) -> bool {
        self != KeepCount::Count(0)
    }
}

impl fmt::Display for KeepCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepCount::Count(n) => write!(f, "{n}"),
            KeepCount::Unlimited => f.write_str("unlimited"),
        }
    }
}

impl FromStr for KeepCount {
    type Err = Error;

    fn from_str(s: &str) -> Result<KeepCount> {
        let s = s.trim();
        if s == "unlimited" {
            return Ok(KeepCount::Unlimited);
        }
        let n: i64 = s.parse().map_err(|_| Error::InvalidArgument(format!("{s:?} is not a count or \"unlimited\"")))?;
        KeepCount::from_i64(n)
    }
}

impl Serialize for KeepCount {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_i64(self.as_i64())
    }
}

impl<'de> Deserialize<'de> for KeepCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeepCount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count ≥ -1 or \"unlimited\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<KeepCount, E> {
                KeepCount::from_i64(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<KeepCount, E> {
                u32::try_from(v).map(KeepCount::Count).map_err(|_| E::custom(format!("keep count {v} is too large")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<KeepCount, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// What a period may be written as, for error messages.
const PERIOD_GRAMMAR: &str = "a period is numbers with units, largest first, each unit once: \
     y (years), mo (months), w (weeks), d (days), h (hours), m (minutes), e.g. 1y6mo, 2w3d, 36h, 90m";

/// The regular expression of [`WithinDuration`]'s grammar, for schemas (a RetentionPolicy's
/// `maxRetentionPeriod`). It also admits the empty string, which the parser refuses: schemas
/// pair it with a minimum length of 2.
pub const PERIOD_PATTERN: &str = "^([0-9]+y)?([0-9]+mo)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?$";

/// A calendar period: hoard's one grammar for spans of time in retention rules, shared by
/// `hoard forget --keep-within` and a RetentionPolicy's `maxRetentionPeriod`.
///
/// Written as numbers with units, largest unit first, each unit at most once: `y` years, `mo`
/// months, `w` weeks, `d` days, `h` hours, `m` minutes, e.g. `1y6mo`, `2w3d`, `36h`, `90m`.
/// `m` is minutes, never months (restic's `--keep-within 6m` is `6mo` here). Anything else is
/// refused with a message naming the accepted forms: an unknown or upper-case unit (`1M`,
/// `5x`), a number without a unit, a unit without a number, a unit given twice or out of
/// order, an empty string, signs, fractions and spaces.
///
/// Serialized as that string (its canonical form). The all-zero period is the same as leaving
/// the rule out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WithinDuration {
    pub years: u32,
    pub months: u32,
    pub weeks: u32,
    pub days: u32,
    pub hours: u32,
    pub minutes: u32,
}

impl WithinDuration {
    pub fn is_zero(&self) -> bool {
        *self == WithinDuration::default()
    }

    /// The period as a fixed length, with months of 30 days and years of 365 days (for a
    /// cutoff from the current time rather than calendar arithmetic).
    pub fn nominal(&self) -> std::time::Duration {
        const DAY: u64 = 86_400;
        let secs = u64::from(self.years) * 365 * DAY
            + u64::from(self.months) * 30 * DAY
            + u64::from(self.weeks) * 7 * DAY
            + u64::from(self.days) * DAY
            + u64::from(self.hours) * 3600
            + u64::from(self.minutes) * 60;
        std::time::Duration::from_secs(secs)
    }

    /// `latest` minus this duration: calendar part (years, months, then weeks and days) in `tz`
    /// with Go `AddDate` normalisation, then the hours and minutes. `None` when the result is
    /// before the representable calendar, i.e. the window has no lower bound.
    fn window_start(&self, latest: DateTime<Utc>, tz: FixedOffset) -> Option<DateTime<Utc>> {
        let local = latest.with_timezone(&tz);
        let months = i64::from(local.year()) * 12 + i64::from(local.month0())
            - i64::from(self.years) * 12
            - i64::from(self.months);
        let year = i32::try_from(months.div_euclid(12)).ok()?;
        let month = u32::try_from(months.rem_euclid(12)).ok()? + 1;
        let days = i64::from(local.day()) - 1 - i64::from(self.weeks) * 7 - i64::from(self.days);
        let date = NaiveDate::from_ymd_opt(year, month, 1)?.checked_add_signed(TimeDelta::try_days(days)?)?;
        let start = tz.from_local_datetime(&date.and_time(local.time())).single()?.with_timezone(&Utc);
        let clock = TimeDelta::try_hours(i64::from(self.hours))?
            .checked_add(&TimeDelta::try_minutes(i64::from(self.minutes))?)?;
        start.checked_sub_signed(clock)
    }

    /// The fields in grammar order with their units.
    fn parts(&self) -> [(u32, &'static str); 6] {
        [
            (self.years, "y"),
            (self.months, "mo"),
            (self.weeks, "w"),
            (self.days, "d"),
            (self.hours, "h"),
            (self.minutes, "m"),
        ]
    }
}

impl fmt::Display for WithinDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero() {
            return f.write_str("0h");
        }
        for (n, unit) in self.parts() {
            if n != 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for WithinDuration {
    type Err = Error;

    fn from_str(s: &str) -> Result<WithinDuration> {
        let bad = |why: String| Error::InvalidArgument(format!("invalid period {s:?}: {why}; {PERIOD_GRAMMAR}"));
        if s.is_empty() {
            return Err(bad("empty".into()));
        }
        let mut d = WithinDuration::default();
        // Index in grammar order of the last unit read: the next must come after it.
        let mut last: Option<usize> = None;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            let (number, tail) = rest.split_at(digits);
            let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            rest = tail;
            if number.is_empty() {
                return Err(bad(format!("{unit:?} must follow a number")));
            }
            if unit.is_empty() {
                return Err(bad(format!("the number {number} has no unit")));
            }
            let Some(index) = ["y", "mo", "w", "d", "h", "m"].iter().position(|u| *u == unit) else {
                return Err(bad(format!("unknown unit {unit:?}")));
            };
            if last.is_some_and(|l| index <= l) {
                return Err(bad(format!("unit {unit:?} is repeated or out of order")));
            }
            last = Some(index);
            let n: u32 = number.parse().map_err(|_| bad(format!("{number} is too large")))?;
            let field = match index {
                0 => &mut d.years,
                1 => &mut d.months,
                2 => &mut d.weeks,
                3 => &mut d.days,
                4 => &mut d.hours,
                _ => &mut d.minutes,
            };
            *field = n;
        }
        Ok(d)
    }
}

impl Serialize for WithinDuration {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WithinDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// Which snapshots to keep. Every rule is optional; see the module docs for the semantics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<KeepCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<KeepCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<KeepCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<KeepCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<KeepCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<KeepCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<WithinDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_hourly: Option<WithinDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_daily: Option<WithinDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_weekly: Option<WithinDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_monthly: Option<WithinDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within_yearly: Option<WithinDuration>,
    /// Keep snapshots that have all tags of any one set; an empty set matches untagged ones.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keep_tags: Vec<Vec<String>>,
    /// Keep the newest N failed snapshots (see [`PHASE_LABEL`]); the only rule for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_last_failed: Option<u32>,
}

impl RetentionPolicy {
    fn counts(&self) -> [(Option<KeepCount>, Bucket, &'static str); 6] {
        [
            (self.keep_last, Bucket::Last, "last"),
            (self.keep_hourly, Bucket::Hour, "hourly"),
            (self.keep_daily, Bucket::Day, "daily"),
            (self.keep_weekly, Bucket::Week, "weekly"),
            (self.keep_monthly, Bucket::Month, "monthly"),
            (self.keep_yearly, Bucket::Year, "yearly"),
        ]
    }

    fn withins(&self) -> [(Option<WithinDuration>, Bucket, &'static str); 5] {
        [
            (self.keep_within_hourly, Bucket::Hour, "hourly"),
            (self.keep_within_daily, Bucket::Day, "daily"),
            (self.keep_within_weekly, Bucket::Week, "weekly"),
            (self.keep_within_monthly, Bucket::Month, "monthly"),
            (self.keep_within_yearly, Bucket::Year, "yearly"),
        ]
    }

    /// Whether any rule applies to successful (not failed) snapshots.
    fn has_successful_rule(&self) -> bool {
        let set = |w: Option<WithinDuration>| w.is_some_and(|w| !w.is_zero());
        self.counts().iter().any(|(c, _, _)| c.is_some_and(KeepCount::is_active))
            || set(self.keep_within)
            || self.withins().iter().any(|(w, _, _)| set(*w))
            || !self.keep_tags.is_empty()
    }

    /// True when no rule is set (zero counts and zero durations count as unset).
    pub fn is_empty(&self) -> bool {
        !self.has_successful_rule() && self.keep_last_failed.unwrap_or(0) == 0
    }

    /// Refuses an empty policy (like restic), and a policy with rules only for failed
    /// snapshots, which would remove every successful one.
    pub fn validate(&self) -> Result<()> {
        if self.is_empty() {
            return Err(Error::InvalidArgument("no policy was specified, no snapshots will be removed".into()));
        }
        if !self.has_successful_rule() {
            return Err(Error::InvalidArgument(
                "the policy only has keep_last_failed, so it would remove every successful snapshot; \
                 add a rule for successful snapshots (e.g. keep_last unlimited)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Tag sets with empty tags dropped; an empty set matches untagged snapshots.
    fn tag_sets(&self) -> Vec<Vec<&str>> {
        self.keep_tags.iter().map(|set| set.iter().map(String::as_str).filter(|t| !t.is_empty()).collect()).collect()
    }
}

impl fmt::Display for RetentionPolicy {
    /// A one-line description like restic's "Applying Policy" line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (count, _, name) in self.counts() {
            match count {
                Some(KeepCount::Unlimited) => parts.push(format!("all {name}")),
                Some(KeepCount::Count(n)) if n > 0 => parts.push(format!("{n} {name}")),
                _ => {}
            }
        }
        let mut s = if parts.is_empty() { String::new() } else { format!("{} snapshots", parts.join(", ")) };
        let push = |s: &mut String, sep: &str, text: String| {
            if !s.is_empty() {
                s.push_str(sep);
            }
            s.push_str(&text);
        };
        for (within, _, name) in self.withins() {
            if let Some(w) = within.filter(|w| !w.is_zero()) {
                push(&mut s, ", ", format!("{name} snapshots within {w}"));
            }
        }
        if !self.keep_tags.is_empty() {
            let sets: Vec<String> = self.keep_tags.iter().map(|t| format!("[{}]", t.join(", "))).collect();
            push(&mut s, " and ", format!("all snapshots with tags {}", sets.join(" or ")));
        }
        if let Some(w) = self.keep_within.filter(|w| !w.is_zero()) {
            push(&mut s, " and ", format!("all snapshots within {w} of the newest"));
        }
        if let Some(n) = self.keep_last_failed.filter(|n| *n > 0) {
            push(&mut s, " and ", format!("the {n} last failed snapshots"));
        }
        write!(f, "keep {s}")
    }
}

/// How snapshots are grouped before the policy is applied; each group is planned alone.
///
/// The default groups by host and tags (restic groups by host and paths; hoard has no paths).
/// As a string: comma-separated `host`, `tags`, `labels` (every label of the snapshot) and
/// `label:KEY`; the empty string disables grouping. `labels` leaves out [`PHASE_LABEL`]: a failed
/// run belongs to the group of the runs it failed to replace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupBy {
    pub host: bool,
    pub tags: bool,
    /// Label keys whose values take part in the group key (a missing label is its own value).
    pub labels: Vec<String>,
    /// Every label (except [`PHASE_LABEL`]) takes part in the group key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all_labels: bool,
}

impl Default for GroupBy {
    fn default() -> GroupBy {
        GroupBy { host: true, tags: true, labels: Vec::new(), all_labels: false }
    }
}

impl GroupBy {
    /// No grouping: the policy applies to all snapshots at once.
    pub fn none() -> GroupBy {
        GroupBy { host: false, tags: false, labels: Vec::new(), all_labels: false }
    }

    pub fn key(&self, snapshot: &Snapshot) -> GroupKey {
        let tags = self.tags.then(|| {
            let mut tags = snapshot.tags.clone();
            tags.sort();
            tags.dedup();
            tags
        });
        let mut labels: BTreeMap<String, Option<String>> = BTreeMap::new();
        if self.all_labels {
            labels.extend(
                snapshot.labels.iter().filter(|(k, _)| *k != PHASE_LABEL).map(|(k, v)| (k.clone(), Some(v.clone()))),
            );
        }
        labels.extend(self.labels.iter().map(|k| (k.clone(), snapshot.labels.get(k).cloned())));
        GroupKey { host: self.host.then(|| snapshot.host.clone()), tags, labels }
    }
}

impl FromStr for GroupBy {
    type Err = Error;

    fn from_str(s: &str) -> Result<GroupBy> {
        let mut g = GroupBy::none();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "host" => g.host = true,
                "tags" => g.tags = true,
                "labels" => g.all_labels = true,
                _ => match part.strip_prefix("label:") {
                    Some(key) if !key.is_empty() => {
                        if !g.labels.iter().any(|k| k == key) {
                            g.labels.push(key.to_string());
                        }
                    }
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "cannot group by {part:?}: use host, tags, labels or label:KEY, separated by commas"
                        )));
                    }
                },
            }
        }
        Ok(g)
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if self.host {
            parts.push("host".into());
        }
        if self.tags {
            parts.push("tags".into());
        }
        if self.all_labels {
            parts.push("labels".into());
        }
        parts.extend(self.labels.iter().map(|k| format!("label:{k}")));
        f.write_str(&parts.join(","))
    }
}

/// The values a group's snapshots share; fields not grouped by are `None` / empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Sorted and deduplicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Label key to value; `None` when the snapshot has no such label.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, Option<String>>,
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(h) = &self.host {
            parts.push(format!("host {h}"));
        }
        if let Some(t) = &self.tags {
            parts.push(format!("tags [{}]", t.join(", ")));
        }
        for (k, v) in &self.labels {
            match v {
                Some(v) => parts.push(format!("label {k}={v}")),
                None => parts.push(format!("label {k} unset")),
            }
        }
        if parts.is_empty() { f.write_str("all snapshots") } else { f.write_str(&parts.join(", ")) }
    }
}

/// The verdict on one snapshot. `reasons` lists every rule that keeps it (empty when removed),
/// in restic's wording: `last snapshot`, `daily snapshot`, `oldest daily snapshot`,
/// `within 2d`, `daily within 7d`, `has tags [a, b]`, and `last failed snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub id: Id,
    pub time: DateTime<Utc>,
    /// Whether the snapshot is a failed run (planned only by `keep_last_failed`).
    pub failed: bool,
    pub reasons: Vec<String>,
}

/// The plan for one group: both lists newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlan {
    pub key: GroupKey,
    pub keep: Vec<Decision>,
    pub remove: Vec<Decision>,
}

/// Plans retention for `snapshots` under `policy`, grouping by `group_by` and computing
/// calendar buckets in `tz` (pass `chrono::Utc.fix()` for UTC). Groups come out sorted by key.
///
/// Errors: an empty policy (or one with rules only for failed snapshots), a snapshot id listed
/// twice, and a group in which no snapshot would be kept.
pub fn plan(
    snapshots: &[(Id, Snapshot)],
    policy: &RetentionPolicy,
    group_by: &GroupBy,
    tz: FixedOffset,
) -> Result<Vec<GroupPlan>> {
    policy.validate()?;
    let mut seen = HashSet::with_capacity(snapshots.len());
    let mut groups: BTreeMap<GroupKey, Vec<&(Id, Snapshot)>> = BTreeMap::new();
    for entry in snapshots {
        if !seen.insert(entry.0) {
            return Err(Error::InvalidArgument(format!("snapshot {} is listed twice", entry.0)));
        }
        groups.entry(group_by.key(&entry.1)).or_default().push(entry);
    }
    let tag_sets = policy.tag_sets();
    groups.into_iter().map(|(key, members)| plan_group(key, members, policy, &tag_sets, tz)).collect()
}

fn plan_group(
    key: GroupKey,
    mut members: Vec<&(Id, Snapshot)>,
    policy: &RetentionPolicy,
    tag_sets: &[Vec<&str>],
    tz: FixedOffset,
) -> Result<GroupPlan> {
    members.sort_by(|a, b| b.1.time.cmp(&a.1.time).then_with(|| a.0.cmp(&b.0)));
    let (failed, ok): (Vec<_>, Vec<_>) = members.iter().copied().partition(|e| is_failed(&e.1));

    let mut reasons = apply_rules(&ok, policy, tag_sets, tz);
    let keep_failed = usize::try_from(policy.keep_last_failed.unwrap_or(0)).unwrap_or(usize::MAX);
    for (id, _) in failed.iter().take(keep_failed) {
        reasons.entry(*id).or_default().push("last failed snapshot".into());
    }

    let (mut keep, mut remove) = (Vec::new(), Vec::new());
    for (id, snapshot) in members {
        let failed = is_failed(snapshot);
        match reasons.remove(id) {
            Some(reasons) => keep.push(Decision { id: *id, time: snapshot.time, failed, reasons }),
            None => remove.push(Decision { id: *id, time: snapshot.time, failed, reasons: Vec::new() }),
        }
    }
    if keep.is_empty() {
        return Err(Error::InvalidArgument(format!("refusing to delete last snapshot of snapshot group \"{key}\"")));
    }
    Ok(GroupPlan { key, keep, remove })
}

/// A calendar bucket; `Last` gives every snapshot its own bucket.
#[derive(Debug, Clone, Copy)]
enum Bucket {
    Last,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Bucket {
    /// restic's bucket numbers: YYYYMMDDHH, YYYYMMDD, ISO YYYYWW, YYYYMM, YYYY; `nr` for Last.
    fn value(self, nr: usize, t: DateTime<FixedOffset>) -> i64 {
        let (y, m, d, h) = (i64::from(t.year()), i64::from(t.month()), i64::from(t.day()), i64::from(t.hour()));
        match self {
            Bucket::Last => i64::try_from(nr).unwrap_or(i64::MAX),
            Bucket::Hour => y * 1_000_000 + m * 10_000 + d * 100 + h,
            Bucket::Day => y * 10_000 + m * 100 + d,
            Bucket::Week => {
                let w = t.iso_week();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }
            Bucket::Month => y * 100 + m,
            Bucket::Year => y,
        }
    }
}

struct CountRule {
    bucket: Bucket,
    /// `None` is unlimited.
    remaining: Option<u32>,
    last: Option<i64>,
    reason: String,
}

struct WithinRule {
    bucket: Bucket,
    /// Exclusive lower bound; `None` when the window reaches past the calendar.
    start: Option<DateTime<Utc>>,
    last: Option<i64>,
    reason: String,
}

impl WithinRule {
    fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start.is_none_or(|start| t > start)
    }
}

/// restic's `ApplyPolicy` over one list of snapshots sorted newest first: the reasons for
/// every kept snapshot.
fn apply_rules(
    list: &[&(Id, Snapshot)],
    policy: &RetentionPolicy,
    tag_sets: &[Vec<&str>],
    tz: FixedOffset,
) -> HashMap<Id, Vec<String>> {
    let mut reasons = HashMap::new();
    let Some(newest) = list.first() else { return reasons };
    let latest = newest.1.time;

    let mut counts: Vec<CountRule> = policy
        .counts()
        .into_iter()
        .filter_map(|(count, bucket, name)| {
            let remaining = match count? {
                KeepCount::Count(0) => return None,
                KeepCount::Count(n) => Some(n),
                KeepCount::Unlimited => None,
            };
            Some(CountRule { bucket, remaining, last: None, reason: format!("{name} snapshot") })
        })
        .collect();
    let window = |w: WithinDuration, bucket: Bucket, reason: String| WithinRule {
        bucket,
        start: w.window_start(latest, tz),
        last: None,
        reason,
    };
    let within_all =
        policy.keep_within.filter(|w| !w.is_zero()).map(|w| window(w, Bucket::Last, format!("within {w}")));
    let mut withins: Vec<WithinRule> = policy
        .withins()
        .into_iter()
        .filter_map(|(w, bucket, name)| {
            let w = w.filter(|w| !w.is_zero())?;
            Some(window(w, bucket, format!("{name} within {w}")))
        })
        .collect();

    let oldest = list.len() - 1;
    for (nr, (id, snapshot)) in list.iter().map(|e| (&e.0, &e.1)).enumerate() {
        let mut why = Vec::new();
        for set in tag_sets {
            let matches = if set.is_empty() {
                snapshot.tags.iter().all(|t| t.is_empty())
            } else {
                set.iter().all(|want| snapshot.tags.iter().any(|t| t == want))
            };
            if matches {
                why.push(format!("has tags [{}]", set.join(", ")));
            }
        }
        if let Some(rule) = &within_all
            && rule.contains(snapshot.time)
        {
            why.push(rule.reason.clone());
        }
        let local = snapshot.time.with_timezone(&tz);
        for rule in &mut counts {
            if rule.remaining == Some(0) {
                continue;
            }
            let value = rule.bucket.value(nr, local);
            let same_bucket = rule.last == Some(value);
            if !same_bucket || nr == oldest {
                why.push(if same_bucket { format!("oldest {}", rule.reason) } else { rule.reason.clone() });
                rule.last = Some(value);
                if let Some(n) = &mut rule.remaining {
                    *n -= 1;
                }
            }
        }
        for rule in &mut withins {
            if !rule.contains(snapshot.time) {
                continue;
            }
            let value = rule.bucket.value(nr, local);
            if rule.last != Some(value) {
                why.push(rule.reason.clone());
                rule.last = Some(value);
            }
        }
        if !why.is_empty() {
            reasons.insert(*id, why);
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDateTime, Offset};
    use proptest::prelude::*;

    fn utc() -> FixedOffset {
        Utc.fix()
    }

    fn at(s: &str) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap().and_utc()
    }

    fn id(n: u32) -> Id {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        Id(b)
    }

    fn snap(host: &str, time: DateTime<Utc>, tags: &[&str]) -> Snapshot {
        Snapshot {
            time,
            host: host.into(),
            username: "u".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            labels: BTreeMap::new(),
            parent: None,
            components: Vec::new(),
            summary: Default::default(),
            warnings: Vec::new(),
            program_version: "test".into(),
        }
    }

    fn failed(mut s: Snapshot) -> Snapshot {
        s.labels.insert(PHASE_LABEL.into(), PHASE_FAILED.into());
        s
    }

    /// Snapshots on host "h" with ids 0.. in the given order.
    fn series(times: &[&str]) -> Vec<(Id, Snapshot)> {
        times.iter().enumerate().map(|(i, t)| (id(i as u32), snap("h", at(t), &[]))).collect()
    }

    /// One snapshot per day at 12:00 from `first` to `last` inclusive.
    fn daily(first: &str, last: &str) -> Vec<(Id, Snapshot)> {
        let (mut t, end) = (at(&format!("{first} 12:00:00")), at(&format!("{last} 12:00:00")));
        let mut out = Vec::new();
        while t <= end {
            out.push((id(out.len() as u32), snap("h", t, &[])));
            t += TimeDelta::days(1);
        }
        out
    }

    fn one_group(snapshots: &[(Id, Snapshot)], policy: &RetentionPolicy) -> GroupPlan {
        let mut plans = plan(snapshots, policy, &GroupBy::default(), utc()).unwrap();
        assert_eq!(plans.len(), 1);
        plans.remove(0)
    }

    fn kept_times(p: &GroupPlan) -> Vec<String> {
        p.keep.iter().map(|d| d.time.format("%Y-%m-%d %H:%M").to_string()).collect()
    }

    fn reasons_of(p: &GroupPlan, time: &str) -> Vec<String> {
        let t = at(time);
        p.keep.iter().find(|d| d.time == t).map(|d| d.reasons.clone()).unwrap_or_default()
    }

    fn count(n: u32) -> Option<KeepCount> {
        Some(KeepCount::Count(n))
    }

    fn within(s: &str) -> Option<WithinDuration> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn retention_restic_doc_twelve_sundays_keep_daily_4() {
        let sundays = [
            "2019-09-01",
            "2019-09-08",
            "2019-09-15",
            "2019-09-22",
            "2019-09-29",
            "2019-10-06",
            "2019-10-13",
            "2019-10-20",
            "2019-10-27",
            "2019-11-03",
            "2019-11-10",
            "2019-11-17",
        ]
        .map(|d| format!("{d} 11:00:00"));
        let snaps = series(&sundays.iter().map(String::as_str).collect::<Vec<_>>());
        let p = one_group(&snaps, &RetentionPolicy { keep_daily: count(4), ..Default::default() });
        assert_eq!(kept_times(&p), ["2019-11-17 11:00", "2019-11-10 11:00", "2019-11-03 11:00", "2019-10-27 11:00"]);
        assert!(p.keep.iter().all(|d| d.reasons == ["daily snapshot"]));
        assert_eq!(p.remove.len(), 8);
        assert!(p.remove.iter().all(|d| d.reasons.is_empty()));
    }

    #[test]
    fn retention_restic_doc_daily_7_weekly_5_monthly_12() {
        // One snapshot a day; the newest, 2024-06-30, is a Sunday.
        let snaps = daily("2023-01-01", "2024-06-30");
        let policy = RetentionPolicy {
            keep_daily: count(7),
            keep_weekly: count(5),
            keep_monthly: count(12),
            ..Default::default()
        };
        let p = one_group(&snaps, &policy);
        let mut expected: Vec<String> = (24..=30).rev().map(|d| format!("2024-06-{d:02} 12:00")).collect();
        expected.extend(["2024-06-23", "2024-06-16", "2024-06-09", "2024-06-02"].map(|d| format!("{d} 12:00")));
        expected.extend(
            [
                "2024-05-31",
                "2024-04-30",
                "2024-03-31",
                "2024-02-29",
                "2024-01-31",
                "2023-12-31",
                "2023-11-30",
                "2023-10-31",
                "2023-09-30",
                "2023-08-31",
                "2023-07-31",
            ]
            .map(|d| format!("{d} 12:00")),
        );
        expected.sort();
        expected.reverse();
        assert_eq!(kept_times(&p), expected);
        // 7 dailies + 4 more weeklies (one weekly is a daily) + 11 more monthlies.
        assert_eq!(p.keep.len(), 22);
        assert_eq!(p.remove.len(), snaps.len() - 22);
        assert_eq!(reasons_of(&p, "2024-06-30 12:00:00"), ["daily snapshot", "weekly snapshot", "monthly snapshot"]);
        assert_eq!(reasons_of(&p, "2024-06-29 12:00:00"), ["daily snapshot"]);
        assert_eq!(reasons_of(&p, "2024-06-23 12:00:00"), ["weekly snapshot"]);
        assert_eq!(reasons_of(&p, "2024-05-31 12:00:00"), ["monthly snapshot"]);
        // Budgets are used up before the oldest snapshot, so it goes.
        assert!(p.remove.iter().any(|d| d.time == at("2023-01-01 12:00:00")));
    }

    #[test]
    fn retention_keep_last() {
        let snaps =
            series(&["2024-01-01 10:00:00", "2024-01-01 10:05:00", "2024-01-02 00:00:00", "2024-01-03 00:00:00"]);
        let p = one_group(&snaps, &RetentionPolicy { keep_last: count(2), ..Default::default() });
        assert_eq!(kept_times(&p), ["2024-01-03 00:00", "2024-01-02 00:00"]);
        assert!(p.keep.iter().all(|d| d.reasons == ["last snapshot"]));
        assert_eq!(p.remove.iter().map(|d| d.id).collect::<Vec<_>>(), [id(1), id(0)]);
    }

    #[test]
    fn retention_hourly_keeps_newest_per_hour() {
        let snaps = series(&[
            "2024-05-17 09:00:00",
            "2024-05-17 10:05:00",
            "2024-05-17 10:35:00",
            "2024-05-17 10:55:00",
            "2024-05-17 11:10:00",
            "2024-05-17 11:40:00",
        ]);
        let p = one_group(&snaps, &RetentionPolicy { keep_hourly: count(24), ..Default::default() });
        assert_eq!(kept_times(&p), ["2024-05-17 11:40", "2024-05-17 10:55", "2024-05-17 09:00"]);
        assert!(p.keep.iter().all(|d| d.reasons == ["hourly snapshot"]));
        assert_eq!(p.remove.len(), 3);
    }

    #[test]
    fn retention_oldest_snapshot_kept_while_budget_remains() {
        // restic issue 4806: two snapshots in the oldest hour, budget left.
        let snaps = series(&["2024-05-17 09:36:51", "2024-05-17 09:41:06", "2024-05-17 10:12:00"]);
        let p = one_group(&snaps, &RetentionPolicy { keep_hourly: count(24), ..Default::default() });
        assert_eq!(p.keep.len(), 3);
        assert_eq!(reasons_of(&p, "2024-05-17 09:36:51"), ["oldest hourly snapshot"]);
        assert_eq!(reasons_of(&p, "2024-05-17 09:41:06"), ["hourly snapshot"]);
        // Without budget left the oldest is not kept.
        let p = one_group(&snaps, &RetentionPolicy { keep_hourly: count(2), ..Default::default() });
        assert_eq!(kept_times(&p), ["2024-05-17 10:12", "2024-05-17 09:41"]);
    }

    #[test]
    fn retention_weekly_across_year_boundary_uses_iso_weeks() {
        // 2020-12-28 .. 2021-01-03 is ISO week 2020-W53; 2021-01-04 starts 2021-W01.
        let snaps = daily("2020-12-21", "2021-01-10");
        let p = one_group(&snaps, &RetentionPolicy { keep_weekly: count(3), ..Default::default() });
        assert_eq!(kept_times(&p), ["2021-01-10 12:00", "2021-01-03 12:00", "2020-12-27 12:00"]);
        assert!(p.keep.iter().all(|d| d.reasons == ["weekly snapshot"]));
        // 31 December shares the week with 3 January and is not kept.
        assert!(p.remove.iter().any(|d| d.time == at("2020-12-31 12:00:00")));

        let t = |s: &str| at(s).with_timezone(&utc());
        assert_eq!(Bucket::Week.value(0, t("2021-01-03 12:00:00")), 202053);
        assert_eq!(Bucket::Week.value(0, t("2024-12-30 12:00:00")), 202501);
        assert_eq!(Bucket::Hour.value(0, t("2024-12-30 07:00:00")), 2024123007);
    }

    #[test]
    fn retention_keep_within_is_relative_to_newest_not_now() {
        // Years old: "now" would remove everything; the newest snapshot anchors the window.
        let snaps = series(&[
            "2010-03-07 12:00:00",
            "2010-03-08 12:00:00",
            "2010-03-08 12:01:00",
            "2010-03-09 08:00:00",
            "2010-03-10 12:00:00",
        ]);
        let p = one_group(&snaps, &RetentionPolicy { keep_within: within("2d"), ..Default::default() });
        // Exactly two days older than the newest is outside (strictly newer is required).
        assert_eq!(kept_times(&p), ["2010-03-10 12:00", "2010-03-09 08:00", "2010-03-08 12:01"]);
        assert!(p.keep.iter().all(|d| d.reasons == ["within 2d"]));
        assert_eq!(p.remove.len(), 2);
    }

    #[test]
    fn retention_keep_within_month_arithmetic_follows_go() {
        // 31 March minus 1 month normalises to 2 March (Feb 31 does not exist), not 29 Feb.
        let snaps =
            series(&["2024-02-29 12:00:00", "2024-03-01 12:00:00", "2024-03-02 12:30:00", "2024-03-31 12:00:00"]);
        let p = one_group(&snaps, &RetentionPolicy { keep_within: within("1mo"), ..Default::default() });
        assert_eq!(kept_times(&p), ["2024-03-31 12:00", "2024-03-02 12:30"]);
        let w: WithinDuration = "1y2mo3d4h".parse().unwrap();
        assert_eq!(w.window_start(at("2024-03-31 12:00:00"), utc()), Some(at("2023-01-28 08:00:00")));
        // Weeks are 7 days of the calendar part; minutes are subtracted with the hours.
        let w: WithinDuration = "1w2d3h30m".parse().unwrap();
        assert_eq!(w.window_start(at("2024-03-10 12:00:00"), utc()), Some(at("2024-03-01 08:30:00")));
    }

    #[test]
    fn retention_keep_within_buckets() {
        let snaps = series(&[
            "2024-01-01 09:00:00",
            "2024-01-05 09:00:00",
            "2024-01-05 18:00:00",
            "2024-01-06 08:00:00",
            "2024-01-06 20:00:00",
            "2024-01-07 10:00:00",
        ]);
        let policy = RetentionPolicy { keep_within_daily: within("3d"), ..Default::default() };
        let p = one_group(&snaps, &policy);
        assert_eq!(kept_times(&p), ["2024-01-07 10:00", "2024-01-06 20:00", "2024-01-05 18:00"]);
        assert!(p.keep.iter().all(|d| d.reasons == ["daily within 3d"]));
    }

    #[test]
    fn retention_keep_tags() {
        let snaps = vec![
            (id(1), snap("h", at("2024-01-01 00:00:00"), &["important", "db"])),
            (id(2), snap("h", at("2024-01-02 00:00:00"), &["db"])),
            (id(3), snap("h", at("2024-01-03 00:00:00"), &["a", "b", "c"])),
            (id(4), snap("h", at("2024-01-04 00:00:00"), &["a"])),
            (id(5), snap("h", at("2024-01-05 00:00:00"), &[])),
        ];
        let policy = RetentionPolicy {
            keep_tags: vec![vec!["important".into()], vec!["a".into(), "b".into()]],
            ..Default::default()
        };
        let plans = plan(&snaps, &policy, &GroupBy::none(), utc()).unwrap();
        assert_eq!(plans.len(), 1);
        let keep: Vec<_> = plans[0].keep.iter().map(|d| (d.id, d.reasons.clone())).collect();
        assert_eq!(keep, [(id(3), vec!["has tags [a, b]".to_string()]), (id(1), vec!["has tags [important]".into()])]);
        assert_eq!(plans[0].remove.iter().map(|d| d.id).collect::<Vec<_>>(), [id(5), id(4), id(2)]);

        // An empty tag set matches untagged snapshots only (restic's --keep-tag '').
        let policy = RetentionPolicy { keep_tags: vec![vec![String::new()]], ..Default::default() };
        let plans = plan(&snaps, &policy, &GroupBy::none(), utc()).unwrap();
        assert_eq!(plans[0].keep.iter().map(|d| d.id).collect::<Vec<_>>(), [id(5)]);
        assert_eq!(plans[0].keep[0].reasons, ["has tags []"]);
    }

    #[test]
    fn retention_grouping_by_host_separates_hosts() {
        let snaps = vec![
            (id(1), snap("alpha", at("2024-01-01 00:00:00"), &[])),
            (id(2), snap("beta", at("2024-01-02 00:00:00"), &[])),
            (id(3), snap("alpha", at("2024-01-03 00:00:00"), &[])),
            (id(4), snap("beta", at("2024-01-04 00:00:00"), &[])),
            (id(5), snap("alpha", at("2024-01-05 00:00:00"), &[])),
        ];
        let policy = RetentionPolicy { keep_last: count(1), ..Default::default() };
        let plans = plan(&snaps, &policy, &"host".parse().unwrap(), utc()).unwrap();
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].key, GroupKey { host: Some("alpha".into()), ..Default::default() });
        assert_eq!(plans[0].keep.iter().map(|d| d.id).collect::<Vec<_>>(), [id(5)]);
        assert_eq!(plans[0].remove.iter().map(|d| d.id).collect::<Vec<_>>(), [id(3), id(1)]);
        assert_eq!(plans[1].key.host.as_deref(), Some("beta"));
        assert_eq!(plans[1].keep.iter().map(|d| d.id).collect::<Vec<_>>(), [id(4)]);

        // Without grouping the policy sees all five.
        let plans = plan(&snaps, &policy, &"".parse().unwrap(), utc()).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].key.to_string(), "all snapshots");
        assert_eq!(plans[0].keep.len(), 1);
    }

    #[test]
    fn retention_grouping_by_tags_and_labels() {
        let mut a = snap("h", at("2024-01-01 00:00:00"), &["x", "y"]);
        a.labels.insert("app".into(), "db".into());
        let mut b = snap("h", at("2024-01-02 00:00:00"), &["y", "x"]);
        b.labels.insert("app".into(), "db".into());
        let c = snap("h", at("2024-01-03 00:00:00"), &["x", "y"]);
        let snaps = vec![(id(1), a), (id(2), b), (id(3), c)];
        let policy = RetentionPolicy { keep_last: count(1), ..Default::default() };

        // Tag order does not matter.
        let plans = plan(&snaps, &policy, &GroupBy::default(), utc()).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].key.to_string(), "host h, tags [x, y]");

        let group_by: GroupBy = "tags,label:app".parse().unwrap();
        assert_eq!(group_by.to_string(), "tags,label:app");
        let plans = plan(&snaps, &policy, &group_by, utc()).unwrap();
        assert_eq!(plans.len(), 2);
        // A missing label sorts first and is its own group.
        assert_eq!(plans[0].key.labels.get("app"), Some(&None));
        assert_eq!(plans[0].keep.iter().map(|d| d.id).collect::<Vec<_>>(), [id(3)]);
        assert_eq!(plans[1].key.to_string(), "tags [x, y], label app=db");
        assert_eq!(plans[1].keep.iter().map(|d| d.id).collect::<Vec<_>>(), [id(2)]);
        assert_eq!(plans[1].remove.iter().map(|d| d.id).collect::<Vec<_>>(), [id(1)]);

        assert!("paths".parse::<GroupBy>().is_err());
        assert!("label:".parse::<GroupBy>().is_err());
    }

    #[test]
    fn retention_grouping_by_all_labels_as_the_issue_writes_it() {
        let g: GroupBy = "host,tags,labels".parse().unwrap();
        assert_eq!(g, GroupBy { all_labels: true, ..GroupBy::default() });
        assert_eq!(g.to_string(), "host,tags,labels");
        assert_eq!(g.to_string().parse::<GroupBy>().unwrap(), g);
        let mut a = snap("h", at("2024-01-01 00:00:00"), &[]);
        a.labels.insert("app".into(), "db".into());
        let mut b = snap("h", at("2024-01-02 00:00:00"), &[]);
        b.labels.insert("app".into(), "web".into());
        let mut c = snap("h", at("2024-01-03 00:00:00"), &[]);
        c.labels.insert("app".into(), "db".into());
        c.labels.insert("tier".into(), "gold".into());
        let mut d = snap("h", at("2024-01-04 00:00:00"), &[]);
        d.labels.insert("app".into(), "db".into());
        // A failed run stays in the group of its successful peers.
        d.labels.insert(PHASE_LABEL.into(), PHASE_FAILED.into());
        let snaps = vec![(id(1), a), (id(2), b), (id(3), c), (id(4), d)];
        let policy = RetentionPolicy { keep_last: count(1), ..Default::default() };
        let plans = plan(&snaps, &policy, &"labels".parse().unwrap(), utc()).unwrap();
        let keys: Vec<String> = plans.iter().map(|p| p.key.to_string()).collect();
        assert_eq!(keys, ["label app=db", "label app=db, label tier=gold", "label app=web"], "{keys:?}");
        let kept: Vec<Vec<Id>> = plans.iter().map(|p| p.keep.iter().map(|d| d.id).collect()).collect();
        assert_eq!(kept[0], [id(1)]);
        assert_eq!(plans[0].remove.iter().map(|d| d.id).collect::<Vec<_>>(), [id(4)]);
        // Serialised policies without the field still read, and the field round-trips.
        let back: GroupBy = serde_json::from_str(r#"{"host":true,"tags":false,"labels":[]}"#).unwrap();
        assert!(!back.all_labels);
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<GroupBy>(&json).unwrap(), g);
    }

    #[test]
    fn retention_combined_rules_report_every_reason() {
        let snaps = vec![
            (id(1), snap("h", at("2024-01-30 12:00:00"), &[])),
            (id(2), snap("h", at("2024-01-31 12:00:00"), &["keep"])),
            (id(3), snap("h", at("2024-02-01 06:00:00"), &[])),
        ];
        let policy = RetentionPolicy {
            keep_last: count(1),
            keep_daily: count(2),
            keep_monthly: count(2),
            keep_within: within("1d"),
            keep_tags: vec![vec!["keep".into()]],
            ..Default::default()
        };
        let p = plan(&snaps, &policy, &GroupBy::none(), utc()).unwrap().remove(0);
        assert_eq!(
            p.keep[0].reasons,
            ["within 1d", "last snapshot", "daily snapshot", "monthly snapshot"].map(String::from)
        );
        assert_eq!(p.keep[1].reasons, ["has tags [keep]", "within 1d", "daily snapshot", "monthly snapshot"]);
        assert_eq!(p.remove.iter().map(|d| d.id).collect::<Vec<_>>(), [id(1)]);
        assert_eq!(
            policy.to_string(),
            "keep 1 last, 2 daily, 2 monthly snapshots and all snapshots with tags [keep] \
             and all snapshots within 1d of the newest"
        );
    }

    #[test]
    fn retention_empty_policy_is_refused() {
        let snaps = series(&["2024-01-01 00:00:00"]);
        let msg = |p: &RetentionPolicy| plan(&snaps, p, &GroupBy::default(), utc()).unwrap_err().to_string();
        assert!(RetentionPolicy::default().is_empty());
        assert!(msg(&RetentionPolicy::default()).contains("no policy was specified"));
        // Zero counts and zero durations are unset, as in restic.
        let zero = RetentionPolicy {
            keep_last: count(0),
            keep_within: Some(WithinDuration::default()),
            keep_last_failed: Some(0),
            ..Default::default()
        };
        assert!(zero.is_empty());
        assert!(msg(&zero).contains("no policy was specified"));
        // Only a rule for failed snapshots would remove every successful one.
        let only_failed = RetentionPolicy { keep_last_failed: Some(3), ..Default::default() };
        assert!(!only_failed.is_empty());
        assert!(msg(&only_failed).contains("keep_last_failed"));
    }

    #[test]
    fn retention_refuses_to_remove_a_whole_group() {
        let snaps = series(&["2024-01-01 00:00:00", "2024-01-02 00:00:00"]);
        let policy = RetentionPolicy { keep_tags: vec![vec!["nope".into()]], ..Default::default() };
        let err = plan(&snaps, &policy, &GroupBy::default(), utc()).unwrap_err();
        assert!(err.to_string().contains("refusing to delete last snapshot of snapshot group \"host h, tags []\""));
    }

    #[test]
    fn retention_rejects_duplicate_ids() {
        let mut snaps = series(&["2024-01-01 00:00:00"]);
        snaps.push(snaps[0].clone());
        let policy = RetentionPolicy { keep_last: count(1), ..Default::default() };
        assert!(plan(&snaps, &policy, &GroupBy::default(), utc()).unwrap_err().to_string().contains("listed twice"));
    }

    #[test]
    fn retention_unlimited_keeps_one_per_bucket() {
        let snaps = series(&[
            "2023-12-30 08:00:00",
            "2023-12-31 08:00:00",
            "2023-12-31 20:00:00",
            "2024-01-01 01:00:00",
            "2024-01-01 02:00:00",
            "2024-01-03 23:59:59",
        ]);
        let p = one_group(&snaps, &RetentionPolicy { keep_daily: Some(KeepCount::Unlimited), ..Default::default() });
        assert_eq!(kept_times(&p), ["2024-01-03 23:59", "2024-01-01 02:00", "2023-12-31 20:00", "2023-12-30 08:00"]);
        assert!(p.keep.iter().all(|d| d.reasons == ["daily snapshot"]));

        // Unlimited also keeps the oldest when its bucket is already represented.
        let snaps = series(&["2024-01-01 01:00:00", "2024-01-01 02:00:00", "2024-01-02 00:00:00"]);
        let p = one_group(&snaps, &RetentionPolicy { keep_daily: Some(KeepCount::Unlimited), ..Default::default() });
        assert_eq!(p.keep.len(), 3);
        assert_eq!(reasons_of(&p, "2024-01-01 01:00:00"), ["oldest daily snapshot"]);
    }

    #[test]
    fn retention_time_zone_moves_bucket_edges() {
        // 23:30 UTC on 1 Jan is 01:30 on 2 Jan at +02:00.
        let snaps = series(&["2024-01-01 21:00:00", "2024-01-01 23:30:00", "2024-01-02 10:00:00"]);
        let policy = RetentionPolicy { keep_daily: count(2), ..Default::default() };
        let in_utc = plan(&snaps, &policy, &GroupBy::default(), utc()).unwrap();
        assert_eq!(kept_times(&in_utc[0]), ["2024-01-02 10:00", "2024-01-01 23:30"]);
        let plus2 = FixedOffset::east_opt(2 * 3600).unwrap();
        let in_plus2 = plan(&snaps, &policy, &GroupBy::default(), plus2).unwrap();
        assert_eq!(kept_times(&in_plus2[0]), ["2024-01-02 10:00", "2024-01-01 21:00"]);
        assert!(in_plus2[0].keep.iter().all(|d| d.reasons == ["daily snapshot"]));
    }

    #[test]
    fn retention_failed_snapshots_are_planned_apart() {
        let snaps = vec![
            (id(1), snap("h", at("2024-01-01 00:00:00"), &["keep"])),
            (id(2), failed(snap("h", at("2024-01-02 00:00:00"), &["keep"]))),
            (id(3), snap("h", at("2024-01-03 00:00:00"), &[])),
            (id(4), failed(snap("h", at("2024-01-04 00:00:00"), &[]))),
            (id(5), snap("h", at("2024-01-05 00:00:00"), &[])),
            (id(6), failed(snap("h", at("2024-01-10 00:00:00"), &[]))),
        ];
        let policy = RetentionPolicy {
            keep_last: count(2),
            keep_within: within("1d"),
            keep_tags: vec![vec!["keep".into()]],
            keep_last_failed: Some(1),
            ..Default::default()
        };
        let plans = plan(&snaps, &policy, &GroupBy::none(), utc()).unwrap();
        let p = &plans[0];
        let keep: Vec<_> = p.keep.iter().map(|d| (d.id, d.failed, d.reasons.clone())).collect();
        assert_eq!(
            keep,
            [
                (id(6), true, vec!["last failed snapshot".to_string()]),
                // The window is anchored at the newest successful snapshot, not the failed one.
                (id(5), false, vec!["within 1d".into(), "last snapshot".into()]),
                // Failed snapshots use none of keep_last's budget.
                (id(3), false, vec!["last snapshot".into()]),
                (id(1), false, vec!["has tags [keep]".into()]),
            ]
        );
        // Tags do not keep failed snapshots; only the newest failed one is kept.
        assert_eq!(p.remove.iter().map(|d| (d.id, d.failed)).collect::<Vec<_>>(), [(id(4), true), (id(2), true)]);

        // Without keep_last_failed every failed snapshot goes...
        let policy = RetentionPolicy { keep_last: count(5), ..Default::default() };
        let plans = plan(&snaps, &policy, &GroupBy::none(), utc()).unwrap();
        assert!(plans[0].keep.iter().all(|d| !d.failed));
        assert_eq!(plans[0].remove.len(), 3);
        // ...and a group holding only failed snapshots is not emptied.
        let only_failed = vec![(id(9), failed(snap("h", at("2024-01-01 00:00:00"), &[])))];
        let err = plan(&only_failed, &policy, &GroupBy::none(), utc()).unwrap_err();
        assert!(err.to_string().contains("refusing to delete last snapshot"));
        assert!(is_failed(&only_failed[0].1));
    }

    #[test]
    fn retention_policy_serde_and_parsing() {
        let json = r#"{"keep_last":3,"keep_daily":-1,"keep_weekly":"unlimited","keep_within":"2y5mo7d3h",
                        "keep_within_daily":"7d","keep_tags":[["a","b"]],"keep_last_failed":1}"#;
        let p: RetentionPolicy = serde_json::from_str(json).unwrap();
        assert_eq!(p.keep_last, count(3));
        assert_eq!(p.keep_daily, Some(KeepCount::Unlimited));
        assert_eq!(p.keep_weekly, Some(KeepCount::Unlimited));
        assert_eq!(
            p.keep_within,
            Some(WithinDuration { years: 2, months: 5, days: 7, hours: 3, ..Default::default() })
        );
        assert_eq!(p.keep_last_failed, Some(1));
        let back: RetentionPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::to_string(&p).unwrap().contains(r#""keep_weekly":-1"#));
        assert_eq!(serde_json::to_string(&RetentionPolicy::default()).unwrap(), "{}");

        assert!(serde_json::from_str::<RetentionPolicy>(r#"{"keep_dayly":7}"#).is_err());
        assert!(serde_json::from_str::<RetentionPolicy>(r#"{"keep_daily":-2}"#).is_err());
        assert!("-2".parse::<KeepCount>().is_err());
        assert_eq!("unlimited".parse::<KeepCount>().unwrap(), KeepCount::Unlimited);
        assert_eq!("-1".parse::<KeepCount>().unwrap().as_i64(), -1);

        assert_eq!("7d".parse::<WithinDuration>().unwrap().to_string(), "7d");
    }

    #[test]
    fn retention_period_grammar_units_and_round_trip() {
        let p = |s: &str| s.parse::<WithinDuration>().unwrap();
        assert_eq!(p("1y6mo"), WithinDuration { years: 1, months: 6, ..Default::default() });
        // `m` is minutes, `mo` months: the same text means the same span everywhere.
        assert_eq!(p("90m"), WithinDuration { minutes: 90, ..Default::default() });
        assert_eq!(p("3mo"), WithinDuration { months: 3, ..Default::default() });
        assert_eq!(
            p("2y5mo1w3d4h30m"),
            WithinDuration { years: 2, months: 5, weeks: 1, days: 3, hours: 4, minutes: 30 }
        );
        for text in ["7d", "1y2mo3d4h", "2w", "36h", "90m", "1y6mo2w3d4h5m"] {
            assert_eq!(p(text).to_string(), text);
        }
        assert_eq!(p("0d").to_string(), "0h");
        assert!(p("0d").is_zero());
        assert_eq!(p("1y1mo1w1d1h1m").nominal().as_secs(), (365 + 30 + 7 + 1) * 86_400 + 3600 + 60);
    }

    #[test]
    fn retention_period_grammar_refuses_ambiguous_and_unknown_forms() {
        for (bad, why) in [
            ("", "empty"),
            ("1M", "unknown unit \"M\""),
            ("5x", "unknown unit \"x\""),
            ("1min", "unknown unit \"min\""),
            ("30s", "unknown unit \"s\""),
            ("1D", "unknown unit \"D\""),
            ("10", "has no unit"),
            ("1d2", "has no unit"),
            ("d", "must follow a number"),
            ("-1d", "must follow a number"),
            ("+1d", "must follow a number"),
            ("1.5d", "unknown unit \".\""),
            ("1d 2h", "unknown unit \"d \""),
            (" 1d", "must follow a number"),
            ("1d2d", "repeated or out of order"),
            ("3h1d", "repeated or out of order"),
            ("1m1mo", "repeated or out of order"),
            ("99999999999d", "too large"),
        ] {
            let e = bad.parse::<WithinDuration>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            // Every refusal says what is accepted.
            assert!(e.contains("y (years), mo (months), w (weeks), d (days), h (hours), m (minutes)"), "{e}");
        }
    }

    #[test]
    fn retention_period_pattern_matches_the_grammar_shape() {
        // The schema pattern lists the units in the parser's order, each once.
        let units: Vec<&str> =
            PERIOD_PATTERN.split("[0-9]+").skip(1).map(|u| u.split(')').next().unwrap_or_default()).collect();
        assert_eq!(units, ["y", "mo", "w", "d", "h", "m"]);
        let order: Vec<&str> = WithinDuration::default().parts().iter().map(|(_, u)| *u).collect();
        assert_eq!(units, order);
    }

    #[test]
    fn retention_plan_serializes_to_json() {
        let snaps = series(&["2024-01-01 00:00:00", "2024-01-02 00:00:00"]);
        let plans =
            plan(&snaps, &RetentionPolicy { keep_last: count(1), ..Default::default() }, &GroupBy::default(), utc())
                .unwrap();
        let v = serde_json::to_value(&plans).unwrap();
        assert_eq!(v[0]["key"]["host"], "h");
        assert_eq!(v[0]["keep"][0]["id"], id(1).to_hex());
        assert_eq!(v[0]["keep"][0]["reasons"][0], "last snapshot");
        assert_eq!(v[0]["remove"][0]["reasons"].as_array().unwrap().len(), 0);
    }

    fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
        let c = || prop::option::of(prop_oneof![(0u32..4).prop_map(KeepCount::Count), Just(KeepCount::Unlimited)]);
        let w = || {
            prop::option::of((0u32..2, 0u32..3, 0u32..10, 0u32..30).prop_map(|(years, months, days, hours)| {
                WithinDuration { years, months, days, hours, ..Default::default() }
            }))
        };
        ((c(), c(), c(), c(), c(), c()), (w(), w(), w()), prop::option::of(0u32..3), any::<bool>()).prop_map(
            |((last, hourly, daily, weekly, monthly, yearly), (within, wd, ww), failed, tags)| RetentionPolicy {
                keep_last: last,
                keep_hourly: hourly,
                keep_daily: daily,
                keep_weekly: weekly,
                keep_monthly: monthly,
                keep_yearly: yearly,
                keep_within: within,
                keep_within_daily: wd,
                keep_within_weekly: ww,
                keep_tags: if tags { vec![vec!["t".into()]] } else { Vec::new() },
                keep_last_failed: failed,
                ..Default::default()
            },
        )
    }

    proptest! {
        #[test]
        fn retention_plan_partitions_and_ignores_input_order(
            policy in arb_policy(),
            raw in prop::collection::vec((0i64..400 * 24 * 60, 0u8..2, any::<bool>(), any::<bool>()), 1..40),
            rotate in 0usize..40,
        ) {
            let base = at("2023-06-01 00:00:00");
            let snaps: Vec<(Id, Snapshot)> = raw.iter().enumerate().map(|(i, (mins, host, tag, fail))| {
                let tags: &[&str] = if *tag { &["t"] } else { &[] };
                let s = snap(["a", "b"][*host as usize], base + TimeDelta::minutes(*mins), tags);
                (id(i as u32), if *fail { failed(s) } else { s })
            }).collect();
            let group_by = GroupBy { tags: false, ..GroupBy::default() };
            let first = plan(&snaps, &policy, &group_by, utc());
            let mut rotated = snaps.clone();
            rotated.rotate_left(rotate % snaps.len());
            let second = plan(&rotated, &policy, &group_by, utc());
            match (&first, &second) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "order changed the outcome"),
            }
            if let Ok(plans) = first {
                let mut ids: Vec<Id> = plans.iter()
                    .flat_map(|p| p.keep.iter().chain(&p.remove).map(|d| d.id)).collect();
                ids.sort();
                let mut want: Vec<Id> = snaps.iter().map(|s| s.0).collect();
                want.sort();
                prop_assert_eq!(ids, want);
                for p in &plans {
                    prop_assert!(!p.keep.is_empty());
                    prop_assert!(p.keep.iter().all(|d| !d.reasons.is_empty()));
                    prop_assert!(p.keep.windows(2).all(|w| w[0].time >= w[1].time));
                    // A counted or within rule always keeps the newest successful snapshot.
                    let counted = policy.counts().iter().any(|(c, _, _)| c.is_some_and(KeepCount::is_active))
                        || policy.keep_within.is_some_and(|w| !w.is_zero());
                    let newest_ok = p.keep.iter().chain(&p.remove).filter(|d| !d.failed).max_by_key(|d| d.time);
                    if let (true, Some(newest)) = (counted, newest_ok) {
                        prop_assert!(p.keep.iter().any(|d| d.time == newest.time && !d.failed));
                    }
                }
            }
        }
    }
}
