#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for SECONDS each (default 15: the CI-length pass);
# longer runs on demand (`scripts/fuzz.sh 3600`). One build, then one bounded run per
# target. A crash, leak or timeout stops the script with exit 1 and prints the saved
# reproducer (fuzz/artifacts/<target>/...) and the command that replays it.
#
# Toolchain: nightly when rustup has one; otherwise stable with RUSTC_BOOTSTRAP=1 (the
# sanitizer flags cargo-fuzz passes are unstable options). cargo-fuzz is installed from
# crates.io when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-15}

if command -v rustup >/dev/null 2>&1 && rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=+nightly
else
  echo "scripts/fuzz.sh: no nightly toolchain; using the default (stable) one with RUSTC_BOOTSTRAP=1" >&2
  toolchain=
  export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

cd fuzz
targets=$(cargo ${toolchain:+$toolchain} fuzz list)
[ -n "$targets" ] || { echo "scripts/fuzz.sh: no fuzz targets found" >&2; exit 1; }
cargo ${toolchain:+$toolchain} fuzz build
logs=$(mktemp -d)
for t in $targets; do
  echo "== $t (${SECONDS_EACH}s)"
  mkdir -p "corpus/$t"
  if ! cargo ${toolchain:+$toolchain} fuzz run "$t" "corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
      >"$logs/$t.log" 2>&1; then
    echo "!! scripts/fuzz.sh: target $t FAILED; last lines of its log:" >&2
    tail -n 40 "$logs/$t.log" >&2
    artifact=$(grep -o 'artifacts/[^ ]*' "$logs/$t.log" | tail -n 1 || true)
    if [ -n "$artifact" ]; then
      echo "!! reproducer: $(pwd)/$artifact" >&2
      echo "!! replay:     (cd fuzz && cargo ${toolchain:+$toolchain} fuzz run $t $artifact)" >&2
    fi
    exit 1
  fi
  grep -E '^(Done|#[0-9]+.*DONE)' "$logs/$t.log" | tail -n 1 || tail -n 1 "$logs/$t.log"
done
echo "scripts/fuzz.sh: every target ran ${SECONDS_EACH}s without a crash"
