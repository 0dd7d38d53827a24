#!/usr/bin/env bash
# Installs the Debian packages the real node of hack/kube needs, when they are missing:
# containerd (and ctr, containerd-shim-runc-v2), libseccomp-dev (build.sh builds runc with
# seccomp), containernetworking-plugins (host-local, loopback) and busybox-static (the pause
# and workload images). Needs root to install; prints what is missing otherwise.
set -euo pipefail
need=()
command -v containerd >/dev/null && command -v ctr >/dev/null || need+=(containerd)
[[ -f /usr/include/seccomp.h ]] || need+=(libseccomp-dev)
[[ -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || need+=(containernetworking-plugins)
{ [[ -x /bin/busybox ]] && /bin/busybox --list >/dev/null 2>&1; } || need+=(busybox-static)
((${#need[@]})) || exit 0
if ((EUID != 0)); then
  echo "[node-deps.sh] missing Debian packages (install as root): ${need[*]}" >&2
  exit 1
fi
echo "[node-deps.sh] installing ${need[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
