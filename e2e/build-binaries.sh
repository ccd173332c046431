#!/usr/bin/env bash
# Builds the pinned control-plane binaries from their Go modules into a per-version
# cache, so only the first run on a machine pays for the build.
#   e2e/build-binaries.sh [--with-scheduler] [--real-node] [--anchors]
# --real-node adds kubelet, kube-proxy (same Kubernetes version) and CoreDNS.
# --anchors adds what the benchmarks compare against: Kubeflow's training-operator
# (its binary, and its PyTorchJob CRD and RBAC from the same module), and kube-apiserver
# and kube-scheduler at GANG_K8S_VERSION (upstream gang scheduling).
# Prints the cache directory holding the binaries on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${RINGMASTER_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringmaster-e2e}
with_scheduler=false real_node=false anchors=false
for arg; do
  case $arg in
    --with-scheduler) with_scheduler=true ;;
    --real-node) real_node=true ;;
    --anchors) anchors=true ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[build] %s\n' "$*" >&2; }
fail() { printf '[build] FAILED: %s\n' "$*" >&2; exit 1; }

etcd_dir=$cache/etcd-$ETCD_VERSION
mkdir -p "$etcd_dir"

# A wrapper module: k8s.io/kubernetes replaces its staging modules with local paths,
# which `go install` refuses; pin each staging module to its published v0.Y.Z tag.
k8s_wrapper() {
  local version=$1
  local dir=$cache/src/kubernetes-$version
  if [[ ! -f $dir/go.sum ]]; then
    log "preparing Kubernetes $version wrapper module"
    mkdir -p "$dir"
    local staging_version="v0.${version#v1.}"
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [[ -f "$gomod" ]] || fail "could not download k8s.io/kubernetes@$version"
    {
      echo "module ringmaster.dev/e2e-kubernetes"
      echo "go 1.24"
      echo "require k8s.io/kubernetes $version"
      grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
    } >"$dir/go.mod.tmp"
    mv "$dir/go.mod.tmp" "$dir/go.mod"
    (cd "$dir" && GOFLAGS=-mod=mod go list k8s.io/kubernetes/cmd/kube-apiserver >/dev/null) \
      || fail "Kubernetes wrapper module does not resolve (see $dir/go.mod)"
  fi
  echo "$dir"
}

# build_k8s VERSION NAME: k8s.io/kubernetes/cmd/NAME at VERSION into $cache/kubernetes-VERSION.
build_k8s() {
  local version=$1 name=$2
  local out=$cache/kubernetes-$version
  [[ -x $out/$name ]] && return
  local dir
  dir=$(k8s_wrapper "$version")
  mkdir -p "$out"
  log "building $name $version (first run only; several minutes)"
  # Stamp the version as Kubernetes' own build does, so clients see v1.Y.Z, not v0.0.0-master.
  local minor=${version#v1.}; minor=${minor%%.*}
  local pkg=k8s.io/component-base/version
  local ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  (cd "$dir" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" \
      -o "$out/$name.tmp" "k8s.io/kubernetes/cmd/$name") || fail "go build $name $version"
  mv "$out/$name.tmp" "$out/$name"
}

build_etcd() {
  [[ -x $etcd_dir/etcd ]] && return
  local dir=$cache/src/etcd-$ETCD_VERSION
  mkdir -p "$dir"
  log "building etcd $ETCD_VERSION (first run only)"
  if [[ ! -f $dir/go.mod ]]; then
    printf 'module ringmaster.dev/e2e-etcd\ngo 1.24\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$dir/go.mod"
  fi
  (cd "$dir" && GOFLAGS=-mod=mod go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1; \
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$etcd_dir/etcd.tmp" go.etcd.io/etcd/server/v3) \
    || fail "go build etcd"
  mv "$etcd_dir/etcd.tmp" "$etcd_dir/etcd"
}

# go_install NAME VERSION PACKAGE: `go install PACKAGE@VERSION` into $cache/NAME-VERSION.
go_install() {
  local name=$1 version=$2 package=$3
  local dir=$cache/$name-$version
  [[ -x $dir/$name ]] && return
  log "building $name $version (first run only)"
  mkdir -p "$dir"
  GOBIN=$dir CGO_ENABLED=0 go install -trimpath -ldflags='-s -w' "$package@$version" \
    || fail "go install $package@$version"
}

# Our own GitOps health checker (e2e/gitops-health: Argo CD's Lua interpreter and Flux's
# kstatus), cached by the hash of its sources.
build_gitops_health() {
  local src=$here/gitops-health hash
  hash=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)
  local dir=$cache/gitops-health-$hash
  if [[ ! -x $dir/gitops-health ]]; then
    log "building gitops-health (first run only)"
    mkdir -p "$dir"
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$dir/gitops-health.tmp" .) \
      || fail "go build gitops-health"
    mv "$dir/gitops-health.tmp" "$dir/gitops-health"
  fi
  ln -sfn "$dir/gitops-health" "$cache/gitops-health"
}

# Kubeflow training-operator: the binary, and the PyTorchJob CRD and ClusterRole of the
# same module version beside it (manifests/).
build_training_operator() {
  local dir=$cache/training-operator-$TRAINING_OPERATOR_VERSION
  local module=github.com/kubeflow/training-operator
  if [[ ! -x $dir/training-operator || ! -f $dir/manifests/pytorchjobs.yaml ]]; then
    log "building Kubeflow training-operator $TRAINING_OPERATOR_VERSION (first run only)"
    mkdir -p "$dir/manifests"
    (cd "$dir" && GOBIN=$dir GOFLAGS=-mod=mod CGO_ENABLED=0 go install -trimpath -ldflags='-s -w' \
      "$module/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION") || fail "go install training-operator"
    mv "$dir/training-operator.v1" "$dir/training-operator"
    local src
    src=$(go mod download -json "$module@$TRAINING_OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    cp "$src/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$dir/manifests/pytorchjobs.yaml"
    cp "$src/manifests/base/rbac/role.yaml" "$dir/manifests/cluster-role.yaml"
    chmod u+w "$dir/manifests/"*
  fi
  ln -sfn "$dir" "$cache/training-operator"
}

command -v go >/dev/null || fail "Go is not installed (needs Go >= 1.26)"
build_etcd
go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
build_k8s "$K8S_VERSION" kube-apiserver
build_k8s "$K8S_VERSION" kube-controller-manager
build_k8s "$K8S_VERSION" kubectl
build_gitops_health
$with_scheduler && build_k8s "$K8S_VERSION" kube-scheduler
if $anchors; then
  build_training_operator
  # kube-scheduler's own gang scheduling (Workload/PodGroup API) and the API server that
  # serves that API, beside the pinned control plane: see GANG_K8S_VERSION in versions.env.
  build_k8s "$GANG_K8S_VERSION" kube-apiserver
  build_k8s "$GANG_K8S_VERSION" kube-scheduler
fi
if $real_node; then
  build_k8s "$K8S_VERSION" kubelet
  build_k8s "$K8S_VERSION" kube-proxy
  go_install coredns "$COREDNS_VERSION" github.com/coredns/coredns
  ln -sfn "$cache/coredns-$COREDNS_VERSION/coredns" "$cache/coredns"
fi
ln -sfn "$etcd_dir/etcd" "$cache/etcd"
ln -sfn "$cache/kwok-$KWOK_VERSION/kwok" "$cache/kwok"
ln -sfn "$cache/helm-$HELM_VERSION/helm" "$cache/helm"
k8s_dir=$cache/kubernetes-$K8S_VERSION
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
  [[ -x $k8s_dir/$b ]] && ln -sfn "$k8s_dir/$b" "$cache/$b"
done
echo "$cache"
