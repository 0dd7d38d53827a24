#!/usr/bin/env bash
# Side-by-side benchmark: hoard vs restic, borg and rustic on one reproducible PVC-shaped dataset.
# Usage: bench/run.sh [--size 2G] [--reps 3] [--tools "hoard restic borg rustic"] [--work DIR]
#                     [--results FILE] [--no-install] [--no-build] [--from-head] [--keep]
# See bench/README.md.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hoard/target}"
TOOLS_ROOT="${HOARD_BENCH_TOOLS:-$HOME/.cache/hoard/tools}"
export PATH="$TOOLS_ROOT/bin:$PATH"

SIZE=2G
REPS=3
TOOLS="hoard restic borg rustic"
WORK="${HOARD_BENCH_WORK:-$HOME/.cache/hoard/bench}"
RESULTS=""
INSTALL=1
BUILD=1
KEEP=0
SEED=1
FROM_HEAD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --tools) TOOLS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --from-head) FROM_HEAD=1; shift ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

to_bytes() {
  local v="$1" n="${1%[KkMmGg]}"
  case "$v" in
    *[Gg]) echo $((n * 1024 * 1024 * 1024)) ;;
    *[Mm]) echo $((n * 1024 * 1024)) ;;
    *[Kk]) echo $((n * 1024)) ;;
    *) echo "$v" ;;
  esac
}
SIZE_BYTES=$(to_bytes "$SIZE")
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
[ -n "$RESULTS" ] || RESULTS="$HERE/results/$STAMP.md"
mkdir -p "$WORK" "$(dirname "$RESULTS")"
LOG="$WORK/run-$STAMP.log"
MEAS="$WORK/measurements-$STAMP.tsv"
NOTES="$WORK/notes-$STAMP.txt"
: >"$MEAS"; : >"$NOTES"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }
note() { echo "$*" >>"$NOTES"; log "NOTE: $*"; }

export HOARD_PASSWORD=bench-password RESTIC_PASSWORD=bench-password RUSTIC_PASSWORD=bench-password
export BORG_PASSPHRASE=bench-password BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_DELETE_I_KNOW_WHAT_I_AM_DOING=YES
export BORG_BASE_DIR="$WORK/borg-home" RESTIC_CACHE_DIR="$WORK/cache-restic"
RUSTIC_CACHE="$WORK/cache-rustic"
unset HOARD_LOG

# ---------------------------------------------------------------- build and install
HOARD="$CARGO_TARGET_DIR/release/hoard"
SRC_DESC="working tree at $(cd "$REPO_ROOT" && git rev-parse --short HEAD)"
if [ -n "$(cd "$REPO_ROOT" && git status --porcelain --untracked-files=no -- core cli Cargo.toml Cargo.lock)" ]; then
  SRC_DESC="$SRC_DESC with uncommitted changes in: $(cd "$REPO_ROOT" && git status --porcelain --untracked-files=no -- core cli Cargo.toml Cargo.lock | awk '{print $2}' | tr '\n' ' ')"
fi
if [ "$FROM_HEAD" = 1 ]; then
  # Build exactly the committed HEAD (others may have uncommitted edits in the shared tree), in a
  # target directory of its own so the tree's release/hoard is never replaced behind anyone's back.
  SRC="$WORK/src"
  rm -rf "$SRC"; mkdir -p "$SRC"
  (cd "$REPO_ROOT" && git archive HEAD) | tar -x -C "$SRC"
  export CARGO_TARGET_DIR="${HOARD_BENCH_TARGET:-$HOME/.cache/hoard/bench-target}"
  HOARD="$CARGO_TARGET_DIR/release/hoard"
  SRC_DESC="commit $(cd "$REPO_ROOT" && git rev-parse --short HEAD) (clean export)"
  LOCKED=--locked
else
  SRC="$REPO_ROOT"
fi
if [ "$BUILD" = 1 ]; then
  log "building hoard (release) from $SRC_DESC"
  (cd "$SRC" && cargo build --release ${LOCKED:-} -p hoard) >>"$LOG" 2>&1 || { log "hoard build failed, see $LOG"; exit 1; }
fi
[ -x "$HOARD" ] || { log "no hoard binary at $HOARD"; exit 1; }

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq >>"$LOG" 2>&1; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$LOG" 2>&1
}
if [ "$INSTALL" = 1 ]; then
  [ -x /usr/bin/time ] || apt_install time
  need=""
  case " $TOOLS " in *" restic "*) command -v restic >/dev/null || need="$need restic" ;; esac
  case " $TOOLS " in *" borg "*) command -v borg >/dev/null || need="$need borgbackup" ;; esac
  if [ -n "$need" ]; then log "installing$need"; apt_install $need || log "apt-get install$need failed"; fi
  case " $TOOLS " in *" rustic "*)
    if ! command -v rustic >/dev/null; then
      # Newest first; older releases for when the newest does not build with this toolchain.
      for v in "" 0.10.3 0.9.5 0.8.1; do
        log "installing rustic-rs ${v:-latest} (slow: cargo install under nice)"
        if CARGO_TARGET_DIR="$HOME/.cache/hoard/rustic-target" nice -n 19 \
            cargo install rustic-rs ${v:+--version "$v"} --locked --root "$TOOLS_ROOT" >>"$LOG" 2>&1; then
          break
        fi
      done
      command -v rustic >/dev/null || note "rustic could not be built; continuing without it"
    fi ;;
  esac
fi
[ -x /usr/bin/time ] || { log "/usr/bin/time (package time) is required"; exit 1; }
ACTIVE=""
for t in $TOOLS; do
  case "$t" in
    hoard) ACTIVE="$ACTIVE hoard" ;;
    borg) command -v borg >/dev/null && ACTIVE="$ACTIVE borg" || note "borg missing: skipped" ;;
    *) command -v "$t" >/dev/null && ACTIVE="$ACTIVE $t" || note "$t missing: skipped" ;;
  esac
done

version_of() {
  case "$1" in
    hoard) echo "hoard, $SRC_DESC" ;;
    restic) restic version | head -1 ;;
    borg) borg --version ;;
    rustic) rustic --version 2>/dev/null | head -1 ;;
  esac
}

# ---------------------------------------------------------------- dataset
DATA="$WORK/data"
UNDO="$WORK/undo"
BASE_MAN="$WORK/manifest-base.json"
MUT_MAN="$WORK/manifest-mutated.json"
want_marker="size=$SIZE_BYTES seed=$SEED"
if [ ! -f "$DATA/.bench-root" ] || [ "$(cat "$DATA/.bench-root")" != "$want_marker" ] || [ ! -f "$MUT_MAN" ]; then
  log "generating dataset ($SIZE, seed $SEED) in $DATA"
  rm -rf "$DATA" "$UNDO"
  python3 "$HERE/dataset.py" gen "$DATA" --size "$SIZE_BYTES" --seed "$SEED" || exit 1
  python3 "$HERE/dataset.py" manifest "$DATA" "$BASE_MAN"
  python3 "$HERE/dataset.py" mutate "$DATA" "$UNDO" --seed $((SEED + 1)) >"$WORK/mutate.json"
  python3 "$HERE/dataset.py" manifest "$DATA" "$MUT_MAN"
  python3 "$HERE/dataset.py" undo "$DATA" "$UNDO"
  python3 "$HERE/dataset.py" verify "$BASE_MAN" "$DATA" >>"$LOG" || { log "undo is not exact"; exit 1; }
fi
DATA_APPARENT=$(du -sb --apparent-size "$DATA" | cut -f1)
DATA_ALLOC=$(du -sB1 "$DATA" | cut -f1)
DATA_FILES=$(find "$DATA" -type f | wc -l)
log "dataset: $DATA_FILES files, $DATA_APPARENT bytes apparent, $DATA_ALLOC allocated"

# The floor under phase (b): list and lstat every entry, nothing else (see statwalk.c).
STATWALK="$WORK/statwalk"
if ! cc -O2 -pthread -o "$STATWALK" "$HERE/statwalk.c" >>"$LOG" 2>&1; then
  note "statwalk could not be built (no C compiler?): no metadata floor for (b)"
  STATWALK=""
fi

# ---------------------------------------------------------------- helpers
DROP_OK=1
drop_caches() {
  sync
  if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
    [ "$DROP_OK" = 0 ] || note "dropping the page cache failed (not root or no /proc/sys/vm/drop_caches): warm-cache numbers"
    DROP_OK=0
  fi
}

# measure REP TOOL PHASE REPO -- command...
measure() {
  local rep="$1" tool="$2" phase="$3" repo="$4"; shift 5
  local tf="$WORK/time.$$" out="$WORK/out-$tool-$phase-$rep.log" load rc
  load=$(cut -d' ' -f1 /proc/loadavg)
  drop_caches
  /usr/bin/time -f "%e %U %S %M" -o "$tf" "$@" >"$out" 2>&1
  rc=$?
  local t; t=$(tail -1 "$tf")
  local size=0; [ -d "$repo" ] && size=$(du -sb "$repo" | cut -f1)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$tool" "$phase" "$(echo "$t" | tr ' ' '\t')" "$size" "$rc" "$load" >>"$MEAS"
  log "$tool $phase rep $rep: rc=$rc time=[$t] repo=$size load=$load"
  [ "$rc" = 0 ] || { log "$tool $phase failed; tail of $out:"; tail -5 "$out" | tee -a "$LOG" >&2; }
  return $rc
}

tool_init() {
  local tool="$1" repo="$2"
  case "$tool" in
    hoard) "$HOARD" --repo "$repo" init --kdf-memory-mib 64 ;;
    restic) restic -r "$repo" init --repository-version 2 ;;
    borg) borg init -e repokey "$repo" ;;
    rustic) rustic -r "$repo" --cache-dir "$RUSTIC_CACHE" init ;;
  esac
}

tool_backup() {  # tool repo name
  case "$1" in
    hoard) exec "$HOARD" --repo "$2" backup "$DATA" --json ;;
    restic) exec restic -r "$2" backup "$DATA" ;;
    borg) exec borg create --compression zstd,1 "$2::$3" "$DATA" ;;
    rustic) exec rustic -r "$2" --cache-dir "$RUSTIC_CACHE" backup "$DATA" ;;
  esac
}

tool_restore() {  # tool repo target
  case "$1" in
    hoard) exec "$HOARD" --repo "$2" restore latest --target "$3" --json ;;
    restic) exec restic -r "$2" restore latest --target "$3" ;;
    borg) cd "$3" && exec borg extract --sparse "$2::c" ;;
    rustic) exec rustic -r "$2" --cache-dir "$RUSTIC_CACHE" restore latest "$3" ;;
  esac
}

export HOARD DATA RUSTIC_CACHE
export -f tool_backup tool_restore

# ---------------------------------------------------------------- run
{
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc=$(nproc)"
  echo "cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "commit=$SRC_DESC"
  echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "size=$SIZE_BYTES apparent=$DATA_APPARENT alloc=$DATA_ALLOC files=$DATA_FILES reps=$REPS"
  echo "mutate=$(cat "$WORK/mutate.json")"
  for t in $ACTIVE; do echo "version_$t=$(version_of "$t")"; done
} >"$WORK/meta-$STAMP.txt"

for rep in $(seq 1 "$REPS"); do
  [ -z "$STATWALK" ] || measure "$rep" statwalk b_floor - -- "$STATWALK" "$DATA" 16
  for tool in $ACTIVE; do
    repo="$WORK/repo-$tool" target="$WORK/restore-$tool"
    rm -rf "$repo" "$target" "$RESTIC_CACHE_DIR" "$RUSTIC_CACHE" "$BORG_BASE_DIR"
    mkdir -p "$target"
    tool_init "$tool" "$repo" >>"$LOG" 2>&1 || { log "$tool init failed"; continue; }
    measure "$rep" "$tool" a_initial "$repo" -- bash -c 'tool_backup "$@"' _ "$tool" "$repo" a
    measure "$rep" "$tool" b_nochange "$repo" -- bash -c 'tool_backup "$@"' _ "$tool" "$repo" b
    python3 "$HERE/dataset.py" mutate "$DATA" "$UNDO" --seed $((SEED + 1)) >/dev/null
    measure "$rep" "$tool" c_mutated "$repo" -- bash -c 'tool_backup "$@"' _ "$tool" "$repo" c
    measure "$rep" "$tool" d_restore "$repo" -- bash -c 'tool_restore "$@"' _ "$tool" "$repo" "$target"
    if [ "$tool" = hoard ]; then
      # Files whose direct writes the filesystem refused were finished through the page cache:
      # same bytes, but not the restore path being measured.
      refused=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    if l.startswith("{") and "direct_refused" in l:
        print(json.loads(l)["outcome"]["direct_refused"])' "$WORK/out-hoard-d_restore-$rep.log" 2>/dev/null | tail -1)
      [ "${refused:-0}" = 0 ] || note "hoard restore rep $rep: ${refused} files fell back from direct to cached writes"
    fi
    root=$(python3 "$HERE/dataset.py" find-root "$target")
    if [ -n "$root" ] && v=$(python3 "$HERE/dataset.py" verify "$MUT_MAN" "$root"); then
      printf '%s\t%s\tverify\tOK\t%s\n' "$rep" "$tool" "$(echo "$v" | sed -n 's/^sparse_alloc=//p')" >>"$MEAS"
      log "$tool restore verified: $(echo "$v" | head -1)"
    else
      printf '%s\t%s\tverify\tFAIL\t%s\n' "$rep" "$tool" "$(echo "${v:-no dataset root in restore}" | head -1 | tr '\t' ' ')" >>"$MEAS"
      log "$tool restore verification FAILED: ${v:-no dataset root found}"
    fi
    python3 "$HERE/dataset.py" undo "$DATA" "$UNDO"
    [ "$KEEP" = 1 ] || rm -rf "$repo" "$target"
  done
done
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$WORK/meta-$STAMP.txt"
echo "drop_caches_ok=$DROP_OK" >>"$WORK/meta-$STAMP.txt"

python3 "$HERE/report.py" "$WORK/meta-$STAMP.txt" "$MEAS" "$NOTES" "$RESULTS" "$HERE/RESULTS.md"
log "results: $RESULTS (raw: $MEAS)"
