//! Types shared by several hoard resources: references, usage policies, conditions and the
//! duration grammar used in specs.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// A reference to a namespaced object; an empty namespace means the referrer's own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl ObjectRef {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), namespace: None }
    }

    /// The namespace this reference points into, given the referrer's namespace.
    pub fn namespace_or<'a>(&'a self, referrer: &'a str) -> &'a str {
        self.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or(referrer)
    }
}

/// A reference to a Secret key-value set in the referrer's namespace (or the named one).
pub type SecretRef = ObjectRef;

/// The workload kinds a backup or restore can target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum TargetKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Pod,
    PersistentVolumeClaim,
}

impl TargetKind {
    pub fn api_group(self) -> &'static str {
        match self {
            TargetKind::Pod | TargetKind::PersistentVolumeClaim => "",
            _ => "apps",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Deployment => "Deployment",
            TargetKind::StatefulSet => "StatefulSet",
            TargetKind::DaemonSet => "DaemonSet",
            TargetKind::ReplicaSet => "ReplicaSet",
            TargetKind::Pod => "Pod",
            TargetKind::PersistentVolumeClaim => "PersistentVolumeClaim",
        }
    }
}

/// What a backup or restore acts on: a workload or a claim in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// Informational; derived from `kind` when empty ("apps" or the core group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    pub kind: TargetKind,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Which namespaces may use a shared object (BackupStorage, RetentionPolicy).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsagePolicy {
    #[serde(default)]
    pub allowed_namespaces: AllowedNamespaces,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// `Same` (the default): only the object's own namespace. `All`: every namespace.
    /// `Selector`: namespaces whose labels match `selector`.
    #[serde(default)]
    pub from: NamespaceFrom,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NamespaceFrom {
    #[default]
    Same,
    All,
    Selector,
}

impl UsagePolicy {
    /// Whether a user in `namespace` (with `labels`) may use an object living in `owner_ns`.
    pub fn admits(&self, owner_ns: &str, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        if namespace == owner_ns {
            return true;
        }
        let allowed = &self.allowed_namespaces;
        match allowed.from {
            NamespaceFrom::Same => false,
            NamespaceFrom::All => true,
            NamespaceFrom::Selector => allowed.selector.as_ref().is_some_and(|s| selector_matches(s, labels)),
        }
    }
}

/// Label-selector semantics as the API server applies them (an empty selector matches all).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector.match_labels.as_ref().is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_expr = selector.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
    });
    by_label && by_expr
}

/// What happens to remote data when the object that owns it is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the Kubernetes object only; backed-up data stays in the bucket.
    #[default]
    Delete,
    /// Also remove the data from the bucket.
    WipeOut,
}

/// Regular expression for spec durations such as `30s`, `15m`, `1h30m` (Go's
/// `time.ParseDuration` units that make sense for backups).
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Regular expression for retention periods: `30d`, `1y6mo`, `2w`, `12h`, `30d12h30m`. The
/// grammar is hoard-core's ([`hoard_core::retention::WithinDuration`], also `hoard forget
/// --keep-within`): units largest first, each once, `m` minutes and `mo` months.
pub const PERIOD_PATTERN: &str = hoard_core::retention::PERIOD_PATTERN;

/// Parses a spec duration (`1h30m`, `45s`, `250ms`, `1.5h`).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let units: &[(&str, f64)] = &[("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)];
    parse_units(s, units).map(std::time::Duration::from_secs_f64)
}

/// Parses a retention period (`30d`, `1y6mo`, `90m`) with hoard-core's grammar; as a length
/// from now, months are 30 days and years 365 days. The error says which forms are accepted.
pub fn parse_period(s: &str) -> Result<std::time::Duration, hoard_core::Error> {
    s.parse::<hoard_core::retention::WithinDuration>().map(|p| p.nominal())
}

fn parse_units(s: &str, units: &[(&str, f64)]) -> Option<f64> {
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        // Longest unit first so "ms" and "mo" are not read as "m".
        let (unit, factor) = units.iter().filter(|(u, _)| rest.starts_with(u)).max_by_key(|(u, _)| u.len()).copied()?;
        rest = &rest[unit.len()..];
        total += number * factor;
    }
    (total.is_finite() && total < 1e12).then_some(total)
}

/// Sets `condition` in `conditions`, keeping `lastTransitionTime` when the status is unchanged.
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            if existing.status == condition.status {
                condition.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = condition;
        }
        None => conditions.push(condition),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        for bad in ["", "h", "10", "10x", "-1s", "1d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn periods_parse_with_calendar_units() {
        let ok = |s: &str| parse_period(s).expect(s);
        assert_eq!(ok("30d"), Duration::from_secs(30 * 86_400));
        assert_eq!(ok("1y6mo"), Duration::from_secs((365 + 180) * 86_400));
        assert_eq!(ok("2w12h30m"), Duration::from_secs(14 * 86_400 + 12 * 3600 + 1800));
        // `m` is minutes here exactly as in `hoard forget --keep-within`.
        assert_eq!(ok("90m"), Duration::from_secs(90 * 60));
        for bad in ["", "1.5d", "d", "3s", "10", "1M", "5x", "1d1d", "12h30d"] {
            let e = parse_period(bad).expect_err(bad).to_string();
            assert!(e.contains("mo (months)") && e.contains("m (minutes)"), "{bad}: {e}");
        }
    }

    #[test]
    fn usage_policy_admits_by_rule() {
        let labels: BTreeMap<String, String> = [("team".to_string(), "a".to_string())].into();
        let none = BTreeMap::new();
        let same = UsagePolicy::default();
        assert!(same.admits("ns", "ns", &none));
        assert!(!same.admits("ns", "other", &labels));
        let all = UsagePolicy { allowed_namespaces: AllowedNamespaces { from: NamespaceFrom::All, selector: None } };
        assert!(all.admits("ns", "other", &none));
        let sel = UsagePolicy {
            allowed_namespaces: AllowedNamespaces {
                from: NamespaceFrom::Selector,
                selector: Some(LabelSelector { match_labels: Some(labels.clone()), ..Default::default() }),
            },
        };
        assert!(sel.admits("ns", "other", &labels));
        assert!(!sel.admits("ns", "other", &none));
        let no_selector =
            UsagePolicy { allowed_namespaces: AllowedNamespaces { from: NamespaceFrom::Selector, selector: None } };
        assert!(!no_selector.admits("ns", "other", &labels));
    }
}
