#!/usr/bin/env bash
# User-space instructions per HTTP request of one Pilotfish worker, counted
# by callgrind: repeatable where timings are not (instructions, not time;
# the kernel's work is not counted). Needs valgrind, nginx and wrk.
#
#   bench/scripts/callgrind-per-request.sh [seconds]
#
# Runs the epoll driver: callgrind serialises threads, and a worker blocked
# in io_uring_enter starves the others (seen here), so io_uring is not
# usable under it. Includes start-up (tens of millions of instructions), so
# run long enough (default 8 s) for it to be small per request.
set -euo pipefail
secs=${1:-8}
root=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --release -q --manifest-path "$root/Cargo.toml" --bin pilotfish
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port); px=$(port)
cat > "$dir/nginx.conf" <<NGINX
worker_processes 1; daemon off; user root; pid $dir/nginx.pid; error_log $dir/error.log crit;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $dir/b; proxy_temp_path $dir/p; fastcgi_temp_path $dir/f; uwsgi_temp_path $dir/u; scgi_temp_path $dir/s;
  server { listen 127.0.0.1:$up; location / { return 200 "hello world\n"; } } }
NGINX
cat > "$dir/pilotfish.toml" <<TOML
workers = 1
[[listeners]]
name = "web"
bind = "127.0.0.1:$px"
protocol = "http"
cluster = "up"
[[clusters]]
name = "up"
endpoints = ["127.0.0.1:$up"]
TOML
nginx -p "$dir" -c nginx.conf &
MONOIO_FORCE_LEGACY_DRIVER=1 valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
  "$root/target/release/pilotfish" run -c "$dir/pilotfish.toml" 2>/dev/null &
vg=$!
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$px") 2>/dev/null && break; sleep 0.1; done
n=$(wrk -t1 -c8 -d"${secs}s" "http://127.0.0.1:$px/" | awk '/requests in/{print $1}')
kill -TERM $vg; wait $vg || true
total=$(callgrind_annotate "$dir/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
echo "requests=$n instructions=$total per_request=$((total / n))"
