#!/usr/bin/env bash
# Stops the GCS emulator hack/gcs-up.sh started.
set -euo pipefail
dir="${1:-${HOARD_GCS_DIR:?HOARD_GCS_DIR not set}}"
if [ -f "$dir/fake-gcs.pid" ]; then
  kill "$(cat "$dir/fake-gcs.pid")" 2>/dev/null || true
  rm -f "$dir/fake-gcs.pid"
fi
