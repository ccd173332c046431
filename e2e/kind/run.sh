#!/usr/bin/env bash
# The real-node scenario on kind, for machines with Docker (kind, kubectl and helm on
# PATH). Not run in this project's CI: its machine has no Docker engine; the same scenario
# runs there on a real kubelet + containerd node (e2e/real-node-test.sh).
#   e2e/kind/run.sh          create the cluster, load the images, install, train
#   e2e/kind/run.sh delete   delete the cluster
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cluster=ringmaster
[[ "${1:-}" == delete ]] && { kind delete cluster --name "$cluster"; exit; }

mkdir -p "$here/data/models" "$here/data/outputs"
chmod 0777 "$here/data/outputs"
"$repo/examples/fetch-data.sh" --into "$here/data/models"
(cd "$here" && kind create cluster --config kind-config.yaml)

"$repo/images/build.sh"
for name in ringmaster ringmaster-operator ringmaster-scheduler; do
  kind load image-archive "$repo/target/images/$name/image.tar" --name "$cluster"
done

# No device plugin on kind: advertise fake GPUs so GPU-requesting jobs can be placed.
for node in $(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o name); do
  kubectl patch "$node" --subresource=status --type=merge \
    -p '{"status":{"capacity":{"nvidia.com/gpu":"4"},"allocatable":{"nvidia.com/gpu":"4"}}}'
done

helm install ringmaster "$repo/charts/ringmaster" --namespace ringmaster-system --create-namespace --wait

for volume in models:ReadOnlyMany outputs:ReadWriteOnce; do
  kubectl apply -f - <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: ringmaster-${volume%%:*}}
spec:
  capacity: {storage: 10Gi}
  accessModes: [${volume##*:}]
  storageClassName: ""
  claimRef: {namespace: default, name: ringmaster-${volume%%:*}}
  hostPath: {path: /ringmaster/${volume%%:*}, type: Directory}
YAML
done
kubectl apply -f "$repo/examples/volumes.yaml"

kubectl apply -f "$repo/examples/bert-spam-pvc.yaml"
kubectl wait --for=condition=Succeeded --timeout=30m trainingjob/bert-spam-pvc
kubectl get trainingjob bert-spam-pvc
ls "$here/data/outputs/bert-spam/best"
