#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kubectl, etcd and a CSI snapshot stack
# (snapshot-controller, csi-snapshotter, csi-provisioner and a hostpath driver) from
# their published Go modules, at pinned versions, into a cache directory outside the
# repository:
#
#   ${HOARD_CACHE:-$HOME/.cache/hoard}/kube/<k8s-version>/bin/
#
# Nothing is written into the repository. If the binaries are already there the
# script only prints their paths; otherwise it builds only what is missing or stale.
# See hack/kube/README.md.
#
# Environment:
#   HOARD_CACHE   cache root (default: $HOME/.cache/hoard)
#   K8S_VERSION   k8s.io/kubernetes tag (default below; must build with the local Go)
#   ETCD_VERSION  go.etcd.io/etcd/server/v3 tag (default: the etcd client k8s pins)
#   SNAPSHOTTER_VERSION, SNAPSHOTTER_CLIENT_VERSION, PROVISIONER_VERSION  CSI sidecar tags
#   RUNC_VERSION, HELM_VERSION  the node's runtime and helm
#   HOARD_KUBE_FORCE=1   rebuild even if the binaries exist
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

K8S_VERSION=${K8S_VERSION:-v1.36.3}
# k8s v1.36.3's go.mod pins go.etcd.io/etcd/client/v3 v3.6.8; run the same server.
ETCD_VERSION=${ETCD_VERSION:-v3.6.8}
# CSI: snapshotter v8.4.0 goes with client/v8 v8.4.0 (identical client tree); provisioner
# v6.0-v6.2 declare module .../v5 and cannot be fetched, v6.3.0 is built for k8s 1.36.
SNAPSHOTTER_VERSION=${SNAPSHOTTER_VERSION:-v8.4.0}
SNAPSHOTTER_CLIENT_VERSION=${SNAPSHOTTER_CLIENT_VERSION:-v8.4.0}
PROVISIONER_VERSION=${PROVISIONER_VERSION:-v6.3.0}
# The hostpath driver is hoard's own (hack/kube/hostpathplugin): the upstream module is not
# served here. Its source hash goes into the stamp so an edit rebuilds it.
HOSTPATH_SRC=${HERE}/hostpathplugin/main.go
# The real node (up.sh --with-node): kubelet + kube-scheduler from the same k8s tag; runc
# 1.5 (Debian's 1.1.5 fails pod sandboxes on this kernel, see hack/kube/README.md), built
# with cgo and libseccomp; helm 4 for a real `helm install` of the chart.
RUNC_VERSION=${RUNC_VERSION:-v1.5.3}
HELM_VERSION=${HELM_VERSION:-v4.3.2}
HOSTPATH_HASH=$(sha256sum "${HOSTPATH_SRC}" | cut -c1-12)

CACHE_ROOT=${HOARD_CACHE:-$HOME/.cache/hoard}/kube/${K8S_VERSION}
BIN=${CACHE_ROOT}/bin
KUBE_BINARIES=(kube-apiserver kube-controller-manager kubectl)
CSI_BINARIES=(snapshot-controller csi-snapshotter csi-provisioner hostpathplugin)
NODE_BINARIES=(kubelet kube-scheduler runc helm)
BINARIES=("${KUBE_BINARIES[@]}" etcd "${CSI_BINARIES[@]}" "${NODE_BINARIES[@]}")
CRD_DIR=${BIN}/crds/snapshot
CRDS=(snapshot.storage.k8s.io_volumesnapshotclasses.yaml snapshot.storage.k8s.io_volumesnapshotcontents.yaml
  snapshot.storage.k8s.io_volumesnapshots.yaml)
CSI_STAMP="snapshotter=${SNAPSHOTTER_VERSION} snapshot-client=${SNAPSHOTTER_CLIENT_VERSION} provisioner=${PROVISIONER_VERSION} hostpath=${HOSTPATH_HASH}"
NODE_STAMP="k8s=${K8S_VERSION} runc=${RUNC_VERSION} helm=${HELM_VERSION}"
STAMP="k8s=${K8S_VERSION} etcd=${ETCD_VERSION} ${CSI_STAMP} ${NODE_STAMP#k8s=* }"

log() { printf '[build.sh] %s\n' "$*" >&2; }

print_paths() {
  local b
  for b in "${BINARIES[@]}"; do
    printf '%s\n' "${BIN}/${b}"
  done
}

have_all() {
  local b
  [[ -f ${BIN}/.versions && "$(cat "${BIN}/.versions")" == "${STAMP}" ]] || return 1
  for b in "${BINARIES[@]}"; do
    [[ -x ${BIN}/${b} ]] || return 1
  done
  for b in "${CRDS[@]}"; do
    [[ -f ${CRD_DIR}/${b} ]] || return 1
  done
}

if [[ ${HOARD_KUBE_FORCE:-0} != 1 ]] && have_all; then
  log "up to date (${STAMP}) in ${BIN}"
  print_paths
  exit 0
fi

command -v go >/dev/null || { log "go not found on PATH"; exit 1; }

# Fail fast on a Go mismatch instead of trying to fetch another toolchain.
export GOTOOLCHAIN=local
export GOMODCACHE=${CACHE_ROOT}/gomod
export GOCACHE=${CACHE_ROOT}/gocache
export GOFLAGS="-mod=mod -buildvcs=false"
export GOWORK=off
export CGO_ENABLED=0

SRC=${CACHE_ROOT}/src
STAGE=${CACHE_ROOT}/stage
mkdir -p "${BIN}" "${SRC}/kube" "${SRC}/etcd" "${SRC}/csi" "${SRC}/node" "${SRC}/runc" "${SRC}/helm" \
  "${STAGE}" "${GOMODCACHE}" "${GOCACHE}"

GO_LOCAL=$(go env GOVERSION)
log "go ${GO_LOCAL}; k8s ${K8S_VERSION}; etcd ${ETCD_VERSION}; cache ${CACHE_ROOT}"

# Builds share the machine: keep them at low priority.
NICE=(nice -n 15)

# ---------------------------------------------------------------------------
# The staging replaces. The published go.mod of the tag is the source of truth:
# every `k8s.io/X => ./staging/src/k8s.io/X` must become `k8s.io/X => k8s.io/X v0.N.P`.
# Sets STAGING, STAGING_VERSION and GODEBUG_LINE (once).
# ---------------------------------------------------------------------------
STAGING=
k8s_replaces() {
  [[ -z ${STAGING} ]] || return 0
  local kmod
  kmod=$(cd "${SRC}/kube" && go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" |
    sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')
  [[ -f ${kmod} ]] || { log "could not download k8s.io/kubernetes@${K8S_VERSION} go.mod"; return 1; }
  STAGING=$(sed -n 's|^\s*\(k8s.io/[^ ]*\) => \./staging/.*|\1|p' "${kmod}")
  [[ -n ${STAGING} ]] || { log "no staging replaces found in ${kmod}"; return 1; }
  STAGING_VERSION="v0.${K8S_VERSION#v1.}"
  # k/k sets e.g. `godebug default=go1.26`; godebug only applies in the main module.
  GODEBUG_LINE=$(grep -E '^godebug ' "${kmod}" || true)
}

# mod_header MODULE: the top of a throwaway go.mod (module, go, godebug).
mod_header() {
  echo "// Generated by hoard hack/kube/build.sh - throwaway module, do not edit."
  echo "module $1"
  echo
  echo "go ${GO_LOCAL#go}"
  [[ -z ${GODEBUG_LINE:-} ]] || { echo; echo "${GODEBUG_LINE}"; }
  echo
}

# mod_replaces: the staging replace block, all at STAGING_VERSION.
mod_replaces() {
  local m
  echo "replace ("
  for m in ${STAGING}; do
    echo "	${m} => ${m} ${STAGING_VERSION}"
  done
  echo ")"
}

# ---------------------------------------------------------------------------
# k8s_commands LABEL MODULE CMD...: builds k8s.io/kubernetes/cmd/<CMD> for each CMD in the
# throwaway module localbuild/MODULE (staging replaces at the tag) into BIN.
# ---------------------------------------------------------------------------
k8s_commands() {
  local t0=$SECONDS label=$1 dir=${SRC}/$2 minor c
  shift 2
  k8s_replaces
  minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  mkdir -p "${dir}"
  {
    mod_header "localbuild/${dir##*/}"
    echo "tool ("
    for c in "$@"; do echo "	k8s.io/kubernetes/cmd/${c}"; done
    echo ")"
    echo
    echo "require k8s.io/kubernetes ${K8S_VERSION}"
    echo
    mod_replaces
  } >"${dir}/go.mod"
  log "${label}: $(wc -w <<<"${STAGING}") staging replaces at ${STAGING_VERSION}; go mod tidy"
  (cd "${dir}" && "${NICE[@]}" go mod tidy)

  local P=k8s.io/component-base/version
  local ldflags="-s -w -X ${P}.gitVersion=${K8S_VERSION} -X ${P}.gitMajor=1 -X ${P}.gitMinor=${minor}"
  ldflags+=" -X ${P}.gitTreeState=clean -X ${P}.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  log "${label}: go build $* (slow on a cold cache)"
  (cd "${dir}" && "${NICE[@]}" go build -trimpath -ldflags "${ldflags}" -o "${STAGE}/" "${@/#/k8s.io/kubernetes/cmd/}")
  for c in "$@"; do mv -f "${STAGE}/${c}" "${BIN}/"; done
  log "${label}: done in $((SECONDS - t0))s"
}

# 1. The control plane. kubectl too: Debian has no package of it, and CI machines without
#    one use this build.
build_kube() { k8s_commands kube kube kube-apiserver kube-controller-manager kubectl; }

# ---------------------------------------------------------------------------
# 2. etcd from go.etcd.io/etcd/server/v3 (its own go.mod has ../ replaces, so
#    `go install` refuses it; a throwaway module with no replaces works).
# ---------------------------------------------------------------------------
build_etcd() {
  local t0=$SECONDS dir=${SRC}/etcd
  {
    echo "// Generated by hoard hack/kube/build.sh - throwaway module, do not edit."
    echo "module localbuild/etcd"
    echo
    echo "go ${GO_LOCAL#go}"
    echo
    echo "tool go.etcd.io/etcd/server/v3"
    echo
    echo "require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"
  } >"${dir}/go.mod"
  log "etcd: go mod tidy"
  (cd "${dir}" && "${NICE[@]}" go mod tidy)
  log "etcd: go build"
  (cd "${dir}" && "${NICE[@]}" go build -trimpath -ldflags "-s -w" -o "${STAGE}/etcd" go.etcd.io/etcd/server/v3)
  mv -f "${STAGE}/etcd" "${BIN}/etcd"
  log "etcd: done in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------
# 3. The CSI snapshot stack: snapshot-controller + csi-snapshotter (external-snapshotter/v8
#    with its client/v8 module), csi-provisioner (external-provisioner/v6) and hoard's
#    hostpathplugin, in one throwaway module of their own. Not in localbuild/kube:
#    provisioner v6.3.0 requires newer grpc, otel, x/net, etcd client ... than k8s v1.36.3
#    pins, and MVS would move kube-apiserver onto them too. The same staging replaces keep
#    every k8s.io library at the control plane's release; GOCACHE/GOMODCACHE are shared.
# ---------------------------------------------------------------------------
build_csi() {
  local t0=$SECONDS dir=${SRC}/csi
  local snap=github.com/kubernetes-csi/external-snapshotter/v8
  local client=github.com/kubernetes-csi/external-snapshotter/client/v8
  local prov=github.com/kubernetes-csi/external-provisioner/v6
  k8s_replaces
  mkdir -p "${dir}/cmd/hostpathplugin"
  cp "${HOSTPATH_SRC}" "${dir}/cmd/hostpathplugin/main.go"
  {
    mod_header localbuild/csi
    echo "tool ("
    echo "	${snap}/cmd/snapshot-controller"
    echo "	${snap}/cmd/csi-snapshotter"
    echo "	${prov}/cmd/csi-provisioner"
    echo ")"
    echo
    echo "require ("
    # Pins k8s.io/kubernetes (required by the provisioner's go.mod) to the control plane's tag.
    echo "	k8s.io/kubernetes ${K8S_VERSION}"
    echo "	${snap} ${SNAPSHOTTER_VERSION}"
    # The snapshotter's own go.mod replaces this with ./client, which only works in its repo.
    echo "	${client} ${SNAPSHOTTER_CLIENT_VERSION}"
    echo "	${prov} ${PROVISIONER_VERSION}"
    echo ")"
    echo
    mod_replaces
  } >"${dir}/go.mod"
  log "csi: go mod tidy"
  (cd "${dir}" && "${NICE[@]}" go mod tidy)

  # The snapshot CRDs ship in the client module's zip.
  local cdir
  cdir=$(cd "${dir}" && go mod download -json "${client}@${SNAPSHOTTER_CLIENT_VERSION}" |
    sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')
  [[ -d ${cdir}/config/crd ]] || { log "no config/crd in ${client}@${SNAPSHOTTER_CLIENT_VERSION}"; return 1; }
  mkdir -p "${CRD_DIR}"
  local c
  for c in "${CRDS[@]}"; do
    install -m 644 "${cdir}/config/crd/${c}" "${CRD_DIR}/${c}"
  done

  # Separate builds so each main package gets its own version string; they share GOCACHE.
  log "csi: go build snapshot-controller csi-snapshotter (${SNAPSHOTTER_VERSION})"
  (cd "${dir}" && "${NICE[@]}" go build -trimpath -ldflags "-s -w -X main.version=${SNAPSHOTTER_VERSION}" \
    -o "${STAGE}/" "${snap}/cmd/snapshot-controller" "${snap}/cmd/csi-snapshotter")
  log "csi: go build csi-provisioner (${PROVISIONER_VERSION})"
  (cd "${dir}" && "${NICE[@]}" go build -trimpath -ldflags "-s -w -X main.version=${PROVISIONER_VERSION}" \
    -o "${STAGE}/" "${prov}/cmd/csi-provisioner")
  log "csi: go build hostpathplugin (hoard's, ${HOSTPATH_HASH})"
  (cd "${dir}" && "${NICE[@]}" go build -trimpath -ldflags "-s -w" -o "${STAGE}/" ./cmd/hostpathplugin)
  local b
  for b in "${CSI_BINARIES[@]}"; do
    mv -f "${STAGE}/${b}" "${BIN}/${b}"
  done
  echo "${CSI_STAMP}" >"${BIN}/.csi-versions"
  log "csi: done in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------
# 4. The node: kubelet + kube-scheduler (own throwaway module beside localbuild/kube, same
#    replaces and caches, so most packages come from the API server's build cache), runc
#    and helm.
# ---------------------------------------------------------------------------
build_node_kube() { k8s_commands node node kubelet kube-scheduler; }

# tool_module DIR NAME MODULE VERSION TOOL: a throwaway module whose only tool is TOOL.
tool_module() {
  {
    echo "// Generated by hoard hack/kube/build.sh - throwaway module, do not edit."
    echo "module localbuild/$2"
    echo
    echo "go ${GO_LOCAL#go}"
    echo
    echo "tool $5"
    echo
    echo "require $3 $4"
  } >"$1/go.mod"
  (cd "$1" && "${NICE[@]}" go mod tidy)
}

build_runc() {
  local t0=$SECONDS dir=${SRC}/runc m=github.com/opencontainers/runc
  # libseccomp-dev: node-deps.sh installs it (and the node's other packages) when missing.
  [[ -f /usr/include/seccomp.h ]] || "${HERE}/node-deps.sh" || { log "runc: needs libseccomp-dev (Debian package)"; return 1; }
  tool_module "${dir}" runc "${m}" "${RUNC_VERSION}" "${m}"
  log "runc: go build ${RUNC_VERSION} (cgo, seccomp)"
  (cd "${dir}" && CGO_ENABLED=1 "${NICE[@]}" go build -trimpath -tags seccomp \
    -ldflags "-s -w -X main.version=${RUNC_VERSION#v}" -o "${STAGE}/runc" "${m}")
  mv -f "${STAGE}/runc" "${BIN}/runc"
  log "runc: done in $((SECONDS - t0))s"
}

build_helm() {
  local t0=$SECONDS dir=${SRC}/helm m=helm.sh/helm/v4
  tool_module "${dir}" helm "${m}" "${HELM_VERSION}" "${m}/cmd/helm"
  log "helm: go build ${HELM_VERSION}"
  (cd "${dir}" && "${NICE[@]}" go build -trimpath \
    -ldflags "-s -w -X ${m}/internal/version.version=${HELM_VERSION}" -o "${STAGE}/helm" "${m}/cmd/helm")
  mv -f "${STAGE}/helm" "${BIN}/helm"
  log "helm: done in $((SECONDS - t0))s"
}

# Build only what is missing or stale: an existing control-plane build is kept.
rm -f "${BIN}/.versions"
if [[ ${HOARD_KUBE_FORCE:-0} == 1 || ! -x ${BIN}/etcd || ! -f ${SRC}/etcd/go.mod ]] ||
  ! grep -q "server/v3 ${ETCD_VERSION}\$" "${SRC}/etcd/go.mod"; then
  build_etcd
fi
if [[ ${HOARD_KUBE_FORCE:-0} == 1 || ! -x ${BIN}/kube-apiserver || ! -x ${BIN}/kube-controller-manager || ! -x ${BIN}/kubectl ]]; then
  build_kube
fi
csi_fresh() {
  local b
  [[ -f ${BIN}/.csi-versions && "$(cat "${BIN}/.csi-versions")" == "${CSI_STAMP}" ]] || return 1
  for b in "${CSI_BINARIES[@]}"; do [[ -x ${BIN}/${b} ]] || return 1; done
  for b in "${CRDS[@]}"; do [[ -f ${CRD_DIR}/${b} ]] || return 1; done
}
if [[ ${HOARD_KUBE_FORCE:-0} == 1 ]] || ! csi_fresh; then
  build_csi
fi
node_part_fresh() { # NAME BINARY: stamp line NAME matches and BINARY exists
  [[ -x ${BIN}/$2 && -f ${BIN}/.node-versions ]] && grep -qx "$1" "${BIN}/.node-versions"
}
node_done=()
if [[ ${HOARD_KUBE_FORCE:-0} == 1 ]] || ! node_part_fresh "k8s=${K8S_VERSION}" kubelet || [[ ! -x ${BIN}/kube-scheduler ]]; then
  build_node_kube
fi
node_done+=("k8s=${K8S_VERSION}")
if [[ ${HOARD_KUBE_FORCE:-0} == 1 ]] || ! node_part_fresh "runc=${RUNC_VERSION}" runc; then build_runc; fi
node_done+=("runc=${RUNC_VERSION}")
if [[ ${HOARD_KUBE_FORCE:-0} == 1 ]] || ! node_part_fresh "helm=${HELM_VERSION}" helm; then build_helm; fi
node_done+=("helm=${HELM_VERSION}")
printf '%s\n' "${node_done[@]}" >"${BIN}/.node-versions"
echo "${STAMP}" >"${BIN}/.versions"

# Not `| head -1`: under pipefail, head closing the pipe early kills etcd with SIGPIPE and
# fails the build at random.
etcd_version=$("${BIN}/etcd" --version)
echo "${etcd_version%%$'\n'*}" >&2
"${BIN}/kube-apiserver" --version >&2
log "built in ${BIN}"
print_paths
