#!/usr/bin/env bash
# CSI snapshot path benchmark. One PVC-shaped dataset in a claim of the CSI hostpath driver
# (hack/kube/up.sh --with-csi starts a throwaway control plane with it), backed up:
#   * in place: hoard and restic read the claim's volume directory, as the agent reads a
#     live mount;
#   * through the snapshot path's storage steps, as a session with `volumeSnapshot` runs them:
#     VolumeSnapshot → ready to use → clone claim from it → bound → hoard reads the clone's
#     directory → clone and VolumeSnapshot deleted.
# Reports MiB/s of each read (the clone path's as a share of in place; the target is >= 85 %),
# hoard / restic, and the per-session overhead of the storage steps, in seconds.
# Not in the figures: the exposer pod and the work order's round trip — no kubelet runs here
# (the tests simulate its mounting); the agent reads a clone with the same pipeline as any
# volume, which is what the hoard reads measure. The hostpath driver snapshots by tar + gzip,
# so its overhead is the driver's, not what a storage system's snapshot costs.
# Usage: bench/csi.sh [--size 256M] [--reps 3] [--work DIR] [--no-build]
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$HERE/common.sh"

SIZE=256M
REPS=3
WORK="${HOARD_BENCH_WORK:-$HOME/.cache/hoard/bench-csi}"
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    *) common_option "$0" "$1"; shift ;;
  esac
done
build_hoard
for t in restic /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "$t is required (Debian packages restic, time)" >&2; exit 1; }
done
bytes=$(numfmt --from=iec "$SIZE") || { echo "--size $SIZE is not a size" >&2; exit 2; }
MIB=$((bytes / 1048576))

mkdir -p "$WORK"
DATA="$WORK/dataset-$SIZE"
if [ ! -f "$DATA.complete" ]; then
  rm -rf "$DATA"
  echo "generating $DATA" >&2
  python3 "$HERE/dataset.py" gen "$DATA" --size "$bytes" >&2 && touch "$DATA.complete" || exit 1
fi

# A short state dir: the CSI socket path must fit a unix socket's 108 bytes.
KDIR=$(mktemp -d /tmp/hoard-bench-csi.XXXXXX)
cleanup() { "$REPO_ROOT/hack/kube/down.sh" --dir "$KDIR" --rm >/dev/null 2>&1 || true; }
trap cleanup EXIT
eval "$("$REPO_ROOT/hack/kube/up.sh" --dir "$KDIR" --with-csi 2>"$WORK/up.log")" || {
  tail -20 "$WORK/up.log" >&2
  exit 1
}
KUBECTL="$HOARD_KUBE_BIN_DIR/kubectl"
k() { timeout 300 "$KUBECTL" --request-timeout=60s "$@"; }
NS=bench-csi
k create namespace "$NS" >/dev/null
k apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: bench-csi}
driver: $HOARD_CSI_DRIVER
deletionPolicy: Delete
EOF

pvc() { # NAME [DATASOURCE]
  printf 'apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: %s, namespace: %s}\n' "$1" "$NS"
  printf 'spec:\n  storageClassName: %s\n  accessModes: [ReadWriteOnce]\n' "$HOARD_CSI_STORAGE_CLASS"
  printf '  resources: {requests: {storage: %s}}\n' "$SIZE"
  [ -z "${2:-}" ] || printf '  dataSource: %s\n' "$2"
}
# wait_for WHAT CMD...: polls CMD every 0.1 s, at most 600 s.
wait_for() {
  local what="$1"; shift
  for _ in $(seq 6000); do "$@" && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2
  exit 1
}
bound() { [ "$(k -n "$NS" get pvc "$1" -o jsonpath='{.status.phase}')" = Bound ]; }
ready() { [ "$(k -n "$NS" get volumesnapshot "$1" -o jsonpath='{.status.readyToUse}')" = true ]; }
gone() { [ -z "$(k -n "$NS" get "$1" "$2" --ignore-not-found -o name)" ]; }
volume_dir() {
  local pv
  pv=$(k -n "$NS" get pvc "$1" -o jsonpath='{.spec.volumeName}')
  echo "$HOARD_CSI_STATE_DIR/$(k get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')"
}
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l; }

pvc src | k apply -f - >/dev/null
wait_for "claim src" bound src
SRC=$(volume_dir src)
cp -a "$DATA/." "$SRC/"

export HOARD_PASSWORD=bench-password RESTIC_PASSWORD=bench-password RESTIC_CACHE_DIR="$WORK/cache-restic"
unset HOARD_LOG
declare -A runs
# record NAME DIR COMMAND...: one run's wall seconds (DIR read into the page cache first).
record() {
  local name="$1" dir="$2"; shift 2
  tar -cf - -C "$dir" . >/dev/null
  if ! /usr/bin/time -f "%e" -o "$WORK/time" "$@" >"$WORK/out.log" 2>&1; then
    cat "$WORK/out.log" >&2
    echo "$name failed; stopping" >&2
    exit 1
  fi
  runs[$name]+="$(tail -1 "$WORK/time") "
}
add() { runs[$1]+="$(printf '%.2f' "$2") "; }

for r in $(seq "$REPS"); do
  rm -rf "$WORK/repo-"* "$WORK/cache-restic"
  "$HOARD" --repo "$WORK/repo-inplace" init --kdf-memory-mib 64 >/dev/null
  "$HOARD" --repo "$WORK/repo-clone" init --kdf-memory-mib 64 >/dev/null
  restic init --repository-version 2 -r "$WORK/repo-restic" -q
  record "hoard in place" "$SRC" "$HOARD" --repo "$WORK/repo-inplace" backup "$SRC" -q
  record "restic in place" "$SRC" restic -r "$WORK/repo-restic" backup "$SRC" -q

  t0=$(now)
  k apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap-$r, namespace: $NS}
spec:
  volumeSnapshotClassName: bench-csi
  source: {persistentVolumeClaimName: src}
EOF
  wait_for "snapshot snap-$r" ready "snap-$r"
  add "snapshot ready" "$(since "$t0")"
  t0=$(now)
  pvc "clone-$r" "{apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap-$r}" | k apply -f - >/dev/null
  wait_for "clone claim clone-$r" bound "clone-$r"
  add "clone bound" "$(since "$t0")"
  CLONE=$(volume_dir "clone-$r")
  record "hoard via snapshot clone" "$CLONE" "$HOARD" --repo "$WORK/repo-clone" backup "$CLONE" -q
  t0=$(now)
  k -n "$NS" delete pvc "clone-$r" --wait=false >/dev/null
  k -n "$NS" delete volumesnapshot "snap-$r" --wait=false >/dev/null
  wait_for "clone-$r deleted" gone pvc "clone-$r"
  wait_for "snap-$r deleted" gone volumesnapshot "snap-$r"
  wait_for "clone directory removed" test ! -e "$CLONE"
  add "cleanup" "$(since "$t0")"
done
rm -rf "$WORK/repo-"* "$WORK/cache-restic"

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
declare -A med
for name in "${!runs[@]}"; do med[$name]=$(echo "${runs[$name]}" | median); done

echo "### $(date -u +%Y-%m-%dT%H:%M:%SZ) — CSI snapshot path: ${SIZE} PVC-shaped dataset on the hostpath CSI driver, $REPS repetition(s), medians"
echo
echo "- machine: nproc=$(nproc), load at start of report $(cut -d' ' -f1-3 /proc/loadavg); hoard from commit $(cd "$REPO_ROOT" && git rev-parse --short HEAD)"
echo
echo "| read | wall s (each) | median s | MiB/s |"
echo "|---|---|---:|---:|"
for name in "hoard in place" "hoard via snapshot clone" "restic in place"; do
  printf '| %s | %s | %s | %.0f |\n' "$name" "${runs[$name]% }" "${med[$name]}" "$(echo "$MIB / ${med[$name]}" | bc -l)"
done
echo
echo "| per-session step (hostpath driver) | each s | median s |"
echo "|---|---|---:|"
for name in "snapshot ready" "clone bound" "cleanup"; do
  printf '| %s | %s | %s |\n' "$name" "${runs[$name]% }" "${med[$name]}"
done
echo
share=$(echo "${med[hoard in place]} / ${med[hoard via snapshot clone]} * 100" | bc -l)
overhead=$(echo "${med[snapshot ready]} + ${med[clone bound]} + ${med[cleanup]}" | bc -l)
printf -- '- clone path throughput = %.0f %% of in place (target >= 85 %%); hoard / restic in place %.2fx; storage-step overhead per session %.1f s\n' \
  "$share" "$(echo "${med[restic in place]} / ${med[hoard in place]}" | bc -l)" "$overhead"
