#!/usr/bin/env bash
# One real worker node beside the kwok ones, without Docker: containerd + runc + a CNI
# bridge (Debian packages), kubelet and kube-proxy (iptables mode) at the pinned Kubernetes
# version, CoreDNS on the host behind the kube-dns Service (10.0.0.10), hostPath
# PersistentVolumes for data and outputs, and the project's images imported into
# containerd. Started and stopped by `e2e/cluster.sh up --real-node` / `down`; the control
# plane must run with the real-node settings (cluster.sh does that).
#
#   e2e/node.sh up       start the node (needs root, the control plane up)
#   e2e/node.sh down     delete its pods, stop everything, undo every host side effect
#   e2e/node.sh images   (re)import target/images/*/image.tar (images/build.sh writes them)
#   e2e/node.sh volume NAME   print the host directory behind PersistentVolume NAME
#   e2e/node.sh sysctls  print the host sysctls a node changes (down restores them)
#
# Host side effects, all undone by `down` (e2e/node/leftovers.sh lists what remains):
# sysctls (saved first, restored), iptables chains KUBE-* and CNI-*, cgroups kubepods and
# k8s.io, the bridge rmcni0, /var/log/containers symlinks, mounts under the state dir.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
state=${RINGMASTER_E2E_DIR:-$repo/.e2e}
log_tag=node
# shellcheck source=lib.sh
source "$here/lib.sh"

d=$state/node
node=${RINGMASTER_NODE_NAME:-ringmaster-node}
node_gpus=${RINGMASTER_NODE_GPUS:-4}
pod_cidr=10.88.0.0/24
bridge=rmcni0
dns_ip=10.0.0.10
pause_image=localhost/ringmaster-e2e/pause:1
sock=$d/containerd/containerd.sock
kubeconfig=$state/kubeconfig
saved_sysctls=(vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)

ctr() { command ctr --address "$sock" --namespace k8s.io "$@"; }

packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  [[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v gcc >/dev/null || missing+=(gcc libc6-dev)
  command -v busybox >/dev/null || missing+=(busybox-static) # the tests' toolbox image
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; }
}

# `key=value` for each sysctl the kubelet, kube-proxy or the CNI plugins may change.
sysctls() {
  local key
  for key in "${saved_sysctls[@]}"; do
    [[ -e /proc/sys/${key//.//} ]] && echo "$key=$(sysctl -n "$key")"
  done
  return 0
}

save_host_state() {
  [[ -f $d/sysctls ]] && return
  sysctls >"$d/sysctls"
  [[ -d /var/log/containers ]] && touch "$d/had-var-log-containers"
  return 0
}

node_certs() {
  client_cert kubelet "system:node:$node" system:nodes
  client_cert kube-proxy system:kube-proxy
  write_kubeconfig "$d/kubelet.kubeconfig" kubelet
  write_kubeconfig "$d/kube-proxy.kubeconfig" kube-proxy
}

start_containerd() {
  cat >"$d/containerd/config.toml" <<TOML
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  # Without CAP_SYS_RESOURCE a negative oom_score_adj cannot be written.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni/conf"
TOML
  cat >"$d/cni/conf/10-ringmaster.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "ringmaster", "plugins": [
  {"type": "bridge", "bridge": "$bridge", "isGateway": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pod_cidr"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$d/cni/data"}}]}
JSON
  start containerd containerd --config "$d/containerd/config.toml"
  wait_for containerd "$state/logs/containerd.log" 30 ctr version
}

import_images() {
  if [[ ! -f $d/images/pause-oci/image.tar ]]; then
    gcc -static -Os -s -o "$d/images/pause" "$here/node/pause.c" || fail images "cannot compile the pause program"
    python3 "$repo/images/oci.py" "$d/images/pause" "$pause_image" "$d/images/pause-oci" >/dev/null
  fi
  ctr images import "$d/images/pause-oci/image.tar" >/dev/null || fail images "ctr import of the pause image"
  local tar
  for tar in "$repo"/target/images/*/image.tar; do
    [[ -f $tar ]] || { log "no images in target/images (images/build.sh writes them): only the pause image"; return; }
    ctr images import "$tar" >/dev/null || fail images "ctr import $tar"
    log "imported $(basename "$(dirname "$tar")")"
  done
}

start_kubelet() {
  local port healthz
  port=$(free_port); healthz=$(free_port)
  mkdir -p "$d/kubelet/pki"
  cat >"$d/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(host_ip)
port: $port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz
containerRuntimeEndpoint: unix://$sock
# cgroup v1 here: the kubelet only warns that v1 is in maintenance mode.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
cpuManagerPolicy: none
memoryManagerPolicy: None
podLogsDir: $d/pod-logs
volumePluginDir: $d/volume-plugins
enableControllerAttachDetach: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $state/pki/ca.crt}
authorization: {mode: Webhook}
clusterDNS: [$dns_ip]
clusterDomain: cluster.local
# The imported images cannot be pulled again: never garbage-collect them, and do not
# evict pods because a shared disk is fuller than a dedicated node's would be.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
YAML
  start kubelet "$(cache_dir)/kubelet" --config="$d/kubelet.yaml" --kubeconfig="$d/kubelet.kubeconfig" \
    --root-dir="$d/kubelet" --cert-dir="$d/kubelet/pki" --hostname-override="$node" --node-ip="$(host_ip)" \
    --node-labels="topology.kubernetes.io/zone=zone-real,ringmaster.dev/rack=rack-real,ringmaster.dev/real-node=true"
  wait_for kubelet "$state/logs/kubelet.log" 60 bash -c \
    "'$(cache_dir)/kubectl' --kubeconfig '$kubeconfig' get node '$node' --no-headers | grep -q ' Ready '"
  # No device plugin: the capacity is advertised so GPU-requesting pods can be placed.
  kubectl --kubeconfig "$kubeconfig" patch node "$node" --subresource=status --type=merge \
    -p "{\"status\":{\"capacity\":{\"nvidia.com/gpu\":\"$node_gpus\"},\"allocatable\":{\"nvidia.com/gpu\":\"$node_gpus\"}}}" \
    >/dev/null || fail kubelet "could not advertise nvidia.com/gpu on $node"
}

start_kube_proxy() {
  cat >"$d/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: $node
clusterCIDR: $pod_cidr
clientConnection: {kubeconfig: $d/kube-proxy.kubeconfig}
healthzBindAddress: 127.0.0.1:$(free_port)
metricsBindAddress: 127.0.0.1:$(free_port)
oomScoreAdj: 0
# Leave the host's conntrack sysctls and route_localnet alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
YAML
  start kube-proxy "$(cache_dir)/kube-proxy" --config="$d/kube-proxy.yaml"
  wait_for kube-proxy "$state/logs/kube-proxy.log" 30 iptables -t nat -n -L KUBE-SERVICES
}

# CoreDNS answers on this host's address; the kube-dns Service (no selector) points there,
# so pods reach it through kube-proxy like any ClusterIP Service.
start_coredns() {
  local ip
  ip=$(host_ip)
  cat >"$d/Corefile" <<COREFILE
.:53 {
    bind $ip
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $kubeconfig ringmaster-e2e
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
}
COREFILE
  start coredns "$(cache_dir)/coredns" -conf "$d/Corefile"
  kubectl --kubeconfig "$kubeconfig" apply -f - >/dev/null <<YAML || fail coredns "kube-dns Service rejected"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $dns_ip
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-host
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: ringmaster-e2e}
addressType: IPv4
endpoints:
- addresses: [$ip]
  conditions: {ready: true}
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
YAML
  wait_for coredns "$state/logs/coredns.log" 30 python3 "$here/node/dnsquery.py" "$dns_ip" kubernetes.default.svc.cluster.local
}

# Two static hostPath volumes, pre-bound to the claims examples/volumes.yaml creates:
# ringmaster-models (read-only: weights and data, filled by examples/fetch-data.sh --into)
# and ringmaster-outputs (writable by the image's user).
persistent_volumes() {
  mkdir -p "$d/volumes/models" "$d/volumes/outputs"
  chmod 0777 "$d/volumes/outputs"
  "$repo/examples/fetch-data.sh" --into "$d/volumes/models" 2>"$state/logs/fetch-data.log" ||
    fail volumes "examples/fetch-data.sh --into failed" "$state/logs/fetch-data.log"
  local volume
  for volume in models:ReadOnlyMany outputs:ReadWriteOnce; do
    kubectl --kubeconfig "$kubeconfig" apply -f - >/dev/null <<YAML || fail volumes "PersistentVolume ${volume%%:*} rejected"
apiVersion: v1
kind: PersistentVolume
metadata: {name: ringmaster-${volume%%:*}-$node}
spec:
  capacity: {storage: 10Gi}
  accessModes: [${volume##*:}]
  storageClassName: ""
  claimRef: {namespace: default, name: ringmaster-${volume%%:*}}
  hostPath: {path: $d/volumes/${volume%%:*}, type: Directory}
YAML
  done
  kubectl --kubeconfig "$kubeconfig" apply -f "$repo/examples/volumes.yaml" >/dev/null ||
    fail volumes "examples/volumes.yaml rejected"
}

up() {
  [[ $(id -u) == 0 ]] || fail setup "a real node needs root (containerd, runc, iptables, cgroups)"
  local bin
  bin=$(cache_dir)
  [[ -x $bin/kubelet && -x $bin/kube-proxy && -x $bin/coredns ]] ||
    fail setup "kubelet, kube-proxy or coredns not built: run e2e/build-binaries.sh --real-node"
  # The bridge, the iptables chains and the cgroups are host-wide: two nodes would
  # tear down each other's.
  if ip link show "$bridge" >/dev/null 2>&1 || pgrep -f "kubelet.*--hostname-override" >/dev/null; then
    fail setup "another real node runs on this host (kubelet process or bridge $bridge): stop it first (e2e/cluster.sh down with its RINGMASTER_E2E_DIR)"
  fi
  local t0=$SECONDS
  packages
  mkdir -p "$d"/{containerd,cni/conf,cni/data,kubelet,pod-logs,volume-plugins,images}
  save_host_state
  node_certs
  start_containerd
  import_images
  start_kubelet
  start_kube_proxy
  start_coredns
  persistent_volumes
  log "node $node Ready in $((SECONDS - t0))s ($node_gpus nvidia.com/gpu, pods on $pod_cidr, DNS $dns_ip)"
}

# Deletes the node's pods while the kubelet still runs, so their containers, sandboxes
# and network namespaces are torn down by the runtime itself.
drain() {
  alive kubelet && alive kube-apiserver || return 0
  kubectl --kubeconfig "$kubeconfig" delete pods --all-namespaces --field-selector "spec.nodeName=$node" \
    --grace-period=2 --wait=false >/dev/null 2>&1 || true
  local deadline=$((SECONDS + 60))
  while ((SECONDS < deadline)); do
    [[ -z $(ctr tasks list -q 2>/dev/null) ]] && break
    sleep 0.5
  done
  # Stopped sandboxes are removed by the kubelet's garbage collection only much later.
  local sandbox
  for sandbox in $(ctr containers list -q 2>/dev/null); do
    ctr tasks kill -s SIGKILL "$sandbox" >/dev/null 2>&1 || true
    ctr tasks delete -f "$sandbox" >/dev/null 2>&1 || true
  done
}

down() {
  [[ -d $d ]] || return 0
  drain
  stop coredns
  stop kube-proxy
  stop kubelet
  stop containerd
  # Shims outlive containerd; only those of this node's socket are ours.
  pkill -9 -f "containerd-shim.*-address $sock" 2>/dev/null || true
  "$(cache_dir)/kube-proxy" --cleanup >/dev/null 2>&1 || true
  local table tool
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in filter nat mangle; do
      # Our chains and every rule that jumps to them; the rest of the table as it is.
      "$tool-save" -t "$table" 2>/dev/null | grep -vE '^:(KUBE|CNI)-|-A (KUBE|CNI)-|-j (KUBE|CNI)-' |
        "$tool-restore" -T "$table" 2>/dev/null || true
    done
  done
  local mount
  for mount in $(findmnt -rn -o TARGET | grep -F "$d" | sort -r); do
    umount -l "$mount" 2>/dev/null || true
  done
  local cg
  for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io /sys/fs/cgroup/kubepods /sys/fs/cgroup/k8s.io; do
    # A cgroup still in use stays (leftovers.sh reports it); the rest of down goes on.
    [[ -d $cg ]] && { find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true; }
  done
  ip link delete "$bridge" 2>/dev/null || true
  if [[ -d /var/log/containers ]]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$d/*" -delete
    [[ -f $d/had-var-log-containers ]] || rmdir /var/log/containers 2>/dev/null || true
  fi
  if [[ -f $d/sysctls ]]; then
    local line
    while IFS= read -r line; do sysctl -qw "$line" >/dev/null 2>&1 || true; done <"$d/sysctls"
  fi
  rm -rf "$d"
  log "node $node down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  images) import_images ;;
  sysctls) sysctls ;;
  volume) echo "$d/volumes/${2:?usage: $0 volume models|outputs}" ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
