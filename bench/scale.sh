#!/usr/bin/env bash
# Scale benchmark: many small files (default one million) backed up and restored by hoard under
# a memory budget, side by side with restic; wall time, CPU and peak RSS of each phase.
# Usage: bench/scale.sh [--files 1000000] [--budget-mib 512] [--tools "hoard restic"]
#                       [--work DIR] [--no-build] [--keep]
# See bench/README.md ("Scale").
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/common.sh"
export PATH="${HOARD_BENCH_TOOLS:-$HOME/.cache/hoard/tools}/bin:$PATH"

FILES=1000000
BUDGET=512
TOOLS="hoard restic"
WORK="${HOARD_BENCH_WORK:-$HOME/.cache/hoard/bench-scale}"
BUILD=1
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --files) FILES="$2"; shift 2 ;;
    --budget-mib) BUDGET="$2"; shift 2 ;;
    --tools) TOOLS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) common_option "$0" "$1"; shift ;;
  esac
done
build_hoard
[ -x /usr/bin/time ] || { echo "/usr/bin/time (Debian package time) is required" >&2; exit 1; }
mkdir -p "$WORK"
DATA="$WORK/data-$FILES"
export HOARD_PASSWORD=bench-password RESTIC_PASSWORD=bench-password RESTIC_CACHE_DIR="$WORK/cache-restic"
unset HOARD_LOG

if [ ! -f "$DATA/.complete" ]; then
  rm -rf "$DATA"
  echo "generating $FILES small files in $DATA" >&2
  python3 - "$DATA" "$FILES" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
words = b"config server client request error value key table index row backup volume".split()
for i in range(n):
    d = os.path.join(root, f"d{i // 100000:02d}", f"e{(i // 1000) % 100:02d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    body = b" ".join(rng.choice(words) for _ in range(rng.randint(8, 160)))
    with open(os.path.join(d, f"f{i:07d}.txt"), "wb") as f:
        f.write(b"file %d\n" % i + body + b"\n")
open(os.path.join(root, ".complete"), "w").close()
EOF
fi
BYTES=$(du -sb --apparent-size "$DATA" | cut -f1)

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || echo "(page cache not dropped)" >&2; }
row() {  # tool phase command...
  local tool="$1" phase="$2"; shift 2
  drop_caches
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$@" >"$WORK/out-$tool-$phase.log" 2>&1
  local rc=$? t; t=$(tail -1 "$WORK/time")
  set -- $t
  printf '| %s | %s | %s | %s | %.2f | %.1f | %s |\n' "$tool" "$phase" "$rc" "$1" "$(echo "$2 + $3" | bc)" "$(echo "$4 / 1024" | bc -l)" \
    "$( [ "$phase" = backup ] && du -sb "$WORK/repo-$tool" | awk '{printf "%.1f", $1/1048576}' || echo —)"
}

echo "### $(date -u +%Y-%m-%dT%H:%M:%SZ) — scale: $FILES files, $((BYTES / 1048576)) MiB, hoard memory budget $BUDGET MiB"
echo
echo "- machine: nproc=$(nproc), load at start $(cut -d' ' -f1-3 /proc/loadavg); hoard from commit $(cd "$REPO_ROOT" && git rev-parse --short HEAD)"
echo
echo "| tool | phase | rc | wall s | CPU s | peak RSS MiB | repo MiB |"
echo "|---|---|---:|---:|---:|---:|---:|"
verified=""
for tool in $TOOLS; do
  repo="$WORK/repo-$tool" target="$WORK/restore-$tool"
  rm -rf "$repo" "$target" "$RESTIC_CACHE_DIR"; mkdir -p "$target"
  case "$tool" in
    hoard)
      "$HOARD" --repo "$repo" init --kdf-memory-mib 64 >/dev/null
      row hoard backup "$HOARD" --repo "$repo" -q backup "$DATA" --memory-budget-mib "$BUDGET"
      row hoard restore "$HOARD" --repo "$repo" -q restore latest --target "$target" ;;
    restic)
      restic -r "$repo" init --repository-version 2 -q >/dev/null
      row restic backup restic -r "$repo" -q backup "$DATA"
      row restic restore restic -r "$repo" -q restore latest --target "$target" ;;
  esac
  marker=$(find "$target" -name .complete -print -quit)
  if [ -n "$marker" ] && diff -rq "$DATA" "$(dirname "$marker")" >"$WORK/diff-$tool.log" 2>&1; then
    verified="$verified $tool"
  else
    echo "| $tool | verify | 1 | restore differs from the source (see $WORK/diff-$tool.log) | | | |"
  fi
  [ "$KEEP" = 1 ] || rm -rf "$repo" "$target"
done
echo
echo "- restores identical to the source (diff -r):${verified:- none}"
echo "- load at end $(cut -d' ' -f1-3 /proc/loadavg)"
