#!/usr/bin/env bash
# Sets up a fresh machine (idempotent), builds the agent, and shows it capturing real traffic:
# a "node" network namespace with two "pods" behind veths, HTTP, UDP and ping between them, the
# agent attached to the node's veths. Everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/demo.sh: creating namespaces and loading eBPF needs root" >&2
  exit 1
fi

bash scripts/setup.sh
echo "== building mermin-agent"
cargo build --release --locked -p mermin-node-agent 2>&1 | grep -v '^warning: mermin-node-agent@' | tail -n 3

out=.demo
mkdir -p "$out"
records="$out/records.jsonl"
: > "$records"
node=mermin-demo-node
pod1=mermin-demo-pod1
pod2=mermin-demo-pod2
agent_pid=
cleanup() {
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
  for ns in "$node" "$pod1" "$pod2"; do
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
}
trap cleanup EXIT
cleanup

echo "== creating namespaces: $node routes between $pod1 (10.201.1.2) and $pod2 (10.201.2.2)"
for ns in "$node" "$pod1" "$pod2"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  # Keep name lookups inside the namespace: `ip netns exec` mounts this over /etc/resolv.conf.
  mkdir -p "/etc/netns/$ns" && echo "nameserver 127.0.0.1" > "/etc/netns/$ns/resolv.conf"
  # IPv4 only, so the table shows the demo's traffic and not IPv6 neighbour discovery.
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.all.disable_ipv6=1
done
ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1
i=0
for pod in "$pod1" "$pod2"; do
  i=$((i + 1))
  ip link add name "veth-pod$i" netns "$node" type veth peer name eth0 netns "$pod"
  ip -n "$node" addr add "10.201.$i.1/24" dev "veth-pod$i"
  ip -n "$pod" addr add "10.201.$i.2/24" dev eth0
  ip -n "$node" link set "veth-pod$i" up
  ip -n "$pod" link set eth0 up
  ip -n "$pod" route add default via "10.201.$i.1"
done

echo "== starting mermin-agent in $node on veth-*"
./target/release/mermin-agent --netns "$node" --interfaces 'veth-*' --node-name demo-node \
  --output "$records" --metrics-listen 127.0.0.1:9464 --scan-interval 250ms \
  --tcp-close-timeout 1s --udp-idle-timeout 2s --icmp-idle-timeout 2s 2>"$out/agent.log" &
agent_pid=$!
for _ in $(seq 1 100); do
  curl -sf 127.0.0.1:9464/readyz >/dev/null 2>&1 && break
  kill -0 "$agent_pid" 2>/dev/null || { cat "$out/agent.log"; exit 1; }
  sleep 0.1
done

echo "== traffic: HTTP GET x3, a UDP datagram to a closed port (answered by ICMP), ping x3"
ip netns exec "$pod2" python3 -c '
import http.server
http.server.ThreadingHTTPServer.server_bind = http.server.socketserver.TCPServer.server_bind
http.server.ThreadingHTTPServer(("10.201.2.2", 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
' >/dev/null 2>&1 &
server_pid=$!
sleep 0.5
ip netns exec "$pod1" python3 - <<'PY'
import socket, urllib.request
for _ in range(3):
    urllib.request.urlopen("http://10.201.2.2:8080/", timeout=5).read()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.sendto(b"x" * 64, ("10.201.2.2", 5353))
PY
ip netns exec "$pod1" ping -n -c 3 -i 0.2 -q 10.201.2.2 >/dev/null
kill "$server_pid"

echo "== waiting for the flows to close"
sleep 3
curl -s 127.0.0.1:9464/metrics | grep -E '^mermin_agent_(attached_interfaces|records_emitted_total|kernel_dropped)' || true
kill "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=

python3 - "$records" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
proto = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6"}
print(f"\n{len(rows)} flow records (one per flow, direction and observation point):\n")
print(f"{'interface':<11}{'dir':<8}{'proto':<10}{'source':<26}{'destination':<26}{'pkts':>6}{'bytes':>9}  end reason")
for r in sorted(rows, key=lambda r: (r["first_seen_unix_nanos"], r["interface_name"])):
    p = proto.get(r["ip_protocol"], str(r["ip_protocol"]))
    src, dst = r["source_address"], r["destination_address"]
    if r["ip_protocol"] in (6, 17):
        src, dst = f"{src}:{r['source_port']}", f"{dst}:{r['destination_port']}"
    elif r["ip_protocol"] in (1, 58):
        p = f"{p} {r['icmp_type']}/{r['icmp_code']}"
    d = r["direction"].removeprefix("DIRECTION_").lower()
    why = r["end_reason"].removeprefix("END_REASON_").lower()
    print(f"{r['interface_name']:<11}{d:<8}{p:<10}{src:<26}{dst:<26}{r['delta_packets']:>6}{r['delta_octets']:>9}  {why}")
PY
echo
echo "records: $records   agent log: $out/agent.log"
