# Helpers shared by cluster.sh and node.sh (sourced; expects $state to be set).
# shellcheck shell=bash

cache_dir() { echo "${RINGMASTER_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringmaster-e2e}"; }
log() { printf '[%s] %s\n' "${log_tag:-cluster}" "$*" >&2; }
# The pinned kubectl built beside the control plane (same version, no client skew).
kubectl() { "$(cache_dir)/kubectl" "$@"; }
fail() {
  printf '[%s] FAILED at step "%s": %s\n' "${log_tag:-cluster}" "$1" "$2" >&2
  [[ -n "${3:-}" && -f "$3" ]] && { echo "--- last lines of $3:" >&2; tail -n 25 "$3" >&2; }
  exit 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until a command succeeds, or fails the step with the component's log.
wait_for() {
  local step=$1 logfile=$2 timeout=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then fail "$step" "not healthy after ${timeout}s" "$logfile"; fi
    sleep 0.3
  done
}

start() {
  local name=$1; shift
  "$@" >"$state/logs/$name.log" 2>&1 &
  echo $! >"$state/pids/$name"
}

alive() { [[ -f $state/pids/$1 ]] && kill -0 "$(cat "$state/pids/$1")" 2>/dev/null; }

# SIGTERM, up to 5 s, then SIGKILL.
stop() {
  local name=$1 pid
  [[ -f $state/pids/$name ]] || return 0
  pid=$(cat "$state/pids/$name")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$state/pids/$name"
}

# The address pods and the node reach this host on: the source of the default route,
# else the first address that is not loopback.
host_ip() {
  local ip
  ip=$(ip -4 route get 192.0.2.255 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
  [[ -n $ip ]] || ip=$(hostname -I 2>/dev/null | awk '{print $1}')
  echo "${ip:?no non-loopback IPv4 address on this host}"
}

# A client certificate signed by the cluster CA: name CN [O].
client_cert() {
  local d=$state/pki
  (
    cd "$d"
    local subj="/CN=$2"
    [[ -n "${3:-}" ]] && subj="$subj/O=$3"
    openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$1.key" -out "$1.csr"
    # With extensions, so the certificate is X.509 v3 (rustls rejects v1).
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile san.cnf -extensions client -out "$1.crt"
  ) >>"$state/logs/pki.log" 2>&1 || fail certificates "openssl failed for $1" "$state/logs/pki.log"
}

write_kubeconfig() { # file user-cert-name
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: ringmaster-e2e
  cluster:
    server: https://127.0.0.1:$(cat "$state/apiserver-port")
    certificate-authority: $state/pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $state/pki/$2.crt
    client-key: $state/pki/$2.key
contexts:
- name: ringmaster-e2e
  context: {cluster: ringmaster-e2e, user: $2, namespace: default}
current-context: ringmaster-e2e
KC
}
