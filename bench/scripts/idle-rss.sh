#!/usr/bin/env bash
# Proxy RSS per idle keep-alive connection: N connections through one
# Pilotfish worker, one request each, then held idle; RSS before and after.
# Needs nginx (the upstream) and python3.
#
#   bench/scripts/idle-rss.sh [connections]
set -euo pipefail
n=${1:-5000}
source "$(dirname "$0")/lib.sh"
up=$(port); px=$(port)
nginx_upstream "$up"
cat > "$dir/pilotfish.toml" <<TOML
workers = 1
max_connections_per_worker = $((n + 1000))
[[listeners]]
name = "web"
bind = "127.0.0.1:$px"
protocol = "http"
cluster = "up"
idle_timeout = "5m"
[[clusters]]
name = "up"
endpoints = ["127.0.0.1:$up"]
TOML
"$bin" run --config "$dir/pilotfish.toml" >/dev/null 2>"$dir/pilotfish.log" &
pf=$!
pids+=("$pf")
wait_port "$px"
python3 - "$pf" "$n" "$px" <<'PY'
import socket, sys, time
pid, n, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
before, held = rss(), []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    held.append(s)
time.sleep(0.3)
after = rss()
print(f"{n} idle keep-alive connections: RSS {before} -> {after} KiB, {(after - before) / n:.2f} KiB per connection")
PY
