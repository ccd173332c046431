# Network namespaces rmb0..rmb(N-1), each with eth0 at `address i`, joined by veth pairs
# on one bridge: traffic between them takes the kernel's whole network path, as between
# hosts. Sourced by the benchmarks that need it (root).
#   make_namespaces N [RATE]   RATE (e.g. 10gbit) limits every veth end with tbf
#   remove_namespaces N
BRIDGE=rmbench0

address() { echo "10.77.0.$((10 + $1))"; }

remove_namespaces() {
  for ((i = 0; i < $1; i++)); do ip netns del "rmb$i" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
}

make_namespaces() {
  local n=$1 rate=${2:-}
  remove_namespaces "$n" # a run killed before its trap
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" up
  for ((i = 0; i < n; i++)); do
    ip netns add "rmb$i"
    ip link add "rmbv$i" type veth peer name eth0 netns "rmb$i"
    ip link set "rmbv$i" master "$BRIDGE" up
    ip -n "rmb$i" addr add "$(address "$i")/24" dev eth0
    ip -n "rmb$i" link set eth0 up
    ip -n "rmb$i" link set lo up
    if [[ -n $rate ]]; then
      tc qdisc add dev "rmbv$i" root tbf rate "$rate" burst 1mb latency 10ms
      ip netns exec "rmb$i" tc qdisc add dev eth0 root tbf rate "$rate" burst 1mb latency 10ms
    fi
  done
  echo "# $n namespaces on bridge $BRIDGE${rate:+, every veth end limited to $rate}"
}
