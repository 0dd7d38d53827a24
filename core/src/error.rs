//! Typed errors for the repository library.
//!
//! Every error has a [`Class`]: retryable errors (a flaky store, a timeout) may succeed when the
//! same operation is repeated; permanent errors (corruption, a wrong password) never will.
//! Binaries map errors to exit codes with [`Error::exit_code`].

use std::fmt;

/// Whether repeating the failed operation can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Retryable,
    Permanent,
}

/// Which kind of repository object an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Config,
    Key,
    Pack,
    Index,
    Snapshot,
    Blob,
    Lock,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Config => "config",
            ObjectKind::Key => "key",
            ObjectKind::Pack => "pack",
            ObjectKind::Index => "index",
            ObjectKind::Snapshot => "snapshot",
            ObjectKind::Blob => "blob",
            ObjectKind::Lock => "lock",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no repository at {0} (run `hoard init` first)")]
    RepositoryNotFound(String),
    #[error("a repository already exists at {0}")]
    RepositoryExists(String),
    #[error("wrong password or no key slot matches it")]
    WrongPassword,
    #[error("repository format version {found} is not supported by this hoard (supports {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("{kind} {name} is damaged: {reason}")]
    Corrupt { kind: ObjectKind, name: String, reason: String },
    #[error("{kind} {name} is missing")]
    Missing { kind: ObjectKind, name: String },
    #[error("no snapshot matches {0:?}")]
    SnapshotNotFound(String),
    #[error("snapshot prefix {0:?} is ambiguous")]
    AmbiguousSnapshot(String),
    #[error("path {0:?} not found in snapshot")]
    PathNotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("storage error on {op} {key}: {message}")]
    Storage { op: &'static str, key: String, message: String, class: Class },
    #[error("object {0} not found")]
    ObjectNotFound(String),
    #[error("object {0} already exists")]
    AlreadyExists(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("repository is locked: {0}")]
    Locked(String),
    #[error("operation cancelled")]
    Cancelled,
    #[error("deadline exceeded after {0:?}")]
    Deadline(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn class(&self) -> Class {
        match self {
            Error::Storage { class, .. } => *class,
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                    Class::Retryable
                }
                _ => Class::Permanent,
            },
            _ => Class::Permanent,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class() == Class::Retryable
    }

    pub fn corrupt(kind: ObjectKind, name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt { kind, name: name.into(), reason: reason.into() }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// Whether the error is a write refused because the device or the quota is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::Io { source, .. } if is_no_space(source))
    }

    /// The process exit code a command line tool should use for this error.
    ///
    /// Follows restic where restic has a code: 10 no repository, 12 wrong password, 11 locked.
    pub fn exit_code(&self) -> i32 {
        match self {
            e if e.is_no_space() => NO_SPACE_EXIT_CODE,
            Error::RepositoryNotFound(_) => 10,
            Error::Locked(_) => 11,
            Error::WrongPassword => 12,
            Error::UnsupportedVersion { .. } => 13,
            Error::Corrupt { .. } | Error::Missing { .. } => 14,
            Error::Cancelled => 130,
            _ => 1,
        }
    }
}

/// Exit code of an operation stopped by a full device or quota (repository or restore target).
pub const NO_SPACE_EXIT_CODE: i32 = 15;

/// `ENOSPC` or `EDQUOT`: the device or the quota the write went to is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// The first full-device error in `e`'s source chain (an `object_store` error wraps the
/// `io::Error` of a local write), as a fresh `io::Error` of the same code.
pub(crate) fn no_space_in(e: &(dyn std::error::Error + 'static)) -> Option<std::io::Error> {
    let mut next = Some(e);
    // Bounded: source chains are short; a cyclic one stops here.
    for _ in 0..32 {
        let cur = next?;
        if let Some(io) = cur.downcast_ref::<std::io::Error>()
            && is_no_space(io)
        {
            return Some(std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(libc::ENOSPC)));
        }
        next = cur.source();
    }
    None
}

/// Attaches a human context to an `std::io::Result`.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}

impl<T> IoContext<T> for rustix::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {inner}")]
    struct Wrapper {
        #[source]
        inner: std::io::Error,
    }

    #[test]
    fn a_full_device_or_quota_anywhere_in_the_chain_is_no_space() {
        for code in [libc::ENOSPC, libc::EDQUOT] {
            let wrapped = Wrapper { inner: std::io::Error::from_raw_os_error(code) };
            let found = no_space_in(&wrapped).expect("no-space error in the source chain");
            assert_eq!(found.raw_os_error(), Some(code));
            let e = Error::io("write pack", found);
            assert!(e.is_no_space());
            assert_eq!(e.exit_code(), NO_SPACE_EXIT_CODE);
            assert_eq!(e.class(), Class::Permanent);
        }
        let other = Wrapper { inner: std::io::Error::from_raw_os_error(libc::EIO) };
        assert!(no_space_in(&other).is_none());
        assert_eq!(Error::io("write pack", other.inner).exit_code(), 1);
        assert!(!Error::Cancelled.is_no_space());
    }
}
