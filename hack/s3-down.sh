#!/usr/bin/env bash
# Stops the S3 server hack/s3-up.sh started.
set -euo pipefail
dir="${1:-${HOARD_S3_DIR:?HOARD_S3_DIR not set}}"
if [ -f "$dir/moto.pid" ]; then
  kill "$(cat "$dir/moto.pid")" 2>/dev/null || true
  rm -f "$dir/moto.pid"
fi
