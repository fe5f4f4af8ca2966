#!/usr/bin/env bash
# Builds a minimal OS template for LXC: a static busybox rootfs as a gzip tarball, in the
# layout Proxmox's vztmpl tarballs use (./bin, ./etc, ./sbin/init, …, owned by root).
#
#   scripts/make-busybox-template.sh OUT.tar.gz
#
# Its init prints "KPVE-CT-UP <hostname>" on the console, idles, and exits on SIGPWR
# (lxc's halt signal) after printing "KPVE-CT-HALT", like a real init shutting down.
# Needs busybox-static (scripts/install-host-deps.sh --test installs it).
set -euo pipefail
out=${1:?usage: $0 OUT.tar.gz}
busybox=$(command -v busybox)
if file "$busybox" 2>/dev/null | grep -q dynamically; then
  echo "make-busybox-template: $busybox is dynamically linked; install busybox-static" >&2
  exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,root,tmp,proc,sys,dev,run,var/log}
cp "$busybox" "$root/bin/busybox"
for applet in sh hostname ip cat sleep ls id touch ping; do ln -s busybox "$root/bin/$applet"; done
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:*:19000:0:99999:7:::" > "$root/etc/shadow"
echo "127.0.0.1 localhost" > "$root/etc/hosts"
cat > "$root/sbin/init" <<'INIT'
#!/bin/sh
trap 'echo KPVE-CT-HALT; exit 0' PWR TERM
echo KPVE-CT-UP $(hostname)
while true; do sleep 1 & wait $!; done
INIT
chmod 755 "$root/sbin/init" "$root"
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
tar --numeric-owner --owner=0 --group=0 -czf "$out" -C "$root" .
