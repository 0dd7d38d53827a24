# Shared by bench/scale.sh and bench/stream.sh (sourced, not run): paths, the release build of
# hoard, and the --no-build / --help / unknown-argument cases of their option parsing.
# The sourcing script sets HERE (its directory) first and BUILD=1 before parsing options.

REPO_ROOT="$(cd "$HERE/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/hoard/target}"
HOARD="$CARGO_TARGET_DIR/release/hoard"

# common_option SCRIPT ARG: handles an option every bench script takes; returns 1 for others.
# --help prints the comment at the top of the script (up to its `set` line).
common_option() {
  case "$2" in
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,/^set /p' "$1" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $2" >&2; exit 2 ;;
  esac
}

# build_hoard: the release binary, unless --no-build was given.
build_hoard() {
  [ "$BUILD" = 1 ] || return 0
  (cd "$REPO_ROOT" && cargo build --release -q -p hoard) || { echo "build failed" >&2; exit 1; }
}
