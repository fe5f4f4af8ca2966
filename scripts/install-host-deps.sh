#!/usr/bin/env bash
# Installs the host packages kpve needs on a Debian bookworm machine, idempotently.
#
#   scripts/install-host-deps.sh          runtime: QEMU/KVM, LXC, nftables, FUSE, iproute2
#   scripts/install-host-deps.sh --test   also what the test suite needs (busybox-static, cpio,
#                                         a Debian cloud kernel for test guests, python clients)
set -euo pipefail

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$(id -u)" -ne 0 ]; then
  echo "install-host-deps: must run as root to install packages (try: sudo $0 $*)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")

# qemu-system-x86 has to match the backports qemu-utils the image ships.
backports=/etc/apt/sources.list.d/kpve-backports.list
if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > "$backports"
  updated=0
fi

missing=()
need() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed" || missing+=("$1"); }

runtime_pkgs=(qemu-system-x86 qemu-utils lxc nftables fuse3 iproute2 bridge-utils uidmap xz-utils zstd)
test_pkgs=(busybox-static cpio python3-pip openssl curl vim)
for p in "${runtime_pkgs[@]}"; do need "$p"; done
if [ "$want_test" = 1 ]; then for p in "${test_pkgs[@]}"; do need "$p"; done; fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-host-deps: installing ${missing[*]}"
  apt-get update -qq
  bp=()
  [ "$codename" = bookworm ] && bp=(-t bookworm-backports)
  # qemu from backports; everything else from the main suite.
  for p in "${missing[@]}"; do
    case "$p" in
      qemu-system-x86) apt-get install -y -qq "${bp[@]}" qemu-system-x86 >/dev/null ;;
    esac
  done
  rest=()
  for p in "${missing[@]}"; do [ "$p" = qemu-system-x86 ] || rest+=("$p"); done
  [ "${#rest[@]}" -gt 0 ] && apt-get install -y -qq "${rest[@]}" >/dev/null
else
  echo "install-host-deps: host packages present"
fi

# Unprivileged containers map ids 0..65535 onto 100000.. as on Proxmox; newuidmap (uidmap)
# only lets root do that when /etc/subuid and /etc/subgid grant the range.
for f in /etc/subuid /etc/subgid; do
  if ! grep -qsE '^(root|0):100000:65536$' "$f"; then
    echo "root:100000:65536" >> "$f"
    echo "install-host-deps: granted root:100000:65536 in $f (unprivileged containers)"
  fi
done

if [ "$want_test" = 1 ]; then
  # A Debian cloud kernel boots test guests to userspace in seconds; kept out of /boot.
  # Its virtio block driver is a module: the guests that need a disk load it from modules/
  # (in dependency order, see modules/order).
  kdir=/var/cache/kpve/kernel
  if [ ! -s "$kdir/vmlinuz" ] || [ ! -s "$kdir/modules/order" ]; then
    mkdir -p "$kdir/modules"
    tmp=$(mktemp -d)
    [ -n "${updated+x}" ] || apt-get update -qq
    pkg=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-cloud-amd64$' | awk '{print $1}' | sort -V | tail -1)
    (cd "$tmp" && apt-get download -qq "$pkg" 2>/dev/null)
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    cp "$tmp"/x/boot/vmlinuz-* "$kdir/vmlinuz"
    : > "$kdir/modules/order.tmp"
    for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev \
             virtio/virtio_pci block/virtio_blk; do
      cp "$tmp"/x/lib/modules/*/kernel/drivers/$m.ko "$kdir/modules/"
      basename "$m.ko" >> "$kdir/modules/order.tmp"
    done
    mv "$kdir/modules/order.tmp" "$kdir/modules/order"
    rm -rf "$tmp"
    echo "install-host-deps: test kernel $pkg -> $kdir/vmlinuz"
  fi
  python3 -c 'import proxmoxer, requests' 2>/dev/null || pip install -q proxmoxer requests
fi
