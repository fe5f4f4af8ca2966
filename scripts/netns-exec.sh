#!/bin/sh
# Like `ip netns exec NS CMD…`, but the host's cgroup hierarchies stay visible under
# /sys/fs/cgroup. `ip netns exec` mounts the namespace's own sysfs over /sys, which hides the
# cgroup mounts LXC needs; here the cgroup tree is bound back on top of the new sysfs, in a
# private mount namespace, so nothing leaks to the host. Tests use it to run a whole kpve
# node (API server, agent, containers) inside a network namespace of its own.
#
#   scripts/netns-exec.sh NS CMD [ARG…]
set -eu
ns=${1:?usage: $0 NS CMD [ARG...]}
shift
exec nsenter --net="/run/netns/$ns" unshare --mount --propagation private sh -c '
  mkdir -p /run/kpve-netns-cgroup
  mount --rbind /sys/fs/cgroup /run/kpve-netns-cgroup
  mount -t sysfs sysfs /sys
  mount --rbind /run/kpve-netns-cgroup /sys/fs/cgroup
  umount -l /run/kpve-netns-cgroup
  exec "$@"' sh "$@"
