#!/usr/bin/env bash
# Smoke-test a control plane started by hack/kube/up.sh. Exits non-zero on any failure.
#
# Usage:
#   hack/kube/smoke.sh                      # uses $HOARD_KUBE_DIR (or $KUBECONFIG)
#   hack/kube/smoke.sh --dir DIR
#   hack/kube/smoke.sh --up [--with-controller-manager | --with-csi]
#                                           # start a throwaway cluster, test, stop it
# The CSI checks run when the cluster was started with --with-csi (DIR/csi.env exists).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "${HERE}/lib.sh"

DIR=${HOARD_KUBE_DIR:-}
UP=0
UP_ARGS=()
while (($#)); do
  case $1 in
    --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    --up) UP=1; shift ;;
    --with-controller-manager | --kcm) UP_ARGS+=(--with-controller-manager); shift ;;
    --with-csi) UP_ARGS+=(--with-csi); shift ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done

if ((UP)); then
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/hoard-kube-smoke.XXXXXX")
  trap '"${HERE}/down.sh" --dir "${DIR}" --rm >&2 || true' EXIT
  "${HERE}/up.sh" --dir "${DIR}" "${UP_ARGS[@]}" >/dev/null
fi
if [[ -n ${DIR} ]]; then
  export KUBECONFIG=${DIR}/kubeconfig
fi
[[ -n ${KUBECONFIG:-} && -f ${KUBECONFIG} ]] || die "no kubeconfig: pass --dir/--up or set HOARD_KUBE_DIR/KUBECONFIG"

KCM_RUNNING=0
if [[ -n ${DIR} ]] && running_pid "${DIR}" kube-controller-manager >/dev/null; then KCM_RUNNING=1; fi
# up.sh --with-csi writes csi.env (HOARD_CSI_DRIVER, _STORAGE_CLASS, _STATE_DIR).
CSI_ON=0
if [[ -n ${DIR} && -f ${DIR}/csi.env ]]; then
  # shellcheck disable=SC1091
  source "${DIR}/csi.env"
  CSI_ON=1
fi

FAILS=0
PASSES=0
pass() { PASSES=$((PASSES + 1)); printf 'ok   %s\n' "$*"; }
fail() { FAILS=$((FAILS + 1)); printf 'FAIL %s\n' "$*"; }

# Every kubectl call is bounded, client- and server-side.
k() { timeout 60 kubectl --request-timeout=30s "$@"; }

# check DESCRIPTION CMD...: CMD must succeed.
check() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then pass "${what}"; else fail "${what}"; printf '%s\n' "${out}" | sed 's/^/     /' | tail -n 15; fi
}
# reject DESCRIPTION PATTERN CMD...: CMD must fail and its output must match PATTERN (ERE).
reject() {
  local what=$1 pattern=$2 out
  shift 2
  if out=$("$@" 2>&1); then
    fail "${what} (unexpectedly succeeded)"; printf '%s\n' "${out}" | sed 's/^/     /' | tail -n 15
  elif grep -Eq -- "${pattern}" <<<"${out}"; then
    pass "${what}"
  else
    fail "${what} (failed, but output does not match /${pattern}/)"; printf '%s\n' "${out}" | sed 's/^/     /' | tail -n 15
  fi
}
# eventually DESCRIPTION TIMEOUT_S CMD...: bounded poll until CMD succeeds.
eventually() {
  local what=$1 limit=$2 start=$SECONDS tries=0
  shift 2
  while ((SECONDS - start < limit && tries < limit * 2)); do
    tries=$((tries + 1))
    if "$@" >/dev/null 2>&1; then pass "${what} (${tries} tries)"; return 0; fi
    sleep 0.5
  done
  fail "${what} (not within ${limit}s)"
}

NS=hoard-smoke-$(date +%s)-${RANDOM}
CSI_NS=${NS/smoke/smoke-csi}
CSI_VSC=${CSI_NS} # cluster-scoped: unique per run, so parallel runs never share a class
CRD=widgets.smoke.hoard.dev
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hoard-smoke-work.XXXXXX")
cleanup() {
  k delete namespace "${NS}" --wait=false --ignore-not-found >/dev/null 2>&1 || true
  k delete crd "${CRD}" --wait=false --ignore-not-found >/dev/null 2>&1 || true
  if ((CSI_ON)); then
    k delete namespace "${CSI_NS}" --wait=false --ignore-not-found >/dev/null 2>&1 || true
    k delete volumesnapshotclass "${CSI_VSC}" --wait=false --ignore-not-found >/dev/null 2>&1 || true
  fi
  rm -rf -- "${WORK}"
}
if ((UP)); then
  trap 'cleanup; "${HERE}/down.sh" --dir "${DIR}" --rm >&2 || true' EXIT
else
  trap cleanup EXIT
fi

echo "# cluster: $(k config view --minify -o jsonpath='{.clusters[0].cluster.server}')" \
  "controller-manager: $( ((KCM_RUNNING)) && echo yes || echo no)" "csi: $( ((CSI_ON)) && echo yes || echo no)"

# --- basics ---------------------------------------------------------------------
check "apiserver /readyz" k get --raw /readyz
((FAILS == 0)) || { echo "# apiserver not reachable; aborting"; exit 1; }
server_version() { k version -o json | jq -e '.serverVersion.gitVersion | startswith("v1.")'; }
check "server version is reported" server_version
get_ns() {
  local out
  out=$(k get ns -o name) && grep -qx namespace/default <<<"${out}" && grep -qx namespace/kube-system <<<"${out}"
}
check "get ns lists default and kube-system" get_ns
api_resources() {
  local out r
  out=$(k api-resources -o name) || return 1
  for r in namespaces serviceaccounts pods persistentvolumeclaims clusterroles.rbac.authorization.k8s.io \
    customresourcedefinitions.apiextensions.k8s.io; do
    grep -qx "${r}" <<<"${out}" || { echo "missing ${r}"; return 1; }
  done
}
check "api-resources includes core, rbac and apiextensions" api_resources
check "create namespace ${NS}" k create namespace "${NS}"
reject "NamespaceLifecycle: objects in a missing namespace are rejected" 'not found' \
  k create serviceaccount x -n "${NS}-does-not-exist"

# --- ServiceAccount + TokenRequest + RBAC -------------------------------------------
check "create ServiceAccount smoke-sa" k -n "${NS}" create serviceaccount smoke-sa
TOKEN=$(k -n "${NS}" create token smoke-sa --duration=10m 2>/dev/null || true)
if [[ ${TOKEN} =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]]; then
  pass "kubectl create token (TokenRequest API) returns a JWT"
  payload=$(cut -d. -f2 <<<"${TOKEN}" | tr '_-' '/+')
  while ((${#payload} % 4)); do payload+="="; done
  sub=$(base64 -d <<<"${payload}" 2>/dev/null | jq -r .sub 2>/dev/null || true)
  [[ ${sub} == "system:serviceaccount:${NS}:smoke-sa" ]] && pass "token subject is ${sub}" ||
    fail "token subject is '${sub}'"
else
  fail "kubectl create token (TokenRequest API) returns a JWT"
fi
SERVER=$(k config view --minify --raw -o jsonpath='{.clusters[0].cluster.server}')
k config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' |
  base64 -d >"${WORK}/ca.crt"
# kubectl as the ServiceAccount: no client cert, only the bearer token.
as_sa() { timeout 60 kubectl --kubeconfig=/dev/null --request-timeout=30s --server="${SERVER}" \
  --certificate-authority="${WORK}/ca.crt" --token="${TOKEN}" "$@"; }
whoami_is_sa() {
  as_sa auth whoami -o json | jq -e --arg u "system:serviceaccount:${NS}:smoke-sa" '.status.userInfo.username == $u'
}
check "token authenticates as the ServiceAccount (auth whoami)" whoami_is_sa
reject "RBAC: SA 'auth can-i list secrets' says no" '^no' as_sa auth can-i list secrets -n "${NS}"
reject "RBAC: SA 'auth can-i create clusterroles' says no" '^no' as_sa auth can-i create clusterroles
reject "RBAC: SA listing secrets is Forbidden" 'Forbidden|forbidden' as_sa get secrets -n "${NS}"
grant_cm_reader() {
  k -n "${NS}" create role cm-reader --verb=get,list --resource=configmaps &&
    k -n "${NS}" create rolebinding cm-reader --role=cm-reader --serviceaccount="${NS}:smoke-sa"
}
check "grant SA get/list configmaps in ${NS}" grant_cm_reader
eventually "RBAC: SA 'auth can-i list configmaps' says yes after the grant" 30 \
  as_sa auth can-i list configmaps -n "${NS}"
check "RBAC: SA can list configmaps" as_sa get configmaps -n "${NS}"
reject "RBAC: grant is namespaced (SA cannot list configmaps in default)" '^no' \
  as_sa auth can-i list configmaps -n default

# --- ServiceAccount admission ---------------------------------------------------------
sa_admission_injects() {
  k -n "${NS}" run smoke-pod --image=registry.invalid/none --restart=Never \
    --overrides='{"spec":{"serviceAccountName":"smoke-sa"}}' -o json --dry-run=server |
    jq -e '[.spec.volumes[]? | select(.name | startswith("kube-api-access-"))] | length == 1'
}
check "ServiceAccount admission injects the projected token volume" sa_admission_injects
reject "ServiceAccount admission rejects a pod whose ServiceAccount does not exist" 'service ?account' \
  k -n "${NS}" run smoke-pod2 --image=registry.invalid/none --restart=Never \
  --overrides='{"spec":{"serviceAccountName":"missing"}}' --dry-run=server

# --- CustomResourceDefinition with status subresource + schema validation ------------------
cat >"${WORK}/crd.yaml" <<EOF
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: ${CRD}
spec:
  group: smoke.hoard.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
    schema:
      openAPIV3Schema:
        type: object
        required: [spec]
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
              mode: {type: string, enum: [fast, safe]}
          status:
            type: object
            properties:
              phase: {type: string, enum: [Pending, Ready]}
EOF
check "apply CRD ${CRD}" k apply -f "${WORK}/crd.yaml"
check "CRD becomes Established" k wait --for=condition=Established --timeout=60s "crd/${CRD}"
eventually "Widget kind is discoverable" 30 k get widgets -n "${NS}"
widget() { printf 'apiVersion: smoke.hoard.dev/v1\nkind: Widget\nmetadata: {name: %s, namespace: %s}\nspec: %s\n' "$1" "${NS}" "$2"; }
widget good '{size: 3, mode: safe}' >"${WORK}/good.yaml"
widget bad-type '{size: big}' >"${WORK}/bad-type.yaml"
widget bad-range '{size: 99}' >"${WORK}/bad-range.yaml"
widget bad-enum '{size: 2, mode: reckless}' >"${WORK}/bad-enum.yaml"
printf 'apiVersion: smoke.hoard.dev/v1\nkind: Widget\nmetadata: {name: no-spec, namespace: %s}\n' "${NS}" >"${WORK}/bad-missing.yaml"
check "valid Widget is accepted" k apply -f "${WORK}/good.yaml"
reject "schema: wrong type is rejected" 'Invalid value|must be of type|invalid' k apply -f "${WORK}/bad-type.yaml"
reject "schema: out-of-range value is rejected" 'should be less than or equal to 10|Invalid value' k apply -f "${WORK}/bad-range.yaml"
reject "schema: value outside enum is rejected" 'Unsupported value' k apply -f "${WORK}/bad-enum.yaml"
reject "schema: missing required field is rejected" 'Required value' k apply -f "${WORK}/bad-missing.yaml"
check "status subresource: patch status via /status" \
  k -n "${NS}" patch widget good --subresource=status --type=merge -p '{"status":{"phase":"Ready"}}'
field_is() { [[ $(k -n "${NS}" get widget good -o jsonpath="{$1}") == "$2" ]]; }
check "status subresource: status.phase is Ready" field_is .status.phase Ready
main_ignores_status() {
  k -n "${NS}" patch widget good --type=merge -p '{"status":{"phase":"Pending"}}' >/dev/null &&
    field_is .status.phase Ready
}
check "status subresource: status written via the main resource is ignored" main_ignores_status
reject "schema: bad status via /status is rejected" 'Unsupported value' \
  k -n "${NS}" patch widget good --subresource=status --type=merge -p '{"status":{"phase":"Exploded"}}'
status_ignores_spec() {
  k -n "${NS}" patch widget good --subresource=status --type=merge -p '{"spec":{"size":7}}' >/dev/null &&
    field_is .spec.size 3
}
check "status subresource: spec written via /status is ignored" status_ignores_spec

# --- controller-manager (only if running) -------------------------------------------------
if ((KCM_RUNNING)); then
  eventually "controller-manager: default ServiceAccount appears in ${NS}" 60 \
    k -n "${NS}" get serviceaccount default
  eventually "controller-manager: kube-root-ca.crt ConfigMap appears in ${NS}" 60 \
    k -n "${NS}" get configmap kube-root-ca.crt
  check "controller-manager: delete Widget" k -n "${NS}" delete widget good --timeout=60s
  check "controller-manager: namespace deletion completes" k delete namespace "${NS}" --timeout=90s
else
  echo "skip controller-manager checks (not running; start up.sh with --with-controller-manager)"
fi

# --- CSI snapshot stack (only if up.sh ran with --with-csi) ----------------------------------
if ((CSI_ON)); then
  csi_running() {
    local n
    for n in snapshot-controller hostpathplugin csi-provisioner csi-snapshotter; do
      running_pid "${DIR}" "${n}" >/dev/null || { echo "${n} is not running"; return 1; }
    done
  }
  check "CSI: snapshot-controller, hostpathplugin, csi-provisioner, csi-snapshotter run" csi_running
  sc_ok() {
    [[ $(k get storageclass "${HOARD_CSI_STORAGE_CLASS}" -o jsonpath='{.provisioner} {.volumeBindingMode} {.reclaimPolicy}') == \
      "${HOARD_CSI_DRIVER} Immediate Delete" ]]
  }
  check "CSI: StorageClass ${HOARD_CSI_STORAGE_CLASS} (${HOARD_CSI_DRIVER}, Immediate, Delete)" sc_ok
  check "CSI: snapshot CRDs are Established" k wait --for=condition=Established --timeout=30s \
    crd/volumesnapshotclasses.snapshot.storage.k8s.io crd/volumesnapshotcontents.snapshot.storage.k8s.io \
    crd/volumesnapshots.snapshot.storage.k8s.io
  check "CSI: create namespace ${CSI_NS}" k create namespace "${CSI_NS}"

  pvc() { # NAME [DATASOURCE-YAML]
    printf 'apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: %s, namespace: %s}\n' "$1" "${CSI_NS}"
    printf 'spec:\n  storageClassName: %s\n  accessModes: [ReadWriteOnce]\n' "${HOARD_CSI_STORAGE_CLASS}"
    printf '  resources: {requests: {storage: 1Mi}}\n'
    [[ -z ${2:-} ]] || printf '  dataSource: %s\n' "$2"
  }
  pvc_bound() { [[ $(k -n "${CSI_NS}" get pvc "$1" -o jsonpath='{.status.phase}') == Bound ]]; }
  # volume_dir PVC: the driver's directory for the PVC's volume (PV.spec.csi.volumeHandle).
  volume_dir() {
    local pv handle
    pv=$(k -n "${CSI_NS}" get pvc "$1" -o jsonpath='{.spec.volumeName}') && [[ -n ${pv} ]] || return 1
    handle=$(k get pv "${pv}" -o jsonpath='{.spec.csi.volumeHandle}') && [[ -n ${handle} ]] || return 1
    echo "${HOARD_CSI_STATE_DIR}/${handle}"
  }

  pvc src >"${WORK}/src.yaml"
  check "CSI: create PVC src on ${HOARD_CSI_STORAGE_CLASS}" k apply -f "${WORK}/src.yaml"
  eventually "CSI: PVC src is Bound (provisioned by csi-provisioner, bound by KCM)" 120 pvc_bound src
  SRC_DIR=$(volume_dir src || true)
  check "CSI: PVC src's volume is the directory ${SRC_DIR:-?}" test -n "${SRC_DIR}" -a -d "${SRC_DIR:-/nonexistent}"
  MARK_ORIG="original-${RANDOM}${RANDOM}"
  write_marker() { [[ -d ${SRC_DIR} ]] && printf '%s\n' "$1" >"${SRC_DIR}/marker" && mkdir -p "${SRC_DIR}/sub" &&
    printf '%s\n' "$1" >"${SRC_DIR}/sub/nested"; }
  check "CSI: write a marker into the source volume" write_marker "${MARK_ORIG}"

  cat >"${WORK}/vsc.yaml" <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: ${CSI_VSC}}
driver: ${HOARD_CSI_DRIVER}
deletionPolicy: Delete
EOF
  cat >"${WORK}/snap.yaml" <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap, namespace: ${CSI_NS}}
spec:
  volumeSnapshotClassName: ${CSI_VSC}
  source: {persistentVolumeClaimName: src}
EOF
  check "CSI: create VolumeSnapshotClass ${CSI_VSC} (deletionPolicy Delete)" k apply -f "${WORK}/vsc.yaml"
  check "CSI: create VolumeSnapshot snap of PVC src" k apply -f "${WORK}/snap.yaml"
  snap_ready() { [[ $(k -n "${CSI_NS}" get volumesnapshot snap -o jsonpath='{.status.readyToUse}') == true ]]; }
  eventually "CSI: VolumeSnapshot snap is readyToUse" 120 snap_ready
  CONTENT=$(k -n "${CSI_NS}" get volumesnapshot snap -o jsonpath='{.status.boundVolumeSnapshotContentName}' 2>/dev/null || true)
  SNAP_HANDLE=$( [[ -z ${CONTENT} ]] || k get volumesnapshotcontent "${CONTENT}" -o jsonpath='{.status.snapshotHandle}' 2>/dev/null || true)
  SNAP_FILE=${HOARD_CSI_STATE_DIR}/${SNAP_HANDLE:-none}.snap
  check "CSI: snapshot ${SNAP_HANDLE:-?} is the archive ${SNAP_FILE}" test -n "${SNAP_HANDLE}" -a -s "${SNAP_FILE}"
  restore_size() { [[ $(k -n "${CSI_NS}" get volumesnapshot snap -o jsonpath='{.status.restoreSize}') == 1Mi ]]; }
  check "CSI: VolumeSnapshot reports restoreSize 1Mi" restore_size

  MARK_NEW="changed-${RANDOM}${RANDOM}"
  check "CSI: change the marker in the source volume after the snapshot" write_marker "${MARK_NEW}"
  pvc restored '{apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: snap}' >"${WORK}/restored.yaml"
  pvc cloned '{kind: PersistentVolumeClaim, name: src}' >"${WORK}/cloned.yaml"
  check "CSI: create PVC restored from VolumeSnapshot snap" k apply -f "${WORK}/restored.yaml"
  check "CSI: create PVC cloned from PVC src" k apply -f "${WORK}/cloned.yaml"
  eventually "CSI: PVC restored is Bound" 120 pvc_bound restored
  eventually "CSI: PVC cloned is Bound" 120 pvc_bound cloned
  RESTORED_DIR=$(volume_dir restored || true)
  CLONED_DIR=$(volume_dir cloned || true)
  holds() { [[ -n $1 && $1 != "${SRC_DIR}" && $(<"$1/marker") == "$2" && $(<"$1/sub/nested") == "$2" ]]; }
  check "CSI: restored volume holds the ORIGINAL marker (point in time)" holds "${RESTORED_DIR}" "${MARK_ORIG}"
  check "CSI: cloned volume holds the current marker" holds "${CLONED_DIR}" "${MARK_NEW}"

  gone() { [[ ! -e $1 ]]; }
  check "CSI: delete VolumeSnapshot snap" k -n "${CSI_NS}" delete volumesnapshot snap --timeout=90s
  # A failing get is not "gone": only a successful, empty answer is.
  content_gone() { local out; out=$(k get volumesnapshotcontent "$1" --ignore-not-found -o name) && [[ -z ${out} ]]; }
  eventually "CSI: its VolumeSnapshotContent is deleted" 90 content_gone "${CONTENT:-none}"
  eventually "CSI: the snapshot archive is removed (deletionPolicy Delete)" 90 gone "${SNAP_FILE}"
  check "CSI: delete the three PVCs" k -n "${CSI_NS}" delete pvc src restored cloned --timeout=90s
  dirs_gone() { local d; for d in "${SRC_DIR}" "${RESTORED_DIR}" "${CLONED_DIR}"; do [[ -n $d && ! -e $d ]] || return 1; done; }
  eventually "CSI: the three volume directories are removed (reclaimPolicy Delete)" 120 dirs_gone
  check "CSI: delete VolumeSnapshotClass ${CSI_VSC}" k delete volumesnapshotclass "${CSI_VSC}" --timeout=60s
  check "CSI: namespace deletion completes" k delete namespace "${CSI_NS}" --timeout=90s
else
  echo "skip CSI checks (start up.sh with --with-csi)"
fi

echo "# ${PASSES} passed, ${FAILS} failed"
((FAILS == 0))
