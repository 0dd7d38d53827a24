#!/usr/bin/env bash
# Fuzz smoke test: builds the cargo-fuzz targets in fuzz/ and runs each one for a short, bounded
# time; exits non-zero if any target crashes (panic, failed invariant, OOM, oversized allocation,
# timeout) or if a saved regression input in fuzz/regressions/ still fails.
#
# Idempotent. Everything it writes lives under $HOARD_CACHE (default ~/.cache/hoard):
#   tools/bin/cargo-fuzz   installed on first use
#   fuzz-target/           cargo build directory (separate from the workspace's, so no lock fights)
#   fuzz/corpus/<target>/  corpora, kept between runs so later runs start where earlier ones ended
#   fuzz/artifacts/<target>/ crashing inputs;  fuzz/logs/<target>.log  libFuzzer output
#
# Environment:
#   FUZZ_SECONDS=20        time per target
#   FUZZ_TARGETS="a b"     subset of targets (default: all)
#   FUZZ_SANITIZER=address address (default; stable rustc with RUSTC_BOOTSTRAP=1) or none
#   FUZZ_FRESH=1           start from the seeds only (drop saved corpora)
#   FUZZ_K8S=1             also the agent's and the controller's decoders (feature k8s)
# Longer campaigns: see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source hack/env.sh

CARGO_FUZZ_VERSION=0.13.2
export CARGO_TARGET_DIR="$HOARD_CACHE/fuzz-target"
tools="$HOARD_CACHE/tools"
work="$HOARD_CACHE/fuzz"
export PATH="$tools/bin:$PATH"
seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
all_targets=(fuzz_pack_header fuzz_index fuzz_tree fuzz_snapshot fuzz_key_slot fuzz_open_sealed fuzz_config fuzz_unseal_blob fuzz_lock)
features=()
# FUZZ_K8S=1: also the agent's and the controller's decoders (their crates bring the
# Kubernetes and gRPC stacks into the fuzz build).
if [ "${FUZZ_K8S:-0}" = 1 ]; then
  all_targets+=(fuzz_agent_state fuzz_vol_data fuzz_repository_meta)
  features=(--features k8s)
fi
read -r -a targets <<<"${FUZZ_TARGETS:-${all_targets[*]}}"

t0=$SECONDS
if [ "$(cargo-fuzz --version 2>/dev/null || true)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION into $tools"
  nice -n 10 cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$tools" --quiet
fi

# cargo-fuzz passes -Zsanitizer=address to rustc, a nightly flag; stable rustc accepts it with
# RUSTC_BOOTSTRAP=1 (and ships the ASan runtime). `none` needs no unstable flag at all.
echo "== cargo fuzz build (sanitizer: $sanitizer)"
# shellcheck disable=SC2097,SC2098 # RUSTC_BOOTSTRAP is meant for cargo and rustc only
RUSTC_BOOTSTRAP=1 nice -n 10 cargo fuzz build --sanitizer "$sanitizer" --release --debug-assertions "${features[@]}"
bin="$CARGO_TARGET_DIR/$(rustc -vV | sed -n 's/^host: //p')/release"
t_build=$((SECONDS - t0))

rm -rf "$work/seeds"
mkdir -p "$work/seeds" "$work/logs"
"$bin/gen_corpus" "$work/seeds"

failed=()
summary=()
for t in "${targets[@]}"; do
  [ -x "$bin/$t" ] || { echo "unknown target $t" >&2; exit 2; }
  corpus="$work/corpus/$t"
  artifacts="$work/artifacts/$t"
  log="$work/logs/$t.log"
  [ "${FUZZ_FRESH:-0}" = 1 ] && rm -rf "$corpus"
  mkdir -p "$corpus" "$artifacts"

  # Known crashing inputs first: each must now pass.
  regs=()
  if [ -d "fuzz/regressions/$t" ]; then
    while IFS= read -r -d '' f; do regs+=("$f"); done < <(find "fuzz/regressions/$t" -type f -print0 | sort -z)
  fi
  if [ ${#regs[@]} -gt 0 ]; then
    if ! "$bin/$t" -rss_limit_mb=2048 -malloc_limit_mb=512 "${regs[@]}" >"$log.regressions" 2>&1; then
      echo "!! $t: a saved regression input still fails (fuzz/regressions/$t; log $log.regressions)"
      grep -m1 -A3 -E "panicked at|ERROR: " "$log.regressions" | sed 's/^/   /' || true
      failed+=("$t(regression)")
    fi
  fi

  echo "== $t: ${seconds}s"
  rc=0
  nice -n 10 "$bin/$t" "$corpus" "$work/seeds/$t" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  line=$(printf '%-18s runs=%-9s exec/s=%-7s cov=%-5s' "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}")
  if [ "$rc" != 0 ]; then
    crash=$(sed -n 's/.*Test unit written to //p' "$log" | tail -1)
    line+=" CRASH rc=$rc ${crash:-}"
    failed+=("$t")
    echo "!! $t crashed (rc=$rc); input: ${crash:-see log}; log: $log"
    grep -m1 -A6 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" | sed 's/^/   /' || true
  fi
  summary+=("$line")
done

echo "== summary (build ${t_build}s, total $((SECONDS - t0))s)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz smoke: all ${#targets[@]} targets ran clean"
