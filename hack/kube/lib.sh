# Shared helpers for hack/kube/{up,down,smoke}.sh. Source it; do not run it.

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# running_pid DIR NAME: print the pid recorded for NAME and succeed only if that
# pid is alive and still runs the recorded binary (guards against pid reuse).
running_pid() {
  local dir=$1 name=$2 pid bin arg0
  [[ -f ${dir}/pids/${name}.pid && -f ${dir}/pids/${name}.bin ]] || return 1
  pid=$(<"${dir}/pids/${name}.pid")
  bin=$(<"${dir}/pids/${name}.bin")
  [[ ${pid} =~ ^[0-9]+$ && -r /proc/${pid}/cmdline ]] || return 1
  arg0=$({ tr '\0' '\n' <"/proc/${pid}/cmdline"; } 2>/dev/null | sed -n 1p) || return 1
  [[ ${arg0} == "${bin}" ]] || return 1
  echo "${pid}"
}

# port_free PORT: nothing listens on PORT (TCP, any address).
port_free() {
  [[ -z $(ss -Hltn "sport = :$1" 2>/dev/null) ]]
}

# free_port [TAKEN...]: a random free TCP port below the kernel's ephemeral range.
free_port() {
  local p i t ok
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12000))
    ok=1
    for t in "$@"; do [[ $t == "$p" ]] && ok=0; done
    ((ok)) && port_free "$p" && { echo "$p"; return 0; }
  done
  die "no free port found after 200 tries"
}

# Every process up.sh may start, in start order; down.sh stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager
  snapshot-controller hostpathplugin csi-provisioner csi-snapshotter
  kube-scheduler containerd kubelet)
