#!/usr/bin/env bash
# README command 1: install what is missing on this machine, build kpve, and run its main
# job — bring up the VM declared in manifests/examples/vm.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  scripts/install-host-deps.sh
else
  echo "run.sh: not root; skipping host packages (QEMU, LXC, nftables, FUSE). Re-run as root to install them." >&2
fi
command -v cargo >/dev/null || { echo "run.sh: cargo not found; install a Rust toolchain (rustup) first" >&2; exit 1; }

cargo build --release --locked
kpve=target/release/kpve

echo "== validating manifests/examples against the kpve.io schemas"
"$kpve" validate -f manifests/examples

echo "== starting kpve server and applying manifests/examples/vm.yaml"
# `kpve server` is the milestone after the foundation; until it exists this says so and stops.
exec "$kpve" server --data-dir "${KPVE_DATA_DIR:-/var/lib/kpve}"
