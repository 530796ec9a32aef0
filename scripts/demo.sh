#!/usr/bin/env bash
# Sets up a fresh machine (idempotent), builds Mermin, and shows it end to end on real traffic:
# two "nodes" (network namespaces, one mermin-agent each, real eBPF capture) with "pods" behind
# veths, HTTP/UDP/ping across nodes and within a node, the aggregator stitching every connection
# into one span, and the spans exported over OTLP.
#
# Spans go to MERMIN_OTLP_ENDPOINT (e.g. http://tempo:4317, or an https:// endpoint) if set;
# otherwise to a small OTLP receiver started here that prints them. MERMIN_OTLP_PROTOCOL and
# MERMIN_OTLP_HEADERS (name=value,...: a tenant, an API key) reach the aggregator as they are.
# The pods get names from scripts/demo-endpoints.hcl (a static metadata file standing in for
# the Kubernetes API). Everything the demo creates is removed
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/demo.sh: creating namespaces and loading eBPF needs root" >&2
  exit 1
fi

bash scripts/setup.sh
echo "== building mermin-agent, mermin-aggregator and the demo OTLP receiver (release)"
cargo build --release --locked -p mermin-node-agent -p mermin-aggregator -p mermin-cli --bins --example otlp_print 2>&1 \
  | grep -v '^warning: mermin-node-agent@' | tail -n 2

out=.demo
rm -rf "$out" && mkdir -p "$out"
namespaces=(mermin-demo-node-a mermin-demo-node-b mermin-demo-pod-a1 mermin-demo-pod-a2 mermin-demo-pod-b1)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in "${namespaces[@]}"; do
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
}
trap cleanup EXIT
cleanup
pids=()

endpoint=${MERMIN_OTLP_ENDPOINT:-}
if [ -z "$endpoint" ]; then
  endpoint=http://127.0.0.1:14317
  ./target/release/examples/otlp_print 127.0.0.1:14317 >"$out/otlp.log" 2>&1 &
  pids+=($!)
  echo "== no MERMIN_OTLP_ENDPOINT: exporting to a demo OTLP receiver on $endpoint"
else
  echo "== exporting spans to $endpoint"
fi

./target/release/mermin-aggregator --listen 127.0.0.1:14600 --metrics-listen 127.0.0.1:19460 --otlp-endpoint "$endpoint" \
  --data-dir "$out/aggregator-data" --settle 1s --print-flows --tls-mode=disabled --admin-listen 127.0.0.1:19093 \
  --kubernetes=false --metadata-file scripts/demo-endpoints.hcl >"$out/flows.log" 2>"$out/aggregator.log" &
aggregator_pid=$!
pids+=($aggregator_pid)
for _ in $(seq 1 100); do
  curl -sf 127.0.0.1:19460/readyz >/dev/null 2>&1 && break
  kill -0 "$aggregator_pid" 2>/dev/null || { echo "the aggregator did not start:" >&2; cat "$out/aggregator.log" >&2; exit 1; }
  sleep 0.1
done

echo "== creating two nodes and three pods (network namespaces)"
for ns in "${namespaces[@]}"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  # Keep name lookups inside the namespace: `ip netns exec` mounts this over /etc/resolv.conf.
  mkdir -p "/etc/netns/$ns" && echo "nameserver 127.0.0.1" > "/etc/netns/$ns/resolv.conf"
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.all.disable_ipv6=1
done
node_a=mermin-demo-node-a node_b=mermin-demo-node-b
for node in "$node_a" "$node_b"; do ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1; done
ip link add name eth0 netns "$node_a" type veth peer name eth0 netns "$node_b"
ip -n "$node_a" addr add 10.201.0.1/30 dev eth0
ip -n "$node_b" addr add 10.201.0.2/30 dev eth0
ip -n "$node_a" link set eth0 up
ip -n "$node_b" link set eth0 up
pod() { # node host-interface pod-namespace pod-ip gateway
  ip link add name "$2" netns "$1" type veth peer name eth0 netns "$3"
  ip -n "$1" addr add "$5/32" dev "$2"
  ip -n "$3" addr add "$4/32" dev eth0
  ip -n "$1" link set "$2" up
  ip -n "$3" link set eth0 up
  ip -n "$1" route add "$4" dev "$2"
  ip -n "$3" route add "$5" dev eth0
  ip -n "$3" route add default via "$5"
}
pod "$node_a" veth-a1 mermin-demo-pod-a1 10.201.1.2 10.201.1.1
pod "$node_a" veth-a2 mermin-demo-pod-a2 10.201.1.3 10.201.1.1
pod "$node_b" veth-b1 mermin-demo-pod-b1 10.201.2.2 10.201.2.1
ip -n "$node_a" route add 10.201.2.0/24 via 10.201.0.2
ip -n "$node_b" route add 10.201.1.0/24 via 10.201.0.1

echo "== starting one mermin-agent per node (attached to veth-* and eth0 inside the node)"
port=19464
for node in "$node_a" "$node_b"; do
  ./target/release/mermin-agent --netns "$node" --interfaces 'veth-*,eth0' --node-name "${node#mermin-demo-}" \
    --aggregator http://127.0.0.1:14600 --metrics-listen "127.0.0.1:$port" --scan-interval 250ms \
    --tcp-close-timeout 1s --udp-idle-timeout 2s --icmp-idle-timeout 2s 2>"$out/agent-$node.log" &
  pids+=($!)
  agent_pid=${pids[-1]}
  for _ in $(seq 1 100); do
    curl -sf "127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    kill -0 "$agent_pid" 2>/dev/null || { echo "an agent did not start:" >&2; cat "$out/agent-$node.log" >&2; exit 1; }
    sleep 0.1
  done
  port=$((port + 1))
done

echo "== traffic: HTTP pod-a1 -> pod-b1 (cross-node) and pod-a1 -> pod-a2 (same node), UDP, ping"
for ns_ip in "mermin-demo-pod-b1 10.201.2.2" "mermin-demo-pod-a2 10.201.1.3"; do
  set -- $ns_ip
  ip netns exec "$1" python3 -c '
import http.server, sys
http.server.ThreadingHTTPServer.server_bind = http.server.socketserver.TCPServer.server_bind
http.server.ThreadingHTTPServer((sys.argv[1], 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
' "$2" >/dev/null 2>&1 &
  pids+=($!)
done
ip netns exec mermin-demo-pod-b1 python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("10.201.2.2", 5353)); s.settimeout(10)
data, peer = s.recvfrom(2048); s.sendto(data * 2, peer)
' &
pids+=($!)
sleep 0.5
ip netns exec mermin-demo-pod-a1 python3 - <<'PY'
import socket, urllib.request
for url in ("http://10.201.2.2:8080/", "http://10.201.1.3:8080/"):
    urllib.request.urlopen(url, timeout=5).read()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(5)
udp.sendto(b"x" * 64, ("10.201.2.2", 5353))
udp.recv(2048)
PY
ip netns exec mermin-demo-pod-a1 ping -n -c 3 -i 0.2 -q 10.201.2.2 >/dev/null

echo "== waiting for the flows to end and the spans to be exported"
sleep 5
echo
echo "Spans the aggregator emitted (one per connection; sent = client -> server):"
cat "$out/flows.log"
if [ -z "${MERMIN_OTLP_ENDPOINT:-}" ]; then
  echo
  echo "What the OTLP receiver got (CLIENT spans; each also has a SERVER child):"
  grep '^otlp span' "$out/otlp.log" || true
fi
echo
echo "The same flows through the admin API (\`mermin observe\`), and the agents connected (\`mermin agents\`):"
./target/release/mermin --endpoint http://127.0.0.1:19093 observe --last 20
./target/release/mermin --endpoint http://127.0.0.1:19093 agents
echo
echo "logs: $out/  (aggregator.log, agent-*.log, flows.log)"
