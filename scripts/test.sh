#!/usr/bin/env bash
# README command 2: install what the tests need, then run every test.
# With KPVE_REQUIRE_HOST=1 (CI), a missing host feature fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  scripts/install-host-deps.sh --test
else
  echo "test.sh: not root; skipping host packages. Host-dependent tests will skip (or fail with KPVE_REQUIRE_HOST=1)." >&2
fi
command -v cargo >/dev/null || { echo "test.sh: cargo not found; install a Rust toolchain (rustup) first" >&2; exit 1; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
