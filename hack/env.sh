# Shared environment for hoard's scripts: caches live outside the clone.
# shellcheck shell=bash
export HOARD_CACHE="${HOARD_CACHE:-$HOME/.cache/hoard}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOARD_CACHE/target}"
mkdir -p "$HOARD_CACHE"
# CI builds each commit once: incremental state would only cost disk.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits (bounded: 10 s) until an HTTP server answers at $1; fails with the log $2 otherwise.
wait_http() {
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "$1/" && return 0
    sleep 0.1
  done
  echo "no server answered at $1; log: $2" >&2
  cat "$2" >&2
  return 1
}
