#!/usr/bin/env bash
# Starts a real S3-compatible server (moto) on a free loopback port and creates the test bucket.
# Prints `export` lines; the server's pid is in $HOARD_S3_DIR/moto.pid (stop: hack/s3-down.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
venv="$HOARD_CACHE/venv-s3"
if [ ! -x "$venv/bin/moto_server" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q "moto[server]==5.*" boto3 >&2
fi
dir="${HOARD_S3_DIR:-$(mktemp -d -t hoard-s3.XXXXXX)}"
mkdir -p "$dir"
port=$(free_port)
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 &
echo $! >"$dir/moto.pid"
endpoint="http://127.0.0.1:$port"
wait_http "$endpoint" "$dir/moto.log"
curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user testing:testing -X PUT "$endpoint/hoard-test" -o /dev/null
echo "export HOARD_S3_DIR=$dir"
echo "export HOARD_TEST_S3_ENDPOINT=$endpoint"
