#!/usr/bin/env bash
# The test command: starts the real services the tests use (an S3 server, the Azure Blob
# emulator and a GCS emulator on loopback, a kube-apiserver and a CSI snapshot stack built from their Go modules),
# runs the workspace's tests, and stops the services.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/env.sh

eval "$(hack/s3-up.sh)"
trap 'hack/s3-down.sh "$HOARD_S3_DIR"' EXIT
eval "$(hack/azure-up.sh)"
trap 'hack/s3-down.sh "$HOARD_S3_DIR"; hack/azure-down.sh "$HOARD_AZURE_DIR"' EXIT
eval "$(hack/gcs-up.sh)"
trap 'hack/s3-down.sh "$HOARD_S3_DIR"; hack/azure-down.sh "$HOARD_AZURE_DIR"; hack/gcs-down.sh "$HOARD_GCS_DIR"' EXIT

if [ "${HOARD_SKIP_KUBE:-0}" != 1 ]; then
  echo "== control plane (hack/kube): build or reuse, start, smoke test"
  # The real node's Debian packages (containerd, libseccomp-dev for runc, CNI, busybox).
  hack/kube/node-deps.sh
  hack/kube/build.sh
  # --with-csi: + KCM, snapshot CRDs, snapshot-controller and the hostpath CSI driver stack.
  eval "$(hack/kube/up.sh --with-csi)"
  trap 'hack/s3-down.sh "$HOARD_S3_DIR"; hack/azure-down.sh "$HOARD_AZURE_DIR"; hack/gcs-down.sh "$HOARD_GCS_DIR"; hack/kube/down.sh --rm' EXIT
  hack/kube/smoke.sh
  # Tests that need an API server use this cluster (each in namespaces of its own). CSI tests
  # create their own VolumeSnapshotClass; HOARD_TEST_KUBE_BIN_DIR lets them start further
  # driver stacks under other driver names, and the real-node test (tests/node.rs) a cluster
  # of its own with a kubelet (up.sh --with-node).
  export HOARD_TEST_KUBECONFIG="$KUBECONFIG" HOARD_TEST_KUBE_DIR="$HOARD_KUBE_DIR" \
    HOARD_TEST_KUBE_BIN_DIR="$HOARD_KUBE_BIN_DIR" HOARD_TEST_CSI_DRIVER="$HOARD_CSI_DRIVER" \
    HOARD_TEST_CSI_STORAGE_CLASS="$HOARD_CSI_STORAGE_CLASS" HOARD_TEST_CSI_STATE_DIR="$HOARD_CSI_STATE_DIR"
  unset KUBECONFIG
fi

echo "== cargo test"
# A failing test's panic message is what CI's summary should show: backtraces (many lines,
# after the message) only on request.
export RUST_BACKTRACE="${HOARD_TEST_BACKTRACE:-0}"
cargo test --workspace --locked "$@"

# Test isolation: with no arguments (the full run) on the same cluster, the end-to-end tests
# once more, one at a time and in a random order — each must pass without the others' leftovers.
if [ "$#" = 0 ] && [ "${HOARD_SKIP_KUBE:-0}" != 1 ]; then
  echo "== end-to-end tests alone, one at a time, shuffled"
  mapfile -t e2e_tests < <(cargo test -q --locked -p hoard-e2e --test e2e -- --list 2>/dev/null | sed -n 's/: test$//p' | shuf)
  ((${#e2e_tests[@]} > 0)) || { echo "no end-to-end tests listed" >&2; exit 1; }
  for t in "${e2e_tests[@]}"; do
    echo "-- $t"
    cargo test -q --locked -p hoard-e2e --test e2e -- --exact "$t" --test-threads=1
  done
fi
