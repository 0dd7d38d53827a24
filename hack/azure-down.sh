#!/usr/bin/env bash
# Stops the Azurite server hack/azure-up.sh started.
set -euo pipefail
dir="${1:-${HOARD_AZURE_DIR:?HOARD_AZURE_DIR not set}}"
if [ -f "$dir/azurite.pid" ]; then
  kill "$(cat "$dir/azurite.pid")" 2>/dev/null || true
  rm -f "$dir/azurite.pid"
fi
