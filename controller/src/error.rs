//! The controller's error type. Every error carries a class: `Retryable` errors requeue the
//! object with a delay, `Permanent` ones are recorded in status and not retried until the
//! object changes. Messages never contain secret values (passwords, keys): only names of
//! Secrets and keys.

use std::time::Duration;

/// Whether trying again later can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Retryable,
    Permanent,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("not allowed: {0}")]
    Forbidden(String),
    #[error("repository: {0}")]
    Repository(#[source] hoard_core::Error),
    #[error("agent on node {node}: {reason}")]
    Agent { node: String, reason: String },
    #[error("{0}")]
    Transient(String),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl From<hoard_core::Error> for Error {
    fn from(e: hoard_core::Error) -> Self {
        Error::Repository(e)
    }
}

impl Error {
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), reason: reason.into() }
    }

    pub fn class(&self) -> Class {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => Class::Permanent,
            Error::Kube(_) | Error::Agent { .. } | Error::Transient(_) | Error::NotFound(_) => Class::Retryable,
            Error::Repository(e) if e.is_retryable() => Class::Retryable,
            Error::Repository(_) | Error::Invalid { .. } | Error::Forbidden(_) | Error::Json(_) => Class::Permanent,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class() == Class::Retryable
    }

    /// Requeue delay after this error when it is the `failures`-th in a row for its object
    /// (see [`backoff`]).
    pub fn backoff(&self, failures: u32) -> Duration {
        backoff(failures, self.class())
    }

    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Invalid { .. } => "invalid",
            Error::NotFound(_) => "not_found",
            Error::Forbidden(_) => "forbidden",
            Error::Repository(_) => "repository",
            Error::Agent { .. } => "agent",
            Error::Transient(_) => "transient",
            Error::Json(_) => "json",
        }
    }
}

/// First delay after a retryable failure; it doubles per consecutive failure up to
/// [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(2);
/// Ceiling of the retry delay (and the delay after a permanent failure: the object is looked at
/// again this rarely until it changes).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Delay before the next attempt after `failures` consecutive failures (1 = the first) of the
/// given class: retryable ones back off exponentially from [`MIN_BACKOFF`], bounded by
/// [`MAX_BACKOFF`]; permanent ones wait [`MAX_BACKOFF`] (a spec change retriggers sooner).
pub fn backoff(failures: u32, class: Class) -> Duration {
    match class {
        Class::Permanent => MAX_BACKOFF,
        Class::Retryable => {
            let exp = failures.saturating_sub(1).min(16);
            MIN_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF)
        }
    }
}

/// Consecutive failures per object (`<controller>/<namespace>/<name>`), for [`backoff`].
/// Bounded: an entry exists only while its object keeps failing, and at most [`Failures::CAP`]
/// entries are kept (the map is cleared past that, which only shortens some delays once).
#[derive(Debug, Default)]
pub struct Failures {
    map: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Failures {
    pub const CAP: usize = 10_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u32>> {
        self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records one more failure and returns the count (1 for the first).
    pub fn bump(&self, key: &str) -> u32 {
        let mut m = self.lock();
        if m.len() >= Self::CAP && !m.contains_key(key) {
            m.clear();
        }
        let n = m.entry(key.to_string()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    pub fn reset(&self, key: &str) {
        self.lock().remove(key);
    }

    pub fn get(&self, key: &str) -> u32 {
        self.lock().get(key).copied().unwrap_or(0)
    }
}

/// True for a 404 from the API server.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// True for a 409 (conflict / already exists).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_failures_back_off_exponentially_and_bounded() {
        let d: Vec<u64> = (1..=10).map(|n| backoff(n, Class::Retryable).as_secs()).collect();
        assert_eq!(d, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(0, Class::Retryable), MIN_BACKOFF);
        assert_eq!(backoff(u32::MAX, Class::Retryable), MAX_BACKOFF);
        assert_eq!(backoff(1, Class::Permanent), MAX_BACKOFF);
    }

    #[test]
    fn failures_count_per_object_and_reset() {
        let f = Failures::default();
        assert_eq!(f.bump("a"), 1);
        assert_eq!(f.bump("a"), 2);
        assert_eq!(f.bump("b"), 1);
        f.reset("a");
        assert_eq!(f.get("a"), 0);
        assert_eq!(f.bump("a"), 1);
    }
}
