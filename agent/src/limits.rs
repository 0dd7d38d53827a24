//! Defaults of the node budget from the pod's cgroup (v2) memory limit, and size parsing for the
//! budget flags.
//!
//! The memory budget bounds file data in flight (read, not yet sealed into a pack) for all
//! running orders together. The process needs memory besides that: per running backup, packs
//! being built and uploaded (about [`PER_ORDER_OVERHEAD`]), plus the runtime, TLS and buffers.
//! So the default is half the pod's limit minus that overhead per order slot, never below
//! [`MIN_MEMORY_BUDGET`]; without a limit (`max`, no cgroup v2, unreadable), it is
//! [`FALLBACK_MEMORY_BUDGET`].

use std::path::Path;

/// Where the pod's memory limit is, with cgroup v2 and a private cgroup namespace.
pub const CGROUP_MEMORY_MAX: &str = "/sys/fs/cgroup/memory.max";
/// Budget when no limit is known.
pub const FALLBACK_MEMORY_BUDGET: usize = 1 << 30;
/// Smallest budget: one read segment (16 MiB) plus room for a second.
pub const MIN_MEMORY_BUDGET: usize = 32 << 20;
/// Memory a running backup holds outside the budget: packs (16 MiB by default) being built,
/// queued and uploaded.
pub const PER_ORDER_OVERHEAD: u64 = 96 << 20;

/// The limit in a cgroup v2 `memory.max` file: `None` for `max` or anything unparsable.
pub fn parse_memory_max(content: &str) -> Option<u64> {
    content.trim().parse::<u64>().ok()
}

/// The default budget for a pod limit (`None`: unlimited) and a number of order slots.
pub fn budget_for_limit(limit: Option<u64>, slots: usize) -> usize {
    match limit {
        None => FALLBACK_MEMORY_BUDGET,
        Some(l) => {
            let b = (l / 2).saturating_sub(PER_ORDER_OVERHEAD.saturating_mul(slots as u64));
            usize::try_from(b).unwrap_or(usize::MAX).max(MIN_MEMORY_BUDGET)
        }
    }
}

/// The default budget read from `memory_max` (normally [`CGROUP_MEMORY_MAX`]), and where it
/// came from, for the log.
pub fn default_memory_budget(memory_max: &Path, slots: usize) -> (usize, String) {
    match std::fs::read_to_string(memory_max) {
        Ok(c) => match parse_memory_max(&c) {
            Some(l) => (budget_for_limit(Some(l), slots), format!("cgroup memory limit {l} bytes")),
            None => (FALLBACK_MEMORY_BUDGET, format!("cgroup memory limit {:?}", c.trim())),
        },
        Err(e) => (FALLBACK_MEMORY_BUDGET, format!("no cgroup v2 memory limit ({}: {e})", memory_max.display())),
    }
}

/// Parses a byte size: plain bytes, or a number with `K`/`M`/`G`/`T` (powers of 1000) or
/// `Ki`/`Mi`/`Gi`/`Ti` (powers of 1024), as Kubernetes quantities are written.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 536870912, 512Mi, 2Gi)"))?;
    let mult: u64 = match unit {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G, T, Ki, Mi, Gi or Ti)")),
    };
    n.checked_mul(mult).and_then(|b| usize::try_from(b).ok()).ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_max_and_budget() {
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_memory_max(""), None);
        // 2 GiB pod, 2 slots: 1 GiB minus 192 MiB.
        assert_eq!(budget_for_limit(Some(2 << 30), 2), (1 << 30) - (192 << 20));
        // A small pod still gets the minimum.
        assert_eq!(budget_for_limit(Some(128 << 20), 2), MIN_MEMORY_BUDGET);
        assert_eq!(budget_for_limit(None, 2), FALLBACK_MEMORY_BUDGET);
    }

    #[test]
    fn reads_the_limit_file_or_falls_back() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let f = dir.path().join("memory.max");
        std::fs::write(&f, "4294967296\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(default_memory_budget(&f, 1).0, (2 << 30) - (96 << 20));
        std::fs::write(&f, "max\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(default_memory_budget(&f, 1).0, FALLBACK_MEMORY_BUDGET);
        assert_eq!(default_memory_budget(&dir.path().join("missing"), 1).0, FALLBACK_MEMORY_BUDGET);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert_eq!(parse_size("64Ki"), Ok(64 << 10));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("Mi").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }
}
