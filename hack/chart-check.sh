#!/usr/bin/env bash
# Checks the Helm chart (chart/hoard) without a helm binary, and the commands of docs/install.md.
#
#  1. a venv under ${HOARD_CACHE:-$HOME/.cache/hoard}/venv-chart with pinned helm-python-sdk
#     (the Helm Go SDK) and kubernetes-validate;
#  2. helm lint (warnings are errors);
#  3. render for several values combinations, assert what the chart promises (capabilities,
#     mounts, ports, TLS wiring...), and refuse bad values;
#  4. validate every rendered object and the crds/ files with `kubernetes-validate --strict` for
#     Kubernetes 1.36 (the newest it knows if not 1.36); only the CRD kinds of cert-manager and
#     the Prometheus Operator may go unvalidated (no schema is bundled for them);
#  4a. build hoard-controller, hoard-agent (and hoard) and run every rendered container's
#     command line (command or the image's ENTRYPOINT, args with $(VAR) expanded, env vars the
#     binary reads turned into their flags) through the real binary with a trailing --help:
#     clap parses and validates every argument before acting on --help, so an unknown flag or
#     a bad value exits 64; probes prove it does, for each typed value; required flags must be
#     given; env vars must be ones the binary reads;
#  4b. images/*.Dockerfile: multi-stage, distroless runtime, users, linked libraries;
#  4c. plugins/hoard.yaml: its version is the workspace's, every file it ships exists, LICENSE
#     is the exact Apache-2.0 text;
#  5. compare the controller's ClusterRole+Role with chart/hoard/rbac-allowlist.yaml;
#  6. run the certificates the chart generated through hoard-agent-cert and a real rustls
#     handshake (cargo test -p hoard-agent --test agent_cert with HOARD_CHART_TLS_DIR);
#  7. docs/install.md: every values snippet is rendered; every command is run — helm commands
#     rendered with their flags, kubectl commands against a real kube-apiserver (hack/kube),
#     `helm install/upgrade` as `kubectl apply --dry-run=server` of the render; docker build
#     commands checked statically (Dockerfile exists, its binaries exist in the workspace).
#     Also checks PodSecurity: the agent is admitted in a `privileged` namespace and warned
#     about in a `baseline` one;
#  8. NOTES.txt: its `kubectl` commands run against the same kube-apiserver (rollout status
#     cannot finish without nodes: its object must be in the render instead).
#
# Step 7's cluster part needs the hack/kube binaries (built on first use, as hack/test.sh does);
# HOARD_SKIP_KUBE=1 skips it. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh

HELM_SDK_VERSION=0.2.2
KVALIDATE_VERSION=1.37.0
K8S_VERSION=1.36.0
CHART=chart/hoard
VENV="$HOARD_CACHE/venv-chart"
STAMP="helm-python-sdk==$HELM_SDK_VERSION kubernetes-validate==$KVALIDATE_VERSION"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.hoard-stamp" 2>/dev/null)" != "$STAMP" ]; then
  echo "== venv $VENV ($STAMP)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q $STAMP
  echo "$STAMP" >"$VENV/.hoard-stamp"
fi
PY="$VENV/bin/python"
R=(env PYTHONPATH= "$PY" hack/chart/render.py)
KV="$VENV/bin/kubernetes-validate"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hoard-chart-check.XXXXXX")
KUBE_STARTED=""
cleanup() {
  if [ -n "$KUBE_STARTED" ]; then hack/kube/down.sh --dir "$KUBE_STARTED" --rm >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAILED: $*" >&2; }

echo "== helm lint"
if "${R[@]}" lint "$CHART"; then ok; else bad "helm lint"; fi

# Kubernetes version: 1.36 if kubernetes-validate knows it, else its newest.
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\n' >"$WORK/probe.yaml"
if ! "$KV" --strict -k "$K8S_VERSION" --quiet "$WORK/probe.yaml" >/dev/null 2>&1; then
  K8S_VERSION=$("$KV" --version | tr -d '[:space:]')
  echo "kubernetes-validate does not know 1.36; validating against $K8S_VERSION"
fi

# Validates FILE; objects without a bundled schema are allowed only for these API groups.
validate() {
  local out
  out=$("$KV" --strict -k "$K8S_VERSION" "$@" 2>&1) || { echo "$out" >&2; return 1; }
  if echo "$out" | grep "Couldn't find schema" | grep -v -E 'api version (monitoring\.coreos\.com|cert-manager\.io)/' >&2; then
    echo "objects of unknown kinds (no schema) were rendered" >&2
    return 1
  fi
  echo "$out" | grep -c passed | sed 's/^/  validated objects: /'
}

echo "== CRDs (crds/, validated as files)"
if validate "$CHART"/crds/*.yaml; then ok; else bad "crds/ validation"; fi

declare -A CASES=(
  [defaults]='{}'
  [privileged]='{"agent":{"privileged":true,"seLinuxOptions":{"type":"spc_t"}}}'
  [cert-manager]='{"tls":{"mode":"certManager","certManager":{"issuerRef":{"name":"hoard-ca","kind":"ClusterIssuer"}}}}'
  [existing-secrets]='{"tls":{"mode":"existingSecrets","existingSecrets":{"controller":"c-tls","agentCA":"a-ca"}}}'
  [netpol-servicemonitor]='{"networkPolicy":{"enabled":true,"metricsFrom":[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]},"metrics":{"serviceMonitor":{"enabled":true,"labels":{"release":"prometheus"}}}}'
  [custom-kubelet-root]='{"agent":{"kubeletRoot":"/var/snap/microk8s/common/var/lib/kubelet/pods","restore":{"enabled":true},"extraVolumes":[{"name":"backups","hostPath":{"path":"/srv/hoard","type":"Directory"}}],"extraVolumeMounts":[{"name":"backups","mountPath":"/srv/hoard"}]}}'
  [host-network]='{"networkPolicy":{"enabled":false},"controller":{"hostNetwork":true,"metricsPort":18080,"adminNamespaces":["platform","backup-admin"]},"agent":{"hostNetwork":true,"grpcPort":17443,"metricsPort":19464}}'
  [ha-no-rbac]='{"rbac":{"create":false},"controller":{"replicas":2,"serviceAccount":{"create":false,"name":"existing"}},"image":{"tag":"v9"},"agent":{"image":{"repository":"r/a","digest":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}}}'
)
for name in defaults privileged cert-manager existing-secrets netpol-servicemonitor custom-kubelet-root host-network ha-no-rbac; do
  v=${CASES[$name]}
  echo "== render: $name"
  out="$WORK/render-$name.yaml"
  if "${R[@]}" render "$CHART" "$out" "$v" && "${R[@]}" assert "$out" "$v" && validate "$out"; then ok; else bad "render $name"; fi
done

# The containers' command lines as rendered, parsed by the real binaries (built here).
echo "== rendered container args == what hoard-controller, hoard-agent and hoard-agent-cert accept"
BIN=""
if cargo build -q --locked -p hoard-controller -p hoard-agent --bins 2>"$WORK/build.log"; then
  BIN="$(cargo metadata --locked --no-deps --format-version 1 | env PYTHONPATH= "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
else
  cat "$WORK/build.log" >&2
  bad "cargo build of the controller and agent binaries"
fi
if [ -n "$BIN" ]; then
  for name in "${!CASES[@]}"; do
    echo "-- $name"
    if "${R[@]}" args-check "$WORK/render-$name.yaml" "$BIN" "$PWD"; then ok; else bad "container args ($name)"; fi
  done
  # Extra flags and env the binaries read (HOARD_AGENT_*) are parsed as well.
  v='{"agent":{"extraArgs":["--no-io-uring"],"extraEnv":[{"name":"HOARD_AGENT_MEMORY_BUDGET","value":"512Mi"}]},"controller":{"extraArgs":["--allow-file-repositories"]}}'
  if "${R[@]}" render "$CHART" "$WORK/render-extra.yaml" "$v" >/dev/null && "${R[@]}" args-check "$WORK/render-extra.yaml" "$BIN" "$PWD"; then
    ok
  else
    bad "container args (extra args and env)"
  fi
  # The check must catch what it is for: an unknown flag, each bad value, a bad env value, an
  # env var no binary reads, an undefined $(VAR).
  if "${R[@]}" args-probe "$WORK/render-defaults.yaml" "$BIN" "$PWD"; then ok; else bad "args probe"; fi
  for v in '{"agent":{"extraArgs":["--kubelet-dir=/x"]}}' '{"agent":{"extraArgs":["--finished-orders=many"]}}' \
    '{"agent":{"extraEnv":[{"name":"HOARD_AGENT_MEMORY_BUDGET","value":"lots"}]}}' \
    '{"agent":{"extraEnv":[{"name":"HOARD_AGENT_MAX_ORDERS","value":"2"}]}}' \
    '{"controller":{"extraArgs":["--namespace=$(NAMESPACE)"]}}'; do
    if "${R[@]}" render "$CHART" "$WORK/render-broken.yaml" "$v" >/dev/null &&
      ! "${R[@]}" args-check "$WORK/render-broken.yaml" "$BIN" "$PWD" 2>"$WORK/args.log"; then
      sed 's/^/  caught: /' "$WORK/args.log" | sed -n 1p
      ok
    else
      bad "args-check accepted broken container args: $v"
    fi
  done
  echo "== images/*.Dockerfile: multi-stage, distroless runtime, the binaries link only what it has"
  if cargo build -q --locked -p hoard --bins 2>"$WORK/build.log" && "${R[@]}" dockerfiles "$PWD" "$BIN"; then
    ok
  else
    cat "$WORK/build.log" >&2
    bad "images/*.Dockerfile"
  fi
fi

echo "== plugins/hoard.yaml (krew): shipped files exist, version is the workspace's"
if "${R[@]}" plugin-manifest "$PWD"; then ok; else bad "plugins/hoard.yaml"; fi
sed 's/^  version: "v[0-9.]*"/  version: "v0.0.0-old"/' plugins/hoard.yaml >"$WORK/plugin-old.yaml"
sed 's/^    - from: LICENSE$/    - from: NOTICE/' plugins/hoard.yaml >"$WORK/plugin-missing.yaml"
for m in "$WORK/plugin-old.yaml" "$WORK/plugin-missing.yaml"; do
  if ! cmp -s plugins/hoard.yaml "$m" && ! "${R[@]}" plugin-manifest "$PWD" "$m" 2>"$WORK/plugin.log"; then
    sed 's/^/  caught: /' "$WORK/plugin.log"
    ok
  else
    bad "the plugin manifest check accepted $m"
  fi
done

echo "== values that must be refused"
for v in '{"unknownKey":1}' '{"agent":{"kubeletRoot":"var/lib/kubelet/pods"}}' '{"agent":{"privileged":"yes"}}' \
  '{"tls":{"mode":"certManager"}}' '{"tls":{"mode":"existingSecrets"}}' '{"tls":{"mode":"selfSigned"}}' \
  '{"controller":{"replicas":2,"leaderElection":{"enabled":false}}}' '{"agent":{"terminationGracePeriodSeconds":30}}' \
  '{"image":{"pullPolicy":"Sometimes"}}' '{"agent":{"memoryBudget":"lots"}}'; do
  if "${R[@]}" refuse "$CHART" "$v"; then ok; else bad "values accepted: $v"; fi
done

echo "== RBAC == rbac-allowlist.yaml"
if "${R[@]}" rbac "$WORK/render-defaults.yaml" "$CHART/rbac-allowlist.yaml"; then ok; else bad "RBAC differs from the allow-list"; fi

# The comparison itself must catch a difference: an allow-list without one verb fails.
sed '0,/verbs: \[get, list, watch, create, patch, delete\]/s//verbs: [get, list, watch, create, patch]/' \
  "$CHART/rbac-allowlist.yaml" >"$WORK/allowlist-narrower.yaml"
if ! cmp -s "$CHART/rbac-allowlist.yaml" "$WORK/allowlist-narrower.yaml" &&
  ! "${R[@]}" rbac "$WORK/render-defaults.yaml" "$WORK/allowlist-narrower.yaml" 2>/dev/null; then
  echo "  a grant beyond a narrower allow-list is caught"
  ok
else
  bad "the RBAC comparison did not catch an extra grant"
fi

echo "== chart-generated TLS through hoard-agent-cert and a rustls handshake"
if "${R[@]}" secrets "$WORK/render-defaults.yaml" "$WORK/tls" &&
  HOARD_CHART_TLS_DIR="$WORK/tls" cargo test -q --locked -p hoard-agent --test agent_cert chart_rendered_secrets 2>&1 |
  tee "$WORK/cargo.log" | grep -E '^test result|panicked|error' && grep -q 'test result: ok. 1 passed' "$WORK/cargo.log"; then
  ok
else
  cat "$WORK/cargo.log" >&2 || true
  bad "chart TLS handshake"
fi

echo "== docs/install.md: values snippets"
if "${R[@]}" doc-values docs/install.md "$CHART" "$WORK"; then ok; else bad "docs/install.md values"; fi

# A cluster for the kubectl commands (and server-side dry runs), unless skipped.
KUBE_OK=0
if [ "${HOARD_SKIP_KUBE:-0}" != 1 ]; then
  echo "== control plane for the documented kubectl commands (hack/kube)"
  if hack/kube/build.sh >/dev/null && KUBE_STARTED=$(mktemp -d "${TMPDIR:-/tmp}/hoard-chart-kube.XXXXXX") &&
    eval "$(hack/kube/up.sh --dir "$KUBE_STARTED")"; then
    KUBE_OK=1
    # 300 s: deleting just-created CRDs waits on the API server's CRD finalizer, which backs
    # off while the resource's storage initialises; on a loaded machine that took over 120 s.
    KC=(timeout 300 kubectl --request-timeout=60s)
  else
    bad "could not start the control plane"
  fi
else
  echo "== HOARD_SKIP_KUBE=1: documented kubectl commands and server-side dry runs are skipped"
fi

# Applies the objects of FILE that the API server can take (not cert-manager / Prometheus
# Operator kinds, whose CRDs are not installed) with a server-side dry run into NS.
server_dry_run() {
  local file=$1 ns=$2 filtered="$WORK/dry-run.yaml"
  env PYTHONPATH= "$PY" - "$file" "$filtered" <<'PYEOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
keep = [d for d in docs if not d["apiVersion"].startswith(("cert-manager.io/", "monitoring.coreos.com/"))]
for d in docs:
    if d not in keep:
        print(f"  not applied (CRD not installed here): {d['kind']}/{d['metadata']['name']}")
yaml.safe_dump_all(keep, open(sys.argv[2], "w"))
PYEOF
  "${KC[@]}" apply --dry-run=server -n "$ns" -f "$filtered" 2>&1 | tee "$WORK/apply.log"
  [ "${PIPESTATUS[0]}" = 0 ] || return 1
  if grep -i 'warning' "$WORK/apply.log"; then echo "unexpected warnings from the API server" >&2; return 1; fi
}

echo "== docs/install.md: commands"
n=0
while IFS= read -r cmd; do
  n=$((n + 1))
  echo "-- \$ $cmd"
  read -r -a argv <<<"$cmd"
  case ${argv[0]} in
    helm)
      out="$WORK/doc-cmd-$n.yaml"
      if ! "${R[@]}" helm-cmd "$cmd" "$PWD" "$out" >"$WORK/helm.log" 2>&1; then
        cat "$WORK/helm.log" >&2; bad "docs: $cmd"; continue
      fi
      grep -v '^NAMESPACE=' "$WORK/helm.log"
      ns=$(sed -n 's/^NAMESPACE=//p' "$WORK/helm.log")
      if ! validate "$out"; then bad "docs (validation): $cmd"; continue; fi
      if [ "$KUBE_OK" = 1 ] && [ "${argv[1]}" != template ]; then
        if server_dry_run "$out" "$ns"; then ok; else bad "docs (server dry run): $cmd"; fi
      else
        ok
      fi
      ;;
    kubectl)
      if [ "$KUBE_OK" = 1 ]; then
        if "${KC[@]}" "${argv[@]:1}"; then ok; else bad "docs: $cmd"; fi
      else
        echo "  not run (no cluster)"
      fi
      ;;
    docker)
      # docker build -f FILE -t TAG .   → FILE exists, its cargo packages/binaries exist.
      df=""
      for ((i = 0; i < ${#argv[@]}; i++)); do [ "${argv[$i]}" = -f ] && df=${argv[$((i + 1))]}; done
      if [ "${argv[1]}" != build ] || [ -z "$df" ] || [ ! -f "$df" ] || [ "${argv[-1]}" != . ]; then
        bad "docs: unsupported or broken docker command: $cmd"; continue
      fi
      line=$(grep -o 'cargo build --release --locked -p [a-z-]*\( --bin [a-z-]*\)*' "$df") || { bad "$df: no cargo build line"; continue; }
      pkg=$(awk '{print $6}' <<<"$line")
      bins=$(grep -o -- '--bin [a-z-]*' <<<"$line" | awk '{print $2}')
      meta=$(cargo metadata --locked --no-deps --format-version 1)
      have=$(env PYTHONPATH= "$PY" -c 'import json,sys; m=json.load(sys.stdin); p=[x for x in m["packages"] if x["name"]==sys.argv[1]]; print(" ".join(t["name"] for t in p[0]["targets"] if "bin" in t["kind"]) if p else "-")' "$pkg" <<<"$meta")
      if [ "$have" = "-" ]; then
        echo "  NOT CHECKED: package $pkg is not a workspace member yet ($df)"
        continue
      fi
      missing=""
      for b in $bins; do grep -qw -- "$b" <<<"$have" || missing="$missing $b"; done
      if [ -n "$missing" ]; then bad "$df builds binaries that do not exist:$missing"; else echo "  $df: package $pkg has $(tr '\n' ' ' <<<"$bins")"; ok; fi
      ;;
    *)
      bad "docs/install.md shows a command this script cannot check: $cmd"
      ;;
  esac
done < <("${R[@]}" doc-commands docs/install.md)

# NOTES.txt's commands, as helm prints them after `helm install hoard chart/hoard -n hoard`.
echo "== NOTES.txt: its commands"
if "${R[@]}" notes "$CHART" "$WORK/render-defaults.yaml" '{}' >"$WORK/notes-cmds.txt"; then
  ok
  if [ "$KUBE_OK" = 1 ]; then
    # docs/install.md ends by deleting the CRDs; NOTES' `kubectl explain` needs them.
    "${KC[@]}" get namespace hoard >/dev/null 2>&1 || "${KC[@]}" create namespace hoard >/dev/null
    "${KC[@]}" apply --server-side -f "$CHART/crds/" >/dev/null &&
      "${KC[@]}" wait --for condition=established --timeout=60s -f "$CHART/crds/" >/dev/null || bad "CRDs for NOTES"
    while IFS= read -r cmd; do
      echo "-- \$ $cmd"
      read -r -a argv <<<"$cmd"
      if "${KC[@]}" "${argv[@]:1}" >"$WORK/notes.log" 2>&1; then head -3 "$WORK/notes.log"; ok; else cat "$WORK/notes.log" >&2; bad "NOTES: $cmd"; fi
    done <"$WORK/notes-cmds.txt"
  else
    echo "  not run (no cluster): $(wc -l <"$WORK/notes-cmds.txt") commands"
  fi
else
  bad "NOTES.txt"
fi

if [ "$KUBE_OK" = 1 ]; then
  echo "== PodSecurity: the agent is refused by a baseline namespace"
  "${KC[@]}" create namespace hoard-psa-baseline >/dev/null
  "${KC[@]}" label namespace hoard-psa-baseline pod-security.kubernetes.io/enforce=baseline pod-security.kubernetes.io/warn=baseline >/dev/null
  "${R[@]}" render "$CHART" "$WORK/psa.yaml" '{}' hoard-psa-baseline >/dev/null
  "${KC[@]}" apply --dry-run=server -n hoard-psa-baseline -f "$WORK/psa.yaml" >"$WORK/psa.log" 2>&1 || true
  if grep -q 'would violate PodSecurity "baseline:latest".*hostPath volumes (volume "kubelet-pods")' "$WORK/psa.log"; then
    grep -i warning "$WORK/psa.log" | sed 's/^/  /'
    ok
  else
    cat "$WORK/psa.log" >&2; bad "no PodSecurity warning for the agent in a baseline namespace"
  fi
fi

echo "chart-check: $passed passed, $failed failed"
[ "$failed" = 0 ]
