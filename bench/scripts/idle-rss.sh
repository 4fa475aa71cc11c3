#!/usr/bin/env bash
# Proxy RSS per idle keep-alive connection: N connections through one
# Pilotfish worker, one request each, then held idle; RSS before and after.
# Needs nginx (the upstream) and python3.
#
#   bench/scripts/idle-rss.sh [connections] [paced]
#
# `paced` waits 150 ms after every 100 connections, longer than the park
# delay (PARK_AFTER, 100 ms), so that few connections are mid-request at
# once: it shows what a parked connection holds. Unpaced, the connections
# opened within one park delay (a thousand or more) are all mid-request
# together, and the allocator keeps the memory they free when they park,
# as resident free space, for later requests to reuse.
set -euo pipefail
n=${1:-5000}
pace=${2:-}
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
python3 - "$pf" "$n" "$px" "$pace" <<'PY'
import socket, sys, time
pid, n, port, paced = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "paced"
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
    if paced and len(held) % 100 == 0:
        time.sleep(0.15)
time.sleep(0.3)
after = rss()
print(f"{n} idle keep-alive connections{' (paced)' if paced else ''}: RSS {before} -> {after} KiB, {(after - before) / n:.2f} KiB per connection")
PY
