#!/usr/bin/env bash
# Start a real Kubernetes control plane on loopback: etcd + kube-apiserver
# (+ kube-controller-manager with --with-controller-manager), with generated
# certificates, RBAC and the ServiceAccount token issuer.
#
# Usage:
#   eval "$(hack/kube/up.sh [--dir DIR] [--with-controller-manager])"
#   hack/kube/up.sh --foreground [--dir DIR] [--with-controller-manager]
#   hack/kube/down.sh            # stops what up.sh started (by recorded pid)
#
# stdout carries only `export ...` lines; progress goes to stderr.
# State dir: --dir, else $HOARD_KUBE_DIR, else a fresh mktemp dir.
#
# Environment:
#   HOARD_KUBE_BIN            directory with etcd/kube-apiserver/kube-controller-manager
#                             (default: whatever hack/kube/build.sh prints; builds if missing)
#   HOARD_KUBE_READY_TIMEOUT  seconds to wait for each component (default 180)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "${HERE}/lib.sh"

DIR=${HOARD_KUBE_DIR:-}
WITH_KCM=0
FOREGROUND=0
READY_TIMEOUT=${HOARD_KUBE_READY_TIMEOUT:-180}

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; }
while (($#)); do
  case $1 in
    --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    --with-controller-manager | --kcm) WITH_KCM=1; shift ;;
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
ETCD_BIN=${HOARD_KUBE_BIN}/etcd
APISERVER_BIN=${HOARD_KUBE_BIN}/kube-apiserver
KCM_BIN=${HOARD_KUBE_BIN}/kube-controller-manager
for b in "${ETCD_BIN}" "${APISERVER_BIN}"; do [[ -x $b ]] || die "missing binary $b"; done
((WITH_KCM == 0)) || [[ -x ${KCM_BIN} ]] || die "missing binary ${KCM_BIN}"

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
for name in etcd kube-apiserver kube-controller-manager; do
  if pid=$(running_pid "${DIR}" "${name}"); then
    die "${name} is already running from ${DIR} (pid ${pid}); run hack/kube/down.sh --dir ${DIR} first"
  fi
done

# --- ports (random, free, loopback) ------------------------------------------
if [[ -f ${DIR}/ports.env ]]; then
  # Restart on an existing state dir: keep the ports etcd's data knows about.
  # shellcheck disable=SC1091
  source "${DIR}/ports.env"
  for p in "${ETCD_CLIENT_PORT}" "${ETCD_PEER_PORT}" "${APISERVER_PORT}" "${KCM_PORT}"; do
    port_free "$p" || die "port $p from ${DIR}/ports.env is in use"
  done
else
  taken=()
  ETCD_CLIENT_PORT=$(free_port "${taken[@]}"); taken+=("${ETCD_CLIENT_PORT}")
  ETCD_PEER_PORT=$(free_port "${taken[@]}"); taken+=("${ETCD_PEER_PORT}")
  APISERVER_PORT=$(free_port "${taken[@]}"); taken+=("${APISERVER_PORT}")
  KCM_PORT=$(free_port "${taken[@]}")
  cat >"${DIR}/ports.env" <<EOF
ETCD_CLIENT_PORT=${ETCD_CLIENT_PORT}
ETCD_PEER_PORT=${ETCD_PEER_PORT}
APISERVER_PORT=${APISERVER_PORT}
KCM_PORT=${KCM_PORT}
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

cat >"${DIR}/env" <<EOF
export KUBECONFIG=${DIR}/kubeconfig
export HOARD_KUBE_DIR=${DIR}
EOF
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
