#!/usr/bin/env bash
# Stop the control plane that hack/kube/up.sh started, by recorded pid only. With a node
# (--with-node): the node's pods are deleted and the kubelet stopped first, then every
# container of up.sh's own containerd is killed and removed (with its network namespace),
# then containerd; last, every mount left under the state dir is unmounted, deepest first.
#
# Usage: hack/kube/down.sh [--dir DIR] [--rm]
#   --dir DIR  state dir (default: $HOARD_KUBE_DIR)
#   --rm       also delete the state dir (only if it carries up.sh's marker)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "${HERE}/lib.sh"

DIR=${HOARD_KUBE_DIR:-}
RM=0
while (($#)); do
  case $1 in
    --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    --rm) RM=1; shift ;;
    -h | --help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
[[ -n ${DIR} ]] || die "no state dir: pass --dir or set HOARD_KUBE_DIR"
[[ -d ${DIR} ]] || { log "${DIR} does not exist; nothing to stop"; exit 0; }
[[ -f ${DIR}/.hoard-kube ]] || die "${DIR} is not a hoard kube state dir"

failed=0

# stop_component NAME: SIGTERM, bounded wait, SIGKILL. Sets failed=1 if it survives.
stop_component() {
  local name=$1 pid i
  pid=$(running_pid "${DIR}" "${name}") || { rm -f "${DIR}/pids/${name}.pid"; return 0; }
  log "stopping ${name} (pid ${pid})"
  kill -TERM "${pid}" 2>/dev/null || true
  # Bounded wait: 20 s, then SIGKILL, then 5 s more.
  for ((i = 0; i < 100; i++)); do
    running_pid "${DIR}" "${name}" >/dev/null || break
    sleep 0.2
  done
  if running_pid "${DIR}" "${name}" >/dev/null; then
    log "${name} (pid ${pid}) ignored SIGTERM; sending SIGKILL"
    kill -KILL "${pid}" 2>/dev/null || true
    for ((i = 0; i < 25; i++)); do
      running_pid "${DIR}" "${name}" >/dev/null || break
      sleep 0.2
    done
  fi
  if running_pid "${DIR}" "${name}" >/dev/null; then
    log "could not stop ${name} (pid ${pid})"
    failed=1
  else
    rm -f "${DIR}/pids/${name}.pid"
  fi
}

# --- the node: pods, kubelet, containers, containerd ------------------------------------------
SOCK=${DIR}/containerd/containerd.sock
ctr_() { timeout 60 ctr --address "${SOCK}" -n k8s.io "$@"; }
if running_pid "${DIR}" kubelet >/dev/null && running_pid "${DIR}" kube-apiserver >/dev/null; then
  kubectl_bin=$(sed -n 's/^export HOARD_KUBE_BIN_DIR=//p' "${DIR}/env" 2>/dev/null)/kubectl
  node=$(sed -n 's/^export HOARD_NODE_NAME=//p' "${DIR}/node.env" 2>/dev/null)
  if [[ -x ${kubectl_bin} && -n ${node} ]]; then
    # Deleted pods let the kubelet stop their sandboxes (and remove their network namespaces).
    log "deleting the pods on ${node}"
    timeout 60 "${kubectl_bin}" --kubeconfig="${DIR}/kubeconfig" --request-timeout=20s delete pods \
      --all-namespaces --field-selector "spec.nodeName=${node}" --grace-period=0 --force >/dev/null 2>&1 || true
    for ((i = 0; i < 30; i++)); do
      ctr_ tasks ls 2>/dev/null | grep -q ' RUNNING' || break
      sleep 1
    done
  fi
fi
stop_component kubelet
if running_pid "${DIR}" containerd >/dev/null; then
  netns=()
  for c in $(ctr_ containers ls -q 2>/dev/null); do
    ns=$(ctr_ containers info "$c" 2>/dev/null | grep -o '"path": *"/[^"]*netns[^"]*"' | sed 's/.*"\(\/[^"]*\)"$/\1/' | head -n1 || true)
    [[ -z ${ns} ]] || netns+=("${ns}")
    log "removing container ${c}"
    ctr_ tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
    for ((i = 0; i < 20; i++)); do
      ctr_ tasks rm -f "$c" >/dev/null 2>&1 && break
      [[ -z $(ctr_ tasks ls -q 2>/dev/null | grep -x "$c") ]] && break
      sleep 0.5
    done
    ctr_ containers rm "$c" >/dev/null 2>&1 || { log "could not remove container ${c}"; failed=1; }
  done
  for ns in $(printf '%s\n' "${netns[@]}" | sort -u); do
    [[ -e ${ns} ]] || continue
    umount "${ns}" 2>/dev/null || true
    rm -f "${ns}"
  done
fi
stop_component containerd

# Reverse start order: CSI sidecars, the driver, snapshot-controller, KCM, apiserver, etcd.
for ((c = ${#COMPONENTS[@]} - 1; c >= 0; c--)); do
  stop_component "${COMPONENTS[c]}"
done

# Mounts the kubelet, the CSI driver and containerd left under the state dir (emptyDirs,
# Secrets, CSI bind mounts, overlay roots, the kubelet's own rshared bind of its root),
# deepest first. Paths in mountinfo escape blanks as \040; the state dir has none.
for ((pass = 0; pass < 5; pass++)); do
  mapfile -t mounts < <(awk -v d="${DIR}/" 'index($5, d) == 1 || $5 == substr(d, 1, length(d) - 1) { print $5 }' \
    /proc/self/mountinfo | awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-)
  ((${#mounts[@]})) || break
  for m in "${mounts[@]}"; do
    umount "${m}" 2>/dev/null || umount -l "${m}" 2>/dev/null || true
  done
done
if [[ -f ${DIR}/node-ip.added ]]; then
  ip addr del "$(<"${DIR}/node-ip.added")/32" dev lo 2>/dev/null || true
  rm -f "${DIR}/node-ip.added"
fi
if [[ -n $(awk -v d="${DIR}/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo) ]]; then
  log "mounts remain under ${DIR}"
  failed=1
fi

if ((RM && !failed)); then
  log "removing ${DIR}"
  rm -rf -- "${DIR}"
fi
exit "${failed}"
