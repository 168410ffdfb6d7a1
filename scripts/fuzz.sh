#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for SECONDS each (default 30); CI runs a short
# pass (`scripts/fuzz.sh 10`), longer runs are on demand (`scripts/fuzz.sh 3600`).
# Needs a nightly toolchain; installs cargo-fuzz when missing. Without nightly it says
# so and exits 0 (the stable smoke test `untrusted::tests` still runs in `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-30}
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: no nightly toolchain here; skipping cargo-fuzz (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked -q
fi
cd fuzz
targets=$(cargo +nightly fuzz list)
# One build for all targets, then bounded runs; a crash stops the script with the input
# saved under fuzz/artifacts/<target>/.
cargo +nightly fuzz build -O
for t in $targets; do
  echo "== $t (${SECONDS_EACH}s)"
  cargo +nightly fuzz run -O "$t" -- -max_total_time="$SECONDS_EACH" -max_len=65536 2>&1 | tail -n 3
done
echo "scripts/fuzz.sh: every target ran ${SECONDS_EACH}s without a crash"
