#!/usr/bin/env bash
# Lists what a real node left on this host after `e2e/cluster.sh down`: processes,
# iptables chains, cgroups, links, mounts, /var/log/containers symlinks, changed sysctls.
# Exit 1 when anything is left.
#   e2e/node/leftovers.sh STATE_DIR [SYSCTL_SNAPSHOT]
# SYSCTL_SNAPSHOT: a file of `key=value` lines taken before `up` (see e2e/real-node-test.sh).
set -uo pipefail
state=${1:?usage: $0 STATE_DIR [SYSCTL_SNAPSHOT]}
report() { echo "left behind: $*"; }

scan() {

while read -r pid args; do report "process $pid: $args"; done < <(
  pgrep -af "kubelet|kube-proxy|coredns|containerd" | grep -F "$state" || true)
for tool in iptables ip6tables; do
  command -v "$tool-save" >/dev/null || continue
  "$tool-save" 2>/dev/null | grep -E '^:(KUBE|CNI)-' | while read -r chain _; do report "$tool chain ${chain#:}"; done
done
for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io /sys/fs/cgroup/kubepods /sys/fs/cgroup/k8s.io; do
  [[ -d $cg ]] && report "cgroup $cg"
done
ip link show rmcni0 >/dev/null 2>&1 && report "link rmcni0"
ip -o link show type veth 2>/dev/null | grep -q . && report "veth links: $(ip -o link show type veth | awk -F': ' '{print $2}' | tr '\n' ' ')"
findmnt -rn -o TARGET | grep -F "$state" | while read -r m; do report "mount $m"; done
[[ -d /var/log/containers ]] && find /var/log/containers -maxdepth 1 -type l | while read -r l; do report "symlink $l"; done
if [[ -n "${2:-}" ]]; then
  while IFS='=' read -r key value; do
    now=$(sysctl -n "$key" 2>/dev/null)
    [[ "$now" == "$value" ]] || report "sysctl $key=$now (was $value)"
  done <"$2"
fi
}

leftovers=$(scan)
[[ -z $leftovers ]] && exit 0
echo "$leftovers"
exit 1
