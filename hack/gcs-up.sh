#!/usr/bin/env bash
# Starts a Google Cloud Storage emulator on a free loopback port, in memory, and creates the
# test bucket: hack/fake-gcs, which is fake-gcs-server's storage library plus the XML API's
# plain object PUT upstream lacks (see its main.go), built once into $HOARD_CACHE/tools with
# hack/kube's Go module and build caches. Prints `export` lines; stop with hack/gcs-down.sh.
# Clients reach it with a service account key whose `gcs_base_url` names it and whose
# `disable_oauth` skips token exchange (object_store's emulator settings); see
# HOARD_TEST_GCS_KEY.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/env.sh"
version=v1.56.1
stamp=$(sha256sum "$here/fake-gcs/main.go" | cut -c1-12)
bin="$HOARD_CACHE/tools/fake-gcs-$version-$stamp"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "go not found on PATH (hack/kube needs it too)" >&2; exit 1; }
  # hack/kube/build.sh's module and build caches (one Go cache for every Go tool).
  k8s_version=$(sed -n 's/^K8S_VERSION=${K8S_VERSION:-\(v[0-9.]*\)}$/\1/p' "$here/kube/build.sh")
  go_cache="$HOARD_CACHE/kube/${K8S_VERSION:-$k8s_version}"
  mod="$HOARD_CACHE/tools/src/fake-gcs"
  rm -rf "$mod" && mkdir -p "$mod" "$go_cache/gomod" "$go_cache/gocache"
  echo "fake-gcs: go build with fake-gcs-server $version (once)" >&2
  cp "$here/fake-gcs/main.go" "$mod/"
  (
    cd "$mod"
    export GOTOOLCHAIN=local GOMODCACHE="$go_cache/gomod" GOCACHE="$go_cache/gocache" GOFLAGS="-mod=mod -buildvcs=false" \
      GOWORK=off CGO_ENABLED=0
    go mod init hoard.dev/hack/fake-gcs >/dev/null 2>&1
    go get "github.com/fsouza/fake-gcs-server@$version" >&2
    nice -n 15 go build -trimpath -ldflags "-s -w" -o "$bin.tmp" . >&2
  )
  mv "$bin.tmp" "$bin"
fi
dir="${HOARD_GCS_DIR:-$(mktemp -d -t hoard-gcs.XXXXXX)}"
mkdir -p "$dir"
port=$(free_port)
url="http://127.0.0.1:$port"
"$bin" -host 127.0.0.1 -port "$port" >"$dir/fake-gcs.log" 2>&1 &
echo $! >"$dir/fake-gcs.pid"
wait_http "$url/storage/v1/b" "$dir/fake-gcs.log"
curl -sf -X POST -H 'Content-Type: application/json' --data '{"name": "hoard-test"}' "$url/storage/v1/b" >/dev/null
key="{\"gcs_base_url\": \"$url\", \"disable_oauth\": true, \"client_email\": \"\", \"private_key\": \"\", \"private_key_id\": \"\"}"
echo "export HOARD_GCS_DIR=$dir"
echo "export HOARD_TEST_GCS_URL=$url"
printf 'export HOARD_TEST_GCS_KEY=%q\n' "$key"
