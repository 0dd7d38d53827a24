#!/usr/bin/env bash
# Starts Azurite (the Azure Blob Storage emulator) on a free loopback port and creates the test
# container. Prints `export` lines; stop with hack/azure-down.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
prefix="$HOARD_CACHE/azurite"
if [ ! -x "$prefix/node_modules/.bin/azurite-blob" ]; then
  # 3.35 is the newest release that runs on Node 20.
  npm install --silent --no-audit --no-fund --prefix "$prefix" azurite@3.35.0 >&2
fi
venv="$HOARD_CACHE/venv-s3"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv" >&2; fi
"$venv/bin/python" -c 'import azure.storage.blob' 2>/dev/null || "$venv/bin/pip" install -q azure-storage-blob >&2
dir="${HOARD_AZURE_DIR:-$(mktemp -d -t hoard-azure.XXXXXX)}"
mkdir -p "$dir"
port=$(free_port)
"$prefix/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$port" --inMemoryPersistence \
  --disableTelemetry --skipApiVersionCheck >"$dir/azurite.log" 2>&1 &
echo $! >"$dir/azurite.pid"
url="http://127.0.0.1:$port"
wait_http "$url" "$dir/azurite.log"
"$venv/bin/python" - "$url" <<'PY'
import sys
from azure.storage.blob import BlobServiceClient
key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
conn = f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={key};BlobEndpoint={sys.argv[1]}/devstoreaccount1;"
BlobServiceClient.from_connection_string(conn).create_container("hoard-test")
PY
echo "export HOARD_AZURE_DIR=$dir"
echo "export HOARD_TEST_AZURITE_URL=$url"
