#!/usr/bin/env bash
# Single-stream benchmark: one large log-like text file, already in the page cache, backed up by
# hoard and restic into fresh local repositories; beside them, zstd -1 on one core over the same
# file (compression is the slowest stage of the data path). Prints hoard's end-to-end MiB/s as a
# share of that stage x cores, the issue's "the pipeline, not locking or copying, is what costs".
# Usage: bench/stream.sh [--size-mib 1024] [--reps 3] [--work DIR] [--no-build]
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/common.sh"

MIB=1024
REPS=3
WORK="${HOARD_BENCH_WORK:-$HOME/.cache/hoard/bench-stream}"
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) MIB="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    *) common_option "$0" "$1"; shift ;;
  esac
done
build_hoard
for t in restic zstd /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "$t is required (Debian packages restic, zstd, time)" >&2; exit 1; }
done
mkdir -p "$WORK/data"
FILE="$WORK/data/app.log"
if [ ! -f "$FILE.complete-$MIB" ]; then
  rm -f "$WORK/data/"*
  echo "generating $FILE ($MIB MiB)" >&2
  python3 "$HERE/dataset.py" logfile "$FILE" --size "$MIB" && touch "$FILE.complete-$MIB"
fi
export HOARD_PASSWORD=bench-password RESTIC_PASSWORD=bench-password RESTIC_CACHE_DIR="$WORK/cache-restic"
unset HOARD_LOG

# record NAME COMMAND...: one run's wall seconds (file warmed into the page cache first) added to
# runs[NAME]; a failed run stops the benchmark, so no median is taken over a failure.
record() {
  local name="$1"; shift
  cat "$FILE" >/dev/null
  if ! /usr/bin/time -f "%e" -o "$WORK/time" "$@" >"$WORK/out.log" 2>&1; then
    cat "$WORK/out.log" >&2
    echo "$name failed; stopping" >&2
    exit 1
  fi
  runs[$name]+="$(tail -1 "$WORK/time") "
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

declare -A runs
for _ in $(seq "$REPS"); do
  rm -rf "$WORK/repo-hoard" "$WORK/repo-restic" "$WORK/cache-restic"
  "$HOARD" --repo "$WORK/repo-hoard" init --kdf-memory-mib 64 >/dev/null
  restic init --repository-version 2 -r "$WORK/repo-restic" -q
  record hoard "$HOARD" --repo "$WORK/repo-hoard" backup "$WORK/data" -q
  record restic restic -r "$WORK/repo-restic" backup "$WORK/data" -q
  record zstd zstd -1 -T1 -q -c "$FILE" -o /dev/null
done
rm -rf "$WORK/repo-hoard" "$WORK/repo-restic" "$WORK/cache-restic"

cores=$(nproc)
echo "### $(date -u +%Y-%m-%dT%H:%M:%SZ) — single stream: one ${MIB} MiB log-like text file, warm page cache, $REPS repetition(s), medians"
echo
echo "- machine: nproc=$cores, load at start of report $(cut -d' ' -f1-3 /proc/loadavg); hoard from commit $(cd "$REPO_ROOT" && git rev-parse --short HEAD)"
echo
echo "| run | wall s (each) | median s | MiB/s |"
echo "|---|---|---:|---:|"
for t in hoard restic zstd; do
  m=$(echo "${runs[$t]}" | tr ' ' '\n' | grep -v '^$' | median)
  eval "med_$t=$m"
  label=$t; [ "$t" = zstd ] && label="zstd -1, one core (the slowest stage)"
  printf '| %s | %s | %s | %.0f |\n' "$label" "${runs[$t]% }" "$m" "$(echo "$MIB / $m" | bc -l)"
done
echo
share=$(echo "($MIB / $med_hoard) / ($cores * $MIB / $med_zstd) * 100" | bc -l)
printf -- '- hoard end to end = %.0f %% of zstd -1 x %s cores (target >= 60 %%); hoard / restic throughput %.2fx\n' \
  "$share" "$cores" "$(echo "$med_restic / $med_hoard" | bc -l)"
