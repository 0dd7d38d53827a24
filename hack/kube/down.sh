#!/usr/bin/env bash
# Stop the control plane that hack/kube/up.sh started, by recorded pid only.
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
# Reverse start order: CSI sidecars, the driver, snapshot-controller, KCM, apiserver, etcd.
for ((c = ${#COMPONENTS[@]} - 1; c >= 0; c--)); do
  name=${COMPONENTS[c]}
  pid=$(running_pid "${DIR}" "${name}") || { rm -f "${DIR}/pids/${name}.pid"; continue; }
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
done

if ((RM && !failed)); then
  log "removing ${DIR}"
  rm -rf -- "${DIR}"
fi
exit "${failed}"
