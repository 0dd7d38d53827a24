#!/usr/bin/env bash
# Start a real Kubernetes control plane on loopback: etcd + kube-apiserver
# (+ kube-controller-manager with --with-controller-manager), with generated
# certificates, RBAC and the ServiceAccount token issuer. --with-csi (implies
# --with-controller-manager) adds the snapshot CRDs, snapshot-controller and one
# CSI driver stack (hostpathplugin + csi-provisioner + csi-snapshotter) for the
# driver hostpath.csi.k8s.io, and the StorageClass hoard-hostpath. --with-node (implies
# --with-controller-manager) adds a real node: kube-scheduler, containerd (Debian's) with
# runc and CNI from build.sh, and a kubelet, all on loopback; with --with-csi too, the
# hostpath driver registers with that kubelet, which then publishes CSI volumes into pods.
#
# Usage:
#   eval "$(hack/kube/up.sh [--dir DIR] [--with-controller-manager | --with-csi] [--with-node])"
#   hack/kube/up.sh --foreground [--dir DIR] [--with-controller-manager | --with-csi] [--with-node]
#   hack/kube/down.sh            # stops what up.sh started (by recorded pid)
#
# stdout carries only `export ...` lines; progress goes to stderr.
# State dir: --dir, else $HOARD_KUBE_DIR, else a fresh mktemp dir.
#
# Environment:
#   HOARD_KUBE_BIN            directory with the binaries (default: whatever
#                             hack/kube/build.sh prints; builds if missing)
#   HOARD_KUBE_READY_TIMEOUT  seconds to wait for each component (default 180)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "${HERE}/lib.sh"

DIR=${HOARD_KUBE_DIR:-}
WITH_KCM=0
WITH_CSI=0
WITH_NODE=0
NODE_NAME=${HOARD_NODE_NAME:-hoard-node}
FOREGROUND=0
READY_TIMEOUT=${HOARD_KUBE_READY_TIMEOUT:-180}

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; }
while (($#)); do
  case $1 in
    --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    --with-controller-manager | --kcm) WITH_KCM=1; shift ;;
    # Provisioning needs KCM's PV binder: it annotates PVCs for the provisioner and binds them.
    --with-csi) WITH_CSI=1; WITH_KCM=1; shift ;;
    # DaemonSets, Deployments and StatefulSets need KCM's controllers.
    --with-node) WITH_NODE=1; WITH_KCM=1; shift ;;
    --foreground) FOREGROUND=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) log "unknown argument: $1"; usage; exit 2 ;;
  esac
done

for tool in openssl curl ss setsid base64; do
  command -v "$tool" >/dev/null || die "$tool not found on PATH"
done

# --- binaries ----------------------------------------------------------------
if [[ -z ${HOARD_KUBE_BIN:-} ]]; then
  apiserver_path=$("${HERE}/build.sh" | grep '/kube-apiserver$') || die "hack/kube/build.sh failed"
  HOARD_KUBE_BIN=$(dirname "${apiserver_path}")
fi
HOARD_KUBE_BIN=$(cd "${HOARD_KUBE_BIN}" && pwd)
ETCD_BIN=${HOARD_KUBE_BIN}/etcd
APISERVER_BIN=${HOARD_KUBE_BIN}/kube-apiserver
KCM_BIN=${HOARD_KUBE_BIN}/kube-controller-manager
SNAPSHOT_CONTROLLER_BIN=${HOARD_KUBE_BIN}/snapshot-controller
HOSTPATH_BIN=${HOARD_KUBE_BIN}/hostpathplugin
PROVISIONER_BIN=${HOARD_KUBE_BIN}/csi-provisioner
SNAPSHOTTER_BIN=${HOARD_KUBE_BIN}/csi-snapshotter
CRD_DIR=${HOARD_KUBE_BIN}/crds/snapshot
SCHEDULER_BIN=${HOARD_KUBE_BIN}/kube-scheduler
KUBELET_BIN=${HOARD_KUBE_BIN}/kubelet
RUNC_BIN=${HOARD_KUBE_BIN}/runc
CONTAINERD_BIN=$(command -v containerd || true)
for b in "${ETCD_BIN}" "${APISERVER_BIN}"; do [[ -x $b ]] || die "missing binary $b"; done
((WITH_KCM == 0)) || [[ -x ${KCM_BIN} ]] || die "missing binary ${KCM_BIN}"
if ((WITH_CSI)); then
  for b in "${SNAPSHOT_CONTROLLER_BIN}" "${HOSTPATH_BIN}" "${PROVISIONER_BIN}" "${SNAPSHOTTER_BIN}"; do
    [[ -x $b ]] || die "missing binary $b (run hack/kube/build.sh)"
  done
  [[ -d ${CRD_DIR} ]] || die "missing ${CRD_DIR} (run hack/kube/build.sh)"
fi
if ((WITH_NODE)); then
  for b in "${SCHEDULER_BIN}" "${KUBELET_BIN}" "${RUNC_BIN}"; do
    [[ -x $b ]] || die "missing binary $b (run hack/kube/build.sh)"
  done
  [[ -n ${CONTAINERD_BIN} ]] || die "containerd not found (Debian package containerd)"
  for b in ctr containerd-shim-runc-v2 nsenter ip /usr/bin/python3 /usr/lib/cni/host-local /usr/lib/cni/loopback; do
    command -v "$b" >/dev/null || die "$b not found (Debian packages containerd, containernetworking-plugins)"
  done
  ((EUID == 0)) || die "--with-node needs root (containerd, kubelet and mounts)"
fi
if ((WITH_CSI || WITH_NODE)); then
  # kubectl of the same release as the apiserver; the machine's may be far older.
  KUBECTL=${HOARD_KUBE_BIN}/kubectl
  [[ -x ${KUBECTL} ]] || KUBECTL=$(command -v kubectl) || die "no kubectl in ${HOARD_KUBE_BIN} or on PATH"
fi

# --- state dir -----------------------------------------------------------------
if [[ -z ${DIR} ]]; then
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/hoard-kube.XXXXXX")
fi
mkdir -p "${DIR}"
DIR=$(cd "${DIR}" && pwd)
[[ -z $(ls -A "${DIR}") || -f ${DIR}/.hoard-kube ]] ||
  die "${DIR} is not empty and is not a hoard kube state dir"
touch "${DIR}/.hoard-kube"
mkdir -p "${DIR}/pki" "${DIR}/logs" "${DIR}/pids" "${DIR}/etcd"
chmod 700 "${DIR}" "${DIR}/pki" "${DIR}/etcd"
for name in "${COMPONENTS[@]}"; do
  if pid=$(running_pid "${DIR}" "${name}"); then
    die "${name} is already running from ${DIR} (pid ${pid}); run hack/kube/down.sh --dir ${DIR} first"
  fi
done

# --- ports (random, free, loopback) ------------------------------------------
if [[ -f ${DIR}/ports.env ]]; then
  # Restart on an existing state dir: keep the ports etcd's data knows about.
  # shellcheck disable=SC1091
  source "${DIR}/ports.env"
  # State dirs from before --with-node lack the node's ports.
  : "${SCHEDULER_PORT:=$(free_port "${APISERVER_PORT}" "${KCM_PORT}")}"
  : "${KUBELET_PORT:=$(free_port "${APISERVER_PORT}" "${KCM_PORT}" "${SCHEDULER_PORT}")}"
  : "${KUBELET_HEALTHZ_PORT:=$(free_port "${APISERVER_PORT}" "${KCM_PORT}" "${SCHEDULER_PORT}" "${KUBELET_PORT}")}"
  : "${NODE_IP:=198.18.$((RANDOM % 256)).$((1 + RANDOM % 254))}"
  for p in "${ETCD_CLIENT_PORT}" "${ETCD_PEER_PORT}" "${APISERVER_PORT}" "${KCM_PORT}"; do
    port_free "$p" || die "port $p from ${DIR}/ports.env is in use"
  done
else
  taken=()
  ETCD_CLIENT_PORT=$(free_port "${taken[@]}"); taken+=("${ETCD_CLIENT_PORT}")
  ETCD_PEER_PORT=$(free_port "${taken[@]}"); taken+=("${ETCD_PEER_PORT}")
  APISERVER_PORT=$(free_port "${taken[@]}"); taken+=("${APISERVER_PORT}")
  KCM_PORT=$(free_port "${taken[@]}"); taken+=("${KCM_PORT}")
  SCHEDULER_PORT=$(free_port "${taken[@]}"); taken+=("${SCHEDULER_PORT}")
  KUBELET_PORT=$(free_port "${taken[@]}"); taken+=("${KUBELET_PORT}")
  KUBELET_HEALTHZ_PORT=$(free_port "${taken[@]}")
  # The kubelet refuses a loopback node IP. The node's address is a /32 on the loopback
  # device from 198.18.0.0/15 (reserved for benchmarks, RFC 2544), so traffic to it never
  # leaves the machine; one per state dir, added by the node part and removed by down.sh.
  NODE_IP=198.18.$((RANDOM % 256)).$((1 + RANDOM % 254))
  cat >"${DIR}/ports.env" <<EOF
ETCD_CLIENT_PORT=${ETCD_CLIENT_PORT}
ETCD_PEER_PORT=${ETCD_PEER_PORT}
APISERVER_PORT=${APISERVER_PORT}
KCM_PORT=${KCM_PORT}
SCHEDULER_PORT=${SCHEDULER_PORT}
KUBELET_PORT=${KUBELET_PORT}
KUBELET_HEALTHZ_PORT=${KUBELET_HEALTHZ_PORT}
NODE_IP=${NODE_IP}
EOF
fi
SERVICE_CIDR=10.96.0.0/12
SERVICE_IP=10.96.0.1 # first IP of SERVICE_CIDR: the `kubernetes` Service
ISSUER=https://kubernetes.default.svc.cluster.local
APISERVER_URL=https://127.0.0.1:${APISERVER_PORT}

# --- certificates -------------------------------------------------------------
PKI=${DIR}/pki
gen_pki() {
  local o=/dev/null
  # cluster CA
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=hoard-kube-ca" \
    -keyout "${PKI}/ca.key" -out "${PKI}/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>$o
  # front-proxy CA (aggregation layer / requestheader auth), as kubeadm does
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=hoard-front-proxy-ca" \
    -keyout "${PKI}/front-proxy-ca.key" -out "${PKI}/front-proxy-ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>$o

  # sign_cert NAME CA SUBJ EXTFILE-CONTENT
  sign_cert() {
    local name=$1 ca=$2 subj=$3 ext=$4
    openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "${subj}" \
      -keyout "${PKI}/${name}.key" -out "${PKI}/${name}.csr" 2>$o
    printf '%s\n' "${ext}" >"${PKI}/${name}.ext"
    openssl x509 -req -sha256 -days 3650 -in "${PKI}/${name}.csr" \
      -CA "${PKI}/${ca}.crt" -CAkey "${PKI}/${ca}.key" -CAcreateserial \
      -extfile "${PKI}/${name}.ext" -out "${PKI}/${name}.crt" 2>$o
    rm -f "${PKI}/${name}.csr" "${PKI}/${name}.ext"
  }
  local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
  sign_cert apiserver ca "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,IP:${SERVICE_IP},DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # cluster-admin for tests: group system:masters
  sign_cert admin ca "/O=system:masters/CN=hoard-admin" "${client}"
  # kube-controller-manager's own identity (RBAC bootstrap role system:kube-controller-manager)
  sign_cert controller-manager ca "/CN=system:kube-controller-manager" "${client}"
  sign_cert scheduler ca "/CN=system:kube-scheduler" "${client}"
  # The node's kubelet (Node authorizer + NodeRestriction) and its serving certificate.
  sign_cert kubelet ca "/O=system:nodes/CN=system:node:${NODE_NAME}" "${client}"
  sign_cert kubelet-serving ca "/CN=${NODE_NAME}" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:${NODE_IP},DNS:${NODE_NAME}"
  # apiserver -> kubelets (logs, exec)
  sign_cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" "${client}"
  # apiserver -> aggregated apiservers
  sign_cert front-proxy-client front-proxy-ca "/CN=front-proxy-client" "${client}"
  # ServiceAccount token signing key pair
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "${PKI}/sa.key" 2>$o
  openssl pkey -in "${PKI}/sa.key" -pubout -out "${PKI}/sa.pub" 2>$o
  chmod 600 "${PKI}"/*.key
}
if [[ ! -f ${PKI}/sa.pub ]]; then
  log "generating certificates in ${PKI}"
  gen_pki
fi

# write_kubeconfig FILE USER-CERT-BASENAME
write_kubeconfig() {
  local file=$1 user=$2
  cat >"${file}" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: hoard
  cluster:
    server: ${APISERVER_URL}
    certificate-authority-data: $(base64 -w0 <"${PKI}/ca.crt")
users:
- name: ${user}
  user:
    client-certificate-data: $(base64 -w0 <"${PKI}/${user}.crt")
    client-key-data: $(base64 -w0 <"${PKI}/${user}.key")
contexts:
- name: hoard
  context:
    cluster: hoard
    user: ${user}
current-context: hoard
EOF
  chmod 600 "${file}"
}
write_kubeconfig "${DIR}/kubeconfig" admin
write_kubeconfig "${DIR}/controller-manager.kubeconfig" controller-manager
write_kubeconfig "${DIR}/scheduler.kubeconfig" scheduler
write_kubeconfig "${DIR}/kubelet.kubeconfig" kubelet

# kubectl against this cluster, bounded (the CSI and node parts use it).
kc() { timeout 60 "${KUBECTL}" --kubeconfig="${DIR}/kubeconfig" --request-timeout=30s "$@"; }

# --- process management -------------------------------------------------------
stop_all() { "${HERE}/down.sh" --dir "${DIR}" >&2 || true; }
# Stop whatever we already started if anything below fails.
trap 'rc=$?; if ((rc != 0)); then log "failed; stopping what was started"; stop_all; fi' EXIT
trap 'log "interrupted"; exit 130' INT TERM

# start NAME BINARY ARGS...: detached (own session), stdin closed, logs to file.
start() {
  local name=$1 bin=$2
  shift 2
  printf '%q ' "${bin}" "$@" >"${DIR}/logs/${name}.cmdline"
  # Logs append across restarts: log_since only looks past this offset.
  stat -c %s "${DIR}/logs/${name}.log" >"${DIR}/logs/${name}.offset" 2>/dev/null || echo 0 >"${DIR}/logs/${name}.offset"
  # setsid does not fork here (a background job is not a group leader), so $!
  # is the component's own pid.
  setsid "${bin}" "$@" </dev/null >>"${DIR}/logs/${name}.log" 2>&1 &
  local pid=$!
  echo "${pid}" >"${DIR}/pids/${name}.pid"
  echo "${bin}" >"${DIR}/pids/${name}.bin"
  # Until the forked shell has exec'd the binary, /proc/PID/cmdline is bash's.
  local i
  for ((i = 0; i < 50; i++)); do
    running_pid "${DIR}" "${name}" >/dev/null && break
    sleep 0.1
  done
  log "started ${name} (pid ${pid}, log ${DIR}/logs/${name}.log)"
}

# log_since NAME ERE: this run's part of NAME's log matches ERE.
log_since() {
  local off
  off=$(<"${DIR}/logs/$1.offset")
  tail -c +"$((off + 1))" "${DIR}/logs/$1.log" | grep -Eq -- "$2"
}

# wait_until NAME DESCRIPTION CMD...: bounded by READY_TIMEOUT seconds and a try count.
wait_until() {
  local name=$1 what=$2
  shift 2
  local start=$SECONDS tries=0 max_tries=$((READY_TIMEOUT * 2))
  while ((tries < max_tries && SECONDS - start < READY_TIMEOUT)); do
    tries=$((tries + 1))
    if ! running_pid "${DIR}" "${name}" >/dev/null; then
      log "${name} exited; last log lines:"
      tail -n 30 "${DIR}/logs/${name}.log" >&2 || true
      return 1
    fi
    if "$@" >/dev/null 2>&1; then
      log "${name}: ${what} after $((SECONDS - start))s (${tries} tries)"
      return 0
    fi
    sleep 0.5
  done
  log "${name}: ${what} not reached within ${READY_TIMEOUT}s / ${tries} tries; last log lines:"
  tail -n 30 "${DIR}/logs/${name}.log" >&2 || true
  return 1
}

# --- etcd -----------------------------------------------------------------------
ETCD_URL=http://127.0.0.1:${ETCD_CLIENT_PORT}
PEER_URL=http://127.0.0.1:${ETCD_PEER_PORT}
start etcd "${ETCD_BIN}" \
  --name=hoard \
  --data-dir="${DIR}/etcd" \
  --listen-client-urls="${ETCD_URL}" \
  --advertise-client-urls="${ETCD_URL}" \
  --listen-peer-urls="${PEER_URL}" \
  --initial-advertise-peer-urls="${PEER_URL}" \
  --initial-cluster="hoard=${PEER_URL}" \
  --initial-cluster-state=new \
  --unsafe-no-fsync \
  --snapshot-count=10000 \
  --log-level=warn
wait_until etcd "healthy" curl -fsS --max-time 2 "${ETCD_URL}/health"

# --- kube-apiserver ---------------------------------------------------------------
# Audit: every request made by a ServiceAccount (metadata only: who, verb, resource,
# authorization decision) goes to logs/audit.log, so tests can check which permissions a
# component used and which it was refused.
cat >"${DIR}/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: None
POLICY
# --endpoint-reconciler-type=none: the reconciler would publish the advertise
# address 127.0.0.1 as the `kubernetes` Service endpoint, which validation
# rejects ("may not be in the loopback range") every 10 s. Nothing in-cluster
# needs that endpoint here (no pods run).
start kube-apiserver "${APISERVER_BIN}" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="${APISERVER_PORT}" \
  --etcd-servers="${ETCD_URL}" \
  --cert-dir="${PKI}" \
  --tls-cert-file="${PKI}/apiserver.crt" \
  --tls-private-key-file="${PKI}/apiserver.key" \
  --client-ca-file="${PKI}/ca.crt" \
  --authorization-mode=Node,RBAC \
  --anonymous-auth=true \
  --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true \
  --service-cluster-ip-range="${SERVICE_CIDR}" \
  --service-account-issuer="${ISSUER}" \
  --service-account-key-file="${PKI}/sa.pub" \
  --service-account-signing-key-file="${PKI}/sa.key" \
  --requestheader-client-ca-file="${PKI}/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-username-headers=X-Remote-User \
  --proxy-client-cert-file="${PKI}/front-proxy-client.crt" \
  --proxy-client-key-file="${PKI}/front-proxy-client.key" \
  --kubelet-client-certificate="${PKI}/apiserver-kubelet-client.crt" \
  --kubelet-client-key="${PKI}/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="${PKI}/ca.crt" \
  --kubelet-preferred-address-types=InternalIP \
  --endpoint-reconciler-type=none \
  --audit-policy-file="${DIR}/audit-policy.yaml" \
  --audit-log-path="${DIR}/logs/audit.log" \
  --audit-log-format=json \
  --audit-log-maxsize=200 \
  --profiling=false
wait_until kube-apiserver "/readyz ok" \
  curl -fsS --max-time 5 --cacert "${PKI}/ca.crt" --cert "${PKI}/admin.crt" --key "${PKI}/admin.key" \
  "${APISERVER_URL}/readyz"

# --- kube-controller-manager (optional) --------------------------------------------
if ((WITH_KCM)); then
  start kube-controller-manager "${KCM_BIN}" \
    --kubeconfig="${DIR}/controller-manager.kubeconfig" \
    --authentication-kubeconfig="${DIR}/controller-manager.kubeconfig" \
    --authorization-kubeconfig="${DIR}/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="${KCM_PORT}" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --controllers="${HOARD_KCM_CONTROLLERS:-*}" \
    --root-ca-file="${PKI}/ca.crt" \
    --service-account-private-key-file="${PKI}/sa.key" \
    --cluster-signing-cert-file="${PKI}/ca.crt" \
    --cluster-signing-key-file="${PKI}/ca.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --profiling=false
  wait_until kube-controller-manager "/healthz ok" \
    curl -fsSk --max-time 5 "https://127.0.0.1:${KCM_PORT}/healthz"
fi

KUBELET_ROOT=${DIR}/kubelet
CONTAINERD_DIR=${DIR}/containerd
CONTAINERD_SOCK=${CONTAINERD_DIR}/containerd.sock
CNI_DIR=${DIR}/cni
IMAGE_DIR=${DIR}/images
# Pods that are not hostNetwork get an interface no traffic leaves: see the CNI config below.
POD_CIDR=10.88.0.0/16

# --- CSI snapshot stack (optional) ------------------------------------------------------
CSI_DRIVER=hostpath.csi.k8s.io
CSI_STORAGE_CLASS=hoard-hostpath
CSI_STATE_DIR=${DIR}/csi/hostpath/data
CSI_SOCK=${DIR}/csi/hostpath/csi.sock
rm -f "${DIR}/csi.env" "${DIR}/node.env"
if ((WITH_CSI)); then
  # csi-provisioner prefers $KUBECONFIG over its --kubeconfig flag: a caller's cluster
  # must never leak into these processes.
  export KUBECONFIG=${DIR}/kubeconfig
  # sun_path holds 108 bytes.
  ((${#CSI_SOCK} < 100)) || die "CSI socket path ${CSI_SOCK} is too long for a unix socket; use a shorter --dir"
  mkdir -p "${CSI_STATE_DIR}"
  chmod 700 "${DIR}/csi"

  # Server-side apply: idempotent on a restart, and no last-applied annotation (the
  # CRDs are large).
  log "applying the snapshot CRDs from ${CRD_DIR}"
  kc apply --server-side --force-conflicts \
    -f "${CRD_DIR}/snapshot.storage.k8s.io_volumesnapshotclasses.yaml" \
    -f "${CRD_DIR}/snapshot.storage.k8s.io_volumesnapshotcontents.yaml" \
    -f "${CRD_DIR}/snapshot.storage.k8s.io_volumesnapshots.yaml" >&2
  kc wait --for=condition=Established --timeout=60s \
    crd/volumesnapshotclasses.snapshot.storage.k8s.io \
    crd/volumesnapshotcontents.snapshot.storage.k8s.io \
    crd/volumesnapshots.snapshot.storage.k8s.io >&2

  # Test infrastructure: every CSI process uses the cluster-admin kubeconfig instead of
  # ServiceAccounts with the upstream RBAC. --retry-interval-max: upstream's 5 min backoff
  # would stall tests that race a PVC's binding; 10 s keeps retries quick.
  start snapshot-controller "${SNAPSHOT_CONTROLLER_BIN}" \
    --kubeconfig="${DIR}/kubeconfig" \
    --leader-election=false \
    --retry-interval-max=10s
  wait_until snapshot-controller "started" log_since snapshot-controller 'Starting snapshot controller'

  # A socket left by a killed driver would pass the readiness check below.
  rm -f "${CSI_SOCK}"
  hostpath_node_args=(--nodeid=hoard-csi-node)
  if ((WITH_NODE)); then
    # The kubelet's plugin watcher finds the registration socket (also on a later start).
    hostpath_node_args=(--nodeid="${NODE_NAME}" --kubelet-registration-dir="${KUBELET_ROOT}/plugins_registry")
  fi
  start hostpathplugin "${HOSTPATH_BIN}" \
    --drivername="${CSI_DRIVER}" \
    "${hostpath_node_args[@]}" \
    --endpoint="unix://${CSI_SOCK}" \
    --statedir="${CSI_STATE_DIR}"
  wait_until hostpathplugin "socket ${CSI_SOCK}" test -S "${CSI_SOCK}"

  # --timeout: a snapshot or restore of a big volume runs inside one RPC (tar).
  start csi-provisioner "${PROVISIONER_BIN}" \
    --csi-address="${CSI_SOCK}" \
    --kubeconfig="${DIR}/kubeconfig" \
    --leader-election=false \
    --timeout=60s \
    --retry-interval-max=10s
  wait_until csi-provisioner "started" log_since csi-provisioner 'Started provisioner controller'
  start csi-snapshotter "${SNAPSHOTTER_BIN}" \
    --csi-address="${CSI_SOCK}" \
    --kubeconfig="${DIR}/kubeconfig" \
    --leader-election=false \
    --timeout=60s \
    --retry-interval-max=10s
  wait_until csi-snapshotter "started" log_since csi-snapshotter 'Starting CSI snapshotter'

  # Immediate binding: there are no nodes or CSINode objects for WaitForFirstConsumer.
  # No VolumeSnapshotClass: tests create their own (class selection is under test).
  kc apply -f - >&2 <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: ${CSI_STORAGE_CLASS}
provisioner: ${CSI_DRIVER}
reclaimPolicy: Delete
volumeBindingMode: Immediate
EOF
  cat >"${DIR}/csi.env" <<EOF
export HOARD_CSI_DRIVER=${CSI_DRIVER}
export HOARD_CSI_STORAGE_CLASS=${CSI_STORAGE_CLASS}
export HOARD_CSI_STATE_DIR=${CSI_STATE_DIR}
EOF
fi

# --- the node (optional): kube-scheduler, containerd + runc, kubelet ----------------------
if ((WITH_NODE)); then
  ((${#CONTAINERD_SOCK} < 100)) || die "containerd socket path ${CONTAINERD_SOCK} is too long; use a shorter --dir"

  if ! ip -o addr show dev lo | grep -q " ${NODE_IP}/32 "; then
    ip addr add "${NODE_IP}/32" dev lo
    echo "${NODE_IP}" >"${DIR}/node-ip.added"
  fi

  start kube-scheduler "${SCHEDULER_BIN}" \
    --kubeconfig="${DIR}/scheduler.kubeconfig" \
    --authentication-kubeconfig="${DIR}/scheduler.kubeconfig" \
    --authorization-kubeconfig="${DIR}/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="${SCHEDULER_PORT}" \
    --leader-elect=false \
    --profiling=false
  wait_until kube-scheduler "/healthz ok" curl -fsSk --max-time 5 "https://127.0.0.1:${SCHEDULER_PORT}/healthz"

  # CNI: pods that are not hostNetwork get their own network namespace with an address
  # from POD_CIDR on eth0 (containerd wants one) and no link out of it (hack/kube/cni-isolated.py):
  # no pod traffic leaves its namespace. Pods that must be reached (the agent, the
  # controller) use hostNetwork, on the node's address.
  mkdir -p "${CNI_DIR}/bin" "${CNI_DIR}/conf" "${CNI_DIR}/ipam"
  ln -sfn "${HERE}/cni-isolated.py" "${CNI_DIR}/bin/hoard-isolated"
  ln -sfn /usr/lib/cni/host-local "${CNI_DIR}/bin/host-local"
  ln -sfn /usr/lib/cni/loopback "${CNI_DIR}/bin/loopback"
  cat >"${CNI_DIR}/conf/10-hoard-isolated.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "hoard-isolated",
  "plugins": [
    {"type": "hoard-isolated", "ipam": {"type": "host-local", "dataDir": "${CNI_DIR}/ipam",
      "ranges": [[{"subnet": "${POD_CIDR}"}]]}}
  ]
}
CNI

  # containerd: every path of its own under the state dir (containerd-shim-runc-v2 still
  # puts its sockets in /run/containerd/s). restrict_oom_score_adj: root here lacks
  # CAP_SYS_RESOURCE, and runc fails to raise oom_score_adj without it.
  mkdir -p "${CONTAINERD_DIR}/root" "${CONTAINERD_DIR}/state" "${CONTAINERD_DIR}/opt"
  cat >"${CONTAINERD_DIR}/config.toml" <<TOML
version = 2
root = "${CONTAINERD_DIR}/root"
state = "${CONTAINERD_DIR}/state"
[grpc]
  address = "${CONTAINERD_SOCK}"
[ttrpc]
  address = "${CONTAINERD_SOCK}.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "${CONTAINERD_DIR}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:1"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "${RUNC_BIN}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${CNI_DIR}/bin"
    conf_dir = "${CNI_DIR}/conf"
    max_conf_num = 1
TOML
  rm -f "${CONTAINERD_SOCK}"
  start containerd "${CONTAINERD_BIN}" --config="${CONTAINERD_DIR}/config.toml"
  ctr_() { timeout 120 ctr --address "${CONTAINERD_SOCK}" -n k8s.io "$@"; }
  wait_until containerd "socket ${CONTAINERD_SOCK}" ctr_ version

  # The sandbox ("pause") image and a workload image, made locally: no registry is reached.
  mkdir -p "${IMAGE_DIR}"
  python3 "${HERE}/images.py" --out "${IMAGE_DIR}/pause.tar" --tag localhost/pause:1 \
    --busybox --entrypoint '["/bin/sleep", "2147483647"]' >&2
  python3 "${HERE}/images.py" --out "${IMAGE_DIR}/busybox.tar" --tag localhost/busybox:1 \
    --busybox --entrypoint '["/bin/sh"]' >&2
  ctr_ images import "${IMAGE_DIR}/pause.tar" >&2
  ctr_ images import "${IMAGE_DIR}/busybox.tar" >&2

  mkdir -p "${KUBELET_ROOT}" "${DIR}/pod-logs"
  cat >"${DIR}/kubelet-config.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine: cgroup v1 only, cgroupfs, no swap accounting, no CAP_SYS_RESOURCE.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
localStorageCapacityIsolation: false
evictionHard: {}
containerRuntimeEndpoint: unix://${CONTAINERD_SOCK}
podLogsDir: ${DIR}/pod-logs
address: ${NODE_IP}
port: ${KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: ${KUBELET_HEALTHZ_PORT}
tlsCertFile: ${PKI}/kubelet-serving.crt
tlsPrivateKeyFile: ${PKI}/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: ${PKI}/ca.crt}
# Only clients with a certificate of the cluster CA get past authentication.
authorization: {mode: AlwaysAllow}
clusterDomain: cluster.local
serializeImagePulls: false
registerNode: true
YAML
  start kubelet "${KUBELET_BIN}" \
    --config="${DIR}/kubelet-config.yaml" \
    --kubeconfig="${DIR}/kubelet.kubeconfig" \
    --root-dir="${KUBELET_ROOT}" \
    --hostname-override="${NODE_NAME}" \
    --node-ip="${NODE_IP}"
  wait_until kubelet "/healthz ok" curl -fsS --max-time 5 "http://127.0.0.1:${KUBELET_HEALTHZ_PORT}/healthz"
  node_ready() {
    [[ $(kc get node "${NODE_NAME}" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}') == True ]]
  }
  wait_until kubelet "node ${NODE_NAME} Ready" node_ready
  if ((WITH_CSI)); then
    # attachRequired false: no external-attacher runs; the kubelet publishes directly.
    kc apply -f - >&2 <<YAML
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata:
  name: ${CSI_DRIVER}
spec:
  attachRequired: false
  podInfoOnMount: false
  volumeLifecycleModes: [Persistent]
YAML
    csi_registered() {
      [[ $(kc get csinode "${NODE_NAME}" -o jsonpath='{.spec.drivers[*].name}') == *"${CSI_DRIVER}"* ]]
    }
    wait_until kubelet "CSI driver ${CSI_DRIVER} registered on ${NODE_NAME}" csi_registered
  fi
  cat >"${DIR}/node.env" <<ENV
export HOARD_NODE_NAME=${NODE_NAME}
export HOARD_KUBELET_ROOT=${KUBELET_ROOT}
export HOARD_CONTAINERD_SOCK=${CONTAINERD_SOCK}
export HOARD_NODE_IP=${NODE_IP}
export HOARD_APISERVER_PORT=${APISERVER_PORT}
ENV
fi

cat >"${DIR}/env" <<EOF
export KUBECONFIG=${DIR}/kubeconfig
export HOARD_KUBE_DIR=${DIR}
export HOARD_KUBE_BIN_DIR=${HOARD_KUBE_BIN}
EOF
if ((WITH_CSI)); then cat "${DIR}/csi.env" >>"${DIR}/env"; fi
if ((WITH_NODE)); then cat "${DIR}/node.env" >>"${DIR}/env"; fi
log "control plane up: ${APISERVER_URL} (state ${DIR})"
if ((FOREGROUND)); then
  # Install the final traps before printing anything, so no signal slips through.
  trap 'stop_all' EXIT
  trap 'log "stopping"; exit 0' INT TERM
else
  trap - EXIT INT TERM
fi
cat "${DIR}/env"

if ((FOREGROUND)); then
  log "foreground mode: Ctrl-C (SIGINT) or SIGTERM stops everything"
  # Return as soon as any component exits (or a signal arrives).
  wait -n || true
  log "a component exited; stopping the rest"
  exit 1
fi
