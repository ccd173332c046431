#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, without Docker: etcd, kube-apiserver,
# kube-controller-manager (garbage collection, service accounts) and kwok (fake GPU nodes
# whose pods run through stages a test controls).
#
#   e2e/cluster.sh up [--nodes N] [--real-node] [--gang-anchor]
#                                   build (first run only), start, install CRDs, add nodes;
#                                   --real-node adds a real kubelet + containerd node, DNS,
#                                   kube-proxy and kube-scheduler (root; see e2e/node.sh);
#                                   --gang-anchor runs the API server of GANG_K8S_VERSION
#                                   with upstream gang scheduling's API (PodGroup) served
#   e2e/cluster.sh down             stop everything and remove the state directory
#   e2e/cluster.sh env              print the exports (KUBECONFIG, PATH with the pinned kubectl)
#   e2e/cluster.sh nodes N [GPUS]   add kwok nodes (named kwok-gpu-<i>) with GPUS GPUs each
#   e2e/cluster.sh status           show the components and whether they answer
#
# State (certificates, data, logs, kubeconfig) lives in $RINGMASTER_E2E_DIR (default .e2e/
# in the repository). Binaries are cached per version by e2e/build-binaries.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
state=${RINGMASTER_E2E_DIR:-$repo/.e2e}
kubeconfig=$state/kubeconfig
real_node=false gang_anchor=false

log_tag=cluster
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=lib.sh
source "$here/lib.sh"

gen_certs() {
  local d=$state/pki extra_san=""
  $real_node && extra_san=", IP:$(host_ip)"
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=ringmaster-e2e-ca" \
      -keyout ca.key -out ca.crt
    cat >san.cnf <<CNF
[req]
distinguished_name = dn
[dn]
[ext]
subjectAltName = IP:127.0.0.1, IP:10.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc$extra_san
extendedKeyUsage = serverAuth
[client]
extendedKeyUsage = clientAuth
CNF
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile san.cnf -extensions ext -out apiserver.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >"$state/logs/pki.log" 2>&1 || fail certificates "openssl failed" "$state/logs/pki.log"
  client_cert admin ringmaster-e2e-admin system:masters
  client_cert controller-manager system:kube-controller-manager
  client_cert scheduler system:kube-scheduler
}

add_nodes() { # count gpus
  local count=$1 gpus=${2:-8} i
  local existing
  existing=$(kubectl --kubeconfig "$kubeconfig" get nodes -o name 2>/dev/null | wc -l)
  {
    for ((i = existing; i < existing + count; i++)); do
      cat <<NODE
apiVersion: v1
kind: Node
metadata:
  name: kwok-gpu-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: kwok-gpu-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    topology.kubernetes.io/zone: zone-$(printf "\\x$(printf %x $((97 + i % 2)))")
    ringmaster.dev/rack: rack-$((i / 4))
    nvidia.com/gpu.product: NVIDIA-H200
status:
  allocatable: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "$gpus"}
  capacity: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "$gpus"}
---
NODE
    done
  } | kubectl --kubeconfig "$kubeconfig" apply -f - >/dev/null || fail nodes "could not create kwok nodes"
  wait_for nodes "$state/logs/kwok.log" 60 bash -c \
    "[[ \$(kubectl --kubeconfig '$kubeconfig' get nodes --no-headers 2>/dev/null | grep -c ' Ready ') -ge $((existing + count)) ]]"
  log "$((existing + count)) kwok nodes Ready ($gpus nvidia.com/gpu each)"
}

up() {
  local nodes=8
  while (($#)); do
    case $1 in
      --nodes) nodes=$2; shift 2 ;;
      --real-node) real_node=true; shift ;;
      --gang-anchor) gang_anchor=true; shift ;;
      *) fail arguments "unknown argument $1" ;;
    esac
  done
  if alive kube-apiserver; then log "already up ($state)"; return; fi
  local t0=$SECONDS
  local bin build_args=()
  $real_node && build_args=(--real-node --with-scheduler)
  $gang_anchor && build_args+=(--anchors)
  bin=$("$here/build-binaries.sh" "${build_args[@]}" | tail -n 1) || fail build "building the control-plane binaries failed (see above)"
  # Upstream gang scheduling is alpha: its API group is off unless asked for. The
  # controller manager stays at the pinned version (it only needs stable APIs here).
  local apiserver=$bin/kube-apiserver api_features=()
  $gang_anchor && apiserver=$bin/kubernetes-$GANG_K8S_VERSION/kube-apiserver \
    api_features=(--feature-gates=GenericWorkload=true,GangScheduling=true --runtime-config=scheduling.k8s.io/v1alpha2=true)
  rm -rf "$state" && mkdir -p "$state/logs" "$state/pids"
  gen_certs
  local etcd_port etcd_peer api_port kcm_port
  etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port); kcm_port=$(free_port)
  echo "$api_port" >"$state/apiserver-port"
  echo "$etcd_port" >"$state/etcd-port"
  # Pods reach the API server through the kubernetes Service (10.0.0.1), whose endpoint is
  # this host's address: with a real node it listens there, and the kubelet's client
  # certificate authorises logs and exec.
  local api_network=(--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --endpoint-reconciler-type=none)
  $real_node && api_network=(--bind-address=0.0.0.0 --advertise-address="$(host_ip)" --endpoint-reconciler-type=lease
    --kubelet-client-certificate="$state/pki/admin.crt" --kubelet-client-key="$state/pki/admin.key"
    --kubelet-preferred-address-types=InternalIP,Hostname)

  start etcd "$bin/etcd" --data-dir="$state/etcd" --unsafe-no-fsync=true \
    --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-cluster="default=http://127.0.0.1:$etcd_peer" --quota-backend-bytes=8589934592
  wait_for etcd "$state/logs/etcd.log" 30 curl -fsS "http://127.0.0.1:$etcd_port/health"

  # Raised rate limits: scale benchmarks create thousands of objects in seconds.
  start kube-apiserver "$apiserver" "${api_features[@]}" --etcd-servers="http://127.0.0.1:$etcd_port" \
    "${api_network[@]}" --secure-port="$api_port" \
    --cert-dir="$state/pki" --tls-cert-file="$state/pki/apiserver.crt" --tls-private-key-file="$state/pki/apiserver.key" \
    --client-ca-file="$state/pki/ca.crt" --authorization-mode=Node,RBAC --allow-privileged=true \
    --service-cluster-ip-range=10.0.0.0/24 --service-account-issuer="https://127.0.0.1:$api_port" \
    --service-account-key-file="$state/pki/sa.pub" --service-account-signing-key-file="$state/pki/sa.key" \
    --max-requests-inflight=2000 --max-mutating-requests-inflight=1000 --enable-priority-and-fairness=false \
    --profiling=false \
    --audit-policy-file="$here/audit-policy.yaml" --audit-log-path="$state/logs/audit.log" --audit-log-format=json
  wait_for kube-apiserver "$state/logs/kube-apiserver.log" 90 \
    curl -fsS --cacert "$state/pki/ca.crt" --cert "$state/pki/admin.crt" --key "$state/pki/admin.key" \
    "https://127.0.0.1:$api_port/readyz"
  write_kubeconfig "$kubeconfig" admin
  write_kubeconfig "$state/controller-manager.kubeconfig" controller-manager
  write_kubeconfig "$state/scheduler.kubeconfig" scheduler

  # Kwok nodes have no volumes; the real node's hostPath volumes need claims bound.
  local no_volumes=-persistentvolume-binder,
  $real_node && no_volumes=
  start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig="$state/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$state/controller-manager.kubeconfig" --authorization-kubeconfig="$state/controller-manager.kubeconfig" \
    --service-account-private-key-file="$state/pki/sa.key" --root-ca-file="$state/pki/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false --bind-address=127.0.0.1 --secure-port="$kcm_port" \
    --controllers="*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route,${no_volumes}-attachdetach,-persistentvolume-expander,-ephemeral-volume" \
    --kube-api-qps=500 --kube-api-burst=1000 --concurrent-gc-syncs=50
  wait_for kube-controller-manager "$state/logs/kube-controller-manager.log" 60 \
    curl -fsSk "https://127.0.0.1:$kcm_port/healthz"

  start kwok "$bin/kwok" --kubeconfig="$kubeconfig" --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --config="$here/kwok/node-stages.yaml" --config="$here/kwok/pod-stages.yaml" \
    --node-ip=10.1.0.1 --cidr=10.2.0.0/16 --node-lease-duration-seconds=40 --server-address=127.0.0.1:0
  sleep 1
  alive kwok || fail kwok "kwok exited" "$state/logs/kwok.log"

  kubectl --kubeconfig "$kubeconfig" apply --server-side -f "$repo/crds/trainingjob.yaml" -f "$repo/crds/inferenceservice.yaml" \
    >"$state/logs/crds.log" 2>&1 || fail crds "kubectl apply of the CRDs was rejected" "$state/logs/crds.log"
  # Retried: `kubectl wait` fails at once, instead of waiting, while a just-created CRD
  # has no status conditions yet.
  wait_for crds "$state/logs/crds.log" 60 \
    kubectl --kubeconfig "$kubeconfig" wait --for=condition=Established --timeout=10s \
    crd/trainingjobs.ringmaster.dev crd/inferenceservices.ringmaster.dev
  wait_for serviceaccount "$state/logs/kube-controller-manager.log" 60 \
    kubectl --kubeconfig "$kubeconfig" get serviceaccount default -n default
  ((nodes > 0)) && add_nodes "$nodes" 8
  if $real_node; then
    # The default scheduler, for pods that do not name ringmaster-scheduler (the chart's).
    start kube-scheduler "$bin/kube-scheduler" --kubeconfig="$state/scheduler.kubeconfig" \
      --authentication-kubeconfig="$state/scheduler.kubeconfig" --authorization-kubeconfig="$state/scheduler.kubeconfig" \
      --leader-elect=false --bind-address=127.0.0.1 --secure-port="$(free_port)"
    RINGMASTER_E2E_DIR=$state "$here/node.sh" up
  fi
  log "up in $((SECONDS - t0))s: export KUBECONFIG=$kubeconfig"
}

down() {
  local name
  # Controllers first, so nothing recreates the real node's pods while it drains.
  for name in kwok kube-controller-manager kube-scheduler; do stop "$name"; done
  RINGMASTER_E2E_DIR=$state "$here/node.sh" down
  for name in kube-apiserver etcd; do stop "$name"; done
  rm -rf "$state"
  log "down"
}

status() {
  local name
  local names=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
  [[ -d $state/node ]] && names+=(containerd kubelet kube-proxy coredns)
  for name in "${names[@]}"; do
    if alive "$name"; then echo "$name: running (pid $(cat "$state/pids/$name"))"; else echo "$name: stopped"; fi
  done
  [[ -f $kubeconfig ]] && kubectl --kubeconfig "$kubeconfig" get --raw=/readyz >/dev/null 2>&1 && echo "apiserver: ready"
  return 0
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  env) echo "export KUBECONFIG=$kubeconfig PATH=${RINGMASTER_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringmaster-e2e}:\$PATH" ;;
  nodes) shift; add_nodes "$@" ;;
  status) status ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
